//! AVX2 inner step of paged attention: [`super::x86`]'s step with its sixteen keys in two
//! 8-lane vectors, for CPUs without AVX-512. Same reading of the transposed keys (one load is
//! one dimension of eight keys), same online softmax over a whole block of sixteen keys at a
//! time; its sums are grouped for eight lanes, so its results are its own (and, like the
//! AVX-512 step's, independent of the batch and the thread count).
//! Only called after AVX2, FMA and F16C were detected (`SimdLevel::Avx2`).

use std::arch::x86_64::*;

use half::f16;

use super::rescale;
use super::x86::{Keys, EXP2_POLY};

/// Keys one step handles: a block of sixteen, as the AVX-512 step. Eight keys a step (one
/// vector) paid the softmax's update, the value sums' rescaling and a broadcast of every query
/// element twice as often: one sequence at 512 positions, the reference shape, 30 layers,
/// pinned, 1.01-1.16 -> 0.90-0.93 ms a step (see docs/perf-notes.md).
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

/// A later block of the same head (its keys at `k`, its values at `v`), whose cache lines a
/// lone query's step asks for two at a time inside its score loop. Asked for all at once
/// before its step, a block's 64 lines came in no sooner than unasked on Zen 3: a lone decode
/// at 576 positions read the reference model's KV at ~9 GB/s, where a plain read of the same
/// blocks in the same order gets 21-24 GB/s. Paced, its attention took 0.83-1.16 ms a token
/// instead of 1.10-1.43 (see docs/perf-notes.md).
#[derive(Clone, Copy)]
pub(super) struct Ahead<E> {
    pub k: *const E,
    pub v: *const E,
}

/// A pool element type, read eight at a time as f32.
trait Lane8: Copy {
    /// The eight elements at `p` as f32.
    unsafe fn load(p: *const Self) -> __m256;
}

impl Lane8 for f16 {
    #[inline(always)]
    unsafe fn load(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

impl Lane8 for f32 {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
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

/// `super::x86::update_rows` on sixteen keys: `keys.end <= 16`, and sixteen keys readable at
/// `k` (in the pool, or staged). Keys at and past `keys.end` may hold anything, even NaN: each
/// lane's score involves its own key only, and dead lanes are selected away (never multiplied)
/// before the maximum, the weights and the values.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn update_rows<const N: usize, const PACE: bool, E: Lane8>(
    q: &[f32],
    k: *const E,
    stride: usize,
    v: *const E,
    keys: std::ops::Range<usize>,
    scale: f32,
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
    ahead: Ahead<E>,
) {
    let hd = q.len() / N;
    debug_assert!(hd.is_multiple_of(W) && !keys.is_empty() && keys.end <= LANES);
    debug_assert!(acc.len() == N * hd && m.len() == N && l.len() == N);
    // Keys 0..8 feed sums [_][0], keys 8..16 sums [_][1], so each broadcast query element
    // serves two FMAs; up to three rows also split the dimensions by parity (sums [0][_] and
    // [1][_]): twelve chains where six left the FMA latency exposed, in fifteen registers
    // (four rows take eight in one set). Which rows split depends only on the model's query
    // group, never on the batch.
    const PARITY_ROWS: usize = 3;
    let mut s = [[[_mm256_setzero_ps(); 2]; 2]; N];
    let qp = q.as_ptr();
    // A block's keys of one head take `hd / 2` cache lines in f16 (`hd` in f32), as its values
    // do: one line of each (two in f32) for every two dimensions.
    let lines = std::mem::size_of::<E>() / 2;
    for d0 in (0..hd).step_by(2) {
        if PACE {
            for i in 0..lines {
                let off = (d0 / 2 * lines + i) * 64;
                _mm_prefetch::<_MM_HINT_T0>((ahead.k as *const i8).wrapping_add(off));
                _mm_prefetch::<_MM_HINT_T0>((ahead.v as *const i8).wrapping_add(off));
            }
        }
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
    let live: [i32; LANES] = std::array::from_fn(|j| -(keys.contains(&j) as i32));
    let live = live.as_ptr() as *const __m256i;
    let live = [
        _mm256_castsi256_ps(_mm256_loadu_si256(live)),
        _mm256_castsi256_ps(_mm256_loadu_si256(live.add(1))),
    ];
    let mut pj = [[0f32; LANES]; N];
    let mut corr = [_mm256_setzero_ps(); N];
    for r in 0..N {
        let sum = if N <= PARITY_ROWS {
            [
                _mm256_add_ps(s[r][0][0], s[r][1][0]),
                _mm256_add_ps(s[r][0][1], s[r][1][1]),
            ]
        } else {
            s[r][0]
        };
        let sr = [
            _mm256_mul_ps(sum[0], _mm256_set1_ps(scale)),
            _mm256_mul_ps(sum[1], _mm256_set1_ps(scale)),
        ];
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        let masked = _mm256_max_ps(
            _mm256_blendv_ps(ninf, sr[0], live[0]),
            _mm256_blendv_ps(ninf, sr[1], live[1]),
        );
        let mx = hmax(masked).max(m[r]);
        let p = [
            _mm256_and_ps(exp8(_mm256_sub_ps(sr[0], _mm256_set1_ps(mx))), live[0]),
            _mm256_and_ps(exp8(_mm256_sub_ps(sr[1], _mm256_set1_ps(mx))), live[1]),
        ];
        let c = rescale(m[r], mx);
        l[r] = l[r] * c + hsum(_mm256_add_ps(p[0], p[1]));
        m[r] = mx;
        _mm256_storeu_ps(pj[r].as_mut_ptr(), p[0]);
        _mm256_storeu_ps(pj[r].as_mut_ptr().add(W), p[1]);
        corr[r] = _mm256_set1_ps(c);
    }
    let ap = acc.as_mut_ptr();
    let mut c = 0;
    macro_rules! passes {
        ($k:literal) => {
            while c + $k * W <= hd {
                add_values::<N, $k, E>(ap, hd, c, &corr, &pj, v, keys.clone());
                c += $k * W;
            }
        };
    }
    // Chunks a pass, as measured (one thread, in the L2): one or two rows 4 (one row with 8,
    // which fits the registers too, ran 1.7x slower), three rows 3 (4 spills its sixteen
    // registers), four rows 2.
    match N {
        1 | 2 => passes!(4),
        3 => passes!(3),
        _ => {}
    }
    passes!(2);
    passes!(1);
}

/// Rescales `K` 8-dimension chunks (from `c`) of each row's value sums at `acc` by
/// `corr` and adds the values of `keys` weighted by `pj`, key by key. `K` chunks at a time give
/// N x K independent FMA chains (the FMA's latency wants eight or more) and each broadcast
/// weight serves all of them; every element still sums its keys in order, so the result is
/// the same bits whatever `K`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn add_values<const N: usize, const K: usize, E: Lane8>(
    acc: *mut f32,
    hd: usize,
    c: usize,
    corr: &[__m256; N],
    pj: &[[f32; LANES]; N],
    v: *const E,
    keys: std::ops::Range<usize>,
) {
    let at = |r: usize, u: usize| acc.add(r * hd + c + 8 * u);
    let mut a: [[__m256; K]; N] = std::array::from_fn(|r| {
        std::array::from_fn(|u| _mm256_mul_ps(_mm256_loadu_ps(at(r, u)), corr[r]))
    });
    for j in keys {
        let p: [__m256; N] = std::array::from_fn(|r| _mm256_set1_ps(*pj[r].get_unchecked(j)));
        for u in 0..K {
            let vj = E::load(v.add(j * hd + c + 8 * u));
            for (ar, &pr) in a.iter_mut().zip(&p) {
                ar[u] = _mm256_fmadd_ps(pr, vj, ar[u]);
            }
        }
    }
    for (r, row) in a.iter().enumerate() {
        for (u, x) in row.iter().enumerate() {
            _mm256_storeu_ps(at(r, u), *x);
        }
    }
}

/// [`update_rows`] for any number of rows, four at a time, reading from `src`; the first four
/// ask for `ahead`'s lines on the way (a block of the same head and element type, see
/// [`Ahead`]).
///
/// # Safety
/// AVX2, FMA and F16C must be available; `hd` a multiple of 8; `keys` non-empty,
/// `keys.end <= 16`, sixteen keys and their values readable at `src`. (`ahead` is only
/// prefetched, which never faults.)
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn update_group(
    q: &[f32],
    src: Keys,
    keys: std::ops::Range<usize>,
    scale: f32,
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
    ahead: Option<Keys>,
) {
    let hd = acc.len() / m.len();
    let mut r = 0;
    while r < m.len() {
        let n = (m.len() - r).min(4);
        let (q, m, l) = (&q[r * hd..(r + n) * hd], &mut m[r..r + n], &mut l[r..r + n]);
        let acc = &mut acc[r * hd..(r + n) * hd];
        let ks = keys.clone();
        let pace = if r == 0 { ahead } else { None };
        macro_rules! rows {
            ($pace:literal, $k:expr, $stride:expr, $v:expr, $ahead:expr) => {
                match n {
                    4 => {
                        update_rows::<4, $pace, _>(q, $k, $stride, $v, ks, scale, m, l, acc, $ahead)
                    }
                    3 => {
                        update_rows::<3, $pace, _>(q, $k, $stride, $v, ks, scale, m, l, acc, $ahead)
                    }
                    2 => {
                        update_rows::<2, $pace, _>(q, $k, $stride, $v, ks, scale, m, l, acc, $ahead)
                    }
                    _ => {
                        update_rows::<1, $pace, _>(q, $k, $stride, $v, ks, scale, m, l, acc, $ahead)
                    }
                }
            };
        }
        match (src, pace) {
            (Keys::F16 { k, stride, v }, Some(Keys::F16 { k: ak, v: av, .. })) => {
                rows!(true, k, stride, v, Ahead { k: ak, v: av })
            }
            (Keys::F32 { k, stride, v }, Some(Keys::F32 { k: ak, v: av, .. })) => {
                rows!(true, k, stride, v, Ahead { k: ak, v: av })
            }
            (Keys::F16 { k, stride, v }, _) => rows!(false, k, stride, v, Ahead { k, v }),
            (Keys::F32 { k, stride, v }, _) => rows!(false, k, stride, v, Ahead { k, v }),
        }
        r += n;
    }
}
