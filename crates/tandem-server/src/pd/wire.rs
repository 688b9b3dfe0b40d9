//! The JSON bodies between the router and the workers (HTTP on loopback).

use serde::{Deserialize, Serialize};
use tandem_engine::{EngineInfo, EngineStats, Event, GenerateParams, HeldKv};

/// `POST /pd/prefill`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrefillRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Options (the worker generates one token).
    pub params: GenerateParams,
}

/// Answer to `/pd/prefill`: the first token's event and where the prompt's KV is held.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrefillReply {
    /// The prefill's final event (its one token, or an end without one).
    pub event: Event,
    /// The held blocks (absent if the engine did not hold any).
    pub held: Option<HeldKv>,
}

/// `POST /pd/release`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReleaseRequest {
    /// The held KV's handle.
    pub handle: u64,
}

/// `POST /pd/decode`: continue a request whose prompt KV sits on another worker.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DecodeRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Options.
    pub params: GenerateParams,
    /// The token the prefill worker sampled.
    pub first_token: u32,
    /// The prefill worker's llm-datadist cluster id.
    pub source_cluster: u64,
    /// Its blocks holding the prompt's KV, in order.
    pub blocks: Vec<u32>,
}

/// `POST /pd/generate`: a whole request on one worker (colocated).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Options.
    pub params: GenerateParams,
}

/// One line of a worker's NDJSON stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamLine {
    /// The prompt's KV has arrived: the producer may free it.
    Pulled,
    /// An engine event.
    Event(Event),
    /// The request failed.
    Error(String),
}

/// `GET /pd/info`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// llm-datadist cluster id.
    pub cluster_id: u64,
    /// `prompt`, `decoder` or `mix`.
    pub role: String,
    /// llm-datadist listen port, when listening.
    pub datadist_port: Option<u16>,
    /// Engine facts.
    pub info: EngineInfo,
    /// Engine counters.
    pub stats: EngineStats,
    /// Linked clusters.
    pub links: Vec<u64>,
    /// The worker's process id.
    #[serde(default)]
    pub pid: u32,
    /// With a tensor-parallel engine: ranks 1..'s llm-datadist listen ports, in rank order.
    #[serde(default)]
    pub rank_ports: Vec<Option<u16>>,
    /// With ranks on hosts of their own: each one's host (None: the worker's), in rank order.
    #[serde(default)]
    pub rank_hosts: Vec<Option<String>>,
}

/// A peer to link to or unlink from.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Peer {
    /// Its cluster id.
    pub cluster_id: u64,
    /// Its llm-datadist host.
    pub host: String,
    /// Its llm-datadist port.
    pub port: u16,
    /// With a tensor-parallel engine: ranks 1..'s llm-datadist ports (clusters
    /// [`rank_cluster`](super::rank_kv::rank_cluster)`(cluster_id, r)`).
    #[serde(default)]
    pub rank_ports: Vec<u16>,
    /// Ranks 1..'s llm-datadist hosts where they are not `host` (empty: all on `host`).
    #[serde(default)]
    pub rank_hosts: Vec<String>,
}

/// `POST /pd/link` and `/pd/unlink`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinkRequest {
    /// Peers.
    pub peers: Vec<Peer>,
    /// Unlink only: drop the local end without telling the peer.
    #[serde(default)]
    pub force: bool,
}

/// Answer to link/unlink/switch_role: the llm-datadist status names, overall first.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReply {
    /// Overall status (`LLM_SUCCESS` on success).
    pub status: String,
    /// Per-peer statuses.
    #[serde(default)]
    pub per_peer: Vec<String>,
    /// Details on failure.
    #[serde(default)]
    pub message: String,
}

/// `POST /pd/switch_role`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SwitchRoleRequest {
    /// `prompt` or `decoder`.
    pub role: String,
    /// `ip:port` to listen on (required for `prompt`).
    #[serde(default)]
    pub listen: Option<String>,
}
