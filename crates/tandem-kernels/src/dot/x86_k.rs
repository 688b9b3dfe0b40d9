//! AVX2 dot kernels for the k-quant formats against [`BlockQ8K`] activations.
//!
//! Each format only unpacks its values (eight registers of 32 unsigned bytes, element order);
//! scales come from [`kquant::scales`] and one body does the rest: `maddubs` of values with
//! activations, `madd` with the 16-element group scales, the offset and minimum terms from
//! the activations' group sums. Every activation row runs the same instructions in the same
//! order, so the four-row kernel equals four one-row calls bit for bit.
//!
//! Handed out by [`super::x86::kernel`] only after AVX2 was checked, which makes the
//! `unsafe` calls sound.

use std::arch::x86_64::*;

use crate::act::BlockQ8K;
use crate::dtype::DType;
use crate::kquant::{self, k_format, K_Q2, K_Q3, K_Q4, K_Q5, K_Q6};

use super::{DotKernel, DotQ8K, DotQ8Kx4};

/// How far ahead of the weight stream to prefetch (Qwen2.5-Coder-1.5B decode: none 9.0 tok/s,
/// 8 KiB 15.2, 16 KiB 16.0).
const PREFETCH: usize = 16384;

/// The kernels for a k-quant `dtype`, or `None` for other formats.
pub(super) fn kernel(dtype: DType) -> Option<DotKernel> {
    macro_rules! pair {
        ($f:expr) => {{
            let one: DotQ8K = |w, a| unsafe { rows::<1, { $f }>(w, [a])[0] };
            let four: DotQ8Kx4 = |w, a| unsafe { rows::<4, { $f }>(w, a) };
            DotKernel::Q8K(one, Some(four))
        }};
    }
    Some(match dtype {
        DType::Q2_K => pair!(K_Q2),
        DType::Q3_K => pair!(K_Q3),
        DType::Q4_K => pair!(K_Q4),
        DType::Q5_K => pair!(K_Q5),
        DType::Q6_K => pair!(K_Q6),
        _ => return None,
    })
}

/// `(v >> shift) & mask` on every byte (the shift done on 16-bit lanes, then masked).
#[inline(always)]
unsafe fn bits(v: __m256i, shift: i32, mask: i8) -> __m256i {
    let s = _mm256_srl_epi16(v, _mm_cvtsi32_si128(shift));
    _mm256_and_si256(s, _mm256_set1_epi8(mask))
}

/// `(v << shift) & mask` on every byte.
#[inline(always)]
unsafe fn bits_up(v: __m256i, shift: i32, mask: i8) -> __m256i {
    let s = _mm256_sll_epi16(v, _mm_cvtsi32_si128(shift));
    _mm256_and_si256(s, _mm256_set1_epi8(mask))
}

#[inline(always)]
unsafe fn load(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// The 256 unsigned values of block `b` of format `F`, 32 per register in element order.
#[inline(always)]
unsafe fn unpack<const F: u8>(b: *const u8) -> [__m256i; 8] {
    let mut u = [_mm256_setzero_si256(); 8];
    match F {
        K_Q2 => {
            for half in 0..2 {
                let q = load(b.add(16 + 32 * half));
                for j in 0..4 {
                    u[4 * half + j] = bits(q, 2 * j as i32, 3);
                }
            }
        }
        K_Q3 => {
            let hm = load(b);
            for half in 0..2 {
                let q = load(b.add(32 + 32 * half));
                for j in 0..4 {
                    let high = bits(hm, (4 * half + j) as i32, 1);
                    u[4 * half + j] =
                        _mm256_or_si256(bits(q, 2 * j as i32, 3), _mm256_slli_epi16(high, 2));
                }
            }
        }
        K_Q4 => {
            for c in 0..4 {
                let q = load(b.add(16 + 32 * c));
                u[2 * c] = _mm256_and_si256(q, _mm256_set1_epi8(0x0f));
                u[2 * c + 1] = bits(q, 4, 0x0f);
            }
        }
        K_Q5 => {
            let qh = load(b.add(16));
            for c in 0..4 {
                let q = load(b.add(48 + 32 * c));
                let lo_high = bits_up(bits(qh, 2 * c as i32, 1), 4, 0x10);
                let hi_high = bits_up(bits(qh, 2 * c as i32 + 1, 1), 4, 0x10);
                u[2 * c] = _mm256_or_si256(_mm256_and_si256(q, _mm256_set1_epi8(0x0f)), lo_high);
                u[2 * c + 1] = _mm256_or_si256(bits(q, 4, 0x0f), hi_high);
            }
        }
        _ => {
            for half in 0..2 {
                let qa = load(b.add(64 * half));
                let qb = load(b.add(64 * half + 32));
                let qh = load(b.add(128 + 32 * half));
                let low = _mm256_set1_epi8(0x0f);
                u[4 * half] = _mm256_or_si256(_mm256_and_si256(qa, low), bits_up(qh, 4, 0x30));
                u[4 * half + 1] = _mm256_or_si256(_mm256_and_si256(qb, low), bits_up(qh, 2, 0x30));
                u[4 * half + 2] = _mm256_or_si256(
                    bits(qa, 4, 0x0f),
                    _mm256_and_si256(qh, _mm256_set1_epi8(0x30)),
                );
                u[4 * half + 3] = _mm256_or_si256(bits(qb, 4, 0x0f), bits(qh, 2, 0x30));
            }
        }
    }
    u
}

#[inline(always)]
unsafe fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Dot products of one weight row (format `F`) with `R` activation rows.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows<const R: usize, const F: u8>(w: &[u8], acts: [&[BlockQ8K]; R]) -> [f32; R] {
    let dtype = k_format(F);
    let bb = dtype.block_bytes();
    let off = kquant::offset(dtype);
    let mut acc = [_mm256_setzero_ps(); R];
    for (i, b) in w.chunks_exact(bb).enumerate() {
        // (May point past the matrix: a prefetch never faults.)
        let ahead = b.as_ptr().wrapping_add(PREFETCH);
        for line in (0..bb).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8);
        }
        let (d, dmin, sc, mn) = kquant::scales(dtype, b);
        let u = unpack::<F>(b.as_ptr());
        let sc8 = _mm_loadu_si128(sc.as_ptr() as *const __m128i);
        // Even groups' scales in the low 128 bits, odd groups' in the high, as 16-bit lanes:
        // register k needs group 2k in its low half and 2k + 1 in its high half.
        let even_odd = _mm_set_epi8(15, 13, 11, 9, 7, 5, 3, 1, 14, 12, 10, 8, 6, 4, 2, 0);
        let split = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, even_odd));
        let scale: [__m256i; 8] = std::array::from_fn(|k| {
            let pick = (2 * k as i16) | ((2 * k as i16 + 1) << 8);
            _mm256_shuffle_epi8(split, _mm256_set1_epi16(pick))
        });
        let sc_v = _mm256_cvtepi8_epi16(sc8);
        let mn_v = _mm256_cvtepi8_epi16(_mm_loadu_si128(mn.as_ptr() as *const __m128i));
        for r in 0..R {
            let y = acts[r].get_unchecked(i);
            let mut isum = _mm256_setzero_si256();
            for k in 0..8 {
                let q = _mm256_loadu_si256(y.qs.as_ptr().add(32 * k) as *const __m256i);
                let p = _mm256_maddubs_epi16(u[k], q);
                isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, scale[k]));
            }
            let bsums = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
            if off != 0 {
                let corr = _mm256_madd_epi16(bsums, sc_v);
                isum = _mm256_sub_epi32(isum, _mm256_mullo_epi32(corr, _mm256_set1_epi32(off)));
            }
            let mut v = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(isum));
            if dmin != 0.0 {
                let m = _mm256_cvtepi32_ps(_mm256_madd_epi16(bsums, mn_v));
                v = _mm256_fnmadd_ps(_mm256_set1_ps(dmin), m, v);
            }
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(y.d), v, acc[r]);
        }
    }
    acc.map(|a| hsum_ps(a))
}
