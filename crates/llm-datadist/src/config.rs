//! `LLMConfig`: a validated builder for the flat option map `init` takes, emitting the same keys
//! and values as the reference, in the same order.

use crate::status::{param_invalid, LlmException, Result};

/// An insertion-ordered string map, like the Python dict `generate_options()` returns: setting
/// an existing key keeps its position.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options(Vec<(String, String)>);

impl Options {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to `value`.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let (key, value) = (key.into(), value.into());
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key, value)),
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        let i = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.remove(i).1)
    }

    /// Entries in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Options {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut options = Options::new();
        for (k, v) in iter {
            options.set(k, v);
        }
        options
    }
}

/// Option keys (LLM-DataDist's, plus Tandem's transport keys under `llm.Tandem.*`).
pub mod keys {
    /// Device (memory domain) id(s), `;`-separated.
    pub const DEVICE_ID: &str = "ge.exec.deviceId";
    /// First device id.
    pub const SESSION_DEVICE_ID: &str = "ge.session_device_id";
    /// Transfer timeout in ms.
    pub const SYNC_KV_TIMEOUT: &str = "llm.SyncKvCacheWaitTime";
    /// v1 internal.
    pub const DEPLOY_RES_PATH: &str = "llm.deployResPath";
    /// v1 memory tiers.
    pub const BUF_POOL_CFG: &str = "llm.BufPoolCfg";
    /// Device pool JSON.
    pub const MEM_POOL_CFG: &str = "llm.MemPoolConfig";
    /// Host pool JSON.
    pub const HOST_MEM_POOL_CFG: &str = "llm.HostMemPoolConfig";
    /// CacheManager (v2) mode.
    pub const ENABLE_CACHE_MANAGER: &str = "llm.EnableCacheManager";
    /// Remote cache metadata caching; required for push.
    pub const ENABLE_REMOTE_CACHE_ACCESSIBLE: &str = "llm.EnableRemoteCacheAccessible";
    /// `ip:port` to listen on (makes the instance a server).
    pub const LISTEN_IP_INFO: &str = "llm.listenIpInfo";
    /// Link establishment timeout in seconds.
    pub const LINK_TOTAL_TIME: &str = "llm.LinkTotalTime";
    /// Link retries.
    pub const LINK_RETRY_COUNT: &str = "llm.LinkRetryCount";
    /// RDMA traffic class.
    pub const RDMA_TRAFFIC_CLASS: &str = "llm.RdmaTrafficClass";
    /// RDMA service level.
    pub const RDMA_SERVICE_LEVEL: &str = "llm.RdmaServiceLevel";
    /// Local communication resources JSON.
    pub const LOCAL_COMM_RES: &str = "llm.LocalCommRes";
    /// Transfer backend name.
    pub const TRANSFER_BACKEND: &str = "llm.TransferBackend";
    /// HIXL resource config JSON.
    pub const GLOBAL_RESOURCE_CONFIG: &str = "llm.GlobalResourceConfig";
    /// v1 cluster info.
    pub const CLUSTER_INFO: &str = "llm.ClusterInfo";
    /// v1 output size.
    pub const OUTPUT_MAX_SIZE: &str = "llm.OutputMaxSize";
    /// Allows `switch_role`.
    pub const ENABLE_SWITCH_ROLE: &str = "llm.EnableSwitchRole";
    /// v1 pool utilization.
    pub const MEMORY_UTILIZATION: &str = "llm.MemoryUtilization";
    /// Set by `init`: the role.
    pub const ROLE: &str = "llm.Role";
    /// Set by `init`: listen host.
    pub const LISTEN_IP: &str = "llm.ListenIp";
    /// Set by `init`: listen port.
    pub const LISTEN_PORT: &str = "llm.ListenPort";
    /// Tandem: `auto` (shared memory with peers on this host, else TCP), `tcp`, or `shm`.
    pub const TRANSPORT: &str = "llm.Tandem.Transport";
    /// Tandem: shared secret checked in the link handshake.
    pub const AUTH_TOKEN: &str = "llm.Tandem.AuthToken";
    /// Tandem: parallel TCP streams per link direction for large transfers.
    pub const TCP_STREAMS: &str = "llm.Tandem.TcpStreams";
}

fn bool_str(b: bool) -> &'static str {
    if b {
        "1"
    } else {
        "0"
    }
}

fn check_json(what: &str, s: &str) -> Result<()> {
    if !s.is_empty() {
        serde_json::from_str::<serde_json::Value>(s)
            .map_err(|e| LlmException::param(format!("{what} is not valid JSON: {e}")))?;
    }
    Ok(())
}

/// Builder for `init`'s options with the reference's properties and checks.
#[derive(Debug, Clone)]
pub struct LlmConfig {
    device_id: Option<Vec<i32>>,
    listen_ip_info: String,
    sync_kv_timeout: Option<i32>,
    enable_cache_manager: Option<bool>,
    enable_remote_cache_accessible: Option<bool>,
    local_comm_res: Option<String>,
    mem_pool_cfg: String,
    host_mem_pool_cfg: String,
    rdma_traffic_class: Option<u32>,
    rdma_service_level: Option<u32>,
    link_total_time: Option<u32>,
    link_retry_count: Option<u32>,
    transfer_backend: Option<String>,
    global_resource_config: Option<String>,
    enable_switch_role: bool,
    ge_options: Options,
    buf_pool_cfg: String,
    mem_utilization: f64,
    deploy_res_path: String,
    cluster_info: String,
    output_max_size: Option<i64>,
    transport: Option<String>,
    auth_token: Option<String>,
    tcp_streams: Option<u32>,
    options: Options,
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            device_id: None,
            listen_ip_info: String::new(),
            sync_kv_timeout: None,
            enable_cache_manager: None,
            enable_remote_cache_accessible: None,
            local_comm_res: None,
            mem_pool_cfg: String::new(),
            host_mem_pool_cfg: String::new(),
            rdma_traffic_class: None,
            rdma_service_level: None,
            link_total_time: None,
            link_retry_count: None,
            transfer_backend: None,
            global_resource_config: None,
            enable_switch_role: false,
            ge_options: Options::new(),
            buf_pool_cfg: String::new(),
            mem_utilization: 0.95,
            deploy_res_path: String::new(),
            cluster_info: String::new(),
            output_max_size: None,
            transport: None,
            auth_token: None,
            tcp_streams: None,
            options: Options::new(),
        }
    }
}

impl LlmConfig {
    /// A config with every property unset.
    pub fn new() -> Self {
        Self::default()
    }

    /// One device id (>= 0).
    pub fn set_device_id(&mut self, id: i32) -> Result<()> {
        self.set_device_ids(&[id])
    }

    /// Several device ids (v1's multi-device form; v2 uses one).
    pub fn set_device_ids(&mut self, ids: &[i32]) -> Result<()> {
        if ids.is_empty() {
            param_invalid!("device_id list is empty");
        }
        if let Some(id) = ids.iter().find(|&&i| i < 0) {
            param_invalid!("device_id must be >= 0, got {id}");
        }
        self.device_id = Some(ids.to_vec());
        Ok(())
    }

    /// The device ids, if set.
    pub fn device_id(&self) -> Option<&[i32]> {
        self.device_id.as_deref()
    }

    /// `ip:port` to listen on; makes this instance a server.
    pub fn set_listen_ip_info(&mut self, info: impl Into<String>) {
        self.listen_ip_info = info.into();
    }

    /// The listen address ("" when unset).
    pub fn listen_ip_info(&self) -> &str {
        &self.listen_ip_info
    }

    /// Transfer timeout in ms (> 0).
    pub fn set_sync_kv_timeout(&mut self, ms: i32) -> Result<()> {
        if ms <= 0 {
            param_invalid!("sync_kv_timeout must be > 0, got {ms}");
        }
        self.sync_kv_timeout = Some(ms);
        Ok(())
    }

    /// The transfer timeout, if set.
    pub fn sync_kv_timeout(&self) -> Option<i32> {
        self.sync_kv_timeout
    }

    /// Selects CacheManager (v2) mode.
    pub fn set_enable_cache_manager(&mut self, on: bool) {
        self.enable_cache_manager = Some(on);
    }

    /// Whether CacheManager mode was set.
    pub fn enable_cache_manager(&self) -> Option<bool> {
        self.enable_cache_manager
    }

    /// Remote cache metadata caching (required for push).
    pub fn set_enable_remote_cache_accessible(&mut self, on: bool) {
        self.enable_remote_cache_accessible = Some(on);
    }

    /// Whether remote cache access was set.
    pub fn enable_remote_cache_accessible(&self) -> Option<bool> {
        self.enable_remote_cache_accessible
    }

    /// Local communication resources (JSON or ""); implies CacheManager mode.
    pub fn set_local_comm_res(&mut self, res: impl Into<String>) -> Result<()> {
        let res = res.into();
        check_json("local_comm_res", &res)?;
        self.local_comm_res = Some(res);
        Ok(())
    }

    /// Device pool, `{"memory_size": bytes, "page_shift": n}`.
    pub fn set_mem_pool_cfg(&mut self, cfg: impl Into<String>) -> Result<()> {
        let cfg = cfg.into();
        check_json("mem_pool_cfg", &cfg)?;
        self.mem_pool_cfg = cfg;
        Ok(())
    }

    /// Host pool, same format.
    pub fn set_host_mem_pool_cfg(&mut self, cfg: impl Into<String>) -> Result<()> {
        let cfg = cfg.into();
        check_json("host_mem_pool_cfg", &cfg)?;
        self.host_mem_pool_cfg = cfg;
        Ok(())
    }

    /// RDMA traffic class (0..=255, multiple of 4).
    pub fn set_rdma_traffic_class(&mut self, tc: u32) -> Result<()> {
        if tc > 255 || !tc.is_multiple_of(4) {
            param_invalid!("rdma_traffic_class must be 0..=255 and a multiple of 4, got {tc}");
        }
        self.rdma_traffic_class = Some(tc);
        Ok(())
    }

    /// RDMA service level (0..=7).
    pub fn set_rdma_service_level(&mut self, sl: u32) -> Result<()> {
        if sl > 7 {
            param_invalid!("rdma_service_level must be 0..=7, got {sl}");
        }
        self.rdma_service_level = Some(sl);
        Ok(())
    }

    /// Link establishment timeout in seconds (0 = default).
    pub fn set_link_total_time(&mut self, seconds: u32) {
        self.link_total_time = Some(seconds);
    }

    /// The link timeout (0 when unset).
    pub fn link_total_time(&self) -> u32 {
        self.link_total_time.unwrap_or(0)
    }

    /// Link retries (1..=100).
    pub fn set_link_retry_count(&mut self, n: u32) -> Result<()> {
        if !(1..=100).contains(&n) {
            param_invalid!("link_retry_count must be in [1, 100], got {n}");
        }
        self.link_retry_count = Some(n);
        Ok(())
    }

    /// Link retries (1 when unset).
    pub fn link_retry_count(&self) -> u32 {
        self.link_retry_count.unwrap_or(1)
    }

    /// Transfer backend name (`hixl`).
    pub fn set_transfer_backend(&mut self, backend: impl Into<String>) {
        self.transfer_backend = Some(backend.into());
    }

    /// HIXL resource config JSON.
    pub fn set_global_resource_config(&mut self, cfg: impl Into<String>) -> Result<()> {
        let cfg = cfg.into();
        check_json("global_resource_config", &cfg)?;
        self.global_resource_config = Some(cfg);
        Ok(())
    }

    /// Allows `switch_role`.
    pub fn set_enable_switch_role(&mut self, on: bool) {
        self.enable_switch_role = on;
    }

    /// Whether `switch_role` is allowed.
    pub fn enable_switch_role(&self) -> bool {
        self.enable_switch_role
    }

    /// Extra raw options, emitted first (explicit properties override them).
    pub fn set_ge_options(&mut self, options: Options) {
        self.ge_options = options;
    }

    /// v1 memory tiers JSON.
    pub fn set_buf_pool_cfg(&mut self, cfg: impl Into<String>) -> Result<()> {
        let cfg = cfg.into();
        check_json("buf_pool_cfg", &cfg)?;
        self.buf_pool_cfg = cfg;
        Ok(())
    }

    /// v1 pool utilization in [0, 1].
    pub fn set_mem_utilization(&mut self, u: f64) -> Result<()> {
        if !(0.0..=1.0).contains(&u) {
            param_invalid!("mem_utilization must be in [0.0, 1.0], got {u}");
        }
        self.mem_utilization = u;
        Ok(())
    }

    /// v1 internal resource path.
    pub fn set_deploy_res_path(&mut self, path: impl Into<String>) {
        self.deploy_res_path = path.into();
    }

    /// v1 cluster info JSON.
    pub fn set_cluster_info(&mut self, info: impl Into<String>) -> Result<()> {
        let info = info.into();
        check_json("cluster_info", &info)?;
        self.cluster_info = info;
        Ok(())
    }

    /// v1 output size.
    pub fn set_output_max_size(&mut self, size: i64) {
        self.output_max_size = Some(size);
    }

    /// Tandem: transport selection, `auto`, `tcp` or `shm`.
    pub fn set_transport(&mut self, transport: &str) -> Result<()> {
        crate::transport::TransportKind::parse(transport)?;
        self.transport = Some(transport.to_string());
        Ok(())
    }

    /// Tandem: shared secret that peers must present when linking.
    pub fn set_auth_token(&mut self, token: impl Into<String>) {
        self.auth_token = Some(token.into());
    }

    /// Tandem: parallel TCP streams per link direction (1..=16).
    pub fn set_tcp_streams(&mut self, n: u32) -> Result<()> {
        if !(1..=16).contains(&n) {
            param_invalid!("tcp streams must be in [1, 16], got {n}");
        }
        self.tcp_streams = Some(n);
        Ok(())
    }

    /// `local_comm_res`, if set.
    pub fn local_comm_res(&self) -> Option<&str> {
        self.local_comm_res.as_deref()
    }

    /// `mem_pool_cfg` ("" when unset).
    pub fn mem_pool_cfg(&self) -> &str {
        &self.mem_pool_cfg
    }

    /// `host_mem_pool_cfg` ("" when unset).
    pub fn host_mem_pool_cfg(&self) -> &str {
        &self.host_mem_pool_cfg
    }

    /// `rdma_traffic_class`, if set.
    pub fn rdma_traffic_class(&self) -> Option<u32> {
        self.rdma_traffic_class
    }

    /// `rdma_service_level`, if set.
    pub fn rdma_service_level(&self) -> Option<u32> {
        self.rdma_service_level
    }

    /// `transfer_backend`, if set.
    pub fn transfer_backend(&self) -> Option<&str> {
        self.transfer_backend.as_deref()
    }

    /// `global_resource_config`, if set.
    pub fn global_resource_config(&self) -> Option<&str> {
        self.global_resource_config.as_deref()
    }

    /// Extra GE options.
    pub fn ge_options(&self) -> &Options {
        &self.ge_options
    }

    /// `buf_pool_cfg` ("" when unset).
    pub fn buf_pool_cfg(&self) -> &str {
        &self.buf_pool_cfg
    }

    /// `mem_utilization` (0.95 by default).
    pub fn mem_utilization(&self) -> f64 {
        self.mem_utilization
    }

    /// `deploy_res_path` ("" when unset).
    pub fn deploy_res_path(&self) -> &str {
        &self.deploy_res_path
    }

    /// `cluster_info` ("" when unset).
    pub fn cluster_info(&self) -> &str {
        &self.cluster_info
    }

    /// `output_max_size`, if set.
    pub fn output_max_size(&self) -> Option<i64> {
        self.output_max_size
    }

    /// Tandem: the transport, if set.
    pub fn transport(&self) -> Option<&str> {
        self.transport.as_deref()
    }

    /// Tandem: the link token, if set.
    pub fn auth_token(&self) -> Option<&str> {
        self.auth_token.as_deref()
    }

    /// Tandem: parallel TCP streams, if set.
    pub fn tcp_streams(&self) -> Option<u32> {
        self.tcp_streams
    }

    /// The accumulated options.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Merges every set property into the accumulated options and returns them.
    pub fn generate_options(&mut self) -> Options {
        let o = &mut self.options;
        for (k, v) in self.ge_options.iter() {
            o.set(k, v);
        }
        if let Some(ids) = &self.device_id {
            let joined: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
            o.set(keys::DEVICE_ID, joined.join(";"));
            o.set(keys::SESSION_DEVICE_ID, ids[0].to_string());
        }
        if let Some(ms) = self.sync_kv_timeout {
            o.set(keys::SYNC_KV_TIMEOUT, ms.to_string());
        }
        let non_empty = |o: &mut Options, key: &str, v: &str| {
            if !v.is_empty() {
                o.set(key, v);
            }
        };
        non_empty(o, keys::DEPLOY_RES_PATH, &self.deploy_res_path);
        non_empty(o, keys::BUF_POOL_CFG, &self.buf_pool_cfg);
        non_empty(o, keys::MEM_POOL_CFG, &self.mem_pool_cfg);
        non_empty(o, keys::HOST_MEM_POOL_CFG, &self.host_mem_pool_cfg);
        if let Some(b) = self.enable_cache_manager {
            o.set(keys::ENABLE_CACHE_MANAGER, bool_str(b));
        }
        if let Some(b) = self.enable_remote_cache_accessible {
            o.set(keys::ENABLE_REMOTE_CACHE_ACCESSIBLE, bool_str(b));
        }
        non_empty(o, keys::LISTEN_IP_INFO, &self.listen_ip_info);
        if let Some(t) = self.link_total_time {
            o.set(keys::LINK_TOTAL_TIME, t.to_string());
        }
        if let Some(n) = self.link_retry_count {
            o.set(keys::LINK_RETRY_COUNT, n.to_string());
        }
        if let Some(tc) = self.rdma_traffic_class {
            o.set(keys::RDMA_TRAFFIC_CLASS, tc.to_string());
        }
        if let Some(sl) = self.rdma_service_level {
            o.set(keys::RDMA_SERVICE_LEVEL, sl.to_string());
        }
        if let Some(res) = &self.local_comm_res {
            o.set(keys::LOCAL_COMM_RES, res.as_str());
        }
        if let Some(b) = &self.transfer_backend {
            o.set(keys::TRANSFER_BACKEND, b.as_str());
        }
        if let Some(c) = &self.global_resource_config {
            o.set(keys::GLOBAL_RESOURCE_CONFIG, c.as_str());
        }
        non_empty(o, keys::CLUSTER_INFO, &self.cluster_info);
        if let Some(s) = self.output_max_size {
            o.set(keys::OUTPUT_MAX_SIZE, s.to_string());
        }
        if self.enable_switch_role {
            o.set(keys::ENABLE_SWITCH_ROLE, "1");
        }
        o.set(keys::MEMORY_UTILIZATION, self.mem_utilization.to_string());
        if let Some(t) = &self.transport {
            o.set(keys::TRANSPORT, t.as_str());
        }
        if let Some(t) = &self.auth_token {
            o.set(keys::AUTH_TOKEN, t.as_str());
        }
        if let Some(n) = self.tcp_streams {
            o.set(keys::TCP_STREAMS, n.to_string());
        }
        self.options.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emits_reference_keys_in_order() {
        let mut cfg = LlmConfig::new();
        cfg.set_device_id(3).unwrap();
        cfg.set_enable_cache_manager(true);
        cfg.set_listen_ip_info("127.0.0.1:26000");
        cfg.set_sync_kv_timeout(20000).unwrap();
        cfg.set_enable_switch_role(true);
        cfg.set_ge_options([("ge.flowGraphMemMaxSize", "1024")].into_iter().collect());
        let o = cfg.generate_options();
        let keys: Vec<&str> = o.iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "ge.flowGraphMemMaxSize",
                "ge.exec.deviceId",
                "ge.session_device_id",
                "llm.SyncKvCacheWaitTime",
                "llm.EnableCacheManager",
                "llm.listenIpInfo",
                "llm.EnableSwitchRole",
                "llm.MemoryUtilization",
            ]
        );
        assert_eq!(o.get("ge.exec.deviceId"), Some("3"));
        assert_eq!(o.get("llm.EnableCacheManager"), Some("1"));
        assert_eq!(o.get("llm.MemoryUtilization"), Some("0.95"));
        cfg.set_device_ids(&[0, 1]).unwrap();
        assert_eq!(cfg.generate_options().get("ge.exec.deviceId"), Some("0;1"));
    }

    #[test]
    fn setters_validate() {
        let mut cfg = LlmConfig::new();
        assert!(cfg.set_device_id(-1).is_err());
        assert!(cfg.set_sync_kv_timeout(0).is_err());
        assert!(cfg.set_link_retry_count(0).is_err());
        assert!(cfg.set_link_retry_count(101).is_err());
        assert!(cfg.set_mem_utilization(1.5).is_err());
        assert!(cfg.set_mem_pool_cfg("{not json").is_err());
        assert!(cfg.set_rdma_traffic_class(130).is_err());
        assert!(cfg.set_rdma_service_level(8).is_err());
        assert!(cfg.set_transport("udp").is_err());
        let code = cfg.set_device_id(-1).unwrap_err().status_code;
        assert_eq!(code, crate::LlmStatusCode::LlmParamInvalid);
        // local_comm_res "" is emitted even when empty.
        cfg.set_local_comm_res("").unwrap();
        assert_eq!(cfg.generate_options().get("llm.LocalCommRes"), Some(""));
    }
}
