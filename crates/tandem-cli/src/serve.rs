//! `tandem serve`: a persistent deployment: MII's gRPC contract on `--port`, and HTTP
//! (OpenAI-compatible `/v1/*`, MII's `/mii/{deployment}`, `/healthz`, `/metrics`) on
//! `--restful-api-port`, bound to 127.0.0.1 unless `--host` says otherwise. gRPC `Terminate`
//! or Ctrl-C stops the whole deployment.
//!
//! Across hosts: `--etcd` alone makes this process the router of the deployment's workers
//! registered in etcd; `--role prefill|decode|replica --etcd ...` runs one such worker (with
//! `--tensor-parallel N --tp-group G`, its ranks 1.. are `tandem tp-rank` processes on other
//! hosts).

use std::sync::Arc;

use clap::Args;
use tandem_engine::Engine;
use tandem_server::AppState;

use crate::engine_args::EngineArgs;

/// Arguments of `tandem serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model (as for `generate`).
    #[arg(long)]
    model: Option<String>,
    /// Deployment name (default: `<model>-mii-deployment`), used by `/mii/{deployment}`.
    #[arg(long)]
    deployment_name: Option<String>,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// gRPC port (MII's `port_number`).
    #[arg(long, default_value_t = 50050)]
    port: u16,
    /// HTTP port (MII's REST gateway port).
    #[arg(long, default_value_t = 28080)]
    restful_api_port: u16,
    /// Do not start the HTTP server.
    #[arg(long)]
    no_restful_api: bool,
    /// Engines behind the load balancer (they share the cores; the KV memory budget is split).
    #[arg(long, default_value_t = 1)]
    replica_num: usize,
    /// Tensor-parallel degree (MII's `tensor_parallel`): each replica's engine runs as this
    /// many rank processes on their own cores, each holding a share of the heads, FFN and
    /// vocabulary (at most the model's KV heads; replicas x ranks at most the cores).
    #[arg(long, default_value_t = 1)]
    tensor_parallel: usize,
    /// Prefill workers (separate processes; with --decode-workers, a disaggregated deployment).
    #[arg(long, default_value_t = 0)]
    prefill_workers: usize,
    /// Decode workers (separate processes pulling the prompt's KV from prefill workers).
    #[arg(long, default_value_t = 0)]
    decode_workers: usize,
    /// Disaggregated only: prompts of at most this many tokens prefill on the decode worker.
    #[arg(long, default_value_t = 32)]
    local_prefill_max: usize,
    /// Require `Authorization: Bearer <KEY>` on /v1 and /mii routes (also from TANDEM_API_KEY).
    #[arg(long, env = "TANDEM_API_KEY")]
    api_key: Option<String>,
    /// etcd endpoints (comma-separated, e.g. http://10.0.0.2:2379): without --role, route to
    /// the deployment's workers registered there; with --role, register there.
    #[arg(long, env = "TANDEM_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Run one worker of a multi-host deployment (needs --etcd) instead of a front end.
    #[arg(long, value_parser = ["prefill", "decode", "replica"])]
    role: Option<String>,
    /// The deployment's shared secret: required on worker HTTP calls and llm-datadist links
    /// (workers listening off loopback refuse to start without it).
    #[arg(long, env = "TANDEM_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// Worker only: the HTTP control port (0: any free port).
    #[arg(long, default_value_t = 0)]
    worker_port: u16,
    /// Worker only: the address the router and other workers reach it at (default: --host).
    #[arg(long)]
    advertise_host: Option<String>,
    /// Worker only: its llm-datadist cluster id (default: random).
    #[arg(long)]
    cluster_id: Option<u64>,
    /// Worker only, with --tensor-parallel above 1: the group's name; ranks 1.. run on other
    /// hosts as `tandem tp-rank --etcd ... --tp-group NAME --rank R` and join through etcd.
    #[arg(long)]
    tp_group: Option<String>,
    #[command(flatten)]
    engine: EngineArgs,
}

/// MII's default deployment name for a `--model` spec: `<model>-mii-deployment`.
pub fn default_deployment_name(model_spec: Option<&str>) -> String {
    let path = std::path::Path::new(model_spec.unwrap_or(""));
    let model = tandem_model::fetch::model_name(model_spec, path);
    format!("{model}-mii-deployment")
}

/// Runs `tandem serve` until Ctrl-C.
pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.replica_num >= 1, "--replica-num must be at least 1");
    anyhow::ensure!(
        a.tensor_parallel >= 1,
        "--tensor-parallel must be at least 1"
    );
    let path = tandem_model::fetch::resolve_model(a.model.as_deref(), true)?;
    let model_name = tandem_model::fetch::model_name(a.model.as_deref(), &path);
    let deployment = a
        .deployment_name
        .clone()
        .unwrap_or_else(|| default_deployment_name(a.model.as_deref()));
    if let Some(role) = &a.role {
        anyhow::ensure!(
            !a.etcd.is_empty(),
            "--role needs --etcd (where the router finds workers)"
        );
        anyhow::ensure!(
            a.prefill_workers == 0 && a.decode_workers == 0 && a.replica_num == 1,
            "--role runs one worker: --prefill-workers, --decode-workers and --replica-num are the router's"
        );
        return crate::pd_worker::RemoteWorker {
            model: &path,
            role: crate::pd_worker::parse_role(role)?,
            etcd: a.etcd.clone(),
            deployment,
            host: a.host.clone(),
            port: a.worker_port,
            advertise_host: a.advertise_host.clone(),
            cluster_id: a.cluster_id,
            token: a.auth_token.clone(),
            engine: &a.engine,
            tensor_parallel: a.tensor_parallel,
            tp_group: a.tp_group.clone(),
        }
        .run();
    }
    let discovered = !a.etcd.is_empty();
    anyhow::ensure!(
        !discovered || a.auth_token.is_some() || crate::pd_worker::is_loopback(&a.host),
        "a router listening on {} needs the deployment's token (--auth-token or TANDEM_AUTH_TOKEN)",
        a.host
    );
    let disaggregated = a.prefill_workers > 0 || a.decode_workers > 0;
    anyhow::ensure!(
        a.tensor_parallel == 1 || !discovered,
        "a router (--etcd without --role) runs no engine: give --tensor-parallel to its workers (--role R --tp-group NAME)"
    );
    anyhow::ensure!(
        !(discovered && (disaggregated || a.replica_num > 1)),
        "--etcd (workers found in etcd) cannot be combined with --prefill-workers, --decode-workers or --replica-num"
    );
    anyhow::ensure!(
        !disaggregated || (a.prefill_workers > 0 && a.decode_workers > 0),
        "a disaggregated deployment needs --prefill-workers and --decode-workers both at least 1"
    );
    anyhow::ensure!(
        !disaggregated || a.replica_num == 1,
        "--replica-num and --prefill-workers/--decode-workers cannot be combined"
    );
    if a.tensor_parallel > 1 && !discovered {
        let mcfg = tandem_model::loader::read_config(&path)?;
        tandem_model::shard::check_world(&mcfg, a.tensor_parallel)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut _workers = None;
    let router_opts = tandem_server::pd::router::RouterOptions {
        local_prefill_max: a.local_prefill_max,
        token: a.auth_token.clone(),
        info: None,
    };
    let state = if discovered {
        let loaded = tandem_model::load(&path)?;
        let cfg = loaded.model.config();
        // The model's limits until the first worker reports its own.
        let info = tandem_engine::EngineInfo {
            num_blocks: 0,
            block_size: a.engine.block_size,
            kv_bytes: 0,
            max_length: a
                .engine
                .max_length
                .unwrap_or(cfg.seq_length)
                .min(loaded.model.max_context()),
            vocab_size: cfg.vocab_size,
        };
        let tokenizer = Arc::new(loaded.tokenizer);
        let opts = tandem_server::pd::router::RouterOptions {
            info: Some(info),
            ..router_opts
        };
        let router = rt
            .block_on(tandem_server::pd::router::PdRouter::new(
                Vec::new(),
                Vec::new(),
                tokenizer,
                opts,
            ))
            .map_err(|e| anyhow::anyhow!("cannot start the router: {e}"))?;
        {
            let _in_rt = rt.enter();
            tandem_server::pd::discovery::watch(&router, a.etcd.clone(), &deployment);
        }
        tracing::info!(etcd = ?a.etcd, deployment, "routing to the workers registered in etcd");
        AppState::disaggregated(router, model_name.clone(), deployment.clone())
    } else if disaggregated {
        let mut workers = crate::pd_worker::spawn(
            &path,
            a.prefill_workers,
            a.decode_workers,
            &a.engine,
            a.tensor_parallel,
        )?;
        let tokenizer = Arc::new(tandem_model::load(&path)?.tokenizer);
        let router = rt
            .block_on(tandem_server::pd::router::PdRouter::new(
                workers.prefill.clone(),
                workers.decode.clone(),
                tokenizer,
                router_opts,
            ))
            .map_err(|e| anyhow::anyhow!("cannot wire the disaggregated deployment: {e}"))?;
        workers.supervise(router.clone(), rt.handle().clone());
        _workers = Some(workers);
        AppState::disaggregated(router, model_name.clone(), deployment.clone())
    } else {
        let mut engine_args = a.engine.clone();
        engine_args.kv_memory_fraction /= a.replica_num as f64;
        let tp = a.tensor_parallel;
        // With tensor parallelism every rank keeps to its own cores; replica i's ranks are
        // entries i*tp..(i+1)*tp.
        let cores = if tp > 1 {
            crate::tensor_parallel::core_plan(&tandem_kernels::allowed_cores(), a.replica_num, tp)?
        } else {
            Vec::new()
        };
        let start = Arc::new(move |i: usize| -> anyhow::Result<Engine> {
            if tp > 1 {
                crate::tensor_parallel::start_engine(
                    &path,
                    &cores[i * tp..(i + 1) * tp],
                    &engine_args,
                )
            } else {
                // Each replica maps the same weights file: the page cache is shared.
                Ok(Engine::start(
                    tandem_model::load(&path)?,
                    engine_args.config(),
                )?)
            }
        });
        let mut engines = Vec::with_capacity(a.replica_num);
        for i in 0..a.replica_num {
            engines.push(Arc::new(start(i)?));
        }
        tracing::info!(
            replicas = a.replica_num,
            tensor_parallel = tp,
            "engines started"
        );
        let restart: tandem_server::replicas::Restart = Arc::new(move |i| {
            let engine = start(i).map_err(|e| format!("{e:#}"))?;
            Ok(Arc::new(engine) as Arc<dyn tandem_server::replicas::Generator>)
        });
        AppState::new(
            tandem_server::replicas::Replicas::new(engines).with_restart(restart),
            model_name.clone(),
            deployment.clone(),
        )
    }
    .with_api_key(a.api_key.clone());
    rt.block_on(async move {
        let bind = |port: u16| {
            let addr = format!("{}:{port}", a.host);
            async move {
                let l = tokio::net::TcpListener::bind(&addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
                // The bound address (port 0 asks the OS for a free port).
                let addr = l.local_addr()?.to_string();
                anyhow::Ok((l, addr))
            }
        };
        let stop = Arc::new(tokio::sync::Notify::new());
        let (grpc_listener, grpc_addr) = bind(a.port).await?;
        let http = if a.no_restful_api { None } else { Some(bind(a.restful_api_port).await?) };
        let http_addr = http.as_ref().map(|(_, addr)| addr.clone());
        tracing::info!("deployment {deployment:?} (model {model_name:?}): gRPC modelresponse.ModelResponse on {grpc_addr}");
        if let Some((_, addr)) = &http {
            tracing::info!("HTTP on http://{addr}: /v1 (OpenAI), /mii/{deployment}, /healthz, /metrics");
        }
        let ctrl_c = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                ctrl_c.notify_waiters();
            }
        });
        let http_task = http.map(|(listener, _)| {
            let (state, stop) = (state.clone(), stop.clone());
            let notified = stop.notified_owned();
            tokio::spawn(async move { tandem_server::serve(listener, state, notified).await })
        });
        let record = tandem_server::registry::DeploymentRecord {
            name: deployment.clone(),
            model: model_name.clone(),
            pid: std::process::id(),
            grpc: grpc_addr.clone(),
            http: http_addr,
        };
        let home = tandem_model::fetch::tandem_home();
        let _registration = tandem_server::registry::register(&home, &record)?;
        tracing::info!("deployment {deployment:?} ready (recorded in {})", tandem_server::registry::dir(&home).display());
        tandem_server::grpc::serve(grpc_listener, state, stop).await?;
        if let Some(t) = http_task {
            t.await??;
        }
        tracing::info!("deployment {deployment:?} stopped");
        Ok(())
    })
}
