//! What every handler shares.

use std::sync::Arc;

use tandem_engine::GenerateParams;

use crate::error::ApiError;
use crate::metrics::Metered;
use crate::replicas::Replicas;

/// Shared server state: the engine and the names it answers to.
#[derive(Clone)]
pub struct AppState {
    /// The engines serving this deployment.
    pub replicas: Arc<Replicas>,
    /// The model id reported by `/v1/models` and in responses.
    pub model_name: String,
    /// MII's deployment name (the `/mii/{deployment}` route).
    pub deployment_name: String,
    /// UNIX time the server started (`created` fields).
    pub created: u64,
    /// When set, `/v1/*` and `/mii/*` require `Authorization: Bearer <key>`.
    pub api_key: Option<Arc<str>>,
    /// Request and latency metrics for `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The router when the deployment is disaggregated (admin routes).
    pub pd: Option<Arc<crate::pd::router::PdRouter>>,
}

impl AppState {
    /// State for `engine` under the given names.
    pub fn new(
        replicas: impl Into<Replicas>,
        model_name: impl Into<String>,
        deployment_name: impl Into<String>,
    ) -> Self {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        AppState {
            replicas: Arc::new(replicas.into()),
            model_name: model_name.into(),
            deployment_name: deployment_name.into(),
            created,
            api_key: None,
            metrics: Arc::default(),
            pd: None,
        }
    }

    /// Submits a tokenized prompt to the least-loaded replica; the stream records metrics and
    /// holds the replica's load until it is dropped.
    pub fn submit(&self, prompt: Vec<u32>, params: GenerateParams) -> Result<Metered, ApiError> {
        self.submit_preferring(prompt, params, None).map(|(m, _)| m)
    }

    /// Like [`submit`](Self::submit), to replica `prefer` while it is live; returns the
    /// replica used.
    pub fn submit_preferring(
        &self,
        prompt: Vec<u32>,
        params: GenerateParams,
        prefer: Option<usize>,
    ) -> Result<(Metered, usize), ApiError> {
        let n = prompt.len();
        let (stream, guard, replica) = self.replicas.submit_preferring(prompt, params, prefer)?;
        Ok((
            Metered::new(stream, self.metrics.clone(), n, guard),
            replica,
        ))
    }

    /// A disaggregated deployment: requests go through `router`.
    pub fn disaggregated(
        router: Arc<crate::pd::router::PdRouter>,
        model_name: impl Into<String>,
        deployment_name: impl Into<String>,
    ) -> Self {
        let generator: Arc<dyn crate::replicas::Generator> = router.clone();
        let mut state = Self::new(generator, model_name, deployment_name);
        state.pd = Some(router);
        state
    }

    /// Requires `key` as a Bearer token on the generation routes.
    pub fn with_api_key(mut self, key: Option<String>) -> Self {
        self.api_key = key.map(Arc::from);
        self
    }
}
