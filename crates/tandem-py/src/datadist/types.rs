//! The value types: `CacheDesc`, the three cache keys, `Cache`, `MemInfo`, and the two
//! transfer configurations, over the crate's types.

use std::ops::Range;
use std::sync::Mutex;

use llm_datadist::{DataType, Placement, UINT64_MAX};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyRange, PyTuple};

use super::convert::{layer_range, member, param_invalid, value_of, OrRaise};

/// A Python `range` for a layer range.
pub fn py_range<'py>(py: Python<'py>, r: &Range<usize>) -> PyResult<Bound<'py, PyRange>> {
    PyRange::new(py, r.start as isize, r.end as isize)
}

/// The description of a cache: `num_tensors` tensors of one shape and data type.
#[pyclass(module = "tandem._native", name = "CacheDesc")]
pub struct CacheDesc {
    pub(crate) inner: Mutex<llm_datadist::CacheDesc>,
}

impl CacheDesc {
    /// A copy of the description.
    pub fn desc(&self) -> llm_datadist::CacheDesc {
        self.inner.lock().expect("desc lock").clone()
    }

    /// A Python `CacheDesc` for `d`.
    pub fn wrap(py: Python<'_>, d: llm_datadist::CacheDesc) -> PyResult<Py<CacheDesc>> {
        Py::new(
            py,
            CacheDesc {
                inner: Mutex::new(d),
            },
        )
    }
}

#[pymethods]
impl CacheDesc {
    #[new]
    #[pyo3(signature = (num_tensors, shape, data_type, placement=None, batch_dim_index=0, seq_len_dim_index=-1, kv_tensor_format=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        num_tensors: u32,
        shape: Vec<i64>,
        data_type: &Bound<'_, PyAny>,
        placement: Option<&Bound<'_, PyAny>>,
        batch_dim_index: usize,
        seq_len_dim_index: i64,
        kv_tensor_format: Option<String>,
    ) -> PyResult<Self> {
        let dt = value_of(data_type, "DataType", "data_type")?;
        let data_type = DataType::from_value(dt as u32)
            .ok_or_else(|| param_invalid(py, format!("unknown data type {dt}")))?;
        let placement = match placement {
            None => Placement::Device,
            Some(p) => match value_of(p, "Placement", "placement")? {
                0 => Placement::Host,
                _ => Placement::Device,
            },
        };
        let desc = llm_datadist::CacheDesc {
            num_tensors,
            shape,
            data_type,
            placement,
            batch_dim_index,
            seq_len_dim_index,
            kv_tensor_format,
        };
        desc.validate().or_raise(py)?;
        Ok(CacheDesc {
            inner: Mutex::new(desc),
        })
    }

    /// Tensors in the cache.
    #[getter]
    fn num_tensors(&self) -> u32 {
        self.desc().num_tensors
    }

    /// The shape of each tensor.
    #[getter]
    fn shape(&self) -> Vec<i64> {
        self.desc().shape
    }

    /// The element type (`DataType`).
    #[getter]
    fn data_type(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        member(py, "DataType", self.desc().data_type as i64)
    }

    /// Where the cache lives (`Placement`).
    #[getter]
    fn placement(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        member(py, "Placement", self.desc().placement as i64)
    }

    /// Index of the batch (or block) dimension.
    #[getter]
    fn batch_dim(&self) -> usize {
        self.desc().batch_dim_index
    }

    /// Size of the batch (or block) dimension.
    #[getter]
    fn batch_size(&self) -> u64 {
        self.desc().batch_size()
    }

    /// Index of the sequence dimension, or -1.
    #[getter]
    fn seq_len_dim_index(&self) -> i64 {
        self.desc().seq_len_dim_index
    }

    /// The KV tensor format label, if any.
    #[getter]
    fn kv_tensor_format(&self) -> Option<String> {
        self.desc().kv_tensor_format
    }

    /// Bytes of one tensor.
    #[getter]
    fn size(&self) -> u64 {
        self.desc().size()
    }

    /// Sets dimension `dim_index` to `value`.
    fn update_dim(&self, py: Python<'_>, dim_index: usize, value: i64) -> PyResult<()> {
        self.inner
            .lock()
            .expect("desc lock")
            .update_dim(dim_index, value)
            .or_raise(py)
    }

    fn __repr__(&self) -> String {
        let d = self.desc();
        format!(
            "CacheDesc(num_tensors={}, shape={:?}, data_type={:?}, placement={:?})",
            d.num_tensors, d.shape, d.data_type, d.placement
        )
    }
}

/// Positional and keyword arguments named as the vendor's `*args, **kwargs` keys take them:
/// positions in `order`, `aliases` of a name (`prompt_cluster_id` for `cluster_id`).
fn named_args(
    py: Python<'_>,
    what: &str,
    args: &Bound<'_, PyTuple>,
    kwargs: Option<&Bound<'_, PyDict>>,
    order: &[&str],
    aliases: &[(&str, &str)],
) -> PyResult<Vec<Option<u64>>> {
    if args.len() > order.len() {
        return Err(param_invalid(
            py,
            format!("{what} takes at most {} arguments", order.len()),
        ));
    }
    let mut values: Vec<Option<u64>> = vec![None; order.len()];
    for (i, a) in args.iter().enumerate() {
        values[i] = Some(a.extract().map_err(|_| {
            PyTypeError::new_err(format!("{what}: {} should be an int >= 0", order[i]))
        })?);
    }
    if let Some(kw) = kwargs {
        for (k, v) in kw.iter() {
            let k: String = k.extract()?;
            let name = aliases
                .iter()
                .find(|(alias, _)| *alias == k)
                .map_or(k.as_str(), |(_, n)| n);
            let Some(i) = order.iter().position(|n| *n == name) else {
                return Err(param_invalid(py, format!("{what} has no argument {k:?}")));
            };
            if values[i].is_some() {
                return Err(param_invalid(py, format!("{what}: {name} given twice")));
            }
            values[i] =
                Some(v.extract().map_err(|_| {
                    PyTypeError::new_err(format!("{what}: {k} should be an int >= 0"))
                })?);
        }
    }
    Ok(values)
}

/// Names a batch slot of a contiguous cache by request id (or prefix id).
#[pyclass(module = "tandem._native", name = "CacheKey", frozen, eq, hash)]
#[derive(PartialEq, Eq, Hash)]
pub struct CacheKey(pub llm_datadist::CacheKey);

#[pymethods]
impl CacheKey {
    /// `CacheKey(cluster_id | prompt_cluster_id, req_id, model_id=0, prefix_id=UINT64_MAX)`.
    #[new]
    #[pyo3(signature = (*args, **kwargs))]
    fn new(
        py: Python<'_>,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let v = named_args(
            py,
            "CacheKey",
            args,
            kwargs,
            &["cluster_id", "req_id", "model_id", "prefix_id"],
            &[("prompt_cluster_id", "cluster_id")],
        )?;
        let cluster_id = v[0].ok_or_else(|| param_invalid(py, "CacheKey needs cluster_id"))?;
        let prefix_id = v[3].unwrap_or(UINT64_MAX);
        let req_id = match (v[1], prefix_id) {
            (Some(r), _) => r,
            (None, p) if p != UINT64_MAX => UINT64_MAX,
            (None, _) => return Err(param_invalid(py, "CacheKey needs req_id (or prefix_id)")),
        };
        Ok(CacheKey(llm_datadist::CacheKey {
            cluster_id,
            req_id,
            model_id: v[2].unwrap_or(0),
            prefix_id,
        }))
    }

    /// The owner's cluster id.
    #[getter]
    fn cluster_id(&self) -> u64 {
        self.0.cluster_id
    }

    /// Alias of `cluster_id`.
    #[getter]
    fn prompt_cluster_id(&self) -> u64 {
        self.0.cluster_id
    }

    /// The request id (UINT64_MAX when the key names a prefix).
    #[getter]
    fn req_id(&self) -> u64 {
        self.0.req_id
    }

    /// The prefix id (UINT64_MAX when unset).
    #[getter]
    fn prefix_id(&self) -> u64 {
        self.0.prefix_id
    }

    /// The model id.
    #[getter]
    fn model_id(&self) -> u64 {
        self.0.model_id
    }

    fn __repr__(&self) -> String {
        let k = &self.0;
        format!(
            "CacheKey(cluster_id={}, req_id={}, model_id={}, prefix_id={})",
            k.cluster_id, k.req_id, k.model_id, k.prefix_id
        )
    }
}

/// Names slot `batch_index` of cache `cache_id` on cluster `cluster_id`.
#[pyclass(
    module = "tandem._native",
    name = "CacheKeyByIdAndIndex",
    frozen,
    eq,
    hash
)]
#[derive(PartialEq, Eq, Hash)]
pub struct CacheKeyByIdAndIndex(pub llm_datadist::CacheKeyByIdAndIndex);

#[pymethods]
impl CacheKeyByIdAndIndex {
    #[new]
    #[pyo3(signature = (cluster_id, cache_id, batch_index=0))]
    fn new(cluster_id: u64, cache_id: i64, batch_index: u32) -> Self {
        CacheKeyByIdAndIndex(llm_datadist::CacheKeyByIdAndIndex::new(
            cluster_id,
            cache_id,
            batch_index,
        ))
    }

    /// The owner's cluster id.
    #[getter]
    fn cluster_id(&self) -> u64 {
        self.0.cluster_id
    }

    /// The owner's cache id.
    #[getter]
    fn cache_id(&self) -> i64 {
        self.0.cache_id
    }

    /// The batch slot.
    #[getter]
    fn batch_index(&self) -> u32 {
        self.0.batch_index
    }

    fn __repr__(&self) -> String {
        let k = &self.0;
        format!(
            "CacheKeyByIdAndIndex(cluster_id={}, cache_id={}, batch_index={})",
            k.cluster_id, k.cache_id, k.batch_index
        )
    }
}

/// Names the blocks cache of `model_id` on cluster `cluster_id`.
#[pyclass(module = "tandem._native", name = "BlocksCacheKey", frozen, eq, hash)]
#[derive(PartialEq, Eq, Hash)]
pub struct BlocksCacheKey(pub llm_datadist::BlocksCacheKey);

#[pymethods]
impl BlocksCacheKey {
    /// `BlocksCacheKey(cluster_id | prompt_cluster_id, model_id=0)`.
    #[new]
    #[pyo3(signature = (*args, **kwargs))]
    fn new(
        py: Python<'_>,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let v = named_args(
            py,
            "BlocksCacheKey",
            args,
            kwargs,
            &["cluster_id", "model_id"],
            &[("prompt_cluster_id", "cluster_id")],
        )?;
        let cluster_id =
            v[0].ok_or_else(|| param_invalid(py, "BlocksCacheKey needs cluster_id"))?;
        Ok(BlocksCacheKey(llm_datadist::BlocksCacheKey::new(
            cluster_id,
            v[1].unwrap_or(0),
        )))
    }

    /// The owner's cluster id.
    #[getter]
    fn cluster_id(&self) -> u64 {
        self.0.cluster_id
    }

    /// Alias of `cluster_id`.
    #[getter]
    fn prompt_cluster_id(&self) -> u64 {
        self.0.cluster_id
    }

    /// The model id.
    #[getter]
    fn model_id(&self) -> u64 {
        self.0.model_id
    }

    fn __repr__(&self) -> String {
        format!(
            "BlocksCacheKey(cluster_id={}, model_id={})",
            self.0.cluster_id, self.0.model_id
        )
    }
}

/// A cache made by the `CacheManager` (or `Cache.create_cpu_cache`).
#[pyclass(module = "tandem._native", name = "Cache")]
pub struct Cache {
    pub(crate) inner: Mutex<llm_datadist::Cache>,
}

impl Cache {
    /// A copy of the cache handle.
    pub fn cache(&self) -> llm_datadist::Cache {
        self.inner.lock().expect("cache lock").clone()
    }

    /// A Python `Cache` for `c`.
    pub fn wrap(py: Python<'_>, c: llm_datadist::Cache) -> PyResult<Py<Cache>> {
        Py::new(
            py,
            Cache {
                inner: Mutex::new(c),
            },
        )
    }
}

#[pymethods]
impl Cache {
    /// Wraps host memory (one address per tensor) as a blocks cache for `swap_blocks`; the
    /// description's placement must be `Placement.HOST`. The memory must stay valid while the
    /// cache is used.
    #[classmethod]
    fn create_cpu_cache(
        _cls: &Bound<'_, pyo3::types::PyType>,
        py: Python<'_>,
        cache_desc: PyRef<'_, CacheDesc>,
        addrs: Vec<u64>,
    ) -> PyResult<Cache> {
        // SAFETY: the vendor's contract: the caller's addresses point to memory of the described
        // size that outlives the cache's use.
        let c = unsafe { llm_datadist::Cache::create_cpu_cache(cache_desc.desc(), addrs) }
            .or_raise(py)?;
        Ok(Cache {
            inner: Mutex::new(c),
        })
    }

    /// The cache id (from 1; -1 for CPU caches).
    #[getter]
    fn cache_id(&self) -> i64 {
        self.cache().cache_id()
    }

    /// Its description.
    #[getter]
    fn cache_desc(&self, py: Python<'_>) -> PyResult<Py<CacheDesc>> {
        CacheDesc::wrap(py, self.cache().cache_desc().clone())
    }

    /// One address per tensor (empty after deallocation).
    #[getter]
    fn tensor_addrs(&self) -> Vec<u64> {
        self.cache().tensor_addrs().to_vec()
    }

    /// The v1 shape of the addresses: one list per device (one device here).
    #[getter]
    fn per_device_tensor_addrs(&self) -> Vec<Vec<u64>> {
        vec![self.cache().tensor_addrs().to_vec()]
    }

    /// Whether a blocks API made it.
    #[getter]
    fn is_blocks_cache(&self) -> bool {
        self.cache().is_blocks_cache()
    }

    fn __repr__(&self) -> String {
        let c = self.cache();
        format!(
            "Cache(cache_id={}, is_blocks_cache={}, tensors={})",
            c.cache_id(),
            c.is_blocks_cache(),
            c.tensor_addrs().len()
        )
    }
}

/// Registered memory to remap after a memory error.
#[pyclass(module = "tandem._native", name = "MemInfo", frozen)]
pub struct MemInfo(pub llm_datadist::MemInfo);

#[pymethods]
impl MemInfo {
    #[new]
    fn new(mem_type: &Bound<'_, PyAny>, addr: u64, size: u64) -> PyResult<Self> {
        let t = match value_of(mem_type, "Memtype", "mem_type")? {
            0 => llm_datadist::MemType::Device,
            _ => llm_datadist::MemType::Host,
        };
        Ok(MemInfo(llm_datadist::MemInfo {
            mem_type: t,
            addr,
            size,
        }))
    }

    /// The memory type (`Memtype`).
    #[getter]
    fn mem_type(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        member(py, "Memtype", self.0.mem_type as i64)
    }

    /// Start address.
    #[getter]
    fn addr(&self) -> u64 {
        self.0.addr
    }

    /// Bytes.
    #[getter]
    fn size(&self) -> u64 {
        self.0.size
    }
}

/// An address-based destination of `transfer_cache_async` (remote cache access off).
#[pyclass(module = "tandem._native", name = "TransferConfig")]
pub struct TransferConfig {
    pub(crate) inner: Mutex<llm_datadist::TransferConfig>,
}

#[pymethods]
impl TransferConfig {
    #[new]
    #[pyo3(signature = (dst_cluster_id, dst_addrs, src_layer_range=None, src_batch_index=0))]
    fn new(
        py: Python<'_>,
        dst_cluster_id: u64,
        dst_addrs: Vec<u64>,
        src_layer_range: Option<&Bound<'_, PyAny>>,
        src_batch_index: u32,
    ) -> PyResult<Self> {
        Ok(TransferConfig {
            inner: Mutex::new(llm_datadist::TransferConfig {
                dst_cluster_id,
                dst_addrs,
                src_layer_range: layer_range(py, src_layer_range, "src_layer_range")?,
                src_batch_index,
            }),
        })
    }

    /// Destination cluster.
    #[getter]
    fn dst_cluster_id(&self) -> u64 {
        self.inner.lock().expect("config lock").dst_cluster_id
    }

    #[setter]
    fn set_dst_cluster_id(&self, v: u64) {
        self.inner.lock().expect("config lock").dst_cluster_id = v;
    }

    /// Destination addresses, two per layer (K, V).
    #[getter]
    fn dst_addrs(&self) -> Vec<u64> {
        self.inner.lock().expect("config lock").dst_addrs.clone()
    }

    #[setter]
    fn set_dst_addrs(&self, v: Vec<u64>) {
        self.inner.lock().expect("config lock").dst_addrs = v;
    }

    /// Source layers (None: all).
    #[getter]
    fn src_layer_range<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyRange>>> {
        let r = self
            .inner
            .lock()
            .expect("config lock")
            .src_layer_range
            .clone();
        r.map(|r| py_range(py, &r)).transpose()
    }

    #[setter]
    fn set_src_layer_range(&self, py: Python<'_>, v: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let r = layer_range(py, v, "src_layer_range")?;
        self.inner.lock().expect("config lock").src_layer_range = r;
        Ok(())
    }

    /// Source batch slot.
    #[getter]
    fn src_batch_index(&self) -> u32 {
        self.inner.lock().expect("config lock").src_batch_index
    }

    #[setter]
    fn set_src_batch_index(&self, v: u32) {
        self.inner.lock().expect("config lock").src_batch_index = v;
    }
}

/// A key-based destination of `transfer_cache_async` (remote cache access on).
#[pyclass(module = "tandem._native", name = "TransferWithCacheKeyConfig")]
pub struct TransferWithCacheKeyConfig {
    pub(crate) inner: llm_datadist::TransferWithCacheKeyConfig,
    key: Py<PyAny>,
}

#[pymethods]
impl TransferWithCacheKeyConfig {
    #[new]
    #[pyo3(signature = (cache_key, src_layer_range, dst_layer_range, src_batch_index=0))]
    fn new(
        py: Python<'_>,
        cache_key: &Bound<'_, PyAny>,
        src_layer_range: &Bound<'_, PyAny>,
        dst_layer_range: &Bound<'_, PyAny>,
        src_batch_index: u32,
    ) -> PyResult<Self> {
        let key = if let Ok(k) = cache_key.cast::<BlocksCacheKey>() {
            if src_batch_index != 0 {
                return Err(param_invalid(
                    py,
                    "src_batch_index must be 0 with a BlocksCacheKey",
                ));
            }
            llm_datadist::TransferKey::Blocks(k.get().0)
        } else if let Ok(k) = cache_key.cast::<CacheKeyByIdAndIndex>() {
            llm_datadist::TransferKey::ById(k.get().0)
        } else {
            return Err(PyTypeError::new_err(
                "cache_key should be a BlocksCacheKey or a CacheKeyByIdAndIndex",
            ));
        };
        let src = layer_range(py, Some(src_layer_range), "src_layer_range")?;
        let dst = layer_range(py, Some(dst_layer_range), "dst_layer_range")?;
        let (Some(src), Some(dst)) = (src, dst) else {
            return Err(param_invalid(py, "both layer ranges are required"));
        };
        if src.len() != dst.len() {
            return Err(param_invalid(py, "layer ranges must have the same length"));
        }
        Ok(TransferWithCacheKeyConfig {
            inner: llm_datadist::TransferWithCacheKeyConfig {
                cache_key: key,
                src_layer_range: src,
                dst_layer_range: dst,
                src_batch_index,
            },
            key: cache_key.clone().unbind(),
        })
    }

    /// The destination key.
    #[getter]
    fn cache_key(&self, py: Python<'_>) -> Py<PyAny> {
        self.key.clone_ref(py)
    }

    /// The destination cluster (the key's).
    #[getter]
    fn dst_cluster_id(&self) -> u64 {
        match self.inner.cache_key {
            llm_datadist::TransferKey::Blocks(k) => k.cluster_id,
            llm_datadist::TransferKey::ById(k) => k.cluster_id,
        }
    }

    /// Source layers.
    #[getter]
    fn src_layer_range<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyRange>> {
        py_range(py, &self.inner.src_layer_range)
    }

    /// Destination layers.
    #[getter]
    fn dst_layer_range<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyRange>> {
        py_range(py, &self.inner.dst_layer_range)
    }

    /// Source batch slot.
    #[getter]
    fn src_batch_index(&self) -> u32 {
        self.inner.src_batch_index
    }
}

/// Any of the three keys.
pub fn any_key(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<llm_datadist::AnyCacheKey> {
    if let Ok(k) = obj.cast::<CacheKey>() {
        Ok(k.get().0.into())
    } else if let Ok(k) = obj.cast::<CacheKeyByIdAndIndex>() {
        Ok(k.get().0.into())
    } else if let Ok(k) = obj.cast::<BlocksCacheKey>() {
        Ok(k.get().0.into())
    } else {
        Err(PyTypeError::new_err(format!(
            "{what} should be a CacheKey, CacheKeyByIdAndIndex or BlocksCacheKey"
        )))
    }
}
