//! Conversions at the Python boundary: the enums' tables and members, `LLMException` from
//! the crate's errors, layer ranges from Python `range`s.

use std::ops::Range;

use llm_datadist::{DataType, LlmException, LlmRole, LlmStatusCode};
use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::PyRange;

/// The Python module holding the enum classes built from [`enum_members`].
const ENUMS: &str = "tandem.llm_datadist.enums";
/// The Python module holding `LLMException`.
const STATUS: &str = "tandem.llm_datadist.status";

/// `DtFloat16` -> `DT_FLOAT16`.
fn screaming(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// `(name, value)` pairs of the vendor enum `name`, from the crate's definitions.
#[pyfunction]
pub fn enum_members(name: &str) -> PyResult<Vec<(String, i64)>> {
    let pairs = |v: &[(&str, i64)]| v.iter().map(|(n, x)| (n.to_string(), *x)).collect();
    Ok(match name {
        "LLMRole" => [LlmRole::Prompt, LlmRole::Decoder, LlmRole::Mix]
            .iter()
            .map(|r| {
                let shown = r.to_string();
                let member = shown.trim_start_matches("LLMRole.").to_string();
                (member, *r as i64)
            })
            .collect(),
        "LLMStatusCode" => LlmStatusCode::ALL
            .iter()
            .map(|c| (c.name().to_string(), c.value()))
            .collect(),
        "DataType" => DataType::ALL
            .iter()
            .map(|t| (screaming(&format!("{t:?}")), *t as i64))
            .collect(),
        "Placement" => pairs(&[
            ("HOST", llm_datadist::Placement::Host as i64),
            ("DEVICE", llm_datadist::Placement::Device as i64),
        ]),
        "RegisterMemStatus" => pairs(&[
            ("OK", llm_datadist::RegisterMemStatus::Ok as i64),
            (
                "PREPARING",
                llm_datadist::RegisterMemStatus::Preparing as i64,
            ),
            ("FAILED", llm_datadist::RegisterMemStatus::Failed as i64),
        ]),
        "Memtype" => pairs(&[
            ("MEM_TYPE_DEVICE", llm_datadist::MemType::Device as i64),
            ("MEM_TYPE_HOST", llm_datadist::MemType::Host as i64),
        ]),
        other => return Err(PyTypeError::new_err(format!("no enum named {other:?}"))),
    })
}

/// The Python enum class `name`.
fn enum_class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import(ENUMS)?.getattr(name)
}

/// The member of enum `class` with `value`.
pub fn member(py: Python<'_>, class: &str, value: i64) -> PyResult<Py<PyAny>> {
    Ok(enum_class(py, class)?.call1((value,))?.unbind())
}

/// The value of `obj`, which must be a member of enum `class` (`TypeError` naming `what`).
pub fn value_of(obj: &Bound<'_, PyAny>, class: &str, what: &str) -> PyResult<i64> {
    let cls = enum_class(obj.py(), class)?;
    if !obj.is_instance(&cls)? {
        return Err(PyTypeError::new_err(format!(
            "{what} should be {class}, got {}",
            obj.get_type().name()?
        )));
    }
    obj.getattr("value")?.extract()
}

/// An `LLMStatusCode` member.
pub fn status(py: Python<'_>, code: LlmStatusCode) -> PyResult<Py<PyAny>> {
    member(py, "LLMStatusCode", code.value())
}

/// `LLMException(message, status_code=...)` for a crate error.
pub fn llm_error(py: Python<'_>, e: LlmException) -> PyErr {
    let made = (|| -> PyResult<PyErr> {
        let code = status(py, e.status_code)?;
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs.set_item("status_code", code)?;
        let exc = py
            .import(STATUS)?
            .getattr("LLMException")?
            .call((e.message.clone(),), Some(&kwargs))?;
        Ok(PyErr::from_value(exc))
    })();
    made.unwrap_or_else(|err| err)
}

/// Raises `LLMException(LLM_PARAM_INVALID)` with `message`.
pub fn param_invalid(py: Python<'_>, message: impl Into<String>) -> PyErr {
    llm_error(py, LlmException::param(message))
}

/// Converts a crate result, raising `LLMException` on error.
pub trait OrRaise<T> {
    /// The value, or the error as `LLMException`.
    fn or_raise(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> OrRaise<T> for llm_datadist::Result<T> {
    fn or_raise(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| llm_error(py, e))
    }
}

/// What every call before `init` raises, as the vendor's layer does.
pub fn not_initialized() -> PyErr {
    PyRuntimeError::new_err("llm datadist is not initialized")
}

/// A layer range given as a Python `range` (step 1), or None.
pub fn layer_range(
    py: Python<'_>,
    obj: Option<&Bound<'_, PyAny>>,
    what: &str,
) -> PyResult<Option<Range<usize>>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(None);
    };
    let r = obj
        .cast::<PyRange>()
        .map_err(|_| PyTypeError::new_err(format!("{what} should be a range")))?;
    let (start, stop, step): (i64, i64, i64) = (
        r.getattr("start")?.extract()?,
        r.getattr("stop")?.extract()?,
        r.getattr("step")?.extract()?,
    );
    if step != 1 || start < 0 || stop < start {
        return Err(param_invalid(
            py,
            format!("{what} must be a range of step 1 over layers >= 0, got range({start}, {stop}, {step})"),
        ));
    }
    Ok(Some(start as usize..stop as usize))
}
