//! Two-sided links (`link` / `unlink` / `query_register_mem_status`): every member of a
//! communication domain calls `link` with the same name, cluster-to-rank map and rank table at
//! about the same time, and the domain is usable once every pair is linked.
//!
//! The reference builds an HCCL domain from the rank table; here the table's `device_ip` of a
//! rank is the host address of that rank's process, and its port is the entry's
//! `device_port` when present, else `HCCL_IF_BASE_PORT` (default 60000) + `device_id` (HCCL's
//! host-NIC port rule). For each pair, the higher rank connects to the lower one, so every
//! member but the highest accepts on its rank's address (through its own listener when that
//! is the address, else through one opened for the domain). `link` returns at once; the
//! connections are made in the background and `query_register_mem_status` says when they are
//! all up (`OK`), still coming (`PREPARING`), or not made within `llm.LinkTotalTime`
//! (`FAILED`). Once up, the links are ordinary links: pulls and pushes work both ways.

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::core::{Core, Listener};
use crate::keys::LlmClusterInfo;
use crate::status::{param_invalid, LlmException, LlmStatusCode, Result};
use crate::types::RegisterMemStatus;

/// Longest communication-domain name (exclusive), as the reference.
pub const MAX_COMM_NAME: usize = 128;
/// Most members of one domain, as the reference.
pub const MAX_COMM_MEMBERS: usize = 4;
/// HCCL's default base port for host-NIC communication.
const DEFAULT_BASE_PORT: u16 = 60000;
/// Pause between attempts to reach a member that is not listening yet.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Where one rank of a rank table can be reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankAddr {
    /// The rank's host address (the table's `device_ip`).
    pub host: String,
    /// Its port (see the module documentation for the rule).
    pub port: u16,
}

fn field_u64(v: &serde_json::Value, key: &str) -> Option<u64> {
    match v.get(key)? {
        serde_json::Value::String(s) => s.trim().parse().ok(),
        n => n.as_u64(),
    }
}

/// Parses an HCCL rank table (version 1.0, or 1.2 with `super_pod_list`) into rank id ->
/// address. `base_port` stands for `HCCL_IF_BASE_PORT`.
pub fn parse_rank_table(json: &str, base_port: u16) -> Result<HashMap<u32, RankAddr>> {
    let v: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| LlmException::param(format!("rank_table is not JSON: {e}")))?;
    let version = v.get("version").and_then(|x| x.as_str()).unwrap_or("");
    if !matches!(version, "1.0" | "1.2") {
        param_invalid!("rank_table version {version:?} is not supported (1.0 or 1.2)");
    }
    let Some(servers) = v.get("server_list").and_then(|s| s.as_array()) else {
        param_invalid!("rank_table has no server_list");
    };
    let mut ranks = HashMap::new();
    for server in servers {
        let Some(devices) = server.get("device").and_then(|d| d.as_array()) else {
            param_invalid!("a rank_table server has no device list");
        };
        for d in devices {
            let (Some(rank), Some(device_id), Some(ip)) = (
                field_u64(d, "rank_id"),
                field_u64(d, "device_id"),
                d.get("device_ip").and_then(|x| x.as_str()),
            ) else {
                param_invalid!(
                    "rank_table device entry {d} needs rank_id, device_id and device_ip"
                );
            };
            let port = match field_u64(d, "device_port") {
                Some(p) => p,
                None => base_port as u64 + device_id,
            };
            let (Ok(rank), Ok(port)) = (u32::try_from(rank), u16::try_from(port)) else {
                param_invalid!("rank_table device entry {d}: rank or port out of range");
            };
            let addr = RankAddr {
                host: ip.to_string(),
                port,
            };
            if ranks.insert(rank, addr).is_some() {
                param_invalid!("rank_table names rank {rank} twice");
            }
        }
    }
    Ok(ranks)
}

/// `HCCL_IF_BASE_PORT` from the environment, else HCCL's default.
pub fn base_port() -> u16 {
    std::env::var("HCCL_IF_BASE_PORT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_BASE_PORT)
}

fn resolve_v4(addr: &RankAddr) -> Result<SocketAddrV4> {
    (addr.host.as_str(), addr.port)
        .to_socket_addrs()
        .map_err(|e| LlmException::param(format!("rank address {}: {e}", addr.host)))?
        .find_map(|a| match a {
            SocketAddr::V4(v4) => Some(v4),
            SocketAddr::V6(_) => None,
        })
        .ok_or_else(|| LlmException::param(format!("rank address {} has no IPv4", addr.host)))
}

#[derive(Debug)]
enum Progress {
    Connecting,
    Connected,
    Failed(String),
}

/// One communication domain this instance is a member of.
pub(crate) struct Domain {
    name: String,
    /// The other members' cluster ids.
    peers: Vec<u64>,
    deadline: Instant,
    progress: Arc<Mutex<Progress>>,
    cancel: Arc<AtomicBool>,
    connector: Option<JoinHandle<()>>,
    listener: Option<Listener>,
}

impl Domain {
    /// Stops connecting and listening; the links themselves are the caller's to close.
    fn stop(mut self) {
        self.cancel.store(true, Ordering::Release);
        if let Some(t) = self.connector.take() {
            let _ = t.join();
        }
        if let Some(l) = self.listener.take() {
            l.stop();
        }
    }
}

/// Checks `link`'s arguments as the reference does.
fn check_members(comm_name: &str, members: &[(u64, u32)]) -> Result<()> {
    if comm_name.is_empty() {
        param_invalid!("comm_name can not be empty");
    }
    if comm_name.len() >= MAX_COMM_NAME {
        param_invalid!("comm_name length should be smaller than {MAX_COMM_NAME}");
    }
    if members.len() > MAX_COMM_MEMBERS {
        param_invalid!("cluster_rank_info size can not be greater than {MAX_COMM_MEMBERS}");
    }
    if members.len() < 2 {
        param_invalid!("cluster num must be bigger than 1");
    }
    if members.windows(2).any(|w| w[0].1 > w[1].1) {
        param_invalid!("rank in cluster_rank_info must be ordered");
    }
    let mut ids: Vec<u64> = members.iter().map(|m| m.0).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() != members.len() {
        param_invalid!("cluster id in cluster_rank_info can not be duplicated");
    }
    Ok(())
}

impl Core {
    /// Joins domain `comm_name` (see the module documentation); returns its comm id.
    pub fn comm_link(
        self: &Arc<Self>,
        comm_name: &str,
        members: &[(u64, u32)],
        rank_table: &str,
    ) -> Result<u64> {
        check_members(comm_name, members)?;
        let ranks = parse_rank_table(rank_table, base_port())?;
        let Some(&(_, my_rank)) = members.iter().find(|m| m.0 == self.cluster_id) else {
            param_invalid!(
                "this instance (cluster {}) is not in cluster_rank_info",
                self.cluster_id
            );
        };
        let addr_of = |rank: u32| {
            ranks
                .get(&rank)
                .cloned()
                .ok_or_else(|| LlmException::param(format!("rank {rank} is not in the rank_table")))
        };
        let mut lower = Vec::new();
        for &(peer, rank) in members {
            addr_of(rank)?;
            if rank < my_rank {
                lower.push((peer, resolve_v4(&addr_of(rank)?)?));
            } else if rank == my_rank && peer != self.cluster_id {
                param_invalid!("ranks in cluster_rank_info must be distinct");
            }
        }
        let accepts = members.iter().any(|m| m.1 > my_rank);
        let listener = if accepts {
            let mine = addr_of(my_rank)?;
            let wanted = SocketAddr::V4(resolve_v4(&mine)?);
            if self.listen_addr() == Some(wanted) {
                None
            } else {
                Some(self.bind_listener(&mine.host, mine.port, &[wanted])?)
            }
        } else {
            None
        };
        let deadline = Instant::now() + self.opts.link_total_time;
        let progress = Arc::new(Mutex::new(Progress::Connecting));
        let cancel = Arc::new(AtomicBool::new(false));
        let connector = {
            let (core, progress, cancel) = (self.clone(), progress.clone(), cancel.clone());
            std::thread::Builder::new()
                .name("llm-datadist-comm".into())
                .spawn(move || {
                    let result = core.connect_lower(&lower, deadline, &cancel);
                    *progress.lock().expect("progress lock") = match result {
                        Ok(()) => Progress::Connected,
                        Err(e) => Progress::Failed(e.message),
                    };
                })
                .map_err(|e| LlmException::new(LlmStatusCode::LlmFailed, e.to_string()))?
        };
        let id = self.next_comm_id.fetch_add(1, Ordering::Relaxed);
        let domain = Domain {
            name: comm_name.to_string(),
            peers: members
                .iter()
                .map(|m| m.0)
                .filter(|&c| c != self.cluster_id)
                .collect(),
            deadline,
            progress,
            cancel,
            connector: Some(connector),
            listener,
        };
        tracing::info!(
            cluster_id = self.cluster_id,
            comm_id = id,
            comm_name,
            "joining domain"
        );
        self.domains
            .lock()
            .expect("domains lock")
            .insert(id, domain);
        Ok(id)
    }

    /// Links to every lower-ranked member, retrying while they are not listening yet.
    fn connect_lower(
        self: &Arc<Self>,
        lower: &[(u64, SocketAddrV4)],
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<()> {
        for &(peer, addr) in lower {
            let mut info = LlmClusterInfo::new(peer);
            info.append_remote_ip_int(u32::from_le_bytes(addr.ip().octets()), addr.port());
            loop {
                if cancel.load(Ordering::Acquire) {
                    return Err(LlmException::new(LlmStatusCode::LlmFailed, "unlinked"));
                }
                let left = deadline.saturating_duration_since(Instant::now());
                match self.link_to(&info, left.min(Duration::from_secs(5))) {
                    Ok(()) => break,
                    Err(e) if e.status_code == LlmStatusCode::LlmAlreadyLink => break,
                    Err(e) if e.status_code == LlmStatusCode::LlmLinkFailed && !left.is_zero() => {
                        std::thread::sleep(RETRY_PAUSE.min(left));
                    }
                    Err(e) => {
                        return Err(LlmException::new(
                            e.status_code,
                            format!("linking to cluster {peer} at {addr}: {}", e.message),
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether every member of domain `comm_id` is linked.
    pub fn comm_status(&self, comm_id: u64) -> Result<RegisterMemStatus> {
        let domains = self.domains.lock().expect("domains lock");
        let Some(d) = domains.get(&comm_id) else {
            param_invalid!("no communication domain with comm id {comm_id}");
        };
        if let Progress::Failed(why) = &*d.progress.lock().expect("progress lock") {
            tracing::warn!(comm_id, name = d.name, "domain failed: {why}");
            return Ok(RegisterMemStatus::Failed);
        }
        let links = self.links.lock().expect("links lock");
        let all = d.peers.iter().all(|p| links.contains_key(p));
        Ok(if all {
            RegisterMemStatus::Ok
        } else if Instant::now() >= d.deadline {
            RegisterMemStatus::Failed
        } else {
            RegisterMemStatus::Preparing
        })
    }

    /// Leaves domain `comm_id`: its links are dropped on this side (every member calls it).
    pub fn comm_unlink(&self, comm_id: u64) -> Result<()> {
        let Some(d) = self.domains.lock().expect("domains lock").remove(&comm_id) else {
            param_invalid!("no communication domain with comm id {comm_id}");
        };
        let peers = d.peers.clone();
        d.stop();
        let mut links = self.links.lock().expect("links lock");
        for p in peers {
            if let Some(l) = links.remove(&p) {
                l.close();
            }
        }
        tracing::info!(cluster_id = self.cluster_id, comm_id, "left domain");
        Ok(())
    }

    /// Stops every domain's connector and listener (finalize).
    pub fn stop_domains(&self) {
        let domains: Vec<Domain> = self
            .domains
            .lock()
            .expect("domains lock")
            .drain()
            .map(|(_, d)| d)
            .collect();
        for d in domains {
            d.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_table_ports_follow_the_rule() {
        let table = r#"{"version":"1.0","server_count":"2","status":"completed","server_list":[
            {"server_id":"a","device":[{"device_id":"0","device_ip":"127.0.0.1","rank_id":"0"}]},
            {"server_id":"b","device":[{"device_id":3,"device_ip":"127.0.0.2","rank_id":1,"device_port":"26001"}]}]}"#;
        let r = parse_rank_table(table, 60000).unwrap();
        assert_eq!(
            r[&0],
            RankAddr {
                host: "127.0.0.1".into(),
                port: 60000
            }
        );
        assert_eq!(
            r[&1],
            RankAddr {
                host: "127.0.0.2".into(),
                port: 26001
            }
        );
        for bad in [
            "not json",
            r#"{"version":"9","server_list":[]}"#,
            r#"{"version":"1.0"}"#,
            r#"{"version":"1.0","server_list":[{"device":[{"device_id":"0"}]}]}"#,
            r#"{"version":"1.0","server_list":[{"device":[{"device_id":"0","device_ip":"x","rank_id":"0"},{"device_id":"1","device_ip":"x","rank_id":"0"}]}]}"#,
        ] {
            let e = parse_rank_table(bad, 60000).unwrap_err();
            assert_eq!(e.status_code, LlmStatusCode::LlmParamInvalid, "{bad}");
        }
    }

    #[test]
    fn member_checks() {
        let bad = |name: &str, m: &[(u64, u32)]| {
            check_members(name, m).unwrap_err().status_code == LlmStatusCode::LlmParamInvalid
        };
        assert!(bad("", &[(1, 0), (2, 1)]));
        assert!(bad(&"x".repeat(128), &[(1, 0), (2, 1)]));
        assert!(bad("c", &[(1, 0)]));
        assert!(bad("c", &[(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)]));
        assert!(bad("c", &[(1, 1), (2, 0)]));
        assert!(bad("c", &[(1, 0), (1, 1)]));
        assert!(check_members("c", &[(1, 0), (2, 1)]).is_ok());
    }
}
