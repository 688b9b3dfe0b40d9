//! `tandem generate`: prompts in, text out (or MII-style JSON records).

use clap::Args;
use serde::Serialize;
use tandem_model::{ChatMessage, IncrementalDecoder};

use crate::batch_generate::{generate, Finish, Sampling};

/// Arguments of `tandem generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model: a .gguf file, an HF model directory, or a known name (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long)]
    model: Option<String>,
    /// A prompt; repeat for several (they run as one batch).
    #[arg(long = "prompt", required = true)]
    prompts: Vec<String>,
    /// Wrap each prompt as one user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Maximum tokens to generate per prompt.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Greedy decoding (otherwise: sampling with temperature and top-p).
    #[arg(long)]
    greedy: bool,
    /// Sampling temperature (without --greedy).
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Nucleus sampling mass (without --greedy).
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Use the float reference path (weights dequantized to f32, no activation quantization).
    #[arg(long)]
    exact: bool,
    /// Print a JSON array, one record per prompt.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Record {
    generated_text: String,
    prompt_length: usize,
    generated_length: usize,
    finish_reason: &'static str,
    prompt_token_ids: Vec<u32>,
    token_ids: Vec<u32>,
}

/// Runs `tandem generate`.
pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.max_new_tokens > 0, "--max-new-tokens must be at least 1");
    anyhow::ensure!(
        a.temperature > 0.0 && a.temperature.is_finite(),
        "--temperature must be above 0"
    );
    anyhow::ensure!(a.top_p > 0.0 && a.top_p <= 1.0, "--top-p must be in (0, 1]");
    let mut loaded = crate::load_model(a.model.as_deref())?;
    if a.exact {
        loaded.model = loaded.model.with_precision(tandem_model::Precision::Exact);
    }
    let tok = &loaded.tokenizer;
    let mut prompts = Vec::with_capacity(a.prompts.len());
    for p in &a.prompts {
        anyhow::ensure!(!p.is_empty(), "empty prompt");
        let ids = if a.chat {
            let text = tok.apply_chat_template(&[ChatMessage::new("user", p.as_str())], true)?;
            tok.encode(&text, false)?
        } else {
            tok.encode(p, true)?
        };
        prompts.push(ids);
    }
    let sampling = if a.greedy {
        Sampling::Greedy
    } else {
        Sampling::TopP {
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed,
        }
    };
    let results = generate(
        &loaded.model,
        &prompts,
        a.max_new_tokens,
        tok.eos_ids(),
        sampling,
    )?;
    let mut records = Vec::new();
    for (p, g) in prompts.into_iter().zip(results) {
        let mut dec = IncrementalDecoder::new(&p);
        let mut text = String::new();
        for &t in &g.tokens {
            text.push_str(&dec.push(tok, t)?);
        }
        text.push_str(&dec.flush(tok)?);
        records.push(Record {
            generated_text: text,
            prompt_length: p.len(),
            generated_length: g.tokens.len(),
            finish_reason: match g.finish {
                Finish::Stop => "stop",
                Finish::Length => "length",
            },
            prompt_token_ids: p,
            token_ids: g.tokens,
        });
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&records)?);
    } else {
        for (i, r) in records.iter().enumerate() {
            if records.len() > 1 {
                println!(
                    "=== prompt {} ({} tokens, {}) ===",
                    i + 1,
                    r.generated_length,
                    r.finish_reason
                );
            }
            println!("{}", r.generated_text);
        }
    }
    Ok(())
}
