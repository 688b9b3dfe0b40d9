//! Turning a row of logits into the next token.
//!
//! Processor order: repetition penalty → presence / frequency penalties → logit bias → the
//! grammar's mask → min-tokens EOS suppression → top-k → top-p → temperature (MII's order for
//! the last three) → sample (or argmax when `do_sample` is false). Log-probabilities are
//! reported from the model's raw distribution (before any processor), as vLLM does.

use llguidance::toktrie::SimpleVob;
use rand::distributions::{Distribution, WeightedIndex};
use rand::rngs::StdRng;
pub use tandem_model::argmax;

use crate::params::GenerateParams;

/// One step's log-probabilities.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenLogprobs {
    /// Log-probability of the chosen token.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

fn log_softmax_denominator(logits: &[f32]) -> (f32, f32) {
    let mx = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let z: f32 = logits.iter().map(|l| (l - mx).exp()).sum();
    (mx, z.ln())
}

/// The `n` largest entries, best first (ties by lower id).
fn top_n(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(idx.len());
    if n == 0 {
        return vec![];
    }
    let cmp = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, cmp);
        idx.truncate(n);
    }
    idx.sort_unstable_by(cmp);
    idx.into_iter().map(|i| (i, logits[i as usize])).collect()
}

/// The log-probability of `token` under `logits` (raw log-softmax) and the `n` most likely
/// tokens' (for scoring prompt tokens).
pub fn logprobs_of(logits: &[f32], token: u32, n: usize) -> TokenLogprobs {
    let (mx, lz) = log_softmax_denominator(logits);
    TokenLogprobs {
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |l| l - mx - lz),
        top: top_n(logits, n)
            .into_iter()
            .map(|(i, l)| (i, l - mx - lz))
            .collect(),
    }
}

/// What a step knows of its sequence besides the logits.
pub struct SampleContext<'a> {
    /// The sequence so far: prompt, then generated tokens.
    pub history: &'a [u32],
    /// How many of `history` are the prompt.
    pub prompt_len: usize,
    /// Ids that must not be chosen now (EOS before `min_new_tokens`).
    pub suppress: &'a [u32],
    /// The grammar's allowed tokens, if the output is constrained.
    pub allowed: Option<&'a SimpleVob>,
    /// The logits' [`argmax`] as given, if already known: a greedy step that changes no logit
    /// takes it instead of reading the row again.
    pub argmax: Option<u32>,
}

/// OpenAI's presence and frequency penalties over the generated tokens:
/// `logit -= count * frequency + (count > 0) * presence`.
fn apply_penalties(logits: &mut [f32], generated: &[u32], presence: f32, frequency: f32) {
    let mut seen = generated.to_vec();
    seen.sort_unstable();
    for run in seen.chunk_by(|a, b| a == b) {
        if let Some(l) = logits.get_mut(run[0] as usize) {
            *l -= run.len() as f32 * frequency + presence;
        }
    }
}

/// Keeps only the allowed tokens' logits: the allowed ones are saved, everything is set to
/// -inf in one pass, and they are put back (a grammar usually allows few tokens).
fn apply_mask(logits: &mut [f32], allowed: &SimpleVob) {
    let mut keep = Vec::with_capacity(allowed.num_set().min(logits.len()));
    allowed.iter_set_entries(|t| {
        if let Some(&l) = logits.get(t) {
            keep.push((t, l));
        }
    });
    logits.fill(f32::NEG_INFINITY);
    for (t, l) in keep {
        logits[t] = l;
    }
}

/// Chooses the next token from `logits` (modified in place by the processors).
pub fn sample(
    logits: &mut [f32],
    params: &GenerateParams,
    ctx: &SampleContext,
    rng: &mut StdRng,
) -> (u32, Option<TokenLogprobs>) {
    let history = ctx.history;
    let raw = params.logprobs.map(|n| {
        let (mx, lz) = log_softmax_denominator(logits);
        let top = top_n(logits, n)
            .into_iter()
            .map(|(i, l)| (i, l - mx - lz))
            .collect::<Vec<_>>();
        (mx, lz, top)
    });
    let raw_logit = |logits: &[f32], t: u32| logits[t as usize];
    let original: Option<Vec<f32>> = raw.as_ref().map(|_| logits.to_vec());

    if params.repetition_penalty != 1.0 {
        let p = params.repetition_penalty;
        let mut seen = history.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for &t in &seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l < 0.0 { *l * p } else { *l / p };
            }
        }
    }
    if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
        let generated = &history[ctx.prompt_len.min(history.len())..];
        apply_penalties(
            logits,
            generated,
            params.presence_penalty,
            params.frequency_penalty,
        );
    }
    for &(t, b) in &params.logit_bias {
        if let Some(l) = logits.get_mut(t as usize) {
            *l += b;
        }
    }
    if let Some(allowed) = ctx.allowed {
        apply_mask(logits, allowed);
    }
    for &t in ctx.suppress {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
    let untouched = params.repetition_penalty == 1.0
        && params.presence_penalty == 0.0
        && params.frequency_penalty == 0.0
        && params.logit_bias.is_empty()
        && ctx.allowed.is_none()
        && ctx.suppress.is_empty();
    let token = if !params.do_sample {
        match ctx.argmax {
            Some(t) if untouched => t,
            _ => argmax(logits),
        }
    } else {
        sample_filtered(logits, params, rng)
    };
    let lp = raw.map(|(mx, lz, top)| {
        let orig = original.as_deref().expect("kept with logprobs");
        TokenLogprobs {
            logprob: raw_logit(orig, token) - mx - lz,
            top,
        }
    });
    (token, lp)
}

fn sample_filtered(logits: &[f32], params: &GenerateParams, rng: &mut StdRng) -> u32 {
    // Candidates: the top-k, or (for top-p alone) a generous top slice that is widened to the
    // whole vocabulary only if it does not reach the nucleus mass.
    let k = params.top_k.unwrap_or(usize::MAX).min(logits.len());
    let mut cands = top_n(logits, k.min(1024));
    let mx = cands[0].1;
    if !mx.is_finite() {
        return cands[0].0;
    }
    let weight = |l: f32| (l - mx).exp();
    let total: f32 = logits.iter().map(|&l| weight(l)).sum();
    let slice_mass: f32 = cands.iter().map(|c| weight(c.1)).sum();
    if k > cands.len() && slice_mass / total < params.top_p {
        cands = top_n(logits, k);
    }
    let mass: f32 = cands.iter().map(|c| weight(c.1)).sum();
    // top-p: smallest prefix whose probability (within the top-k) reaches top_p.
    let mut acc = 0.0;
    let mut keep = cands.len();
    for (i, c) in cands.iter().enumerate() {
        acc += weight(c.1) / mass;
        if acc >= params.top_p {
            keep = i + 1;
            break;
        }
    }
    cands.truncate(keep);
    let t = params.temperature.unwrap_or(1.0);
    let weights: Vec<f32> = cands.iter().map(|c| ((c.1 - mx) / t).exp()).collect();
    match WeightedIndex::new(&weights) {
        Ok(d) => cands[d.sample(rng)].0,
        Err(_) => cands[0].0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn ctx(history: &[u32], prompt_len: usize) -> SampleContext<'_> {
        SampleContext {
            history,
            prompt_len,
            suppress: &[],
            allowed: None,
            argmax: None,
        }
    }

    proptest::proptest! {
        #[test]
        fn argmax_is_the_first_of_top_n(steps in proptest::collection::vec(-3i8..3, 1..200)) {
            // Few distinct values: ties are the common case.
            let logits: Vec<f32> = steps.iter().map(|&v| v as f32 / 2.0).collect();
            proptest::prop_assert_eq!(argmax(&logits), top_n(&logits, 1)[0].0);
        }
    }

    #[test]
    fn presence_and_frequency_follow_openai() {
        // Token 1 was generated twice, token 2 once; token 0 only in the prompt.
        let p = GenerateParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..GenerateParams::greedy()
        };
        let mut l = vec![1.0, 1.0, 1.0, 1.0];
        sample(
            &mut l,
            &p,
            &ctx(&[0, 1, 2, 1], 1),
            &mut StdRng::seed_from_u64(0),
        );
        assert_eq!(l, vec![1.0, 1.0 - 0.5 - 0.5, 1.0 - 0.5 - 0.25, 1.0]);
        // Negative values encourage repetition.
        let p = GenerateParams {
            presence_penalty: -2.0,
            ..GenerateParams::greedy()
        };
        let (t, _) = sample(
            &mut [1.0, 0.0],
            &p,
            &ctx(&[1], 0),
            &mut StdRng::seed_from_u64(0),
        );
        assert_eq!(t, 1);
    }

    #[test]
    fn logit_bias_adds_and_bans() {
        let p = GenerateParams {
            logit_bias: vec![(0, -100.0), (2, 5.0)],
            ..GenerateParams::greedy()
        };
        let mut l = vec![9.0, 1.0, 0.0];
        let (t, _) = sample(&mut l, &p, &ctx(&[], 0), &mut StdRng::seed_from_u64(0));
        assert_eq!((t, l[0], l[2]), (2, -91.0, 5.0));
        // Sampling with -100 on every token but one never picks the others.
        let p = GenerateParams {
            logit_bias: vec![(0, -100.0), (1, -100.0)],
            top_p: 1.0,
            ..Default::default()
        };
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..50 {
            assert_eq!(
                sample(&mut [5.0, 5.0, 0.0], &p, &ctx(&[], 0), &mut rng).0,
                2
            );
        }
    }

    #[test]
    fn grammar_mask_excludes_tokens() {
        let mut allowed = SimpleVob::alloc(4);
        allowed.allow_token(3);
        allowed.allow_token(1);
        let c = SampleContext {
            allowed: Some(&allowed),
            ..ctx(&[], 0)
        };
        let mut rng = StdRng::seed_from_u64(4);
        for _ in 0..50 {
            let t = sample(
                &mut [9.0, 0.0, 8.0, 0.5],
                &GenerateParams::default(),
                &c,
                &mut rng,
            )
            .0;
            assert!(t == 1 || t == 3);
        }
    }

    #[test]
    fn a_known_argmax_serves_only_untouched_greedy_steps() {
        // The caller's argmax of the logits as given (here deliberately not the true one, to
        // see which path ran).
        let known = SampleContext {
            argmax: Some(0),
            ..ctx(&[1], 0)
        };
        let mut rng = StdRng::seed_from_u64(0);
        let greedy = GenerateParams::greedy();
        assert_eq!(sample(&mut [1.0, 3.0, 2.0], &greedy, &known, &mut rng).0, 0);
        let penalized = GenerateParams {
            repetition_penalty: 4.0,
            ..GenerateParams::greedy()
        };
        assert_eq!(
            sample(&mut [1.0, 3.0, 2.0], &penalized, &known, &mut rng).0,
            2
        );
        let suppressed = SampleContext {
            suppress: &[2],
            ..known
        };
        assert_eq!(
            sample(&mut [1.0, 3.0, 2.0], &greedy, &suppressed, &mut rng).0,
            1
        );
    }

    #[test]
    fn greedy_takes_argmax_after_penalty() {
        let p = GenerateParams {
            repetition_penalty: 4.0,
            ..GenerateParams::greedy()
        };
        let mut l = vec![1.0, 3.0, 2.0];
        let (t, _) = sample(&mut l, &p, &ctx(&[1], 0), &mut StdRng::seed_from_u64(0));
        assert_eq!(t, 2, "token 1 (3.0) is penalized to 0.75");
    }

    #[test]
    fn top_k_one_is_greedy_and_suppression_works() {
        let p = GenerateParams {
            top_k: Some(1),
            ..Default::default()
        };
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..20 {
            assert_eq!(
                sample(&mut [0.0, 5.0, 4.9], &p, &ctx(&[], 0), &mut rng).0,
                1
            );
            assert_eq!(
                sample(
                    &mut [0.0, 5.0, 4.9],
                    &p,
                    &SampleContext {
                        suppress: &[1],
                        ..ctx(&[], 0)
                    },
                    &mut rng
                )
                .0,
                2
            );
        }
    }

    #[test]
    fn top_p_restricts_and_seed_reproduces() {
        // Token 0 has ~0.84 of the mass: top_p 0.5 must always pick it.
        let p = GenerateParams {
            top_p: 0.5,
            ..Default::default()
        };
        let mut rng = StdRng::seed_from_u64(2);
        for _ in 0..50 {
            assert_eq!(
                sample(&mut [3.0, 1.0, 1.0], &p, &ctx(&[], 0), &mut rng).0,
                0
            );
        }
        let p = GenerateParams {
            top_p: 1.0,
            temperature: Some(2.0),
            ..Default::default()
        };
        let draw = |seed| {
            let mut r = StdRng::seed_from_u64(seed);
            (0..30)
                .map(|_| sample(&mut [1.0, 1.2, 0.8, 1.1], &p, &ctx(&[], 0), &mut r).0)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn logprobs_are_raw_log_softmax() {
        let p = GenerateParams {
            logprobs: Some(2),
            ..GenerateParams::greedy()
        };
        let (t, lp) = sample(
            &mut [0.0, (2f32).ln()],
            &p,
            &ctx(&[], 0),
            &mut StdRng::seed_from_u64(0),
        );
        let lp = lp.unwrap();
        assert_eq!(t, 1);
        assert!((lp.logprob - (2.0f32 / 3.0).ln()).abs() < 1e-6);
        assert_eq!(lp.top.len(), 2);
        assert!((lp.top[1].1 - (1.0f32 / 3.0).ln()).abs() < 1e-6);
    }
}
