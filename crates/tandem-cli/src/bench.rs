//! `tandem bench model`: engine-free prefill and decode throughput, as llama-bench reports.

use std::time::Instant;

use clap::{Args, Subcommand};
use tandem_engine::argmax;
use tandem_model::{KvCache, KvDType, LlamaModel, LogitsMode, SeqInput, SimdLevel};

/// `tandem bench` subcommands.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Prefill N tokens and decode M tokens with the bare forward pass (no engine).
    Model(ModelBenchArgs),
    /// Concurrent sequences through the engine: throughput, TTFT, TPOT, inter-token gaps.
    Engine(crate::bench_engine::EngineBenchArgs),
    /// Load on any OpenAI-compatible streaming server (Tandem or llama-server).
    Serve(crate::bench_serve::ServeBenchArgs),
    /// KV-cache transfer between two processes with llm-datadist (GB/s vs a raw baseline).
    Datadist(crate::bench_datadist::DataDistBenchArgs),
    /// The in-process pipeline on a list of prompts: generated tokens per second.
    Pipeline(crate::bench_pipeline::PipelineBenchArgs),
    /// Tensor parallelism: all-reduce vs memcpy, one rank vs N on prefill and decode, memory.
    TensorParallel(crate::bench_tp::TpBenchArgs),
}

/// Arguments of `tandem bench model`.
#[derive(Args, Debug)]
pub struct ModelBenchArgs {
    /// Model (as for `generate`).
    #[arg(long)]
    model: Option<String>,
    /// Prompt tokens to prefill.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens to decode.
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Repetitions (medians are reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// SIMD level to use: scalar, avx2, avx512 or amx (default: best available).
    #[arg(long)]
    simd: Option<String>,
    /// Memory read bandwidth in GB/s for the decode roofline (default: measured before every
    /// `PROBE_EVERY` decoded tokens, one reading thread per core over a buffer far larger than
    /// the caches).
    #[arg(long)]
    bandwidth_gbs: Option<f64>,
}

/// Read bandwidth in GB/s of `threads` threads each summing its share of a 256 MiB buffer.
/// Taken before every [`PROBE_EVERY`] decoded tokens: a VM's bandwidth doubles and halves
/// from one minute to the next (probe readings of 33-72 GB/s on one machine), and a reading
/// per decode run judged runs that crossed a change against the other phase (one run decoded
/// the 1.5B at 116% of the roofline read before it, another at 67%).
struct BandwidthProbe {
    buf: Vec<u64>,
    threads: usize,
}

impl BandwidthProbe {
    fn new(threads: usize) -> BandwidthProbe {
        const WORDS: usize = 1 << 25;
        // Huge pages, as the packed weights ask for, so both are read through the same kind
        // of page; the writes fault the pages in.
        let mut buf = vec![0u64; WORDS];
        tandem_kernels::mem::advise_huge_pages(&mut buf);
        for (i, w) in buf.iter_mut().enumerate() {
            *w = i as u64;
        }
        BandwidthProbe { buf, threads }
    }

    /// Best of six passes, three reading plainly and three as the kernels stream weights
    /// (`sum_streamed`: with software prefetches where they use them; on a Zen 3, 256 MiB read
    /// 3-7% faster that way), each timed from the moment every thread is ready to read to the
    /// last one's end (spawning and joining left out: ~1% of a 256 MiB pass).
    fn measure(&self) -> f64 {
        let per = self.buf.len().div_ceil(self.threads);
        let parts: Vec<&[u64]> = self.buf.chunks(per).collect();
        (0..6)
            .map(|pass| {
                let ready = std::sync::Barrier::new(parts.len());
                let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
                    let threads: Vec<_> = parts
                        .iter()
                        .map(|&part| {
                            let ready = &ready;
                            s.spawn(move || {
                                ready.wait();
                                let t0 = Instant::now();
                                std::hint::black_box(if pass % 2 == 0 {
                                    part.iter().fold(0u64, |a, &v| a.wrapping_add(v))
                                } else {
                                    tandem_kernels::mem::sum_streamed(part)
                                });
                                (t0, Instant::now())
                            })
                        })
                        .collect();
                    threads.into_iter().filter_map(|t| t.join().ok()).collect()
                });
                let start = spans.iter().map(|s| s.0).min();
                let end = spans.iter().map(|s| s.1).max();
                match (start, end) {
                    (Some(a), Some(b)) => (self.buf.len() * 8) as f64 / (b - a).as_secs_f64() / 1e9,
                    _ => 0.0,
                }
            })
            .fold(0f64, f64::max)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Decoded tokens between two bandwidth readings: 0.1-0.8 s of decoding on the models here,
/// short against the seconds to minutes a bandwidth phase lasts. (Each reading also evicts
/// the caches, so a stretch starts as cold as it would after other work.)
const PROBE_EVERY: usize = 32;

/// One decode run: tokens per second over the whole run (the probes' time left out), and per
/// stretch of [`PROBE_EVERY`] tokens its tokens per second and the bandwidth read before it.
struct DecodeRun {
    tps: f64,
    stretches: Vec<(f64, f64)>,
}

/// Decodes `n` tokens after `ctx` cached ones, reading the bandwidth with `bandwidth` before
/// every [`PROBE_EVERY`] of them.
fn decode(
    model: &LlamaModel,
    kv: &mut KvCache,
    table: &[u32],
    (mut ctx, mut next): (usize, u32),
    n: usize,
    bandwidth: &dyn Fn() -> f64,
) -> anyhow::Result<DecodeRun> {
    let mut stretches = Vec::new();
    let mut total = 0.0;
    let mut left = n;
    while left > 0 {
        let len = left.min(PROBE_EVERY);
        let bw = bandwidth();
        let t0 = Instant::now();
        for _ in 0..len {
            let seq = SeqInput {
                n_tokens: 1,
                context_len: ctx,
                block_table: table,
                logits: LogitsMode::Last,
            };
            next = argmax(model.forward(&[next], &[seq], kv)?.row(0));
            ctx += 1;
        }
        let secs = t0.elapsed().as_secs_f64();
        total += secs;
        stretches.push((len as f64 / secs, bw));
        left -= len;
    }
    Ok(DecodeRun {
        tps: n as f64 / total,
        stretches,
    })
}

/// Runs `tandem bench ...`.
pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    let a = match cmd {
        BenchCommand::Model(a) => a,
        BenchCommand::Engine(a) => return crate::bench_engine::run(a),
        BenchCommand::Serve(a) => return crate::bench_serve::run(a),
        BenchCommand::Datadist(a) => return crate::bench_datadist::run(a),
        BenchCommand::Pipeline(a) => return crate::bench_pipeline::run(a),
        BenchCommand::TensorParallel(a) => return crate::bench_tp::run(a),
    };
    anyhow::ensure!(
        a.prompt_tokens > 0 && a.gen_tokens > 0 && a.repeats > 0,
        "token counts and repeats must be positive"
    );
    anyhow::ensure!(
        a.bandwidth_gbs.is_none_or(|b| b.is_finite() && b > 0.0),
        "--bandwidth-gbs must be a positive number of GB/s"
    );
    let loaded = crate::load_model(a.model.as_deref())?;
    let mut model = loaded.model;
    if let Some(s) = &a.simd {
        let level = SimdLevel::parse(s)
            .ok_or_else(|| anyhow::anyhow!("unknown --simd {s:?} (scalar, avx2, avx512, amx)"))?;
        anyhow::ensure!(level.is_supported(), "this CPU does not support {level:?}");
        model = model.with_simd(level);
    }
    let cfg = model.config().clone();
    let total = a.prompt_tokens + a.gen_tokens;
    anyhow::ensure!(
        total <= model.max_context(),
        "{total} tokens exceed the model's context of {}",
        model.max_context()
    );
    // Deterministic, ordinary (non-special) tokens.
    let vocab = cfg.vocab_size as u64;
    let prompt: Vec<u32> = (0..a.prompt_tokens as u64)
        .map(|i| (100 + (i * 2_654_435_761) % (vocab - 200)) as u32)
        .collect();
    let block = 16;
    let table: Vec<u32> = (0..total.div_ceil(block) as u32).collect();
    let probe = a
        .bandwidth_gbs
        .is_none()
        .then(|| BandwidthProbe::new(rayon_threads()));
    let bandwidth = || {
        probe
            .as_ref()
            .map_or_else(|| a.bandwidth_gbs.unwrap_or(0.0), BandwidthProbe::measure)
    };
    let (mut prefill, mut dec_empty, mut dec_after) = (vec![], vec![], vec![]);
    // One cache for every run, as llama-bench keeps its context: every run writes the
    // positions it reads, and a fresh cache per run timed its page faults too (each is
    // unmapped when dropped).
    let mut kv = KvCache::new(&cfg, table.len(), block, KvDType::F16);
    for _ in 0..a.repeats {
        let t0 = Instant::now();
        let seq = SeqInput {
            n_tokens: prompt.len(),
            context_len: 0,
            block_table: &table,
            logits: LogitsMode::Last,
        };
        let next = argmax(model.forward(&prompt, &[seq], &mut kv)?.row(0));
        prefill.push(prompt.len() as f64 / t0.elapsed().as_secs_f64());
        let run =
            |kv: &mut KvCache, start| decode(&model, kv, &table, start, a.gen_tokens, &bandwidth);
        dec_after.push(run(&mut kv, (prompt.len(), next))?);
        dec_empty.push(run(&mut kv, (0, prompt[0]))?);
    }
    let w = model.weights();
    let weight_bytes: usize = w
        .layers
        .iter()
        .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down])
        .map(|l| l.weight.bytes().len())
        .sum::<usize>()
        + w.lm_head.bytes().len();
    let kv_per_token = KvCache::bytes_per_token(&cfg, KvDType::F16);
    let bytes_empty = weight_bytes as f64;
    let bytes_after = (weight_bytes + kv_per_token * (a.prompt_tokens + a.gen_tokens / 2)) as f64;
    // Each stretch's tok/s against its own moment's roofline (bandwidth / bytes read per
    // token); the median over every stretch of every run.
    let fraction = |runs: &[DecodeRun], bytes: f64| {
        median(
            runs.iter()
                .flat_map(|r| &r.stretches)
                .map(|(t, b)| t * bytes / (b * 1e9))
                .collect(),
        )
    };
    let frac_empty = fraction(&dec_empty, bytes_empty);
    let frac_after = fraction(&dec_after, bytes_after);
    let all_bw: Vec<f64> = dec_empty
        .iter()
        .chain(&dec_after)
        .flat_map(|r| r.stretches.iter().map(|s| s.1))
        .collect();
    let (bw_lo, bw_hi) = (
        all_bw.iter().copied().fold(f64::INFINITY, f64::min),
        all_bw.iter().copied().fold(0f64, f64::max),
    );
    let level = a
        .simd
        .as_deref()
        .and_then(SimdLevel::parse)
        .unwrap_or_else(tandem_model::SimdLevel::best);
    println!(
        "model: {} ({} layers, d={}, weights read per token {:.1} MB)",
        loaded.path.display(),
        cfg.num_layers,
        cfg.hidden_size,
        weight_bytes as f64 / 1e6
    );
    println!(
        "threads: {}, SIMD: {level:?}, repeats: {} (medians)",
        rayon_threads(),
        a.repeats
    );
    println!("{:<34} {:>10} {:>16}", "figure", "tok/s", "of roofline");
    println!(
        "{:<34} {:>10.1} {:>16}",
        format!("prefill, {}-token prompt", a.prompt_tokens),
        median(prefill),
        "compute-bound"
    );
    let de = median(dec_empty.iter().map(|r| r.tps).collect());
    let da = median(dec_after.iter().map(|r| r.tps).collect());
    println!(
        "{:<34} {:>10.1} {:>15.0}%",
        "decode, empty cache",
        de,
        100.0 * frac_empty
    );
    println!(
        "{:<34} {:>10.1} {:>15.0}%",
        format!("decode, after {} tokens", a.prompt_tokens),
        da,
        100.0 * frac_after
    );
    if let Some(given) = a.bandwidth_gbs {
        println!(
            "(decode roofline: {given:.1} GB/s (given) over the weights and KV read per token)"
        );
    } else {
        println!(
            "(decode roofline: {:.1} GB/s (median of the readings before every {PROBE_EVERY} \
             decoded tokens: {bw_lo:.1}-{bw_hi:.1}) over the weights and KV read per token; \
             each stretch judged against the reading before it)",
            median(all_bw)
        );
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
