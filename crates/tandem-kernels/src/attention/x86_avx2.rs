//! AVX2 inner step of paged attention, for CPUs without AVX-512: one query token's heads of a
//! KV group against a whole key chunk at once. Same reading of the transposed keys as
//! [`super::x86`]'s step (one load is one dimension of eight keys, sixteen keys a step in two
//! 8-lane vectors), but no online softmax: a chunk's state starts fresh, so its scores are all
//! computed first, then one softmax, then the value sums. Its sums are its own (and, like the
//! AVX-512 step's, independent of the batch and the thread count).
//! Only called after AVX2, FMA and F16C were detected (`SimdLevel::Avx2`).

use std::arch::x86_64::*;

use half::f16;

use super::x86::{Keys, EXP2_POLY};

/// Keys one step handles: sixteen, as the AVX-512 step (each broadcast query element feeds
/// two FMAs).
pub(super) const LANES: usize = 16;

/// Floats in a vector: the head size must be a multiple of it.
pub(super) const W: usize = 8;

/// `e^x` for 8 lanes, as `super::x86`'s `exp16` (x clamped to [-87, 0], so `2^n` is built
/// in the exponent field of a normal float).
#[inline(always)]
unsafe fn exp8(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_setzero_ps());
    let t = _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let f = _mm256_sub_ps(t, n);
    let mut p = _mm256_set1_ps(EXP2_POLY[0]);
    for &ci in &EXP2_POLY[1..] {
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(ci));
    }
    let exp = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(exp)))
}

/// Largest and sum of the 8 lanes.
#[inline(always)]
unsafe fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)))
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

/// A pool element type, read eight at a time as f32.
trait Lane8: Copy {
    /// The eight elements at `p` as f32.
    unsafe fn load(p: *const Self) -> __m256;
    /// The keys' pointer, their stride and the values' pointer (`src` holds this type).
    unsafe fn parts(src: Keys) -> (*const Self, usize, *const Self);
}

impl Lane8 for f16 {
    #[inline(always)]
    unsafe fn load(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn parts(src: Keys) -> (*const f16, usize, *const f16) {
        match src {
            Keys::F16 { k, stride, v } => (k, stride, v),
            Keys::F32 { .. } => std::hint::unreachable_unchecked(),
        }
    }
}

impl Lane8 for f32 {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn parts(src: Keys) -> (*const f32, usize, *const f32) {
        match src {
            Keys::F32 { k, stride, v } => (k, stride, v),
            Keys::F16 { .. } => std::hint::unreachable_unchecked(),
        }
    }
}

/// Copies `n <= 16` keys and their values into `kt` (`[hd, 16]`, zero past `n`) and `vb`
/// (`[n, hd]`) in f32: once for all the queries of a task, or where sixteen keys from the
/// step's first would run past its block.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `n <= 16` keys readable at `src`; `kt` holds
/// `16 * hd` and `vb` `n * hd` floats.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn stage(src: Keys, n: usize, hd: usize, kt: &mut [f32], vb: &mut [f32]) -> Keys {
    debug_assert!(n <= LANES && kt.len() >= LANES * hd && vb.len() >= n * hd);
    match src {
        Keys::F16 { k, stride, v } => {
            for d in 0..hd {
                let row = &mut kt[d * LANES..(d + 1) * LANES];
                if n == LANES {
                    for h in 0..LANES / W {
                        let x = f16::load(k.add(d * stride + W * h));
                        _mm256_storeu_ps(row.as_mut_ptr().add(W * h), x);
                    }
                    continue;
                }
                for (j, x) in row.iter_mut().enumerate() {
                    *x = if j < n {
                        (*k.add(d * stride + j)).to_f32()
                    } else {
                        0.0
                    };
                }
            }
            for i in (0..n * hd).step_by(W) {
                _mm256_storeu_ps(vb.as_mut_ptr().add(i), f16::load(v.add(i)));
            }
        }
        Keys::F32 { k, stride, v } => {
            for d in 0..hd {
                let row = &mut kt[d * LANES..(d + 1) * LANES];
                for (j, x) in row.iter_mut().enumerate() {
                    *x = if j < n { *k.add(d * stride + j) } else { 0.0 };
                }
            }
            vb[..n * hd].copy_from_slice(std::slice::from_raw_parts(v, n * hd));
        }
    }
    Keys::F32 {
        k: kt.as_ptr(),
        stride: LANES,
        v: vb.as_ptr(),
    }
}

/// One step of a key chunk as one query sees it: where its (up to) sixteen keys are read, and
/// which of them the query sees.
#[derive(Clone, Copy)]
pub(super) struct Step {
    pub src: Keys,
    pub from: usize,
    pub to: usize,
}

/// Lanes `from..to` of a step's sixteen, as two 8-lane masks.
#[inline(always)]
unsafe fn live_mask(from: usize, to: usize) -> [__m256; 2] {
    let lo = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let hi = _mm256_add_epi32(lo, _mm256_set1_epi32(W as i32));
    let (a, b) = (
        _mm256_set1_epi32(from as i32 - 1),
        _mm256_set1_epi32(to as i32),
    );
    let inside = |x: __m256i| {
        _mm256_castsi256_ps(_mm256_and_si256(
            _mm256_cmpgt_epi32(x, a),
            _mm256_cmpgt_epi32(b, x),
        ))
    };
    [inside(lo), inside(hi)]
}

/// A whole key chunk for `N <= 4` rows (query heads of one token): every step's scores
/// first, then one softmax over the chunk, then the value sums with each element's
/// accumulators in registers across all the chunk's keys. A chunk's state starts fresh (see
/// `super::split`), so nothing is rescaled: where the online softmax paid a maximum, a
/// rescale of the value sums and their load and store per sixteen keys, this pays them once
/// per chunk. `ahead(i)` is called before step `i`'s keys are read (the caller's prefetch).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn chunk_rows<const N: usize, E: Lane8>(
    q: &[f32],
    steps: &[Step],
    scale: f32,
    p: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
    ahead: &mut impl FnMut(usize),
) {
    let hd = q.len() / N;
    let ns = steps.len();
    debug_assert!(hd.is_multiple_of(W) && ns > 0 && p.len() >= N * ns * LANES);
    const PARITY_ROWS: usize = 3;
    let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut vmax = [ninf; N];
    let qp = q.as_ptr();
    let pp = p.as_mut_ptr();
    // Scores, scaled. Dead lanes (keys outside `from..to` may hold anything, even NaN: each
    // lane involves its own key only) are set to -inf, and their values are never read.
    for (i, st) in steps.iter().enumerate() {
        ahead(i);
        let (k, stride, _) = E::parts(st.src);
        let mut s = [[[_mm256_setzero_ps(); 2]; 2]; N];
        for d0 in (0..hd).step_by(2) {
            for u in 0..2 {
                let d = d0 + u;
                let kd = [E::load(k.add(d * stride)), E::load(k.add(d * stride + W))];
                let set = if N <= PARITY_ROWS { u } else { 0 };
                for (r, s) in s.iter_mut().enumerate() {
                    let qd = _mm256_set1_ps(*qp.add(r * hd + d));
                    s[set][0] = _mm256_fmadd_ps(qd, kd[0], s[set][0]);
                    s[set][1] = _mm256_fmadd_ps(qd, kd[1], s[set][1]);
                }
            }
        }
        let live = live_mask(st.from, st.to);
        for r in 0..N {
            let at = pp.add((r * ns + i) * LANES);
            for h in 0..2 {
                let sum = if N <= PARITY_ROWS {
                    _mm256_add_ps(s[r][0][h], s[r][1][h])
                } else {
                    s[r][0][h]
                };
                let x = _mm256_blendv_ps(ninf, _mm256_mul_ps(sum, _mm256_set1_ps(scale)), live[h]);
                _mm256_storeu_ps(at.add(W * h), x);
                vmax[r] = _mm256_max_ps(vmax[r], x);
            }
        }
    }
    // Weights: one maximum and one sum per row for the chunk.
    for r in 0..N {
        let mx = hmax(vmax[r]);
        let mv = _mm256_set1_ps(mx);
        let mut sum = _mm256_setzero_ps();
        for (i, st) in steps.iter().enumerate() {
            let live = live_mask(st.from, st.to);
            let at = pp.add((r * ns + i) * LANES);
            for (h, live) in live.into_iter().enumerate() {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(at.add(W * h)), mv));
                let e = _mm256_and_ps(e, live);
                _mm256_storeu_ps(at.add(W * h), e);
                sum = _mm256_add_ps(sum, e);
            }
        }
        m[r] = mx;
        l[r] = hsum(sum);
    }
    let ap = acc.as_mut_ptr();
    let mut c = 0;
    while c + 2 * W <= hd {
        chunk_values::<N, 2, E>(ap, hd, c, pp, steps);
        c += 2 * W;
    }
    if c < hd {
        chunk_values::<N, 1, E>(ap, hd, c, pp, steps);
    }
}

/// `K` 8-dimension chunks (from `c`) of each row's value sums over a whole key chunk, key by
/// key in order, from zero: `acc = Σ p_j v_j` with the weights `p` as [`chunk_rows`] left them.
#[inline(always)]
unsafe fn chunk_values<const N: usize, const K: usize, E: Lane8>(
    acc: *mut f32,
    hd: usize,
    c: usize,
    p: *const f32,
    steps: &[Step],
) {
    let ns = steps.len();
    // Even keys of a step into `a`, odd ones into `b`: twice the FMA chains.
    let mut a = [[_mm256_setzero_ps(); K]; N];
    let mut b = [[_mm256_setzero_ps(); K]; N];
    /// Adds one key's values at `v` weighted by row `r`'s weight at `w + r * stride`.
    #[inline(always)]
    unsafe fn add<const N: usize, const K: usize, E: Lane8>(
        a: &mut [[__m256; K]; N],
        v: *const E,
        w: *const f32,
        stride: usize,
    ) {
        let vj: [__m256; K] = std::array::from_fn(|u| E::load(v.add(W * u)));
        for (r, a) in a.iter_mut().enumerate() {
            let w = _mm256_set1_ps(*w.add(r * stride));
            for (a, vj) in a.iter_mut().zip(vj) {
                *a = _mm256_fmadd_ps(w, vj, *a);
            }
        }
    }
    let stride = ns * LANES;
    for (i, st) in steps.iter().enumerate() {
        let (_, _, v) = E::parts(st.src);
        let (v, w) = (v.add(c), p.add(i * LANES));
        let mut j = st.from;
        while j + 2 <= st.to {
            add::<N, K, E>(&mut a, v.add(j * hd), w.add(j), stride);
            add::<N, K, E>(&mut b, v.add((j + 1) * hd), w.add(j + 1), stride);
            j += 2;
        }
        if j < st.to {
            add::<N, K, E>(&mut a, v.add(j * hd), w.add(j), stride);
        }
    }
    for r in 0..N {
        for u in 0..K {
            a[r][u] = _mm256_add_ps(a[r][u], b[r][u]);
        }
    }
    for (r, row) in a.iter().enumerate() {
        for (u, x) in row.iter().enumerate() {
            _mm256_storeu_ps(acc.add(r * hd + c + W * u), *x);
        }
    }
}

/// [`chunk_rows`] for any number of rows, four at a time: the state (`m`, `l`, `acc`) of
/// `q`'s rows over the key chunk `steps` (at least one, every one with a live key, all read
/// from the same element type). `p` holds `4 * 16 * steps.len()` floats of scratch.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `hd` a multiple of 8; each step's sixteen keys and
/// its live keys' values readable.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn chunk_group(
    q: &[f32],
    steps: &[Step],
    scale: f32,
    p: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
    mut ahead: impl FnMut(usize),
) {
    let hd = acc.len() / m.len();
    let mut r = 0;
    let mut none = |_: usize| {};
    while r < m.len() {
        let n = (m.len() - r).min(4);
        let (q, m, l) = (&q[r * hd..(r + n) * hd], &mut m[r..r + n], &mut l[r..r + n]);
        let acc = &mut acc[r * hd..(r + n) * hd];
        // Only the first rows' pass reads the keys from memory.
        let ahead: &mut dyn FnMut(usize) = if r == 0 { &mut ahead } else { &mut none };
        macro_rules! rows {
            ($e:ty) => {
                match n {
                    4 => chunk_rows::<4, $e>(q, steps, scale, p, m, l, acc, &mut |i| ahead(i)),
                    3 => chunk_rows::<3, $e>(q, steps, scale, p, m, l, acc, &mut |i| ahead(i)),
                    2 => chunk_rows::<2, $e>(q, steps, scale, p, m, l, acc, &mut |i| ahead(i)),
                    _ => chunk_rows::<1, $e>(q, steps, scale, p, m, l, acc, &mut |i| ahead(i)),
                }
            };
        }
        match steps[0].src {
            Keys::F16 { .. } => rows!(f16),
            Keys::F32 { .. } => rows!(f32),
        }
        r += n;
    }
}
