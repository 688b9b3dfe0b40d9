//! A disaggregated deployment across hosts, each host a network namespace of its own joined by
//! a bridge (addresses the test creates): etcd on one, the router on another, workers on the
//! rest, all found through etcd. Shows: the same greedy outputs as a colocated deployment; a
//! worker added while serving is picked up, and moved between roles by the router; a
//! `kill -9`ed worker leaves rotation (probes, then
//! its lease) while traffic goes on; a worker with the wrong token is refused; a colocated
//! replica on its own host takes requests when the decode worker is gone.
//!
//! Needs root (network namespaces) and etcd (`scripts/test.sh` installs Debian's
//! `etcd-server`); without root it says so and passes, since nothing can be checked.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const TOKEN: &str = "multi-host-secret";

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces on one bridge, removed (with their processes) on drop.
struct Net {
    tag: String,
    subnet: String,
    bridge: String,
    hosts: Vec<String>,
    procs: Vec<Child>,
    dir: PathBuf,
}

impl Net {
    fn new() -> Net {
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
    fn host(&mut self, n: u8) -> String {
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
    fn run(&mut self, n: u8, name: &str, cmd: &[&str]) -> usize {
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

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    fn kill9(&mut self, i: usize) {
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

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

fn etcd_binary() -> String {
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

fn health(router: &str) -> Value {
    try_http(router, "GET", "/healthz", None)
        .ok()
        .and_then(|(_, body)| serde_json::from_str(&body).ok())
        .unwrap_or_default()
}

fn up(h: &Value, role: &str) -> u64 {
    h["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["role"] == role)
        .map(|w| w["up"].as_u64().unwrap())
        .unwrap_or(0)
}

fn wait_for(net: &Net, secs: u64, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
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

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// (role, url) of each worker in rotation.
fn worker_urls(router: &str) -> Vec<(String, String)> {
    let v: Value = serde_json::from_str(&http(router, "GET", "/admin/workers", None).1).unwrap();
    v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["role"].as_str().unwrap().to_string(),
                w["url"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn complete_at(addr: &str, prompt: &[u32]) -> Result<String, String> {
    let body = serde_json::json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let (status, text) =
        try_http(addr, "POST", "/v1/completions", Some(&body)).map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{status}: {text}"));
    }
    let v: Value = serde_json::from_str(&text).unwrap();
    Ok(v["choices"][0]["text"].as_str().unwrap().to_string())
}

#[test]
fn workers_on_other_hosts_are_found_through_etcd_and_survive_failures() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let etcd = etcd_binary();
    let model = model_path();
    let model = model.to_str().unwrap();
    let tandem = env!("CARGO_BIN_EXE_tandem");

    // The reference: the same prompts on a colocated deployment.
    let prompts: Vec<Vec<u32>> = golden_prompts().into_iter().take(6).collect();
    let colocated = start("multihost-colocated", &[]);
    let expected: Vec<String> = prompts.iter().map(|p| complete(&colocated, p)).collect();
    drop(colocated);

    let mut net = Net::new();
    let etcd_addr = net.host(2);
    let router_addr = net.host(3);
    let data = net.dir.join("etcd-data");
    let client_url = format!("http://{etcd_addr}:2379");
    net.run(
        2,
        "etcd",
        &[
            &etcd,
            "--data-dir",
            data.to_str().unwrap(),
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
        ],
    );
    let common = [
        "serve",
        "--model",
        model,
        "--etcd",
        &client_url,
        "--deployment-name",
        "multihost",
        "--max-batch-tokens",
        "64",
    ];
    let worker = |net: &mut Net, n: u8, name: &str, role: &str, token: &str| {
        let host = net.host(n);
        let mut cmd: Vec<&str> = vec![tandem];
        cmd.extend(common);
        cmd.extend(["--role", role, "--host", &host, "--auth-token", token]);
        net.run(n, name, &cmd)
    };
    let mut cmd: Vec<&str> = vec![tandem];
    cmd.extend(common);
    cmd.extend([
        "--host",
        &router_addr,
        "--port",
        "50050",
        "--restful-api-port",
        "28080",
        "--local-prefill-max",
        "0",
        "--auth-token",
        TOKEN,
    ]);
    net.run(3, "router", &cmd);
    let router = format!("{router_addr}:28080");
    let p1 = worker(&mut net, 4, "prefill-1", "prefill", TOKEN);
    let d1 = worker(&mut net, 5, "decode-1", "decode", TOKEN);
    wait_for(&net, 120, "the workers never joined", || {
        let h = health(&router);
        up(&h, "prefill") == 1 && up(&h, "decode") == 1 && h["status"] == "ok"
    });

    // Served across hosts, with the colocated outputs; the prefill host did the prefills.
    for (p, want) in prompts.iter().zip(&expected) {
        assert_eq!(&complete_at(&router, p).unwrap(), want);
    }
    let ws = serde_json::from_str::<Value>(&http(&router, "GET", "/admin/workers", None).1)
        .unwrap()["workers"]
        .clone();
    let prefill = ws
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["role"] == "prefill")
        .unwrap();
    assert!(stat(prefill, "tokens_computed") > 0, "{ws}");
    let p1_url = prefill["url"].as_str().unwrap().to_string();
    assert!(p1_url.contains(&format!("{}.4:", net.subnet)), "{p1_url}");

    // A second prefill worker is picked up without a restart.
    worker(&mut net, 6, "prefill-2", "prefill", TOKEN);
    wait_for(&net, 60, "the added worker was not picked up", || {
        up(&health(&router), "prefill") == 2
    });

    // The router moves it to decode and back (llm-datadist's switch_role on a remote host);
    // its etcd record follows.
    let p2_url = worker_urls(&router)
        .into_iter()
        .find(|(_, u)| u.contains(&format!("{}.6:", net.subnet)))
        .unwrap()
        .1;
    for (i, (to, prefill, decode)) in [("decode", 1, 2), ("prefill", 2, 1)]
        .into_iter()
        .enumerate()
    {
        let body = serde_json::json!({"url": p2_url, "role": to});
        let (status, text) = http(&router, "POST", "/admin/workers/role", Some(&body));
        assert_eq!(status, 200, "{text}");
        let h = health(&router);
        assert_eq!(
            (up(&h, "prefill"), up(&h, "decode")),
            (prefill, decode),
            "{h}"
        );
        for (p, want) in prompts.iter().zip(&expected).take(3) {
            assert_eq!(&complete_at(&router, p).unwrap(), want);
        }
        wait_for(
            &net,
            10,
            "the switched worker's record was not updated",
            || net.log("prefill-2").matches("registration updated").count() > i,
        );
    }

    // kill -9 of the first: out of rotation, traffic goes on with the same outputs.
    let killed = Instant::now();
    net.kill9(p1);
    let served_again = wait_for(&net, 30, "requests failed after the kill", || {
        complete_at(&router, &prompts[0]).as_deref() == Ok(expected[0].as_str())
    });
    eprintln!(
        "prefill worker killed: requests served elsewhere after {:.2} s",
        served_again.as_secs_f64()
    );
    for (p, want) in prompts.iter().zip(&expected) {
        assert_eq!(&complete_at(&router, p).unwrap(), want);
    }
    // Its lease expires: it leaves the deployment (not just the rotation).
    wait_for(&net, 30, "the dead worker's lease never expired", || {
        let h = health(&router);
        up(&h, "prefill") == 1 && !h.to_string().contains(&p1_url)
    });
    eprintln!(
        "its registration gone after {:.2} s",
        killed.elapsed().as_secs_f64()
    );

    // A worker with the wrong token registers, and is refused.
    worker(&mut net, 7, "intruder", "prefill", "not-the-token");
    wait_for(&net, 60, "the intruder never registered", || {
        net.log("intruder").contains("registered in etcd")
    });
    wait_for(&net, 30, "the router did not refuse the intruder", || {
        net.log("router").contains("registered worker refused")
    });
    assert_eq!(up(&health(&router), "prefill"), 1);
    assert!(
        net.log("intruder")
            .contains("refused a call without the deployment's token"),
        "{}",
        tail(&net.log("intruder"))
    );

    // A colocated replica on its own host carries the traffic when the decode worker dies.
    worker(&mut net, 8, "replica-1", "replica", TOKEN);
    wait_for(&net, 60, "the replica was not picked up", || {
        up(&health(&router), "replica") == 1
    });
    net.kill9(d1);
    wait_for(
        &net,
        30,
        "requests failed after the decode worker died",
        || complete_at(&router, &prompts[1]).as_deref() == Ok(expected[1].as_str()),
    );
    for (p, want) in prompts.iter().zip(&expected) {
        assert_eq!(&complete_at(&router, p).unwrap(), want);
    }
    // Once its lease expired, it has left the deployment: all is well again.
    wait_for(&net, 30, "the decode worker never left", || {
        let h = health(&router);
        up(&h, "decode") == 0 && h["status"] == "ok" && h["failed"] == 0
    });
}
