//! `CacheManager`: registering and allocating caches, and moving their bytes: pull and push
//! across links, local copies and host/device swaps.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use crate::cache::{Backing, Cache, CacheEntry, Segment};
use crate::core::Core;
use crate::keys::{AnyCacheKey, BlocksCacheKey, CacheKey, CacheKeyByIdAndIndex, SlotKey};
use crate::link::Dir;
use crate::protocol::{Access, SlotRef, Target};
use crate::status::{param_invalid, LlmException, LlmStatusCode, Result};
use crate::types::{CacheDesc, MemInfo, Placement};

/// Which layers a transfer covers: layer `i` is tensors `[i*N, i*N+N)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRanges {
    /// Source layers (all when None).
    pub src: Option<Range<usize>>,
    /// Destination layers (same as `src` when None).
    pub dst: Option<Range<usize>>,
    /// Tensors per layer (N), 2 for K and V.
    pub tensor_num_per_layer: usize,
}

impl Default for LayerRanges {
    fn default() -> Self {
        Self {
            src: None,
            dst: None,
            tensor_num_per_layer: 2,
        }
    }
}

impl LayerRanges {
    /// Every layer.
    pub fn all() -> Self {
        Self::default()
    }

    /// Source layers `src` to destination layers `dst`.
    pub fn new(src: Range<usize>, dst: Range<usize>) -> Self {
        Self {
            src: Some(src),
            dst: Some(dst),
            tensor_num_per_layer: 2,
        }
    }

    /// Expands to (source tensor indices, destination tensor indices); `local_tensors` bounds
    /// the side given by `local_is_src` (the peer checks its own side).
    pub(crate) fn tensors(
        &self,
        local_tensors: u32,
        local_is_src: bool,
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        let n = self.tensor_num_per_layer;
        if n == 0 || !(local_tensors as usize).is_multiple_of(n) {
            param_invalid!(
                "tensor_num_per_layer {n} must be >= 1 and divide the cache's {local_tensors} tensors"
            );
        }
        let layers = local_tensors as usize / n;
        let (src, dst) = match (&self.src, &self.dst) {
            (None, None) => (0..layers, 0..layers),
            (Some(s), None) => (s.clone(), s.clone()),
            (None, Some(d)) => (d.clone(), d.clone()),
            (Some(s), Some(d)) => (s.clone(), d.clone()),
        };
        if src.len() != dst.len() || src.is_empty() {
            param_invalid!(
                "layer ranges {src:?} and {dst:?} must be non-empty and of equal length"
            );
        }
        let local = if local_is_src { &src } else { &dst };
        if local.end > layers {
            param_invalid!("layer range {local:?} exceeds the cache's {layers} layers");
        }
        let expand = |r: &Range<usize>| -> Vec<u32> {
            r.clone()
                .flat_map(|l| (l * n..l * n + n).map(|t| t as u32))
                .collect()
        };
        Ok((expand(&src), expand(&dst)))
    }
}

/// The cache manager of an initialized instance (cheap to clone).
#[derive(Clone)]
pub struct CacheManager {
    pub(crate) core: Arc<Core>,
}

fn check_addrs(desc: &CacheDesc, addrs: &[u64]) -> Result<()> {
    desc.validate()?;
    if desc.num_tensors == 0 || addrs.len() != desc.num_tensors as usize {
        param_invalid!(
            "{} addresses given for a cache of {} tensors",
            addrs.len(),
            desc.num_tensors
        );
    }
    if addrs.contains(&0) {
        param_invalid!("cache addresses must not be 0");
    }
    Ok(())
}

fn slot_keys(keys: &[CacheKey]) -> Result<Vec<Option<SlotKey>>> {
    keys.iter()
        .map(|k| {
            if k.req_id == crate::UINT64_MAX && k.prefix_id == crate::UINT64_MAX {
                Ok(None) // padding for an empty slot
            } else {
                k.slot_key().map(Some)
            }
        })
        .collect()
}

impl CacheManager {
    fn entry(&self, cache: &Cache) -> Result<Arc<CacheEntry>> {
        self.core
            .table
            .lock()
            .expect("table lock")
            .by_id
            .get(&cache.cache_id())
            .cloned()
            .ok_or_else(|| {
                LlmException::new(
                    LlmStatusCode::LlmKvCacheNotExist,
                    format!(
                        "cache {} is not registered or allocated here",
                        cache.cache_id()
                    ),
                )
            })
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.core.opts.sync_kv_timeout
    }

    fn add(
        &self,
        desc: &CacheDesc,
        addrs: Vec<u64>,
        is_blocks: bool,
        backing: Backing,
        keys: &[Option<SlotKey>],
        blocks_key: Option<BlocksCacheKey>,
    ) -> Result<Cache> {
        if keys.len() as u64 > desc.batch_size() {
            param_invalid!(
                "{} keys for a cache of batch size {}",
                keys.len(),
                desc.batch_size()
            );
        }
        let mut table = self.core.table.lock().expect("table lock");
        if let Some(k) = blocks_key {
            if table.blocks.contains_key(&k.model_id) {
                return Err(LlmException::new(
                    LlmStatusCode::LlmFailed,
                    format!("a blocks cache for model id {} already exists", k.model_id),
                ));
            }
        }
        let entry = table.insert(CacheEntry {
            id: 0,
            desc: desc.clone(),
            addrs,
            is_blocks,
            backing,
        })?;
        table.bind_slots(&entry, keys);
        if let Some(k) = blocks_key {
            table.blocks.insert(k.model_id, entry.clone());
        }
        Ok(Cache::from_entry(&entry))
    }

    /// Registers user memory as a contiguous cache; key `i` names batch slot `i`.
    ///
    /// # Safety
    /// Each address must point to `desc.size()` bytes that stay valid until the cache is
    /// unregistered (and the instance finalized). Peers and transfers read and write this
    /// memory like DMA: the caller must not access bytes a transfer is moving at the same time.
    pub unsafe fn register_cache(
        &self,
        desc: &CacheDesc,
        addrs: &[u64],
        cache_keys: &[CacheKey],
        remote_accessible: Option<bool>,
    ) -> Result<Cache> {
        check_addrs(desc, addrs)?;
        let remote_accessible = remote_accessible.unwrap_or(desc.placement == Placement::Device);
        self.add(
            desc,
            addrs.to_vec(),
            false,
            Backing::Registered { remote_accessible },
            &slot_keys(cache_keys)?,
            None,
        )
    }

    /// Registers user memory as a blocks (PagedAttention) cache of shape `[num_blocks, ...]`.
    ///
    /// # Safety
    /// As for [`CacheManager::register_cache`].
    pub unsafe fn register_blocks_cache(
        &self,
        desc: &CacheDesc,
        addrs: &[u64],
        blocks_cache_key: Option<BlocksCacheKey>,
        remote_accessible: Option<bool>,
    ) -> Result<Cache> {
        check_addrs(desc, addrs)?;
        let remote_accessible = remote_accessible.unwrap_or(desc.placement == Placement::Device);
        self.add(
            desc,
            addrs.to_vec(),
            true,
            Backing::Registered { remote_accessible },
            &[],
            blocks_cache_key,
        )
    }

    /// Removes a registration (unknown ids are a no-op).
    pub fn unregister_cache(&self, cache_id: i64) -> Result<()> {
        let mut table = self.core.table.lock().expect("table lock");
        if table
            .by_id
            .get(&cache_id)
            .is_some_and(|e| !e.is_allocated())
        {
            table.by_id.remove(&cache_id);
            table.unbind_cache(cache_id);
        }
        Ok(())
    }

    fn allocate(&self, desc: &CacheDesc) -> Result<(Vec<u64>, Backing)> {
        desc.validate()?;
        if desc.num_tensors == 0 {
            param_invalid!("num_tensors must be > 0");
        }
        let pool = match desc.placement {
            Placement::Device => self.core.device_pool.as_ref(),
            Placement::Host => self.core.host_pool.as_ref(),
        };
        let Some(pool) = pool else {
            return Err(LlmException::new(
                LlmStatusCode::LlmFeatureNotEnabled,
                format!(
                    "no memory pool configured for {:?} placement",
                    desc.placement
                ),
            ));
        };
        let bufs = (0..desc.num_tensors)
            .map(|_| pool.allocate(desc.size()))
            .collect::<Result<Vec<_>>>()?;
        Ok((
            bufs.iter().map(|b| b.addr()).collect(),
            Backing::Allocated(bufs),
        ))
    }

    /// Allocates a contiguous cache from the pool; key `i` names slot `i` (pad empty slots
    /// with a key whose ids are both `UINT64_MAX`).
    pub fn allocate_cache(&self, desc: &CacheDesc, cache_keys: &[CacheKey]) -> Result<Cache> {
        let keys = slot_keys(cache_keys)?;
        let (addrs, backing) = self.allocate(desc)?;
        self.add(desc, addrs, false, backing, &keys, None)
    }

    /// Allocates a blocks cache from the pool.
    pub fn allocate_blocks_cache(
        &self,
        desc: &CacheDesc,
        blocks_cache_key: Option<BlocksCacheKey>,
    ) -> Result<Cache> {
        let (addrs, backing) = self.allocate(desc)?;
        self.add(desc, addrs, true, backing, &[], blocks_cache_key)
    }

    fn deallocate(&self, cache: &mut Cache, blocks: bool) -> Result<()> {
        if cache.is_blocks_cache() != blocks {
            param_invalid!(
                "cache {} is {}a blocks cache",
                cache.cache_id(),
                if blocks { "not " } else { "" }
            );
        }
        let mut table = self.core.table.lock().expect("table lock");
        if table
            .by_id
            .get(&cache.cache_id())
            .is_some_and(|e| e.is_allocated())
        {
            table.by_id.remove(&cache.cache_id());
            if blocks {
                table.unbind_cache(cache.cache_id());
            }
            // Contiguous caches stay alive while keys still reference them.
            cache.clear_addrs();
        }
        Ok(())
    }

    /// Drops the id reference of an allocated contiguous cache; memory is freed once every
    /// key was pulled or removed. Registered caches are left alone (use `unregister_cache`).
    pub fn deallocate_cache(&self, cache: &mut Cache) -> Result<()> {
        self.deallocate(cache, false)
    }

    /// Frees an allocated blocks cache.
    pub fn deallocate_blocks_cache(&self, cache: &mut Cache) -> Result<()> {
        self.deallocate(cache, true)
    }

    /// Drops a key (unknown keys are a no-op).
    pub fn remove_cache_key(&self, cache_key: &CacheKey) -> Result<()> {
        let k = cache_key.slot_key()?;
        self.core.table.lock().expect("table lock").slots.remove(&k);
        Ok(())
    }

    fn remote(
        &self,
        dir: Dir,
        peer: u64,
        access: Access,
        local: &[Segment],
        splittable: bool,
    ) -> Result<()> {
        let link = self.core.link(peer)?;
        link.transfer(dir, access, local, splittable, self.deadline())
    }

    /// Pulls one slot of a remote contiguous cache into slot `batch_index` of `cache`.
    /// `size` is bytes per tensor, -1 for the whole local slot.
    pub fn pull_cache(
        &self,
        cache_key: impl Into<AnyCacheKey>,
        cache: &Cache,
        batch_index: u32,
        size: i64,
        layers: &LayerRanges,
    ) -> Result<()> {
        let key = cache_key.into();
        let entry = self.entry(cache)?;
        if entry.is_blocks {
            param_invalid!("pull_cache needs a contiguous local cache; use pull_blocks");
        }
        let (slot, consumes) = self.slot_ref(&key)?;
        let slot_size = entry.desc.slot_size();
        let size = match size {
            -1 => slot_size,
            s if s > 0 && s as u64 <= slot_size => s as u64,
            s => param_invalid!("size {s} must be -1 or in (0, {slot_size}]"),
        };
        let (remote_t, local_t) = layers.tensors(entry.desc.num_tensors, false)?;
        let local = entry.slot_segments(&local_t, batch_index as u64, 0, size)?;
        let access = Access {
            target: Target::Slot { slot, offset: 0 },
            total: size * remote_t.len() as u64,
            tensors: remote_t,
            size,
        };
        self.remote(Dir::Pull, key.cluster_id(), access, &local, !consumes)
    }

    fn slot_ref(&self, key: &AnyCacheKey) -> Result<(SlotRef, bool)> {
        match key {
            AnyCacheKey::Key(k) => {
                if self.core.opts.remote_cache_accessible {
                    param_invalid!(
                        "with enable_remote_cache_accessible only CacheKeyByIdAndIndex can address a remote slot"
                    );
                }
                let sk = k.slot_key()?;
                Ok((SlotRef::Key(sk), matches!(sk, SlotKey::Request { .. })))
            }
            AnyCacheKey::ById(k) => Ok((
                SlotRef::Id {
                    cache_id: k.cache_id,
                    batch: k.batch_index,
                },
                false,
            )),
            AnyCacheKey::Blocks(_) => {
                param_invalid!("a BlocksCacheKey names a blocks cache, not a slot")
            }
        }
    }

    /// Pulls remote blocks (`BlocksCacheKey`: `src_blocks[i]` -> `dst_blocks[i]`) or a remote
    /// contiguous slot (other keys, `src_blocks` empty) into local blocks `dst_blocks`.
    pub fn pull_blocks(
        &self,
        src_cache_key: impl Into<AnyCacheKey>,
        dst_cache: &Cache,
        src_blocks: &[u64],
        dst_blocks: &[u64],
        layers: &LayerRanges,
    ) -> Result<()> {
        let key = src_cache_key.into();
        let entry = self.entry(dst_cache)?;
        if !entry.is_blocks {
            param_invalid!("pull_blocks needs a local blocks cache");
        }
        if dst_blocks.is_empty() {
            param_invalid!("dst_blocks must not be empty");
        }
        let (remote_t, local_t) = layers.tensors(entry.desc.num_tensors, false)?;
        let local = entry.block_segments(&local_t, dst_blocks)?;
        let total = crate::cache::total_len(&local);
        let (target, size, splittable) = match key {
            AnyCacheKey::Blocks(k) => {
                if src_blocks.len() != dst_blocks.len() {
                    param_invalid!(
                        "src_blocks ({}) and dst_blocks ({}) differ in length",
                        src_blocks.len(),
                        dst_blocks.len()
                    );
                }
                let target = Target::Blocks {
                    model_id: k.model_id,
                    blocks: src_blocks.to_vec(),
                };
                (target, 0, true)
            }
            _ => {
                if !src_blocks.is_empty() {
                    param_invalid!("src_blocks must be empty when pulling a contiguous cache");
                }
                let (slot, consumes) = self.slot_ref(&key)?;
                let size = entry.desc.slot_size() * dst_blocks.len() as u64;
                (Target::Slot { slot, offset: 0 }, size, !consumes)
            }
        };
        let access = Access {
            target,
            tensors: remote_t,
            size,
            total,
        };
        self.remote(Dir::Pull, key.cluster_id(), access, &local, splittable)
    }

    fn require_remote_access(&self, what: &str) -> Result<()> {
        if !self.core.opts.remote_cache_accessible {
            return Err(LlmException::new(
                LlmStatusCode::LlmFeatureNotEnabled,
                format!("{what} needs enable_remote_cache_accessible"),
            ));
        }
        Ok(())
    }

    /// Writes local slot `src_batch_index` into remote slot (`cache_id`, `batch_index`).
    pub fn push_cache(
        &self,
        dst_cache_key: CacheKeyByIdAndIndex,
        src_cache: &Cache,
        src_batch_index: u32,
        layers: &LayerRanges,
        size: i64,
    ) -> Result<()> {
        self.require_remote_access("push_cache")?;
        if size != -1 {
            param_invalid!("push_cache size must be -1");
        }
        let entry = self.entry(src_cache)?;
        if entry.is_blocks {
            param_invalid!("push_cache needs a contiguous source cache");
        }
        let (local_t, remote_t) = layers.tensors(entry.desc.num_tensors, true)?;
        let slot = entry.desc.slot_size();
        let local = entry.slot_segments(&local_t, src_batch_index as u64, 0, slot)?;
        let access = Access {
            target: Target::Slot {
                slot: SlotRef::Id {
                    cache_id: dst_cache_key.cache_id,
                    batch: dst_cache_key.batch_index,
                },
                offset: 0,
            },
            total: slot * remote_t.len() as u64,
            tensors: remote_t,
            size: slot,
        };
        self.remote(Dir::Push, dst_cache_key.cluster_id, access, &local, true)
    }

    /// Writes local blocks `src_blocks[i]` into remote blocks `dst_blocks[i]`.
    pub fn push_blocks(
        &self,
        dst_cache_key: BlocksCacheKey,
        src_cache: &Cache,
        src_blocks: &[u64],
        dst_blocks: &[u64],
        layers: &LayerRanges,
    ) -> Result<()> {
        self.require_remote_access("push_blocks")?;
        let entry = self.entry(src_cache)?;
        if !entry.is_blocks {
            param_invalid!("push_blocks needs a blocks source cache");
        }
        if dst_blocks.is_empty() || src_blocks.len() != dst_blocks.len() {
            param_invalid!("src_blocks and dst_blocks must be non-empty and of equal length");
        }
        let (local_t, remote_t) = layers.tensors(entry.desc.num_tensors, true)?;
        let local = entry.block_segments(&local_t, src_blocks)?;
        let access = Access {
            target: Target::Blocks {
                model_id: dst_cache_key.model_id,
                blocks: dst_blocks.to_vec(),
            },
            total: crate::cache::total_len(&local),
            tensors: remote_t,
            size: 0,
        };
        self.remote(Dir::Push, dst_cache_key.cluster_id, access, &local, true)
    }

    /// Copies slot `src_batch_index` of `src` into slot `dst_batch_index` of `dst` for every
    /// tensor: `size` bytes (-1 = rest of the slot) from byte `offset`.
    pub fn copy_cache(
        &self,
        dst: &Cache,
        src: &Cache,
        dst_batch_index: u32,
        src_batch_index: u32,
        offset: u64,
        size: i64,
    ) -> Result<()> {
        let (d, s) = (self.entry(dst)?, self.entry(src)?);
        if d.is_blocks || s.is_blocks {
            param_invalid!("copy_cache needs contiguous caches");
        }
        if d.desc.num_tensors != s.desc.num_tensors {
            param_invalid!("copy_cache: caches have different tensor counts");
        }
        let slot = s.desc.slot_size().min(d.desc.slot_size());
        let size = match size {
            -1 if offset < slot => slot - offset,
            s if s > 0 => s as u64,
            s => param_invalid!("size {s} must be -1 or > 0"),
        };
        let tensors: Vec<u32> = (0..d.desc.num_tensors).collect();
        let from = s.slot_segments(&tensors, src_batch_index as u64, offset, size)?;
        let to = d.slot_segments(&tensors, dst_batch_index as u64, offset, size)?;
        copy_segments(&from, &to);
        Ok(())
    }

    /// Copies, inside one blocks cache, each source block to each listed destination block.
    pub fn copy_blocks(&self, cache: &Cache, copy_block_info: &[(u64, Vec<u64>)]) -> Result<()> {
        let e = self.entry(cache)?;
        if !e.is_blocks {
            param_invalid!("copy_blocks needs a blocks cache");
        }
        let tensors: Vec<u32> = (0..e.desc.num_tensors).collect();
        for (src, dsts) in copy_block_info {
            let from = e.block_segments(&tensors, &vec![*src; dsts.len()])?;
            let to = e.block_segments(&tensors, dsts)?;
            copy_segments(&from, &to);
        }
        Ok(())
    }

    fn blocks_view(&self, cache: &Cache) -> Result<(CacheDesc, Vec<u64>, Option<Arc<CacheEntry>>)> {
        if cache.cache_id() == -1 {
            return Ok((
                cache.cache_desc().clone(),
                cache.tensor_addrs().to_vec(),
                None,
            ));
        }
        let e = self.entry(cache)?;
        if !e.is_blocks {
            param_invalid!("swap_blocks needs blocks caches");
        }
        Ok((e.desc.clone(), e.addrs.clone(), Some(e)))
    }

    /// Swaps blocks between a host and a device blocks cache (host -> device is swap-in,
    /// device -> host swap-out).
    pub fn swap_blocks(
        &self,
        src_cache: &Cache,
        dst_cache: &Cache,
        src_to_dst: &[(u64, u64)],
    ) -> Result<()> {
        let (sd, sa, _keep_s) = self.blocks_view(src_cache)?;
        let (dd, da, _keep_d) = self.blocks_view(dst_cache)?;
        if sd.placement == dd.placement {
            return Err(LlmException::new(
                LlmStatusCode::LlmFeatureNotEnabled,
                "swap_blocks moves between Host and Device placements only",
            ));
        }
        if sd.num_tensors != dd.num_tensors || sd.slot_size() != dd.slot_size() {
            param_invalid!("swap_blocks: caches differ in tensor count or block size");
        }
        let block = sd.slot_size();
        let (mut from, mut to) = (Vec::new(), Vec::new());
        for &(s, d) in src_to_dst {
            if s >= sd.batch_size() || d >= dd.batch_size() {
                param_invalid!("swap_blocks: block pair ({s}, {d}) out of range");
            }
            for t in 0..sd.num_tensors as usize {
                from.push(Segment {
                    addr: sa[t] + s * block,
                    len: block,
                });
                to.push(Segment {
                    addr: da[t] + d * block,
                    len: block,
                });
            }
        }
        copy_segments(&from, &to);
        Ok(())
    }

    /// Reserved in the reference ("not supported yet"); refused the same way here.
    pub fn remap_registered_memory(&self, mem_infos: &[MemInfo]) -> Result<()> {
        if let Some(m) = mem_infos
            .iter()
            .find(|m| m.mem_type != crate::MemType::Device || m.addr == 0 || m.size == 0)
        {
            param_invalid!("bad mem info {m:?}: device memory, non-zero address and size");
        }
        Err(LlmException::new(
            LlmStatusCode::LlmFeatureNotEnabled,
            "remap_registered_memory is reserved and not supported",
        ))
    }

    /// The local cache record for `cache` (used by layer-wise transfers).
    pub(crate) fn entry_of(&self, cache: &Cache) -> Result<Arc<CacheEntry>> {
        self.entry(cache)
    }

    /// One push of explicit segments (layer-wise transfers).
    pub(crate) fn push_raw(&self, peer: u64, access: Access, local: &[Segment]) -> Result<()> {
        self.remote(Dir::Push, peer, access, local, false)
    }
}

/// Copies equal-length segment lists pairwise (ranges may overlap inside one cache).
fn copy_segments(from: &[Segment], to: &[Segment]) {
    for (f, t) in from.iter().zip(to) {
        debug_assert_eq!(f.len, t.len);
        // SAFETY: both segments were validated against live caches.
        unsafe { std::ptr::copy(f.addr as *const u8, t.addr as *mut u8, f.len as usize) };
    }
}
