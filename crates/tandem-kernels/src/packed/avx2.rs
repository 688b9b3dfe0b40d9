//! AVX2 kernels on packed tiles, for CPUs without AVX-512 VNNI: a half-tile is eight rows, one
//! 256-bit register per value register; one activation row runs against both halves at once,
//! more rows half by half; the dot products go through `vpmaddubsw` + `vpmaddwd` in place of
//! `vpdpbusd`. The float work follows the VNNI kernel
//! and the scalar reference operation for operation, so all three agree bit for bit.
//!
//! [`kernels`] is only called after AVX2/FMA/F16C were checked as supported, which is what
//! makes calling these `target_feature` functions sound.

use std::arch::x86_64::*;

use super::layout::TILE_ROWS;
use super::{min_pair_sums, pair_i16, ActBlock, PackedFormat, PackedKernels, Prefetch, Scheme};
use crate::dtype::{QK, QK_K};

/// Rows per half-tile.
const HALF: usize = TILE_ROWS / 2;

/// The 32 bits of `m` as bytes: 0xff where the bit is set.
#[inline(always)]
unsafe fn bits_to_bytes(m: u32) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(m as i32),
        _mm256_setr_epi64x(
            0,
            0x0101_0101_0101_0101,
            0x0202_0202_0202_0202,
            0x0303_0303_0303_0303,
        ),
    );
    let select = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select)
}

/// Register `i` of the block's values at `p` for half `h` of the tile.
#[inline(always)]
unsafe fn load(p: *const u8, h: usize, i: usize) -> __m256i {
    _mm256_loadu_si256(p.add(64 * i + 32 * h) as *const __m256i)
}

/// The top bit (`bit`: Q5 16, Q3_K 4) of value register `4 * high + k` for half `h`, from
/// the masks after the block's low bits (at `2k + high`).
#[inline(always)]
unsafe fn top_bit(
    p: *const u8,
    format: PackedFormat,
    h: usize,
    k: usize,
    high: bool,
    bit: i8,
) -> __m256i {
    let masks = p.add(format.block_value_bytes() - 64);
    let m = (masks.add(8 * (2 * k + high as usize) + 4 * h) as *const u32).read_unaligned();
    _mm256_and_si256(bits_to_bytes(m), _mm256_set1_epi8(bit))
}

/// Value register `j` of the block at `p` for half `h` of the tile, as unsigned bytes (the table
/// formats' indices looked up).
///
/// Written without closures: a closure has no target features, and where the compiler does
/// not inline it (the incremental test profile) every intrinsic in it becomes a call.
#[inline(always)]
unsafe fn value<const F: u8>(p: *const u8, h: usize, j: usize) -> __m256i {
    let format = PackedFormat::from_id(F);
    if format.bits() == 8 {
        return load(p, h, j);
    }
    let (k, high) = (j % 4, j >= 4);
    if format.bits() <= 3 {
        let reg = load(p, h, j % 2);
        let reg = match j / 2 {
            0 => reg,
            1 => _mm256_srli_epi16::<2>(reg),
            2 => _mm256_srli_epi16::<4>(reg),
            _ => _mm256_srli_epi16::<6>(reg),
        };
        let v = _mm256_and_si256(reg, _mm256_set1_epi8(3));
        return if format.bits() == 3 {
            _mm256_or_si256(v, top_bit(p, format, h, k, high, 4))
        } else {
            v
        };
    }
    let raw = load(p, h, k);
    let raw = if high {
        _mm256_srli_epi16::<4>(raw)
    } else {
        raw
    };
    let v = _mm256_and_si256(raw, _mm256_set1_epi8(0x0f));
    if format.table() {
        let table = _mm_loadu_si128(crate::iq4::UNSIGNED.as_ptr() as *const __m128i);
        return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(table), v);
    }
    match format.bits() {
        5 => _mm256_or_si256(v, top_bit(p, format, h, k, high, 0x10)),
        6 => {
            let top = load(p, h, 4 + high as usize);
            let top = match k {
                0 => _mm256_slli_epi16::<4>(top),
                1 => _mm256_slli_epi16::<2>(top),
                2 => top,
                _ => _mm256_srli_epi16::<2>(top),
            };
            _mm256_or_si256(v, _mm256_and_si256(top, _mm256_set1_epi8(0x30)))
        }
        _ => v,
    }
}

/// Eight bytes at `p` as i32 lanes (unsigned, or signed when `SIGNED`).
#[inline(always)]
unsafe fn bytes_epi32<const SIGNED: bool>(p: *const u8) -> __m256i {
    let b = _mm_loadl_epi64(p as *const __m128i);
    if SIGNED {
        _mm256_cvtepi8_epi32(b)
    } else {
        _mm256_cvtepu8_epi32(b)
    }
}

/// Eight f16 at `p` as f32.
#[inline(always)]
unsafe fn halves(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// The activation dword `j` of `a` (values `4j..4j+4`) in every lane.
#[inline(always)]
unsafe fn act_dword(a: &ActBlock, j: usize) -> __m256i {
    _mm256_set1_epi32((a.qs.as_ptr() as *const i32).add(j).read_unaligned())
}

/// Value registers `2 * pairs.start .. 2 * pairs.end` of the block at `p` (half `h`) dotted with
/// one activation row: `vpmaddubsw` pair sums added in 16 bits to `start` (zero, or the
/// offset of centered values: see [`centered`]), then widened once by `vpmaddwd` with `w`'s
/// 16-bit lanes (ones for a plain dot product, else the block's scales). The caller keeps
/// every partial sum below 2^15 (see [`pair_span`]).
///
/// Called row by row: walking the value registers outermost for all rows at once, each
/// unpacked once, ran no faster for Q4_K and Q6_K and slower for Q5_K (62-64 -> 45-60
/// GMAC/s) on an AVX2-only Zen 3.
#[inline(always)]
unsafe fn dot_pairs<const F: u8>(
    p: *const u8,
    h: usize,
    pairs: std::ops::Range<usize>,
    a: &ActBlock,
    start: __m256i,
    w: __m256i,
) -> __m256i {
    let mut s16 = start;
    for pair in pairs {
        let (j0, j1) = (2 * pair, 2 * pair + 1);
        s16 = _mm256_add_epi16(
            s16,
            _mm256_add_epi16(
                _mm256_maddubs_epi16(value::<F>(p, h, j0), act_dword(a, j0)),
                _mm256_maddubs_epi16(value::<F>(p, h, j1), act_dword(a, j1)),
            ),
        );
    }
    _mm256_madd_epi16(s16, w)
}

/// Value register `j` of the block at `p` (half `h`) of an eight-bit format as signed values
/// `q = u - 128` and their magnitudes, for [`dot_signed`].
#[inline(always)]
unsafe fn signed_value<const F: u8>(p: *const u8, h: usize, j: usize) -> (__m256i, __m256i) {
    let q = _mm256_xor_si256(value::<F>(p, h, j), _mm256_set1_epi8(-128));
    (q, _mm256_abs_epi8(q))
}

/// Signed value register `j` ([`signed_value`]) dotted with one activation row, widened by
/// `vpmaddwd` with `w` as in [`dot_pairs`]. `u = q + 128` would overflow `vpmaddubsw`'s pair
/// sums, so the signed values are multiplied (|q| by the activation with q's sign): that is
/// already `sum(u * a) - 128 * sum(a)`, the offset the other formats subtract afterwards.
#[inline(always)]
unsafe fn dot_signed((q, aq): (__m256i, __m256i), j: usize, a: &ActBlock, w: __m256i) -> __m256i {
    _mm256_madd_epi16(
        _mm256_maddubs_epi16(aq, _mm256_sign_epi8(act_dword(a, j), q)),
        w,
    )
}

/// Pairs of value registers whose products [`dot_pairs`] may add in 16 bits: each pair adds
/// at most 2 x 2 x (2^bits - 1) x 127 (activations are within ±127), so b-bit values allow
/// 32767 / (508 x (2^b - 1)) pairs (4-bit: all four of a block, 5-bit two, 6-bit one), and no
/// more than share one scale (two for the formats with a scale per 16 elements). Fewer
/// `vpmaddwd` and `vpaddd` than a widening per pair, for any number of rows: with four rows
/// the 16-bit sums take four more of the sixteen registers, and still 64-row products ran
/// faster on an AVX2-only Zen 3 (one thread, 1536 x 1536: Q4_K 74-76 -> 76-83 GMAC/s, Q4_1
/// 70-73 -> 72-75; Q6_K and Q5_0, one pair either way, unchanged).
///
/// Values centered at 32 ([`centered`]) bound every partial sum of a chain started at its
/// offset by 2 x 32 x 127 per value register, so 6-bit values then span two pairs: a whole
/// scale's.
const fn pair_span(format: PackedFormat) -> usize {
    let top = if centered(format) {
        32
    } else {
        (1 << format.bits()) - 1
    };
    let by_bits = 32767 / (508 * top);
    let by_scale = match format.scheme() {
        Scheme::K16 { .. } => 2,
        _ => 4,
    };
    let span = if by_bits < by_scale {
        by_bits
    } else {
        by_scale
    };
    if span == 0 {
        1
    } else {
        span
    }
}

/// Whether the format's chains start at the offset of its values centered at 32
/// ([`ActBlock::neg32_lane_sums`]) instead of subtracting the offset after the scales: Q6_K,
/// whose 6-bit values otherwise allow one pair of registers a chain. Two pairs a chain
/// halve its `vpmaddwd` and `vpaddd` and drop the offset's own `vpmaddwd` and subtraction.
const fn centered(format: PackedFormat) -> bool {
    matches!(
        format.scheme(),
        Scheme::K16 {
            offset: 32,
            mins: false
        }
    )
}

/// Asks for the lines ahead of a block's `bytes` of values at `p`, each line by its own
/// prefetch as `prefetch` says ([`Prefetch::line`]): one prefetch per block left the hardware
/// prefetcher to find the rest (16.5 -> 21 GB/s on a 150 MB matrix on a Xeon).
#[inline(always)]
fn prefetch_values(prefetch: Prefetch, p: *const u8, bytes: usize) {
    for line in (0..bytes).step_by(64) {
        prefetch.line(p.wrapping_add(line));
    }
}

/// Halves `h0..h0 + NH` of a Block32 tile against `R` activation rows.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_half<const R: usize, const NH: usize, const F: u8>(
    tile: &[u8],
    h0: usize,
    acts: &[&[ActBlock]],
    nb: usize,
) -> [[__m256; R]; NH] {
    let format = PackedFormat::from_id(F);
    let mut acc = [[_mm256_setzero_ps(); R]; NH];
    let mut macc = [[_mm256_setzero_ps(); R]; NH];
    let mut p = tile.as_ptr();
    let prefetch = Prefetch::for_rows(R);
    let row = |field: *const u8, width: usize, x: usize| field.add(width * HALF * (h0 + x));
    for blk in 0..nb {
        // The first half asks for the block; the second finds it in L2.
        if h0 == 0 {
            prefetch.header(p, format.header_bytes());
        }
        let d: [__m256; NH] = std::array::from_fn(|x| halves(row(p, 2, x)));
        let min: [__m256; NH] = std::array::from_fn(|x| {
            if format.float_min() {
                halves(row(p.add(2 * TILE_ROWS), 2, x))
            } else {
                _mm256_setzero_ps()
            }
        });
        p = p.add(format.header_bytes());
        if h0 == 0 {
            prefetch_values(prefetch, p, format.block_value_bytes());
        }
        let mut isum = [[_mm256_setzero_si256(); R]; NH];
        if format.eight_bit() {
            for j in 0..8 {
                for (x, isum) in isum.iter_mut().enumerate() {
                    let v = signed_value::<F>(p, h0 + x, j);
                    for (t, a) in isum.iter_mut().zip(acts) {
                        let a = a.get_unchecked(blk);
                        let ones = _mm256_set1_epi16(1);
                        *t = _mm256_add_epi32(*t, dot_signed(v, j, a, ones));
                    }
                }
            }
        } else {
            let span = pair_span(format);
            for first in (0..4).step_by(span) {
                for (x, isum) in isum.iter_mut().enumerate() {
                    for (t, a) in isum.iter_mut().zip(acts) {
                        let a = a.get_unchecked(blk);
                        let (zero, ones) = (_mm256_setzero_si256(), _mm256_set1_epi16(1));
                        let dot = dot_pairs::<F>(p, h0 + x, first..first + span, a, zero, ones);
                        *t = _mm256_add_epi32(*t, dot);
                    }
                }
            }
        }
        for x in 0..NH {
            for r in 0..R {
                let a = acts.get_unchecked(r).get_unchecked(blk);
                let mut i = isum[x][r];
                if !format.eight_bit() && format.int_offset() != 0 {
                    let sum = a.half_sums[0] + a.half_sums[1];
                    let off = _mm256_set1_epi32(sum.wrapping_mul(format.int_offset()));
                    i = _mm256_sub_epi32(i, off);
                }
                let da = _mm256_set1_ps(a.d);
                acc[x][r] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(d[x], da), acc[x][r]);
                if format.float_min() {
                    macc[x][r] = _mm256_fmadd_ps(min[x], _mm256_set1_ps(a.s), macc[x][r]);
                }
            }
        }
        p = p.add(format.block_value_bytes());
    }
    std::array::from_fn(|x| std::array::from_fn(|r| _mm256_add_ps(acc[x][r], macc[x][r])))
}

/// Halves `h0..h0 + NH` of a k-quant tile against `R` activation rows (one activation scale
/// per super-block), as the VNNI kernel's `super_rows`: integer sums under the integer block
/// (or half-block) scales, one float step per super-block, the minimums by `vpmaddwd` on
/// pairs.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn super_half<const R: usize, const NH: usize, const F: u8>(
    tile: &[u8],
    h0: usize,
    acts: &[&[ActBlock]],
    nb: usize,
) -> [[__m256; R]; NH] {
    let format = PackedFormat::from_id(F);
    let scheme = format.scheme();
    let blocks = QK_K / QK;
    let mut acc = [[_mm256_setzero_ps(); R]; NH];
    let mut p = tile.as_ptr();
    let prefetch = Prefetch::for_rows(R);
    let row = |field: *const u8, width: usize, x: usize| field.add(width * HALF * (h0 + x));
    for s in 0..nb / blocks {
        let hd = p;
        // The first half asks for the super-block; the second finds it in L2.
        if h0 == 0 {
            prefetch.header(hd, format.header_bytes());
        }
        p = p.add(format.header_bytes());
        let mut isum = [[_mm256_setzero_si256(); R]; NH];
        for bi in 0..blocks {
            let blk = s * blocks + bi;
            if h0 == 0 {
                prefetch_values(prefetch, p, format.block_value_bytes());
            }
            for (x, isum) in isum.iter_mut().enumerate() {
                // The scales of elements 0..16 and 16..32 (equal for K32), and the offsets
                // the K16 formats subtract.
                let (sc, offset) = match scheme {
                    Scheme::K32 => {
                        let at = hd.add(4 * TILE_ROWS + TILE_ROWS * bi);
                        let sc = bytes_epi32::<false>(row(at, 1, x));
                        ([sc, sc], 0)
                    }
                    Scheme::K16 { offset, mins } => {
                        let at = hd.add(if mins { 4 } else { 2 } * TILE_ROWS + 2 * TILE_ROWS * bi);
                        let at = [row(at, 1, x), row(at.add(TILE_ROWS), 1, x)];
                        let sc = if mins {
                            let nib = _mm256_set1_epi32(0x0f);
                            at.map(|q| _mm256_and_si256(bytes_epi32::<false>(q), nib))
                        } else {
                            at.map(|q| bytes_epi32::<true>(q))
                        };
                        (sc, offset)
                    }
                    Scheme::Block32 { .. } => unreachable!("Block32 formats run block_half"),
                };
                // Each scale in both 16-bit halves of its lane: `vpmaddwd` of the pair sums
                // with it applies the scale where a plain dot product would multiply by one.
                let sc16 = sc.map(|s| _mm256_blend_epi16::<0xaa>(s, _mm256_slli_epi32::<16>(s)));
                if format.eight_bit() {
                    // Registers 0..4 are elements 0..16, 4..8 elements 16..32.
                    for j in 0..8 {
                        let v = signed_value::<F>(p, h0 + x, j);
                        for (t, a) in isum.iter_mut().zip(acts) {
                            let a = a.get_unchecked(blk);
                            *t = _mm256_add_epi32(*t, dot_signed(v, j, a, sc16[j / 4]));
                        }
                    }
                    continue;
                }
                let span = pair_span(format);
                for first in (0..4).step_by(span) {
                    let w = sc16[first / 2];
                    for (t, a) in isum.iter_mut().zip(acts) {
                        let a = a.get_unchecked(blk);
                        let start = if centered(format) {
                            _mm256_set1_epi32(a.neg32_lane_sums[first / 2])
                        } else {
                            _mm256_setzero_si256()
                        };
                        let dot = dot_pairs::<F>(p, h0 + x, first..first + span, a, start, w);
                        *t = _mm256_add_epi32(*t, dot);
                    }
                }
                if offset != 0 && !centered(format) {
                    // sc * offset * sum(a) of both halves by one `vpmaddwd` (|sc * offset|
                    // fits 16 bits; the low half's product is masked, its lane's sign bits
                    // dropped).
                    let so = _mm256_or_si256(
                        _mm256_and_si256(
                            _mm256_mullo_epi16(sc[0], _mm256_set1_epi16(offset as i16)),
                            _mm256_set1_epi32(0xffff),
                        ),
                        _mm256_slli_epi32::<16>(_mm256_mullo_epi16(
                            sc[1],
                            _mm256_set1_epi16(offset as i16),
                        )),
                    );
                    for (t, a) in isum.iter_mut().zip(acts) {
                        let a = a.get_unchecked(blk);
                        let hs = _mm256_set1_epi32(pair_i16(a.half_sums[0], a.half_sums[1]));
                        *t = _mm256_sub_epi32(*t, _mm256_madd_epi16(so, hs));
                    }
                }
            }
            p = p.add(format.block_value_bytes());
        }
        let da: [__m256; R] =
            std::array::from_fn(|r| _mm256_set1_ps(acts.get_unchecked(r)[s * blocks].d));
        for x in 0..NH {
            let d = halves(row(hd, 2, x));
            for r in 0..R {
                acc[x][r] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(isum[x][r]),
                    _mm256_mul_ps(d, da[r]),
                    acc[x][r],
                );
            }
        }
        if format.float_min() {
            let k32 = scheme == Scheme::K32;
            let pairs = if k32 { blocks / 2 } else { blocks };
            for (x, acc) in acc.iter_mut().enumerate() {
                let mut msum = [_mm256_setzero_si256(); R];
                for q in 0..pairs {
                    let (mlo, mhi) = if k32 {
                        let at = hd.add(12 * TILE_ROWS + 2 * q * TILE_ROWS);
                        (
                            bytes_epi32::<false>(row(at, 1, x)),
                            bytes_epi32::<false>(row(at.add(TILE_ROWS), 1, x)),
                        )
                    } else {
                        let at = hd.add(4 * TILE_ROWS + 2 * TILE_ROWS * q);
                        let m = |q: *const u8| _mm256_srli_epi32::<4>(bytes_epi32::<false>(q));
                        (m(row(at, 1, x)), m(row(at.add(TILE_ROWS), 1, x)))
                    };
                    let mp = _mm256_or_si256(mlo, _mm256_slli_epi32::<16>(mhi));
                    for (t, a) in msum.iter_mut().zip(acts) {
                        let sums = min_pair_sums(a, s * blocks, q, k32);
                        *t = _mm256_add_epi32(*t, _mm256_madd_epi16(mp, _mm256_set1_epi32(sums)));
                    }
                }
                let nmin = _mm256_xor_ps(
                    halves(row(hd.add(2 * TILE_ROWS), 2, x)),
                    _mm256_set1_ps(-0.0),
                );
                for r in 0..R {
                    acc[r] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(msum[r]),
                        _mm256_mul_ps(nmin, da[r]),
                        acc[r],
                    );
                }
            }
        }
    }
    acc
}

/// Halves `h0..h0 + NH` of a tile against `R` activation rows, as eight floats per row and
/// half.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half<const R: usize, const NH: usize, const F: u8>(
    tile: &[u8],
    h0: usize,
    acts: &[&[ActBlock]],
    nb: usize,
) -> [[[f32; HALF]; R]; NH] {
    let res = if PackedFormat::from_id(F).super_len() == QK_K {
        super_half::<R, NH, F>(tile, h0, acts, nb)
    } else {
        block_half::<R, NH, F>(tile, h0, acts, nb)
    };
    let mut out = [[[0f32; HALF]; R]; NH];
    for x in 0..NH {
        for r in 0..R {
            _mm256_storeu_ps(out[x][r].as_mut_ptr(), res[x][r]);
        }
    }
    out
}

/// A whole tile against `R` activation rows: one row against both halves at once (each
/// activation dword broadcast once for sixteen weight rows, the tile read in one pass), more
/// rows at most four at a time and half by half (the register file has sixteen registers).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows<const R: usize, const F: u8>(
    tile: &[u8],
    acts: [&[ActBlock]; R],
    nb: usize,
    out: *mut f32,
    stride: usize,
) {
    debug_assert_eq!(tile.len(), PackedFormat::from_id(F).tile_bytes(nb * QK));
    debug_assert!(acts.iter().all(|a| a.len() == nb));
    for (c, chunk) in acts.chunks(4).enumerate() {
        let put = |h: usize, res: &[[f32; HALF]]| {
            for (q, r) in res.iter().enumerate() {
                let o = out.add((4 * c + q) * stride + HALF * h);
                (o as *mut [f32; HALF]).write_unaligned(*r);
            }
        };
        match chunk.len() {
            4 => (0..2).for_each(|h| put(h, &half::<4, 1, F>(tile, h, chunk, nb)[0])),
            2 => (0..2).for_each(|h| put(h, &half::<2, 1, F>(tile, h, chunk, nb)[0])),
            _ => {
                let both = half::<1, 2, F>(tile, 0, chunk, nb);
                (0..2).for_each(|h| put(h, &both[h]));
            }
        }
    }
}

pub(super) fn kernels(format: PackedFormat) -> PackedKernels {
    super::kernel_set!(rows, format)
}

/// The sums of the 16 signed bytes in each half of `qs` (a block's quantized activations): the
/// bytes made unsigned (+128) and summed by `vpsadbw` eight at a time, instead of two
/// reductions of the i32 lanes (0.285 -> 0.224 ns an element with a scale per block, 0.198 ->
/// 0.172 with one per 256 elements, on Zen 4).
#[inline(always)]
unsafe fn half_sums(qs: __m256i) -> [i32; 2] {
    let sad = _mm256_sad_epu8(
        _mm256_xor_si256(qs, _mm256_set1_epi8(i8::MIN)),
        _mm256_setzero_si256(),
    );
    // Lanes (u64): bytes 0-7, 8-15 | 16-23, 24-31, each +8 x 128.
    let pairs = _mm256_add_epi64(sad, _mm256_shuffle_epi32::<0b01_00_11_10>(sad));
    let lo = _mm256_castsi256_si128(pairs);
    let hi = _mm256_extracti128_si256::<1>(pairs);
    [_mm_cvtsi128_si32(lo) - 2048, _mm_cvtsi128_si32(hi) - 2048]
}

/// [`super::quantize_act`] with AVX2 (same rounding: to nearest, ties to even).
///
/// # Safety
/// AVX2 must be available.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_act(x: &[f32], out: &mut [ActBlock], group: usize) {
    debug_assert_eq!(out.len(), x.len() / QK);
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    for (blocks, xs) in out.chunks_mut(group).zip(x.chunks_exact(group * QK)) {
        let mut m = _mm256_setzero_ps();
        for c in xs.chunks_exact(8) {
            m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(c.as_ptr()), abs_mask));
        }
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        for (a, blk) in blocks.iter_mut().zip(xs.chunks_exact(QK)) {
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(blk.as_ptr().add(8 * i)));
            let q = v.map(|x| _mm256_cvtps_epi32(_mm256_mul_ps(x, id)));
            let bytes = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let bytes =
                _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(a.qs.as_mut_ptr() as *mut __m256i, bytes);
            let sums = half_sums(bytes);
            a.d = d;
            a.s = d * (sums[0] + sums[1]) as f32;
            a.half_sums = sums;
        }
    }
    super::finish_act_row(out);
}
