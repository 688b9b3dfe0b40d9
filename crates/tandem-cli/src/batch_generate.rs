//! Static-batch generation on the ragged forward: all prompts are prefilled in one pass, then
//! every unfinished sequence decodes one token per pass. Each sequence owns a contiguous run
//! of KV blocks sized for its prompt plus its token budget.

use rand::distributions::{Distribution, WeightedIndex};
use rand::{rngs::StdRng, SeedableRng};
use tandem_model::{KvCache, KvDType, LlamaModel, LogitsMode, SeqInput};

/// How the next token is chosen.
#[derive(Clone, Copy, Debug)]
pub enum Sampling {
    /// Always the most likely token.
    Greedy,
    /// Sample from the temperature-scaled distribution restricted to the top-p nucleus.
    TopP {
        temperature: f32,
        top_p: f32,
        seed: u64,
    },
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token.
    Stop,
    /// The token budget ran out.
    Length,
}

/// One finished sequence.
pub struct Generated {
    /// Generated token ids (without the EOS that ended it).
    pub tokens: Vec<u32>,
    /// Why it stopped.
    pub finish: Finish,
}

fn argmax(x: &[f32]) -> u32 {
    x.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

fn sample(logits: &[f32], temperature: f32, top_p: f32, rng: &mut StdRng) -> u32 {
    let t = temperature.max(1e-5);
    let mx = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l - mx) / t).exp()))
        .collect();
    p.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    let z: f32 = p.iter().map(|x| x.1).sum();
    let mut acc = 0.0;
    let keep = p.iter().position(|x| {
        acc += x.1 / z;
        acc >= top_p
    });
    p.truncate(keep.map_or(p.len(), |k| k + 1));
    let dist = WeightedIndex::new(p.iter().map(|x| x.1)).expect("positive weights");
    p[dist.sample(rng)].0
}

/// Generates for every prompt together; returns results in prompt order.
pub fn generate(
    model: &LlamaModel,
    prompts: &[Vec<u32>],
    max_new: usize,
    eos: &[u32],
    sampling: Sampling,
) -> anyhow::Result<Vec<Generated>> {
    const BLOCK: usize = 16;
    let max_ctx = model.max_context();
    for (i, p) in prompts.iter().enumerate() {
        anyhow::ensure!(!p.is_empty(), "prompt {i} is empty");
        anyhow::ensure!(
            p.len() < max_ctx,
            "prompt {i} has {} tokens; the model's context is {max_ctx}",
            p.len()
        );
    }
    let budgets: Vec<usize> = prompts
        .iter()
        .map(|p| max_new.min(max_ctx - p.len()))
        .collect();
    let tables: Vec<Vec<u32>> = {
        let mut next = 0u32;
        prompts
            .iter()
            .zip(&budgets)
            .map(|(p, b)| {
                let n = (p.len() + b).div_ceil(BLOCK) as u32;
                next += n;
                (next - n..next).collect()
            })
            .collect()
    };
    let total_blocks = tables.iter().map(Vec::len).sum::<usize>().max(1);
    let mut kv = KvCache::new(model.config(), total_blocks, BLOCK, KvDType::F16);
    let mut rngs: Vec<StdRng> = (0..prompts.len())
        .map(|i| match sampling {
            Sampling::TopP { seed, .. } => StdRng::seed_from_u64(seed.wrapping_add(i as u64)),
            Sampling::Greedy => StdRng::seed_from_u64(0),
        })
        .collect();
    let mut out: Vec<Generated> = prompts
        .iter()
        .map(|_| Generated {
            tokens: vec![],
            finish: Finish::Length,
        })
        .collect();
    let mut done: Vec<bool> = budgets.iter().map(|&b| b == 0).collect();
    // The tokens each live sequence feeds next, and its context length before them.
    let mut feed: Vec<Vec<u32>> = prompts.to_vec();
    let mut ctx = vec![0usize; prompts.len()];
    while done.iter().any(|d| !d) {
        let live: Vec<usize> = (0..prompts.len()).filter(|&i| !done[i]).collect();
        let tokens: Vec<u32> = live.iter().flat_map(|&i| feed[i].iter().copied()).collect();
        let inputs: Vec<SeqInput> = live
            .iter()
            .map(|&i| SeqInput {
                n_tokens: feed[i].len(),
                context_len: ctx[i],
                block_table: &tables[i],
                logits: LogitsMode::Last,
            })
            .collect();
        let logits = model.forward(&tokens, &inputs, &mut kv)?;
        for (k, &i) in live.iter().enumerate() {
            let row = logits
                .last_of(k)
                .expect("every live sequence asked for logits");
            let next = match sampling {
                Sampling::Greedy => argmax(row),
                Sampling::TopP {
                    temperature, top_p, ..
                } => sample(row, temperature, top_p, &mut rngs[i]),
            };
            ctx[i] += feed[i].len();
            if eos.contains(&next) {
                out[i].finish = Finish::Stop;
                done[i] = true;
                continue;
            }
            out[i].tokens.push(next);
            feed[i] = vec![next];
            if out[i].tokens.len() >= budgets[i] {
                done[i] = true;
            }
        }
    }
    Ok(out)
}
