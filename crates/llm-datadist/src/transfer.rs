//! Layer-wise asynchronous push (`transfer_cache_async`): a worker walks the layers, waits for
//! each to be computed (`LayerSynchronizer`), and pushes it to every destination covering it,
//! so the transfer overlaps the model's forward pass.

use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::cache::Cache;
use crate::cache_manager::CacheManager;
use crate::keys::{BlocksCacheKey, CacheKeyByIdAndIndex};
use crate::protocol::{Access, SlotRef, Target};
use crate::status::{param_invalid, LlmStatusCode, Result};
use crate::types::Placement;

/// Waits until a layer's KV is computed.
pub trait LayerSynchronizer: Send + Sync {
    /// Blocks until layer `layer_index` is ready; `false` aborts the transfer.
    fn synchronize_layer(&self, layer_index: usize, timeout_in_millis: Option<u64>) -> bool;
}

/// Address-based destination (remote cache access off): two addresses (K, V) per layer,
/// already offset to the wanted slot.
#[derive(Debug, Clone)]
pub struct TransferConfig {
    /// Destination cluster.
    pub dst_cluster_id: u64,
    /// Destination tensor addresses, 2 per transferred layer.
    pub dst_addrs: Vec<u64>,
    /// Source layers (all when None).
    pub src_layer_range: Option<Range<usize>>,
    /// Source batch slot.
    pub src_batch_index: u32,
}

/// Key-addressed destination of a [`TransferWithCacheKeyConfig`].
#[derive(Debug, Clone, Copy)]
pub enum TransferKey {
    /// A remote blocks cache.
    Blocks(BlocksCacheKey),
    /// A remote contiguous slot.
    ById(CacheKeyByIdAndIndex),
}

/// Key-based destination (remote cache access on).
#[derive(Debug, Clone)]
pub struct TransferWithCacheKeyConfig {
    /// Where to write.
    pub cache_key: TransferKey,
    /// Source layers.
    pub src_layer_range: Range<usize>,
    /// Destination layers (same length).
    pub dst_layer_range: Range<usize>,
    /// Source batch slot (0 for blocks).
    pub src_batch_index: u32,
}

/// Either configuration.
#[derive(Debug, Clone)]
pub enum TransferTarget {
    /// By addresses.
    Addresses(TransferConfig),
    /// By key.
    Key(TransferWithCacheKeyConfig),
}

impl TransferTarget {
    fn dst_cluster_id(&self) -> u64 {
        match self {
            Self::Addresses(c) => c.dst_cluster_id,
            Self::Key(c) => match c.cache_key {
                TransferKey::Blocks(k) => k.cluster_id,
                TransferKey::ById(k) => k.cluster_id,
            },
        }
    }

    fn src_range(&self, layers: usize) -> Range<usize> {
        match self {
            Self::Addresses(c) => c.src_layer_range.clone().unwrap_or(0..layers),
            Self::Key(c) => c.src_layer_range.clone(),
        }
    }
}

#[derive(Default)]
struct TaskState {
    results: Vec<Option<LlmStatusCode>>,
    done: bool,
}

/// Handle of a running layer-wise transfer.
#[derive(Clone)]
pub struct CacheTask {
    state: Arc<(Mutex<TaskState>, Condvar)>,
}

impl CacheTask {
    fn wait(&self, timeout_in_millis: Option<u64>) -> Option<std::sync::MutexGuard<'_, TaskState>> {
        let (lock, cv) = &*self.state;
        let mut g = lock.lock().expect("task lock");
        let deadline = timeout_in_millis.map(|ms| Instant::now() + Duration::from_millis(ms));
        while !g.done {
            g = match deadline {
                None => cv.wait(g).expect("task lock"),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    cv.wait_timeout(g, d - now).expect("task lock").0
                }
            };
        }
        Some(g)
    }

    /// Whether the task has finished, waiting at most `timeout_in_millis` (None: until it has).
    pub fn wait_done(&self, timeout_in_millis: Option<u64>) -> bool {
        self.wait(timeout_in_millis).is_some()
    }

    /// Waits for the task: the first failure, `LLM_SUCCESS`, or `LLM_TIMEOUT` if still running.
    pub fn synchronize(&self, timeout_in_millis: Option<u64>) -> LlmStatusCode {
        match self.wait(timeout_in_millis) {
            None => LlmStatusCode::LlmTimeout,
            Some(g) => g
                .results
                .iter()
                .flatten()
                .copied()
                .find(|c| *c != LlmStatusCode::LlmSuccess)
                .unwrap_or(LlmStatusCode::LlmSuccess),
        }
    }

    /// One result per config (None = its layers never started); all `LLM_TIMEOUT` on timeout.
    pub fn get_results(&self, timeout_in_millis: Option<u64>) -> Vec<Option<LlmStatusCode>> {
        match self.wait(timeout_in_millis) {
            Some(g) => g.results.clone(),
            None => {
                let n = self.state.0.lock().expect("task lock").results.len();
                vec![Some(LlmStatusCode::LlmTimeout); n]
            }
        }
    }
}

impl CacheManager {
    /// Pushes `src_cache` layer by layer to every config's destination as layers complete.
    pub fn transfer_cache_async(
        &self,
        src_cache: &Cache,
        layer_synchronizer: Arc<dyn LayerSynchronizer>,
        transfer_configs: Vec<TransferTarget>,
        src_block_indices: Option<Vec<u64>>,
        dst_block_indices: Option<Vec<u64>>,
    ) -> Result<CacheTask> {
        let entry = self.entry_of(src_cache)?;
        if entry.desc.placement == Placement::Host {
            param_invalid!("transfer_cache_async needs a device source cache");
        }
        if !entry.desc.num_tensors.is_multiple_of(2) {
            param_invalid!("transfer_cache_async needs an even tensor count (K and V per layer)");
        }
        let layers = entry.desc.num_tensors as usize / 2;
        let src_blocks = src_block_indices.unwrap_or_default();
        let dst_blocks = dst_block_indices.unwrap_or_default();
        if src_blocks.len() != dst_blocks.len() {
            param_invalid!("src and dst block index lists differ in length");
        }
        if entry.is_blocks && src_blocks.is_empty() {
            param_invalid!("a blocks source cache needs src_block_indices");
        }
        for cfg in &transfer_configs {
            let r = cfg.src_range(layers);
            if r.is_empty() || r.end > layers {
                param_invalid!("source layer range {r:?} outside [0, {layers})");
            }
            match cfg {
                TransferTarget::Addresses(c) => {
                    if entry.is_blocks {
                        param_invalid!("TransferConfig addresses need a contiguous source cache");
                    }
                    if c.dst_addrs.len() != 2 * r.len() {
                        param_invalid!(
                            "TransferConfig needs {} dst addresses, got {}",
                            2 * r.len(),
                            c.dst_addrs.len()
                        );
                    }
                }
                TransferTarget::Key(c) => {
                    if c.dst_layer_range.len() != r.len() {
                        param_invalid!("src and dst layer ranges differ in length");
                    }
                    match (c.cache_key, entry.is_blocks) {
                        (TransferKey::Blocks(_), true) if c.src_batch_index == 0 => {}
                        (TransferKey::Blocks(_), true) => {
                            param_invalid!("src_batch_index must be 0 for blocks")
                        }
                        (TransferKey::ById(_), false) => {}
                        _ => param_invalid!(
                            "blocks <-> contiguous layer-wise transfers are not supported"
                        ),
                    }
                }
            }
        }
        let task = CacheTask {
            state: Arc::new((
                Mutex::new(TaskState {
                    results: vec![None; transfer_configs.len()],
                    done: false,
                }),
                Condvar::new(),
            )),
        };
        let (cm, state) = (self.clone(), task.state.clone());
        std::thread::Builder::new()
            .name("llm-datadist-transfer".into())
            .spawn(move || {
                let set = |i: usize, code: LlmStatusCode| {
                    let mut g = state.0.lock().expect("task lock");
                    if g.results[i].is_none_or(|c| c == LlmStatusCode::LlmSuccess) {
                        g.results[i] = Some(code);
                    }
                };
                'layers: for layer in 0..layers {
                    let covering: Vec<usize> = (0..transfer_configs.len())
                        .filter(|&i| transfer_configs[i].src_range(layers).contains(&layer))
                        .collect();
                    if covering.is_empty() {
                        continue;
                    }
                    if !layer_synchronizer.synchronize_layer(layer, None) {
                        for (i, c) in transfer_configs.iter().enumerate() {
                            if c.src_range(layers).end > layer {
                                set(i, LlmStatusCode::LlmParamInvalid);
                            }
                        }
                        break 'layers;
                    }
                    for i in covering {
                        let cfg = &transfer_configs[i];
                        let k = layer - cfg.src_range(layers).start;
                        let src_t = [2 * layer as u32, 2 * layer as u32 + 1];
                        let slot = entry.desc.slot_size();
                        let pushed = match cfg {
                            TransferTarget::Addresses(c) => entry
                                .slot_segments(&src_t, c.src_batch_index as u64, 0, slot)
                                .and_then(|local| {
                                    let access = Access {
                                        target: Target::Addresses(
                                            c.dst_addrs[2 * k..2 * k + 2].to_vec(),
                                        ),
                                        tensors: Vec::new(),
                                        size: slot,
                                        total: 2 * slot,
                                    };
                                    cm.push_raw(c.dst_cluster_id, access, &local)
                                }),
                            TransferTarget::Key(c) => {
                                let dl = (c.dst_layer_range.start + k) as u32;
                                let dst_t = vec![2 * dl, 2 * dl + 1];
                                let (local, target, size) = match c.cache_key {
                                    TransferKey::Blocks(key) => (
                                        entry.block_segments(&src_t, &src_blocks),
                                        Target::Blocks {
                                            model_id: key.model_id,
                                            blocks: dst_blocks.clone(),
                                        },
                                        0,
                                    ),
                                    TransferKey::ById(key) => (
                                        entry.slot_segments(
                                            &src_t,
                                            c.src_batch_index as u64,
                                            0,
                                            slot,
                                        ),
                                        Target::Slot {
                                            slot: SlotRef::Id {
                                                cache_id: key.cache_id,
                                                batch: key.batch_index,
                                            },
                                            offset: 0,
                                        },
                                        slot,
                                    ),
                                };
                                local.and_then(|local| {
                                    let access = Access {
                                        target,
                                        tensors: dst_t,
                                        size,
                                        total: crate::cache::total_len(&local),
                                    };
                                    cm.push_raw(cfg.dst_cluster_id(), access, &local)
                                })
                            }
                        };
                        set(
                            i,
                            pushed
                                .map(|_| LlmStatusCode::LlmSuccess)
                                .unwrap_or_else(|e| e.status_code),
                        );
                    }
                }
                let (lock, cv) = &*state;
                lock.lock().expect("task lock").done = true;
                cv.notify_all();
            })
            .map_err(|e| crate::LlmException::new(LlmStatusCode::LlmFailed, e.to_string()))?;
        Ok(task)
    }
}
