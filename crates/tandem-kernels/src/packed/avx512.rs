//! AVX-512 VNNI kernels on packed tiles: per 32-element block, eight `vpdpbusd` per
//! activation row, each multiplying four values of sixteen weight rows by one broadcast
//! activation dword; scales and minimums are applied to all sixteen rows at once, per block
//! in floats (Block32 formats) or per block as integers and per super-block in floats (the
//! k-quants).
//!
//! [`kernels`] is only called after the level was checked as supported, which is what makes
//! calling these `target_feature` functions sound.

use std::arch::x86_64::*;

use super::layout::TILE_ROWS;
use super::{min_pair_sums, ActBlock, PackedFormat, PackedKernels, Prefetch, Scheme};
use crate::dtype::{QK, QK_K};

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

/// The eight value registers of one block at `p` (see `layout`), as unsigned bytes; with
/// `hi16` (4-bit formats only), the high nibbles are left in place, sixteen times their value,
/// one AND each instead of a shift and an AND (see [`dot_block`]). Each of the block's lines
/// asks for the lines ahead of it as `prefetch` says ([`Prefetch::line`]) as it is loaded:
/// spread among the work, not bunched after the block.
#[inline(always)]
pub(super) unsafe fn values<const F: u8>(
    p: *const u8,
    hi16: bool,
    prefetch: Prefetch,
) -> [__m512i; 8] {
    let format = PackedFormat::from_id(F);
    let load = |i: usize| {
        prefetch.line(p.add(64 * i));
        _mm512_loadu_si512(p.add(64 * i) as *const __m512i)
    };
    // Q5's and Q3_K's top-bit masks: the block's last line, read outside `load`.
    let masks = p.add(format.block_value_bytes() - 64);
    if matches!(format.bits(), 3 | 5) {
        prefetch.line(masks);
    }
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
            add_masked(&mut v, masks, 4);
        }
        return v;
    }
    // `dot_block` reads the registers the same way, so a `hi16` for other formats would be a
    // wrong result, not a slower one.
    debug_assert!(!hi16 || format.bits() == 4);
    let low = _mm512_set1_epi8(0x0f);
    let high = _mm512_set1_epi8(0xf0u8 as i8);
    let mut v = [_mm512_setzero_si512(); 8];
    for k in 0..4 {
        let raw = load(k);
        v[k] = _mm512_and_si512(raw, low);
        v[4 + k] = if hi16 {
            _mm512_and_si512(raw, high)
        } else {
            _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low)
        };
    }
    if format.table() {
        // The nibbles are table indices: `vpshufb` looks up `u = value + 128` in each lane.
        let table = _mm_loadu_si128(crate::iq4::UNSIGNED.as_ptr() as *const __m128i);
        let table = _mm512_broadcast_i32x4(table);
        return v.map(|idx| _mm512_shuffle_epi8(table, idx));
    }
    match format.bits() {
        5 => add_masked(&mut v, masks, 0x10),
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

/// Sixteen f16 at `h` as f32.
#[inline(always)]
unsafe fn halves(h: *const u8) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(h as *const __m256i))
}

/// Sixteen bytes at `p` as i32 lanes (unsigned, or signed when `SIGNED`).
#[inline(always)]
pub(super) unsafe fn bytes_epi32<const SIGNED: bool>(p: *const u8) -> __m512i {
    let b = _mm_loadu_si128(p as *const __m128i);
    if SIGNED {
        _mm512_cvtepi8_epi32(b)
    } else {
        _mm512_cvtepu8_epi32(b)
    }
}

/// The activation dword `j` of `a` (values `4j..4j+4`) in every lane.
#[inline(always)]
unsafe fn act_dword(a: &ActBlock, j: usize) -> __m512i {
    _mm512_set1_epi32((a.qs.as_ptr() as *const i32).add(j).read_unaligned())
}

/// One activation row's integer dot products with a block's value registers `v`, on a chain
/// started at `init`. With `split`, the eight `vpdpbusd` form two dependency chains instead of
/// one (a lone row has nothing else to overlap their latency with). With `hi16` (values from
/// [`values`] with `hi16`), the chains are the low nibbles' and the high ones' at sixteen
/// times their value (at most 4 x 4 x 240 x 128 a lane, far inside i32), whose sum is a
/// multiple of 16 shifted back once: three operations fewer a block (four shifts out, one
/// in), 103-109 -> 109-117 GB/s for Q4_K rows in L2 on two Zen 4 threads. Integer sums, so
/// the result is the same bits every way.
#[inline(always)]
unsafe fn dot_block(
    split: bool,
    hi16: bool,
    v: &[__m512i; 8],
    a: &ActBlock,
    init: __m512i,
) -> __m512i {
    let mut i = init;
    if hi16 {
        let mut high = _mm512_setzero_si512();
        for j in 0..4 {
            i = _mm512_dpbusd_epi32(i, v[j], act_dword(a, j));
            high = _mm512_dpbusd_epi32(high, v[4 + j], act_dword(a, 4 + j));
        }
        _mm512_add_epi32(i, _mm512_srai_epi32::<4>(high))
    } else if split {
        let mut odd = _mm512_setzero_si512();
        for j in (0..8).step_by(2) {
            i = _mm512_dpbusd_epi32(i, v[j], act_dword(a, j));
            odd = _mm512_dpbusd_epi32(odd, v[j + 1], act_dword(a, j + 1));
        }
        _mm512_add_epi32(i, odd)
    } else {
        for (j, &v) in v.iter().enumerate() {
            i = _mm512_dpbusd_epi32(i, v, act_dword(a, j));
        }
        i
    }
}

/// One block's integer dot products with each of `R` activation rows, each chain started at
/// `init(row)`: the eight `vpdpbusd` of the rows interleaved in program order, so that R
/// chains are in flight at once instead of one row's eight-long chain.
#[inline(always)]
unsafe fn interleaved_dots<const R: usize>(
    v: &[__m512i; 8],
    a: &[&ActBlock; R],
    init: impl Fn(&ActBlock) -> i32,
) -> [__m512i; R] {
    let mut c: [__m512i; R] = std::array::from_fn(|r| _mm512_set1_epi32(init(a[r])));
    for (j, v) in v.iter().enumerate() {
        seq_macro::seq!(r in 0..8 {
            if r < R {
                c[r] = _mm512_dpbusd_epi32(c[r], *v, act_dword(a[r], j));
            }
        });
    }
    c
}

/// Sixteen rows of a Block32 format (one scale, and a minimum or an offset, per 32 elements)
/// against `R` activation rows: per block and row, eight `vpdpbusd` and one float step.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn block_rows<const R: usize, const F: u8>(
    tile: &[u8],
    acts: [&[ActBlock]; R],
    nb: usize,
) -> [__m512; R] {
    let format = PackedFormat::from_id(F);
    let mut acc = [_mm512_setzero_ps(); R];
    let mut macc = [_mm512_setzero_ps(); R];
    let mut p = tile.as_ptr();
    let prefetch = Prefetch::for_rows(R);
    // Decode's one or two rows: the high nibbles' own chain (see `dot_block`); not for the
    // table formats, whose nibbles are indices.
    let hi16 = R <= 2 && format.bits() == 4 && !format.table();
    for blk in 0..nb {
        let d = halves(p);
        let min = if format.float_min() {
            halves(p.add(2 * TILE_ROWS))
        } else {
            _mm512_setzero_ps()
        };
        prefetch.header(p, format.header_bytes());
        p = p.add(format.header_bytes());
        let v = values::<F>(p, hi16, prefetch);
        if R > 2 {
            // The rows' chains interleaved in program order, R in flight at once.
            let a: [&ActBlock; R] = std::array::from_fn(|r| acts[r].get_unchecked(blk));
            let c = interleaved_dots(&v, &a, |a| {
                let sum = a.half_sums[0] + a.half_sums[1];
                sum.wrapping_mul(-format.int_offset())
            });
            seq_macro::seq!(r in 0..8 {
                if r < R {
                    let da = _mm512_set1_ps(a[r].d);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c[r]), _mm512_mul_ps(d, da), acc[r]);
                    if format.float_min() {
                        macc[r] = _mm512_fmadd_ps(min, _mm512_set1_ps(a[r].s), macc[r]);
                    }
                }
            });
            p = p.add(format.block_value_bytes());
            continue;
        }
        // Unrolled by hand: LLVM kept some formats' eight-row loops rolled, with every
        // accumulator in memory (a load and a store per row and block).
        seq_macro::seq!(r in 0..8 {
            if r < R {
                let a = acts[r].get_unchecked(blk);
                // The chain starts at -offset * sum(a): the integer part of the minimum.
                let sum = a.half_sums[0] + a.half_sums[1];
                let init = _mm512_set1_epi32(sum.wrapping_mul(-format.int_offset()));
                let i = dot_block(R <= 2, hi16, &v, a, init);
                let da = _mm512_set1_ps(a.d);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(d, da), acc[r]);
                if format.float_min() {
                    macc[r] = _mm512_fmadd_ps(min, _mm512_set1_ps(a.s), macc[r]);
                }
            }
        });
        p = p.add(format.block_value_bytes());
    }
    std::array::from_fn(|r| _mm512_add_ps(acc[r], macc[r]))
}

/// Sixteen rows of a k-quant against `R` activation rows (quantized one scale per
/// super-block): per block and row, the `vpdpbusd` chain(s) times the block's (or each half's)
/// integer scales added to an integer sum; per super-block and row, one float step, and for
/// the formats with minimums, their products with the activation sums by `vpdpwssd` on
/// pairs of blocks (or halves) and a second float step.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn super_rows<const R: usize, const F: u8>(
    tile: &[u8],
    acts: [&[ActBlock]; R],
    nb: usize,
) -> [__m512; R] {
    let format = PackedFormat::from_id(F);
    let scheme = format.scheme();
    let blocks = QK_K / QK;
    let rows = TILE_ROWS;
    let mut acc = [_mm512_setzero_ps(); R];
    let mut p = tile.as_ptr();
    let prefetch = Prefetch::for_rows(R);
    // Decode's one or two rows: the high nibbles' own chain (see `dot_block`); not for the
    // table formats, whose nibbles are indices.
    let hi16 = R <= 2 && format.bits() == 4 && !format.table();
    // Q4_K's batches: its values centered at 8 (see the `Scheme::K32 if centered` arm).
    let centered = !hi16 && scheme == Scheme::K32 && format.bits() == 4;
    // Q6_K: its values centered at 32, a quarter block at a time (see that arm).
    let quarters = format == PackedFormat::Q6_K;
    for s in 0..nb / blocks {
        let h = p;
        prefetch.header(h, format.header_bytes());
        p = p.add(format.header_bytes());
        let mut isum = [_mm512_setzero_si512(); R];
        for bi in 0..blocks {
            let blk = s * blocks + bi;
            let v = values::<F>(p, hi16, prefetch);
            match scheme {
                Scheme::K32 if centered => {
                    // The values taken as `q - 8` (the chain starts at -8 * sum(a)), so a
                    // block's sum (at most 32 x 8 x 127 in size) fits 16 bits and `vpdpwssd`
                    // against the scale in each dword's low half applies it: one operation
                    // on the multiply ports instead of `vpmulld`'s two. The 8 * scale * sum(a)
                    // this leaves out is added per super-block below. One chain a row, the
                    // rows interleaved, so that R chains are in flight at once.
                    let sc = bytes_epi32::<false>(h.add(4 * rows + rows * bi));
                    let a: [&ActBlock; R] = std::array::from_fn(|r| acts[r].get_unchecked(blk));
                    let c = interleaved_dots(&v, &a, |a| a.neg8_sum);
                    seq_macro::seq!(r in 0..8 {
                        if r < R {
                            isum[r] = _mm512_dpwssd_epi32(isum[r], c[r], sc);
                        }
                    });
                }
                Scheme::K32 => {
                    let sc = bytes_epi32::<false>(h.add(4 * rows + rows * bi));
                    seq_macro::seq!(r in 0..8 {
                        if r < R {
                            let a = acts[r].get_unchecked(blk);
                            let zero = _mm512_setzero_si512();
                            let i = dot_block(R <= 2, hi16, &v, a, zero);
                            isum[r] = _mm512_add_epi32(isum[r], _mm512_mullo_epi32(i, sc));
                        }
                    });
                }
                Scheme::K16 { .. } if quarters => {
                    // Q6_K: each quarter's chain starts at -32 * sum(a) (values taken as
                    // `q - 32`), so its sum (at most 8 x 32 x 127 in size) fits 16 bits and
                    // `vpdpwssd` against the half's scale in each dword's low half applies it:
                    // four operations on the multiply ports a row and block instead of two
                    // `vpmulld` (four), two adds and the chains' two broadcast starts.
                    let at = h.add(2 * rows + 2 * rows * bi);
                    let low16 = _mm512_set1_epi32(0xffff);
                    let [lo, hi] =
                        [at, at.add(rows)].map(|q| _mm512_and_si512(bytes_epi32::<true>(q), low16));
                    let a: [&ActBlock; R] = std::array::from_fn(|r| acts[r].get_unchecked(blk));
                    for (q, sc) in [lo, lo, hi, hi].into_iter().enumerate() {
                        seq_macro::seq!(r in 0..8 {
                            if r < R {
                                let mut c = _mm512_set1_epi32(a[r].neg32_quarter_sums[q]);
                                c = _mm512_dpbusd_epi32(c, v[2 * q], act_dword(a[r], 2 * q));
                                c = _mm512_dpbusd_epi32(c, v[2 * q + 1], act_dword(a[r], 2 * q + 1));
                                isum[r] = _mm512_dpwssd_epi32(isum[r], c, sc);
                            }
                        });
                    }
                }
                Scheme::K16 { offset, mins } => {
                    let at = h.add(if mins { 4 } else { 2 } * rows + 2 * rows * bi);
                    let [lo, hi] = if mins {
                        let nib = _mm512_set1_epi32(0x0f);
                        [at, at.add(rows)].map(|q| _mm512_and_si512(bytes_epi32::<false>(q), nib))
                    } else {
                        [at, at.add(rows)].map(|q| bytes_epi32::<true>(q))
                    };
                    seq_macro::seq!(r in 0..8 {
                        if r < R {
                            let a = acts[r].get_unchecked(blk);
                            let init = |h: usize| {
                                _mm512_set1_epi32(a.half_sums[h].wrapping_mul(-offset))
                            };
                            let (mut l, mut u) = (init(0), init(1));
                            for j in 0..4 {
                                l = _mm512_dpbusd_epi32(l, v[j], act_dword(a, j));
                                u = _mm512_dpbusd_epi32(u, v[4 + j], act_dword(a, 4 + j));
                            }
                            let both = _mm512_add_epi32(
                                _mm512_mullo_epi32(l, lo),
                                _mm512_mullo_epi32(u, hi),
                            );
                            isum[r] = _mm512_add_epi32(isum[r], both);
                        }
                    });
                }
                Scheme::Block32 { .. } => unreachable!("Block32 formats run block_rows"),
            }
            p = p.add(format.block_value_bytes());
        }
        if centered {
            // The centering's 8 * scale * sum(a), by pairs of blocks: 8 * scale is at most
            // 504 and a block's sum at most 32 x 127, both 16-bit halves.
            for q in 0..blocks / 2 {
                let at = h.add(4 * rows + 2 * q * rows);
                let pair = _mm512_or_si512(
                    bytes_epi32::<false>(at),
                    _mm512_slli_epi32::<16>(bytes_epi32::<false>(at.add(rows))),
                );
                let pair8 = _mm512_slli_epi32::<3>(pair);
                for r in 0..R {
                    let sums = acts[r].get_unchecked(s * blocks + 2 * q).sum_pair;
                    isum[r] = _mm512_dpwssd_epi32(isum[r], pair8, _mm512_set1_epi32(sums));
                }
            }
        }
        super_step::<R, F>(h, &acts, s, &isum, &mut acc);
    }
    acc
}

/// Where a super-block's float step reads each activation row's scale and its sums against
/// the minimums: the rows' quantized blocks, or (AMX) a copy of just those numbers.
pub(super) trait RowSums {
    /// Row `r`'s activation scale in super-block `s`.
    ///
    /// # Safety
    /// The rows hold super-block `s` and row `r`.
    unsafe fn scale(&self, r: usize, s: usize) -> f32;
    /// Row `r`'s sums that minimum pair `q` of super-block `s` multiplies (see
    /// [`min_pair_sums`]).
    ///
    /// # Safety
    /// As for [`RowSums::scale`].
    unsafe fn min_pair(&self, r: usize, s: usize, q: usize, k32: bool) -> i32;
}

impl<const R: usize> RowSums for [&[ActBlock]; R] {
    #[inline(always)]
    unsafe fn scale(&self, r: usize, s: usize) -> f32 {
        self.get_unchecked(r).get_unchecked(s * (QK_K / QK)).d
    }

    #[inline(always)]
    unsafe fn min_pair(&self, r: usize, s: usize, q: usize, k32: bool) -> i32 {
        min_pair_sums(self.get_unchecked(r), s * (QK_K / QK), q, k32)
    }
}

/// Super-block `s`'s float step (header at `h`) for `R` activation rows: the integer sums
/// `isum` (block scales applied) times `d` and each row's activation scale, and for the
/// formats with minimums their products with the activation sums, into `acc`. Shared by the
/// `vpdpbusd` kernels and the AMX ones, so that both give the same bits.
#[inline(always)]
pub(super) unsafe fn super_step<const R: usize, const F: u8>(
    h: *const u8,
    acts: &impl RowSums,
    s: usize,
    isum: &[__m512i; R],
    acc: &mut [__m512; R],
) {
    let format = PackedFormat::from_id(F);
    let scheme = format.scheme();
    let blocks = QK_K / QK;
    let rows = TILE_ROWS;
    let d = halves(h);
    let da: [__m512; R] = std::array::from_fn(|r| _mm512_set1_ps(acts.scale(r, s)));
    for r in 0..R {
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r]), _mm512_mul_ps(d, da[r]), acc[r]);
    }
    if format.float_min() {
        // Pairs of minimums (blocks 2q and 2q + 1 for K32, the halves of block q for
        // Q2_K) as 16-bit lanes, against the activation sums they multiply.
        let k32 = scheme == Scheme::K32;
        let pairs = if k32 { blocks / 2 } else { blocks };
        let mut msum = [_mm512_setzero_si512(); R];
        for q in 0..pairs {
            let (mlo, mhi) = if k32 {
                let at = h.add(12 * rows + 2 * q * rows);
                (bytes_epi32::<false>(at), bytes_epi32::<false>(at.add(rows)))
            } else {
                let at = h.add(4 * rows + 2 * rows * q);
                let m = |q: *const u8| _mm512_srli_epi32::<4>(bytes_epi32::<false>(q));
                (m(at), m(at.add(rows)))
            };
            let mp = _mm512_or_si512(mlo, _mm512_slli_epi32::<16>(mhi));
            for (r, m) in msum.iter_mut().enumerate() {
                let sums = acts.min_pair(r, s, q, k32);
                *m = _mm512_dpwssd_epi32(*m, mp, _mm512_set1_epi32(sums));
            }
        }
        let nmin = neg(halves(h.add(2 * rows)));
        for r in 0..R {
            acc[r] = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(msum[r]),
                _mm512_mul_ps(nmin, da[r]),
                acc[r],
            );
        }
    }
}

/// `-x`, by flipping the sign bits.
#[inline(always)]
unsafe fn neg(x: __m512) -> __m512 {
    _mm512_castsi512_ps(_mm512_xor_si512(
        _mm512_castps_si512(x),
        _mm512_set1_epi32(i32::MIN),
    ))
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
    debug_assert!(R <= 8);
    debug_assert_eq!(tile.len(), format.tile_bytes(nb * QK));
    debug_assert!(acts.iter().all(|a| a.len() == nb));
    let res = if format.super_len() == QK_K {
        super_rows::<R, F>(tile, acts, nb)
    } else {
        block_rows::<R, F>(tile, acts, nb)
    };
    for (r, x) in res.iter().enumerate() {
        _mm512_storeu_ps(out.add(r * stride), *x);
    }
}

pub(super) fn kernels(format: PackedFormat) -> PackedKernels {
    super::kernel_set!(rows, format)
}
