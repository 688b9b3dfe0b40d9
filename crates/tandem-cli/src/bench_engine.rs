//! `tandem bench engine`: N concurrent sequences through the in-process engine; aggregate
//! throughput, TTFT, TPOT, and the largest gap between two tokens of one running sequence.
//! With `--inject-prompt-len`, one long prompt arrives once every sequence is decoding, which
//! shows whether Dynamic SplitFuse keeps the decodes flowing.

use std::time::{Duration, Instant};

use clap::Args;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::bench_stats::{draw_len, mean_p50_p95 as stats};
use tandem_engine::{Engine, GenerateParams};

use crate::engine_args::EngineArgs;

/// Arguments of `tandem bench engine`.
#[derive(Args, Debug)]
pub struct EngineBenchArgs {
    /// Model (as for `generate`).
    #[arg(long)]
    model: Option<String>,
    /// Concurrent sequences.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Mean prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Mean generated length in tokens.
    #[arg(long, default_value_t = 128)]
    gen_len: usize,
    /// Relative spread (standard deviation / mean) of both lengths; 0 = fixed.
    #[arg(long, default_value_t = 0.0)]
    spread: f64,
    /// After every sequence has its first token, submit one extra prompt of this many tokens.
    #[arg(long)]
    inject_prompt_len: Option<usize>,
    /// Seed for the synthetic prompts and lengths.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    engine: EngineArgs,
}

struct Trace {
    start: Instant,
    times: Vec<Instant>,
}

fn prompt(rng: &mut StdRng, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|_| rng.gen_range(100..vocab as u32 - 100))
        .collect()
}

/// Submits a request and records the arrival time of each token on a thread.
fn launch(
    engine: &Engine,
    p: Vec<u32>,
    gen: usize,
) -> anyhow::Result<std::thread::JoinHandle<Trace>> {
    let params = GenerateParams {
        max_new_tokens: Some(gen),
        ignore_eos: true,
        ..GenerateParams::greedy()
    };
    let start = Instant::now();
    let mut stream = engine.submit(p, params)?;
    Ok(std::thread::spawn(move || {
        let mut times = Vec::new();
        while let Some(ev) = stream.blocking_recv() {
            if ev.token.is_some() {
                times.push(Instant::now());
            }
            if ev.finish.is_some() {
                break;
            }
        }
        Trace { start, times }
    }))
}

/// Runs `tandem bench engine`.
pub fn run(a: EngineBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.concurrency > 0 && a.prompt_len > 0 && a.gen_len > 0,
        "counts must be positive"
    );
    let loaded = crate::load_model(a.model.as_deref())?;
    let vocab = loaded.model.config().vocab_size;
    let cfg = a.engine.config();
    let budget = cfg.batch_tokens();
    let engine = Engine::start(loaded, cfg)?;
    let mut rng = StdRng::seed_from_u64(a.seed);
    // Warm-up: one short request (thread pools, page faults).
    launch(&engine, prompt(&mut rng, 16, vocab), 4)?
        .join()
        .expect("warm-up thread");

    let t0 = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..a.concurrency {
        let (pl, gl) = (
            draw_len(&mut rng, a.prompt_len, a.spread),
            draw_len(&mut rng, a.gen_len, a.spread),
        );
        handles.push(launch(&engine, prompt(&mut rng, pl, vocab), gl)?);
    }
    let injected = match a.inject_prompt_len {
        Some(len) => {
            // Wait until every sequence is decoding (has produced a token).
            let deadline = Instant::now() + Duration::from_secs(600);
            while engine.stats().waiting > 0 || engine.stats().running < a.concurrency {
                anyhow::ensure!(Instant::now() < deadline, "sequences never all started");
                std::thread::sleep(Duration::from_millis(2));
            }
            std::thread::sleep(Duration::from_millis(200));
            Some((
                Instant::now(),
                launch(&engine, prompt(&mut rng, len, vocab), 1)?,
            ))
        }
        None => None,
    };
    let traces: Vec<Trace> = handles
        .into_iter()
        .map(|h| h.join().expect("collector thread"))
        .collect();
    let wall = t0.elapsed().as_secs_f64();
    let generated: usize = traces.iter().map(|t| t.times.len()).sum();
    let (ttft, tpot) =
        crate::bench_stats::ttft_tpot(traces.iter().map(|r| (r.start, r.times.as_slice())));
    let gaps: Vec<Vec<f64>> = traces
        .iter()
        .map(|t| {
            t.times
                .windows(2)
                .map(|w| (w[1] - w[0]).as_secs_f64())
                .collect()
        })
        .collect();
    let max_gap = gaps.iter().flatten().cloned().fold(0.0, f64::max);
    let (tt, tp) = (stats(ttft), stats(tpot));
    println!(
        "concurrency {} | prompt {} | gen {} | spread {} | budget {} tokens/forward",
        a.concurrency, a.prompt_len, a.gen_len, a.spread, budget
    );
    println!(
        "aggregate throughput   {:>9.1} tok/s ({} tokens in {:.2} s)",
        generated as f64 / wall,
        generated,
        wall
    );
    println!(
        "TTFT  mean/p50/p95     {:>7.0} / {:.0} / {:.0} ms",
        tt.0 * 1e3,
        tt.1 * 1e3,
        tt.2 * 1e3
    );
    println!(
        "TPOT  mean/p50/p95     {:>7.1} / {:.1} / {:.1} ms",
        tp.0 * 1e3,
        tp.1 * 1e3,
        tp.2 * 1e3
    );
    println!("largest inter-token gap {:>6.0} ms", max_gap * 1e3);
    if let Some((at, h)) = injected {
        let tr = h.join().expect("collector thread");
        let inj_ttft = tr
            .times
            .first()
            .map_or(f64::NAN, |f| (*f - at).as_secs_f64());
        let median_gap = stats(gaps.iter().flatten().cloned().collect()).1;
        // Gaps of the decoding sequences that overlap the injected prompt's prefill.
        let end = tr.times.first().copied().unwrap_or(at);
        let during: Vec<f64> = traces
            .iter()
            .flat_map(|t| {
                t.times
                    .windows(2)
                    .filter(|w| w[1] > at && w[0] < end)
                    .map(|w| (w[1] - w[0]).as_secs_f64())
            })
            .collect();
        let (_, p50, p95) = stats(during.clone());
        let max = during.iter().cloned().fold(0.0, f64::max);
        println!(
            "injected {}-token prompt: TTFT {:.0} ms; decode gaps while it prefilled: p50 {:.0} / p95 {:.0} / max {:.0} ms; overall median gap {:.0} ms; max/median {:.2}x",
            a.inject_prompt_len.unwrap_or(0),
            inj_ttft * 1e3,
            p50 * 1e3,
            p95 * 1e3,
            max * 1e3,
            median_gap * 1e3,
            max / median_gap
        );
    }
    Ok(())
}
