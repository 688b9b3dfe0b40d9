//! The KV transfer side of tensor-parallel ranks in a disaggregated deployment. Each rank's
//! KV pool (its KV heads only) is registered with llm-datadist as a cluster of its own
//! ([`rank_cluster`]), so a prefill worker's rank `r` hands its shard straight to a decode
//! worker's rank `r`. Rank 0 is the worker itself; ranks 1.. are `tp-rank` processes, each
//! running a [`RankKv`] that rank 0 drives over a control socket (one JSON command per
//! connection): link, unlink, pull, switch role, info. The socket is on loopback for ranks of
//! rank 0's host; a rank on a host of its own listens on that host's address and requires the
//! deployment's token with every command.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llm_datadist::{
    BlocksCacheKey, Cache, CacheDesc, CacheManager, DataType, LayerRanges, LlmClusterInfo,
    LlmConfig, LlmDataDist, LlmException, LlmRole, LlmStatusCode, Options,
};
use serde::{Deserialize, Serialize};
use tandem_engine::KvRegion;

use super::wire::Peer;
use super::worker::KV_MODEL_ID;

/// The llm-datadist cluster id of rank `rank` of the worker whose cluster id is `cluster`.
pub fn rank_cluster(cluster: u64, rank: usize) -> u64 {
    cluster.wrapping_add((rank as u64) << 40)
}

/// An llm-datadist instance with a KV pool registered as its blocks cache.
pub(crate) struct RegisteredKv {
    pub datadist: Mutex<LlmDataDist>,
    pub cache_manager: CacheManager,
    pub cache: Cache,
}

impl RegisteredKv {
    /// Initializes llm-datadist as `cluster_id` with `role` (listening on `listen` when given)
    /// and registers `regions` (K0, V0, K1, V1, ... of `num_blocks` blocks each).
    ///
    /// # Safety
    /// The regions must stay valid until this is dropped, and transfers must only touch
    /// blocks no forward pass reads or writes meanwhile (held or reserved blocks).
    pub unsafe fn open(
        regions: &[KvRegion],
        num_blocks: usize,
        cluster_id: u64,
        role: LlmRole,
        listen: Option<&str>,
        token: Option<&str>,
    ) -> Result<RegisteredKv, LlmException> {
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
        let desc = CacheDesc::new(
            regions.len() as u32,
            vec![num_blocks as i64, (regions[0].len / num_blocks) as i64],
            DataType::DtUint8,
        )?;
        let addrs: Vec<u64> = regions.iter().map(|r| r.addr).collect();
        // SAFETY: the caller's contract.
        let cache = unsafe {
            cm.register_blocks_cache(
                &desc,
                &addrs,
                Some(BlocksCacheKey::new(cluster_id, KV_MODEL_ID)),
                None,
            )?
        };
        Ok(RegisteredKv {
            datadist: Mutex::new(dd),
            cache_manager: cm,
            cache,
        })
    }

    fn dd(&self) -> std::sync::MutexGuard<'_, LlmDataDist> {
        self.datadist.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Links to (or unlinks from) `peers`.
    pub fn link(
        &self,
        peers: &[Peer],
        unlink: bool,
        force: bool,
    ) -> Result<(LlmStatusCode, Vec<LlmStatusCode>), LlmException> {
        let infos = peers
            .iter()
            .map(|p| {
                let mut ci = LlmClusterInfo::new(p.cluster_id);
                ci.append_local_ip_info("127.0.0.1", 0)?;
                ci.append_remote_ip_info(&p.host, p.port)?;
                Ok(ci)
            })
            .collect::<Result<Vec<_>, LlmException>>()?;
        if unlink {
            self.dd().unlink_clusters(&infos, 5000, force)
        } else {
            self.dd().link_clusters(&infos, 5000)
        }
    }

    /// Pulls blocks `src` of `cluster`'s KV into this pool's blocks `dst`.
    pub fn pull(&self, cluster: u64, src: &[u64], dst: &[u64]) -> Result<(), LlmException> {
        self.cache_manager.pull_blocks(
            BlocksCacheKey::new(cluster, KV_MODEL_ID),
            &self.cache,
            src,
            dst,
            &LayerRanges::all(),
        )
    }

    /// Switches the llm-datadist role (listening on `listen` for `prompt`).
    pub fn switch_role(&self, role: LlmRole, listen: Option<&str>) -> Result<(), LlmException> {
        let opts: Option<Options> = listen.map(|l| {
            [(llm_datadist::config::keys::LISTEN_IP_INFO, l)]
                .into_iter()
                .collect()
        });
        self.dd().switch_role(role, opts.as_ref())
    }

    /// The port llm-datadist listens on, if it does.
    pub fn listen_port(&self) -> Option<u16> {
        self.dd().listen_addr().map(|a| a.port())
    }
}

impl Drop for RegisteredKv {
    fn drop(&mut self) {
        let _ = self.cache_manager.unregister_cache(self.cache.cache_id());
        self.dd().finalize();
    }
}

/// A command from rank 0 to another rank's [`RankKv`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RankCommand {
    /// Link to these peers (already this rank's clusters and ports).
    Link { peers: Vec<Peer> },
    /// Unlink from these peers.
    Unlink { peers: Vec<Peer>, force: bool },
    /// Pull blocks `src` of `cluster` into blocks `dst`.
    Pull {
        cluster: u64,
        src: Vec<u64>,
        dst: Vec<u64>,
    },
    /// Switch role; a `prompt` rank listens on `listen_host`.
    SwitchRole {
        role: String,
        listen_host: Option<String>,
    },
    /// Report the listen port.
    Info,
}

/// A command as sent: with the token a rank on another host requires.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct RankRequest {
    #[serde(default)]
    token: String,
    #[serde(flatten)]
    cmd: RankCommand,
}

/// A rank's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RankReply {
    /// llm-datadist status name (`LLM_SUCCESS` on success).
    pub status: String,
    /// Details on failure.
    #[serde(default)]
    pub message: String,
    /// llm-datadist listen port, when listening.
    #[serde(default)]
    pub datadist_port: Option<u16>,
    /// The host it listens on, for a rank on a host of its own (others listen on rank 0's).
    #[serde(default)]
    pub datadist_host: Option<String>,
}

/// Where a rank's KV agent listens, and who may drive it.
pub struct RankEndpoint {
    /// The host its llm-datadist listens on as `prompt`.
    pub host: String,
    /// Whether the rank is on a host of its own: it listens on `host` whatever rank 0 asks
    /// for, and names it in its answers.
    pub own_host: bool,
    /// The control socket (None: a fresh one on loopback).
    pub control: Option<TcpListener>,
    /// The token every command must carry (empty: none, for a loopback socket).
    pub token: String,
}

struct Agent {
    kv: RegisteredKv,
    host: Option<String>,
    token: String,
}

impl Agent {
    fn reply<T>(&self, r: Result<T, LlmException>) -> RankReply {
        let (status, message) = match r {
            Ok(_) => (LlmStatusCode::LlmSuccess.name().into(), String::new()),
            Err(e) => (e.status_code.name().into(), e.message),
        };
        RankReply {
            status,
            message,
            datadist_port: self.kv.listen_port(),
            datadist_host: self.host.clone(),
        }
    }
}

/// A rank's registered KV, driven by rank 0 over a control socket.
pub struct RankKv {
    agent: Arc<Agent>,
    control: SocketAddr,
}

impl RankKv {
    /// Registers this rank's KV pool as `cluster_id` with `role` (a `prompt` rank listens on
    /// `at.host`) and serves commands on `at.control` ([`control_addr`](Self::control_addr)).
    ///
    /// # Safety
    /// As [`RegisteredKv::open`].
    pub unsafe fn start(
        regions: &[KvRegion],
        num_blocks: usize,
        cluster_id: u64,
        role: LlmRole,
        at: RankEndpoint,
    ) -> Result<RankKv, String> {
        let listen = format!("{}:0", at.host);
        let listen = (role == LlmRole::Prompt).then_some(listen.as_str());
        // SAFETY: the caller's contract.
        let kv = unsafe { RegisteredKv::open(regions, num_blocks, cluster_id, role, listen, None) }
            .map_err(|e| format!("llm-datadist: {e}"))?;
        let listener = match at.control {
            Some(l) => l,
            None => TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?,
        };
        let control = listener.local_addr().map_err(|e| e.to_string())?;
        let agent = Arc::new(Agent {
            kv,
            host: at.own_host.then_some(at.host),
            token: at.token,
        });
        // The accept loop holds the agent weakly: closing drops it (finalizing llm-datadist,
        // so that a rank serving its next group can start another) and ends the loop.
        let served = Arc::downgrade(&agent);
        std::thread::Builder::new()
            .name("tandem-rank-kv".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    let Some(agent) = served.upgrade() else {
                        return;
                    };
                    let _ = std::thread::Builder::new()
                        .name("tandem-rank-kv-cmd".into())
                        .spawn(move || handle(&agent, conn));
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(RankKv { agent, control })
    }

    /// Where rank 0 sends commands.
    pub fn control_addr(&self) -> SocketAddr {
        self.control
    }

    /// Unregisters the pool and finalizes llm-datadist (before the pool's memory goes), and
    /// stops serving commands.
    pub fn close(self) {
        // Commands in flight finish first (a pull writes into the pool); new ones are not
        // taken once the loop finds the agent gone.
        let mut agent = self.agent;
        loop {
            match Arc::try_unwrap(agent) {
                Ok(a) => {
                    drop(a);
                    break;
                }
                Err(shared) => {
                    agent = shared;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        // Wakes the accept loop, which finds the agent gone.
        let _ = TcpStream::connect_timeout(&self.control, Duration::from_secs(1));
    }
}

/// The longest command a rank accepts (a pull of a million blocks fits).
const MAX_COMMAND_BYTES: u64 = 32 << 20;

fn handle(agent: &Agent, conn: TcpStream) {
    let kv = &agent.kv;
    // A command is a few block ids per KV block of a prompt; anything longer is not one.
    let mut line = String::new();
    let mut reader = BufReader::new(std::io::Read::take(&conn, MAX_COMMAND_BYTES));
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let refused = |status: LlmStatusCode, message: String| RankReply {
        status: status.name().into(),
        message,
        datadist_port: None,
        datadist_host: None,
    };
    let reply = match serde_json::from_str::<RankRequest>(&line) {
        Err(e) => refused(LlmStatusCode::LlmParamInvalid, format!("bad command: {e}")),
        Ok(req) if req.token != agent.token => refused(
            LlmStatusCode::LlmParamInvalid,
            "refused a command without the deployment's token".into(),
        ),
        Ok(req) => match req.cmd {
            RankCommand::Link { peers } => agent.reply(kv.link(&peers, false, false)),
            RankCommand::Unlink { peers, force } => agent.reply(kv.link(&peers, true, force)),
            RankCommand::Pull { cluster, src, dst } => agent.reply(kv.pull(cluster, &src, &dst)),
            RankCommand::SwitchRole { role, listen_host } => {
                // A rank on a host of its own listens there, not on rank 0's.
                let host = listen_host.map(|h| agent.host.clone().unwrap_or(h));
                let r = LlmRole::parse(&role).and_then(|role| {
                    let listen = host.map(|h| format!("{h}:0"));
                    kv.switch_role(role, listen.as_deref())
                });
                agent.reply(r)
            }
            RankCommand::Info => agent.reply(Ok(())),
        },
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    let _ = (&conn).write_all(&out);
}

/// Rank 0's handle on another rank's [`RankKv`].
#[derive(Clone, Debug)]
pub struct RankControl {
    /// The rank.
    pub rank: usize,
    /// Its control address.
    pub addr: SocketAddr,
    /// The token its commands carry (empty for a rank on rank 0's host).
    pub token: String,
}

impl RankControl {
    /// Sends `cmd` and waits for the answer (a transfer can take a while).
    pub fn call(&self, cmd: &RankCommand) -> Result<RankReply, String> {
        let fail = |e: std::io::Error| format!("tensor-parallel rank {}: {e}", self.rank);
        let conn = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5)).map_err(fail)?;
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(fail)?;
        let req = RankRequest {
            token: self.token.clone(),
            cmd: cmd.clone(),
        };
        let mut msg = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
        msg.push(b'\n');
        (&conn).write_all(&msg).map_err(fail)?;
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line).map_err(fail)?;
        serde_json::from_str(&line)
            .map_err(|e| format!("tensor-parallel rank {}: bad answer: {e}", self.rank))
    }

    /// [`call`](Self::call), with anything but success as an error.
    pub fn call_ok(&self, cmd: &RankCommand) -> Result<RankReply, String> {
        let r = self.call(cmd)?;
        if r.status != LlmStatusCode::LlmSuccess.name() {
            return Err(format!(
                "tensor-parallel rank {}: {} {}",
                self.rank, r.status, r.message
            ));
        }
        Ok(r)
    }
}
