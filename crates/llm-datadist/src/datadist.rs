//! `LlmDataDist`: one instance per process, identified by its cluster id; links to peers and
//! hands out the `CacheManager`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::cache_manager::CacheManager;
use crate::config::{keys, Options};
use crate::core::Core;
use crate::keys::LlmClusterInfo;
use crate::options::{parse_listen, InitOptions};
use crate::status::{param_invalid, LlmException, LlmStatusCode, Result};
use crate::types::{LlmRole, RegisterMemStatus};

/// At most one initialized instance per process, as in the reference.
static INITIALIZED: AtomicBool = AtomicBool::new(false);

/// The entry point: create with a role and a cluster id unique among all peers, `init` with
/// options (see [`crate::LlmConfig`]), link, transfer through [`CacheManager`], `finalize`.
pub struct LlmDataDist {
    role: LlmRole,
    cluster_id: u64,
    core: Option<Arc<Core>>,
}

fn not_initialized() -> LlmException {
    LlmException::new(LlmStatusCode::LlmFailed, "llm datadist is not initialized")
}

impl LlmDataDist {
    /// An uninitialized instance.
    pub fn new(role: LlmRole, cluster_id: u64) -> Self {
        Self {
            role,
            cluster_id,
            core: None,
        }
    }

    /// This instance's cluster id.
    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    /// The current role.
    pub fn role(&self) -> LlmRole {
        self.role
    }

    /// Initializes: CacheManager mode and `device_id` are required; `llm.listenIpInfo` starts
    /// the listener. A second call on an initialized instance is a no-op.
    pub fn init(&mut self, options: &Options) -> Result<()> {
        if self.core.is_some() {
            return Ok(());
        }
        let opts = InitOptions::parse(options)?;
        if INITIALIZED.swap(true, Ordering::AcqRel) {
            return Err(LlmException::new(
                LlmStatusCode::LlmFailed,
                "Cannot init multiple LLMDataDists",
            ));
        }
        match Core::new(self.cluster_id, opts) {
            Ok(core) => {
                tracing::info!(
                    cluster_id = self.cluster_id,
                    role = self.role.as_option(),
                    "llm-datadist initialized"
                );
                self.core = Some(core);
                Ok(())
            }
            Err(e) => {
                INITIALIZED.store(false, Ordering::Release);
                Err(e)
            }
        }
    }

    /// Releases links, registrations, pools and the listener. No-op when not initialized.
    pub fn finalize(&mut self) {
        if let Some(core) = self.core.take() {
            core.shutdown();
            INITIALIZED.store(false, Ordering::Release);
        }
    }

    fn core(&self) -> Result<&Arc<Core>> {
        self.core.as_ref().ok_or_else(not_initialized)
    }

    /// The cache manager.
    pub fn cache_manager(&self) -> Result<CacheManager> {
        Ok(CacheManager {
            core: self.core()?.clone(),
        })
    }

    /// The device (memory domain) id given at init.
    pub fn device_id(&self) -> Option<u32> {
        self.core.as_ref().map(|c| c.opts.device_id)
    }

    /// The address the listener is bound to (useful with port 0), if listening.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.core.as_ref()?.listen_addr()
    }

    /// Clusters currently linked (both directions).
    pub fn linked_clusters(&self) -> Vec<u64> {
        self.core
            .as_ref()
            .map(|c| {
                c.links
                    .lock()
                    .expect("links lock")
                    .keys()
                    .copied()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether the link to `peer` moves payloads through shared memory (None: not linked).
    pub fn link_uses_shm(&self, peer: u64) -> Option<bool> {
        let core = self.core.as_ref()?;
        let link = core.links.lock().expect("links lock").get(&peer).cloned()?;
        Some(link.shm.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn check_timeout(timeout_ms: i32) -> Result<Duration> {
        if timeout_ms <= 0 {
            param_invalid!("timeout must be > 0 ms, got {timeout_ms}");
        }
        Ok(Duration::from_millis(timeout_ms as u64))
    }

    fn gather(results: Vec<Result<()>>) -> (LlmStatusCode, Vec<LlmStatusCode>) {
        let codes: Vec<LlmStatusCode> = results
            .into_iter()
            .map(|r| match r {
                Ok(()) => LlmStatusCode::LlmSuccess,
                Err(e) => {
                    tracing::warn!("{e}");
                    e.status_code
                }
            })
            .collect();
        let overall = codes
            .iter()
            .copied()
            .find(|c| *c != LlmStatusCode::LlmSuccess)
            .unwrap_or(LlmStatusCode::LlmSuccess);
        (overall, codes)
    }

    /// Links to servers (instances listening at each cluster's remote ip info), in parallel.
    /// Returns the overall status and one per cluster; link failures are not raised.
    pub fn link_clusters(
        &self,
        clusters: &[LlmClusterInfo],
        timeout_ms: i32,
    ) -> Result<(LlmStatusCode, Vec<LlmStatusCode>)> {
        let core = self.core()?;
        let timeout = Self::check_timeout(timeout_ms)?;
        if clusters.is_empty() {
            return Ok((LlmStatusCode::LlmParamInvalid, Vec::new()));
        }
        let results = std::thread::scope(|s| {
            let handles: Vec<_> = clusters
                .iter()
                .map(|c| s.spawn(move || core.link_to(c, timeout)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(LlmException::new(
                            LlmStatusCode::LlmFailed,
                            "link thread panicked",
                        ))
                    })
                })
                .collect()
        });
        Ok(Self::gather(results))
    }

    /// Unlinks from peers: normally by telling the peer (both ends drop the link), or with
    /// `force` by destroying only the local end.
    pub fn unlink_clusters(
        &self,
        clusters: &[LlmClusterInfo],
        timeout_ms: i32,
        force: bool,
    ) -> Result<(LlmStatusCode, Vec<LlmStatusCode>)> {
        let core = self.core()?;
        let timeout = Self::check_timeout(timeout_ms)?;
        if clusters.is_empty() {
            return Ok((LlmStatusCode::LlmParamInvalid, Vec::new()));
        }
        let results = clusters
            .iter()
            .map(|c| core.unlink_from(c, timeout, force))
            .collect();
        Ok(Self::gather(results))
    }

    /// Two-sided link: joins communication domain `comm_name` with the other members of
    /// `cluster_rank_info` (cluster id -> rank in `rank_table`, ranks ascending), who call it
    /// at about the same time. Returns the comm id at once; poll
    /// [`query_register_mem_status`](Self::query_register_mem_status) until `Ok` before
    /// transferring. How ranks are addressed: [`crate::comm`].
    pub fn link(
        &self,
        comm_name: &str,
        cluster_rank_info: &[(u64, u32)],
        rank_table: &str,
    ) -> Result<u64> {
        self.core()?
            .comm_link(comm_name, cluster_rank_info, rank_table)
    }

    /// Leaves the domain `comm_id` (every member calls it), dropping its links on this side.
    pub fn unlink(&self, comm_id: u64) -> Result<()> {
        self.core()?.comm_unlink(comm_id)
    }

    /// `Ok` once every member of domain `comm_id` is linked, `Preparing` before, `Failed` when
    /// a member could not be reached within `llm.LinkTotalTime`.
    pub fn query_register_mem_status(&self, comm_id: u64) -> Result<RegisterMemStatus> {
        self.core()?.comm_status(comm_id)
    }

    /// Switches role under the seed's rules: needs `enable_switch_role` at init
    /// (`LLM_FEATURE_NOT_ENABLED`), no remaining links (`LLM_EXIST_LINK`), a different role
    /// (`LLM_PARAM_INVALID`), and `llm.listenIpInfo` when switching to Prompt. With a listen
    /// address the instance listens there; without, it stops listening.
    pub fn switch_role(&mut self, role: LlmRole, switch_options: Option<&Options>) -> Result<()> {
        let core = self.core()?.clone();
        if !core.opts.enable_switch_role {
            return Err(LlmException::new(
                LlmStatusCode::LlmFeatureNotEnabled,
                "switch_role needs enable_switch_role at init",
            ));
        }
        let linked = core.links.lock().expect("links lock").len();
        if linked > 0 {
            return Err(LlmException::new(
                LlmStatusCode::LlmExistLink,
                format!("{linked} link(s) remain; unlink them before switch_role"),
            ));
        }
        if role == self.role {
            param_invalid!("instance is already {role}");
        }
        let listen = switch_options
            .and_then(|o| o.get(keys::LISTEN_IP_INFO))
            .map(parse_listen)
            .transpose()?;
        match listen {
            Some((host, port)) => core.listen(&host, port)?,
            None if role == LlmRole::Prompt => {
                param_invalid!("switching to Prompt needs llm.listenIpInfo in the switch options")
            }
            None => core.stop_listening(),
        }
        tracing::info!(cluster_id = self.cluster_id, from = %self.role, to = %role, "switched role");
        self.role = role;
        Ok(())
    }
}

impl Drop for LlmDataDist {
    fn drop(&mut self) {
        self.finalize();
    }
}
