//! AVX-512 inner step of paged attention: the query rows of one token and KV head against at
//! most sixteen keys of one block.
//!
//! The pool stores each head's keys transposed (element `d` of the block's keys at
//! `d * block_size + j`), so one (masked) load is one dimension of sixteen keys and the scores
//! come out of `head_dim` broadcast FMAs with no horizontal sums; the softmax weights use a
//! vectorized `exp`. Only called after AVX-512F/BW/VL and F16C were detected
//! (`SimdLevel::Avx512Vnni`).

use std::arch::x86_64::*;

use half::f16;

use super::{rescale, KvRef};

/// Keys one step handles (one 16-lane vector of scores).
pub(super) const LANES: usize = 16;

/// Coefficients of `2^f` for `|f| <= 1/2`, highest degree first (shared with the AVX2 step).
pub(super) const EXP2_POLY: [f32; 7] = [
    1.535_336_2e-4,
    1.339_887_4e-3,
    9.618_437e-3,
    5.550_332_6e-2,
    2.402_264_9e-1,
    6.931_472e-1,
    1.0,
];

/// `e^x` for 16 lanes (x ≤ 0 here; below -87 gives 0): `2^n · p(f)` with `x·log2(e) = n + f`,
/// `|f| ≤ 1/2`, and a degree-6 polynomial for `2^f` (relative error ~2e-7).
#[inline(always)]
unsafe fn exp16(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
    let t = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let f = _mm512_sub_ps(t, n);
    let mut p = _mm512_set1_ps(EXP2_POLY[0]);
    for &ci in &EXP2_POLY[1..] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(ci));
    }
    _mm512_scalef_ps(p, n)
}

/// A pool element type, read sixteen at a time as f32.
pub(super) trait Lane: Copy {
    /// The elements at `p` whose bits are set in `mask`, as f32 (zero elsewhere; masked-off
    /// elements are not read).
    unsafe fn load(p: *const Self, mask: __mmask16) -> __m512;
}

impl Lane for f16 {
    #[inline(always)]
    unsafe fn load(p: *const f16, mask: __mmask16) -> __m512 {
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16))
    }
}

impl Lane for f32 {
    #[inline(always)]
    unsafe fn load(p: *const f32, mask: __mmask16) -> __m512 {
        _mm512_maskz_loadu_ps(mask, p)
    }
}

/// Where one step's keys and values are read: element `d` of key `j` at `k + d * stride + j`,
/// of value `j` at `v + j * head_dim + d`.
#[derive(Clone, Copy)]
pub(super) enum Keys {
    /// In an f16 pool.
    F16 {
        k: *const f16,
        stride: usize,
        v: *const f16,
    },
    /// In an f32 pool or a task's staging buffers.
    F32 {
        k: *const f32,
        stride: usize,
        v: *const f32,
    },
}

impl Keys {
    /// The keys of a block from its `j0`-th on, for the head at pool offset `base`.
    pub(super) fn in_pool(
        k: KvRef,
        v: KvRef,
        base: usize,
        j0: usize,
        block_size: usize,
        hd: usize,
    ) -> Keys {
        let (ko, vo) = (base + j0, base + j0 * hd);
        match (k, v) {
            (KvRef::F16(k), KvRef::F16(v)) => Keys::F16 {
                k: k[ko..].as_ptr(),
                stride: block_size,
                v: v[vo..].as_ptr(),
            },
            (KvRef::F32(k), KvRef::F32(v)) => Keys::F32 {
                k: k[ko..].as_ptr(),
                stride: block_size,
                v: v[vo..].as_ptr(),
            },
            _ => unreachable!("K and V of one pool share an element type"),
        }
    }
}

/// Asks for `len` elements of K and of V from pool offset `at` into the cache.
#[inline]
pub(super) fn prefetch(k: KvRef, v: KvRef, at: usize, len: usize) {
    let lines = |s: *const u8, bytes: usize| {
        for off in (0..bytes).step_by(64) {
            // SAFETY: a prefetch never faults, wherever it points.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(s.wrapping_add(off) as *const i8) };
        }
    };
    match (k, v) {
        (KvRef::F16(k), KvRef::F16(v)) => {
            lines(k[at..].as_ptr() as *const u8, 2 * len);
            lines(v[at..].as_ptr() as *const u8, 2 * len);
        }
        (KvRef::F32(k), KvRef::F32(v)) => {
            lines(k[at..].as_ptr() as *const u8, 4 * len);
            lines(v[at..].as_ptr() as *const u8, 4 * len);
        }
        _ => {}
    }
}

/// Converts `n` keys (and their values) of an f16 pool, as [`Keys::in_pool`] finds them, into
/// `kb` (`[hd, 16]`) and `vb` (`[n, hd]`) in f32, once for all the queries of a task (the
/// conversion is exact, so staged and direct reads give the same scores).
///
/// # Safety
/// AVX-512F/BW/VL and F16C must be available; `src` must be [`Keys::F16`] with `n <= 16`
/// keys readable; `kb` holds `16 * hd` and `vb` `n * hd` floats.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn stage(src: Keys, n: usize, hd: usize, kb: &mut [f32], vb: &mut [f32]) -> Keys {
    let Keys::F16 { k, stride, v } = src else {
        return src;
    };
    debug_assert!(n <= LANES && kb.len() >= LANES * hd && vb.len() >= n * hd);
    let mask: __mmask16 = ((1u32 << n) - 1) as u16;
    for d in 0..hd {
        _mm512_storeu_ps(
            kb.as_mut_ptr().add(d * LANES),
            f16::load(k.add(d * stride), mask),
        );
    }
    for i in (0..n * hd).step_by(LANES) {
        _mm512_storeu_ps(vb.as_mut_ptr().add(i), f16::load(v.add(i), !0));
    }
    Keys::F32 {
        k: kb.as_ptr(),
        stride: LANES,
        v: vb.as_ptr(),
    }
}

/// Online-softmax update of `N` query rows that see the same keys (the query heads of one
/// token that share a KV head) with the `keys` of one step: `q` the rows (`N * hd`), `k`, `v`
/// and `stride` as in [`Keys`]; `m`, `l`, `acc` the rows' running maxima, denominators and
/// weighted sums of values (`N * hd`). Each key and value load feeds all `N` rows; each row's
/// arithmetic is the same sequence whatever `N` and wherever the keys are read from.
///
/// # Safety
/// AVX-512F/BW/VL and F16C must be available; `hd` a multiple of 16; `keys` non-empty,
/// `keys.end <= 16`, and the keys below `keys.end` readable at `k` and `v`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn update_rows<const N: usize, E: Lane>(
    q: &[f32],
    k: *const E,
    stride: usize,
    v: *const E,
    keys: std::ops::Range<usize>,
    scale: f32,
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
) {
    let hd = q.len() / N;
    let valid = keys.end;
    debug_assert!(hd.is_multiple_of(16) && !keys.is_empty() && valid <= LANES);
    debug_assert!(acc.len() == N * hd && m.len() == N && l.len() == N);
    let upto: __mmask16 = ((1u32 << valid) - 1) as u16;
    let mut s = [[_mm512_setzero_ps(); 4]; N];
    let qp = q.as_ptr();
    // Dimension d feeds sum d % 4, four dimensions per iteration so the sums stay in
    // registers (indexed by a variable, they lived on the stack).
    for d0 in (0..hd).step_by(4) {
        for (u, kd) in std::array::from_fn::<_, 4, _>(|u| E::load(k.add((d0 + u) * stride), upto))
            .into_iter()
            .enumerate()
        {
            for (r, s) in s.iter_mut().enumerate() {
                s[u] = _mm512_fmadd_ps(_mm512_set1_ps(*qp.add(r * hd + d0 + u)), kd, s[u]);
            }
        }
    }
    let live = upto & !(((1u32 << keys.start) - 1) as u16);
    let mut pj = [[0f32; LANES]; N];
    let mut corr = [_mm512_setzero_ps(); N];
    for r in 0..N {
        let sr = &s[r];
        let sr = _mm512_add_ps(_mm512_add_ps(sr[0], sr[1]), _mm512_add_ps(sr[2], sr[3]));
        let sr = _mm512_mul_ps(sr, _mm512_set1_ps(scale));
        let mx = _mm512_mask_reduce_max_ps(live, sr).max(m[r]);
        let p = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(sr, _mm512_set1_ps(mx))));
        let c = rescale(m[r], mx);
        l[r] = l[r] * c + _mm512_reduce_add_ps(p);
        m[r] = mx;
        _mm512_storeu_ps(pj[r].as_mut_ptr(), p);
        corr[r] = _mm512_set1_ps(c);
    }
    let ap = acc.as_mut_ptr();
    let mut c = 0;
    while c + 64 <= hd {
        add_values::<N, 4, E>(ap, hd, c, &corr, &pj, v, keys.clone());
        c += 64;
    }
    if c + 32 <= hd {
        add_values::<N, 2, E>(ap, hd, c, &corr, &pj, v, keys.clone());
        c += 32;
    }
    if c < hd {
        add_values::<N, 1, E>(ap, hd, c, &corr, &pj, v, keys);
    }
}

/// Rescales `K` 16-dimension chunks (from `c`) of each row's value sums at `acc` by
/// `corr` and adds the values of `keys` weighted by `pj`, key by key. Several chunks at a time
/// give KN independent FMA chains where one gave N (one to four rows) and left their latency
/// exposed, and each broadcast weight serves all K (four: a 64-wide head in one pass over the
/// keys); every element still sums its keys in order, so the result is the same bits either
/// way.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn add_values<const N: usize, const K: usize, E: Lane>(
    acc: *mut f32,
    hd: usize,
    c: usize,
    corr: &[__m512; N],
    pj: &[[f32; LANES]; N],
    v: *const E,
    keys: std::ops::Range<usize>,
) {
    let at = |r: usize, u: usize| acc.add(r * hd + c + 16 * u);
    let mut a: [[__m512; K]; N] = std::array::from_fn(|r| {
        std::array::from_fn(|u| _mm512_mul_ps(_mm512_loadu_ps(at(r, u)), corr[r]))
    });
    for j in keys {
        let vj: [__m512; K] = std::array::from_fn(|u| E::load(v.add(j * hd + c + 16 * u), !0));
        for r in 0..N {
            let p = _mm512_set1_ps(*pj[r].get_unchecked(j));
            for u in 0..K {
                a[r][u] = _mm512_fmadd_ps(p, vj[u], a[r][u]);
            }
        }
    }
    for (r, row) in a.iter().enumerate() {
        for (u, x) in row.iter().enumerate() {
            _mm512_storeu_ps(at(r, u), *x);
        }
    }
}

/// Most query rows one [`update_rows`] pass takes: their four partial scores each and a
/// key vector's four loads fill 28 of the 32 registers. Each pass converts every key and
/// value it reads from f16 once, so a KV head's rows in one pass convert its block once:
/// Qwen2.5-1.5B's six query heads per KV head went in passes of four and two rows, and
/// converted each block twice.
const PASS_ROWS: usize = 6;

/// [`update_rows`] for any number of rows, in as few passes of at most [`PASS_ROWS`] as
/// there can be, evenly split, reading from `src`.
///
/// # Safety
/// As for [`update_rows`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn update_group(
    q: &[f32],
    src: Keys,
    keys: std::ops::Range<usize>,
    scale: f32,
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
) {
    let hd = acc.len() / m.len();
    let mut r = 0;
    while r < m.len() {
        let left = m.len() - r;
        let n = left.div_ceil(left.div_ceil(PASS_ROWS));
        let (q, m, l) = (&q[r * hd..(r + n) * hd], &mut m[r..r + n], &mut l[r..r + n]);
        let acc = &mut acc[r * hd..(r + n) * hd];
        let ks = keys.clone();
        macro_rules! rows {
            ($k:expr, $stride:expr, $v:expr) => {
                match n {
                    6 => update_rows::<6, _>(q, $k, $stride, $v, ks, scale, m, l, acc),
                    5 => update_rows::<5, _>(q, $k, $stride, $v, ks, scale, m, l, acc),
                    4 => update_rows::<4, _>(q, $k, $stride, $v, ks, scale, m, l, acc),
                    3 => update_rows::<3, _>(q, $k, $stride, $v, ks, scale, m, l, acc),
                    2 => update_rows::<2, _>(q, $k, $stride, $v, ks, scale, m, l, acc),
                    _ => update_rows::<1, _>(q, $k, $stride, $v, ks, scale, m, l, acc),
                }
            };
        }
        match src {
            Keys::F16 { k, stride, v } => rows!(k, stride, v),
            Keys::F32 { k, stride, v } => rows!(k, stride, v),
        }
        r += n;
    }
}
