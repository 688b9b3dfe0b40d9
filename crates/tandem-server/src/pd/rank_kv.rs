//! The KV transfer side of tensor-parallel ranks in a disaggregated deployment. Each rank's
//! KV pool (its KV heads only) is registered with llm-datadist as a cluster of its own
//! ([`rank_cluster`]), so a prefill worker's rank `r` hands its shard straight to a decode
//! worker's rank `r`. Rank 0 is the worker itself; ranks 1.. are `tp-rank` processes, each
//! running a [`RankKv`] that rank 0 drives over a loopback control socket (one JSON command
//! per connection): link, unlink, pull, switch role, info.

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
}

fn reply_of<T>(kv: &RegisteredKv, r: Result<T, LlmException>) -> RankReply {
    match r {
        Ok(_) => RankReply {
            status: LlmStatusCode::LlmSuccess.name().into(),
            message: String::new(),
            datadist_port: kv.listen_port(),
        },
        Err(e) => RankReply {
            status: e.status_code.name().into(),
            message: e.message,
            datadist_port: kv.listen_port(),
        },
    }
}

/// A rank's registered KV, driven by rank 0 over a loopback control socket.
pub struct RankKv {
    kv: Arc<RegisteredKv>,
    control: SocketAddr,
}

impl RankKv {
    /// Registers this rank's KV pool as `cluster_id` with `role` (a `prompt` rank listens on
    /// `listen_host`) and serves commands on a loopback port ([`control_addr`](Self::control_addr)).
    ///
    /// # Safety
    /// As [`RegisteredKv::open`].
    pub unsafe fn start(
        regions: &[KvRegion],
        num_blocks: usize,
        cluster_id: u64,
        role: LlmRole,
        listen_host: &str,
    ) -> Result<RankKv, String> {
        let listen = format!("{listen_host}:0");
        let listen = (role == LlmRole::Prompt).then_some(listen.as_str());
        // SAFETY: the caller's contract.
        let kv = unsafe { RegisteredKv::open(regions, num_blocks, cluster_id, role, listen, None) }
            .map_err(|e| format!("llm-datadist: {e}"))?;
        let kv = Arc::new(kv);
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let control = listener.local_addr().map_err(|e| e.to_string())?;
        let served = kv.clone();
        std::thread::Builder::new()
            .name("tandem-rank-kv".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    let kv = served.clone();
                    let _ = std::thread::Builder::new()
                        .name("tandem-rank-kv-cmd".into())
                        .spawn(move || handle(&kv, conn));
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(RankKv { kv, control })
    }

    /// Where rank 0 sends commands.
    pub fn control_addr(&self) -> SocketAddr {
        self.control
    }

    /// Unregisters the pool and finalizes llm-datadist (before the pool's memory goes).
    pub fn close(self) {
        drop(self.kv);
    }
}

/// The longest command a rank accepts (a pull of a million blocks fits).
const MAX_COMMAND_BYTES: u64 = 32 << 20;

fn handle(kv: &RegisteredKv, conn: TcpStream) {
    // A command is a few block ids per KV block of a prompt; anything longer is not one.
    let mut line = String::new();
    let mut reader = BufReader::new(std::io::Read::take(&conn, MAX_COMMAND_BYTES));
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let reply = match serde_json::from_str::<RankCommand>(&line) {
        Err(e) => RankReply {
            status: LlmStatusCode::LlmParamInvalid.name().into(),
            message: format!("bad command: {e}"),
            datadist_port: None,
        },
        Ok(RankCommand::Link { peers }) => reply_of(kv, kv.link(&peers, false, false)),
        Ok(RankCommand::Unlink { peers, force }) => reply_of(kv, kv.link(&peers, true, force)),
        Ok(RankCommand::Pull { cluster, src, dst }) => reply_of(kv, kv.pull(cluster, &src, &dst)),
        Ok(RankCommand::SwitchRole { role, listen_host }) => {
            let r = LlmRole::parse(&role).and_then(|role| {
                let listen = listen_host.map(|h| format!("{h}:0"));
                kv.switch_role(role, listen.as_deref())
            });
            reply_of(kv, r)
        }
        Ok(RankCommand::Info) => reply_of(kv, Ok(())),
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
}

impl RankControl {
    /// Sends `cmd` and waits for the answer (a transfer can take a while).
    pub fn call(&self, cmd: &RankCommand) -> Result<RankReply, String> {
        let fail = |e: std::io::Error| format!("tensor-parallel rank {}: {e}", self.rank);
        let conn = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5)).map_err(fail)?;
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(fail)?;
        let mut msg = serde_json::to_vec(cmd).map_err(|e| e.to_string())?;
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
