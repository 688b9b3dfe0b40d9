//! A disaggregation worker: one engine whose KV pool is registered with llm-datadist as a
//! blocks cache, served to the router over HTTP (loopback for local workers; with the
//! deployment's token required on both HTTP and llm-datadist links otherwise).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use llm_datadist::{
    BlocksCacheKey, Cache, CacheDesc, CacheManager, DataType, LayerRanges, LlmClusterInfo,
    LlmConfig, LlmDataDist, LlmRole, LlmStatusCode, Options,
};
use tandem_engine::{Engine, EngineError};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

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

/// One worker: its engine and its llm-datadist instance.
pub struct PdWorker {
    // Declared before `engine`: the registration must go before the memory it names.
    datadist: Mutex<LlmDataDist>,
    cache_manager: CacheManager,
    cache: Cache,
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
        let mut cfg = LlmConfig::new();
        if let Some(t) = token {
            cfg.set_auth_token(t);
        }
        cfg.set_device_id(0)?;
        cfg.set_enable_cache_manager(true);
        cfg.set_enable_switch_role(true);
        cfg.set_sync_kv_timeout(20_000)?;
        if let Some(l) = listen {
            cfg.set_listen_ip_info(l);
        }
        let mut dd = LlmDataDist::new(role, cluster_id);
        dd.init(&cfg.generate_options())?;
        let cm = dd.cache_manager()?;
        let regions = engine.kv_regions();
        let blocks = engine.info().num_blocks;
        let desc = CacheDesc::new(
            regions.len() as u32,
            vec![blocks as i64, (regions[0].len / blocks) as i64],
            DataType::DtUint8,
        )?;
        let addrs: Vec<u64> = regions.iter().map(|r| r.addr).collect();
        // SAFETY: the regions are the engine's KV tensors, alive while the engine is; this
        // worker holds the engine and finalizes llm-datadist (field order) before dropping it.
        // Transfers touch only held (source) or reserved (destination) blocks, which no
        // engine step reads or writes meanwhile.
        let cache = unsafe {
            cm.register_blocks_cache(
                &desc,
                &addrs,
                Some(BlocksCacheKey::new(cluster_id, KV_MODEL_ID)),
                None,
            )?
        };
        Ok(Self {
            datadist: Mutex::new(dd),
            cache_manager: cm,
            cache,
            engine,
            cluster_id,
            token: token.map(Arc::from),
        })
    }

    /// The llm-datadist role it has now (`prompt`, `decoder`).
    pub fn role(&self) -> &'static str {
        role_name(
            self.datadist
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .role(),
        )
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    fn info(&self) -> WorkerInfo {
        let dd = self.datadist.lock().unwrap_or_else(|p| p.into_inner());
        WorkerInfo {
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

impl Drop for PdWorker {
    fn drop(&mut self) {
        let _ = self.cache_manager.unregister_cache(self.cache.cache_id());
        self.datadist
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .finalize();
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
        let pulled = tokio::task::spawn_blocking(move || {
            w2.cache_manager.pull_blocks(
                BlocksCacheKey::new(req.source_cluster, KV_MODEL_ID),
                &w2.cache,
                &src,
                &dst,
                &LayerRanges::all(),
            )
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

fn cluster_infos(req: &LinkRequest) -> Result<Vec<LlmClusterInfo>, (StatusCode, String)> {
    req.peers
        .iter()
        .map(|p| {
            let mut ci = LlmClusterInfo::new(p.cluster_id);
            ci.append_local_ip_info("127.0.0.1", 0).map_err(bad)?;
            ci.append_remote_ip_info(&p.host, p.port).map_err(bad)?;
            Ok(ci)
        })
        .collect()
}

fn status_reply(
    r: Result<(LlmStatusCode, Vec<LlmStatusCode>), llm_datadist::LlmException>,
) -> Json<StatusReply> {
    Json(match r {
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
    })
}

async fn link(
    State(w): State<Arc<PdWorker>>,
    Json(req): Json<LinkRequest>,
) -> Result<Json<StatusReply>, (StatusCode, String)> {
    let infos = cluster_infos(&req)?;
    let r = tokio::task::spawn_blocking(move || {
        w.datadist
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .link_clusters(&infos, 5000)
    })
    .await
    .map_err(internal)?;
    Ok(status_reply(r))
}

async fn unlink(
    State(w): State<Arc<PdWorker>>,
    Json(req): Json<LinkRequest>,
) -> Result<Json<StatusReply>, (StatusCode, String)> {
    let infos = cluster_infos(&req)?;
    let r = tokio::task::spawn_blocking(move || {
        w.datadist
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unlink_clusters(&infos, 5000, req.force)
    })
    .await
    .map_err(internal)?;
    Ok(status_reply(r))
}

async fn switch_role(
    State(w): State<Arc<PdWorker>>,
    Json(req): Json<SwitchRoleRequest>,
) -> Result<Json<StatusReply>, (StatusCode, String)> {
    let role = LlmRole::parse(&req.role).map_err(bad)?;
    let r = tokio::task::spawn_blocking(move || {
        let opts: Option<Options> = req.listen.as_ref().map(|l| {
            [(llm_datadist::config::keys::LISTEN_IP_INFO, l.as_str())]
                .into_iter()
                .collect()
        });
        w.datadist
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .switch_role(role, opts.as_ref())
    })
    .await
    .map_err(internal)?;
    Ok(status_reply(
        r.map(|()| (LlmStatusCode::LlmSuccess, Vec::new())),
    ))
}
