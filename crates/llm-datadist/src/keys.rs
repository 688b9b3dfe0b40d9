//! The three cache key types and peer descriptions (`CacheKey`, `CacheKeyByIdAndIndex`,
//! `BlocksCacheKey`, `LLMClusterInfo`).

use std::net::{Ipv4Addr, SocketAddrV4};

use crate::status::{param_invalid, Result};
use crate::types::LlmRole;

/// The "invalid id" sentinel used everywhere.
pub const UINT64_MAX: u64 = u64::MAX;

/// Names a batch slot of a contiguous cache by request id (or shared-prefix id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// On pull: the owner's cluster id. Ignored when binding keys at registration.
    pub cluster_id: u64,
    /// Request id, or `UINT64_MAX` when the key names a prefix.
    pub req_id: u64,
    /// Model id (distinguishes several caches of one request).
    pub model_id: u64,
    /// Prefix id, or `UINT64_MAX`.
    pub prefix_id: u64,
}

impl CacheKey {
    /// `CacheKey(cluster_id, req_id)` with model 0 and no prefix.
    pub fn new(cluster_id: u64, req_id: u64) -> Self {
        Self {
            cluster_id,
            req_id,
            model_id: 0,
            prefix_id: UINT64_MAX,
        }
    }

    /// A key naming shared prefix `prefix_id` (req_id left invalid).
    pub fn prefix(cluster_id: u64, prefix_id: u64) -> Self {
        Self {
            cluster_id,
            req_id: UINT64_MAX,
            model_id: 0,
            prefix_id,
        }
    }

    /// Same key with `model_id`.
    pub fn with_model(mut self, model_id: u64) -> Self {
        self.model_id = model_id;
        self
    }

    /// Alias of `cluster_id`, as the reference names it on the decoder side.
    pub fn prompt_cluster_id(&self) -> u64 {
        self.cluster_id
    }

    /// The owner-side index: exactly one of req_id / prefix_id must be valid.
    pub(crate) fn slot_key(&self) -> Result<SlotKey> {
        match (self.req_id != UINT64_MAX, self.prefix_id != UINT64_MAX) {
            (true, false) => Ok(SlotKey::Request {
                req_id: self.req_id,
                model_id: self.model_id,
            }),
            (false, true) => Ok(SlotKey::Prefix {
                prefix_id: self.prefix_id,
                model_id: self.model_id,
            }),
            _ => param_invalid!(
                "cache key must have exactly one valid id of req_id ({}) and prefix_id ({})",
                self.req_id,
                self.prefix_id
            ),
        }
    }
}

/// Names a remote cache directly by its cache id and batch slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKeyByIdAndIndex {
    /// The owner's cluster id.
    pub cluster_id: u64,
    /// The owner's cache id.
    pub cache_id: i64,
    /// Batch slot in that cache.
    pub batch_index: u32,
}

impl CacheKeyByIdAndIndex {
    /// A key for slot `batch_index` of cache `cache_id` on `cluster_id`.
    pub fn new(cluster_id: u64, cache_id: i64, batch_index: u32) -> Self {
        Self {
            cluster_id,
            cache_id,
            batch_index,
        }
    }
}

/// Names the blocks cache of `model_id` on a node (one per node and model id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlocksCacheKey {
    /// The owner's cluster id.
    pub cluster_id: u64,
    /// Model id.
    pub model_id: u64,
}

impl BlocksCacheKey {
    /// `BlocksCacheKey(cluster_id, model_id)`.
    pub fn new(cluster_id: u64, model_id: u64) -> Self {
        Self {
            cluster_id,
            model_id,
        }
    }

    /// Alias of `cluster_id`.
    pub fn prompt_cluster_id(&self) -> u64 {
        self.cluster_id
    }
}

/// Any of the three keys, as the pull APIs accept them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnyCacheKey {
    /// By request or prefix id.
    Key(CacheKey),
    /// By cache id and slot.
    ById(CacheKeyByIdAndIndex),
    /// A blocks cache.
    Blocks(BlocksCacheKey),
}

impl AnyCacheKey {
    /// The owner's cluster id.
    pub fn cluster_id(&self) -> u64 {
        match self {
            Self::Key(k) => k.cluster_id,
            Self::ById(k) => k.cluster_id,
            Self::Blocks(k) => k.cluster_id,
        }
    }
}

impl From<CacheKey> for AnyCacheKey {
    fn from(k: CacheKey) -> Self {
        Self::Key(k)
    }
}
impl From<CacheKeyByIdAndIndex> for AnyCacheKey {
    fn from(k: CacheKeyByIdAndIndex) -> Self {
        Self::ById(k)
    }
}
impl From<BlocksCacheKey> for AnyCacheKey {
    fn from(k: BlocksCacheKey) -> Self {
        Self::Blocks(k)
    }
}

/// Owner-side index of a contiguous slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum SlotKey {
    Request { req_id: u64, model_id: u64 },
    Prefix { prefix_id: u64, model_id: u64 },
}

/// Encodes a dotted IPv4 address as the reference does: the little-endian integer of its four
/// bytes (`"a.b.c.d"` -> `a | b<<8 | c<<16 | d<<24`).
pub fn ip_to_int(ip: &str) -> Result<u32> {
    match ip.parse::<Ipv4Addr>() {
        Ok(addr) => Ok(u32::from_le_bytes(addr.octets())),
        Err(_) => param_invalid!("cannot parse ip {ip:?} (dotted IPv4 expected)"),
    }
}

/// Inverse of [`ip_to_int`].
pub fn int_to_ip(ip: u32) -> Ipv4Addr {
    Ipv4Addr::from(ip.to_le_bytes())
}

/// Description of one peer for `link_clusters` / `unlink_clusters`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LlmClusterInfo {
    /// The peer's cluster id.
    pub remote_cluster_id: u64,
    /// Accepted and not used, as in the reference.
    pub remote_role_type: Option<LlmRole>,
    local_ip_info: Vec<(u32, u16)>,
    remote_ip_info: Vec<(u32, u16)>,
}

impl LlmClusterInfo {
    /// An empty description of peer `remote_cluster_id`.
    pub fn new(remote_cluster_id: u64) -> Self {
        Self {
            remote_cluster_id,
            ..Self::default()
        }
    }

    /// Adds a local address (the port is not used).
    pub fn append_local_ip_info(&mut self, ip: &str, port: u16) -> Result<()> {
        self.local_ip_info.push((ip_to_int(ip)?, port));
        Ok(())
    }

    /// Adds the peer's listen address.
    pub fn append_remote_ip_info(&mut self, ip: &str, port: u16) -> Result<()> {
        self.remote_ip_info.push((ip_to_int(ip)?, port));
        Ok(())
    }

    /// Adds a local address already encoded as an integer.
    pub fn append_local_ip_int(&mut self, ip: u32, port: u16) {
        self.local_ip_info.push((ip, port));
    }

    /// Adds a remote address already encoded as an integer.
    pub fn append_remote_ip_int(&mut self, ip: u32, port: u16) {
        self.remote_ip_info.push((ip, port));
    }

    /// Local addresses as `(ip_int, port)`.
    pub fn local_ip_info_list(&self) -> &[(u32, u16)] {
        &self.local_ip_info
    }

    /// Remote addresses as `(ip_int, port)`.
    pub fn remote_ip_info_list(&self) -> &[(u32, u16)] {
        &self.remote_ip_info
    }

    /// The single remote listen address, if exactly one was given.
    pub(crate) fn remote_addr(&self) -> Option<SocketAddrV4> {
        match self.remote_ip_info.as_slice() {
            [(ip, port)] => Some(SocketAddrV4::new(int_to_ip(*ip), *port)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_encoding_is_little_endian() {
        assert_eq!(
            ip_to_int("1.2.3.4").unwrap(),
            1 | 2 << 8 | 3 << 16 | 4 << 24
        );
        assert_eq!(
            int_to_ip(ip_to_int("127.0.0.1").unwrap()).to_string(),
            "127.0.0.1"
        );
        assert!(ip_to_int("localhost").is_err());
    }

    #[test]
    fn cache_key_needs_one_id() {
        assert!(CacheKey::new(1, 5).slot_key().is_ok());
        assert!(CacheKey::prefix(1, 5).slot_key().is_ok());
        assert!(CacheKey::new(1, UINT64_MAX).slot_key().is_err());
        let both = CacheKey {
            prefix_id: 3,
            ..CacheKey::new(1, 5)
        };
        assert!(both.slot_key().is_err());
    }
}
