//! Hosts for multi-host tests: network namespaces joined by a bridge, with addresses the test
//! creates, and etcd.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::try_http;

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces on one bridge, removed (with their processes) on drop.
pub struct Net {
    tag: String,
    pub subnet: String,
    bridge: String,
    hosts: Vec<String>,
    procs: Vec<Child>,
    pub dir: PathBuf,
}

impl Net {
    pub fn new() -> Net {
        let pid = std::process::id();
        let tag = format!("tdm{}", pid % 100_000);
        let subnet = format!("10.231.{}", pid % 250);
        let bridge = format!("{tag}br");
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        sh(&["ip", "link", "add", &bridge, "type", "bridge"]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{subnet}.1/24"),
            "dev",
            &bridge,
        ]);
        sh(&["ip", "link", "set", &bridge, "up"]);
        let dir = std::env::temp_dir().join(format!("tandem-multihost-{pid}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Net {
            tag,
            subnet,
            bridge,
            hosts: Vec::new(),
            procs: Vec::new(),
            dir,
        }
    }

    /// A host (namespace) with address `.n`; returns its address.
    pub fn host(&mut self, n: u8) -> String {
        let ns = format!("{}h{n}", self.tag);
        let (outside, inside) = (format!("{}v{n}", self.tag), format!("{}p{n}", self.tag));
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        sh(&["ip", "netns", "add", &ns]);
        self.hosts.push(ns.clone());
        sh(&[
            "ip", "link", "add", &outside, "type", "veth", "peer", "name", &inside,
        ]);
        sh(&["ip", "link", "set", &inside, "netns", &ns]);
        sh(&["ip", "link", "set", &outside, "master", &self.bridge]);
        sh(&["ip", "link", "set", &outside, "up"]);
        let addr = format!("{}.{n}", self.subnet);
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &inside,
        ]);
        sh(&["ip", "-n", &ns, "link", "set", &inside, "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        addr
    }

    /// Runs `cmd` on host `.n`, its output in `<name>.log`; returns its index in `procs`.
    pub fn run(&mut self, n: u8, name: &str, cmd: &[&str]) -> usize {
        let ns = format!("{}h{n}", self.tag);
        let log = std::fs::File::create(self.log_path(name)).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(cmd)
            .env("TANDEM_HOME", &self.dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.procs.push(child);
        self.procs.len() - 1
    }

    /// Runs etcd (`binary`) on a host `.n` of its own; returns its client URL.
    pub fn etcd(&mut self, n: u8, binary: &str) -> String {
        let addr = self.host(n);
        let data = self.dir.join("etcd-data");
        let url = format!("http://{addr}:2379");
        self.run(
            n,
            "etcd",
            &[
                binary,
                "--data-dir",
                data.to_str().unwrap(),
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ],
        );
        url
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// Whether process `i` is still running.
    pub fn alive(&mut self, i: usize) -> bool {
        matches!(self.procs[i].try_wait(), Ok(None))
    }

    pub fn kill9(&mut self, i: usize) {
        // `ip netns exec` execs the command: this is the worker's own process.
        let _ = self.procs[i].kill();
        let _ = self.procs[i].wait();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        for ns in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

pub fn etcd_binary() -> String {
    let found = Command::new("sh")
        .args(["-c", "command -v etcd"])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "etcd is not installed: scripts/test.sh installs Debian's etcd-server"
    );
    String::from_utf8_lossy(&found.stdout).trim().to_string()
}

pub fn wait_for(net: &Net, secs: u64, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "{what}\n--- router log:\n{}",
            tail(&net.log("router"))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    t.elapsed()
}

pub fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// The router's `/healthz` (null when it does not answer).
pub fn health(router: &str) -> Value {
    try_http(router, "GET", "/healthz", None)
        .ok()
        .and_then(|(_, body)| serde_json::from_str(&body).ok())
        .unwrap_or_default()
}

/// Workers of `role` in rotation, from a `/healthz` answer.
pub fn up(h: &Value, role: &str) -> u64 {
    h["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["role"] == role)
        .map(|w| w["up"].as_u64().unwrap())
        .unwrap_or(0)
}

/// A greedy 12-token completion of `prompt` at `addr`; an error names the status and body.
pub fn complete_at(addr: &str, prompt: &[u32]) -> Result<String, String> {
    let body = serde_json::json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let (status, text) =
        try_http(addr, "POST", "/v1/completions", Some(&body)).map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{status}: {text}"));
    }
    let v: Value = serde_json::from_str(&text).unwrap();
    Ok(v["choices"][0]["text"].as_str().unwrap().to_string())
}
