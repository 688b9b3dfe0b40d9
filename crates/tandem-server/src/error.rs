//! HTTP errors with OpenAI's JSON error body: `{"error": {"message", "type", "param", "code"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tandem_engine::EngineError;

/// An error answered to the client.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// The request field at fault, if any.
    pub param: Option<String>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: param.map(String::from),
        }
    }

    /// A 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            param: None,
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Param(p) => ApiError::invalid(p.to_string(), p.param()),
            EngineError::KvTooSmall { .. } => ApiError::invalid(e.to_string(), Some("prompt")),
            EngineError::Model(m) => ApiError::invalid(m.to_string(), None),
            other => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: other.to_string(),
                param: None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = if self.status.is_client_error() {
            "invalid_request_error"
        } else {
            "server_error"
        };
        let body = serde_json::json!({
            "error": { "message": self.message, "type": kind, "param": self.param, "code": self.status.as_u16() }
        });
        (self.status, Json(body)).into_response()
    }
}
