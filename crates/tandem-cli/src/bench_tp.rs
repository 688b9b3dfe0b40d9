//! `tandem bench tensor-parallel`: what tensor parallelism costs and gives on this machine.
//! The all-reduce of one layer's hidden states at batch 1 and 64 beside a memcpy of the same
//! bytes (same run); prefill and decode through engines of one rank and of N ranks (real rank
//! processes, as `serve` starts them); each rank's resident memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use tandem_collective::{Collective, ShmGroup, TcpGroup, TcpRendezvous};
use tandem_engine::{Engine, GenerateParams};

use crate::engine_args::EngineArgs;

/// Arguments of `tandem bench tensor-parallel`.
#[derive(Args, Debug)]
pub struct TpBenchArgs {
    /// Model (as for `generate`).
    #[arg(long)]
    model: Option<String>,
    /// Ranks of the tensor-parallel engine.
    #[arg(long, default_value_t = 2)]
    tensor_parallel: usize,
    /// Prompt tokens to prefill.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens to decode.
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Repetitions (medians are reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    #[command(flatten)]
    engine: EngineArgs,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// How the ranks of the all-reduce measurement are joined.
#[derive(Clone, Copy)]
enum Transport {
    /// One host's shared-memory group.
    Shm,
    /// The group ranks on other hosts use, here over loopback TCP.
    Tcp,
}

/// A group of `world` ranks joined over `t`, rank 0 first.
fn groups(t: Transport, world: usize, n: usize) -> anyhow::Result<Vec<Box<dyn Collective>>> {
    let mut out: Vec<Box<dyn Collective>> = Vec::with_capacity(world);
    match t {
        Transport::Shm => {
            let root = ShmGroup::create(world, (n * 4).max(1 << 16))?;
            for r in 1..world {
                out.push(Box::new(ShmGroup::join(root.path(), r)?));
            }
            root.unlink();
            out.insert(0, Box::new(root));
        }
        Transport::Tcp => {
            let rv = TcpRendezvous::bind("127.0.0.1:0", world, "bench")?;
            let addr = rv.local_addr()?;
            let joining: Vec<_> = (1..world)
                .map(|r| {
                    std::thread::spawn(move || TcpGroup::connect(addr, r, world, "bench", b""))
                })
                .collect();
            out.push(Box::new(rv.accept(&|| false)?));
            for j in joining {
                let g = j
                    .join()
                    .map_err(|_| anyhow::anyhow!("a joining rank panicked"))??;
                out.push(Box::new(g));
            }
        }
    }
    Ok(out)
}

/// Seconds per all-reduce of `n` floats over `world` ranks (threads joined to one group, each
/// pinned to its core), median of `repeats` timed runs of `iters`.
fn all_reduce_secs(
    t: Transport,
    world: usize,
    cores: &[usize],
    n: usize,
    iters: usize,
) -> anyhow::Result<f64> {
    let run = move |g: &dyn Collective, core: usize| -> f64 {
        let _ = tandem_kernels::pin_current_thread(core);
        let mut x = vec![1.0f32; n];
        let mut times = Vec::new();
        for _ in 0..5 {
            g.barrier().expect("barrier");
            let t = Instant::now();
            for _ in 0..iters {
                g.all_reduce_sum(&mut x).expect("all-reduce");
            }
            times.push(t.elapsed().as_secs_f64() / iters as f64);
        }
        median(times)
    };
    let mut groups = groups(t, world, n)?;
    let root = groups.remove(0);
    let run = Arc::new(run);
    let others: Vec<_> = groups
        .into_iter()
        .map(|g| {
            let (run, core) = (run.clone(), cores[g.rank() % cores.len()]);
            std::thread::spawn(move || run(g.as_ref(), core))
        })
        .collect();
    let t = run(root.as_ref(), cores[0]);
    for o in others {
        o.join()
            .map_err(|_| anyhow::anyhow!("an all-reduce rank panicked"))?;
    }
    Ok(t)
}

/// Seconds per copy of `n` floats (the same bytes an all-reduce moves into each rank).
fn memcpy_secs(n: usize, iters: usize) -> f64 {
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let times = (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                dst.copy_from_slice(std::hint::black_box(&src));
                std::hint::black_box(&mut dst);
            }
            t.elapsed().as_secs_f64() / iters as f64
        })
        .collect();
    median(times)
}

/// Prefill tok/s (a prompt alone, to its first token) and decode tok/s (one sequence).
fn engine_speed(e: &Engine, a: &TpBenchArgs) -> anyhow::Result<(f64, f64)> {
    let vocab = e.info().vocab_size as u32;
    let prompt = |salt: u32, n: usize| -> Vec<u32> {
        (0..n as u32)
            .map(|i| 100 + (i.wrapping_mul(2654435761) ^ salt) % (vocab - 200))
            .collect()
    };
    let run = |p: Vec<u32>, gen: usize| -> anyhow::Result<Vec<Instant>> {
        let params = GenerateParams {
            max_new_tokens: Some(gen),
            ignore_eos: true,
            ..GenerateParams::greedy()
        };
        let mut times = vec![Instant::now()];
        let mut s = e.submit(p, params)?;
        while let Some(ev) = s.blocking_recv() {
            if let Some(tandem_engine::FinishReason::Error(why)) = &ev.finish {
                anyhow::bail!("generation failed: {why}");
            }
            if ev.token.is_some() {
                times.push(Instant::now());
            }
            if ev.finish.is_some() {
                break;
            }
        }
        Ok(times)
    };
    let (mut pre, mut dec) = (Vec::new(), Vec::new());
    for r in 0..a.repeats {
        // Fresh prompts: no prefix-cache hits.
        let t = run(prompt(2 * r as u32 + 1, a.prompt_tokens), 1)?;
        pre.push(a.prompt_tokens as f64 / (t[1] - t[0]).as_secs_f64());
        let t = run(prompt(2 * r as u32 + 2, 8), a.gen_tokens)?;
        let last = t.len() - 1;
        dec.push((last - 1) as f64 / (t[last] - t[1]).as_secs_f64());
    }
    Ok((median(pre), median(dec)))
}

/// Resident memory of `pid` in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// This process's `tp-rank` children.
fn rank_pids() -> Vec<u32> {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1).map(str::to_string));
            String::from_utf8_lossy(&cmd).contains("tp-rank") && ppid.as_deref() == Some(&me)
        })
        .collect()
}

/// Runs `tandem bench tensor-parallel`.
pub fn run(a: TpBenchArgs) -> anyhow::Result<()> {
    let path = tandem_model::fetch::resolve_model(a.model.as_deref(), true)?;
    let mcfg = tandem_model::loader::read_config(&path)?;
    let tp = a.tensor_parallel;
    tandem_model::shard::check_world(&mcfg, tp)?;
    let all = tandem_kernels::allowed_cores();
    let cores = crate::tensor_parallel::core_plan(&all, 1, tp)?;
    let d = mcfg.hidden_size;
    println!(
        "model {} (hidden {d}), {tp} ranks on cores {cores:?}",
        path.display()
    );
    println!(
        "\nall-reduce of the hidden states ({tp} ranks; shared memory as on one host, TCP as between hosts, here over loopback) vs memcpy of the same bytes:"
    );
    println!(
        "| transport | batch | bytes | all-reduce (us) | all-reduce GB/s | memcpy (us) | memcpy GB/s | ratio |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let firsts: Vec<usize> = cores.iter().map(|c| c[0]).collect();
    for (name, t, scale) in [("shm", Transport::Shm, 1), ("tcp", Transport::Tcp, 10)] {
        for (batch, iters) in [(1, 20_000), (64, 500)] {
            let n = batch * d;
            let iters = iters / scale;
            let ar = all_reduce_secs(t, tp, &firsts, n, iters)?;
            let mc = memcpy_secs(n, iters);
            let bytes = (n * 4) as f64;
            println!(
                "| {name} | {batch} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1}x |",
                n * 4,
                ar * 1e6,
                bytes / ar / 1e9,
                mc * 1e6,
                bytes / mc / 1e9,
                ar / mc
            );
        }
    }
    let mut args = a.engine.clone();
    args.max_batch_tokens = Some(args.max_batch_tokens.unwrap_or(0).max(a.prompt_tokens));
    let engine = crate::tensor_parallel::start_engine(&path, &cores, &args)?;
    std::thread::sleep(Duration::from_millis(200));
    let (tp_pre, tp_dec) = engine_speed(&engine, &a)?;
    let mut rss = vec![rss_mib(std::process::id())];
    rss.extend(rank_pids().into_iter().map(rss_mib));
    drop(engine);
    let mut loaded = tandem_model::load(&path)?;
    loaded.model = loaded.model.with_cores(&all)?;
    let one = Engine::start(loaded, args.config())?;
    let (pre, dec) = engine_speed(&one, &a)?;
    let rss_one = rss_mib(std::process::id());
    drop(one);
    println!(
        "\nengine, {} prompt tokens / {} decoded (median of {}):",
        a.prompt_tokens, a.gen_tokens, a.repeats
    );
    println!("| figure | TP=1 | TP={tp} | TP={tp} / TP=1 |");
    println!("|---|---:|---:|---:|");
    println!(
        "| prefill tok/s | {pre:.1} | {tp_pre:.1} | {:.2}x |",
        tp_pre / pre
    );
    println!(
        "| decode tok/s | {dec:.1} | {tp_dec:.1} | {:.2}x |",
        tp_dec / dec
    );
    let ranks: Vec<String> = rss.iter().map(|m| format!("{m:.0}")).collect();
    println!(
        "| resident MiB per rank | {rss_one:.0} | {} | |",
        ranks.join(" / ")
    );
    Ok(())
}
