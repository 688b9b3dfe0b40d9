//! `tandem bench pipeline`: the in-process pipeline (MII's `pipeline`) on a list of prompts,
//! greedy, a fixed number of new tokens each: generated tokens per second over whole calls,
//! the figure the Python pipeline's benchmark (`scripts/bench_python.py`) is compared with.

use std::time::Instant;

use clap::Args;
use tandem_engine::{GenerateParams, Pipeline};

use crate::bench_stats::mean_p50_p95;
use crate::engine_args::EngineArgs;

/// Arguments of `tandem bench pipeline`.
#[derive(Args, Debug)]
pub struct PipelineBenchArgs {
    /// Model (as for `generate`).
    #[arg(long)]
    model: Option<String>,
    /// Prompts, all in one call (batched by the engine).
    #[arg(long = "prompt", required = true)]
    prompts: Vec<String>,
    /// New tokens per prompt (EOS ignored).
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Timed calls after one warm-up call.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    #[command(flatten)]
    engine: EngineArgs,
}

/// Runs the benchmark; prints one JSON line with the median tokens per second.
pub fn run(a: PipelineBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.repeats > 0, "--repeats must be at least 1");
    let path = tandem_model::fetch::resolve_model(a.model.as_deref(), true)?;
    let pipe = Pipeline::new(&path, a.engine.config())?;
    let params = GenerateParams {
        max_new_tokens: Some(a.max_new_tokens),
        ignore_eos: true,
        ..GenerateParams::greedy()
    };
    let mut rates = Vec::with_capacity(a.repeats);
    for i in 0..=a.repeats {
        let t0 = Instant::now();
        let out = pipe.generate(&a.prompts, &params)?;
        let secs = t0.elapsed().as_secs_f64();
        let tokens: usize = out.iter().map(|r| r.generated_length).sum();
        if i > 0 {
            rates.push(tokens as f64 / secs);
        }
    }
    let (_, p50, _) = mean_p50_p95(rates.clone());
    println!(
        "{}",
        serde_json::json!({ "tokens_per_s_p50": p50, "tokens_per_s": rates, "prompts": a.prompts.len(), "max_new_tokens": a.max_new_tokens })
    );
    Ok(())
}
