//! `LLMDataDist`: one instance per process; links, role switches, and its `CacheManager`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use llm_datadist::{LlmDataDist, LlmRole, LlmStatusCode, Options};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use super::cache_manager::{CacheManager, Session};
use super::config::{options_from, LLMClusterInfo};
use super::convert::{member, not_initialized, param_invalid, status, value_of, OrRaise};

/// The initialized instance of this process (the vendor's `llm_engine_instance`), finalized at
/// interpreter exit by `tandem.llm_datadist`'s `atexit` hook.
static LIVE: Mutex<Option<Arc<Shared>>> = Mutex::new(None);

/// State shared by an `LLMDataDist` and the `CacheManager`s it hands out.
pub struct Shared {
    dd: Mutex<LlmDataDist>,
    session: Mutex<Option<Arc<Session>>>,
}

impl Shared {
    fn finalize(&self) {
        if let Some(s) = self.session.lock().expect("session lock").take() {
            s.alive.store(false, Ordering::Release);
        }
        self.dd.lock().expect("datadist lock").finalize();
    }
}

/// Finalizes the live instance, if any (the `atexit` hook).
#[pyfunction]
pub fn finalize_live(py: Python<'_>) {
    let live = LIVE.lock().expect("live lock").take();
    if let Some(shared) = live {
        py.detach(|| shared.finalize());
    }
}

fn role_of(obj: &Bound<'_, PyAny>) -> PyResult<LlmRole> {
    let v = value_of(obj, "LLMRole", "role")?;
    LlmRole::parse(&v.to_string()).or_raise(obj.py())
}

fn clusters_of(
    py: Python<'_>,
    clusters: &Bound<'_, PyAny>,
) -> PyResult<Vec<llm_datadist::LlmClusterInfo>> {
    if !(clusters.is_instance_of::<PyList>() || clusters.is_instance_of::<PyTuple>()) {
        return Err(PyTypeError::new_err(
            "clusters should be a list or tuple of LLMClusterInfo",
        ));
    }
    let _ = py;
    clusters
        .try_iter()?
        .map(|c| {
            let c = c?;
            let info = c.cast::<LLMClusterInfo>().map_err(|_| {
                PyTypeError::new_err("clusters should be a list or tuple of LLMClusterInfo")
            })?;
            Ok(info.borrow().info())
        })
        .collect()
}

fn codes(
    py: Python<'_>,
    (overall, each): (LlmStatusCode, Vec<LlmStatusCode>),
) -> PyResult<(Py<PyAny>, Vec<Py<PyAny>>)> {
    Ok((
        status(py, overall)?,
        each.into_iter()
            .map(|c| status(py, c))
            .collect::<PyResult<_>>()?,
    ))
}

/// An LLM-DataDist instance.
#[pyclass(module = "tandem._native", name = "LLMDataDist")]
pub struct LLMDataDist {
    shared: Arc<Shared>,
    cluster_id: u64,
    /// Whether the options leave `local_comm_res` unset or empty (then every `link_clusters`
    /// entry needs a local ip, as the vendor's layer requires).
    needs_local_ip: AtomicBool,
}

impl LLMDataDist {
    fn session(&self) -> PyResult<Arc<Session>> {
        self.shared
            .session
            .lock()
            .expect("session lock")
            .clone()
            .ok_or_else(not_initialized)
    }
}

#[pymethods]
impl LLMDataDist {
    /// `LLMDataDist(role: LLMRole, cluster_id: int)`: not initialized yet.
    #[new]
    fn new(role: &Bound<'_, PyAny>, cluster_id: u64) -> PyResult<Self> {
        let role = role_of(role)?;
        Ok(LLMDataDist {
            shared: Arc::new(Shared {
                dd: Mutex::new(LlmDataDist::new(role, cluster_id)),
                session: Mutex::new(None),
            }),
            cluster_id,
            needs_local_ip: AtomicBool::new(true),
        })
    }

    /// This instance's cluster id.
    #[getter]
    fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    /// The current role (`LLMRole`).
    #[getter]
    fn role(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let role = self.shared.dd.lock().expect("datadist lock").role();
        member(py, "LLMRole", role as i64)
    }

    /// Initializes with `options` (`LLMConfig.generate_options()`); a no-op when already
    /// initialized. CacheManager mode and `ge.exec.deviceId` are required.
    fn init(&self, py: Python<'_>, options: &Bound<'_, PyAny>) -> PyResult<()> {
        if !options.is_instance_of::<PyDict>() {
            return Err(PyTypeError::new_err("options should be a dict"));
        }
        let opts: Options = options_from(options, "options")?;
        if self.shared.session.lock().expect("session lock").is_some() {
            return Ok(());
        }
        let local = opts.get(llm_datadist::config::keys::LOCAL_COMM_RES);
        self.needs_local_ip
            .store(local.is_none_or(str::is_empty), Ordering::Relaxed);
        let shared = self.shared.clone();
        let cm = py
            .detach(move || {
                let mut dd = shared.dd.lock().expect("datadist lock");
                dd.init(&opts)?;
                dd.cache_manager()
            })
            .or_raise(py)?;
        *self.shared.session.lock().expect("session lock") = Some(Arc::new(Session::new(cm)));
        *LIVE.lock().expect("live lock") = Some(self.shared.clone());
        Ok(())
    }

    /// Releases links, registrations, pools and the listener; a no-op when not initialized.
    fn finalize(&self, py: Python<'_>) {
        let shared = self.shared.clone();
        py.detach(move || shared.finalize());
        let mut live = LIVE.lock().expect("live lock");
        if live.as_ref().is_some_and(|l| Arc::ptr_eq(l, &self.shared)) {
            *live = None;
        }
    }

    /// The v2 cache manager.
    #[getter]
    fn cache_manager(&self, py: Python<'_>) -> PyResult<Py<CacheManager>> {
        Py::new(py, CacheManager::new(self.session()?))
    }

    /// The v1 manager, which CacheManager mode does not have.
    #[getter]
    fn kv_cache_manager(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.session()?;
        Err(param_invalid(
            py,
            "kv_cache_manager is not supported when llm.EnableCacheManager is configured",
        ))
    }

    /// v1 only: raises in CacheManager mode.
    fn check_link_status(&self, py: Python<'_>, remote_cluster_id: u64) -> PyResult<()> {
        self.session()?;
        let _ = remote_cluster_id;
        Err(param_invalid(
            py,
            "check_link_status is not supported when llm.EnableCacheManager is configured",
        ))
    }

    /// Links to servers (one-sided); returns `(overall, [per cluster])` status codes.
    #[pyo3(signature = (clusters, timeout=3000))]
    fn link_clusters(
        &self,
        py: Python<'_>,
        clusters: &Bound<'_, PyAny>,
        timeout: i32,
    ) -> PyResult<(Py<PyAny>, Vec<Py<PyAny>>)> {
        self.session()?;
        if timeout <= 0 {
            return Err(param_invalid(py, "Param timeout should be greater than 0."));
        }
        let infos = clusters_of(py, clusters)?;
        if self.needs_local_ip.load(Ordering::Relaxed)
            && infos.iter().any(|c| c.local_ip_info_list().is_empty())
        {
            return Err(param_invalid(
                py,
                "local_ip_info_list is empty. Call append_local_ip_info to add local_ip_info \
                 when local_comm_res option is unspecified or empty.",
            ));
        }
        let shared = self.shared.clone();
        let result = py
            .detach(move || {
                shared
                    .dd
                    .lock()
                    .expect("datadist lock")
                    .link_clusters(&infos, timeout)
            })
            .or_raise(py)?;
        codes(py, result)
    }

    /// Unlinks (normally: both ends; `force`: only the local end).
    #[pyo3(signature = (clusters, timeout=3000, force=None))]
    fn unlink_clusters(
        &self,
        py: Python<'_>,
        clusters: &Bound<'_, PyAny>,
        timeout: i32,
        force: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(Py<PyAny>, Vec<Py<PyAny>>)> {
        self.session()?;
        let force = match force {
            None => false,
            Some(f) => f
                .cast::<pyo3::types::PyBool>()
                .map_err(|_| PyTypeError::new_err("force should be a bool"))?
                .is_true(),
        };
        if timeout <= 0 {
            return Err(param_invalid(py, "Param timeout should be greater than 0."));
        }
        let infos = clusters_of(py, clusters)?;
        let shared = self.shared.clone();
        let result = py
            .detach(move || {
                shared
                    .dd
                    .lock()
                    .expect("datadist lock")
                    .unlink_clusters(&infos, timeout, force)
            })
            .or_raise(py)?;
        codes(py, result)
    }

    /// Switches role (no links may remain); `{"llm.listenIpInfo": "ip:port"}` listens there.
    #[pyo3(signature = (role, switch_options=None))]
    fn switch_role(
        &self,
        py: Python<'_>,
        role: &Bound<'_, PyAny>,
        switch_options: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.session()?;
        let role = role_of(role)?;
        let opts = switch_options
            .filter(|o| !o.is_none())
            .map(|o| options_from(o, "switch_options"))
            .transpose()?;
        let shared = self.shared.clone();
        py.detach(move || {
            shared
                .dd
                .lock()
                .expect("datadist lock")
                .switch_role(role, opts.as_ref())
        })
        .or_raise(py)
    }

    /// Two-sided link: every member of `cluster_rank_info` (cluster id -> rank in the HCCL
    /// `rank_table`) calls it with the same arguments; returns the comm id. Poll
    /// `query_register_mem_status` until `OK` before transferring.
    fn link(
        &self,
        py: Python<'_>,
        comm_name: &Bound<'_, PyAny>,
        cluster_rank_info: &Bound<'_, PyAny>,
        rank_table: &Bound<'_, PyAny>,
    ) -> PyResult<u64> {
        let session = self.session()?;
        let comm_name: String = comm_name
            .extract()
            .map_err(|_| PyTypeError::new_err("comm_name should be a str"))?;
        let rank_table: String = rank_table
            .extract()
            .map_err(|_| PyTypeError::new_err("rank_table should be a str"))?;
        let d = cluster_rank_info
            .cast::<PyDict>()
            .map_err(|_| PyTypeError::new_err("cluster_rank_info should be a dict"))?;
        let mut members = Vec::with_capacity(d.len());
        for (k, v) in d.iter() {
            let (Ok(k), Ok(v)) = (k.extract::<u64>(), v.extract::<u32>()) else {
                return Err(PyTypeError::new_err(
                    "cluster_rank_info should map cluster ids (uint64) to ranks (uint32)",
                ));
            };
            members.push((k, v));
        }
        let shared = self.shared.clone();
        let id = py
            .detach(move || {
                shared
                    .dd
                    .lock()
                    .expect("datadist lock")
                    .link(&comm_name, &members, &rank_table)
            })
            .or_raise(py)?;
        session.linked.store(true, Ordering::Release);
        Ok(id)
    }

    /// Leaves a two-sided link domain.
    fn unlink(&self, py: Python<'_>, comm_id: u64) -> PyResult<()> {
        self.session()?;
        let shared = self.shared.clone();
        py.detach(move || shared.dd.lock().expect("datadist lock").unlink(comm_id))
            .or_raise(py)
    }

    /// `RegisterMemStatus.OK` once every member of domain `comm_id` is linked.
    fn query_register_mem_status(&self, py: Python<'_>, comm_id: u64) -> PyResult<Py<PyAny>> {
        self.session()?;
        let s = self
            .shared
            .dd
            .lock()
            .expect("datadist lock")
            .query_register_mem_status(comm_id)
            .or_raise(py)?;
        member(py, "RegisterMemStatus", s as i64)
    }
}
