//! Rust errors as the Python exceptions MII's users catch. The exception classes live in
//! Python (`tandem.errors`), so `except tandem.errors.X` works as in MII.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use tandem_engine::{EngineError, ParamError};

/// An instance of `tandem.errors.<class>` with `message`, or a `RuntimeError` if the module
/// cannot be imported.
pub fn tandem_error(py: Python<'_>, class: &str, message: String) -> PyErr {
    let made = py
        .import("tandem.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|cls| cls.call1((message.clone(),)));
    match made {
        Ok(instance) => PyErr::from_value(instance),
        Err(_) => PyRuntimeError::new_err(message),
    }
}

/// A generate option or prompt that does not validate.
pub fn validation(py: Python<'_>, e: &ParamError) -> PyErr {
    tandem_error(py, "ValidationError", e.to_string())
}

/// Engine errors: invalid requests are validation errors; the rest are runtime errors.
pub fn engine(py: Python<'_>, e: EngineError) -> PyErr {
    match e {
        EngineError::Param(p) => validation(py, &p),
        EngineError::Closed => {
            PyRuntimeError::new_err("The inference engine of this pipeline has been destroyed.")
        }
        other => PyRuntimeError::new_err(other.to_string()),
    }
}
