//! `tandem bench serve`: a bounded load generator for any OpenAI-compatible streaming endpoint
//! (Tandem or llama.cpp's `llama-server`): concurrency, request count, normally distributed
//! prompt and output lengths; prints throughput, TTFT and TPOT (mean/p50/p95) and FastGen's
//! effective throughput.

use std::time::{Duration, Instant};

use clap::Args;
use futures_util::StreamExt;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::bench_stats::{draw_len, mean_p50_p95 as stats};

/// Arguments of `tandem bench serve`.
#[derive(Args, Debug)]
pub struct ServeBenchArgs {
    /// Base URL of the server (only loopback unless you name another host explicitly).
    #[arg(long, default_value = "http://127.0.0.1:28080")]
    url: String,
    /// Model name to put in requests (some servers check it).
    #[arg(long)]
    model: Option<String>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Requests in total.
    #[arg(long, default_value_t = 32)]
    requests: usize,
    /// Mean prompt length (tokens, sent as token ids).
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Mean generated length (tokens).
    #[arg(long, default_value_t = 128)]
    gen_len: usize,
    /// Relative spread (standard deviation / mean) of both lengths.
    #[arg(long, default_value_t = 0.0)]
    spread: f64,
    /// Prompt SLA for effective throughput: TTFT <= prompt_tokens / S_p seconds.
    #[arg(long, default_value_t = 512.0)]
    sp: f64,
    /// Generation SLA: the EMA (span 16) of per-token latency stays below 1 / S_g.
    #[arg(long, default_value_t = 4.0)]
    sg: f64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Bearer token, if the server wants one.
    #[arg(long)]
    api_key: Option<String>,
    /// Largest token id to draw prompts from (stay inside the model's vocabulary).
    #[arg(long, default_value_t = 30000)]
    max_token_id: u32,
    /// Seed for prompts and lengths.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A `response_format` (JSON) added to every request, to measure constrained decoding,
    /// e.g. '{"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}}'.
    #[arg(long, value_parser = parse_json)]
    response_format: Option<serde_json::Value>,
}

fn parse_json(s: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))
}

struct Outcome {
    prompt_tokens: usize,
    start: Instant,
    times: Vec<Instant>,
}

/// Sends one streaming completion and records when each token arrived.
async fn one(
    client: &reqwest::Client,
    a: &ServeBenchArgs,
    prompt: Vec<u32>,
    gen: usize,
) -> anyhow::Result<Outcome> {
    let prompt_tokens = prompt.len();
    let mut body = serde_json::json!({
        "prompt": prompt, "max_tokens": gen, "temperature": 0, "stream": true, "ignore_eos": true,
    });
    if let Some(m) = &a.model {
        body["model"] = m.clone().into();
    }
    if let Some(f) = &a.response_format {
        body["response_format"] = f.clone();
    }
    let mut req = client
        .post(format!("{}/v1/completions", a.url.trim_end_matches('/')))
        .json(&body);
    if let Some(k) = &a.api_key {
        req = req.bearer_auth(k);
    }
    let start = Instant::now();
    let resp = req.send().await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "HTTP {}: {}",
        resp.status(),
        resp.text().await.unwrap_or_default()
    );
    let mut stream = resp.bytes_stream();
    let (mut buf, mut times) = (String::new(), Vec::new());
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                if data.trim() == "[DONE]" {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(data)?;
                let has_text = v["choices"][0]["text"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty());
                let finished = !v["choices"][0]["finish_reason"].is_null();
                if has_text || (finished && times.len() < gen) {
                    times.push(Instant::now());
                }
            }
        }
    }
    Ok(Outcome {
        prompt_tokens,
        start,
        times,
    })
}

/// Runs `tandem bench serve`.
pub fn run(a: ServeBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.concurrency > 0 && a.requests > 0 && a.prompt_len > 0 && a.gen_len > 0,
        "counts must be positive"
    );
    let host = reqwest::Url::parse(&a.url)?;
    anyhow::ensure!(host.host_str().is_some(), "--url needs a host");
    let mut rng = StdRng::seed_from_u64(a.seed);
    let work: Vec<(Vec<u32>, usize)> = (0..a.requests)
        .map(|_| {
            let (p, g) = (
                draw_len(&mut rng, a.prompt_len, a.spread),
                draw_len(&mut rng, a.gen_len, a.spread),
            );
            (
                (0..p).map(|_| rng.gen_range(100..a.max_token_id)).collect(),
                g,
            )
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (outcomes, wall) = rt.block_on(async {
        // A fresh connection per request: llama-server closes streamed connections, and a
        // pooled one reused just as its FIN arrives fails the request ("connection closed
        // before message completed"). Connecting over loopback costs microseconds.
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(a.timeout))
            .pool_max_idle_per_host(0)
            .build()?;
        let t0 = Instant::now();
        let results: Vec<anyhow::Result<Outcome>> =
            futures_util::stream::iter(work.into_iter().map(|(p, g)| one(&client, &a, p, g)))
                .buffer_unordered(a.concurrency)
                .collect()
                .await;
        let wall = t0.elapsed().as_secs_f64();
        anyhow::Ok((
            results.into_iter().collect::<anyhow::Result<Vec<_>>>()?,
            wall,
        ))
    })?;
    let tokens: usize = outcomes.iter().map(|o| o.times.len()).sum();
    let (ttft, tpot) =
        crate::bench_stats::ttft_tpot(outcomes.iter().map(|r| (r.start, r.times.as_slice())));
    // FastGen's effective throughput: both SLAs per request.
    let alpha = 2.0 / 17.0;
    let ok = outcomes
        .iter()
        .filter(|o| {
            let Some(first) = o.times.first() else {
                return false;
            };
            let prompt_ok = (*first - o.start).as_secs_f64() <= o.prompt_tokens as f64 / a.sp;
            let mut ema: Option<f64> = None;
            let gen_ok = o.times.windows(2).all(|w| {
                let lat = (w[1] - w[0]).as_secs_f64();
                let e = ema.map_or(lat, |e| alpha * lat + (1.0 - alpha) * e);
                ema = Some(e);
                e < 1.0 / a.sg
            });
            prompt_ok && gen_ok
        })
        .count();
    let rps = outcomes.len() as f64 / wall;
    let (tt, tp) = (stats(ttft), stats(tpot));
    println!(
        "{} | concurrency {} | {} requests | prompt {} / gen {} tokens (spread {})",
        a.url, a.concurrency, a.requests, a.prompt_len, a.gen_len, a.spread
    );
    println!(
        "throughput            {:>9.1} tok/s ({tokens} tokens in {wall:.2} s, {rps:.3} req/s)",
        tokens as f64 / wall
    );
    println!(
        "TTFT  mean/p50/p95    {:>9.0} / {:.0} / {:.0} ms",
        tt.0 * 1e3,
        tt.1 * 1e3,
        tt.2 * 1e3
    );
    println!(
        "TPOT  mean/p50/p95    {:>9.1} / {:.1} / {:.1} ms",
        tp.0 * 1e3,
        tp.1 * 1e3,
        tp.2 * 1e3
    );
    println!(
        "effective throughput  {:>9.3} req/s ({ok}/{} within SLA: S_p {} tok/s, S_g {} tok/s)",
        rps * ok as f64 / outcomes.len() as f64,
        outcomes.len(),
        a.sp,
        a.sg
    );
    Ok(())
}
