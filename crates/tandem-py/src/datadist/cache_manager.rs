//! `CacheManager` and `CacheTask`: registering and allocating caches and moving their bytes,
//! with the GIL released for every transfer (Python threads may pull from several peers at
//! once, as vllm-ascend does).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use llm_datadist::{LayerRanges, LlmException, LlmStatusCode, TransferTarget};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use super::convert::{layer_range, llm_error, param_invalid, status, OrRaise};
use super::types::{
    any_key, BlocksCacheKey, Cache, CacheDesc, CacheKey, CacheKeyByIdAndIndex, MemInfo,
    TransferConfig, TransferWithCacheKeyConfig,
};
use crate::wait;

/// One initialized lifetime of an `LLMDataDist`: its crate cache manager, whether it is still
/// initialized, and whether `link` was called (after which new registrations are not remotely
/// accessible by default, as in the vendor's layer).
pub struct Session {
    cm: llm_datadist::CacheManager,
    pub alive: AtomicBool,
    pub linked: AtomicBool,
}

impl Session {
    /// A live session over `cm`.
    pub fn new(cm: llm_datadist::CacheManager) -> Self {
        Session {
            cm,
            alive: AtomicBool::new(true),
            linked: AtomicBool::new(false),
        }
    }
}

/// `ints` given as a list or tuple of ints.
fn int_list(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u64>> {
    if !(obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>()) {
        return Err(PyTypeError::new_err(format!(
            "{what} should be a list or tuple of ints"
        )));
    }
    obj.extract()
        .map_err(|_| PyTypeError::new_err(format!("{what} should be a list or tuple of ints >= 0")))
}

fn cache_keys(obj: &Bound<'_, PyAny>) -> PyResult<Vec<llm_datadist::CacheKey>> {
    if !(obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>()) {
        return Err(PyTypeError::new_err(
            "cache_keys should be a list or tuple of CacheKey",
        ));
    }
    obj.try_iter()?
        .map(|k| {
            let k = k?;
            let k = k
                .cast::<CacheKey>()
                .map_err(|_| PyTypeError::new_err("cache_keys should hold CacheKey objects"))?;
            Ok(k.get().0)
        })
        .collect()
}

/// `src_layer_range` / `dst_layer_range` / `tensor_num_per_layer` from keyword arguments.
fn layers_from_kwargs(py: Python<'_>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<LayerRanges> {
    let get = |k: &str| -> PyResult<Option<Bound<'_, PyAny>>> {
        match kwargs {
            Some(d) => d.get_item(k),
            None => Ok(None),
        }
    };
    let n = match get("tensor_num_per_layer")? {
        Some(v) => v
            .extract::<u32>()
            .map_err(|_| PyTypeError::new_err("tensor_num_per_layer should be an int"))?,
        None => 2,
    };
    layers(
        py,
        get("src_layer_range")?.as_ref(),
        get("dst_layer_range")?.as_ref(),
        n,
    )
}

fn layers(
    py: Python<'_>,
    src: Option<&Bound<'_, PyAny>>,
    dst: Option<&Bound<'_, PyAny>>,
    tensor_num_per_layer: u32,
) -> PyResult<LayerRanges> {
    if tensor_num_per_layer == 0 {
        return Err(param_invalid(py, "tensor_num_per_layer should be >= 1"));
    }
    Ok(LayerRanges {
        src: layer_range(py, src, "src_layer_range")?,
        dst: layer_range(py, dst, "dst_layer_range")?,
        tensor_num_per_layer: tensor_num_per_layer as usize,
    })
}

/// Calls a Python `LayerSynchronizer` from the transfer's worker thread.
struct PySynchronizer(Py<PyAny>);

impl llm_datadist::LayerSynchronizer for PySynchronizer {
    fn synchronize_layer(&self, layer_index: usize, timeout_in_millis: Option<u64>) -> bool {
        Python::attach(|py| {
            let r = self
                .0
                .call_method1(py, "synchronize_layer", (layer_index, timeout_in_millis))
                .and_then(|v| v.extract::<bool>(py));
            r.unwrap_or_else(|e| {
                e.print(py);
                false
            })
        })
    }
}

/// The cache manager of an initialized `LLMDataDist`.
#[pyclass(module = "tandem._native", name = "CacheManager")]
pub struct CacheManager {
    session: Arc<Session>,
}

impl CacheManager {
    /// A manager over `session`.
    pub fn new(session: Arc<Session>) -> Self {
        CacheManager { session }
    }

    fn cm(&self, py: Python<'_>) -> PyResult<llm_datadist::CacheManager> {
        if !self.session.alive.load(Ordering::Acquire) {
            return Err(llm_error(
                py,
                LlmException::new(
                    LlmStatusCode::LlmEngineFinalized,
                    "CacheManager is no longer initialized; obtain a new instance after LLMDataDist.init.",
                ),
            ));
        }
        Ok(self.session.cm.clone())
    }

    /// After `link`, registrations default to not remotely accessible and cannot ask to be.
    fn remote_accessible(&self, py: Python<'_>, asked: Option<bool>) -> PyResult<Option<bool>> {
        if !self.session.linked.load(Ordering::Acquire) {
            return Ok(asked);
        }
        if asked == Some(true) {
            return Err(param_invalid(
                py,
                "memory registered after link() cannot be remotely accessible",
            ));
        }
        Ok(Some(false))
    }
}

#[pymethods]
impl CacheManager {
    /// Registers user memory (one address per tensor) as a contiguous cache; key `i` names
    /// batch slot `i`. The memory must stay valid until `unregister_cache`.
    #[pyo3(signature = (cache_desc, addrs, cache_keys=None, remote_accessible=None))]
    fn register_cache(
        &self,
        py: Python<'_>,
        cache_desc: PyRef<'_, CacheDesc>,
        addrs: &Bound<'_, PyAny>,
        cache_keys: Option<&Bound<'_, PyAny>>,
        remote_accessible: Option<bool>,
    ) -> PyResult<Py<Cache>> {
        let cm = self.cm(py)?;
        let desc = cache_desc.desc();
        let addrs = int_list(addrs, "addrs")?;
        let keys = match cache_keys {
            Some(k) => self::cache_keys(k)?,
            None => Vec::new(),
        };
        let remote = self.remote_accessible(py, remote_accessible)?;
        // SAFETY: the vendor's contract: the caller's addresses point to memory of the described
        // size that stays valid (and is not moved) until it is unregistered.
        let c = unsafe { cm.register_cache(&desc, &addrs, &keys, remote) }.or_raise(py)?;
        Cache::wrap(py, c)
    }

    /// Registers user memory as a blocks (PagedAttention) cache of shape `[num_blocks, ...]`.
    #[pyo3(signature = (cache_desc, addrs, blocks_cache_key=None, remote_accessible=None))]
    fn register_blocks_cache(
        &self,
        py: Python<'_>,
        cache_desc: PyRef<'_, CacheDesc>,
        addrs: &Bound<'_, PyAny>,
        blocks_cache_key: Option<PyRef<'_, BlocksCacheKey>>,
        remote_accessible: Option<bool>,
    ) -> PyResult<Py<Cache>> {
        let cm = self.cm(py)?;
        let desc = cache_desc.desc();
        let addrs = int_list(addrs, "addrs")?;
        let remote = self.remote_accessible(py, remote_accessible)?;
        // SAFETY: as for `register_cache`.
        let c = unsafe {
            cm.register_blocks_cache(&desc, &addrs, blocks_cache_key.map(|k| k.0), remote)
        }
        .or_raise(py)?;
        Cache::wrap(py, c)
    }

    /// Removes a registration (unknown ids are a no-op).
    fn unregister_cache(&self, py: Python<'_>, cache_id: i64) -> PyResult<()> {
        self.cm(py)?.unregister_cache(cache_id).or_raise(py)
    }

    /// Allocates a contiguous cache from the pool matching its placement.
    #[pyo3(signature = (cache_desc, cache_keys=None))]
    fn allocate_cache(
        &self,
        py: Python<'_>,
        cache_desc: PyRef<'_, CacheDesc>,
        cache_keys: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<Cache>> {
        let cm = self.cm(py)?;
        let desc = cache_desc.desc();
        let keys = match cache_keys {
            Some(k) => self::cache_keys(k)?,
            None => Vec::new(),
        };
        let c = cm.allocate_cache(&desc, &keys).or_raise(py)?;
        Cache::wrap(py, c)
    }

    /// Allocates a blocks cache from the pool.
    #[pyo3(signature = (cache_desc, blocks_cache_key=None))]
    fn allocate_blocks_cache(
        &self,
        py: Python<'_>,
        cache_desc: PyRef<'_, CacheDesc>,
        blocks_cache_key: Option<PyRef<'_, BlocksCacheKey>>,
    ) -> PyResult<Py<Cache>> {
        let cm = self.cm(py)?;
        let c = cm
            .allocate_blocks_cache(&cache_desc.desc(), blocks_cache_key.map(|k| k.0))
            .or_raise(py)?;
        Cache::wrap(py, c)
    }

    /// Drops the cache id's reference to an allocated contiguous cache (the memory goes once
    /// every key is pulled or removed); clears `tensor_addrs`.
    fn deallocate_cache(&self, py: Python<'_>, cache: PyRef<'_, Cache>) -> PyResult<()> {
        let cm = self.cm(py)?;
        let mut c = cache.inner.lock().expect("cache lock");
        cm.deallocate_cache(&mut c).or_raise(py)
    }

    /// Frees an allocated blocks cache.
    fn deallocate_blocks_cache(&self, py: Python<'_>, cache: PyRef<'_, Cache>) -> PyResult<()> {
        let cm = self.cm(py)?;
        let mut c = cache.inner.lock().expect("cache lock");
        cm.deallocate_blocks_cache(&mut c).or_raise(py)
    }

    /// Drops a key's reference (the slot can no longer be pulled by it).
    fn remove_cache_key(&self, py: Python<'_>, cache_key: PyRef<'_, CacheKey>) -> PyResult<()> {
        self.cm(py)?.remove_cache_key(&cache_key.0).or_raise(py)
    }

    /// Copies one slot of a remote contiguous cache into slot `batch_index` of `cache`.
    /// Keyword arguments: `src_layer_range`, `dst_layer_range`, `tensor_num_per_layer`.
    #[pyo3(signature = (cache_key, cache, batch_index=0, size=-1, **kwargs))]
    fn pull_cache(
        &self,
        py: Python<'_>,
        cache_key: &Bound<'_, PyAny>,
        cache: PyRef<'_, Cache>,
        batch_index: u32,
        size: i64,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        let cm = self.cm(py)?;
        let key = any_key(cache_key, "cache_key")?;
        if matches!(key, llm_datadist::AnyCacheKey::Blocks(_)) {
            return Err(PyTypeError::new_err(
                "cache_key should be a CacheKey or a CacheKeyByIdAndIndex",
            ));
        }
        let layers = layers_from_kwargs(py, kwargs)?;
        let c = cache.cache();
        py.detach(move || cm.pull_cache(key, &c, batch_index, size, &layers))
            .or_raise(py)
    }

    /// Pulls remote blocks `src_blocks[i]` into local `dst_blocks[i]` (a `BlocksCacheKey`), or
    /// a remote contiguous slot into `dst_blocks` (the other keys, `src_blocks` empty).
    #[pyo3(signature = (src_cache_key, dst_cache, src_blocks=None, dst_blocks=None, **kwargs))]
    fn pull_blocks(
        &self,
        py: Python<'_>,
        src_cache_key: &Bound<'_, PyAny>,
        dst_cache: PyRef<'_, Cache>,
        src_blocks: Option<&Bound<'_, PyAny>>,
        dst_blocks: Option<&Bound<'_, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        let cm = self.cm(py)?;
        let key = any_key(src_cache_key, "src_cache_key")?;
        let src = src_blocks.map(|b| int_list(b, "src_blocks")).transpose()?;
        let dst = dst_blocks.map(|b| int_list(b, "dst_blocks")).transpose()?;
        let (src, dst) = (src.unwrap_or_default(), dst.unwrap_or_default());
        let layers = layers_from_kwargs(py, kwargs)?;
        let c = dst_cache.cache();
        py.detach(move || cm.pull_blocks(key, &c, &src, &dst, &layers))
            .or_raise(py)
    }

    /// Writes local slot `src_batch_index` into the remote slot named by `dst_cache_key`.
    #[pyo3(signature = (dst_cache_key, src_cache, src_batch_index=0, src_layer_range=None, dst_layer_range=None, size=-1, tensor_num_per_layer=2))]
    #[allow(clippy::too_many_arguments)]
    fn push_cache(
        &self,
        py: Python<'_>,
        dst_cache_key: PyRef<'_, CacheKeyByIdAndIndex>,
        src_cache: PyRef<'_, Cache>,
        src_batch_index: u32,
        src_layer_range: Option<&Bound<'_, PyAny>>,
        dst_layer_range: Option<&Bound<'_, PyAny>>,
        size: i64,
        tensor_num_per_layer: u32,
    ) -> PyResult<()> {
        let cm = self.cm(py)?;
        let layers = layers(py, src_layer_range, dst_layer_range, tensor_num_per_layer)?;
        let (key, c) = (dst_cache_key.0, src_cache.cache());
        py.detach(move || cm.push_cache(key, &c, src_batch_index, &layers, size))
            .or_raise(py)
    }

    /// Writes local blocks into the remote blocks cache named by `dst_cache_key`.
    #[pyo3(signature = (dst_cache_key, src_cache, src_blocks=None, dst_blocks=None, src_layer_range=None, dst_layer_range=None, tensor_num_per_layer=2))]
    #[allow(clippy::too_many_arguments)]
    fn push_blocks(
        &self,
        py: Python<'_>,
        dst_cache_key: PyRef<'_, BlocksCacheKey>,
        src_cache: PyRef<'_, Cache>,
        src_blocks: Option<&Bound<'_, PyAny>>,
        dst_blocks: Option<&Bound<'_, PyAny>>,
        src_layer_range: Option<&Bound<'_, PyAny>>,
        dst_layer_range: Option<&Bound<'_, PyAny>>,
        tensor_num_per_layer: u32,
    ) -> PyResult<()> {
        let cm = self.cm(py)?;
        let src = src_blocks.map(|b| int_list(b, "src_blocks")).transpose()?;
        let dst = dst_blocks.map(|b| int_list(b, "dst_blocks")).transpose()?;
        let (src, dst) = (src.unwrap_or_default(), dst.unwrap_or_default());
        let layers = layers(py, src_layer_range, dst_layer_range, tensor_num_per_layer)?;
        let (key, c) = (dst_cache_key.0, src_cache.cache());
        py.detach(move || cm.push_blocks(key, &c, &src, &dst, &layers))
            .or_raise(py)
    }

    /// Pushes `src_cache` layer by layer as `layer_synchronizer.synchronize_layer(i, None)`
    /// reports layers ready, to every destination in `transfer_configs`. The block size of
    /// the destination is known from its registration, so `dst_block_memory_size` is only
    /// checked to be a non-negative int.
    #[pyo3(signature = (src_cache, layer_synchronizer, transfer_configs, src_block_indices=None, dst_block_indices=None, dst_block_memory_size=None))]
    #[allow(clippy::too_many_arguments)]
    fn transfer_cache_async(
        &self,
        py: Python<'_>,
        src_cache: PyRef<'_, Cache>,
        layer_synchronizer: Bound<'_, PyAny>,
        transfer_configs: &Bound<'_, PyAny>,
        src_block_indices: Option<&Bound<'_, PyAny>>,
        dst_block_indices: Option<&Bound<'_, PyAny>>,
        dst_block_memory_size: Option<u64>,
    ) -> PyResult<CacheTask> {
        let cm = self.cm(py)?;
        let _ = dst_block_memory_size;
        if !layer_synchronizer.hasattr("synchronize_layer")? {
            return Err(PyTypeError::new_err(
                "layer_synchronizer should be a LayerSynchronizer",
            ));
        }
        if !(transfer_configs.is_instance_of::<PyList>()
            || transfer_configs.is_instance_of::<PyTuple>())
        {
            return Err(PyTypeError::new_err(
                "transfer_configs should be a list of TransferConfig or TransferWithCacheKeyConfig",
            ));
        }
        let mut targets = Vec::new();
        for t in transfer_configs.try_iter()? {
            let t = t?;
            if let Ok(c) = t.cast::<TransferConfig>() {
                let inner = c.borrow().inner.lock().expect("config lock").clone();
                targets.push(TransferTarget::Addresses(inner));
            } else if let Ok(c) = t.cast::<TransferWithCacheKeyConfig>() {
                targets.push(TransferTarget::Key(c.borrow().inner.clone()));
            } else {
                return Err(PyTypeError::new_err(
                    "transfer_configs should hold TransferConfig or TransferWithCacheKeyConfig",
                ));
            }
        }
        let src = src_block_indices
            .map(|b| int_list(b, "src_block_indices"))
            .transpose()?;
        let dst = dst_block_indices
            .map(|b| int_list(b, "dst_block_indices"))
            .transpose()?;
        let sync = Arc::new(PySynchronizer(layer_synchronizer.unbind()));
        let c = src_cache.cache();
        let task = py
            .detach(move || cm.transfer_cache_async(&c, sync, targets, src, dst))
            .or_raise(py)?;
        Ok(CacheTask { task })
    }

    /// Copies slot `src_batch_index` of `src` into slot `dst_batch_index` of `dst` (`offset`
    /// bytes into each tensor, `size` bytes or all).
    #[pyo3(signature = (dst, src, dst_batch_index=0, src_batch_index=0, offset=0, size=-1, req_id=None))]
    #[allow(clippy::too_many_arguments)]
    fn copy_cache(
        &self,
        py: Python<'_>,
        dst: PyRef<'_, Cache>,
        src: PyRef<'_, Cache>,
        dst_batch_index: u32,
        src_batch_index: u32,
        offset: u64,
        size: i64,
        req_id: Option<u64>,
    ) -> PyResult<()> {
        let cm = self.cm(py)?;
        let _ = req_id;
        if size != -1 && size <= 0 {
            return Err(param_invalid(
                py,
                format!("size ({size}) is invalid, should be = -1 or > 0"),
            ));
        }
        let (d, s) = (dst.cache(), src.cache());
        py.detach(move || cm.copy_cache(&d, &s, dst_batch_index, src_batch_index, offset, size))
            .or_raise(py)
    }

    /// Copies each source block to each of its listed destination blocks within `cache`.
    fn copy_blocks(
        &self,
        py: Python<'_>,
        cache: PyRef<'_, Cache>,
        copy_block_info: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let cm = self.cm(py)?;
        let d = copy_block_info
            .cast::<PyDict>()
            .map_err(|_| PyTypeError::new_err("copy_block_info should be a dict"))?;
        let mut info = Vec::with_capacity(d.len());
        for (k, v) in d.iter() {
            let src: u64 = k
                .extract()
                .map_err(|_| PyTypeError::new_err("copy_block_info keys should be ints"))?;
            info.push((src, int_list(&v, "copy_block_info values")?));
        }
        let c = cache.cache();
        py.detach(move || cm.copy_blocks(&c, &info)).or_raise(py)
    }

    /// Swaps blocks between a host and a device blocks cache (`src_to_dst` block ids).
    fn swap_blocks(
        &self,
        py: Python<'_>,
        src_cache: PyRef<'_, Cache>,
        dst_cache: PyRef<'_, Cache>,
        src_to_dst: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let cm = self.cm(py)?;
        let d = src_to_dst
            .cast::<PyDict>()
            .map_err(|_| PyTypeError::new_err("src_to_dst should be a dict"))?;
        let pairs: Vec<(u64, u64)> = d
            .iter()
            .map(|(k, v)| Ok((k.extract()?, v.extract()?)))
            .collect::<PyResult<_>>()
            .map_err(|_: PyErr| PyTypeError::new_err("src_to_dst should map ints to ints"))?;
        let (s, dst) = (src_cache.cache(), dst_cache.cache());
        py.detach(move || cm.swap_blocks(&s, &dst, &pairs))
            .or_raise(py)
    }

    /// Re-maps registered memory after a memory error (reserved, as in the vendor's API).
    fn remap_registered_memory(
        &self,
        py: Python<'_>,
        mem_infos: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let cm = self.cm(py)?;
        let infos: Vec<llm_datadist::MemInfo> = if let Ok(m) = mem_infos.cast::<MemInfo>() {
            vec![m.get().0]
        } else {
            mem_infos
                .try_iter()?
                .map(|m| {
                    Ok(m?
                        .cast::<MemInfo>()
                        .map_err(|_| PyTypeError::new_err("mem_infos should hold MemInfo"))?
                        .get()
                        .0)
                })
                .collect::<PyResult<_>>()?
        };
        cm.remap_registered_memory(&infos).or_raise(py)
    }
}

/// A running `transfer_cache_async`.
#[pyclass(module = "tandem._native", name = "CacheTask")]
pub struct CacheTask {
    task: llm_datadist::CacheTask,
}

impl CacheTask {
    /// Waits (without the GIL, interruptibly) until done or `timeout_in_millis` passed.
    fn wait(&self, py: Python<'_>, timeout_in_millis: Option<u64>) -> PyResult<()> {
        let deadline = timeout_in_millis
            .map(|ms| std::time::Instant::now() + std::time::Duration::from_millis(ms));
        wait::interruptibly(py, |tick| {
            let slice = match deadline {
                None => tick,
                Some(d) => d
                    .saturating_duration_since(std::time::Instant::now())
                    .min(tick),
            };
            let done = self.task.wait_done(Some(slice.as_millis() as u64));
            let expired = deadline.is_some_and(|d| std::time::Instant::now() >= d);
            (done || expired).then_some(())
        })
    }
}

#[pymethods]
impl CacheTask {
    /// Waits for the transfer: the first failure, `LLM_SUCCESS`, or `LLM_TIMEOUT` if still
    /// running after `timeout_in_millis`.
    #[pyo3(signature = (timeout_in_millis=None))]
    fn synchronize(&self, py: Python<'_>, timeout_in_millis: Option<u64>) -> PyResult<Py<PyAny>> {
        self.wait(py, timeout_in_millis)?;
        status(py, self.task.synchronize(Some(0)))
    }

    /// One result per configuration (None: its layers never started); all `LLM_TIMEOUT` if
    /// still running after `timeout_in_millis`.
    #[pyo3(signature = (timeout_in_millis=None))]
    fn get_results(
        &self,
        py: Python<'_>,
        timeout_in_millis: Option<u64>,
    ) -> PyResult<Vec<Option<Py<PyAny>>>> {
        self.wait(py, timeout_in_millis)?;
        self.task
            .get_results(Some(0))
            .into_iter()
            .map(|r| r.map(|c| status(py, c)).transpose())
            .collect()
    }
}
