//! Tandem's serving layer over one engine: OpenAI-compatible `/v1/*` routes with SSE streaming,
//! MII's REST route `/mii/{deployment}`, and `/healthz`. Client disconnects cancel requests
//! (their engine streams are dropped) and free their KV at the next engine step.

mod error;
mod mii;
mod openai;
mod params;
mod state;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::{Json, Router};

pub use error::ApiError;
pub use state::AppState;

/// Largest request body accepted (413 beyond).
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// The HTTP routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({ "status": "ok" })) }),
        )
        .route("/v1/models", get(openai::models))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/mii/{deployment}", post(mii::generate))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves `router(state)` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
