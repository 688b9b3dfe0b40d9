//! Prefill/decode disaggregation from the command line: `tandem pd-worker` (a worker process:
//! one engine, its KV pool registered with llm-datadist, control routes on loopback HTTP) and
//! the spawning of workers for `tandem serve --prefill-workers N --decode-workers M`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;

use clap::Args;
use llm_datadist::LlmRole;
use tandem_engine::Engine;
use tandem_server::pd::router::WorkerHandle;
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
    #[arg(long, value_parser = ["prefill", "decode"])]
    role: String,
    /// llm-datadist cluster id.
    #[arg(long)]
    cluster_id: u64,
    #[command(flatten)]
    engine: EngineArgs,
}

/// Runs a worker until its parent closes stdin.
pub fn run(a: PdWorkerArgs) -> anyhow::Result<()> {
    let path = tandem_model::fetch::resolve_model(a.model.as_deref(), false)?;
    let engine = Arc::new(Engine::start(
        tandem_model::load(&path)?,
        a.engine.config(),
    )?);
    let (role, listen) = match a.role.as_str() {
        "prefill" => (LlmRole::Prompt, Some("127.0.0.1:0")),
        _ => (LlmRole::Decoder, None),
    };
    let worker = Arc::new(PdWorker::start(engine, a.cluster_id, role, listen)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
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
        worker.clone().serve(listener, parent_gone).await?;
        drop(worker);
        anyhow::Ok(())
    })
}

/// Worker processes, killed when dropped.
pub struct Workers {
    children: Vec<Child>,
    /// Prefill workers.
    pub prefill: Vec<Arc<WorkerHandle>>,
    /// Decode workers.
    pub decode: Vec<Arc<WorkerHandle>>,
}

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.children {
            drop(c.stdin.take());
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
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
) -> anyhow::Result<Workers> {
    let mut workers = Workers {
        children: Vec::new(),
        prefill: Vec::new(),
        decode: Vec::new(),
    };
    let mut args = engine.clone();
    args.kv_memory_fraction /= (n_prefill + n_decode) as f64;
    for i in 0..n_prefill + n_decode {
        let role = if i < n_prefill { "prefill" } else { "decode" };
        let cluster_id = FIRST_CLUSTER_ID + i as u64;
        let mut child = crate::self_command()?
            .arg("pd-worker")
            .args(["--model", &model.to_string_lossy(), "--role", role])
            .args(["--cluster-id", &cluster_id.to_string()])
            .args(args.to_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take();
        workers.children.push(child);
        let mut line = String::new();
        if let Some(out) = stdout {
            BufReader::new(out).read_line(&mut line)?;
        }
        let port: u16 = line
            .trim()
            .strip_prefix("PD-WORKER-READY ")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("{role} worker {i} did not start"))?;
        let handle = WorkerHandle::new(format!("http://127.0.0.1:{port}"), cluster_id);
        if i < n_prefill {
            workers.prefill.push(handle);
        } else {
            workers.decode.push(handle);
        }
    }
    tracing::info!(
        prefill = n_prefill,
        decode = n_decode,
        "disaggregation workers started"
    );
    Ok(workers)
}
