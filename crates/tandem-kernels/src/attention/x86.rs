//! AVX-512 inner step of paged attention: the query rows of one token and KV head against one
//! block of at most 16 keys.
//!
//! Keys arrive transposed (`kt[d * 16 + j]` = element `d` of key `j`), so the 16 scores come
//! out of `head_dim` broadcast FMAs with no horizontal sums; the softmax weights use a
//! vectorized `exp`. Only called after AVX-512F was detected (`SimdLevel::Avx512Vnni`).

use std::arch::x86_64::*;

/// Keys per block this kernel handles (one 16-lane vector of scores).
pub(super) const LANES: usize = 16;

/// `e^x` for 16 lanes (x ≤ 0 here; below -87 gives 0): `2^n · p(f)` with `x·log2(e) = n + f`,
/// `|f| ≤ 1/2`, and a degree-6 polynomial for `2^f` (relative error ~2e-7).
#[inline(always)]
unsafe fn exp16(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
    let t = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let f = _mm512_sub_ps(t, n);
    let c = [
        1.535_336_2e-4f32,
        1.339_887_4e-3,
        9.618_437e-3,
        5.550_332_6e-2,
        2.402_264_9e-1,
        6.931_472e-1,
        1.0,
    ];
    let mut p = _mm512_set1_ps(c[0]);
    for &ci in &c[1..] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(ci));
    }
    _mm512_scalef_ps(p, n)
}

/// Converts `src` (a multiple of 16 long) into `dst` with `vcvtph2ps`, 16 at a time (the
/// generic slice conversion costs more than the conversion for 64-element rows).
///
/// # Safety
/// AVX-512F must be available; `src.len() == dst.len()`, a multiple of 16.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
    debug_assert!(src.len() == dst.len() && src.len().is_multiple_of(16));
    for (i, o) in (0..src.len()).step_by(16).zip(dst.chunks_exact_mut(16)) {
        let h = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
        _mm512_storeu_ps(o.as_mut_ptr(), _mm512_cvtph_ps(h));
    }
}

/// Transposes the block's keys `kb` (16 rows of `hd`, row-major, rows past the block's keys
/// zero) into `kt` (`kt[d * 16 + j]` = element `d` of key `j`), 16 dimensions at a time with a
/// 16x16 shuffle transpose.
///
/// # Safety
/// AVX-512F must be available; `hd` a multiple of 16; `kb`, `kt` at least `16 * hd` long.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose_keys(kb: &[f32], kt: &mut [f32], hd: usize) {
    debug_assert!(hd.is_multiple_of(16) && kb.len() >= LANES * hd && kt.len() >= LANES * hd);
    let (src, dst) = (kb.as_ptr(), kt.as_mut_ptr());
    for c in (0..hd).step_by(16) {
        let r: [__m512; 16] = std::array::from_fn(|j| _mm512_loadu_ps(src.add(j * hd + c)));
        // Pairs of rows interleaved, then groups of four: lane L of u[4k + m] holds column
        // 4L + m of rows 4k..4k+4.
        let t: [__m512; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        let u: [__m512; 16] = std::array::from_fn(|i| {
            let (k, m) = (i / 4, i % 4);
            let (a, b) = (t[4 * k + m / 2], t[4 * k + 2 + m / 2]);
            if m % 2 == 0 {
                _mm512_shuffle_ps::<0x44>(a, b)
            } else {
                _mm512_shuffle_ps::<0xEE>(a, b)
            }
        });
        for m in 0..4 {
            let v = _mm512_shuffle_f32x4::<0x88>(u[m], u[4 + m]);
            let w = _mm512_shuffle_f32x4::<0xDD>(u[m], u[4 + m]);
            let x = _mm512_shuffle_f32x4::<0x88>(u[8 + m], u[12 + m]);
            let y = _mm512_shuffle_f32x4::<0xDD>(u[8 + m], u[12 + m]);
            let out = [
                _mm512_shuffle_f32x4::<0x88>(v, x),
                _mm512_shuffle_f32x4::<0x88>(w, y),
                _mm512_shuffle_f32x4::<0xDD>(v, x),
                _mm512_shuffle_f32x4::<0xDD>(w, y),
            ];
            for (l, o) in out.into_iter().enumerate() {
                _mm512_storeu_ps(dst.add((c + 4 * l + m) * LANES), o);
            }
        }
    }
}

/// Online-softmax update of `N` query rows that see the same keys (the query heads of one
/// token that share a KV head) with the keys `keys` of a block: `q` the rows (`N * hd`), `kt`
/// transposed keys (`hd * 16`), `vb` values (`keys.end * hd`, row-major); `m`, `l`, `acc` the
/// rows' running maxima, denominators and weighted sums of values (`N * hd`). Each key and
/// value load feeds all `N` rows; each row's arithmetic is the same sequence whatever `N`.
///
/// # Safety
/// AVX-512F must be available; `hd` a multiple of 16; `keys` non-empty, `keys.end <= 16`.
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn update_rows<const N: usize>(
    q: &[f32],
    kt: &[f32],
    vb: &[f32],
    keys: std::ops::Range<usize>,
    scale: f32,
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
) {
    let hd = q.len() / N;
    let valid = keys.end;
    debug_assert!(hd.is_multiple_of(16) && !keys.is_empty() && valid <= LANES);
    debug_assert!(kt.len() >= hd * LANES && vb.len() >= valid * hd && acc.len() == N * hd);
    debug_assert!(m.len() == N && l.len() == N);
    let mut s = [[_mm512_setzero_ps(); 4]; N];
    let (kp, qp) = (kt.as_ptr(), q.as_ptr());
    for d in 0..hd {
        let kd = _mm512_loadu_ps(kp.add(d * LANES));
        for (r, s) in s.iter_mut().enumerate() {
            s[d & 3] = _mm512_fmadd_ps(_mm512_set1_ps(*qp.add(r * hd + d)), kd, s[d & 3]);
        }
    }
    let upto: __mmask16 = if valid == LANES {
        !0
    } else {
        (1u16 << valid) - 1
    };
    let live = upto & !((1u16 << keys.start) - 1);
    let mut pj = [[0f32; LANES]; N];
    let mut corr = [_mm512_setzero_ps(); N];
    for r in 0..N {
        let sr = &s[r];
        let sr = _mm512_add_ps(_mm512_add_ps(sr[0], sr[1]), _mm512_add_ps(sr[2], sr[3]));
        let sr = _mm512_mul_ps(sr, _mm512_set1_ps(scale));
        let mx = _mm512_mask_reduce_max_ps(live, sr).max(m[r]);
        let p = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(sr, _mm512_set1_ps(mx))));
        let c = (m[r] - mx).exp();
        l[r] = l[r] * c + _mm512_reduce_add_ps(p);
        m[r] = mx;
        _mm512_storeu_ps(pj[r].as_mut_ptr(), p);
        corr[r] = _mm512_set1_ps(c);
    }
    let (ap, vp) = (acc.as_mut_ptr(), vb.as_ptr());
    for c in (0..hd).step_by(16) {
        let mut a: [__m512; N] =
            std::array::from_fn(|r| _mm512_mul_ps(_mm512_loadu_ps(ap.add(r * hd + c)), corr[r]));
        for j in keys.clone() {
            let v = _mm512_loadu_ps(vp.add(j * hd + c));
            for r in 0..N {
                a[r] = _mm512_fmadd_ps(_mm512_set1_ps(*pj[r].get_unchecked(j)), v, a[r]);
            }
        }
        for (r, a) in a.iter().enumerate() {
            _mm512_storeu_ps(ap.add(r * hd + c), *a);
        }
    }
}

/// [`update_rows`] for any number of rows, four at a time.
///
/// # Safety
/// As for [`update_rows`].
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn update_group(
    q: &[f32],
    kt: &[f32],
    vb: &[f32],
    keys: std::ops::Range<usize>,
    scale: f32,
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
) {
    let hd = acc.len() / m.len();
    let mut r = 0;
    while r < m.len() {
        let n = (m.len() - r).min(4);
        let (q, m, l) = (&q[r * hd..(r + n) * hd], &mut m[r..r + n], &mut l[r..r + n]);
        let acc = &mut acc[r * hd..(r + n) * hd];
        let k = keys.clone();
        match n {
            4 => update_rows::<4>(q, kt, vb, k, scale, m, l, acc),
            3 => update_rows::<3>(q, kt, vb, k, scale, m, l, acc),
            2 => update_rows::<2>(q, kt, vb, k, scale, m, l, acc),
            _ => update_rows::<1>(q, kt, vb, k, scale, m, l, acc),
        }
        r += n;
    }
}
