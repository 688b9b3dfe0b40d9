//! `init`'s option map parsed and checked into typed settings.

use std::time::Duration;

use crate::config::{keys, Options};
use crate::memory::PoolConfig;
use crate::status::{param_invalid, LlmException, LlmStatusCode, Result};
use crate::transport::TransportKind;

/// Default `sync_kv_timeout` (ms), as the native layer has it.
pub const DEFAULT_SYNC_KV_TIMEOUT_MS: u64 = 1000;
/// HCCL's default link-establishment budget (s), used when `llm.LinkTotalTime` is 0 or unset.
pub const DEFAULT_LINK_TOTAL_TIME_S: u64 = 120;
/// Default parallel TCP streams per link direction.
pub const DEFAULT_TCP_STREAMS: usize = 2;

/// Settings of an initialized instance.
#[derive(Debug, Clone)]
pub(crate) struct InitOptions {
    pub device_id: u32,
    pub listen: Option<(String, u16)>,
    pub sync_kv_timeout: Duration,
    pub remote_cache_accessible: bool,
    pub enable_switch_role: bool,
    pub device_pool: Option<PoolConfig>,
    pub host_pool: Option<PoolConfig>,
    pub transport: TransportKind,
    pub auth_token: String,
    pub tcp_streams: usize,
    /// How long two-sided links may take to come up (`llm.LinkTotalTime`, seconds; 0 or unset:
    /// HCCL's default of 120 s).
    pub link_total_time: Duration,
}

/// Parses `"ip:port"` (exactly one colon, numeric port).
pub(crate) fn parse_listen(info: &str) -> Result<(String, u16)> {
    let parts: Vec<&str> = info.split(':').collect();
    let [host, port] = parts.as_slice() else {
        param_invalid!("listen_ip_info {info:?} must be \"ip:port\" with exactly one colon");
    };
    if host.is_empty() {
        param_invalid!("listen_ip_info {info:?} has no host");
    }
    let port: u16 = port
        .parse()
        .map_err(|_| LlmException::param(format!("listen_ip_info {info:?}: bad port")))?;
    Ok((host.to_string(), port))
}

fn flag(o: &Options, key: &str) -> Result<Option<bool>> {
    match o.get(key) {
        None => Ok(None),
        Some("1") => Ok(Some(true)),
        Some("0") => Ok(Some(false)),
        Some(v) => param_invalid!("{key} must be \"0\" or \"1\", got {v:?}"),
    }
}

impl InitOptions {
    /// Applies the reference's checks and defaults.
    pub fn parse(o: &Options) -> Result<Self> {
        let Some(dev) = o.get(keys::DEVICE_ID) else {
            param_invalid!("device_id ({}) is required", keys::DEVICE_ID);
        };
        if dev.contains(';') {
            param_invalid!("CacheManager mode supports one device per process, got {dev:?}");
        }
        let device_id: u32 = dev
            .parse()
            .map_err(|_| LlmException::param(format!("bad device id {dev:?}")))?;
        let local_comm_res = o.contains(keys::LOCAL_COMM_RES);
        let backend = o.get(keys::TRANSFER_BACKEND);
        let cache_manager = flag(o, keys::ENABLE_CACHE_MANAGER)?;
        if local_comm_res && cache_manager == Some(false) {
            param_invalid!("llm.LocalCommRes requires CacheManager mode");
        }
        if !(cache_manager == Some(true) || local_comm_res) {
            return Err(LlmException::new(
                LlmStatusCode::LlmFeatureNotEnabled,
                "init needs CacheManager mode: set enable_cache_manager = True or local_comm_res",
            ));
        }
        let mut remote = flag(o, keys::ENABLE_REMOTE_CACHE_ACCESSIBLE)?;
        if remote.is_none() && (local_comm_res || backend.is_some()) {
            remote = Some(true);
        }
        let listen = o.get(keys::LISTEN_IP_INFO).map(parse_listen).transpose()?;
        if backend.is_some() {
            if remote == Some(false) {
                param_invalid!("llm.TransferBackend needs remote cache access enabled");
            }
            if listen.is_none() {
                param_invalid!("llm.TransferBackend needs llm.listenIpInfo on every side");
            }
        }
        let sync_kv_timeout = match o.get(keys::SYNC_KV_TIMEOUT) {
            None => DEFAULT_SYNC_KV_TIMEOUT_MS,
            Some(v) => match v.parse::<u64>() {
                Ok(ms) if ms > 0 && ms <= i32::MAX as u64 => ms,
                _ => param_invalid!("sync_kv_timeout must be a positive int32, got {v:?}"),
            },
        };
        let pool = |key: &str| o.get(key).map(PoolConfig::parse).transpose();
        let tcp_streams = match o.get(keys::TCP_STREAMS) {
            None => DEFAULT_TCP_STREAMS,
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (1..=16).contains(&n) => n,
                _ => param_invalid!("{} must be in [1, 16], got {v:?}", keys::TCP_STREAMS),
            },
        };
        let link_total_time = match o.get(keys::LINK_TOTAL_TIME) {
            None => 0,
            Some(v) => v.parse::<u32>().map_err(|_| {
                LlmException::param(format!("llm.LinkTotalTime {v:?} is not a uint32"))
            })?,
        };
        Ok(Self {
            device_id,
            link_total_time: Duration::from_secs(match link_total_time {
                0 => DEFAULT_LINK_TOTAL_TIME_S,
                s => s as u64,
            }),
            listen,
            sync_kv_timeout: Duration::from_millis(sync_kv_timeout),
            remote_cache_accessible: remote.unwrap_or(false),
            enable_switch_role: flag(o, keys::ENABLE_SWITCH_ROLE)?.unwrap_or(false),
            device_pool: pool(keys::MEM_POOL_CFG)?,
            host_pool: pool(keys::HOST_MEM_POOL_CFG)?,
            transport: TransportKind::parse(o.get(keys::TRANSPORT).unwrap_or("auto"))?,
            auth_token: o.get(keys::AUTH_TOKEN).unwrap_or("").to_string(),
            tcp_streams,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(kv: &[(&str, &str)]) -> Options {
        kv.iter().copied().collect()
    }

    #[test]
    fn init_rules() {
        let err = |kv: &[(&str, &str)]| InitOptions::parse(&opts(kv)).unwrap_err().status_code;
        assert_eq!(
            err(&[("llm.EnableCacheManager", "1")]),
            LlmStatusCode::LlmParamInvalid
        );
        assert_eq!(
            err(&[("ge.exec.deviceId", "0")]),
            LlmStatusCode::LlmFeatureNotEnabled
        );
        assert_eq!(
            err(&[
                ("ge.exec.deviceId", "0"),
                ("llm.LocalCommRes", ""),
                ("llm.EnableCacheManager", "0")
            ]),
            LlmStatusCode::LlmParamInvalid
        );
        assert_eq!(
            err(&[
                ("ge.exec.deviceId", "0"),
                ("llm.EnableCacheManager", "1"),
                ("llm.listenIpInfo", "1.2.3.4")
            ]),
            LlmStatusCode::LlmParamInvalid
        );
        assert_eq!(
            err(&[
                ("ge.exec.deviceId", "0"),
                ("llm.EnableCacheManager", "1"),
                ("llm.TransferBackend", "hixl")
            ]),
            LlmStatusCode::LlmParamInvalid
        );
        let ok = InitOptions::parse(&opts(&[
            ("ge.exec.deviceId", "0"),
            ("llm.LocalCommRes", ""),
        ]))
        .unwrap();
        assert!(ok.remote_cache_accessible);
        assert_eq!(ok.sync_kv_timeout, Duration::from_millis(1000));
        let ok = InitOptions::parse(&opts(&[
            ("ge.exec.deviceId", "1"),
            ("llm.EnableCacheManager", "1"),
            ("llm.listenIpInfo", "127.0.0.1:26000"),
        ]))
        .unwrap();
        assert_eq!(ok.listen, Some(("127.0.0.1".into(), 26000)));
        assert!(!ok.remote_cache_accessible);
    }
}
