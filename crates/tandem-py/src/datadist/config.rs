//! `LLMConfig` (the validated builder of `init`'s options) and `LLMClusterInfo` (one peer of
//! `link_clusters`), over the crate's `LlmConfig` and `LlmClusterInfo`.

use std::sync::Mutex;

use llm_datadist::{LlmConfig as RsConfig, Options};
use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use super::convert::OrRaise;

/// Options as a Python dict, in emission order.
pub fn options_dict<'py>(py: Python<'py>, o: &Options) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in o.iter() {
        d.set_item(k, v)?;
    }
    Ok(d)
}

/// A `Dict[str, str]` as options (`TypeError` for anything else).
pub fn options_from(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Options> {
    let d = obj
        .cast::<PyDict>()
        .map_err(|_| PyTypeError::new_err(format!("{what} should be a dict")))?;
    let mut o = Options::new();
    for (k, v) in d.iter() {
        let (Ok(k), Ok(v)) = (k.extract::<String>(), v.extract::<String>()) else {
            return Err(PyTypeError::new_err(format!(
                "{what} should map str to str"
            )));
        };
        o.set(k, v);
    }
    Ok(o)
}

fn strict_str(v: &Bound<'_, PyAny>, what: &str) -> PyResult<String> {
    v.cast::<PyString>()
        .map_err(|_| PyTypeError::new_err(format!("{what} should be a str")))?
        .extract()
}

/// `init`'s options, built with the vendor's properties and checks.
#[pyclass(module = "tandem._native", name = "LLMConfig")]
pub struct LLMConfig {
    inner: Mutex<RsConfig>,
}

impl LLMConfig {
    fn with<T>(&self, f: impl FnOnce(&mut RsConfig) -> T) -> T {
        f(&mut self.inner.lock().expect("config lock"))
    }
}

#[pymethods]
impl LLMConfig {
    #[new]
    fn new() -> Self {
        LLMConfig {
            inner: Mutex::new(RsConfig::new()),
        }
    }

    /// `ip:port` to listen on (makes this instance a server); "" when unset.
    #[getter]
    fn listen_ip_info(&self) -> String {
        self.with(|c| c.listen_ip_info().to_string())
    }

    #[setter]
    fn set_listen_ip_info(&self, v: &Bound<'_, PyAny>) -> PyResult<()> {
        let v = strict_str(v, "listen_ip_info")?;
        self.with(|c| c.set_listen_ip_info(v));
        Ok(())
    }

    /// v1 deployment resource path.
    #[getter]
    fn deploy_res_path(&self) -> String {
        self.with(|c| c.deploy_res_path().to_string())
    }

    #[setter]
    fn set_deploy_res_path(&self, v: &Bound<'_, PyAny>) -> PyResult<()> {
        let v = strict_str(v, "deploy_res_path")?;
        self.with(|c| c.set_deploy_res_path(v));
        Ok(())
    }

    /// The device id (an int, or a list for the v1 multi-device form), None when unset.
    #[getter]
    fn device_id(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let ids = self.with(|c| c.device_id().map(<[i32]>::to_vec));
        Ok(match ids.as_deref() {
            None => py.None(),
            Some([one]) => one.into_pyobject(py)?.into_any().unbind(),
            Some(many) => PyList::new(py, many)?.into_any().unbind(),
        })
    }

    #[setter]
    fn set_device_id(&self, py: Python<'_>, v: &Bound<'_, PyAny>) -> PyResult<()> {
        let ids: Vec<i32> = if v.is_instance_of::<PyList>() || v.is_instance_of::<PyTuple>() {
            v.extract()?
        } else if v.is_instance_of::<pyo3::types::PyInt>() {
            vec![v.extract()?]
        } else {
            return Err(PyTypeError::new_err(
                "device_id should be an int or a list of ints",
            ));
        };
        self.with(|c| c.set_device_ids(&ids)).or_raise(py)
    }

    /// Transfer timeout in ms (an int, or a str of digits), None when unset.
    #[getter]
    fn sync_kv_timeout(&self) -> Option<i32> {
        self.with(|c| c.sync_kv_timeout())
    }

    #[setter]
    fn set_sync_kv_timeout(&self, py: Python<'_>, v: &Bound<'_, PyAny>) -> PyResult<()> {
        let ms: i32 = if let Ok(s) = v.cast::<PyString>() {
            let s: String = s.extract()?;
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(super::convert::param_invalid(
                    py,
                    format!("sync_kv_timeout {s:?} is not a number of ms"),
                ));
            }
            s.parse()
                .map_err(|_| super::convert::param_invalid(py, "sync_kv_timeout is not an int32"))?
        } else {
            v.extract()
                .map_err(|_| PyTypeError::new_err("sync_kv_timeout should be an int or a str"))?
        };
        self.with(|c| c.set_sync_kv_timeout(ms)).or_raise(py)
    }

    /// CacheManager (v2) mode.
    #[getter]
    fn enable_cache_manager(&self) -> Option<bool> {
        self.with(|c| c.enable_cache_manager())
    }

    #[setter]
    fn set_enable_cache_manager(&self, on: bool) {
        self.with(|c| c.set_enable_cache_manager(on));
    }

    /// Whether peers may read and write this instance's caches directly.
    #[getter]
    fn enable_remote_cache_accessible(&self) -> Option<bool> {
        self.with(|c| c.enable_remote_cache_accessible())
    }

    #[setter]
    fn set_enable_remote_cache_accessible(&self, on: bool) {
        self.with(|c| c.set_enable_remote_cache_accessible(on));
    }

    /// Local communication resources (JSON or ""), None when unset.
    #[getter]
    fn local_comm_res(&self) -> Option<String> {
        self.with(|c| c.local_comm_res().map(String::from))
    }

    #[setter]
    fn set_local_comm_res(&self, py: Python<'_>, v: &Bound<'_, PyAny>) -> PyResult<()> {
        let v = strict_str(v, "local_comm_res")?;
        self.with(|c| c.set_local_comm_res(v)).or_raise(py)
    }

    /// Device memory pool JSON (`{"memory_size": N, "page_shift": S}`).
    #[getter]
    fn mem_pool_cfg(&self) -> String {
        self.with(|c| c.mem_pool_cfg().to_string())
    }

    #[setter]
    fn set_mem_pool_cfg(&self, py: Python<'_>, v: &Bound<'_, PyAny>) -> PyResult<()> {
        let v = strict_str(v, "mem_pool_cfg")?;
        self.with(|c| c.set_mem_pool_cfg(v)).or_raise(py)
    }

    /// Host memory pool JSON.
    #[getter]
    fn host_mem_pool_cfg(&self) -> String {
        self.with(|c| c.host_mem_pool_cfg().to_string())
    }

    #[setter]
    fn set_host_mem_pool_cfg(&self, py: Python<'_>, v: &Bound<'_, PyAny>) -> PyResult<()> {
        let v = strict_str(v, "host_mem_pool_cfg")?;
        self.with(|c| c.set_host_mem_pool_cfg(v)).or_raise(py)
    }

    /// RDMA traffic class (accepted for compatibility; no RDMA here).
    #[getter]
    fn rdma_traffic_class(&self) -> Option<u32> {
        self.with(|c| c.rdma_traffic_class())
    }

    #[setter]
    fn set_rdma_traffic_class(&self, py: Python<'_>, v: u32) -> PyResult<()> {
        self.with(|c| c.set_rdma_traffic_class(v)).or_raise(py)
    }

    /// RDMA service level (accepted for compatibility; no RDMA here).
    #[getter]
    fn rdma_service_level(&self) -> Option<u32> {
        self.with(|c| c.rdma_service_level())
    }

    #[setter]
    fn set_rdma_service_level(&self, py: Python<'_>, v: u32) -> PyResult<()> {
        self.with(|c| c.set_rdma_service_level(v)).or_raise(py)
    }

    /// Budget for two-sided links to come up, in seconds (0: the default of 120 s).
    #[getter]
    fn link_total_time(&self) -> u32 {
        self.with(|c| c.link_total_time())
    }

    #[setter]
    fn set_link_total_time(&self, v: u32) {
        self.with(|c| c.set_link_total_time(v));
    }

    /// Link retries (1..=100).
    #[getter]
    fn link_retry_count(&self) -> u32 {
        self.with(|c| c.link_retry_count())
    }

    #[setter]
    fn set_link_retry_count(&self, py: Python<'_>, v: u32) -> PyResult<()> {
        self.with(|c| c.set_link_retry_count(v)).or_raise(py)
    }

    /// Transfer backend (`"hixl"`), None when unset.
    #[getter]
    fn transfer_backend(&self) -> Option<String> {
        self.with(|c| c.transfer_backend().map(String::from))
    }

    #[setter]
    fn set_transfer_backend(&self, v: &Bound<'_, PyAny>) -> PyResult<()> {
        let v = strict_str(v, "transfer_backend")?;
        self.with(|c| c.set_transfer_backend(v));
        Ok(())
    }

    /// HIXL's resource JSON, None when unset.
    #[getter]
    fn global_resource_config(&self) -> Option<String> {
        self.with(|c| c.global_resource_config().map(String::from))
    }

    #[setter]
    fn set_global_resource_config(&self, py: Python<'_>, v: &Bound<'_, PyAny>) -> PyResult<()> {
        let v = strict_str(v, "global_resource_config")?;
        self.with(|c| c.set_global_resource_config(v)).or_raise(py)
    }

    /// Whether `switch_role` is allowed (the seed requires it).
    #[getter]
    fn enable_switch_role(&self) -> bool {
        self.with(|c| c.enable_switch_role())
    }

    #[setter]
    fn set_enable_switch_role(&self, on: bool) {
        self.with(|c| c.set_enable_switch_role(on));
    }

    /// Extra GE options, merged first.
    #[getter]
    fn ge_options<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let o = self.with(|c| c.ge_options().clone());
        options_dict(py, &o)
    }

    #[setter]
    fn set_ge_options(&self, v: &Bound<'_, PyAny>) -> PyResult<()> {
        let o = options_from(v, "ge_options")?;
        self.with(|c| c.set_ge_options(o));
        Ok(())
    }

    /// v1 memory tiers JSON.
    #[getter]
    fn buf_pool_cfg(&self) -> String {
        self.with(|c| c.buf_pool_cfg().to_string())
    }

    #[setter]
    fn set_buf_pool_cfg(&self, py: Python<'_>, v: &Bound<'_, PyAny>) -> PyResult<()> {
        let v = strict_str(v, "buf_pool_cfg")?;
        self.with(|c| c.set_buf_pool_cfg(v)).or_raise(py)
    }

    /// v1 pool utilization in [0, 1] (a float).
    #[getter]
    fn mem_utilization(&self) -> f64 {
        self.with(|c| c.mem_utilization())
    }

    #[setter]
    fn set_mem_utilization(&self, py: Python<'_>, v: &Bound<'_, PyAny>) -> PyResult<()> {
        if !v.is_instance_of::<pyo3::types::PyFloat>() {
            return Err(PyTypeError::new_err("mem_utilization should be a float"));
        }
        let u: f64 = v.extract()?;
        self.with(|c| c.set_mem_utilization(u)).or_raise(py)
    }

    /// v1 cluster info JSON.
    #[getter]
    fn cluster_info(&self) -> String {
        self.with(|c| c.cluster_info().to_string())
    }

    #[setter]
    fn set_cluster_info(&self, py: Python<'_>, v: &Bound<'_, PyAny>) -> PyResult<()> {
        let v = strict_str(v, "cluster_info")?;
        self.with(|c| c.set_cluster_info(v)).or_raise(py)
    }

    /// v1 output size, None when unset.
    #[getter]
    fn output_max_size(&self) -> Option<i64> {
        self.with(|c| c.output_max_size())
    }

    #[setter]
    fn set_output_max_size(&self, v: i64) {
        self.with(|c| c.set_output_max_size(v));
    }

    /// Tandem: `auto` (shared memory between processes on one host, else TCP), `tcp`, `shm`.
    #[getter]
    fn transport(&self) -> Option<String> {
        self.with(|c| c.transport().map(String::from))
    }

    #[setter]
    fn set_transport(&self, py: Python<'_>, v: &Bound<'_, PyAny>) -> PyResult<()> {
        let v = strict_str(v, "transport")?;
        self.with(|c| c.set_transport(&v)).or_raise(py)
    }

    /// Tandem: a shared secret peers must present to link.
    #[getter]
    fn auth_token(&self) -> Option<String> {
        self.with(|c| c.auth_token().map(String::from))
    }

    #[setter]
    fn set_auth_token(&self, v: &Bound<'_, PyAny>) -> PyResult<()> {
        let v = strict_str(v, "auth_token")?;
        self.with(|c| c.set_auth_token(v));
        Ok(())
    }

    /// Tandem: parallel TCP streams per link direction (1..=16).
    #[getter]
    fn tcp_streams(&self) -> Option<u32> {
        self.with(|c| c.tcp_streams())
    }

    #[setter]
    fn set_tcp_streams(&self, py: Python<'_>, v: u32) -> PyResult<()> {
        self.with(|c| c.set_tcp_streams(v)).or_raise(py)
    }

    /// The options accumulated so far.
    #[getter]
    fn options<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let o = self.with(|c| c.options().clone());
        options_dict(py, &o)
    }

    /// Merges every set property into the options and returns them (`Dict[str, str]` for
    /// `LLMDataDist.init`).
    fn generate_options<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let o = self.with(|c| c.generate_options());
        options_dict(py, &o)
    }

    /// Alias of `generate_options`.
    fn gen_options<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.generate_options(py)
    }
}

/// One peer of `link_clusters` / `unlink_clusters`.
#[pyclass(module = "tandem._native", name = "LLMClusterInfo")]
pub struct LLMClusterInfo {
    pub(crate) inner: Mutex<llm_datadist::LlmClusterInfo>,
    role_type: Mutex<Option<Py<PyAny>>>,
}

impl LLMClusterInfo {
    /// A copy of the described peer.
    pub fn info(&self) -> llm_datadist::LlmClusterInfo {
        self.inner.lock().expect("cluster info lock").clone()
    }
}

/// An IP given as a dotted IPv4 string or as the vendor's integer (`RuntimeError` when a
/// string does not parse, as the vendor's layer).
fn ip_int(ip: &Bound<'_, PyAny>) -> PyResult<u32> {
    if let Ok(s) = ip.cast::<PyString>() {
        let s: String = s.extract()?;
        return llm_datadist::ip_to_int(&s).map_err(|e| PyRuntimeError::new_err(e.message));
    }
    ip.extract()
        .map_err(|_| PyTypeError::new_err("ip should be a str or an int"))
}

#[pymethods]
impl LLMClusterInfo {
    #[new]
    fn new() -> Self {
        LLMClusterInfo {
            inner: Mutex::new(Default::default()),
            role_type: Mutex::new(None),
        }
    }

    /// The peer's cluster id.
    #[getter]
    fn remote_cluster_id(&self) -> u64 {
        self.inner
            .lock()
            .expect("cluster info lock")
            .remote_cluster_id
    }

    #[setter]
    fn set_remote_cluster_id(&self, id: u64) {
        self.inner
            .lock()
            .expect("cluster info lock")
            .remote_cluster_id = id;
    }

    /// Accepted and not used, as in the vendor's API.
    #[getter]
    fn remote_role_type(&self, py: Python<'_>) -> Py<PyAny> {
        match &*self.role_type.lock().expect("role lock") {
            Some(r) => r.clone_ref(py),
            None => py.None(),
        }
    }

    #[setter]
    fn set_remote_role_type(&self, role: Py<PyAny>) {
        *self.role_type.lock().expect("role lock") = Some(role);
    }

    /// Adds a local address (`ip` as a dotted string or an int; the port is not used).
    fn append_local_ip_info(&self, ip: &Bound<'_, PyAny>, port: u16) -> PyResult<()> {
        let ip = ip_int(ip)?;
        self.inner
            .lock()
            .expect("cluster info lock")
            .append_local_ip_int(ip, port);
        Ok(())
    }

    /// Adds the peer's listen address.
    fn append_remote_ip_info(&self, ip: &Bound<'_, PyAny>, port: u16) -> PyResult<()> {
        let ip = ip_int(ip)?;
        self.inner
            .lock()
            .expect("cluster info lock")
            .append_remote_ip_int(ip, port);
        Ok(())
    }

    /// Local addresses as `(ip_int, port)`.
    #[getter]
    fn local_ip_info_list(&self) -> Vec<(u32, u16)> {
        self.inner
            .lock()
            .expect("cluster info lock")
            .local_ip_info_list()
            .to_vec()
    }

    /// Remote addresses as `(ip_int, port)`.
    #[getter]
    fn remote_ip_info_list(&self) -> Vec<(u32, u16)> {
        self.inner
            .lock()
            .expect("cluster info lock")
            .remote_ip_info_list()
            .to_vec()
    }
}
