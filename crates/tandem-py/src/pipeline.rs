//! The engine of `tandem.pipeline`: the Rust [`tandem_engine::Pipeline`], with generate
//! options parsed by the engine's MII option parser and engine flags by the CLI's parser, so
//! a Python pipeline behaves exactly like `tandem generate`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use clap::Parser;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use tandem_engine::{EngineError, FinishReason, GenerateParams};

use crate::{errors, wait};

/// The CLI's engine flags, parsed on their own.
#[derive(Parser)]
#[command(no_binary_name = true)]
struct EngineFlags {
    #[command(flatten)]
    engine: tandem_cli::engine_args::EngineArgs,
}

/// One prompt's result: (generated text, prompt tokens, generated tokens, finish reason).
type Row = (String, usize, usize, &'static str);

/// An in-process engine over one model.
#[pyclass(module = "tandem._native")]
pub struct Pipeline {
    inner: Mutex<Option<Arc<tandem_engine::Pipeline>>>,
    model_path: String,
}

impl Pipeline {
    fn pipeline(&self) -> PyResult<Arc<tandem_engine::Pipeline>> {
        self.inner
            .lock()
            .expect("pipeline lock")
            .clone()
            .ok_or_else(|| {
                PyRuntimeError::new_err("The inference engine of this pipeline has been destroyed.")
            })
    }
}

fn options(py: Python<'_>, options_json: &str) -> PyResult<GenerateParams> {
    let v: serde_json::Value = serde_json::from_str(options_json)
        .map_err(|e| PyValueError::new_err(format!("generate options: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| PyValueError::new_err("generate options must be a mapping"))?;
    GenerateParams::from_mii_options(obj).map_err(|e| errors::validation(py, &e))
}

#[pymethods]
impl Pipeline {
    /// Loads `model` (a path, a known model name, or None for the default model, fetched on
    /// first use) with the CLI's engine flags `engine_args` (e.g. `["--max-length=512"]`).
    /// With `tensor_parallel` above 1, ranks 1.. run as processes started with `self_command`
    /// (e.g. `[sys.executable, "-m", "tandem"]`).
    #[new]
    #[pyo3(signature = (model=None, engine_args=Vec::new(), tensor_parallel=1, self_command=Vec::new()))]
    fn new(
        py: Python<'_>,
        model: Option<String>,
        engine_args: Vec<String>,
        tensor_parallel: usize,
        self_command: Vec<String>,
    ) -> PyResult<Self> {
        let flags = EngineFlags::try_parse_from(&engine_args)
            .map_err(|e| PyValueError::new_err(e.render().to_string()))?;
        if tensor_parallel == 0 {
            return Err(PyValueError::new_err("tensor_parallel must be at least 1"));
        }
        if tensor_parallel > 1 && !self_command.is_empty() {
            tandem_cli::set_self_command(self_command.into_iter().map(Into::into).collect());
        }
        let loaded = py.detach(|| -> Result<_, String> {
            let path = tandem_model::fetch::resolve_model(model.as_deref(), true)
                .map_err(|e| e.to_string())?;
            let pipe = if tensor_parallel > 1 {
                let engine = tandem_cli::tensor_parallel::start_local_engine(
                    &path,
                    tensor_parallel,
                    &flags.engine,
                )
                .map_err(|e| format!("{e:#}"))?;
                tandem_engine::Pipeline::from_engine(engine)
            } else {
                tandem_engine::Pipeline::new(&path, flags.engine.config())
                    .map_err(|e| e.to_string())?
            };
            Ok((pipe, path))
        });
        let (pipe, path) = loaded.map_err(PyRuntimeError::new_err)?;
        Ok(Pipeline {
            inner: Mutex::new(Some(Arc::new(pipe))),
            model_path: path.to_string_lossy().into_owned(),
        })
    }

    /// The model file or directory this pipeline runs.
    #[getter]
    fn model_path(&self) -> &str {
        &self.model_path
    }

    /// Generates for every prompt (batched together) with MII's options given as a JSON
    /// object; returns one `(text, prompt_length, generated_length, finish_reason)` per prompt,
    /// in order. Runs without the GIL; Ctrl-C cancels the requests and raises.
    fn generate(
        &self,
        py: Python<'_>,
        prompts: Vec<String>,
        options_json: &str,
    ) -> PyResult<Vec<Row>> {
        let params = options(py, options_json)?;
        let pipe = self.pipeline()?;
        let cancel = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = {
            let cancel = cancel.clone();
            std::thread::Builder::new()
                .name("tandem-py-generate".into())
                .spawn(move || {
                    let _ = tx.send(pipe.generate_cancellable(&prompts, &params, &cancel));
                })
                .map_err(|e| PyRuntimeError::new_err(e.to_string()))?
        };
        let waited = wait::interruptibly(py, move |tick| match rx.recv_timeout(tick) {
            Ok(r) => Some(r),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Some(Err(EngineError::Closed)),
        });
        let result = match waited {
            Ok(r) => r,
            Err(interrupt) => {
                // The worker aborts its requests at their next event and exits on its own.
                cancel.store(true, Ordering::Release);
                return Err(interrupt);
            }
        };
        let _ = py.detach(|| worker.join());
        let responses = result.map_err(|e| errors::engine(py, e))?;
        responses
            .into_iter()
            .map(|r| {
                let finish = match r.finish_reason {
                    FinishReason::Stop => "stop",
                    FinishReason::Length => "length",
                    FinishReason::Abort => {
                        return Err(PyRuntimeError::new_err("the request was aborted"))
                    }
                    FinishReason::Error(why) => {
                        return Err(PyRuntimeError::new_err(format!("generation failed: {why}")))
                    }
                };
                Ok((
                    r.generated_text,
                    r.prompt_length,
                    r.generated_length,
                    finish,
                ))
            })
            .collect()
    }

    /// Token ids of `prompt` as generation sees it.
    fn tokenize(&self, py: Python<'_>, prompt: &str) -> PyResult<Vec<u32>> {
        self.pipeline()?
            .tokenize(prompt)
            .map_err(|e| errors::engine(py, e))
    }

    /// Shuts the engine down; later calls raise `RuntimeError`.
    fn destroy(&self, py: Python<'_>) {
        let pipe = self.inner.lock().expect("pipeline lock").take();
        // The engine thread stops when the last handle goes (after a running call ends).
        py.detach(move || drop(pipe));
    }

    /// Whether `destroy` was called.
    #[getter]
    fn destroyed(&self) -> bool {
        self.inner.lock().expect("pipeline lock").is_none()
    }
}
