//! Prefill/decode disaggregation from the command line: `tandem pd-worker` (a worker process:
//! one engine, its KV pool registered with llm-datadist, control routes on loopback HTTP), the
//! spawning and supervision of workers for `tandem serve --prefill-workers N --decode-workers
//! M`, and a worker on its own host (`tandem serve --role R --etcd ...`), registered in etcd.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use llm_datadist::LlmRole;
use tandem_engine::Engine;
use tandem_server::pd::router::{PdRole, PdRouter, WorkerHandle};
use tandem_server::pd::worker::PdWorker;

use crate::engine_args::EngineArgs;

/// First llm-datadist cluster id given to workers (worker `i` gets this plus `i`).
const FIRST_CLUSTER_ID: u64 = 1000;

/// Arguments of the internal `tandem pd-worker` command.
#[derive(Args, Debug)]
pub struct PdWorkerArgs {
    /// Model (as for `generate`).
    #[arg(long)]
    model: Option<String>,
    /// `prefill` (llm-datadist Prompt, listening) or `decode` (Decoder).
    #[arg(long, value_parser = ["prefill", "decode", "replica"])]
    role: String,
    /// llm-datadist cluster id.
    #[arg(long)]
    cluster_id: u64,
    /// Ranks of the worker's engine (each registers its KV shard as its own cluster).
    #[arg(long, default_value_t = 1)]
    tensor_parallel: usize,
    #[command(flatten)]
    engine: EngineArgs,
}

/// Where a worker's tensor-parallel ranks 1.. run.
enum Ranks<'a> {
    /// On this host, as child processes.
    Here,
    /// On other hosts, joining through etcd (until the closure says to give up).
    Hosts(
        &'a crate::tp_hosts::GroupSite,
        &'a dyn Fn() -> bool,
        &'a tokio::runtime::Handle,
    ),
}

/// Starts a worker's engine and llm-datadist instance; a prefill worker's llm-datadist
/// listens on `host`.
#[allow(clippy::too_many_arguments)]
fn start_worker(
    path: &Path,
    role: PdRole,
    cluster_id: u64,
    host: &str,
    token: Option<&str>,
    engine: &EngineArgs,
    tp: usize,
    ranks: Ranks,
) -> anyhow::Result<Arc<PdWorker>> {
    let listen = format!("{host}:0");
    let (role, listen) = match role {
        PdRole::Prefill => (LlmRole::Prompt, Some(listen.as_str())),
        PdRole::Decode | PdRole::Replica => (LlmRole::Decoder, None),
    };
    let dd = crate::tensor_parallel::RankDatadist {
        role,
        cluster_id,
        host: host.to_string(),
    };
    let (engine, ranks) = match ranks {
        _ if tp == 1 => (
            Engine::start(tandem_model::load(path)?, engine.config())?,
            Vec::new(),
        ),
        Ranks::Hosts(site, give_up, rt) => {
            crate::tp_hosts::start_engine(path, tp, engine, site, Some(&dd), give_up, rt)?
        }
        Ranks::Here => {
            // The deployment's workers share the cores, as single-rank workers do; a worker's
            // ranks split them.
            tandem_model::shard::check_world(&tandem_model::loader::read_config(path)?, tp)?;
            let cores = crate::tensor_parallel::core_plan(&tandem_kernels::allowed_cores(), 1, tp)?;
            crate::tensor_parallel::start_engine_for_datadist(path, &cores, engine, &dd)?
        }
    };
    let worker = PdWorker::start(Arc::new(engine), cluster_id, role, listen, token)?;
    Ok(Arc::new(worker.with_ranks(ranks)))
}

pub(crate) fn parse_role(name: &str) -> anyhow::Result<PdRole> {
    PdRole::ALL
        .into_iter()
        .find(|r| r.name() == name)
        .ok_or_else(|| anyhow::anyhow!("unknown role {name:?} (prefill, decode or replica)"))
}

/// Runs a worker until its parent closes stdin.
pub fn run(a: PdWorkerArgs) -> anyhow::Result<()> {
    let path = tandem_model::fetch::resolve_model(a.model.as_deref(), false)?;
    let role = parse_role(&a.role)?;
    let worker = start_worker(
        &path,
        role,
        a.cluster_id,
        "127.0.0.1",
        None,
        &a.engine,
        a.tensor_parallel,
        Ranks::Here,
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("PD-WORKER-READY {}", listener.local_addr()?.port());
        // The parent holds our stdin: when it goes, so do we.
        let parent_gone = async {
            let _ = tokio::task::spawn_blocking(|| {
                let mut sink = String::new();
                while std::io::stdin()
                    .read_line(&mut sink)
                    .map(|n| n > 0)
                    .unwrap_or(false)
                {}
            })
            .await;
        };
        // An engine that stopped (a dead tensor-parallel rank) ends the worker too: the
        // deployment sees it exit and starts a new one.
        let engine = worker.engine().clone();
        let engine_stopped = async move {
            while engine.is_running() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let stopped = Arc::new(AtomicBool::new(false));
        let flag = stopped.clone();
        let shutdown = async move {
            tokio::select! {
                _ = parent_gone => {}
                _ = engine_stopped => flag.store(true, Ordering::SeqCst),
            }
        };
        worker.clone().serve(listener, shutdown).await?;
        drop(worker);
        anyhow::ensure!(
            !stopped.load(Ordering::SeqCst),
            "the worker's engine stopped"
        );
        anyhow::Ok(())
    });
    // The stdin watcher may still be blocked in a read: do not wait for it.
    rt.shutdown_background();
    result
}

/// One worker process slot: what it is, and how to start it again.
struct Slot {
    role: PdRole,
    cluster_id: u64,
    child: Option<Child>,
    url: String,
    /// When the current process started (a worker that ran long enough resets the backoff).
    started: Instant,
    /// Delay before the next restart, doubling up to [`MAX_BACKOFF`].
    backoff: Duration,
    /// When the dead worker is due to start again.
    restart_at: Option<Instant>,
}

/// First delay before restarting a dead worker.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest delay between restarts of a worker that keeps dying.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that ran this long before dying restarts after [`FIRST_BACKOFF`] again.
const STABLE: Duration = Duration::from_secs(60);
/// How often the supervisor looks at its workers.
const POLL: Duration = Duration::from_millis(100);

/// The worker processes of a disaggregated deployment, supervised: a worker that exits is
/// reaped at once (no zombie), taken out of the router's rotation, and started again with
/// backoff, then linked back. All are stopped when this is dropped.
pub struct Workers {
    slots: Arc<Mutex<Vec<Slot>>>,
    spec: Arc<Spec>,
    stop: Arc<AtomicBool>,
    monitor: Option<std::thread::JoinHandle<()>>,
    /// Prefill workers.
    pub prefill: Vec<Arc<WorkerHandle>>,
    /// Decode workers.
    pub decode: Vec<Arc<WorkerHandle>>,
}

/// How to start a worker.
struct Spec {
    model: std::path::PathBuf,
    engine: EngineArgs,
    tensor_parallel: usize,
}

/// A worker on a host of its own, as `tandem serve --role` starts it.
pub struct RemoteWorker<'a> {
    /// The model's files.
    pub model: &'a Path,
    /// Its role.
    pub role: PdRole,
    /// etcd endpoints.
    pub etcd: Vec<String>,
    /// The deployment it joins.
    pub deployment: String,
    /// Address to listen on (HTTP control and llm-datadist).
    pub host: String,
    /// HTTP control port (0: any free port).
    pub port: u16,
    /// Address the router and the other workers reach it at (default: `host`).
    pub advertise_host: Option<String>,
    /// llm-datadist cluster id (default: random).
    pub cluster_id: Option<u64>,
    /// The deployment's token.
    pub token: Option<String>,
    /// Engine flags.
    pub engine: &'a EngineArgs,
    /// Ranks of its engine: 2 or more runs ranks 1.. on other hosts, in group `tp_group`.
    pub tensor_parallel: usize,
    /// The tensor-parallel group's name (what its ranks join with `tandem tp-rank`).
    pub tp_group: Option<String>,
}

/// Whether `host` is a loopback address (or name).
pub(crate) fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// A cluster id unlikely to collide with another worker's (ids are u64, chosen by each
/// worker on its own); also a tensor-parallel group's epoch.
pub(crate) fn random_cluster_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    // Below 2^53 so that every JSON reader keeps it exact; never the reserved all-ones.
    h.finish() >> 11
}

impl RemoteWorker<'_> {
    /// Runs the worker, registered in etcd, until Ctrl-C or SIGTERM (then deregisters). A
    /// worker whose engine stops (a tensor-parallel rank died) deregisters, forms its group
    /// again and registers again once its ranks are back.
    pub fn run(self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.token.is_some() || is_loopback(&self.host),
            "a worker listening on {} needs the deployment's token (--auth-token or TANDEM_AUTH_TOKEN)",
            self.host
        );
        let advertise = self
            .advertise_host
            .clone()
            .unwrap_or_else(|| self.host.clone());
        anyhow::ensure!(
            advertise != "0.0.0.0" && advertise != "::",
            "listening on {} needs --advertise-host (the address others reach this worker at)",
            self.host
        );
        let site = match (&self.tp_group, self.tensor_parallel > 1) {
            (Some(group), true) => Some(crate::tp_hosts::GroupSite {
                etcd: self.etcd.clone(),
                deployment: self.deployment.clone(),
                group: group.clone(),
                host: self.host.clone(),
                advertise_host: advertise.clone(),
                token: self.token.clone().unwrap_or_default(),
            }),
            (None, true) => anyhow::bail!(
                "--tensor-parallel {} with --role needs --tp-group NAME: ranks 1.. join it from their hosts with `tandem tp-rank --tp-group NAME --rank R`",
                self.tensor_parallel
            ),
            _ => None,
        };
        let cluster_id = self.cluster_id.unwrap_or_else(random_cluster_id);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        rt.spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
        let stopping = || *stop.borrow();
        let mut formed_before = false;
        loop {
            let ranks = match &site {
                Some(site) => Ranks::Hosts(site, &stopping, rt.handle()),
                None => Ranks::Here,
            };
            let started = start_worker(
                self.model,
                self.role,
                cluster_id,
                &self.host,
                self.token.as_deref(),
                self.engine,
                self.tensor_parallel,
                ranks,
            );
            if stopping() {
                return Ok(());
            }
            let worker = match started {
                Ok(w) => w,
                // Forming the group again: a rank that is not back yet, or left while
                // joining, is waited for; the first start's errors end the worker.
                Err(e) if formed_before => {
                    tracing::warn!("cannot form the tensor-parallel group again: {e:#}");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
                Err(e) => return Err(e),
            };
            formed_before = true;
            let engine_stopped =
                rt.block_on(self.serve(&worker, cluster_id, &advertise, stop.clone()))?;
            drop(worker);
            if !engine_stopped {
                return Ok(());
            }
            tracing::warn!(
                "the worker's engine stopped (a tensor-parallel rank is gone): forming the group again"
            );
        }
    }

    /// Serves `worker`, registered in etcd, until `stop` or until its engine stops (then
    /// returns true).
    async fn serve(
        &self,
        worker: &Arc<PdWorker>,
        cluster_id: u64,
        advertise: &str,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<bool> {
        let listener = tokio::net::TcpListener::bind((self.host.as_str(), self.port))
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", self.host, self.port))?;
        let url = format!("http://{advertise}:{}", listener.local_addr()?.port());
        let started_as = self.role;
        let w = worker.clone();
        let record_url = url.clone();
        // The record follows the worker's role (the router may switch it).
        let record = move || tandem_server::pd::discovery::WorkerRecord {
            role: match (started_as, w.role()) {
                (PdRole::Replica, _) => PdRole::Replica,
                (_, "prompt") => PdRole::Prefill,
                _ => PdRole::Decode,
            },
            url: record_url.clone(),
            cluster_id,
        };
        let registration = tandem_server::pd::discovery::Registration::start(
            self.etcd.clone(),
            &self.deployment,
            record,
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot register in etcd at {:?}: {e}", self.etcd))?;
        tracing::info!(
            url,
            cluster_id,
            role = self.role.name(),
            deployment = self.deployment,
            "worker ready"
        );
        let engine = worker.engine().clone();
        let engine_stopped = Arc::new(AtomicBool::new(false));
        let flag = engine_stopped.clone();
        let shutdown = async move {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {}
                _ = async {
                    while engine.is_running() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                } => flag.store(true, Ordering::SeqCst),
            }
        };
        worker.clone().serve(listener, shutdown).await?;
        registration.revoke().await;
        tracing::info!(url, "worker stopped");
        Ok(engine_stopped.load(Ordering::SeqCst))
    }
}

/// Resolves at Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

impl Spec {
    /// Starts a worker process and waits for it to be ready; returns it and its control URL.
    fn start(&self, role: PdRole, cluster_id: u64) -> anyhow::Result<(Child, String)> {
        let name = role.name();
        let mut child = crate::self_command()?
            .arg("pd-worker")
            .args(["--model", &self.model.to_string_lossy(), "--role", name])
            .args(["--cluster-id", &cluster_id.to_string()])
            .arg(format!("--tensor-parallel={}", self.tensor_parallel))
            .args(self.engine.to_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            BufReader::new(out).read_line(&mut line)?;
        }
        let port: Option<u16> = line
            .trim()
            .strip_prefix("PD-WORKER-READY ")
            .and_then(|p| p.parse().ok());
        match port {
            Some(port) => Ok((child, format!("http://127.0.0.1:{port}"))),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("{name} worker {cluster_id} did not start")
            }
        }
    }
}

fn stop_child(c: &mut Child) {
    drop(c.stdin.take());
    let _ = c.kill();
    let _ = c.wait();
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(m) = self.monitor.take() {
            let _ = m.join();
        }
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for s in slots.iter_mut() {
            if let Some(c) = s.child.as_mut() {
                drop(c.stdin.take());
            }
        }
        for s in slots.iter_mut() {
            if let Some(mut c) = s.child.take() {
                stop_child(&mut c);
            }
        }
    }
}

impl Workers {
    /// Starts watching the workers on behalf of `router` (on a thread of its own).
    pub fn supervise(&mut self, router: Arc<PdRouter>, rt: tokio::runtime::Handle) {
        let (slots, spec, stop) = (self.slots.clone(), self.spec.clone(), self.stop.clone());
        let spawned = std::thread::Builder::new()
            .name("tandem-pd-supervisor".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    check(&slots, &spec, &router, &rt);
                    std::thread::sleep(POLL);
                }
            });
        match spawned {
            Ok(h) => self.monitor = Some(h),
            Err(e) => tracing::error!("cannot start the worker supervisor: {e}"),
        }
    }
}

/// One supervision round: reaps workers that exited, restarts those that are due.
fn check(slots: &Mutex<Vec<Slot>>, spec: &Spec, router: &PdRouter, rt: &tokio::runtime::Handle) {
    let mut due = Vec::new();
    {
        let mut slots = slots.lock().unwrap_or_else(|p| p.into_inner());
        for (i, s) in slots.iter_mut().enumerate() {
            if let Some(c) = s.child.as_mut() {
                match c.try_wait() {
                    Ok(Some(status)) => {
                        let why = format!("process exited ({status})");
                        tracing::error!(url = s.url, cluster_id = s.cluster_id, "worker {why}");
                        router.mark_down(&s.url, &why);
                        s.child = None;
                        if s.started.elapsed() > STABLE {
                            s.backoff = FIRST_BACKOFF;
                        }
                        s.restart_at = Some(Instant::now() + s.backoff);
                        s.backoff = (s.backoff * 2).min(MAX_BACKOFF);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!("cannot check worker {}: {e}", s.url),
                }
            }
            if s.child.is_none() && s.restart_at.is_some_and(|t| Instant::now() >= t) {
                s.restart_at = None;
                due.push((i, s.role, s.cluster_id));
            }
        }
    }
    // Start outside the lock: loading the model takes a moment.
    for (i, role, cluster_id) in due {
        match spec.start(role, cluster_id) {
            Ok((child, url)) => {
                let handle = WorkerHandle::new(url.clone(), cluster_id);
                let added = rt.block_on(router.add_worker(role, handle));
                let mut slots = slots.lock().unwrap_or_else(|p| p.into_inner());
                let s = &mut slots[i];
                match added {
                    Ok(()) => {
                        tracing::info!(url, cluster_id, "worker restarted");
                        s.child = Some(child);
                        s.url = url;
                        s.started = Instant::now();
                    }
                    Err(e) => {
                        tracing::error!("restarted worker {url} could not be linked: {e}");
                        let mut child = child;
                        stop_child(&mut child);
                        s.restart_at = Some(Instant::now() + s.backoff);
                        s.backoff = (s.backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            Err(e) => {
                tracing::error!("restarting worker {cluster_id}: {e}");
                let mut slots = slots.lock().unwrap_or_else(|p| p.into_inner());
                let s = &mut slots[i];
                s.restart_at = Some(Instant::now() + s.backoff);
                s.backoff = (s.backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Starts `n_prefill` + `n_decode` worker processes on `model`, splitting the KV memory
/// budget between them, and waits until each is ready.
pub fn spawn(
    model: &Path,
    n_prefill: usize,
    n_decode: usize,
    engine: &EngineArgs,
    tensor_parallel: usize,
) -> anyhow::Result<Workers> {
    let mut args = engine.clone();
    args.kv_memory_fraction /= (n_prefill + n_decode) as f64;
    let spec = Arc::new(Spec {
        model: model.to_path_buf(),
        engine: args,
        tensor_parallel,
    });
    let mut workers = Workers {
        slots: Arc::new(Mutex::new(Vec::new())),
        spec: spec.clone(),
        stop: Arc::new(AtomicBool::new(false)),
        monitor: None,
        prefill: Vec::new(),
        decode: Vec::new(),
    };
    for i in 0..n_prefill + n_decode {
        let role = if i < n_prefill {
            PdRole::Prefill
        } else {
            PdRole::Decode
        };
        let cluster_id = FIRST_CLUSTER_ID + i as u64;
        let (child, url) = spec.start(role, cluster_id)?;
        let handle = WorkerHandle::new(url.clone(), cluster_id);
        workers
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Slot {
                role,
                cluster_id,
                child: Some(child),
                url,
                started: Instant::now(),
                backoff: FIRST_BACKOFF,
                restart_at: None,
            });
        match role {
            PdRole::Prefill => workers.prefill.push(handle),
            PdRole::Decode | PdRole::Replica => workers.decode.push(handle),
        }
    }
    tracing::info!(
        prefill = n_prefill,
        decode = n_decode,
        "disaggregation workers started"
    );
    Ok(workers)
}
