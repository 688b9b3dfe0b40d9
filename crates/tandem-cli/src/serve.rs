//! `tandem serve`: a persistent deployment over HTTP (OpenAI-compatible `/v1/*`, MII's
//! `/mii/{deployment}`, `/healthz`), bound to 127.0.0.1 unless `--host` says otherwise.

use std::sync::Arc;

use clap::Args;
use tandem_engine::Engine;
use tandem_server::AppState;

use crate::engine_args::EngineArgs;

/// Arguments of `tandem serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model (as for `generate`).
    #[arg(long)]
    model: Option<String>,
    /// Deployment name (default: `<model>-mii-deployment`), used by `/mii/{deployment}`.
    #[arg(long)]
    deployment_name: Option<String>,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// HTTP port (MII's REST gateway port).
    #[arg(long, default_value_t = 28080)]
    restful_api_port: u16,
    /// Require `Authorization: Bearer <KEY>` on /v1 and /mii routes (also from TANDEM_API_KEY).
    #[arg(long, env = "TANDEM_API_KEY")]
    api_key: Option<String>,
    #[command(flatten)]
    engine: EngineArgs,
}

/// Runs `tandem serve` until Ctrl-C.
pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let loaded = crate::load_model(a.model.as_deref())?;
    let model_name = loaded
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let deployment = a
        .deployment_name
        .clone()
        .unwrap_or_else(|| format!("{model_name}-mii-deployment"));
    let engine = Arc::new(Engine::start(loaded, a.engine.config())?);
    let state = AppState::new(engine, model_name.clone(), deployment.clone())
        .with_api_key(a.api_key.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", a.host, a.restful_api_port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        tracing::info!(
            "deployment {deployment:?} ready: http://{addr}/v1 (model {model_name:?}), http://{addr}/mii/{deployment}"
        );
        tandem_server::serve(listener, state, async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        })
        .await?;
        Ok(())
    })
}
