//! `llm_datadist` for Python: the vendor's v2 (CacheManager) API over the Rust
//! `llm-datadist` crate. Classes keep the vendor's names and signatures; enums and
//! `LLMException` are Python classes (`tandem.llm_datadist`) built from the tables here, so
//! their values cannot drift from the Rust ones.
//!
//! Memory is given as integer addresses (a CPU tensor's `data_ptr()`, a numpy array's
//! `ctypes.data`), exactly as the vendor API takes device pointers, and transfers read and
//! write it in place. `Placement.DEVICE` is host memory here: this build has no
//! accelerator, and `device_id` names the memory domain (a NUMA node).

mod cache_manager;
mod config;
mod convert;
mod engine;
mod types;

use pyo3::prelude::*;

/// Registers the `llm_datadist` classes and tables on the native module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(convert::enum_members, m)?)?;
    m.add_class::<config::LLMConfig>()?;
    m.add_class::<config::LLMClusterInfo>()?;
    m.add_class::<types::CacheDesc>()?;
    m.add_class::<types::CacheKey>()?;
    m.add_class::<types::CacheKeyByIdAndIndex>()?;
    m.add_class::<types::BlocksCacheKey>()?;
    m.add_class::<types::Cache>()?;
    m.add_class::<types::MemInfo>()?;
    m.add_class::<types::TransferConfig>()?;
    m.add_class::<types::TransferWithCacheKeyConfig>()?;
    m.add_class::<cache_manager::CacheManager>()?;
    m.add_class::<cache_manager::CacheTask>()?;
    m.add_class::<engine::LLMDataDist>()?;
    m.add_function(wrap_pyfunction!(engine::finalize_live, m)?)?;
    Ok(())
}
