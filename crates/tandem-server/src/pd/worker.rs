//! A disaggregation worker: one engine whose KV pool is registered with llm-datadist as a
//! blocks cache, served to the router over HTTP (loopback for local workers; with the
//! deployment's token required on both HTTP and llm-datadist links otherwise).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use llm_datadist::{LlmRole, LlmStatusCode};
use tandem_engine::{Engine, EngineError};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::rank_kv::{rank_cluster, RankCommand, RankControl, RegisteredKv};
use super::wire::*;

type Reply<T> = Result<Json<T>, (StatusCode, String)>;

fn internal(e: impl std::fmt::Display) -> (StatusCode, String) {
    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

fn bad(e: impl std::fmt::Display) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, e.to_string())
}

/// Model id of the engine's KV in llm-datadist (one blocks cache per node and model id).
pub const KV_MODEL_ID: u64 = 0;

/// One worker: its engine and its llm-datadist instance (with a tensor-parallel engine, rank
/// 0's; the other ranks' are driven through [`RankControl`]s, each rank moving its own shard).
pub struct PdWorker {
    // Declared before `engine`: the registration must go before the memory it names.
    kv: RegisteredKv,
    ranks: Vec<RankControl>,
    engine: Arc<Engine>,
    cluster_id: u64,
    /// The deployment's token, required on every route when set.
    token: Option<Arc<str>>,
}

fn role_name(r: LlmRole) -> &'static str {
    match r {
        LlmRole::Prompt => "prompt",
        LlmRole::Decoder => "decoder",
        LlmRole::Mix => "mix",
    }
}

impl PdWorker {
    /// Initializes llm-datadist as `cluster_id` with `role` (listening on `listen`, an
    /// `ip:port`, when given) and registers the engine's KV pool. With `token`, links and
    /// HTTP calls must present it (`llm.Tandem.AuthToken`, `Authorization: Bearer`).
    pub fn start(
        engine: Arc<Engine>,
        cluster_id: u64,
        role: LlmRole,
        listen: Option<&str>,
        token: Option<&str>,
    ) -> Result<Self, llm_datadist::LlmException> {
        let regions = engine.kv_regions();
        let blocks = engine.info().num_blocks;
        // SAFETY: the regions are the engine's KV tensors, alive while the engine is; this
        // worker holds the engine and drops the registration (field order) before it.
        // Transfers touch only held (source) or reserved (destination) blocks, which no
        // engine step reads or writes meanwhile.
        let kv = unsafe { RegisteredKv::open(regions, blocks, cluster_id, role, listen, token)? };
        Ok(Self {
            kv,
            ranks: Vec::new(),
            engine,
            cluster_id,
            token: token.map(Arc::from),
        })
    }

    /// Drives the other ranks of a tensor-parallel engine: links, transfers and role switches
    /// are done by every rank on its own shard.
    pub fn with_ranks(mut self, ranks: Vec<RankControl>) -> Self {
        self.ranks = ranks;
        self
    }

    fn dd(&self) -> std::sync::MutexGuard<'_, llm_datadist::LlmDataDist> {
        self.kv.datadist.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The llm-datadist role it has now (`prompt`, `decoder`).
    pub fn role(&self) -> &'static str {
        role_name(self.dd().role())
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    fn info(&self) -> WorkerInfo {
        // The other ranks' listen ports (None for a rank that does not answer) and hosts.
        let (rank_ports, rank_hosts) = self
            .ranks
            .iter()
            .map(|r| match r.call(&RankCommand::Info) {
                Ok(i) => (i.datadist_port, i.datadist_host),
                Err(_) => (None, None),
            })
            .unzip();
        let dd = self.dd();
        WorkerInfo {
            rank_ports,
            rank_hosts,
            cluster_id: self.cluster_id,
            role: role_name(dd.role()).into(),
            datadist_port: dd.listen_addr().map(|a| a.port()),
            info: self.engine.info(),
            stats: self.engine.stats(),
            links: dd.linked_clusters(),
            pid: std::process::id(),
        }
    }

    /// Serves the worker's routes on `listener` until `shutdown` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// The worker's routes.
    pub fn router(self: Arc<Self>) -> Router {
        let token = self.token.clone();
        let routes = Router::new()
            .route("/pd/info", get(info))
            .route("/pd/prefill", post(prefill))
            .route("/pd/release", post(release))
            .route("/pd/decode", post(decode))
            .route("/pd/generate", post(generate))
            .route("/pd/link", post(link))
            .route("/pd/unlink", post(unlink))
            .route("/pd/switch_role", post(switch_role))
            .with_state(self);
        match token {
            Some(t) => routes.layer(axum::middleware::from_fn_with_state(t, require_token)),
            None => routes,
        }
    }
}

/// Refuses a call without the deployment's token: 401 with a JSON error body, logged.
async fn require_token(
    State(token): State<Arc<str>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if crate::auth::bearer(req.headers()) == Some(&*token) {
        return next.run(req).await;
    }
    tracing::warn!(path = %req.uri().path(), "refused a call without the deployment's token");
    let body = serde_json::json!({"error": {"message": "missing or wrong deployment token", "type": "unauthorized"}});
    (StatusCode::UNAUTHORIZED, Json(body)).into_response()
}

async fn info(State(w): State<Arc<PdWorker>>) -> Json<WorkerInfo> {
    Json(w.info())
}

fn engine_error(e: EngineError) -> (StatusCode, String) {
    match e {
        EngineError::Param(_) | EngineError::KvTooSmall { .. } => bad(e),
        _ => internal(e),
    }
}

async fn prefill(
    State(w): State<Arc<PdWorker>>,
    Json(req): Json<PrefillRequest>,
) -> Reply<PrefillReply> {
    let (mut events, held) = w
        .engine
        .submit_prefill(req.prompt, req.params)
        .map_err(engine_error)?;
    let mut last = None;
    while let Some(ev) = events.recv().await {
        let done = ev.finish.is_some();
        last = Some(ev);
        if done {
            break;
        }
    }
    let event = last.ok_or_else(|| internal("the engine ended the prefill without an event"))?;
    Ok(Json(PrefillReply {
        event,
        held: held.await.ok(),
    }))
}

async fn release(State(w): State<Arc<PdWorker>>, Json(req): Json<ReleaseRequest>) -> StatusCode {
    w.engine.release(req.handle);
    StatusCode::NO_CONTENT
}

/// An NDJSON response fed by a task; the task notices a dropped client at its next send.
fn ndjson(lines: mpsc::Receiver<StreamLine>) -> Body {
    use futures_util::StreamExt;
    let stream = ReceiverStream::new(lines).map(|line| {
        let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
        bytes.push(b'\n');
        Ok::<_, Infallible>(Bytes::from(bytes))
    });
    Body::from_stream(stream)
}

/// Forwards engine events until the last one or until the client goes away (which drops the
/// event stream and so cancels the request in the engine).
async fn forward(mut events: tandem_engine::EventStream, tx: mpsc::Sender<StreamLine>) {
    while let Some(ev) = events.recv().await {
        let done = ev.finish.is_some();
        if tx.send(StreamLine::Event(ev)).await.is_err() || done {
            return;
        }
    }
}

async fn decode(
    State(w): State<Arc<PdWorker>>,
    Json(req): Json<DecodeRequest>,
) -> Result<Body, (StatusCode, String)> {
    // Refuse a bad request before reserving blocks and pulling KV for it.
    w.engine
        .info()
        .check(&req.prompt, &req.params)
        .map_err(engine_error)?;
    let reservation = w
        .engine
        .reserve(req.prompt.len())
        .await
        .map_err(engine_error)?;
    let n = reservation.blocks().len();
    if req.blocks.len() < n {
        return Err(bad(format!(
            "{} source blocks for a {}-token prompt",
            req.blocks.len(),
            req.prompt.len()
        )));
    }
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let src: Vec<u64> = req.blocks[..n].iter().map(|&b| b as u64).collect();
        let dst: Vec<u64> = reservation.blocks().iter().map(|&b| b as u64).collect();
        let w2 = w.clone();
        let pulled = tokio::task::spawn_blocking(move || -> Result<(), String> {
            // Every rank pulls its shard from the same rank of the source, at once.
            std::thread::scope(|s| {
                let others: Vec<_> = w2
                    .ranks
                    .iter()
                    .map(|r| {
                        let cmd = RankCommand::Pull {
                            cluster: rank_cluster(req.source_cluster, r.rank),
                            src: src.clone(),
                            dst: dst.clone(),
                        };
                        s.spawn(move || r.call_ok(&cmd).map(drop))
                    })
                    .collect();
                let mine = w2
                    .kv
                    .pull(req.source_cluster, &src, &dst)
                    .map_err(|e| e.to_string());
                others
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err("a pull thread panicked".into()))
                    })
                    .chain([mine])
                    .collect::<Result<(), String>>()
            })
        })
        .await;
        match pulled {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = tx
                    .send(StreamLine::Error(format!("pull_blocks: {e}")))
                    .await;
                return;
            }
            Err(e) => {
                let _ = tx.send(StreamLine::Error(format!("pull task: {e}"))).await;
                return;
            }
        }
        if tx.send(StreamLine::Pulled).await.is_err() {
            return; // client gone: the reservation returns its blocks
        }
        match w
            .engine
            .submit_imported(reservation, req.prompt, req.first_token, req.params)
        {
            Ok(events) => forward(events, tx).await,
            Err(e) => {
                let _ = tx.send(StreamLine::Error(e.to_string())).await;
            }
        }
    });
    Ok(ndjson(rx))
}

async fn generate(
    State(w): State<Arc<PdWorker>>,
    Json(req): Json<GenerateRequest>,
) -> Result<Body, (StatusCode, String)> {
    let events = w
        .engine
        .submit(req.prompt, req.params)
        .map_err(engine_error)?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(forward(events, tx));
    Ok(ndjson(rx))
}

fn status_reply(
    r: Result<(LlmStatusCode, Vec<LlmStatusCode>), llm_datadist::LlmException>,
) -> StatusReply {
    match r {
        Ok((overall, per)) => StatusReply {
            status: overall.name().into(),
            per_peer: per.iter().map(|c| c.name().to_string()).collect(),
            message: String::new(),
        },
        Err(e) => StatusReply {
            status: e.status_code.name().into(),
            per_peer: Vec::new(),
            message: e.message,
        },
    }
}

/// A failed reply naming what the other ranks said.
fn rank_failure(mut reply: StatusReply, why: String) -> StatusReply {
    if reply.status == LlmStatusCode::LlmSuccess.name() {
        reply.status = LlmStatusCode::LlmLinkFailed.name().into();
    }
    reply.message = if reply.message.is_empty() {
        why
    } else {
        format!("{}; {why}", reply.message)
    };
    reply
}

/// Links (or unlinks) every rank to the same rank of each peer.
fn link_all_ranks(w: &PdWorker, req: &LinkRequest, unlink: bool) -> StatusReply {
    // A forced unlink (of a dead peer) needs no ports.
    for p in req.peers.iter().filter(|_| !unlink) {
        if p.rank_ports.len() != w.ranks.len() {
            return rank_failure(
                status_reply(Ok((LlmStatusCode::LlmSuccess, Vec::new()))),
                format!(
                    "peer cluster {} has {} tensor-parallel ranks, this worker {}: KV moves shard to shard between equal degrees only",
                    p.cluster_id,
                    p.rank_ports.len() + 1,
                    w.ranks.len() + 1
                ),
            );
        }
    }
    let mut reply = status_reply(w.kv.link(&req.peers, unlink, req.force));
    for r in &w.ranks {
        let peers: Vec<Peer> = req
            .peers
            .iter()
            .map(|p| Peer {
                cluster_id: rank_cluster(p.cluster_id, r.rank),
                host: p.rank_hosts.get(r.rank - 1).unwrap_or(&p.host).clone(),
                port: p.rank_ports.get(r.rank - 1).copied().unwrap_or(0),
                rank_ports: Vec::new(),
                rank_hosts: Vec::new(),
            })
            .collect();
        let cmd = if unlink {
            RankCommand::Unlink {
                peers,
                force: req.force,
            }
        } else {
            RankCommand::Link { peers }
        };
        if let Err(e) = r.call_ok(&cmd) {
            reply = rank_failure(reply, e);
        }
    }
    reply
}

async fn link(
    State(w): State<Arc<PdWorker>>,
    Json(req): Json<LinkRequest>,
) -> Result<Json<StatusReply>, (StatusCode, String)> {
    let r = tokio::task::spawn_blocking(move || link_all_ranks(&w, &req, false))
        .await
        .map_err(internal)?;
    Ok(Json(r))
}

async fn unlink(
    State(w): State<Arc<PdWorker>>,
    Json(req): Json<LinkRequest>,
) -> Result<Json<StatusReply>, (StatusCode, String)> {
    let r = tokio::task::spawn_blocking(move || link_all_ranks(&w, &req, true))
        .await
        .map_err(internal)?;
    Ok(Json(r))
}

async fn switch_role(
    State(w): State<Arc<PdWorker>>,
    Json(req): Json<SwitchRoleRequest>,
) -> Result<Json<StatusReply>, (StatusCode, String)> {
    let role = LlmRole::parse(&req.role).map_err(bad)?;
    let r = tokio::task::spawn_blocking(move || {
        let mine = w.kv.switch_role(role, req.listen.as_deref());
        let mut reply = status_reply(mine.map(|()| (LlmStatusCode::LlmSuccess, Vec::new())));
        // The other ranks listen on the same host (or their own), on ports of their own.
        let listen_host = req
            .listen
            .as_deref()
            .and_then(|l| l.rsplit_once(':').map(|(h, _)| h.to_string()));
        for r in &w.ranks {
            let cmd = RankCommand::SwitchRole {
                role: req.role.clone(),
                listen_host: listen_host.clone(),
            };
            if let Err(e) = r.call_ok(&cmd) {
                reply = rank_failure(reply, e);
            }
        }
        reply
    })
    .await
    .map_err(internal)?;
    Ok(Json(r))
}
