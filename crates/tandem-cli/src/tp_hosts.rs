//! Tensor-parallel ranks on other hosts. Rank 0 is a worker (`serve --role R --etcd E
//! --tensor-parallel N --tp-group G`): it listens on its host, puts where in etcd, and waits
//! for ranks 1..N. Each of those is a `tandem tp-rank --etcd E --tp-group G --rank r`
//! process on a host of its own: it finds rank 0 there, joins over TCP (the deployment's token
//! checked), receives the engine settings, and runs the forward passes on its shard until the
//! group ends. Then it waits for rank 0's next group: a worker whose rank died forms its group
//! again, and the deployment recovers once the missing rank is back.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use serde::{Deserialize, Serialize};
use tandem_collective::{Collective, CollectiveError, TcpGroup, TcpRendezvous};
use tandem_engine::Engine;
use tandem_model::LlamaConfig;
use tandem_server::pd::discovery::{self, Registration, TpGroupRecord};
use tandem_server::pd::rank_kv::{RankControl, RankEndpoint};

use crate::engine_args::EngineArgs;
use crate::tensor_parallel::{role_name, RankDatadist, ShardKv, TpRankArgs};

/// How often a rank waiting for its rank 0 reads etcd again.
const POLL: Duration = Duration::from_millis(300);

/// Where a worker's group is formed: its etcd, deployment and group name, and the address
/// its ranks reach it at.
pub struct GroupSite {
    /// etcd endpoints.
    pub etcd: Vec<String>,
    /// The deployment.
    pub deployment: String,
    /// The group's name.
    pub group: String,
    /// The address rank 0 listens on.
    pub host: String,
    /// The address the ranks reach it at.
    pub advertise_host: String,
    /// The deployment's token.
    pub token: String,
}

/// What rank 0 tells its ranks once all have joined.
#[derive(Serialize, Deserialize)]
struct Setup {
    /// Rank 0's model configuration (a rank with another model refuses).
    model: LlamaConfig,
    /// Rank 0's engine flags, with the KV pool's size.
    engine: Vec<String>,
    /// In a disaggregated deployment: the worker's llm-datadist role and cluster id.
    datadist: Option<(String, u64)>,
}

/// What a rank tells rank 0 as it joins: where its KV control socket is.
#[derive(Serialize, Deserialize)]
struct Hello {
    host: String,
    control_port: u16,
}

#[derive(Parser)]
struct EngineFlags {
    #[command(flatten)]
    engine: EngineArgs,
}

/// Starts a tensor-parallel engine of `tp` ranks whose ranks 1.. are on other hosts: waits
/// (until `give_up`) for them to join at `site`, then loads rank 0's shard. With `dd`, the
/// ranks register their KV shards with llm-datadist; their control handles are returned.
pub fn start_engine(
    model: &Path,
    tp: usize,
    engine: &EngineArgs,
    site: &GroupSite,
    dd: Option<&RankDatadist>,
    give_up: &dyn Fn() -> bool,
    rt: &tokio::runtime::Handle,
) -> anyhow::Result<(Engine, Vec<RankControl>)> {
    let mcfg = tandem_model::loader::read_config(model)?;
    tandem_model::shard::check_world(&mcfg, tp)?;
    let mut cfg = engine.config();
    let (_, num_blocks) = cfg.kv_plan(&mcfg, mcfg.max_positions())?;
    cfg.num_blocks = Some(num_blocks);
    let rv = TcpRendezvous::bind((site.host.as_str(), 0), tp, &site.token)?;
    let record = TpGroupRecord {
        addr: format!("{}:{}", site.advertise_host, rv.local_addr()?.port()),
        world: tp,
        epoch: crate::pd_worker::random_cluster_id(),
    };
    let key = discovery::tp_group_key(&site.deployment, &site.group);
    let listed = record.clone();
    let registration = rt
        .block_on(Registration::start_at(site.etcd.clone(), key, move || {
            listed.clone()
        }))
        .map_err(|e| anyhow::anyhow!("cannot register in etcd at {:?}: {e}", site.etcd))?;
    tracing::info!(
        group = site.group,
        addr = record.addr,
        "waiting for tensor-parallel ranks 1 to {} (`tandem tp-rank --tp-group {} --rank R`)",
        tp - 1,
        site.group
    );
    let formed = rv.accept(give_up);
    // A formed group takes no more ranks; a new one gets a new record.
    rt.block_on(registration.revoke());
    let group = formed?;
    let hellos: Vec<Hello> = (1..tp)
        .map(|r| serde_json::from_slice(group.hello(r)))
        .collect::<Result<_, _>>()?;
    let mut rank_args = engine.clone();
    rank_args.num_blocks = Some(num_blocks);
    let setup = Setup {
        model: mcfg,
        engine: rank_args.to_args(),
        datadist: dd.map(|d| (role_name(d.role).to_string(), d.cluster_id)),
    };
    let mut msg = serde_json::to_vec(&setup)?;
    group.broadcast(&mut msg)?;
    // Every rank says whether its model is rank 0's.
    let mut differs = vec![0.0f32; tp];
    group.all_reduce_sum(&mut differs)?;
    if let Some(r) = differs.iter().position(|&d| d != 0.0) {
        group.abort();
        anyhow::bail!(
            "tensor-parallel rank {r} (host {}) has another model than this worker",
            hellos[r - 1].host
        );
    }
    let group: Arc<dyn Collective> = Arc::new(group);
    let mut loaded = tandem_model::load_shard(model, group)?;
    loaded.model = loaded
        .model
        .with_precision(cfg.precision)
        .with_cores(&tandem_kernels::allowed_cores())?;
    let controls = hellos
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let addr = resolve((h.host.as_str(), h.control_port))?;
            Ok(RankControl {
                rank: i + 1,
                addr,
                token: site.token.clone(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    tracing::info!(
        group = site.group,
        ranks = tp,
        "tensor-parallel group formed"
    );
    Ok((Engine::start(loaded, cfg)?, controls))
}

fn resolve(addr: impl ToSocketAddrs + std::fmt::Debug) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow::anyhow!("cannot resolve {addr:?}"))
}

/// Runs rank `a.rank` on this host: serves each group its rank 0 forms, until killed.
pub fn run_rank(a: TpRankArgs) -> anyhow::Result<()> {
    let group_name = a
        .tp_group
        .clone()
        .ok_or_else(|| anyhow::anyhow!("tp-rank --etcd needs --tp-group (the worker's)"))?;
    anyhow::ensure!(a.rank >= 1, "--rank is 1 or more (rank 0 is the worker)");
    anyhow::ensure!(
        a.host != "0.0.0.0" && a.host != "::",
        "--host is the address rank 0 and other workers reach this rank at, not a wildcard"
    );
    let token = a.auth_token.clone().unwrap_or_default();
    anyhow::ensure!(
        !token.is_empty() || crate::pd_worker::is_loopback(&a.host),
        "a rank listening on {} needs the deployment's token (--auth-token or TANDEM_AUTH_TOKEN)",
        a.host
    );
    let path = tandem_model::fetch::resolve_model(a.model.as_deref(), true)?;
    let deployment = a
        .deployment_name
        .clone()
        .unwrap_or_else(|| crate::serve::default_deployment_name(a.model.as_deref()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut served: Option<u64> = None;
    let mut waiting_said = false;
    loop {
        let found = rt.block_on(discovery::find_tp_group(&a.etcd, &deployment, &group_name));
        let record = match found {
            Ok(Some(r)) if Some(r.epoch) != served => r,
            Ok(_) => {
                if !waiting_said {
                    tracing::info!(
                        group = group_name,
                        rank = a.rank,
                        "waiting for the group's rank 0"
                    );
                    waiting_said = true;
                }
                std::thread::sleep(POLL);
                continue;
            }
            Err(e) => {
                tracing::warn!("cannot read etcd at {:?}: {e}", a.etcd);
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        waiting_said = false;
        match join(&a, &path, &record, &token) {
            Ok(()) => tracing::info!(group = group_name, rank = a.rank, "the group ended"),
            Err(e) => tracing::warn!(group = group_name, rank = a.rank, "{e:#}"),
        }
        served = Some(record.epoch);
    }
}

/// Joins the group `record` describes and runs its forward passes until it ends.
fn join(a: &TpRankArgs, model: &Path, record: &TpGroupRecord, token: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.rank < record.world,
        "the group has {} ranks: there is no rank {}",
        record.world,
        a.rank
    );
    let control = TcpListener::bind((a.host.as_str(), 0))?;
    let hello = serde_json::to_vec(&Hello {
        host: a.host.clone(),
        control_port: control.local_addr()?.port(),
    })?;
    let addr = resolve(record.addr.as_str())?;
    let group = TcpGroup::connect(addr, a.rank, record.world, token, &hello)?;
    tracing::info!(addr = record.addr, rank = a.rank, "joined the group");
    let mut msg = Vec::new();
    group.broadcast(&mut msg)?;
    let setup: Setup = serde_json::from_slice(&msg)?;
    let mine = tandem_model::loader::read_config(model)?;
    let mut differs = vec![0.0f32; record.world];
    differs[a.rank] = f32::from(setup.model != mine);
    group.all_reduce_sum(&mut differs)?;
    if differs[a.rank] != 0.0 {
        return Err(
            CollectiveError::Setup(format!("{} is not rank 0's model", model.display())).into(),
        );
    }
    if differs.iter().any(|&d| d != 0.0) {
        anyhow::bail!("another rank has another model: the group was not formed");
    }
    let flags =
        EngineFlags::try_parse_from(std::iter::once("tp-rank".to_string()).chain(setup.engine))?;
    let cfg = flags.engine.config();
    let num_blocks = cfg
        .num_blocks
        .ok_or_else(|| anyhow::anyhow!("rank 0 did not size the KV pool"))?;
    let dd = match setup.datadist {
        Some((role, cluster_id)) => Some(ShardKv {
            role: llm_datadist::LlmRole::parse(&role)?,
            cluster_id,
            at: RankEndpoint {
                host: a.host.clone(),
                own_host: true,
                control: Some(control),
                token: token.to_string(),
            },
        }),
        None => None,
    };
    let group: Arc<dyn Collective> = Arc::new(group);
    let loaded = tandem_model::load_shard(model, group)?;
    crate::tensor_parallel::follow(
        loaded.model,
        &cfg,
        num_blocks,
        &tandem_kernels::allowed_cores(),
        dd,
        |_| Ok(()),
    )
}
