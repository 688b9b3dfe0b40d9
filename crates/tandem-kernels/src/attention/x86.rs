//! AVX-512 inner step of paged attention: one query row against one block of at most 16 keys.
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

/// Online-softmax update of one query row (`q`, `hd` values) with the keys `keys` of a block:
/// `kt` transposed keys (`hd * 16`), `vb` values (`keys.end * hd`, row-major); `m`, `l`, `acc`
/// are the row's running maximum, denominator and weighted sum of values (`hd`).
///
/// # Safety
/// AVX-512F must be available; `hd` a multiple of 16; `keys` non-empty, `keys.end <= 16`.
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn update_row(
    q: &[f32],
    kt: &[f32],
    vb: &[f32],
    keys: std::ops::Range<usize>,
    scale: f32,
    m: &mut f32,
    l: &mut f32,
    acc: &mut [f32],
) {
    let hd = q.len();
    let valid = keys.end;
    debug_assert!(hd.is_multiple_of(16) && !keys.is_empty() && valid <= LANES);
    debug_assert!(kt.len() >= hd * LANES && vb.len() >= valid * hd && acc.len() == hd);
    let mut s = [_mm512_setzero_ps(); 4];
    let kp = kt.as_ptr();
    for d in 0..hd {
        let kd = _mm512_loadu_ps(kp.add(d * LANES));
        s[d & 3] = _mm512_fmadd_ps(_mm512_set1_ps(*q.get_unchecked(d)), kd, s[d & 3]);
    }
    let s = _mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3]));
    let s = _mm512_mul_ps(s, _mm512_set1_ps(scale));
    let upto: __mmask16 = if valid == LANES {
        !0
    } else {
        (1u16 << valid) - 1
    };
    let live = upto & !((1u16 << keys.start) - 1);
    let mx = _mm512_mask_reduce_max_ps(live, s).max(*m);
    let p = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(s, _mm512_set1_ps(mx))));
    let corr = (*m - mx).exp();
    *l = *l * corr + _mm512_reduce_add_ps(p);
    *m = mx;
    let mut pj = [0f32; LANES];
    _mm512_storeu_ps(pj.as_mut_ptr(), p);
    let corr = _mm512_set1_ps(corr);
    let (ap, vp) = (acc.as_mut_ptr(), vb.as_ptr());
    for c in (0..hd).step_by(16) {
        let mut a = _mm512_mul_ps(_mm512_loadu_ps(ap.add(c)), corr);
        for j in keys.clone() {
            let w = _mm512_set1_ps(*pj.get_unchecked(j));
            a = _mm512_fmadd_ps(w, _mm512_loadu_ps(vp.add(j * hd + c)), a);
        }
        _mm512_storeu_ps(ap.add(c), a);
    }
}
