//! # llm-datadist
//!
//! A KV-cache transfer library with the API of Huawei's LLM-DataDist v2 (CacheManager mode),
//! in Rust naming, over transports that run on ordinary hosts: TCP (several streams per link
//! for large transfers), shared memory for peers on the same host (chosen automatically), and
//! in-process pipes for tests.
//!
//! ```text
//! prefill (server, listens)                   decode (client)
//!   LlmDataDist::new(Prompt, P).init(..)        LlmDataDist::new(Decoder, D).init(..)
//!   cm.register_blocks_cache(desc, addrs,       cm.register_blocks_cache(.., BlocksCacheKey(D, 0))
//!       BlocksCacheKey(P, 0))                   link_clusters([P at ip:port])
//!                                               cm.pull_blocks(BlocksCacheKey(P, 0), cache,
//!                                                   p_blocks, d_blocks)
//! ```
//!
//! Once linked, either side can pull from and push to the other. Every frame from a peer is
//! validated (lengths, tensor indices and block ids in range, sizes matching the registered
//! caches); a bad frame drops that link with an error status. This crate knows nothing of
//! models or engines.

mod cache;
mod cache_manager;
pub mod comm;
pub mod config;
mod core;
mod datadist;
mod keys;
mod link;
mod memory;
mod options;
mod protocol;
mod status;
mod transfer;
pub mod transport;
mod types;

pub use cache::{Cache, MAX_REGISTERED_ADDRS};
pub use cache_manager::{CacheManager, LayerRanges};
pub use config::{LlmConfig, Options};
pub use datadist::LlmDataDist;
pub use keys::{
    int_to_ip, ip_to_int, AnyCacheKey, BlocksCacheKey, CacheKey, CacheKeyByIdAndIndex,
    LlmClusterInfo, UINT64_MAX,
};
pub use memory::{MemoryPool, PoolBuffer, PoolConfig};
pub use options::{DEFAULT_SYNC_KV_TIMEOUT_MS, DEFAULT_TCP_STREAMS};
pub use status::{LlmException, LlmStatusCode, Result};
pub use transfer::{
    CacheTask, LayerSynchronizer, TransferConfig, TransferKey, TransferTarget,
    TransferWithCacheKeyConfig,
};
pub use transport::TransportKind;
pub use types::{CacheDesc, DataType, LlmRole, MemInfo, MemType, Placement, RegisterMemStatus};
