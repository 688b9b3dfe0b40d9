//! Deployment health as `/healthz` and `/metrics` report it: `ok`, `degraded` (still serving,
//! with less than it should have) or `down` (cannot serve), with the reason, and the failure
//! counters of a deployment that survives its workers.

use serde::Serialize;

/// Overall state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Everything up.
    Ok,
    /// Serving, with workers or replicas missing.
    Degraded,
    /// Cannot serve.
    Down,
}

/// Workers of one role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RoleCount {
    /// `prefill`, `decode` or `replica`.
    pub role: &'static str,
    /// In rotation.
    pub up: usize,
    /// Configured.
    pub expected: usize,
}

/// A deployment's health and failure counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Health {
    /// Overall state.
    pub status: HealthStatus,
    /// Why it is not `ok`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Workers by role.
    pub workers: Vec<RoleCount>,
    /// Workers restarted after a failure.
    pub restarts: u64,
    /// Requests moved to another worker after one failed (prefill is idempotent).
    pub retried: u64,
    /// Requests that failed.
    pub failed: u64,
}

impl Health {
    /// All well.
    pub fn ok() -> Self {
        Health {
            status: HealthStatus::Ok,
            reason: String::new(),
            workers: Vec::new(),
            restarts: 0,
            retried: 0,
            failed: 0,
        }
    }
}
