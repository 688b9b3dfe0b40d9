//! The router in front of disaggregation workers: each request goes to the least-loaded
//! prefill worker, then to the least-loaded decode worker, which pulls the prompt's KV and
//! streams; short prompts go straight to a decode worker, and colocated replicas serve whole
//! requests. It presents itself as one [`Generator`], so the HTTP and gRPC front ends serve it
//! like a local engine. Workers join and leave while it runs (restarted local workers, or
//! workers discovered through etcd: see [`super::discovery`]).

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tandem_engine::{
    EngineError, EngineInfo, EngineStats, Event, EventStream, FinishReason, GenerateParams,
};
use tandem_model::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use super::wire::*;
use crate::health::{Health, HealthStatus, RoleCount};
use crate::replicas::Generator;

/// One worker as the router sees it.
pub struct WorkerHandle {
    /// Control URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    /// llm-datadist cluster id.
    pub cluster_id: u64,
    outstanding: AtomicI64,
    datadist_port: Mutex<Option<u16>>,
    /// Health probes failed in a row.
    failed_probes: AtomicU32,
}

impl WorkerHandle {
    /// A worker at `url` with `cluster_id`.
    pub fn new(url: String, cluster_id: u64) -> Arc<Self> {
        Arc::new(Self {
            url,
            cluster_id,
            outstanding: AtomicI64::new(0),
            datadist_port: Mutex::new(None),
            failed_probes: AtomicU32::new(0),
        })
    }
}

/// A worker out of rotation, until it is back (restarted or re-registered).
struct DownWorker {
    role: PdRole,
    cluster_id: u64,
    url: String,
    why: String,
    since: Instant,
}

/// Health probes a worker may fail in a row (at the stats period) before it leaves rotation.
const MAX_FAILED_PROBES: u32 = 2;

/// Holds a request's weight on a worker until dropped.
struct Load(Arc<WorkerHandle>, i64);

impl Drop for Load {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(self.1, Relaxed);
    }
}

/// Frees the producer's held KV when dropped (consumer has it, request over, or aborted).
struct Release {
    http: reqwest::Client,
    url: String,
    handle: u64,
}

impl Drop for Release {
    fn drop(&mut self) {
        let (http, url, handle) = (self.http.clone(), self.url.clone(), self.handle);
        tokio::spawn(async move {
            let body = ReleaseRequest { handle };
            if let Err(e) = http
                .post(format!("{url}/pd/release"))
                .json(&body)
                .send()
                .await
            {
                tracing::warn!("could not release held KV {handle} on {url}: {e}");
            }
        });
    }
}

/// A worker's role in the router.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PdRole {
    /// Prefill (llm-datadist Prompt, listening).
    Prefill,
    /// Decode (llm-datadist Decoder, linked to every prefill worker).
    Decode,
    /// A colocated engine serving whole requests (not linked to anyone).
    Replica,
}

impl PdRole {
    /// Every role.
    pub const ALL: [PdRole; 3] = [PdRole::Prefill, PdRole::Decode, PdRole::Replica];

    /// Its name in flags, etcd records and health reports.
    pub fn name(self) -> &'static str {
        match self {
            PdRole::Prefill => "prefill",
            PdRole::Decode => "decode",
            PdRole::Replica => "replica",
        }
    }
}

/// How a router is set up.
#[derive(Clone, Debug, Default)]
pub struct RouterOptions {
    /// Prompts of at most this many tokens are prefilled on the decode worker.
    pub local_prefill_max: usize,
    /// The deployment's token, sent to the workers (`Authorization: Bearer`).
    pub token: Option<String>,
    /// What the model allows, for a router that starts before any worker answered.
    pub info: Option<EngineInfo>,
}

/// The disaggregated deployment behind one front end.
pub struct PdRouter {
    prefill: RwLock<Vec<Arc<WorkerHandle>>>,
    decode: RwLock<Vec<Arc<WorkerHandle>>>,
    replica: RwLock<Vec<Arc<WorkerHandle>>>,
    http: reqwest::Client,
    tokenizer: Arc<Tokenizer>,
    /// The model's limits: the first worker's once one answered.
    info: RwLock<EngineInfo>,
    /// Whether `info` came from a worker.
    info_from_worker: std::sync::atomic::AtomicBool,
    local_prefill_max: usize,
    stats: Arc<Mutex<EngineStats>>,
    rt: tokio::runtime::Handle,
    /// Checks requests' grammars up front (the workers compile their own).
    grammars: tandem_engine::GrammarCompiler,
    /// This router, for the tasks that run requests (they move them between workers).
    me: Weak<PdRouter>,
    down: Mutex<Vec<DownWorker>>,
    restarts: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
    /// Held while a worker is put into rotation or switched between roles: a worker being
    /// switched is in no list meanwhile, and discovery must not add (and link) it back then.
    membership: tokio::sync::Mutex<()>,
}

/// POSTs `body` as JSON and reads the JSON answer; any failure as text.
async fn post_json<B: Serialize, R: DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
    body: &B,
) -> Result<R, String> {
    call(http, url, body).await.map_err(CallError::message)
}

/// A worker's `/pd/info`.
async fn fetch_info(http: &reqwest::Client, url: &str) -> Result<WorkerInfo, String> {
    let resp = http
        .get(format!("{url}/pd/info"))
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Err(format!("{url}: {status}: {text}"));
    }
    resp.json().await.map_err(|e| format!("{url}: {e}"))
}

/// The IPv4 address of a worker URL's host (llm-datadist links name IPv4 addresses).
fn ipv4_of(url: &str) -> Result<String, String> {
    use std::net::ToSocketAddrs;
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| format!("{url} has no host"))?;
    let port = parsed.port_or_known_default().unwrap_or(80);
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("{host}: {e}"))?
        .find(|a| a.is_ipv4())
        .map(|a| a.ip().to_string())
        .ok_or_else(|| format!("{host} has no IPv4 address"))
}

fn least_loaded(list: &RwLock<Vec<Arc<WorkerHandle>>>) -> Option<Arc<WorkerHandle>> {
    list.read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .min_by_key(|w| w.outstanding.load(Relaxed))
        .cloned()
}

fn error_event(msg: String) -> Event {
    tracing::error!("disaggregated request failed: {msg}");
    Event {
        token: None,
        text: String::new(),
        logprobs: None,
        finish: Some(FinishReason::Error(msg)),
        usage: None,
        prompt_logprobs: None,
    }
}

impl PdRouter {
    /// A router over workers, which it links. `tokenizer` is the model's; without
    /// `opts.info` the first decode worker is asked for the model's limits.
    pub async fn new(
        prefill: Vec<Arc<WorkerHandle>>,
        decode: Vec<Arc<WorkerHandle>>,
        tokenizer: Arc<Tokenizer>,
        opts: RouterOptions,
    ) -> Result<Arc<Self>, String> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = &opts.token {
            let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
                .map_err(|e| format!("deployment token: {e}"))?;
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        let http = reqwest::Client::builder()
            .no_proxy()
            .default_headers(headers)
            .build()
            .map_err(|e| e.to_string())?;
        let (info, from_worker) = match (opts.info, decode.first()) {
            (_, Some(d)) => (fetch_info(&http, &d.url).await?.info, true),
            (Some(info), None) => (info, false),
            (None, None) => {
                return Err("a router needs a decode worker or the model's limits".into())
            }
        };
        let router = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            down: Mutex::new(Vec::new()),
            restarts: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            membership: tokio::sync::Mutex::new(()),
            prefill: RwLock::new(prefill),
            decode: RwLock::new(decode),
            replica: RwLock::new(Vec::new()),
            http,
            grammars: tandem_engine::GrammarCompiler::new(tokenizer.clone(), info.vocab_size),
            tokenizer,
            info: RwLock::new(info),
            info_from_worker: std::sync::atomic::AtomicBool::new(from_worker),
            local_prefill_max: opts.local_prefill_max,
            stats: Arc::default(),
            rt: tokio::runtime::Handle::current(),
        });
        router.link_all().await?;
        let weak = Arc::downgrade(&router);
        tokio::spawn(async move {
            while let Some(r) = weak.upgrade() {
                r.refresh_stats().await;
                drop(r);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        Ok(router)
    }

    fn list(&self, role: PdRole) -> &RwLock<Vec<Arc<WorkerHandle>>> {
        match role {
            PdRole::Prefill => &self.prefill,
            PdRole::Decode => &self.decode,
            PdRole::Replica => &self.replica,
        }
    }

    /// The role of the worker at `url` if it is in rotation.
    pub fn role_of(&self, url: &str) -> Option<PdRole> {
        PdRole::ALL
            .into_iter()
            .find(|&r| self.snapshot(r).iter().any(|w| w.url == url))
    }

    fn snapshot(&self, role: PdRole) -> Vec<Arc<WorkerHandle>> {
        self.list(role)
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn worker_info(&self, w: &WorkerHandle) -> Result<WorkerInfo, String> {
        let info = fetch_info(&self.http, &w.url).await?;
        *w.datadist_port.lock().unwrap_or_else(|p| p.into_inner()) = info.datadist_port;
        Ok(info)
    }

    async fn peer(&self, w: &WorkerHandle) -> Result<Peer, String> {
        let info = self.worker_info(w).await?;
        let not_listening = || format!("prefill worker {} is not listening", w.url);
        let port = info.datadist_port.ok_or_else(not_listening)?;
        let rank_ports = info
            .rank_ports
            .iter()
            .map(|p| p.ok_or_else(not_listening))
            .collect::<Result<_, _>>()?;
        let host = ipv4_of(&w.url)?;
        // Ranks on hosts of their own are named; the others listen on the worker's.
        let rank_hosts = if info.rank_hosts.iter().any(Option::is_some) {
            info.rank_hosts
                .iter()
                .map(|h| h.clone().unwrap_or_else(|| host.clone()))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Peer {
            cluster_id: w.cluster_id,
            host,
            port,
            rank_ports,
            rank_hosts,
        })
    }

    async fn link(
        &self,
        decode: &WorkerHandle,
        prefill: &[Arc<WorkerHandle>],
        unlink: bool,
    ) -> Result<(), String> {
        let mut peers = Vec::new();
        for p in prefill {
            peers.push(self.peer(p).await?);
        }
        if peers.is_empty() {
            return Ok(());
        }
        let path = if unlink { "unlink" } else { "link" };
        let reply: StatusReply = post_json(
            &self.http,
            &format!("{}/pd/{path}", decode.url),
            &LinkRequest {
                peers,
                force: false,
            },
        )
        .await?;
        if reply.status != "LLM_SUCCESS" {
            return Err(format!(
                "{path} {} -> prefill workers: {} {:?} {}",
                decode.url, reply.status, reply.per_peer, reply.message
            ));
        }
        Ok(())
    }

    /// Links every decode worker to every prefill worker.
    async fn link_all(&self) -> Result<(), String> {
        let prefill = self.snapshot(PdRole::Prefill);
        for d in self.snapshot(PdRole::Decode) {
            self.link(&d, &prefill, false).await?;
        }
        Ok(())
    }

    /// Sums the workers' counters; a worker that fails [`MAX_FAILED_PROBES`] probes in a row
    /// leaves rotation.
    async fn refresh_stats(&self) {
        let mut sum = EngineStats::default();
        let all: Vec<_> = PdRole::ALL
            .into_iter()
            .flat_map(|r| self.snapshot(r))
            .collect();
        for w in &all {
            let probe = tokio::time::timeout(Duration::from_secs(1), self.worker_info(w)).await;
            match probe {
                Ok(Ok(i)) => {
                    w.failed_probes.store(0, Relaxed);
                    sum += i.stats;
                }
                Ok(Err(e)) => self.probe_failed(w, e),
                Err(_) => self.probe_failed(w, "no answer within 1 s".into()),
            }
        }
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = sum;
    }

    fn probe_failed(&self, w: &WorkerHandle, why: String) {
        if w.failed_probes.fetch_add(1, Relaxed) + 1 >= MAX_FAILED_PROBES {
            self.mark_down(&w.url, &format!("health probe failed: {why}"));
        }
    }

    /// Takes the worker at `url` out of rotation (it died, or stopped answering); decode
    /// workers drop their links to a lost prefill worker so that its restart can relink.
    /// Unknown URLs (already down) are ignored.
    pub fn mark_down(&self, url: &str, why: &str) {
        let mut found = None;
        for role in PdRole::ALL {
            let mut list = self.list(role).write().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = list.iter().position(|w| w.url == url) {
                found = Some((role, list.remove(i)));
            }
        }
        let Some((role, w)) = found else {
            return;
        };
        tracing::error!(url, role = ?role, "worker out of rotation: {why}");
        self.down
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(DownWorker {
                role,
                cluster_id: w.cluster_id,
                url: url.to_string(),
                why: why.to_string(),
                since: Instant::now(),
            });
        if role == PdRole::Prefill {
            let (http, decode) = (self.http.clone(), self.snapshot(PdRole::Decode));
            let peer = Peer {
                cluster_id: w.cluster_id,
                host: "127.0.0.1".into(),
                port: 0,
                rank_ports: Vec::new(),
                rank_hosts: Vec::new(),
            };
            self.rt.spawn(async move {
                for d in decode {
                    let body = LinkRequest {
                        peers: vec![peer.clone()],
                        force: true,
                    };
                    let url = format!("{}/pd/unlink", d.url);
                    if let Err(e) = post_json::<_, StatusReply>(&http, &url, &body).await {
                        tracing::warn!("{url}: {e}");
                    }
                }
            });
        }
    }

    /// Removes the worker at `url` for good (it left the deployment: its etcd lease expired
    /// or it deregistered), unlinking it like a dead one.
    pub fn remove_worker(&self, url: &str, why: &str) {
        self.mark_down(url, why);
        self.down
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|d| d.url != url);
    }

    /// Puts a (restarted or discovered) worker into rotation in `role`, linked: a prefill
    /// worker to every decode worker, a decode worker to every prefill worker. A worker that
    /// does not answer (or refuses the deployment's token) stays out.
    pub async fn add_worker(&self, role: PdRole, w: Arc<WorkerHandle>) -> Result<(), String> {
        let _membership = self.membership.lock().await;
        if let Some(r) = self.role_of(&w.url) {
            return Err(format!("{} is already in rotation as {}", w.url, r.name()));
        }
        let info = self.worker_info(&w).await?;
        if !self.info_from_worker.swap(true, Relaxed) {
            *self.info.write().unwrap_or_else(|p| p.into_inner()) = info.info;
        }
        match role {
            PdRole::Prefill => {
                for d in self.snapshot(PdRole::Decode) {
                    self.link(&d, std::slice::from_ref(&w), false).await?;
                }
            }
            PdRole::Decode => {
                self.link(&w, &self.snapshot(PdRole::Prefill), false)
                    .await?
            }
            PdRole::Replica => {}
        }
        let replaced = {
            let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
            let before = down.len();
            down.retain(|d| !(d.role == role && d.cluster_id == w.cluster_id));
            down.len() < before
        };
        if replaced {
            self.restarts.fetch_add(1, Relaxed);
        }
        tracing::info!(url = w.url, role = ?role, "worker in rotation");
        self.list(role)
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(w);
        Ok(())
    }

    /// Whether the deployment can serve, and what is missing.
    pub fn health(&self) -> Health {
        let down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        let count = |role: PdRole, name: &'static str| {
            let up = self.snapshot(role).len();
            RoleCount {
                role: name,
                up,
                expected: up + down.iter().filter(|d| d.role == role).count(),
            }
        };
        let workers: Vec<RoleCount> = PdRole::ALL
            .into_iter()
            .map(|r| count(r, r.name()))
            .filter(|c| c.expected > 0 || c.role != "replica")
            .collect();
        let reasons: Vec<String> = down
            .iter()
            .map(|d| {
                format!(
                    "{:?} worker {} down for {:.1} s: {}",
                    d.role,
                    d.url,
                    d.since.elapsed().as_secs_f64(),
                    d.why
                )
            })
            .collect();
        let up = |role: &str| {
            workers
                .iter()
                .filter(|c| c.role == role)
                .map(|c| c.up)
                .sum::<usize>()
        };
        let serving = up("decode") + up("replica");
        let status = if serving == 0 {
            HealthStatus::Down
        } else if !down.is_empty() || (up("decode") > 0 && up("prefill") == 0) {
            HealthStatus::Degraded
        } else {
            HealthStatus::Ok
        };
        let mut reason = reasons.join("; ");
        if reason.is_empty() && status != HealthStatus::Ok {
            reason = if serving == 0 {
                "no decode worker or replica".into()
            } else {
                "no prefill worker: long prompts prefill on the decode workers".into()
            };
        }
        Health {
            status,
            reason,
            workers,
            restarts: self.restarts.load(Relaxed),
            retried: self.retried.load(Relaxed),
            failed: self.failed.load(Relaxed),
        }
    }

    /// Every worker with its role and live facts.
    pub async fn workers(&self) -> Vec<(PdRole, String, Result<WorkerInfo, String>)> {
        let mut out = Vec::new();
        for role in PdRole::ALL {
            for w in self.snapshot(role) {
                out.push((role, w.url.clone(), self.worker_info(&w).await));
            }
        }
        out
    }

    /// Moves the worker at `url` to `to`: drains it, unlinks it, calls llm-datadist's
    /// `switch_role` on it (which enforces the seed's rules), and links it in its new role.
    pub async fn switch_role(&self, url: &str, to: PdRole) -> Result<(), String> {
        let from = match to {
            PdRole::Prefill => PdRole::Decode,
            PdRole::Decode => PdRole::Prefill,
            PdRole::Replica => return Err("replicas are started as such, not switched to".into()),
        };
        let _membership = self.membership.lock().await;
        let w = {
            let mut list = self.list(from).write().unwrap_or_else(|p| p.into_inner());
            let i = list
                .iter()
                .position(|w| w.url == url)
                .ok_or_else(|| format!("no {from:?} worker at {url}"))?;
            if list.len() == 1 {
                return Err(format!("{url} is the last {from:?} worker"));
            }
            list.remove(i)
        };
        let result = self.move_worker(&w, to).await;
        let home = if result.is_ok() { to } else { from };
        self.list(home)
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(w);
        if result.is_err() {
            let _ = self.link_all().await;
        }
        result
    }

    async fn move_worker(&self, w: &Arc<WorkerHandle>, to: PdRole) -> Result<(), String> {
        for _ in 0..600 {
            if w.outstanding.load(Relaxed) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let url = format!("{}/pd/switch_role", w.url);
        let switch = |role: &str, listen: Option<String>| {
            let body = SwitchRoleRequest {
                role: role.into(),
                listen,
            };
            let (http, url) = (self.http.clone(), url.clone());
            async move { post_json::<_, StatusReply>(&http, &url, &body).await }
        };
        let ok = |r: StatusReply| {
            if r.status == "LLM_SUCCESS" {
                Ok(())
            } else {
                Err(format!(
                    "switch_role on {}: {} {}",
                    w.url, r.status, r.message
                ))
            }
        };
        match to {
            PdRole::Decode => {
                for d in self.snapshot(PdRole::Decode) {
                    self.link(&d, std::slice::from_ref(w), true).await?;
                }
                ok(switch("decoder", None).await?)?;
                self.link(w, &self.snapshot(PdRole::Prefill), false).await
            }
            PdRole::Prefill => {
                self.link(w, &self.snapshot(PdRole::Prefill), true).await?;
                // It listens on the address the router reaches it at.
                let listen = format!("{}:0", ipv4_of(&w.url)?);
                ok(switch("prompt", Some(listen)).await?)?;
                for d in self.snapshot(PdRole::Decode) {
                    self.link(&d, std::slice::from_ref(w), false).await?;
                }
                Ok(())
            }
            PdRole::Replica => Err("replicas are not switched".into()),
        }
    }
}

/// How a call to a worker failed: the worker is unreachable (dead or dying: the request may
/// move elsewhere), or it answered with an error (the request fails).
enum CallError {
    Unreachable(String),
    Refused(String),
}

impl CallError {
    fn message(self) -> String {
        match self {
            CallError::Unreachable(m) | CallError::Refused(m) => m,
        }
    }
}

/// `post_json` that tells a transport failure from an error answer.
async fn call<B: Serialize, R: DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
    body: &B,
) -> Result<R, CallError> {
    let resp = http
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| CallError::Unreachable(format!("{url}: {e}")))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Err(CallError::Refused(format!("{url}: {status}: {text}")));
    }
    resp.json()
        .await
        .map_err(|e| CallError::Unreachable(format!("{url}: {e}")))
}

/// A request's hold on one worker: its load, released when dropped.
type Assigned = (Arc<WorkerHandle>, Load);

impl PdRouter {
    fn assign(&self, role: PdRole, weight: i64) -> Option<Assigned> {
        let w = least_loaded(self.list(role))?;
        w.outstanding.fetch_add(weight, Relaxed);
        Some((w.clone(), Load(w, weight)))
    }

    /// The least-loaded worker that can stream a whole request (a decode worker or a
    /// replica), and whether it is a replica.
    fn assign_streaming(&self, weight: i64) -> Option<(Assigned, bool)> {
        let d = least_loaded(&self.decode);
        let r = least_loaded(&self.replica);
        let replica = match (&d, &r) {
            (Some(d), Some(r)) => r.outstanding.load(Relaxed) < d.outstanding.load(Relaxed),
            (None, Some(_)) => true,
            _ => false,
        };
        let w = if replica { r? } else { d? };
        w.outstanding.fetch_add(weight, Relaxed);
        Some(((w.clone(), Load(w, weight)), replica))
    }
}

impl Generator for PdRouter {
    fn submit(&self, prompt: Vec<u32>, params: GenerateParams) -> Result<EventStream, EngineError> {
        let max_new = self.info().check(&prompt, &params)?;
        if let Some(g) = &params.grammar {
            self.grammars.compile(g)?;
        }
        let weight = (prompt.len() + max_new) as i64;
        let (decode, replica) = self
            .assign_streaming(weight)
            .ok_or_else(|| EngineError::Unavailable("no decode worker or replica is up".into()))?;
        // A scored prompt's log-probabilities are computed where it is prefilled: locally.
        let handoff =
            !replica && prompt.len() > self.local_prefill_max && params.prompt_logprobs.is_none();
        let prefill = if handoff {
            self.assign(PdRole::Prefill, weight)
        } else {
            None
        };
        let router = self.me.upgrade().ok_or(EngineError::Closed)?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.rt.spawn(async move {
            let req = Request {
                router: &router,
                prompt,
                params,
                max_new,
                weight,
                tx: &tx,
            };
            let outcome = tokio::select! {
                r = req.run(prefill, decode) => r,
                _ = tx.closed() => Ok(()), // client gone: dropping `run` cancels everything
            };
            if let Err(msg) = outcome {
                router.failed.fetch_add(1, Relaxed);
                let _ = tx.send(error_event(msg));
            }
        });
        Ok(rx)
    }

    fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    fn info(&self) -> EngineInfo {
        *self.info.read().unwrap_or_else(|p| p.into_inner())
    }

    fn stats(&self) -> EngineStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn health(&self) -> Health {
        PdRouter::health(self)
    }
}

/// One request on its way through the workers.
struct Request<'a> {
    router: &'a PdRouter,
    prompt: Vec<u32>,
    params: GenerateParams,
    max_new: usize,
    weight: i64,
    tx: &'a UnboundedSender<Event>,
}

/// Where the decode worker gets the prompt's KV: its own prefill, or a prefill worker's.
enum Source {
    Local,
    Held {
        first_token: u32,
        cluster: u64,
        blocks: Vec<u32>,
        /// Frees the producer's KV: dropped once the consumer has pulled it.
        release: Mutex<Option<Release>>,
    },
}

impl Request<'_> {
    /// Prefills (moving to another prefill worker, or to the decode worker, when one turns
    /// out dead), then decodes and streams (moving to another decode worker when one is found
    /// dead before anything was streamed).
    async fn run(self, mut prefill: Option<Assigned>, mut decode: Assigned) -> Result<(), String> {
        let r = self.router;
        let mut source = loop {
            let Some((p, _load)) = prefill.take() else {
                break Source::Local;
            };
            let body = PrefillRequest {
                prompt: self.prompt.clone(),
                params: self.params.clone(),
            };
            let reply: PrefillReply =
                match call(&r.http, &format!("{}/pd/prefill", p.url), &body).await {
                    Ok(reply) => reply,
                    Err(CallError::Unreachable(why)) => {
                        r.mark_down(&p.url, &why);
                        r.retried.fetch_add(1, Relaxed);
                        tracing::warn!("prefill moved off {}: {why}", p.url);
                        prefill = r.assign(PdRole::Prefill, self.weight);
                        continue;
                    }
                    Err(e) => return Err(e.message()),
                };
            let release = reply.held.as_ref().map(|h| Release {
                http: r.http.clone(),
                url: p.url.clone(),
                handle: h.handle,
            });
            let ev = reply.event;
            if let Some(f @ (FinishReason::Abort | FinishReason::Error(_))) = &ev.finish {
                return Err(format!("prefill on {} failed: {}", p.url, f.as_str()));
            }
            // The request may end at its first token: EOS, a stop string, or a budget of one.
            let ended =
                ev.token.is_none() || ev.finish != Some(FinishReason::Length) || self.max_new <= 1;
            if ended {
                let _ = self.tx.send(ev);
                return Ok(());
            }
            let (Some(first_token), Some(held), Some(release)) = (ev.token, reply.held, release)
            else {
                return Err("prefill worker returned no KV".into());
            };
            break Source::Held {
                first_token,
                cluster: p.cluster_id,
                blocks: held.blocks,
                release: Mutex::new(Some(release)),
            };
        };
        loop {
            let d = decode.0.clone();
            match self.stream_from(&d, &source).await {
                Ok(()) => return Ok(()),
                Err((streamed, why)) => {
                    r.mark_down(&d.url, &why);
                    if streamed {
                        return Err(format!("decode worker {} failed mid-stream: {why}", d.url));
                    }
                    // KV held elsewhere can only be pulled by a decode worker; without one,
                    // the request starts over on a replica (the held KV is released).
                    let other = match source {
                        Source::Held { .. } => {
                            r.assign(PdRole::Decode, self.weight).or_else(|| {
                                let (a, _) = r.assign_streaming(self.weight)?;
                                source = Source::Local;
                                Some(a)
                            })
                        }
                        Source::Local => r.assign_streaming(self.weight).map(|(a, _)| a),
                    };
                    match other {
                        Some(other) => {
                            r.retried.fetch_add(1, Relaxed);
                            tracing::warn!("decode moved off {}: {why}", d.url);
                            decode = other;
                        }
                        None => return Err(format!("no decode worker or replica is up: {why}")),
                    }
                }
            }
        }
    }

    /// Streams the request from decode worker `d`; on failure, whether anything was streamed
    /// and why.
    async fn stream_from(&self, d: &WorkerHandle, source: &Source) -> Result<(), (bool, String)> {
        let http = &self.router.http;
        let sent = match source {
            Source::Local => {
                let body = GenerateRequest {
                    prompt: self.prompt.clone(),
                    params: self.params.clone(),
                };
                http.post(format!("{}/pd/generate", d.url))
                    .json(&body)
                    .send()
                    .await
            }
            Source::Held {
                first_token,
                cluster,
                blocks,
                ..
            } => {
                let body = DecodeRequest {
                    prompt: self.prompt.clone(),
                    params: self.params.clone(),
                    first_token: *first_token,
                    source_cluster: *cluster,
                    blocks: blocks.clone(),
                };
                http.post(format!("{}/pd/decode", d.url))
                    .json(&body)
                    .send()
                    .await
            }
        };
        let resp = sent.map_err(|e| (false, format!("{}: {e}", d.url)))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            // An answer with an error is the request's failure, not the worker's.
            let _ = self
                .tx
                .send(error_event(format!("{}: {status}: {text}", d.url)));
            return Ok(());
        }
        let mut streamed = false;
        let mut body = resp.bytes_stream();
        let mut buf = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| (streamed, format!("{}: {e}", d.url)))?;
            buf.extend_from_slice(&chunk);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let line: StreamLine = serde_json::from_slice(&line)
                    .map_err(|e| (streamed, format!("bad worker line: {e}")))?;
                match line {
                    StreamLine::Pulled => {
                        // The producer's KV is free now; from here the request cannot move.
                        streamed = true;
                        if let Source::Held { release, .. } = source {
                            drop(release.lock().unwrap_or_else(|p| p.into_inner()).take());
                        }
                    }
                    StreamLine::Error(msg) => {
                        let _ = self.tx.send(error_event(msg));
                        return Ok(());
                    }
                    StreamLine::Event(ev) => {
                        streamed = true;
                        let done = ev.finish.is_some();
                        if self.tx.send(ev).is_err() || done {
                            return Ok(());
                        }
                    }
                }
            }
        }
        Err((streamed, format!("{} ended the stream early", d.url)))
    }
}
