//! Tensor-parallel engines: rank 0 is an engine in this process (scheduling, sampling,
//! streaming); ranks 1..N are `tandem tp-rank` processes running the same forward passes on
//! their shards, joined through a shared-memory group. Each rank runs on its own cores.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use tandem_collective::{Collective, CollectiveError, ShmGroup};
use tandem_engine::Engine;
use tandem_server::pd::rank_kv::{rank_cluster, RankControl, RankEndpoint, RankKv};

use crate::engine_args::EngineArgs;

/// Arguments of `tandem tp-rank`.
#[derive(Args, Debug)]
pub struct TpRankArgs {
    /// This process's rank (1 or more).
    #[arg(long)]
    pub(crate) rank: usize,
    /// Model (as for `generate`; the same model as rank 0's).
    #[arg(long)]
    pub(crate) model: Option<String>,
    /// etcd endpoints (comma-separated) where rank 0 says where it waits for its ranks.
    #[arg(long, env = "TANDEM_ETCD", value_delimiter = ',')]
    pub(crate) etcd: Vec<String>,
    /// The deployment rank 0's worker belongs to.
    #[arg(long)]
    pub(crate) deployment_name: Option<String>,
    /// The group's name, as rank 0's worker was given it (`serve --role R --tp-group NAME`).
    #[arg(long)]
    pub(crate) tp_group: Option<String>,
    /// This host's address: rank 0 and the other workers' ranks reach this rank there.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) host: String,
    /// The deployment's shared secret (required by rank 0 and on this rank's control socket).
    #[arg(long, env = "TANDEM_AUTH_TOKEN", hide_env_values = true)]
    pub(crate) auth_token: Option<String>,
    /// Internal (ranks on rank 0's host): the group's shared-memory segment.
    #[arg(long, hide = true)]
    group: Option<PathBuf>,
    /// Internal: the cores this rank runs on.
    #[arg(long, value_delimiter = ',', hide = true)]
    cores: Vec<usize>,
    /// Internal: in a disaggregated deployment, the worker's llm-datadist role (`prompt`
    /// listens), under which this rank registers its KV pool as its own cluster.
    #[arg(long, value_parser = ["prompt", "decoder"], hide = true)]
    datadist_role: Option<String>,
    /// Internal: the worker's llm-datadist cluster id (this rank's is derived from it).
    #[arg(long, default_value_t = 0, hide = true)]
    cluster_id: u64,
    /// Internal: the host a `prompt` rank's llm-datadist listens on.
    #[arg(long, default_value = "127.0.0.1", hide = true)]
    datadist_host: String,
    /// Engine flags: given by rank 0 (a rank on another host receives them when it joins).
    #[command(
        flatten,
        next_help_heading = "Internal: engine flags (rank 0 sends its own)"
    )]
    engine: EngineArgs,
}

/// What a rank with a registered KV pool prints on stdout once it is ready: the port of its
/// control socket.
const RANK_READY: &str = "TP-RANK-READY";

/// Runs one rank other than 0 until rank 0 stops the group.
pub fn run_rank(a: TpRankArgs) -> anyhow::Result<()> {
    if a.etcd.is_empty() {
        run_local_rank(a)
    } else {
        crate::tp_hosts::run_rank(a)
    }
}

fn run_local_rank(a: TpRankArgs) -> anyhow::Result<()> {
    let group = a
        .group
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("tp-rank needs --etcd (a rank on another host)"))?;
    let model = a
        .model
        .as_deref()
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("tp-rank needs --model"))?;
    if let Some(&c) = a.cores.first() {
        // Loading and packing threads start from this one: they keep to the rank's cores,
        // and so does the memory they touch first.
        tandem_kernels::pin_current_thread(c)?;
    }
    let comm = Arc::new(ShmGroup::join(group, a.rank)?);
    let cfg = a.engine.config();
    let num_blocks = cfg
        .num_blocks
        .ok_or_else(|| anyhow::anyhow!("tp-rank needs --num-blocks (rank 0's pool size)"))?;
    let dd = match &a.datadist_role {
        Some(role) => Some(ShardKv {
            role: llm_datadist::LlmRole::parse(role)?,
            cluster_id: a.cluster_id,
            at: RankEndpoint {
                host: a.datadist_host.clone(),
                own_host: false,
                control: None,
                token: String::new(),
            },
        }),
        None => None,
    };
    let model = tandem_model::load_shard(&model, comm)?.model;
    follow(model, &cfg, num_blocks, &a.cores, dd, |port| {
        println!("{RANK_READY} {port}");
        std::io::stdout().flush()
    })
}

/// How a rank registers its KV shard with llm-datadist (in a disaggregated deployment).
pub(crate) struct ShardKv {
    pub role: llm_datadist::LlmRole,
    /// The worker's cluster id (the rank's is derived from it).
    pub cluster_id: u64,
    pub at: RankEndpoint,
}

/// Runs rank `model`'s forward passes on its KV pool of `num_blocks` until rank 0 ends the
/// group; with `dd`, the pool is registered with llm-datadist first and `ready` is told the
/// control port.
pub(crate) fn follow(
    model: tandem_model::LlamaModel,
    cfg: &tandem_engine::EngineConfig,
    num_blocks: usize,
    cores: &[usize],
    dd: Option<ShardKv>,
    ready: impl FnOnce(u16) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let rank = model.rank().0;
    let mut model = model.with_precision(cfg.precision);
    if !cores.is_empty() {
        model = model.with_cores(cores)?;
    }
    let mut kv = model.new_kv_cache(num_blocks, cfg.block_size, cfg.kv_dtype);
    let agent = match dd {
        Some(dd) => {
            let regions: Vec<tandem_engine::KvRegion> = (0..kv.num_layers())
                .flat_map(|l| {
                    let (k, v) = kv.layer_bytes_mut(l);
                    [k, v].map(|t| tandem_engine::KvRegion {
                        addr: t.as_mut_ptr() as u64,
                        len: t.len(),
                    })
                })
                .collect();
            let cluster = rank_cluster(dd.cluster_id, rank);
            // SAFETY: the pool outlives the agent (closed below, before `kv` goes); rank 0
            // moves only blocks held for a consumer or reserved for an import, which no
            // forward pass touches meanwhile.
            let agent = unsafe { RankKv::start(&regions, num_blocks, cluster, dd.role, dd.at) }
                .map_err(|e| anyhow::anyhow!("rank {rank}: {e}"))?;
            ready(agent.control_addr().port())?;
            Some(agent)
        }
        None => None,
    };
    let followed = model.follow(&mut kv);
    if let Some(agent) = agent {
        agent.close();
    }
    followed?;
    Ok(())
}

/// Rank 0's view of the group, which also owns the other ranks' processes: when the engine
/// drops its model, the group goes and the processes are reaped.
struct RankGroup {
    shm: ShmGroup,
    children: Mutex<Vec<Child>>,
}

impl Collective for RankGroup {
    fn rank(&self) -> usize {
        self.shm.rank()
    }
    fn world(&self) -> usize {
        self.shm.world()
    }
    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<(), CollectiveError> {
        self.shm.all_reduce_sum(x)
    }
    fn all_reduce_parts(
        &self,
        mine: &[f32],
        held: &[usize],
        out: &mut [f32],
    ) -> Result<(), CollectiveError> {
        self.shm.all_reduce_parts(mine, held, out)
    }
    fn gather(
        &self,
        part: &[f32],
        lens: &[usize],
        out: &mut Vec<f32>,
    ) -> Result<(), CollectiveError> {
        self.shm.gather(part, lens, out)
    }
    fn broadcast(&self, msg: &mut Vec<u8>) -> Result<(), CollectiveError> {
        self.shm.broadcast(msg)
    }
    fn check(&self) -> Result<(), CollectiveError> {
        self.shm.check()
    }
    fn abort(&self) {
        self.shm.abort()
    }
}

impl Drop for RankGroup {
    fn drop(&mut self) {
        // The model sent its stop step before dropping the group; give the ranks a moment to
        // leave on their own, then make sure.
        self.shm.abort();
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + Duration::from_secs(3);
        for c in children.iter_mut() {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Splits `cores` between `replicas` × `tp` ranks: replica `i`'s ranks get consecutive runs.
pub fn core_plan(cores: &[usize], replicas: usize, tp: usize) -> anyhow::Result<Vec<Vec<usize>>> {
    let ranks = replicas * tp;
    anyhow::ensure!(
        ranks <= cores.len(),
        "--replica-num {replicas} x --tensor-parallel {tp} = {ranks} ranks, but this process may run on {} cores (each rank needs at least one)",
        cores.len()
    );
    let per = cores.len() / ranks;
    Ok((0..ranks)
        .map(|r| cores[r * per..(r + 1) * per].to_vec())
        .collect())
}

/// Starts an engine of `tp` ranks on this process's cores (the in-process pipeline's
/// `tensor_parallel`): rank 0 in this process, the others started with the self command.
pub fn start_local_engine(model: &Path, tp: usize, engine: &EngineArgs) -> anyhow::Result<Engine> {
    tandem_model::shard::check_world(&tandem_model::loader::read_config(model)?, tp)?;
    let cores = core_plan(&tandem_kernels::allowed_cores(), 1, tp)?;
    start_engine(model, &cores, engine)
}

/// How the ranks of a disaggregation worker's engine register their KV pools.
pub struct RankDatadist {
    /// The worker's llm-datadist role.
    pub role: llm_datadist::LlmRole,
    /// The worker's cluster id.
    pub cluster_id: u64,
    /// Where a `prompt` rank listens.
    pub host: String,
}

/// The name `LlmRole::parse` reads back.
pub(crate) fn role_name(role: llm_datadist::LlmRole) -> &'static str {
    match role {
        llm_datadist::LlmRole::Prompt => "prompt",
        _ => "decoder",
    }
}

/// [`start_engine`] for a disaggregation worker: ranks 1.. register their pools with
/// llm-datadist too; returns their control handles.
pub fn start_engine_for_datadist(
    model: &Path,
    cores: &[Vec<usize>],
    engine: &EngineArgs,
    dd: &RankDatadist,
) -> anyhow::Result<(Engine, Vec<RankControl>)> {
    let role = role_name(dd.role);
    let extra = vec![
        format!("--datadist-role={role}"),
        format!("--cluster-id={}", dd.cluster_id),
        format!("--datadist-host={}", dd.host),
    ];
    start(model, cores, engine, &extra)
}

/// Starts a tensor-parallel engine of `cores.len()` ranks on `model`: rank `r` runs on
/// `cores[r]`. Returns once every rank has loaded its shard.
pub fn start_engine(
    model: &Path,
    cores: &[Vec<usize>],
    engine: &EngineArgs,
) -> anyhow::Result<Engine> {
    Ok(start(model, cores, engine, &[])?.0)
}

fn start(
    model: &Path,
    cores: &[Vec<usize>],
    engine: &EngineArgs,
    extra: &[String],
) -> anyhow::Result<(Engine, Vec<RankControl>)> {
    let world = cores.len();
    let mcfg = tandem_model::loader::read_config(model)?;
    let mut cfg = engine.config();
    // Every rank's pool has the same blocks (block ids are shared), sized as rank 0 sizes its own.
    let (_, num_blocks) = cfg.kv_plan(&mcfg, mcfg.max_positions())?;
    cfg.num_blocks = Some(num_blocks);
    // A slot holds one all-reduce of a full batch's hidden states.
    let slot = (cfg.batch_tokens() * mcfg.hidden_size * 4).clamp(1 << 16, 16 << 20);
    let shm = ShmGroup::create(world, slot)?;
    let mut rank_args = engine.clone();
    rank_args.num_blocks = Some(num_blocks);
    let mut children = Vec::with_capacity(world - 1);
    for (r, rank_cores) in cores.iter().enumerate().skip(1) {
        let cores_arg = rank_cores
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let child = crate::self_command()?
            .arg("tp-rank")
            .arg("--group")
            .arg(shm.path())
            .arg(format!("--rank={r}"))
            .arg("--model")
            .arg(model)
            .arg(format!("--cores={cores_arg}"))
            .args(rank_args.to_args())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(if extra.is_empty() {
                Stdio::inherit()
            } else {
                Stdio::piped()
            })
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start tensor-parallel rank {r}: {e}"))?;
        shm.set_pid(r, child.id());
        children.push(child);
    }
    let outs: Vec<_> = children.iter_mut().map(|c| c.stdout.take()).collect();
    let segment = shm.path().to_path_buf();
    let group = Arc::new(RankGroup {
        shm,
        children: Mutex::new(children),
    });
    let loaded = tandem_model::load_shard(model, group);
    // Every rank has the segment mapped (or failed): its name is no longer needed.
    let _ = std::fs::remove_file(&segment);
    let mut loaded = loaded?;
    loaded.model = loaded
        .model
        .with_precision(cfg.precision)
        .with_cores(&cores[0])?;
    // Ranks with a registered pool say where their control socket is.
    let mut controls = Vec::new();
    for (i, out) in outs.into_iter().enumerate() {
        let Some(out) = out else { continue };
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        let port = line
            .strip_prefix(RANK_READY)
            .and_then(|p| p.trim().parse::<u16>().ok())
            .ok_or_else(|| {
                anyhow::anyhow!("tensor-parallel rank {} did not start: {line:?}", i + 1)
            })?;
        controls.push(RankControl {
            rank: i + 1,
            addr: ([127, 0, 0, 1], port).into(),
            token: String::new(),
        });
    }
    tracing::info!(ranks = world, cores = ?cores, "tensor-parallel ranks loaded");
    Ok((Engine::start(loaded, cfg)?, controls))
}
