//! The client of `tandem.client` / `tandem.serve`: the Rust gRPC client
//! ([`tandem_server::client::Client`]) found through the deployment registry, speaking MII's
//! `modelresponse` contract.

use std::sync::Arc;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use tandem_server::client::{ClientError, KwValue};
use tandem_server::registry::{DeploymentRecord, RegistryError};

use crate::{errors, wait};

/// One reply: (text, prompt tokens, generated tokens, finish reason).
type Row = (String, i64, i64, String);

fn home() -> std::path::PathBuf {
    tandem_model::fetch::tandem_home()
}

fn registry_error(py: Python<'_>, e: RegistryError) -> PyErr {
    match e {
        RegistryError::NotFound { .. } | RegistryError::Stale { .. } => {
            errors::tandem_error(py, "DeploymentNotFoundError", e.to_string())
        }
        RegistryError::BadName(_) => PyValueError::new_err(e.to_string()),
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

fn client_error(py: Python<'_>, e: ClientError) -> PyErr {
    match e {
        ClientError::Registry(r) => registry_error(py, r),
        ClientError::Status(s) if s.code() == tonic::Code::InvalidArgument => {
            errors::tandem_error(py, "ValidationError", s.message().to_string())
        }
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

/// MII's generate options as gRPC `query_kwargs` values. As in MII, only scalars travel; a
/// one-element `stop` list becomes its element.
fn kwargs(options_json: &str) -> PyResult<Vec<(String, KwValue)>> {
    let v: serde_json::Value = serde_json::from_str(options_json)
        .map_err(|e| PyValueError::new_err(format!("generate options: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| PyValueError::new_err("generate options must be a mapping"))?;
    let mut out = Vec::with_capacity(obj.len());
    for (k, v) in obj {
        let value = match v {
            serde_json::Value::Null => continue,
            serde_json::Value::Bool(b) => KwValue::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => KwValue::Int(i),
                None => KwValue::Float(n.as_f64().unwrap_or(f64::NAN) as f32),
            },
            serde_json::Value::String(s) => KwValue::Str(s.clone()),
            serde_json::Value::Array(items) => match items.as_slice() {
                [serde_json::Value::String(s)] => KwValue::Str(s.clone()),
                _ => {
                    return Err(PyValueError::new_err(format!(
                        "{k}: MII's gRPC contract carries one value per option, not a list \
                         (give one stop string, or use the REST route for several)"
                    )))
                }
            },
            serde_json::Value::Object(_) => {
                return Err(PyValueError::new_err(format!(
                    "{k}: a mapping is not a generate option"
                )))
            }
        };
        out.push((k.clone(), value));
    }
    Ok(out)
}

/// Looks a deployment up by deployment or model name (MII's fallback) and returns its record
/// as `(name, model, pid, grpc, http)`; raises `DeploymentNotFoundError`.
#[pyfunction]
pub fn find_deployment(
    py: Python<'_>,
    name: &str,
) -> PyResult<(String, String, u32, String, Option<String>)> {
    let r = tandem_server::registry::find(&home(), name).map_err(|e| registry_error(py, e))?;
    Ok((r.name, r.model, r.pid, r.grpc, r.http))
}

/// Whether process `pid` is running (not exited, not a zombie).
#[pyfunction]
pub fn process_alive(pid: u32) -> bool {
    tandem_server::registry::process_alive(pid)
}

/// A connection to a running deployment.
#[pyclass(module = "tandem._native")]
pub struct Client {
    rt: tokio::runtime::Runtime,
    inner: Arc<tokio::sync::Mutex<tandem_server::client::Client>>,
    record: DeploymentRecord,
}

#[pymethods]
impl Client {
    /// Connects to the deployment named `name` (or the default deployment of model `name`).
    #[new]
    fn new(py: Python<'_>, name: &str) -> PyResult<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        let connected =
            py.detach(|| rt.block_on(tandem_server::client::Client::connect(&home(), name)));
        let client = connected.map_err(|e| client_error(py, e))?;
        let record = client.record.clone();
        Ok(Client {
            rt,
            inner: Arc::new(tokio::sync::Mutex::new(client)),
            record,
        })
    }

    /// The deployment's name.
    #[getter]
    fn deployment_name(&self) -> &str {
        &self.record.name
    }

    /// The model it serves.
    #[getter]
    fn model(&self) -> &str {
        &self.record.model
    }

    /// Its gRPC endpoint (`host:port`).
    #[getter]
    fn grpc(&self) -> &str {
        &self.record.grpc
    }

    /// Its HTTP endpoint, when it serves REST/OpenAI.
    #[getter]
    fn http(&self) -> Option<&str> {
        self.record.http.as_deref()
    }

    /// The server's process id.
    #[getter]
    fn pid(&self) -> u32 {
        self.record.pid
    }

    /// Generates for `prompts` (batched by the server) with MII's options as a JSON object.
    fn generate(
        &self,
        py: Python<'_>,
        prompts: Vec<String>,
        options_json: &str,
    ) -> PyResult<Vec<Row>> {
        let kw = kwargs(options_json)?;
        let inner = self.inner.clone();
        let mut task = self.rt.spawn(async move {
            let mut c = inner.lock().await;
            c.generate(&prompts, &kw).await
        });
        let joined = wait::interruptibly(py, |tick| {
            self.rt
                .block_on(async { tokio::time::timeout(tick, &mut task).await })
                .ok()
        });
        let replies = match joined {
            Ok(r) => r.map_err(|e| PyRuntimeError::new_err(e.to_string()))?,
            Err(interrupt) => {
                // Dropping the call cancels the request on the server.
                task.abort();
                return Err(interrupt);
            }
        };
        let replies = replies.map_err(|e| client_error(py, e))?;
        Ok(replies
            .into_iter()
            .map(|r| {
                (
                    r.response,
                    r.prompt_tokens,
                    r.generated_tokens,
                    r.finish_reason,
                )
            })
            .collect())
    }

    /// Streams one prompt: calls `on_chunk(text, prompt_tokens, generated_tokens,
    /// finish_reason)` for every reply, the last with a finish reason other than `"none"`.
    fn generate_stream(
        &self,
        py: Python<'_>,
        prompt: String,
        options_json: &str,
        on_chunk: Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let kw = kwargs(options_json)?;
        let inner = self.inner.clone();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result<Row, ClientError>>();
        let task = self.rt.spawn(async move {
            let mut c = inner.lock().await;
            let stream = c.generate_stream_replies(&prompt, &kw).await;
            match stream {
                Ok(mut s) => loop {
                    match s.message().await {
                        Ok(Some(m)) => {
                            for r in m.response {
                                let row = (
                                    r.response,
                                    r.prompt_tokens,
                                    r.generated_tokens,
                                    r.finish_reason,
                                );
                                if tx.send(Ok(row)).is_err() {
                                    return;
                                }
                            }
                        }
                        Ok(None) => return,
                        Err(status) => {
                            let _ = tx.send(Err(ClientError::from(status)));
                            return;
                        }
                    }
                },
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
        let result = (|| {
            while let Some(msg) = wait::recv(py, &self.rt, &mut rx)? {
                let row = msg.map_err(|e| client_error(py, e))?;
                on_chunk.call1(row)?;
            }
            Ok(())
        })();
        // Whatever ended the loop (the stream's end, an error, Ctrl-C or the callback
        // raising), the call is dropped: the server cancels the request.
        task.abort();
        result
    }

    /// Stops the whole deployment (MII's `terminate_server`) and waits until its process is
    /// gone (at most `timeout_s`).
    #[pyo3(signature = (timeout_s=60.0))]
    fn terminate(&self, py: Python<'_>, timeout_s: f64) -> PyResult<()> {
        let inner = self.inner.clone();
        let sent = py.detach(|| {
            self.rt
                .block_on(async move { inner.lock().await.terminate().await })
        });
        sent.map_err(|e| client_error(py, e))?;
        let pid = self.record.pid;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(timeout_s);
        wait::interruptibly(py, |tick| {
            if !tandem_server::registry::process_alive(pid) {
                return Some(Ok(()));
            }
            if std::time::Instant::now() >= deadline {
                return Some(Err(PyRuntimeError::new_err(format!(
                    "the deployment's server (pid {pid}) did not stop within {timeout_s} s"
                ))));
            }
            std::thread::sleep(tick);
            None
        })?
    }
}
