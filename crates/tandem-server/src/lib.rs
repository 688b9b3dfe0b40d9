//! Tandem's serving layer over one engine: OpenAI-compatible `/v1/*` routes with SSE streaming,
//! MII's REST route `/mii/{deployment}`, and `/healthz`. Client disconnects cancel requests
//! (their engine streams are dropped) and free their KV at the next engine step.

mod admin;
mod auth;
pub mod client;
mod error;
pub mod grpc;
pub mod health;
pub mod metrics;
mod mii;
mod openai;
mod params;
pub mod pd;
pub mod registry;
pub mod replicas;
mod state;
mod tokenize;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

pub use error::ApiError;
pub use state::AppState;

/// Largest request body accepted (413 beyond).
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// The HTTP routes. Generation routes sit behind the optional API key; `/healthz` and
/// `/metrics` do not.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/models", get(openai::models))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/mii/{deployment}", post(mii::generate))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/admin/workers", get(admin::workers))
        .route("/admin/workers/role", post(admin::switch_role))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .merge(api)
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::from_fn_with_state(state.clone(), log_request))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// `GET /healthz`: `{"status": "ok" | "degraded" | "down", "reason", "workers", ...}`; 503
/// when the deployment cannot serve.
async fn healthz(State(state): State<AppState>) -> Response {
    let h = state.replicas.health();
    let code = if h.status == health::HealthStatus::Down {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    } else {
        axum::http::StatusCode::OK
    };
    (code, Json(h)).into_response()
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    let (stats, blocks) = state.replicas.stats();
    let body = state.metrics.render(
        &stats,
        blocks,
        state.replicas.counts(),
        &state.replicas.health(),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// Logs every request with an id, and counts error answers.
async fn log_request(State(state): State<AppState>, req: Request, next: Next) -> Response {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let start = std::time::Instant::now();
    let resp = next.run(req).await;
    let status = resp.status();
    if status.is_client_error() || status.is_server_error() {
        state.metrics.errors.fetch_add(1, Ordering::Relaxed);
    }
    tracing::info!(
        request_id = id,
        %method,
        path,
        status = status.as_u16(),
        ms = start.elapsed().as_millis() as u64,
        "request"
    );
    resp
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
