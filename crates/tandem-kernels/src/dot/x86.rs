//! x86-64 dot kernels: AVX2 (`maddubs`) and AVX-512 VNNI (`vpdpbusd`).
//!
//! Each safe wrapper is only handed out by [`kernel`] after the level was checked as supported,
//! which is what makes the `unsafe` calls sound.

use std::arch::x86_64::*;

use super::DotKernel;
use crate::act::BlockQ8;
use crate::dtype::DType;
use crate::simd::SimdLevel;

pub(super) fn kernel(dtype: DType, level: SimdLevel) -> Option<DotKernel> {
    if !level.is_supported() {
        return None;
    }
    // The k-quant kernels are AVX2 (a subset of the AVX-512 level).
    if let Some(k) = super::x86_k::kernel(dtype) {
        return Some(k);
    }
    let (one, four): (super::DotQ8, super::DotQ8x4) = match (level, dtype) {
        (SimdLevel::Avx2, DType::Q4_0) => (
            |w, a| unsafe { q4_0_avx2(w, a) },
            |w, a| unsafe { q4_0_avx2_x4(w, a) },
        ),
        (SimdLevel::Avx2, DType::Q4_1) => (
            |w, a| unsafe { q4_1_avx2(w, a) },
            |w, a| unsafe { q4_1_avx2_x4(w, a) },
        ),
        (SimdLevel::Avx2, DType::Q5_0) => (
            |w, a| unsafe { q5_0_avx2(w, a) },
            |w, a| unsafe { q5_0_avx2_x4(w, a) },
        ),
        (SimdLevel::Avx2, DType::Q5_1) => (
            |w, a| unsafe { q5_1_avx2(w, a) },
            |w, a| unsafe { q5_1_avx2_x4(w, a) },
        ),
        (SimdLevel::Avx2, DType::Q8_0) => (
            |w, a| unsafe { q8_0_avx2(w, a) },
            |w, a| unsafe { q8_0_avx2_x4(w, a) },
        ),
        (SimdLevel::Avx512Vnni, DType::Q4_0) => (
            |w, a| unsafe { q4_0_vnni(w, a) },
            |w, a| unsafe { q4_0_vnni_x4(w, a) },
        ),
        (SimdLevel::Avx512Vnni, DType::Q4_1) => (
            |w, a| unsafe { q4_1_vnni(w, a) },
            |w, a| unsafe { q4_1_vnni_x4(w, a) },
        ),
        // The AVX2 Q5 kernels on AVX-512 machines (AVX2 is a subset).
        (SimdLevel::Avx512Vnni, DType::Q5_0) => (
            |w, a| unsafe { q5_0_avx2(w, a) },
            |w, a| unsafe { q5_0_avx2_x4(w, a) },
        ),
        (SimdLevel::Avx512Vnni, DType::Q5_1) => (
            |w, a| unsafe { q5_1_avx2(w, a) },
            |w, a| unsafe { q5_1_avx2_x4(w, a) },
        ),
        (SimdLevel::Avx512Vnni, DType::Q8_0) => (
            |w, a| unsafe { q8_0_vnni(w, a) },
            |w, a| unsafe { q8_0_vnni_x4(w, a) },
        ),
        _ => return None,
    };
    Some(DotKernel::Q8(one, Some(four)))
}

#[inline(always)]
unsafe fn f16_to_f32(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes([*p, *p.add(1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// 16 packed bytes of nibbles as 32 unsigned bytes: low nibbles then high nibbles.
#[inline(always)]
unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
    let q = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
}

/// A Q4_0 block's 32 unsigned 4-bit values.
#[inline(always)]
unsafe fn unpack_q4_0(b: *const u8) -> __m256i {
    unpack_nibbles(b.add(2))
}

/// A Q4_1 block's 32 unsigned 4-bit values.
#[inline(always)]
unsafe fn unpack_q4_1(b: *const u8) -> __m256i {
    unpack_nibbles(b.add(4))
}

/// 32 bits as 32 bytes: 0xff where the bit is set (bit j -> byte j).
#[inline(always)]
unsafe fn bytes_from_bits(p: *const u8) -> __m256i {
    let bits = i32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]);
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    // Every bit but the byte's own one set: the byte becomes all ones iff its bit was set.
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64);
    _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1))
}

/// A Q5 block's 32 unsigned 5-bit values: nibbles at `qs`, fifth bits in the word at `qh`.
#[inline(always)]
unsafe fn unpack_q5(qh: *const u8, qs: *const u8) -> __m256i {
    let high = _mm256_and_si256(bytes_from_bits(qh), _mm256_set1_epi8(0x10));
    _mm256_or_si256(unpack_nibbles(qs), high)
}

#[inline(always)]
unsafe fn unpack_q5_0(b: *const u8) -> __m256i {
    unpack_q5(b.add(2), b.add(6))
}

#[inline(always)]
unsafe fn unpack_q5_1(b: *const u8) -> __m256i {
    unpack_q5(b.add(4), b.add(8))
}

#[inline(always)]
unsafe fn load_q8(b: &BlockQ8) -> __m256i {
    _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i)
}

/// Sum of u8 x i8 products as 8 i32 lanes, with AVX2.
#[inline(always)]
unsafe fn dot_u8i8_avx2(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

macro_rules! nibble_kernel {
    ($name:ident, $features:literal, $dot:ident, $bytes:expr, $unpack:ident, $min:expr) => {
        #[target_feature(enable = $features)]
        unsafe fn $name(w: &[u8], a: &[BlockQ8]) -> f32 {
            debug_assert_eq!(w.len(), a.len() * $bytes);
            // Two accumulators break the FMA dependency chain; the prefetch runs ahead of the
            // weight stream (a decode matmul reads each weight byte exactly once).
            let mut acc = [_mm256_setzero_ps(); 2];
            let mut summ = 0f32;
            let p = w.as_ptr();
            for (i, y) in a.iter().enumerate() {
                let b = p.add(i * $bytes);
                _mm_prefetch::<_MM_HINT_T0>(b.add(512) as *const i8);
                let d = f16_to_f32(b);
                let qw = $unpack(b);
                let dot = $dot(qw, load_q8(y));
                acc[i & 1] =
                    _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(dot), acc[i & 1]);
                summ += $min(b, d) * y.s;
            }
            hsum(_mm256_add_ps(acc[0], acc[1])) + summ
        }
    };
}

macro_rules! nibble_kernel_x4 {
    ($name:ident, $features:literal, $dot:ident, $bytes:expr, $unpack:ident, $min:expr) => {
        #[target_feature(enable = $features)]
        unsafe fn $name(w: &[u8], a: [&[BlockQ8]; 4]) -> [f32; 4] {
            let nb = a[0].len();
            debug_assert!(a.iter().all(|r| r.len() == nb) && w.len() == nb * $bytes);
            // Same two alternating accumulators as the single-row kernel: results are bitwise
            // equal, so a row's logits never depend on its place in a batch.
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            let mut summ = [0f32; 4];
            let p = w.as_ptr();
            for i in 0..nb {
                let b = p.add(i * $bytes);
                _mm_prefetch::<_MM_HINT_T0>(b.add(512) as *const i8);
                let d = f16_to_f32(b);
                let m = $min(b, d);
                let qw = $unpack(b);
                for r in 0..4 {
                    let y = a[r].get_unchecked(i);
                    let dot = $dot(qw, load_q8(y));
                    acc[r][i & 1] = _mm256_fmadd_ps(
                        _mm256_set1_ps(d * y.d),
                        _mm256_cvtepi32_ps(dot),
                        acc[r][i & 1],
                    );
                    summ[r] += m * y.s;
                }
            }
            let total = |r: usize| hsum(_mm256_add_ps(acc[r][0], acc[r][1])) + summ[r];
            [total(0), total(1), total(2), total(3)]
        }
    };
}

macro_rules! q8_kernel_x4 {
    ($name:ident, $features:literal, $dot:ident) => {
        #[target_feature(enable = $features)]
        unsafe fn $name(w: &[u8], a: [&[BlockQ8]; 4]) -> [f32; 4] {
            let nb = a[0].len();
            debug_assert!(a.iter().all(|r| r.len() == nb) && w.len() == nb * 34);
            let mut acc = [_mm256_setzero_ps(); 4];
            let p = w.as_ptr();
            for i in 0..nb {
                let b = p.add(i * 34);
                _mm_prefetch::<_MM_HINT_T0>(b.add(512) as *const i8);
                let d = f16_to_f32(b);
                let qw = _mm256_loadu_si256(b.add(2) as *const __m256i);
                let aw = _mm256_sign_epi8(qw, qw);
                for r in 0..4 {
                    let y = a[r].get_unchecked(i);
                    let dot = $dot(aw, _mm256_sign_epi8(load_q8(y), qw));
                    acc[r] =
                        _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(dot), acc[r]);
                }
            }
            [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
        }
    };
}

macro_rules! q8_kernel {
    ($name:ident, $features:literal, $dot:ident) => {
        #[target_feature(enable = $features)]
        unsafe fn $name(w: &[u8], a: &[BlockQ8]) -> f32 {
            debug_assert_eq!(w.len(), a.len() * 34);
            let mut acc = _mm256_setzero_ps();
            let p = w.as_ptr();
            for (i, y) in a.iter().enumerate() {
                let b = p.add(i * 34);
                let qw = _mm256_loadu_si256(b.add(2) as *const __m256i);
                // u8 x i8 instructions: move the weight's sign onto the activation.
                let dot = $dot(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(load_q8(y), qw));
                acc = _mm256_fmadd_ps(
                    _mm256_set1_ps(f16_to_f32(b) * y.d),
                    _mm256_cvtepi32_ps(dot),
                    acc,
                );
            }
            hsum(acc)
        }
    };
}

#[inline(always)]
unsafe fn q4_0_min(_b: *const u8, d: f32) -> f32 {
    -8.0 * d
}

#[inline(always)]
unsafe fn q4_1_min(b: *const u8, _d: f32) -> f32 {
    f16_to_f32(b.add(2))
}

#[inline(always)]
unsafe fn q5_0_min(_b: *const u8, d: f32) -> f32 {
    -16.0 * d
}

nibble_kernel!(
    q4_0_avx2,
    "avx2,fma,f16c",
    dot_u8i8_avx2,
    18,
    unpack_q4_0,
    q4_0_min
);
nibble_kernel!(
    q4_1_avx2,
    "avx2,fma,f16c",
    dot_u8i8_avx2,
    20,
    unpack_q4_1,
    q4_1_min
);
q8_kernel!(q8_0_avx2, "avx2,fma,f16c", dot_u8i8_avx2);
nibble_kernel_x4!(
    q4_0_avx2_x4,
    "avx2,fma,f16c",
    dot_u8i8_avx2,
    18,
    unpack_q4_0,
    q4_0_min
);
nibble_kernel_x4!(
    q4_1_avx2_x4,
    "avx2,fma,f16c",
    dot_u8i8_avx2,
    20,
    unpack_q4_1,
    q4_1_min
);
q8_kernel_x4!(q8_0_avx2_x4, "avx2,fma,f16c", dot_u8i8_avx2);
nibble_kernel!(
    q5_0_avx2,
    "avx2,fma,f16c",
    dot_u8i8_avx2,
    22,
    unpack_q5_0,
    q5_0_min
);
nibble_kernel!(
    q5_1_avx2,
    "avx2,fma,f16c",
    dot_u8i8_avx2,
    24,
    unpack_q5_1,
    q4_1_min
);
nibble_kernel_x4!(
    q5_0_avx2_x4,
    "avx2,fma,f16c",
    dot_u8i8_avx2,
    22,
    unpack_q5_0,
    q5_0_min
);
nibble_kernel_x4!(
    q5_1_avx2_x4,
    "avx2,fma,f16c",
    dot_u8i8_avx2,
    24,
    unpack_q5_1,
    q4_1_min
);

/// Sum of u8 x i8 products as 8 i32 lanes, with VNNI.
#[inline(always)]
unsafe fn dot_u8i8_vnni(u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
}

nibble_kernel!(
    q4_0_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    dot_u8i8_vnni,
    18,
    unpack_q4_0,
    q4_0_min
);
nibble_kernel!(
    q4_1_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    dot_u8i8_vnni,
    20,
    unpack_q4_1,
    q4_1_min
);
q8_kernel!(
    q8_0_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    dot_u8i8_vnni
);
nibble_kernel_x4!(
    q4_0_vnni_x4,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    dot_u8i8_vnni,
    18,
    unpack_q4_0,
    q4_0_min
);
nibble_kernel_x4!(
    q4_1_vnni_x4,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    dot_u8i8_vnni,
    20,
    unpack_q4_1,
    q4_1_min
);
q8_kernel_x4!(
    q8_0_vnni_x4,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    dot_u8i8_vnni
);
