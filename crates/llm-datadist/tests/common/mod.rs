//! Two-process test harness: the test binary re-runs itself as a peer process
//! (`peer_main` with `LLM_DD_PEER=1`) that listens on 127.0.0.1 and serves known data.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Mutex, MutexGuard};

use llm_datadist::*;

/// Waits until every thread of process `pid` is stopped (state `T`).
pub fn wait_stopped(pid: u32) {
    let t0 = std::time::Instant::now();
    loop {
        let stopped = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.flatten().all(|t| {
                    std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
                        s.rsplit_once(')')
                            .and_then(|(_, rest)| rest.trim_start().chars().next())
                            .is_some_and(|c| c == 'T' || c == 't')
                    })
                })
            })
            .unwrap_or(true);
        if stopped || t0.elapsed() > std::time::Duration::from_secs(5) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// One initialized instance per process: tests in this binary take turns.
static ONE_INSTANCE: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    ONE_INSTANCE.lock().unwrap_or_else(|p| p.into_inner())
}

pub const PEER_ID: u64 = 200;
pub const TENSORS: u32 = 4;
pub const BLOCKS: i64 = 32;
pub const BLOCK_BYTES: i64 = 1024;
pub const SLOT_BYTES: i64 = 2048;
pub const BIG_TENSORS: u32 = 16;
pub const BIG_BLOCKS: i64 = 64;
pub const BIG_BLOCK_BYTES: i64 = 256 << 10;

/// The byte the peer stores at (`tensor`, byte `i`) of cache `which`.
pub fn pattern(which: u64, t: usize, i: usize) -> u8 {
    let mut x = which
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((t as u64) << 32 | i as u64);
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (x >> 24) as u8
}

pub fn blocks_desc() -> CacheDesc {
    CacheDesc::new(TENSORS, vec![BLOCKS, BLOCK_BYTES], DataType::DtUint8).unwrap()
}

pub fn slots_desc() -> CacheDesc {
    CacheDesc::new(TENSORS, vec![2, SLOT_BYTES], DataType::DtUint8).unwrap()
}

/// Options for an instance in these tests.
pub fn options(
    transport: &str,
    remote: bool,
    listen: bool,
    token: &str,
    timeout_ms: i32,
) -> Options {
    let mut cfg = LlmConfig::new();
    cfg.set_device_id(0).unwrap();
    cfg.set_enable_cache_manager(true);
    cfg.set_enable_remote_cache_accessible(remote);
    cfg.set_enable_switch_role(true);
    cfg.set_mem_pool_cfg(r#"{"memory_size": 67108864, "page_shift": 12}"#)
        .unwrap();
    cfg.set_host_mem_pool_cfg(r#"{"memory_size": 16777216, "page_shift": 12}"#)
        .unwrap();
    cfg.set_sync_kv_timeout(timeout_ms).unwrap();
    cfg.set_transport(transport).unwrap();
    if !token.is_empty() {
        cfg.set_auth_token(token);
    }
    if listen {
        cfg.set_listen_ip_info("127.0.0.1:0");
    }
    cfg.generate_options()
}

/// Memory owned by a test and registered as caches (tensor buffers).
pub struct Tensors(pub Vec<Vec<u8>>);

impl Tensors {
    pub fn new(n: u32, bytes: usize) -> Self {
        Self((0..n).map(|_| vec![0u8; bytes]).collect())
    }
    pub fn addrs(&mut self) -> Vec<u64> {
        self.0.iter_mut().map(|v| v.as_mut_ptr() as u64).collect()
    }
}

/// The peer process.
pub struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub port: u16,
    pub contig_id: i64,
    /// The peer's contiguous cache's tensor addresses (for address-based transfers).
    pub contig_addrs: Vec<u64>,
}

impl Peer {
    // The child is killed and reaped by Drop; a failed READY read panics the test anyway.
    #[allow(clippy::zombie_processes)]
    pub fn spawn(transport: &str, remote: bool, token: &str, big: bool) -> Peer {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "peer_main", "--nocapture", "--test-threads=1"])
            .env("LLM_DD_PEER", "1")
            .env("LLM_DD_TRANSPORT", transport)
            .env("LLM_DD_REMOTE", if remote { "1" } else { "0" })
            .env("LLM_DD_TOKEN", token)
            .env("LLM_DD_BIG", if big { "1" } else { "0" })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn peer");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                stdout.read_line(&mut line).unwrap() > 0,
                "peer exited before READY"
            );
            // The harness may print "test peer_main ... " on the same line.
            if let Some(rest) = line.split("READY ").nth(1) {
                let mut it = rest.split_whitespace();
                let port = it.next().unwrap().parse().unwrap();
                let contig_id = it.next().unwrap().parse().unwrap();
                let contig_addrs = it.map(|a| a.parse().unwrap()).collect();
                return Peer {
                    child,
                    stdin,
                    stdout,
                    port,
                    contig_id,
                    contig_addrs,
                };
            }
        }
    }

    pub fn info(&self) -> LlmClusterInfo {
        let mut ci = LlmClusterInfo::new(PEER_ID);
        ci.append_local_ip_info("127.0.0.1", 0).unwrap();
        ci.append_remote_ip_info("127.0.0.1", self.port).unwrap();
        ci
    }

    /// Sends a command and returns the peer's one-line answer.
    pub fn ask(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            assert!(self.stdout.read_line(&mut line).unwrap() > 0, "peer exited");
            if let Some(rest) = line.split("ANSWER ").nth(1) {
                return rest.trim().to_string();
            }
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        if sig == "-STOP" {
            // `kill` returns once the signal is sent; the peer's threads stop a moment later.
            wait_stopped(self.child.id());
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        std::thread::sleep(std::time::Duration::from_millis(20));
        self.kill();
    }
}

/// Body of the peer process.
pub fn run_peer() {
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let mut dd = LlmDataDist::new(LlmRole::Prompt, PEER_ID);
    dd.init(&options(
        &env("LLM_DD_TRANSPORT"),
        env("LLM_DD_REMOTE") == "1",
        true,
        &env("LLM_DD_TOKEN"),
        2000,
    ))
    .expect("peer init");
    let cm = dd.cache_manager().unwrap();
    let mut blocks = Tensors::new(TENSORS, (BLOCKS * BLOCK_BYTES) as usize);
    for (t, buf) in blocks.0.iter_mut().enumerate() {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = pattern(1, t, i);
        }
    }
    // SAFETY: the buffers live until the end of this function, after finalize.
    unsafe {
        cm.register_blocks_cache(
            &blocks_desc(),
            &blocks.addrs(),
            Some(BlocksCacheKey::new(PEER_ID, 0)),
            None,
        )
        .unwrap();
    }
    let contig = cm
        .allocate_cache(
            &slots_desc(),
            &[CacheKey::new(PEER_ID, 100), CacheKey::new(PEER_ID, 101)],
        )
        .unwrap();
    for (t, &a) in contig.tensor_addrs().iter().enumerate() {
        // SAFETY: pool memory of `slots_desc().size()` bytes per tensor.
        let buf =
            unsafe { std::slice::from_raw_parts_mut(a as *mut u8, slots_desc().size() as usize) };
        for (i, b) in buf.iter_mut().enumerate() {
            *b = pattern(2, t, i);
        }
    }
    let mut big = Tensors::new(0, 0);
    if env("LLM_DD_BIG") == "1" {
        big = Tensors::new(BIG_TENSORS, (BIG_BLOCKS * BIG_BLOCK_BYTES) as usize);
        let desc = CacheDesc::new(
            BIG_TENSORS,
            vec![BIG_BLOCKS, BIG_BLOCK_BYTES],
            DataType::DtUint8,
        )
        .unwrap();
        // SAFETY: as above.
        unsafe {
            cm.register_blocks_cache(
                &desc,
                &big.addrs(),
                Some(BlocksCacheKey::new(PEER_ID, 1)),
                None,
            )
            .unwrap();
        }
    }
    let addrs: Vec<String> = contig
        .tensor_addrs()
        .iter()
        .map(|a| a.to_string())
        .collect();
    println!(
        "READY {} {} {}",
        dd.listen_addr().unwrap().port(),
        contig.cache_id(),
        addrs.join(" ")
    );
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.unwrap();
        match line.trim() {
            "quit" => break,
            "links" => println!("ANSWER {}", dd.linked_clusters().len()),
            other => println!("ANSWER unknown command {other}"),
        }
    }
    dd.finalize();
    drop(blocks);
    drop(big);
}
