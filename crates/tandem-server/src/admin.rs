//! Admin routes of a disaggregated deployment: list the workers, and move one between the
//! prefill and decode roles (llm-datadist's `switch_role` under the seed's rules).

use axum::body::Bytes;
use axum::extract::State;
use axum::Json;
use serde::Deserialize;

use crate::error::ApiError;
use crate::pd::router::PdRole;
use crate::state::AppState;

fn router_of(state: &AppState) -> Result<&std::sync::Arc<crate::pd::router::PdRouter>, ApiError> {
    state
        .pd
        .as_ref()
        .ok_or_else(|| ApiError::not_found("this deployment is not disaggregated"))
}

/// `GET /admin/workers`: each worker's role, URL and live facts (or why they are missing).
pub async fn workers(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let pd = router_of(&state)?;
    let list: Vec<serde_json::Value> = pd
        .workers()
        .await
        .into_iter()
        .map(|(role, url, info)| match info {
            Ok(i) => serde_json::json!({ "role": role.name(), "url": url, "worker": i }),
            Err(e) => serde_json::json!({ "role": role.name(), "url": url, "error": e }),
        })
        .collect();
    Ok(Json(serde_json::json!({ "workers": list })))
}

/// Body of `POST /admin/workers/role`.
#[derive(Deserialize)]
pub struct RoleChange {
    url: String,
    role: String,
}

/// `POST /admin/workers/role`: `{"url": ..., "role": "prefill" | "decode"}`.
pub async fn switch_role(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let pd = router_of(&state)?;
    let req: RoleChange = crate::params::parse_body(&body, &[&["url", "role"]])?;
    let to = match req.role.as_str() {
        "prefill" | "prompt" => PdRole::Prefill,
        "decode" | "decoder" => PdRole::Decode,
        other => {
            return Err(ApiError::invalid(
                format!("unknown role {other:?} (prefill or decode)"),
                Some("role"),
            ))
        }
    };
    pd.switch_role(&req.url, to)
        .await
        .map_err(|e| ApiError::invalid(e, None))?;
    Ok(Json(
        serde_json::json!({ "url": req.url, "role": to.name() }),
    ))
}
