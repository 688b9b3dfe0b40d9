//! `tandem._native`: the Rust side of the Python wheel. The Python packages `tandem` (MII's
//! `pipeline` / `serve` / `client`) and `llm_datadist` (the vendor's API) are thin layers over
//! the classes and functions here, which are thin layers over the crates below: nothing of
//! the engine, the server or the transfer library is re-implemented.
//!
//! Every long call releases the GIL and wakes up a few times a second to check for signals,
//! so Ctrl-C interrupts it cleanly (its requests are cancelled and their KV freed).

mod cli;
mod client;
mod datadist;
mod errors;
mod pipeline;
mod wait;

use pyo3::prelude::*;

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(cli::cli_main, m)?)?;
    m.add_function(wrap_pyfunction!(cli::tandem_home, m)?)?;
    m.add_function(wrap_pyfunction!(cli::default_deployment_name, m)?)?;
    m.add_class::<pipeline::Pipeline>()?;
    m.add_class::<client::Client>()?;
    m.add_function(wrap_pyfunction!(client::find_deployment, m)?)?;
    m.add_function(wrap_pyfunction!(client::process_alive, m)?)?;
    datadist::register(m)?;
    Ok(())
}
