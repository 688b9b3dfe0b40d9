//! AVX-512 VNNI kernels on packed weights: a whole group (four blocks, 128 weights) per step,
//! two `vpdpbusd` per activation row; a row's last, partial group is read with masked loads.
//!
//! [`kernels`] is only called after the level was checked as supported, which is what makes
//! calling these `target_feature` functions sound.

use std::arch::x86_64::*;

use super::{ActGroup, PackedFormat, PackedKernels, GROUP_BLOCKS};

/// How far ahead of the weight stream to prefetch (tuned on the reference model: decode
/// went 137 -> 206 tok/s from 640 B to 8 KiB).
const PREFETCH: usize = 8192;

/// One packed weight group, unpacked into registers.
struct WeightGroup {
    /// Low and high value halves (see the module docs of `packed`).
    lo: __m512i,
    hi: __m512i,
    /// Scales, each repeated over its block's four 32-bit lanes.
    d16: __m512,
    /// Minimums, one lane per block.
    m4: __m128,
}

/// Loads group `g` at `p`; `tb` blocks (masked loads when fewer than four).
#[inline(always)]
unsafe fn load_group<const F: u8>(p: *const u8, tb: usize) -> WeightGroup {
    let format = PackedFormat::from_id(F);
    let scale_mask: __mmask8 = (1u8 << tb) - 1;
    let d4 = _mm_cvtph_ps(_mm_maskz_loadu_epi16(scale_mask, p as *const i16));
    let (m4, q) = if format.stores_min() {
        let m = _mm_maskz_loadu_epi16(scale_mask, p.add(2 * tb) as *const i16);
        (_mm_cvtph_ps(m), p.add(4 * tb))
    } else {
        (
            _mm_mul_ps(d4, _mm_set1_ps(format.implied_min())),
            p.add(2 * tb),
        )
    };
    let bytes: __mmask64 = if tb == GROUP_BLOCKS {
        !0
    } else {
        (1u64 << (16 * tb)) - 1
    };
    let (lo, hi) = if format.nibbles() {
        let raw = _mm512_maskz_loadu_epi8(bytes, q as *const i8);
        let mask = _mm512_set1_epi8(0x0f);
        let lo = _mm512_and_si512(raw, mask);
        let hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);
        if format.bits() == 5 {
            // Fifth bits: a 2-byte mask per block for each half, right after the nibbles.
            let bits = q.add(16 * tb);
            let read = |p: *const u8| {
                if tb == GROUP_BLOCKS {
                    u64::from_le((p as *const u64).read_unaligned())
                } else {
                    let mut m = [0u8; 8];
                    std::ptr::copy_nonoverlapping(p, m.as_mut_ptr(), 2 * tb);
                    u64::from_le_bytes(m)
                }
            };
            let sixteen = _mm512_set1_epi8(0x10);
            (
                _mm512_mask_add_epi8(lo, read(bits), lo, sixteen),
                _mm512_mask_add_epi8(hi, read(bits.add(2 * tb)), hi, sixteen),
            )
        } else {
            (lo, hi)
        }
    } else {
        (
            _mm512_maskz_loadu_epi8(bytes, q as *const i8),
            _mm512_maskz_loadu_epi8(bytes, q.add(16 * tb) as *const i8),
        )
    };
    let lanes = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    WeightGroup {
        lo,
        hi,
        d16: _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(d4)),
        m4,
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows<const R: usize, const F: u8>(
    w: &[u8],
    acts: [&[ActGroup]; R],
    nb: usize,
) -> [f32; R] {
    let format = PackedFormat::from_id(F);
    let groups = nb.div_ceil(GROUP_BLOCKS);
    debug_assert!(acts.iter().all(|a| a.len() == groups));
    let mut acc = [_mm512_setzero_ps(); R];
    let mut macc = [_mm_setzero_ps(); R];
    let mut p = w.as_ptr();
    for g in 0..groups {
        let tb = (nb - g * GROUP_BLOCKS).min(GROUP_BLOCKS);
        debug_assert!(p.add(format.group_bytes(tb)) <= w.as_ptr().add(w.len()));
        // (May point past the matrix: a prefetch never faults.)
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
        let wg = load_group::<F>(p, tb);
        for r in 0..R {
            let a = acts[r].get_unchecked(g);
            let qs = a.qs.as_ptr() as *const __m512i;
            let i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wg.lo, _mm512_load_si512(qs));
            let i = _mm512_dpbusd_epi32(i, wg.hi, _mm512_load_si512(qs.add(1)));
            let scale = _mm512_mul_ps(wg.d16, _mm512_load_ps(a.d.as_ptr()));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), scale, acc[r]);
            macc[r] = _mm_fmadd_ps(wg.m4, _mm_load_ps(a.s.as_ptr()), macc[r]);
        }
        p = p.add(format.group_bytes(tb));
    }
    let mut out = [0f32; R];
    for r in 0..R {
        let m = macc[r];
        let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_add_ss(m, _mm_movehdup_ps(m));
        out[r] = _mm512_reduce_add_ps(acc[r]) + _mm_cvtss_f32(m);
    }
    out
}

pub(super) fn kernels(format: PackedFormat) -> PackedKernels {
    super::kernel_set!(rows, format)
}

/// [`super::quantize_act`] with AVX-512 (same rounding: to nearest, ties to even).
///
/// # Safety
/// AVX-512F/BW must be available.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn quantize_act(x: &[f32], out: &mut [ActGroup]) {
    debug_assert_eq!(out.len(), x.len().div_ceil(super::GROUP_LEN));
    let abs_mask = _mm512_set1_epi32(0x7fff_ffff);
    for (g, xs) in out.iter_mut().zip(x.chunks(super::GROUP_LEN)) {
        *g = ActGroup::default();
        for (b, blk) in xs.chunks_exact(32).enumerate() {
            let lo = _mm512_loadu_ps(blk.as_ptr());
            let hi = _mm512_loadu_ps(blk.as_ptr().add(16));
            let abs =
                |v: __m512| _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), abs_mask));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(abs(lo), abs(hi)));
            let d = amax / 127.0;
            let id = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, id));
            let qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, id));
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
            let qs = g.qs.as_mut_ptr();
            _mm_storeu_si128(qs.add(16 * b) as *mut __m128i, _mm512_cvtepi32_epi8(qlo));
            _mm_storeu_si128(
                qs.add(64 + 16 * b) as *mut __m128i,
                _mm512_cvtepi32_epi8(qhi),
            );
            g.d[4 * b..4 * b + 4].fill(d);
            g.s[b] = d * sum as f32;
        }
    }
}
