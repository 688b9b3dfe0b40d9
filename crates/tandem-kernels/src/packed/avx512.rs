//! AVX-512 VNNI kernels on packed tiles: per 32-element block, eight `vpdpbusd` per
//! activation row, each multiplying four values of sixteen weight rows by one broadcast
//! activation dword; scales and minimums are applied once per block to all sixteen rows.
//!
//! [`kernels`] is only called after the level was checked as supported, which is what makes
//! calling these `target_feature` functions sound.

use std::arch::x86_64::*;

use super::layout::TILE_ROWS;
use super::{ActBlock, PackedFormat, PackedKernels, Scheme};
use crate::dtype::QK;

/// How far ahead of the weight stream to prefetch.
const PREFETCH: usize = 8192;

/// Adds `bit` to the bytes of `v` whose bits are set in the top-bit masks at `masks` (Q5: bit
/// 4, Q3_K: bit 2), for value register `4 * half + k` at mask `2k + half`. A function, not a
/// closure: a closure does not inherit the caller's target features, and LLVM left it (and
/// the masked add inside) as out-of-line calls, a third of Q5_0 decode time.
#[inline(always)]
unsafe fn add_masked(v: &mut [__m512i; 8], masks: *const u8, bit: i8) {
    let masks = masks as *const u64;
    let b = _mm512_set1_epi8(bit);
    for k in 0..4 {
        for half in 0..2 {
            let m = masks.add(2 * k + half).read_unaligned();
            let r = &mut v[4 * half + k];
            *r = _mm512_mask_add_epi8(*r, m, *r, b);
        }
    }
}

/// The eight value registers of one block at `p` (see `layout`), as unsigned bytes.
#[inline(always)]
unsafe fn values<const F: u8>(p: *const u8) -> [__m512i; 8] {
    let format = PackedFormat::from_id(F);
    let load = |i: usize| _mm512_loadu_si512(p.add(64 * i) as *const __m512i);
    if format.bits() == 8 {
        return std::array::from_fn(load);
    }
    if format.bits() <= 3 {
        let three = _mm512_set1_epi8(3);
        let mut v = [_mm512_setzero_si512(); 8];
        for m in 0..2 {
            let reg = load(m);
            let fields = [
                reg,
                _mm512_srli_epi16::<2>(reg),
                _mm512_srli_epi16::<4>(reg),
                _mm512_srli_epi16::<6>(reg),
            ];
            for (t, f) in fields.into_iter().enumerate() {
                v[2 * t + m] = _mm512_and_si512(f, three);
            }
        }
        if format.bits() == 3 {
            add_masked(&mut v, p.add(format.block_value_bytes() - 64), 4);
        }
        return v;
    }
    let low = _mm512_set1_epi8(0x0f);
    let mut v = [_mm512_setzero_si512(); 8];
    for k in 0..4 {
        let raw = load(k);
        v[k] = _mm512_and_si512(raw, low);
        v[4 + k] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low);
    }
    match format.bits() {
        5 => add_masked(&mut v, p.add(format.block_value_bytes() - 64), 0x10),
        6 => {
            let top = _mm512_set1_epi8(0x30);
            for half in 0..2 {
                let h = load(4 + half);
                let shifted = [
                    _mm512_slli_epi16::<4>(h),
                    _mm512_slli_epi16::<2>(h),
                    h,
                    _mm512_srli_epi16::<2>(h),
                ];
                for (k, s) in shifted.into_iter().enumerate() {
                    let r = &mut v[4 * half + k];
                    *r = _mm512_or_si512(*r, _mm512_and_si512(s, top));
                }
            }
        }
        _ => {}
    }
    v
}

/// Sixteen bytes at `p` as f32 lanes (unsigned, or signed when `SIGNED`).
#[inline(always)]
unsafe fn bytes_ps<const SIGNED: bool>(p: *const u8) -> __m512 {
    let b = _mm_loadu_si128(p as *const __m128i);
    let i = if SIGNED {
        _mm512_cvtepi8_epi32(b)
    } else {
        _mm512_cvtepu8_epi32(b)
    };
    _mm512_cvtepi32_ps(i)
}

/// One block's float factors for the sixteen rows: the scale of the low and high 16 elements
/// (equal but for K16) and the minimum (of the low and high 16 for Q2_K).
struct BlockScales {
    lo: __m512,
    hi: __m512,
    min: __m512,
    min_hi: __m512,
}

/// One activation row's part of a block: the integer dot products of its 32 values with the
/// block's value registers `v`, scaled into `acc` (and `macc`). With `split`, the eight
/// `vpdpbusd` form two dependency chains instead of one (a lone row has nothing else to
/// overlap their latency with); integer sums, so the result is the same bits either way.
#[inline(always)]
unsafe fn row_block<const F: u8>(
    split: bool,
    v: &[__m512i; 8],
    s: &BlockScales,
    a: &ActBlock,
    acc: &mut __m512,
    macc: &mut __m512,
) {
    let format = PackedFormat::from_id(F);
    let q = a.qs.as_ptr() as *const i32;
    let bc = |j: usize| _mm512_set1_epi32(q.add(j).read_unaligned());
    // Chains start at -offset * sum(a): the integer part of the minimum.
    let init = |s: i32| match format.int_offset() {
        0 => _mm512_setzero_si512(),
        off => _mm512_set1_epi32(s.wrapping_mul(-off)),
    };
    let da = _mm512_set1_ps(a.d);
    if let Scheme::K16 { mins, .. } = format.scheme() {
        let (mut lo, mut hi) = (init(a.half_sums[0]), init(a.half_sums[1]));
        for j in 0..4 {
            lo = _mm512_dpbusd_epi32(lo, v[j], bc(j));
            hi = _mm512_dpbusd_epi32(hi, v[4 + j], bc(4 + j));
        }
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_mul_ps(s.lo, da), *acc);
        *macc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_mul_ps(s.hi, da), *macc);
        if mins {
            let hs = |i: usize| _mm512_set1_ps(a.d * a.half_sums[i] as f32);
            *acc = _mm512_fmadd_ps(s.min, hs(0), *acc);
            *macc = _mm512_fmadd_ps(s.min_hi, hs(1), *macc);
        }
    } else {
        let mut i = init(a.half_sums[0] + a.half_sums[1]);
        if split {
            let mut odd = _mm512_setzero_si512();
            for j in (0..8).step_by(2) {
                i = _mm512_dpbusd_epi32(i, v[j], bc(j));
                odd = _mm512_dpbusd_epi32(odd, v[j + 1], bc(j + 1));
            }
            i = _mm512_add_epi32(i, odd);
        } else {
            for (j, &v) in v.iter().enumerate() {
                i = _mm512_dpbusd_epi32(i, v, bc(j));
            }
        }
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(s.lo, da), *acc);
        if format.float_min() {
            *macc = _mm512_fmadd_ps(s.min, _mm512_set1_ps(a.s), *macc);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows<const R: usize, const F: u8>(
    tile: &[u8],
    acts: [&[ActBlock]; R],
    nb: usize,
    out: *mut f32,
    stride: usize,
) {
    let format = PackedFormat::from_id(F);
    let scheme = format.scheme();
    let blocks = format.super_len() / QK;
    debug_assert!(R <= 8);
    debug_assert_eq!(tile.len(), format.tile_bytes(nb * QK));
    debug_assert!(acts.iter().all(|a| a.len() == nb));
    let mut acc = [_mm512_setzero_ps(); R];
    let mut macc = [_mm512_setzero_ps(); R];
    let mut p = tile.as_ptr();
    let prefetch = crate::simd::prefetch_weights();
    let halves = |h: *const u8| _mm512_cvtph_ps(_mm256_loadu_si256(h as *const __m256i));
    for s in 0..nb / blocks {
        let h = p;
        let d = halves(h);
        // The second f16 field (Q4_1/Q5_1 minimums, k-quant dmin), once per super-block.
        let second = if format.float_min() {
            halves(h.add(2 * TILE_ROWS))
        } else {
            _mm512_setzero_ps()
        };
        p = p.add(format.header_bytes());
        for bi in 0..blocks {
            let blk = s * blocks + bi;
            // Every line of the block ahead (one per block left the hardware prefetcher to find
            // the rest: 16.5 -> 21 GB/s on a 150 MB matrix), where that pays (see
            // `prefetch_weights`). May point past the matrix: a prefetch never faults.
            if prefetch {
                for line in (0..format.block_value_bytes()).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + line) as *const i8);
                }
            }
            let v = values::<F>(p);
            let neg = |x: __m512| {
                _mm512_castsi512_ps(_mm512_xor_si512(
                    _mm512_castps_si512(x),
                    _mm512_set1_epi32(i32::MIN),
                ))
            };
            let scales = match scheme {
                Scheme::Block32 {
                    stored_min,
                    implied,
                } => {
                    let m = if stored_min {
                        second
                    } else {
                        _mm512_mul_ps(d, _mm512_set1_ps(implied))
                    };
                    BlockScales {
                        lo: d,
                        hi: d,
                        min: m,
                        min_hi: m,
                    }
                }
                Scheme::K32 => {
                    let sc = bytes_ps::<false>(h.add(4 * TILE_ROWS + TILE_ROWS * bi));
                    let mn = bytes_ps::<false>(h.add(12 * TILE_ROWS + TILE_ROWS * bi));
                    let m = neg(_mm512_mul_ps(second, mn));
                    let dw = _mm512_mul_ps(d, sc);
                    BlockScales {
                        lo: dw,
                        hi: dw,
                        min: m,
                        min_hi: m,
                    }
                }
                Scheme::K16 { mins: false, .. } => {
                    let sc = h.add(2 * TILE_ROWS + 2 * TILE_ROWS * bi);
                    BlockScales {
                        lo: _mm512_mul_ps(d, bytes_ps::<true>(sc)),
                        hi: _mm512_mul_ps(d, bytes_ps::<true>(sc.add(TILE_ROWS))),
                        min: _mm512_setzero_ps(),
                        min_hi: _mm512_setzero_ps(),
                    }
                }
                Scheme::K16 { mins: true, .. } => {
                    let sc = h.add(4 * TILE_ROWS + 2 * TILE_ROWS * bi);
                    let nib = _mm_set1_epi8(0x0f);
                    let split = |p: *const u8| {
                        let raw = _mm_loadu_si128(p as *const __m128i);
                        let f = |b: __m128i| _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
                        (
                            f(_mm_and_si128(raw, nib)),
                            f(_mm_and_si128(_mm_srli_epi16::<4>(raw), nib)),
                        )
                    };
                    let (sl, ml) = split(sc);
                    let (sh, mh) = split(sc.add(TILE_ROWS));
                    BlockScales {
                        lo: _mm512_mul_ps(d, sl),
                        hi: _mm512_mul_ps(d, sh),
                        min: neg(_mm512_mul_ps(second, ml)),
                        min_hi: neg(_mm512_mul_ps(second, mh)),
                    }
                }
            };
            // Unrolled by hand: LLVM kept the K16 formats' eight-row loop rolled, with every
            // accumulator in memory (a load and a store per row and block).
            seq_macro::seq!(r in 0..8 {
                if r < R {
                    let a = acts[r].get_unchecked(blk);
                    row_block::<F>(R <= 2, &v, &scales, a, &mut acc[r], &mut macc[r]);
                }
            });
            p = p.add(format.block_value_bytes());
        }
    }
    for r in 0..R {
        _mm512_storeu_ps(out.add(r * stride), _mm512_add_ps(acc[r], macc[r]));
    }
}

pub(super) fn kernels(format: PackedFormat) -> PackedKernels {
    super::kernel_set!(rows, format)
}

/// [`super::quantize_act`] with AVX-512 (same rounding: to nearest, ties to even).
///
/// # Safety
/// AVX-512F/BW must be available.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn quantize_act(x: &[f32], out: &mut [ActBlock]) {
    debug_assert_eq!(out.len(), x.len() / QK);
    let abs_mask = _mm512_set1_epi32(0x7fff_ffff);
    let abs = |v: __m512| _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), abs_mask));
    for (a, blk) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let lo = _mm512_loadu_ps(blk.as_ptr());
        let hi = _mm512_loadu_ps(blk.as_ptr().add(16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(abs(lo), abs(hi)));
        let d = amax / 127.0;
        let id = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, id));
        let qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, id));
        let sums = [_mm512_reduce_add_epi32(qlo), _mm512_reduce_add_epi32(qhi)];
        let qs = a.qs.as_mut_ptr() as *mut __m128i;
        _mm_storeu_si128(qs, _mm512_cvtepi32_epi8(qlo));
        _mm_storeu_si128(qs.add(1), _mm512_cvtepi32_epi8(qhi));
        a.d = d;
        a.s = d * (sums[0] + sums[1]) as f32;
        a.half_sums = sums;
    }
}
