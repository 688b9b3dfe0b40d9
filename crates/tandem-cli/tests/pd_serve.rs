//! Disaggregated serving end to end: `tandem serve --prefill-workers N --decode-workers M`
//! (worker processes linked by llm-datadist) gives the same greedy outputs as a colocated
//! deployment on the reference prompts, prefills short prompts locally, frees KV on both sides
//! when a streaming client disconnects, and moves a worker between roles.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Deployment {
    child: Child,
    home: PathBuf,
    http: String,
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

fn model_path() -> PathBuf {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "generate",
            "--prompt",
            "x",
            "--max-new-tokens",
            "1",
            "--greedy",
        ])
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
    home.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn start(name: &str, extra: &[&str]) -> Deployment {
    let home = std::env::temp_dir().join(format!("tandem-pd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "serve",
            "--model",
            model_path().to_str().unwrap(),
            "--port",
            "0",
            "--restful-api-port",
            "0",
        ])
        .args(["--deployment-name", name, "--max-batch-tokens", "64"])
        .args(extra)
        .env("TANDEM_HOME", &home)
        .stderr(Stdio::null())
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
fn http(addr: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp[9..12].parse().unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

fn complete(d: &Deployment, prompt: &[u32]) -> String {
    let body = json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let (status, text) = http(&d.http, "POST", "/v1/completions", Some(&body));
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

fn workers(d: &Deployment) -> Vec<Value> {
    let (status, text) = http(&d.http, "GET", "/admin/workers", None);
    assert_eq!(status, 200, "{text}");
    serde_json::from_str::<Value>(&text).unwrap()["workers"]
        .as_array()
        .unwrap()
        .clone()
}

fn golden_prompts() -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tandem-model/tests/data/real_golden.json"
    ))
    .unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
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

fn stat(w: &Value, name: &str) -> u64 {
    w["worker"]["stats"][name].as_u64().unwrap()
}

#[test]
fn disaggregated_serving_matches_colocated_frees_kv_and_switches_roles() {
    let colocated = start("colocated", &[]);
    let pd = start(
        "disaggregated",
        &[
            "--prefill-workers",
            "2",
            "--decode-workers",
            "1",
            "--local-prefill-max",
            "4",
        ],
    );
    let ws = workers(&pd);
    assert_eq!(ws.len(), 3);
    assert_eq!(ws.iter().filter(|w| w["role"] == "prefill").count(), 2);
    let decode_links =
        ws.iter().find(|w| w["role"] == "decode").unwrap()["worker"]["links"].clone();
    assert_eq!(
        decode_links.as_array().unwrap().len(),
        2,
        "the decode worker links to both prefill workers"
    );

    // Same greedy outputs on the reference prompts.
    let prompts = golden_prompts();
    for p in &prompts {
        assert_eq!(complete(&pd, p), complete(&colocated, p), "prompt {p:?}");
    }
    // Conditional disaggregation: a prompt of at most 4 tokens prefills on the decode worker
    // (the prefill workers compute nothing for it); a longer new one on a prefill worker.
    let prefilled = || -> u64 {
        workers(&pd)
            .iter()
            .filter(|w| w["role"] == "prefill")
            .map(|w| stat(w, "tokens_computed"))
            .sum()
    };
    let before = prefilled();
    let short = vec![1, 504, 3458];
    assert_eq!(complete(&pd, &short), complete(&colocated, &short));
    assert_eq!(prefilled(), before);
    let long = vec![1, 504, 3458, 5, 1057, 2106, 42, 318];
    assert_eq!(complete(&pd, &long), complete(&colocated, &long));
    assert_eq!(prefilled(), before + long.len() as u64);

    // A streaming client that disconnects mid-flight: KV freed on every worker.
    let mut s = TcpStream::connect(&pd.http).unwrap();
    let body = json!({"prompt": prompts[0], "max_tokens": 3000, "temperature": 0, "ignore_eos": true, "stream": true}).to_string();
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
    assert!(workers(&pd).iter().any(|w| stat(w, "blocks_in_use") > 0));
    drop(s);
    let t = Instant::now();
    loop {
        let ws = workers(&pd);
        let busy: u64 = ws
            .iter()
            .map(|w| {
                stat(w, "blocks_in_use")
                    + stat(w, "blocks_held")
                    + stat(w, "blocks_reserved")
                    + stat(w, "running")
            })
            .sum();
        if busy == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "KV not freed after a disconnect: {ws:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Move a prefill worker to decode (unlink, switch_role, relink) and back; still serving.
    let url = ws_url(&workers(&pd), "prefill");
    let (status, text) = http(
        &pd.http,
        "POST",
        "/admin/workers/role",
        Some(&json!({"url": url, "role": "decode"})),
    );
    assert_eq!(status, 200, "{text}");
    let ws = workers(&pd);
    assert_eq!(ws.iter().filter(|w| w["role"] == "decode").count(), 2);
    let moved = ws.iter().find(|w| w["url"] == url.as_str()).unwrap();
    assert_eq!(moved["worker"]["role"], "decoder");
    assert!(
        moved["worker"]["datadist_port"].is_null(),
        "a decoder stops listening"
    );
    for w in ws.iter().filter(|w| w["role"] == "decode") {
        assert_eq!(w["worker"]["links"].as_array().unwrap().len(), 1);
    }
    for p in prompts.iter().take(3) {
        assert_eq!(complete(&pd, p), complete(&colocated, p));
    }
    let (status, text) = http(
        &pd.http,
        "POST",
        "/admin/workers/role",
        Some(&json!({"url": url, "role": "prefill"})),
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        workers(&pd)
            .iter()
            .filter(|w| w["role"] == "prefill")
            .count(),
        2
    );
    assert_eq!(
        complete(&pd, &prompts[1]),
        complete(&colocated, &prompts[1])
    );
    // The last worker of a role cannot move.
    let last = ws_url(&workers(&pd), "decode");
    let (status, _) = http(
        &pd.http,
        "POST",
        "/admin/workers/role",
        Some(&json!({"url": last, "role": "prefill"})),
    );
    assert_eq!(status, 400);
    // Malformed admin bodies get a JSON 400.
    for bad in [
        json!("not an object"),
        json!({"url": last, "role": "decode", "extra": 1}),
        json!({"url": last}),
    ] {
        let (status, text) = http(&pd.http, "POST", "/admin/workers/role", Some(&bad));
        assert_eq!(status, 400, "{text}");
        assert!(serde_json::from_str::<Value>(&text).unwrap()["error"]["message"].is_string());
    }
    // A colocated deployment has no workers to list.
    assert_eq!(http(&colocated.http, "GET", "/admin/workers", None).0, 404);
}

fn ws_url(ws: &[Value], role: &str) -> String {
    ws.iter().find(|w| w["role"] == role).unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string()
}
