//! Turning a row of logits into the next token.
//!
//! Processor order (MII's, not HF's): repetition penalty → min-tokens EOS suppression → top-k →
//! top-p → temperature → sample (or argmax when `do_sample` is false). Log-probabilities are
//! reported from the model's raw distribution (before any processor), as vLLM does.

use rand::distributions::{Distribution, WeightedIndex};
use rand::rngs::StdRng;

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

/// Chooses the next token from `logits` (modified in place by the processors).
///
/// `history` is the sequence so far (prompt and generated), `suppress` the ids that must not be
/// chosen now (EOS before `min_new_tokens`).
pub fn sample(
    logits: &mut [f32],
    params: &GenerateParams,
    history: &[u32],
    suppress: &[u32],
    rng: &mut StdRng,
) -> (u32, Option<TokenLogprobs>) {
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
    for &t in suppress {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
    let token = if !params.do_sample {
        top_n(logits, 1)[0].0
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

    #[test]
    fn greedy_takes_argmax_after_penalty() {
        let p = GenerateParams {
            repetition_penalty: 4.0,
            ..GenerateParams::greedy()
        };
        let mut l = vec![1.0, 3.0, 2.0];
        let (t, _) = sample(&mut l, &p, &[1], &[], &mut StdRng::seed_from_u64(0));
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
            assert_eq!(sample(&mut [0.0, 5.0, 4.9], &p, &[], &[], &mut rng).0, 1);
            assert_eq!(sample(&mut [0.0, 5.0, 4.9], &p, &[], &[1], &mut rng).0, 2);
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
            assert_eq!(sample(&mut [3.0, 1.0, 1.0], &p, &[], &[], &mut rng).0, 0);
        }
        let p = GenerateParams {
            top_p: 1.0,
            temperature: Some(2.0),
            ..Default::default()
        };
        let draw = |seed| {
            let mut r = StdRng::seed_from_u64(seed);
            (0..30)
                .map(|_| sample(&mut [1.0, 1.2, 0.8, 1.1], &p, &[], &[], &mut r).0)
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
            &[],
            &[],
            &mut StdRng::seed_from_u64(0),
        );
        let lp = lp.unwrap();
        assert_eq!(t, 1);
        assert!((lp.logprob - (2.0f32 / 3.0).ln()).abs() < 1e-6);
        assert_eq!(lp.top.len(), 2);
        assert!((lp.top[1].1 - (1.0f32 / 3.0).ln()).abs() < 1e-6);
    }
}
