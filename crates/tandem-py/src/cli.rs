//! The `tandem` command from Python (`python -m tandem ...`, the `tandem` console script), so
//! the wheel brings the same command as the binary, and `tandem.serve` can start it.

use std::ffi::OsString;

use pyo3::prelude::*;

/// Runs the `tandem` command with `argv` (program name first) and returns its exit code.
/// `self_command` is how it starts itself again for worker processes (e.g. `[sys.executable,
/// "-m", "tandem"]`).
#[pyfunction]
pub fn cli_main(py: Python<'_>, argv: Vec<String>, self_command: Vec<String>) -> i32 {
    tandem_cli::set_self_command(self_command.into_iter().map(OsString::from).collect());
    py.detach(|| tandem_cli::main_with_args(argv))
}

/// Tandem's home directory (`$TANDEM_HOME`, default `~/.cache/tandem`): models, the
/// deployment registry and its logs.
#[pyfunction]
pub fn tandem_home() -> String {
    tandem_model::fetch::tandem_home()
        .to_string_lossy()
        .into_owned()
}

/// The deployment name `tandem serve --model SPEC` uses when none is given
/// (`<model>-mii-deployment`).
#[pyfunction]
#[pyo3(signature = (model_spec=None))]
pub fn default_deployment_name(model_spec: Option<&str>) -> String {
    tandem_cli::serve::default_deployment_name(model_spec)
}
