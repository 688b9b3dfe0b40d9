//! Statistics shared by the benchmarks: normally distributed lengths and percentiles.

use std::time::Instant;

use rand::{rngs::StdRng, Rng};

/// A standard normal draw (Box-Muller).
pub fn normal(rng: &mut StdRng) -> f64 {
    let (u1, u2): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// A length around `mean` with relative standard deviation `spread` (at least 1).
pub fn draw_len(rng: &mut StdRng, mean: usize, spread: f64) -> usize {
    ((mean as f64) * (1.0 + spread * normal(rng)))
        .round()
        .max(1.0) as usize
}

/// Mean, median and 95th percentile (NaN for an empty sample).
pub fn mean_p50_p95(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    (v.iter().sum::<f64>() / v.len() as f64, q(0.5), q(0.95))
}

/// Per-request time to first token and time per output token (seconds), from each request's
/// start and its tokens' arrival times.
pub fn ttft_tpot<'a>(
    requests: impl Iterator<Item = (Instant, &'a [Instant])> + Clone,
) -> (Vec<f64>, Vec<f64>) {
    let ttft = requests
        .clone()
        .filter_map(|(start, t)| t.first().map(|f| (*f - start).as_secs_f64()))
        .collect();
    let tpot = requests
        .filter(|(_, t)| t.len() > 1)
        .map(|(_, t)| (t[t.len() - 1] - t[0]).as_secs_f64() / (t.len() - 1) as f64)
        .collect();
    (ttft, tpot)
}
