//! Helpers of the disaggregated-serving tests: a `tandem serve` deployment in its own process
//! (own Tandem home, stopped on drop), plain HTTP requests, and the workers' facts.

#![allow(dead_code)]

pub mod net;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct Deployment {
    pub child: Child,
    pub home: PathBuf,
    pub http: String,
}

impl Deployment {
    /// The last lines of the deployment's log (for failure messages).
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.home.join("serve.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

/// The default model's file in the shared models cache.
pub fn model_path() -> PathBuf {
    cached_model(&[], "SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The file of a named model in the shared models cache (so deployments with their own
/// Tandem home do not fetch it again).
pub fn named_model_path(name: &str) -> PathBuf {
    cached_model(&["--model", name], &format!("{name}.gguf"))
}

/// Generates one token with `model_args` (fetching the model into the shared cache first if
/// needed) and returns `file` in that cache.
fn cached_model(model_args: &[&str], file: &str) -> PathBuf {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .arg("generate")
        .args(model_args)
        .args(["--prompt", "x", "--max-new-tokens", "1", "--greedy"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let home = std::env::var_os("TANDEM_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
            cache.join("tandem")
        });
    home.join("models").join(file)
}

pub fn start(name: &str, extra: &[&str]) -> Deployment {
    start_model(name, model_path().to_str().unwrap(), extra)
}

/// A deployment of `model` (a path or a named model, fetched on first use).
pub fn start_model(name: &str, model: &str, extra: &[&str]) -> Deployment {
    let home = std::env::temp_dir().join(format!("tandem-pd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "serve",
            "--model",
            model,
            "--port",
            "0",
            "--restful-api-port",
            "0",
        ])
        .args(["--deployment-name", name, "--max-batch-tokens", "64"])
        .args(extra)
        .env("TANDEM_HOME", &home)
        .stderr(std::fs::File::create(home.join("serve.log")).unwrap())
        .spawn()
        .unwrap();
    let mut d = Deployment {
        child,
        home,
        http: String::new(),
    };
    let record = d.home.join("deployments").join(format!("{name}.json"));
    let t = Instant::now();
    while !record.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "{name} never registered"
        );
        assert!(d.child.try_wait().unwrap().is_none(), "{name} exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rec: Value = serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    d.http = rec["http"].as_str().unwrap().to_string();
    d
}

/// A plain HTTP/1.1 request; returns the status and the body.
pub fn http(addr: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    try_http(addr, method, path, body).unwrap_or_else(|e| panic!("{method} {addr}{path}: {e}"))
}

/// [`http`], with a connection failure as an error (a server that is not up yet).
pub fn try_http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {resp:?}")))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

pub fn complete(d: &Deployment, prompt: &[u32]) -> String {
    let body = json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let (status, text) = http(&d.http, "POST", "/v1/completions", Some(&body));
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

pub fn workers(d: &Deployment) -> Vec<Value> {
    workers_at(&d.http)
}

/// `/admin/workers` of the deployment whose HTTP address is `addr`.
pub fn workers_at(addr: &str) -> Vec<Value> {
    let (status, text) = http(addr, "GET", "/admin/workers", None);
    assert_eq!(status, 200, "{text}");
    serde_json::from_str::<Value>(&text).unwrap()["workers"]
        .as_array()
        .unwrap()
        .clone()
}

pub fn golden_prompts() -> Vec<Vec<u32>> {
    golden_prompts_of("real_golden.json")
}

/// The prompts of a real-model golden file in `tandem-model/tests/data`.
pub fn golden_prompts_of(file: &str) -> Vec<Vec<u32>> {
    let path = format!(
        "{}/../tandem-model/tests/data/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            c["prompt_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

pub fn stat(w: &Value, name: &str) -> u64 {
    w["worker"]["stats"][name].as_u64().unwrap()
}

/// The body of a chunked HTTP/1.1 response, de-chunked.
pub fn dechunk(raw: &str) -> String {
    let mut out = String::new();
    let mut rest = raw;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return raw.to_string(); // not chunked
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// How a streamed request ended.
#[derive(Debug)]
pub enum Streamed {
    /// Finished normally with this text.
    Complete(String),
    /// Ended with an error event.
    Error(String),
}

/// A streaming completion, read to its end and classified; panics on anything else (an empty
/// 200, a stream without an end, a finish reason OpenAI does not have).
pub fn stream_completion(addr: &str, prompt: &[u32], max_tokens: usize) -> Streamed {
    let body = serde_json::json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": true, "stream": true});
    let (status, raw) = http(addr, "POST", "/v1/completions", Some(&body));
    if status != 200 {
        let v: Value = serde_json::from_str(&raw).unwrap_or_default();
        assert!(
            v["error"]["message"].is_string(),
            "{status} without an error body: {raw}"
        );
        return Streamed::Error(raw);
    }
    let body = dechunk(&raw);
    let mut text = String::new();
    let mut finish = None;
    for data in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"));
        if let Some(e) = v.get("error") {
            return Streamed::Error(e.to_string());
        }
        text.push_str(v["choices"][0]["text"].as_str().unwrap_or_default());
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    match finish.as_deref() {
        Some("length" | "stop") if !text.is_empty() => Streamed::Complete(text),
        other => panic!("a stream ended with finish {other:?} and text {text:?}: {body}"),
    }
}

/// A long greedy stream of `prompt` at `addr`, read until a few events arrived; dropping the
/// returned socket is a client that disconnects mid-stream.
pub fn stream_in_flight(addr: &str, prompt: &[u32]) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let body = json!({"prompt": prompt, "max_tokens": 3000, "temperature": 0,
        "ignore_eos": true, "stream": true})
    .to_string();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&seen).matches("data:").count() < 4 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    s
}

/// A worker's process id.
pub fn pid(w: &Value) -> u32 {
    w["worker"]["pid"].as_u64().unwrap() as u32
}

/// Waits (up to `secs`) for `cond` on the deployment's workers.
pub fn wait_workers(d: &Deployment, secs: u64, what: &str, cond: impl Fn(&[Value]) -> bool) {
    let t = Instant::now();
    loop {
        let ws = workers(d);
        if cond(&ws) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(secs), "{what}: {ws:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every worker answers and holds no KV: in use, held for a consumer, or reserved.
pub fn no_kv_held(ws: &[Value]) -> bool {
    ws.iter().all(|w| {
        w.get("worker").is_some()
            && ["blocks_in_use", "blocks_held", "blocks_reserved"]
                .iter()
                .all(|k| stat(w, k) == 0)
    })
}
