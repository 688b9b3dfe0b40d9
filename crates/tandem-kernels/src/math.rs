//! Element-wise math written once in plain arithmetic (fused multiply-adds, bit operations) and
//! compiled for each SIMD level, so that every level computes the same bits: the compiler
//! vectorizes the one definition instead of the loop calling libm per element.

use crate::simd::SimdLevel;

/// `e^x`, within ~1 ulp for `x` in [-87, 88] (clamped there: 0 below is ~1.6e-38, above ~1.7e38):
/// `2^n · e^r` with `n = round(x / ln 2)`, `r = x - n ln 2` split in two parts for exactness,
/// and Cephes' degree-6 polynomial for `e^r`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer (ties to even) held in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let t = x.mul_add(std::f32::consts::LOG2_E, SHIFT);
    let n = t - SHIFT;
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = 1.987_569_1e-4f32;
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = p.mul_add(r, c);
    }
    let er = p.mul_add(r * r, r) + 1.0;
    // 2^n from the integer in t's low bits: n + 127 in the exponent field.
    let n_int = t.to_bits().wrapping_sub(SHIFT.to_bits()) as i32;
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    er * scale
}

/// `gate[i] = silu(gate[i]) * up[i]` over two slices of one length.
#[inline(always)]
fn silu_mul_body(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = x / (1.0 + exp(-x)) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,fma")]
unsafe fn silu_mul_avx512(gate: &mut [f32], up: &[f32]) {
    silu_mul_body(gate, up)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
    silu_mul_body(gate, up)
}

/// SwiGLU's gate on one chunk, at the active SIMD level (all levels give the same bits).
pub(crate) fn silu_mul_chunk(gate: &mut [f32], up: &[f32]) {
    debug_assert_eq!(gate.len(), up.len());
    match crate::simd::active() {
        // SAFETY: the level is only active where the CPU supports it.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512Vnni | SimdLevel::Amx => unsafe { silu_mul_avx512(gate, up) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { silu_mul_avx2(gate, up) },
        _ => silu_mul_body(gate, up),
    }
}

/// The integer key `f32::total_cmp` orders floats by: comparing keys is comparing the floats,
/// and a maximum of keys is a plain integer reduction the compiler vectorizes.
#[inline(always)]
fn order_key(x: f32) -> i32 {
    let b = x.to_bits() as i32;
    b ^ (((b >> 31) as u32) >> 1) as i32
}

/// Elements per block of [`argmax_body`]'s pass: small enough that finding the position
/// again in the winning block costs nothing, large enough that a block's horizontal
/// reduction does not count.
const ARGMAX_BLOCK: usize = 512;

/// The first index of the largest element by `total_cmp` (0 for an empty slice), in one pass:
/// each block's maximum key, then the position in the first block that holds the largest. A
/// maximum then a `position` over the whole slice read it twice, the second time element by
/// element: a 32-row step's greedy rows of a 151,936-token vocabulary took 1.5% of both
/// threads' time.
#[inline(always)]
fn argmax_body(x: &[f32]) -> u32 {
    let mut best = i32::MIN;
    let mut best_block = 0;
    for (b, block) in x.chunks(ARGMAX_BLOCK).enumerate() {
        let mut lanes = [i32::MIN; 16];
        let chunks = block.chunks_exact(16);
        let tail = chunks.remainder();
        for c in chunks {
            for (m, &v) in lanes.iter_mut().zip(c) {
                *m = (*m).max(order_key(v));
            }
        }
        let m = tail
            .iter()
            .map(|&v| order_key(v))
            .fold(lanes.into_iter().fold(i32::MIN, i32::max), i32::max);
        if m > best {
            best = m;
            best_block = b;
        }
    }
    let start = best_block * ARGMAX_BLOCK;
    let pos = x[start..].iter().position(|&v| order_key(v) == best);
    (start + pos.unwrap_or(0)) as u32
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw")]
unsafe fn argmax_avx512(x: &[f32]) -> u32 {
    argmax_body(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn argmax_avx2(x: &[f32]) -> u32 {
    argmax_body(x)
}

/// [`argmax_body`] at `level` (every level gives the same index).
fn argmax_at(x: &[f32], level: SimdLevel) -> u32 {
    match level {
        // SAFETY: the level is only active where the CPU supports it.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512Vnni | SimdLevel::Amx => unsafe { argmax_avx512(x) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { argmax_avx2(x) },
        _ => argmax_body(x),
    }
}

/// The first index of the largest element by `total_cmp` (0 for an empty slice), at the
/// active SIMD level.
pub(crate) fn argmax(x: &[f32]) -> u32 {
    argmax_at(x, crate::simd::active())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm_over_its_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_3;
        }
        // 2 ulp of f32 is ~2.4e-7 relative.
        assert!(worst < 2.4e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 2e-38 && exp(1000.0) > 1e38);
    }

    #[test]
    fn every_simd_level_gives_the_same_silu_bits() {
        let gate: Vec<f32> = (0..4099)
            .map(|i| (i as f32 * 0.037).sin() * 30.0 - 2.0)
            .collect();
        let up: Vec<f32> = (0..4099).map(|i| (i as f32 * 0.011).cos()).collect();
        let mut want = gate.clone();
        silu_mul_body(&mut want, &up);
        for (w, (&g, &u)) in want.iter().zip(gate.iter().zip(&up)) {
            let exact = g as f64 / (1.0 + (-(g as f64)).exp()) * u as f64;
            assert!(
                (*w as f64 - exact).abs() <= 1e-6 * (1.0 + exact.abs()),
                "{g}: {w} vs {exact}"
            );
        }
        #[cfg(target_arch = "x86_64")]
        for level in SimdLevel::supported() {
            let mut got = gate.clone();
            match level {
                // SAFETY: the CPU supports the level.
                SimdLevel::Avx512Vnni | SimdLevel::Amx => unsafe { silu_mul_avx512(&mut got, &up) },
                SimdLevel::Avx2 => unsafe { silu_mul_avx2(&mut got, &up) },
                _ => silu_mul_body(&mut got, &up),
            }
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{level:?}"
            );
        }
    }

    /// The first index of the largest by `total_cmp`, element by element.
    fn naive_argmax(x: &[f32]) -> u32 {
        let mut best = 0;
        for (i, v) in x.iter().enumerate() {
            if v.total_cmp(&x[best]).is_gt() {
                best = i;
            }
        }
        best as u32
    }

    proptest::proptest! {
        /// Every level's argmax is the first of the largest by `total_cmp`, with ties, signed
        /// zeros, infinities and NaNs of both signs, at lengths around the block and lane
        /// widths.
        #[test]
        fn argmax_is_the_first_of_the_largest_at_every_level(
            picks in proptest::collection::vec(0usize..12, 0..1600),
            scale in 1usize..4,
        ) {
            let special = [
                0.0, -0.0, 1.0, -1.0, 2.5, -2.5, f32::INFINITY, f32::NEG_INFINITY, f32::NAN,
                -f32::NAN, f32::MAX, f32::from_bits(0xffff_ffff),
            ];
            let x: Vec<f32> = picks
                .iter()
                .cycle()
                .take(picks.len() * scale)
                .map(|&i| special[i])
                .collect();
            let want = naive_argmax(&x);
            for level in SimdLevel::supported() {
                proptest::prop_assert_eq!(argmax_at(&x, level), want, "{:?}", level);
            }
        }
    }
}
