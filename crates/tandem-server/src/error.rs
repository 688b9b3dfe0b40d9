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

    /// A 503: the deployment could not serve the request (a worker or engine failed).
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            param: None,
        }
    }

    /// The error a request that ended with `finish` is answered with, if it failed.
    pub fn from_finish(finish: &tandem_engine::FinishReason) -> Option<Self> {
        match finish {
            tandem_engine::FinishReason::Error(msg) => {
                Some(Self::unavailable(format!("generation failed: {msg}")))
            }
            tandem_engine::FinishReason::Abort => Some(Self::unavailable(
                "the request was aborted: its engine stopped",
            )),
            _ => None,
        }
    }

    /// The OpenAI-style error object (the body of a response, or an SSE error event).
    pub fn body(&self) -> serde_json::Value {
        let kind = if self.status.is_client_error() {
            "invalid_request_error"
        } else {
            "server_error"
        };
        serde_json::json!({
            "error": { "message": self.message, "type": kind, "param": self.param, "code": self.status.as_u16() }
        })
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
        tracing::warn!(status = self.status.as_u16(), "{}", self.message);
        (self.status, Json(self.body())).into_response()
    }
}
