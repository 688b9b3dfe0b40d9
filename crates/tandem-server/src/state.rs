//! What every handler shares.

use std::sync::Arc;

use tandem_engine::Engine;

/// Shared server state: the engine and the names it answers to.
#[derive(Clone)]
pub struct AppState {
    /// The engine serving this deployment.
    pub engine: Arc<Engine>,
    /// The model id reported by `/v1/models` and in responses.
    pub model_name: String,
    /// MII's deployment name (the `/mii/{deployment}` route).
    pub deployment_name: String,
    /// UNIX time the server started (`created` fields).
    pub created: u64,
}

impl AppState {
    /// State for `engine` under the given names.
    pub fn new(
        engine: Arc<Engine>,
        model_name: impl Into<String>,
        deployment_name: impl Into<String>,
    ) -> Self {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        AppState {
            engine,
            model_name: model_name.into(),
            deployment_name: deployment_name.into(),
            created,
        }
    }
}
