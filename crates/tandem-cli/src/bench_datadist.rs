//! `tandem bench datadist`: two processes linked by llm-datadist over TCP or shared memory;
//! `pull_blocks` of a prompt's KV blocks (the reference model's KV shape) beside a raw baseline
//! measured in the same run: a loopback socket stream for TCP, memcpy for shared memory.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{bail, Context};
use llm_datadist::{
    BlocksCacheKey, CacheDesc, DataType, LayerRanges, LlmClusterInfo, LlmConfig, LlmDataDist,
    LlmRole, LlmStatusCode,
};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

use crate::bench_stats::mean_p50_p95;

const SERVER_ID: u64 = 2;
const CLIENT_ID: u64 = 1;

/// Arguments of `tandem bench datadist`.
#[derive(clap::Args, Debug, Clone)]
pub struct DataDistBenchArgs {
    /// Transport between the two processes.
    #[arg(long, value_parser = ["tcp", "shm"], default_value = "shm")]
    pub transport: String,
    /// Layers of the KV shape (default: the reference model, SmolLM2-135M).
    #[arg(long, default_value_t = 30)]
    pub layers: usize,
    /// KV heads.
    #[arg(long, default_value_t = 3)]
    pub kv_heads: usize,
    /// Head dimension.
    #[arg(long, default_value_t = 64)]
    pub head_dim: usize,
    /// Tokens per KV block (the engine's default).
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Blocks in each side's registered pool.
    #[arg(long, default_value_t = 1024)]
    pub pool_blocks: usize,
    /// Blocks per request (128 blocks of 16 tokens = a 2048-token prompt).
    #[arg(long, default_value_t = 128)]
    pub request_blocks: usize,
    /// Measured requests (after 2 warm-up requests).
    #[arg(long, default_value_t = 20)]
    pub requests: usize,
    /// Parallel TCP streams per link direction.
    #[arg(long, default_value_t = llm_datadist::DEFAULT_TCP_STREAMS as u32)]
    pub tcp_streams: u32,
    /// Internal: run as the serving (prefill-side) process.
    #[arg(long, hide = true)]
    pub serve: bool,
}

impl DataDistBenchArgs {
    fn block_bytes(&self) -> usize {
        self.block_size * self.kv_heads * self.head_dim * 2
    }
    fn tensors(&self) -> usize {
        2 * self.layers
    }
    fn desc(&self) -> anyhow::Result<CacheDesc> {
        Ok(CacheDesc::new(
            self.tensors() as u32,
            vec![
                self.pool_blocks as i64,
                self.block_size as i64,
                self.kv_heads as i64,
                self.head_dim as i64,
            ],
            DataType::DtFloat16,
        )?)
    }
}

fn fill(t: usize, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i.wrapping_mul(31) ^ t.wrapping_mul(131)) as u8;
    }
}

fn init(
    args: &DataDistBenchArgs,
    role: LlmRole,
    id: u64,
    listen: bool,
) -> anyhow::Result<LlmDataDist> {
    let mut cfg = LlmConfig::new();
    cfg.set_device_id(0)?;
    cfg.set_enable_cache_manager(true);
    cfg.set_sync_kv_timeout(30_000)?;
    cfg.set_transport(&args.transport)?;
    cfg.set_tcp_streams(args.tcp_streams)?;
    if listen {
        cfg.set_listen_ip_info("127.0.0.1:0");
    }
    let mut dd = LlmDataDist::new(role, id);
    dd.init(&cfg.generate_options())?;
    Ok(dd)
}

/// The serving process: registers a filled pool, serves pulls, and streams raw bytes to
/// whoever connects to its baseline port, until stdin closes.
fn serve(args: &DataDistBenchArgs) -> anyhow::Result<()> {
    let dd = init(args, LlmRole::Prompt, SERVER_ID, true)?;
    let cm = dd.cache_manager()?;
    let desc = args.desc()?;
    let mut pool: Vec<Vec<u8>> = (0..args.tensors())
        .map(|_| vec![0u8; desc.size() as usize])
        .collect();
    pool.iter_mut().enumerate().for_each(|(t, b)| fill(t, b));
    let addrs: Vec<u64> = pool.iter_mut().map(|b| b.as_mut_ptr() as u64).collect();
    // SAFETY: `pool` lives until this function returns, after the instance is dropped below.
    unsafe {
        cm.register_blocks_cache(&desc, &addrs, Some(BlocksCacheKey::new(SERVER_ID, 0)), None)?
    };
    let raw = TcpListener::bind("127.0.0.1:0")?;
    let raw_port = raw.local_addr()?.port();
    let source = pool[0].clone();
    std::thread::spawn(move || {
        for conn in raw.incoming() {
            let Ok(mut s) = conn else { continue };
            let _ = s.set_nodelay(true);
            let source = source.clone();
            std::thread::spawn(move || {
                let mut n = [0u8; 8];
                while s.read_exact(&mut n).is_ok() {
                    let mut left = u64::from_le_bytes(n) as usize;
                    while left > 0 {
                        let k = left.min(source.len()).min(1 << 20);
                        if s.write_all(&source[..k]).is_err() {
                            return;
                        }
                        left -= k;
                    }
                }
            });
        }
    });
    let port = dd.listen_addr().context("not listening")?.port();
    println!("READY {port} {raw_port}");
    std::io::stdout().flush()?;
    let mut sink = String::new();
    while std::io::stdin().read_line(&mut sink)? > 0 {}
    drop(dd);
    drop(pool);
    Ok(())
}

fn gbps(bytes: usize, secs: &[f64]) -> (f64, f64, f64) {
    let (_, p50, p95) = mean_p50_p95(secs.to_vec());
    (bytes as f64 / p50 / 1e9, p50 * 1e3, p95 * 1e3)
}

/// Runs the benchmark (or the serving side with `--serve`).
pub fn run(args: DataDistBenchArgs) -> anyhow::Result<()> {
    if args.serve {
        return serve(&args);
    }
    if args.request_blocks == 0 || args.request_blocks > args.pool_blocks {
        bail!("--request-blocks must be in 1..={}", args.pool_blocks);
    }
    let mut child = crate::self_command()?
        .args([
            "bench",
            "datadist",
            "--serve",
            "--transport",
            &args.transport,
        ])
        .args([
            "--layers",
            &args.layers.to_string(),
            "--kv-heads",
            &args.kv_heads.to_string(),
        ])
        .args([
            "--head-dim",
            &args.head_dim.to_string(),
            "--block-size",
            &args.block_size.to_string(),
        ])
        .args([
            "--pool-blocks",
            &args.pool_blocks.to_string(),
            "--tcp-streams",
            &args.tcp_streams.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let result = drive(&args, &mut child);
    drop(child.stdin.take());
    let _ = child.wait();
    result
}

fn drive(args: &DataDistBenchArgs, child: &mut std::process::Child) -> anyhow::Result<()> {
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("child stdout")?).read_line(&mut line)?;
    let mut it = line
        .strip_prefix("READY ")
        .context("serving process did not start")?
        .split_whitespace();
    let (port, raw_port): (u16, u16) = (
        it.next().context("port")?.parse()?,
        it.next().context("port")?.parse()?,
    );

    let dd = init(args, LlmRole::Decoder, CLIENT_ID, false)?;
    let cm = dd.cache_manager()?;
    let desc = args.desc()?;
    // A serving engine's KV pool is resident: touch every page before measuring.
    let mut pool: Vec<Vec<u8>> = (0..args.tensors())
        .map(|_| vec![1u8; desc.size() as usize])
        .collect();
    let addrs: Vec<u64> = pool.iter_mut().map(|b| b.as_mut_ptr() as u64).collect();
    // SAFETY: `pool` outlives the instance (dropped at the end of this function, after `dd`).
    let local = unsafe {
        cm.register_blocks_cache(&desc, &addrs, Some(BlocksCacheKey::new(CLIENT_ID, 0)), None)?
    };
    let mut info = LlmClusterInfo::new(SERVER_ID);
    info.append_local_ip_info("127.0.0.1", 0)?;
    info.append_remote_ip_info("127.0.0.1", port)?;
    let (ret, _) = dd.link_clusters(&[info], 5000)?;
    if ret != LlmStatusCode::LlmSuccess {
        bail!("link failed: {ret}");
    }
    let shm = dd.link_uses_shm(SERVER_ID) == Some(true);
    if shm != (args.transport == "shm") {
        bail!(
            "link uses shared memory = {shm}, asked for {}",
            args.transport
        );
    }

    let bb = args.block_bytes();
    let bytes = args.tensors() * args.request_blocks * bb;
    let mut rng = StdRng::seed_from_u64(7);
    let mut ids: Vec<u64> = (0..args.pool_blocks as u64).collect();
    let mut pulls = Vec::new();
    for i in 0..args.requests + 2 {
        ids.shuffle(&mut rng);
        let src = ids[..args.request_blocks].to_vec();
        ids.shuffle(&mut rng);
        let dst = ids[..args.request_blocks].to_vec();
        let t0 = Instant::now();
        cm.pull_blocks(
            BlocksCacheKey::new(SERVER_ID, 0),
            &local,
            &src,
            &dst,
            &LayerRanges::all(),
        )?;
        let dt = t0.elapsed().as_secs_f64();
        if i == 0 {
            // Check the bytes once: the last tensor's first pulled block.
            let t = args.tensors() - 1;
            let mut want = vec![0u8; desc.size() as usize];
            fill(t, &mut want);
            let (s, d) = (src[0] as usize * bb, dst[0] as usize * bb);
            if pool[t][d..d + bb] != want[s..s + bb] {
                bail!("pulled bytes differ from the source");
            }
        }
        if i >= 2 {
            pulls.push(dt);
        }
    }

    let mut base = Vec::new();
    let baseline_name;
    if shm {
        baseline_name = "memcpy (same blocks)";
        let source: Vec<Vec<u8>> = pool.clone();
        for i in 0..args.requests + 2 {
            ids.shuffle(&mut rng);
            let src = ids[..args.request_blocks].to_vec();
            ids.shuffle(&mut rng);
            let dst = ids[..args.request_blocks].to_vec();
            let t0 = Instant::now();
            for (t, buf) in pool.iter_mut().enumerate() {
                for (&s, &d) in src.iter().zip(&dst) {
                    let (s, d) = (s as usize * bb, d as usize * bb);
                    buf[d..d + bb].copy_from_slice(&source[t][s..s + bb]);
                }
            }
            std::hint::black_box(&pool);
            if i >= 2 {
                base.push(t0.elapsed().as_secs_f64());
            }
        }
    } else {
        baseline_name = "loopback TCP stream";
        let mut s = TcpStream::connect(("127.0.0.1", raw_port))?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; bytes];
        for i in 0..args.requests + 2 {
            let t0 = Instant::now();
            s.write_all(&(bytes as u64).to_le_bytes())?;
            s.read_exact(&mut buf)?;
            if i >= 2 {
                base.push(t0.elapsed().as_secs_f64());
            }
        }
    }

    let (g, p50, p95) = gbps(bytes, &pulls);
    let (bg, bp50, bp95) = gbps(bytes, &base);
    println!(
        "llm-datadist pull_blocks over {}: {} tensors x {} blocks x {} B = {:.1} MB per request, {} requests",
        args.transport,
        args.tensors(),
        args.request_blocks,
        bb,
        bytes as f64 / 1e6,
        args.requests
    );
    println!(
        "{:<24} {:>10} {:>12} {:>12}",
        "", "GB/s (p50)", "p50 ms", "p95 ms"
    );
    println!(
        "{:<24} {:>10.2} {:>12.2} {:>12.2}",
        "pull_blocks", g, p50, p95
    );
    println!(
        "{:<24} {:>10.2} {:>12.2} {:>12.2}",
        baseline_name, bg, bp50, bp95
    );
    println!("ratio pull_blocks / baseline: {:.2}", g / bg);
    let mut info = LlmClusterInfo::new(SERVER_ID);
    info.append_remote_ip_info("127.0.0.1", port)?;
    dd.unlink_clusters(&[info], 5000, false)?;
    drop(dd);
    drop(pool);
    Ok(())
}
