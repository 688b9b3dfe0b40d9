//! Caches: the public `Cache` handle, the owner-side table of registered and allocated caches
//! with their key bindings, and the byte segments a transfer touches.

use std::collections::HashMap;
use std::sync::Arc;

use crate::keys::SlotKey;
use crate::memory::PoolBuffer;
use crate::status::{param_invalid, LlmException, LlmStatusCode, Result};
use crate::types::{CacheDesc, Placement};

/// Most addresses registered at once over all caches, as in the reference.
pub const MAX_REGISTERED_ADDRS: usize = 240;

/// A contiguous byte range of cache memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub addr: u64,
    pub len: u64,
}

/// Total bytes of `segs`.
pub(crate) fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

/// A cache created by the `CacheManager` (or [`Cache::create_cpu_cache`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cache {
    cache_id: i64,
    cache_desc: CacheDesc,
    tensor_addrs: Vec<u64>,
    is_blocks_cache: bool,
}

impl Cache {
    pub(crate) fn from_entry(e: &CacheEntry) -> Self {
        Self {
            cache_id: e.id,
            cache_desc: e.desc.clone(),
            tensor_addrs: e.addrs.clone(),
            is_blocks_cache: e.is_blocks,
        }
    }

    /// Wraps user host memory as a blocks cache for `swap_blocks` (id -1, not registered).
    ///
    /// # Safety
    /// Each address must point to `cache_desc.size()` bytes that stay valid, and are not
    /// accessed concurrently, for as long as the cache is used in `swap_blocks`.
    pub unsafe fn create_cpu_cache(cache_desc: CacheDesc, addrs: Vec<u64>) -> Result<Self> {
        cache_desc.validate()?;
        if cache_desc.placement != Placement::Host {
            param_invalid!("create_cpu_cache needs Placement::Host");
        }
        if addrs.len() != cache_desc.num_tensors as usize || addrs.contains(&0) {
            param_invalid!(
                "create_cpu_cache needs {} non-zero addresses, got {:?}",
                cache_desc.num_tensors,
                addrs
            );
        }
        Ok(Self {
            cache_id: -1,
            cache_desc,
            tensor_addrs: addrs,
            is_blocks_cache: true,
        })
    }

    /// The cache id (from 1; -1 for CPU caches).
    pub fn cache_id(&self) -> i64 {
        self.cache_id
    }

    /// The description.
    pub fn cache_desc(&self) -> &CacheDesc {
        &self.cache_desc
    }

    /// One address per tensor; empty after deallocation.
    pub fn tensor_addrs(&self) -> &[u64] {
        &self.tensor_addrs
    }

    /// Whether the cache was created by a blocks API.
    pub fn is_blocks_cache(&self) -> bool {
        self.is_blocks_cache
    }

    pub(crate) fn clear_addrs(&mut self) {
        self.tensor_addrs.clear();
    }
}

/// Where a cache's memory comes from.
pub(crate) enum Backing {
    /// User memory; `remote_accessible` says whether peers may read or write it.
    Registered { remote_accessible: bool },
    /// Pool memory, freed when the last reference (id or key) goes.
    Allocated(#[allow(dead_code)] Vec<PoolBuffer>),
}

/// Owner-side record of one cache.
pub(crate) struct CacheEntry {
    pub id: i64,
    pub desc: CacheDesc,
    pub addrs: Vec<u64>,
    pub is_blocks: bool,
    pub backing: Backing,
}

impl CacheEntry {
    pub fn remote_accessible(&self) -> bool {
        match self.backing {
            Backing::Registered { remote_accessible } => remote_accessible,
            Backing::Allocated(_) => true,
        }
    }

    pub fn is_allocated(&self) -> bool {
        matches!(self.backing, Backing::Allocated(_))
    }

    fn tensor(&self, t: u32) -> Result<u64> {
        match self.addrs.get(t as usize) {
            Some(&a) => Ok(a),
            None => param_invalid!(
                "tensor index {t} out of range for cache {} with {} tensors",
                self.id,
                self.addrs.len()
            ),
        }
    }

    /// Bytes `[offset, offset + size)` of batch slot `batch` in each of `tensors`.
    pub fn slot_segments(
        &self,
        tensors: &[u32],
        batch: u64,
        offset: u64,
        size: u64,
    ) -> Result<Vec<Segment>> {
        let slot = self.desc.slot_size();
        if batch >= self.desc.batch_size() {
            return Err(LlmException::new(
                LlmStatusCode::LlmKvCacheNotExist,
                format!(
                    "batch index {batch} out of range for cache {} (batch size {})",
                    self.id,
                    self.desc.batch_size()
                ),
            ));
        }
        if tensors.len() > self.addrs.len() {
            param_invalid!(
                "{} tensors named for cache {} of {}",
                tensors.len(),
                self.id,
                self.addrs.len()
            );
        }
        if size == 0 || offset.checked_add(size).is_none_or(|end| end > slot) {
            param_invalid!(
                "range [{offset}, {offset}+{size}) does not fit a slot of {slot} bytes of cache {}",
                self.id
            );
        }
        tensors
            .iter()
            .map(|&t| {
                Ok(Segment {
                    addr: self.tensor(t)? + batch * slot + offset,
                    len: size,
                })
            })
            .collect()
    }

    /// Whole blocks `blocks` of each of `tensors`. A request may name each (tensor, block)
    /// at most as many times as the cache has of them, so a hostile peer's repeated ids cannot
    /// make this allocate beyond the cache's own size.
    pub fn block_segments(&self, tensors: &[u32], blocks: &[u64]) -> Result<Vec<Segment>> {
        let block = self.desc.slot_size();
        let n = self.desc.batch_size();
        let limit = self.addrs.len() as u64 * n;
        if (tensors.len() as u64).saturating_mul(blocks.len() as u64) > limit {
            param_invalid!(
                "{} tensors x {} blocks exceed cache {} ({} tensors x {n} blocks)",
                tensors.len(),
                blocks.len(),
                self.id,
                self.addrs.len()
            );
        }
        if let Some(b) = blocks.iter().find(|&&b| b >= n) {
            param_invalid!(
                "block id {b} out of range for cache {} with {n} blocks",
                self.id
            );
        }
        let mut segs = Vec::with_capacity(tensors.len() * blocks.len());
        for &t in tensors {
            let base = self.tensor(t)?;
            segs.extend(blocks.iter().map(|&b| Segment {
                addr: base + b * block,
                len: block,
            }));
        }
        Ok(segs)
    }

    /// Whether `[addr, addr + len)` lies inside one tensor of this cache.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        let size = self.desc.size();
        self.addrs
            .iter()
            .any(|&a| addr >= a && addr.checked_add(len).is_some_and(|end| end <= a + size))
    }
}

/// A batch slot bound to a key.
#[derive(Clone)]
pub(crate) struct SlotBinding {
    pub entry: Arc<CacheEntry>,
    pub batch: u32,
}

/// All caches of one instance, and the keys peers address them by.
#[derive(Default)]
pub(crate) struct CacheTable {
    next_id: i64,
    pub by_id: HashMap<i64, Arc<CacheEntry>>,
    pub slots: HashMap<SlotKey, SlotBinding>,
    pub blocks: HashMap<u64, Arc<CacheEntry>>,
}

impl CacheTable {
    /// Registers `entry` (its id is assigned here) and returns it.
    pub fn insert(&mut self, mut entry: CacheEntry) -> Result<Arc<CacheEntry>> {
        if matches!(entry.backing, Backing::Registered { .. }) {
            let registered: usize = self
                .by_id
                .values()
                .filter(|e| !e.is_allocated())
                .map(|e| e.addrs.len())
                .sum();
            if registered + entry.addrs.len() > MAX_REGISTERED_ADDRS {
                param_invalid!(
                    "at most {MAX_REGISTERED_ADDRS} addresses may be registered ({registered} already)"
                );
            }
        }
        self.next_id += 1;
        entry.id = self.next_id;
        let entry = Arc::new(entry);
        self.by_id.insert(entry.id, entry.clone());
        Ok(entry)
    }

    /// Binds key `i` of `keys` to slot `i` of `entry` (padding `None`s skipped; last wins).
    pub fn bind_slots(&mut self, entry: &Arc<CacheEntry>, keys: &[Option<SlotKey>]) {
        for (i, k) in keys.iter().enumerate() {
            let Some(k) = *k else { continue };
            self.slots.insert(
                k,
                SlotBinding {
                    entry: entry.clone(),
                    batch: i as u32,
                },
            );
        }
    }

    /// Drops every key that points at cache `id`.
    pub fn unbind_cache(&mut self, id: i64) {
        self.slots.retain(|_, b| b.entry.id != id);
        self.blocks.retain(|_, e| e.id != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::DataType;

    fn entry() -> CacheEntry {
        CacheEntry {
            id: 1,
            desc: CacheDesc::new(2, vec![4, 8], DataType::DtUint8).unwrap(),
            addrs: vec![4096, 8192],
            is_blocks: true,
            backing: Backing::Registered {
                remote_accessible: true,
            },
        }
    }

    #[test]
    fn segment_requests_are_bounded_by_the_cache() {
        let e = entry();
        assert_eq!(e.block_segments(&[0, 1], &[3, 0, 2, 1]).unwrap().len(), 8);
        // Repeated ids beyond the cache's size (a hostile list) are refused before allocating.
        assert!(e.block_segments(&[0; 1000], &[0; 1000]).is_err());
        assert!(e.block_segments(&[0], &[4]).is_err());
        assert!(e.block_segments(&[2], &[0]).is_err());
        assert!(e.slot_segments(&[0, 1, 0], 0, 0, 8).is_err());
        assert!(e.slot_segments(&[0], 4, 0, 8).is_err());
        assert!(e.slot_segments(&[0], 0, 4, 5).is_err());
        assert_eq!(
            e.slot_segments(&[1], 2, 2, 6).unwrap(),
            vec![Segment {
                addr: 8192 + 16 + 2,
                len: 6
            }]
        );
    }
}
