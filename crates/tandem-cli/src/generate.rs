//! `tandem generate`: prompts in (all batched by the engine), text or MII-style JSON out.

use clap::Args;
use serde::Serialize;
use tandem_engine::{GenerateParams, Pipeline};
use tandem_model::ChatMessage;

use crate::engine_args::EngineArgs;

/// Arguments of `tandem generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model: a .gguf file, an HF model directory, or a known name (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long)]
    model: Option<String>,
    /// A prompt; repeat for several (they run as one batch).
    #[arg(long = "prompt")]
    prompts: Vec<String>,
    /// A file with one prompt per line (added after the --prompt ones).
    #[arg(long)]
    prompts_file: Option<std::path::PathBuf>,
    /// Wrap each prompt as one user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Maximum tokens to generate per prompt.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Do not stop on EOS before this many tokens.
    #[arg(long, default_value_t = 0)]
    min_new_tokens: usize,
    /// Never stop on EOS.
    #[arg(long)]
    ignore_eos: bool,
    /// Greedy decoding (MII's do_sample=False).
    #[arg(long)]
    greedy: bool,
    /// Temperature (applied after top-k/top-p, as MII does).
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// CTRL-style repetition penalty (1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Stop string (repeatable; any length).
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Random seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Include the prompt in the output text.
    #[arg(long)]
    return_full_text: bool,
    /// Also report the top-N log-probabilities of each generated token (JSON output).
    #[arg(long)]
    logprobs: Option<usize>,
    /// Print a JSON array, one record per prompt.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Serialize)]
struct Record {
    generated_text: String,
    prompt_length: usize,
    generated_length: usize,
    finish_reason: &'static str,
    prompt_token_ids: Vec<u32>,
    token_ids: Vec<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<Vec<serde_json::Value>>,
}

/// Runs `tandem generate`.
pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let mut prompts = a.prompts.clone();
    if let Some(f) = &a.prompts_file {
        let text =
            std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        prompts.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(String::from),
        );
    }
    anyhow::ensure!(
        !prompts.is_empty(),
        "give at least one --prompt or a --prompts-file"
    );
    anyhow::ensure!(prompts.iter().all(|p| !p.is_empty()), "empty prompt");
    let params = GenerateParams {
        max_new_tokens: Some(a.max_new_tokens),
        min_new_tokens: a.min_new_tokens,
        ignore_eos: a.ignore_eos,
        top_p: a.top_p,
        top_k: a.top_k,
        temperature: a.temperature,
        do_sample: !a.greedy,
        return_full_text: a.return_full_text,
        stop: a.stop.clone(),
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
        logprobs: a.logprobs,
        max_length: None,
        ..GenerateParams::default()
    };
    // Check the options before loading anything.
    params.validate(1, usize::MAX)?;
    let loaded = crate::load_model(a.model.as_deref())?;
    let pipe = Pipeline::from_loaded(loaded, a.engine.config())?;
    let tok = pipe.engine()?.tokenizer().clone();
    let mut ids = Vec::with_capacity(prompts.len());
    for p in &prompts {
        ids.push(if a.chat {
            let text = tok.apply_chat_template(&[ChatMessage::new("user", p.as_str())], true)?;
            tok.encode(&text, false)?
        } else {
            tok.encode(p, true)?
        });
    }
    let responses = pipe.generate_tokens(ids, &params)?;
    let records: Vec<Record> = responses
        .into_iter()
        .zip(&prompts)
        .map(|(r, p)| Record {
            generated_text: if a.return_full_text {
                format!("{p}{}", r.generated_text)
            } else {
                r.generated_text
            },
            prompt_length: r.prompt_length,
            generated_length: r.generated_length,
            finish_reason: r.finish_reason.as_str(),
            prompt_token_ids: r.prompt_token_ids,
            token_ids: r.token_ids,
            logprobs: r.logprobs.map(|l| {
                l.into_iter()
                    .map(|s| serde_json::json!({ "logprob": s.logprob, "top": s.top }))
                    .collect()
            }),
        })
        .collect();
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
