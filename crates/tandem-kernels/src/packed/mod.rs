//! Weights repacked at load time into row tiles for wide integer dot products.
//!
//! ggml stores a matrix row by row, each 32- or 256-element block with its scales beside its
//! values, so a kernel reading one row at a time spends a scale multiply (and its loads) on
//! every 32 weights of every activation row. Here rows are interleaved [`TILE_ROWS`] at a
//! time: one 64-byte register holds four consecutive values of sixteen rows, so one
//! `vpdpbusd` with four broadcast activation bytes feeds sixteen row accumulators, and the
//! float work (scale, minimum) is done once per 32-element block for sixteen rows at once.
//! A tile's bytes are contiguous, read once per group of activation rows.
//!
//! Every format becomes unsigned values `u` with, per 32-element block `b` of row `r`,
//! `value = scale * u + min` (the K16 formats Q6_K, Q3_K, Q2_K and IQ4_XS: a scale per 16
//! elements and a constant offset or, for Q2_K, a minimum per 16 elements; the IQ4 formats'
//! `u` are their table's values + 128, looked up from 4-bit indices):
//! see [`layout`] for the byte order. The repacking is lossless: scales stay in their stored
//! f16 (or k-quant integer) form and are combined in f32 exactly as the dequantizer does.
//! Activations are quantized per 32 elements ([`ActBlock`]), in element order, with one scale
//! per block or, for the k-quants, per 256 elements ([`PackedFormat::act_group`]): their kernels
//! then sum a whole super-block's integer products, block scales applied as integers, before
//! one float step per super-block (ggml's Q8_K activations do the same). At the AMX level,
//! the k-quants' larger batches take those integer sums from AMX tiles instead (see [`amx`]).

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod layout;
mod scalar;

use std::ops::Range;

use crate::dtype::{DType, QK, QK_K};
use crate::matmul::{check_parts, MatRef};
use crate::mem::WeightBytes;
use crate::par::{for_each_range, for_each_task, read_ahead, read_ahead_next, Ahead, SyncPtr};
use crate::simd::SimdLevel;

pub use layout::TILE_ROWS;

/// The source format of a packed matrix.
#[allow(non_camel_case_types)] // ggml's names
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackedFormat {
    /// 4-bit values, offset -8 (`min = -8 d`).
    Q4_0,
    /// 4-bit values with a stored minimum.
    Q4_1,
    /// 5-bit values, offset -16.
    Q5_0,
    /// 5-bit values with a stored minimum.
    Q5_1,
    /// 8-bit values stored with +128 (`min = -128 d`).
    Q8_0,
    /// 4-bit values, 6-bit block scales and minimums under f16 super-block scales.
    Q4_K,
    /// Q4_K with a fifth bit.
    Q5_K,
    /// 6-bit values offset by 32, an 8-bit scale per 16 elements under an f16 super-block scale.
    Q6_K,
    /// 2-bit values, a 4-bit scale and minimum per 16 elements under f16 `d` and `dmin`.
    Q2_K,
    /// 3-bit values offset by 4, a 6-bit signed scale per 16 elements under an f16 `d`.
    Q3_K,
    /// 4-bit indices into ggml's 16-value IQ4 table (as `u = value + 128`), an f16 scale per 32.
    IQ4_NL,
    /// IQ4_NL's values under a signed scale per 32 elements and an f16 `d` per 256.
    IQ4_XS,
}

/// How a format's blocks are scaled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Scheme {
    /// An f16 scale per 32-element block and an f16 minimum (`stored`) or `implied * scale`.
    Block32 { stored_min: bool, implied: f32 },
    /// f16 `d`, `dmin` per 256 elements; per 32-element block `scale = d * sc`,
    /// `min = -dmin * mn` with 6-bit `sc`, `mn`.
    K32,
    /// f16 `d` per 256 elements; per 16 elements `scale = d * sc`,
    /// `value = scale * (u - offset)`, with a signed 8-bit `sc` or (`mins`: Q2_K) 4-bit `sc`
    /// and `mn` in one byte and `min = -dmin * mn` under a second f16 `dmin`.
    K16 { offset: i32, mins: bool },
}

impl PackedFormat {
    /// Every format, in const-parameter order.
    pub(crate) const ALL: [PackedFormat; 12] = [
        PackedFormat::Q4_0,
        PackedFormat::Q4_1,
        PackedFormat::Q5_0,
        PackedFormat::Q5_1,
        PackedFormat::Q8_0,
        PackedFormat::Q4_K,
        PackedFormat::Q5_K,
        PackedFormat::Q6_K,
        PackedFormat::Q2_K,
        PackedFormat::Q3_K,
        PackedFormat::IQ4_NL,
        PackedFormat::IQ4_XS,
    ];

    /// The format of a kernel's const parameter (its index in [`Self::ALL`]).
    pub(crate) const fn from_id(id: u8) -> PackedFormat {
        Self::ALL[id as usize]
    }

    /// The packed format of `dtype`, if it has one.
    pub fn of(dtype: DType) -> Option<PackedFormat> {
        Some(match dtype {
            DType::Q4_0 => PackedFormat::Q4_0,
            DType::Q4_1 => PackedFormat::Q4_1,
            DType::Q5_0 => PackedFormat::Q5_0,
            DType::Q5_1 => PackedFormat::Q5_1,
            DType::Q8_0 => PackedFormat::Q8_0,
            DType::Q4_K => PackedFormat::Q4_K,
            DType::Q5_K => PackedFormat::Q5_K,
            DType::Q6_K => PackedFormat::Q6_K,
            DType::Q2_K => PackedFormat::Q2_K,
            DType::Q3_K => PackedFormat::Q3_K,
            DType::IQ4_NL => PackedFormat::IQ4_NL,
            DType::IQ4_XS => PackedFormat::IQ4_XS,
            _ => return None,
        })
    }

    /// The stored format this one repacks.
    pub fn dtype(self) -> DType {
        match self {
            PackedFormat::Q4_0 => DType::Q4_0,
            PackedFormat::Q4_1 => DType::Q4_1,
            PackedFormat::Q5_0 => DType::Q5_0,
            PackedFormat::Q5_1 => DType::Q5_1,
            PackedFormat::Q8_0 => DType::Q8_0,
            PackedFormat::Q4_K => DType::Q4_K,
            PackedFormat::Q5_K => DType::Q5_K,
            PackedFormat::Q6_K => DType::Q6_K,
            PackedFormat::Q2_K => DType::Q2_K,
            PackedFormat::Q3_K => DType::Q3_K,
            PackedFormat::IQ4_NL => DType::IQ4_NL,
            PackedFormat::IQ4_XS => DType::IQ4_XS,
        }
    }

    /// Bits per stored value (the IQ4 formats: per table index).
    pub(crate) const fn bits(self) -> usize {
        match self {
            PackedFormat::Q4_0
            | PackedFormat::Q4_1
            | PackedFormat::Q4_K
            | PackedFormat::IQ4_NL
            | PackedFormat::IQ4_XS => 4,
            PackedFormat::Q5_0 | PackedFormat::Q5_1 | PackedFormat::Q5_K => 5,
            PackedFormat::Q6_K => 6,
            PackedFormat::Q8_0 => 8,
            PackedFormat::Q2_K => 2,
            PackedFormat::Q3_K => 3,
        }
    }

    /// Whether the stored 4-bit fields are indices into the IQ4 table (`iq4::UNSIGNED`)
    /// rather than the values themselves.
    pub(crate) const fn table(self) -> bool {
        matches!(self, PackedFormat::IQ4_NL | PackedFormat::IQ4_XS)
    }

    /// Whether the values span eight bits (`u = q + 128`), too wide for `vpmaddubsw`'s 16-bit
    /// pair sums: the AVX2 kernels multiply the signed `q` instead.
    #[cfg(target_arch = "x86_64")]
    pub(crate) const fn eight_bit(self) -> bool {
        self.bits() == 8 || self.table()
    }

    /// The scaling scheme.
    pub(crate) const fn scheme(self) -> Scheme {
        match self {
            PackedFormat::Q4_0 => Scheme::Block32 {
                stored_min: false,
                implied: -8.0,
            },
            PackedFormat::Q5_0 => Scheme::Block32 {
                stored_min: false,
                implied: -16.0,
            },
            PackedFormat::Q8_0 | PackedFormat::IQ4_NL => Scheme::Block32 {
                stored_min: false,
                implied: -128.0,
            },
            PackedFormat::Q4_1 | PackedFormat::Q5_1 => Scheme::Block32 {
                stored_min: true,
                implied: 0.0,
            },
            PackedFormat::Q4_K | PackedFormat::Q5_K => Scheme::K32,
            PackedFormat::Q6_K => Scheme::K16 {
                offset: 32,
                mins: false,
            },
            PackedFormat::Q3_K => Scheme::K16 {
                offset: 4,
                mins: false,
            },
            PackedFormat::Q2_K => Scheme::K16 {
                offset: 0,
                mins: true,
            },
            // The scale per 32 elements goes in both of its 16-element groups.
            PackedFormat::IQ4_XS => Scheme::K16 {
                offset: 128,
                mins: false,
            },
        }
    }

    /// The constant subtracted from every value (`-implied` of the Block32 formats whose minimum
    /// is a multiple of the scale, K16's offset): the kernels subtract `offset * sum(a)` in
    /// integers instead of adding a minimum term in floats.
    pub(crate) const fn int_offset(self) -> i32 {
        match self.scheme() {
            Scheme::Block32 {
                stored_min: false,
                implied,
            } => -(implied as i32),
            Scheme::K16 { offset, .. } => offset,
            _ => 0,
        }
    }

    /// Whether a per-block minimum is added in floats (Q4_1, Q5_1, Q4_K, Q5_K; Q2_K per 16).
    pub(crate) const fn float_min(self) -> bool {
        match self.scheme() {
            Scheme::Block32 { stored_min, .. } => stored_min,
            Scheme::K32 => true,
            Scheme::K16 { mins, .. } => mins,
        }
    }

    /// Elements per super-block (the span of one header).
    pub(crate) const fn super_len(self) -> usize {
        match self.scheme() {
            Scheme::Block32 { .. } => QK,
            _ => QK_K,
        }
    }

    /// Activation blocks of 32 that share one scale: 1, or for the k-quants the 8 of a
    /// super-block, so that their block scales can be applied to integer sums.
    pub const fn act_group(self) -> usize {
        self.super_len() / QK
    }

    /// Bytes of a tile's header for one super-block.
    pub(crate) const fn header_bytes(self) -> usize {
        match self.scheme() {
            Scheme::Block32 { stored_min, .. } => 2 * TILE_ROWS * if stored_min { 2 } else { 1 },
            // d, dmin; sc and mn per block.
            Scheme::K32 => 4 * TILE_ROWS + 2 * 8 * TILE_ROWS,
            // d (and dmin); sc (with mn) per 16 elements.
            Scheme::K16 { mins, .. } => (2 + 2 * mins as usize) * TILE_ROWS + 16 * TILE_ROWS,
        }
    }

    /// Bytes of a tile's values for one 32-element block.
    pub(crate) const fn block_value_bytes(self) -> usize {
        // Per row: bytes, nibbles or 2-bit fields, then the top bits (one per value for Q3_K
        // and the Q5 formats, two for Q6_K).
        let low = match self.bits() {
            8 => 32,
            2 | 3 => 8,
            _ => 16,
        };
        let extra = match self.bits() {
            3 | 5 => 4,
            6 => 8,
            _ => 0,
        };
        TILE_ROWS * (low + extra)
    }

    /// Bytes of one tile of a matrix with rows of `cols` elements.
    pub(crate) const fn tile_bytes(self, cols: usize) -> usize {
        let supers = cols / self.super_len();
        supers * (self.header_bytes() + self.super_len() / QK * self.block_value_bytes())
    }
}

/// A weight matrix in the packed layout (see the module docs); rows are padded with zero rows
/// to a whole number of tiles.
#[derive(Clone, Debug)]
pub struct PackedMat {
    /// Source format.
    pub format: PackedFormat,
    /// Rows (output features).
    pub rows: usize,
    /// Elements per row (input features).
    pub cols: usize,
    data: WeightBytes,
}

impl PackedMat {
    /// Repacks a matrix in a format with packed kernels; `None` for other formats.
    pub fn pack(w: &MatRef) -> Option<PackedMat> {
        let format = PackedFormat::of(w.dtype)?;
        Some(PackedMat {
            format,
            rows: w.rows,
            cols: w.cols,
            data: layout::pack(format, w),
        })
    }

    /// Tiles (of [`TILE_ROWS`] rows).
    pub fn tiles(&self) -> usize {
        self.rows.div_ceil(TILE_ROWS)
    }

    /// The bytes of tile `t`.
    pub fn tile(&self, t: usize) -> &[u8] {
        let tb = self.format.tile_bytes(self.cols);
        &self.data[t * tb..(t + 1) * tb]
    }

    /// The packed bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
}

/// 32 activations quantized to int8, in element order, with what the kernels need besides.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C, align(16))]
pub struct ActBlock {
    /// Quantized values: activation `e` is `d * qs[e]`.
    pub qs: [i8; QK],
    /// Scale.
    pub d: f32,
    /// `d * sum(qs)` (for the weight minimums).
    pub s: f32,
    /// The sums of `qs[..16]` and `qs[16..]` (for the k-quants' offsets and minimums under
    /// per-16 scales).
    pub half_sums: [i32; 2],
    /// `-8 * sum(qs)`: where a chain of products with 4-bit values starts when they are taken
    /// as centered at 8, so that a whole block's sum fits 16 bits (`avx512`'s Q4_K kernels).
    pub neg8_sum: i32,
    /// `sum(qs)` of this block and of the next one (0 for the last) as two 16-bit halves: the
    /// operand that pairs of per-block minimums (or scales) multiply by `vpdpwssd`.
    pub sum_pair: i32,
    /// `-32 *` the sums of `qs` in each quarter (eight values): where chains over a quarter
    /// start when 6-bit values are taken as centered at 32, so that each quarter's sum fits 16
    /// bits (`avx512`'s Q6_K kernels).
    pub neg32_quarter_sums: [i32; 4],
    /// `-32 *` the sums of each half (16 values) split by position in their dwords, as two
    /// 16-bit halves: the first two bytes of each dword, then the last two. Where the 16-bit
    /// `vpmaddubsw` chains over a half start when 6-bit values are taken as centered at 32
    /// (`avx2`'s Q6_K kernels), so that a whole half's sums fit 16 bits.
    pub neg32_lane_sums: [i32; 2],
}

/// Fills the fields of `out` that depend on more than one block's values, once `qs` and
/// `half_sums` are set.
pub(crate) fn finish_act_row(out: &mut [ActBlock]) {
    let sum = |a: &ActBlock| a.half_sums[0] + a.half_sums[1];
    for b in 0..out.len() {
        let next = out.get(b + 1).map_or(0, sum);
        let a = &mut out[b];
        a.neg8_sum = -8 * sum(a);
        a.sum_pair = pair_i16(sum(a), next);
        for (q, quarter) in a.qs.chunks_exact(QK / 4).enumerate() {
            a.neg32_quarter_sums[q] = -32 * quarter.iter().map(|&v| v as i32).sum::<i32>();
        }
        for (h, half) in a.qs.chunks_exact(QK / 2).enumerate() {
            let lane = |first: usize| -> i32 {
                let dwords = half.chunks_exact(4);
                -32 * dwords
                    .map(|d| d[first] as i32 + d[first + 1] as i32)
                    .sum::<i32>()
            };
            a.neg32_lane_sums[h] = pair_i16(lane(0), lane(2));
        }
    }
}

/// Two 16-bit integers as one dword, `lo` in the low half: a `vpdpwssd` / `vpmaddwd` operand.
#[inline(always)]
pub(crate) fn pair_i16(lo: i32, hi: i32) -> i32 {
    (lo & 0xffff) | (hi << 16)
}

/// The activation sums that pair `q` of a k-quant super-block's minimums multiply, as one
/// dword of two 16-bit halves: blocks `2q` and `2q + 1` of the super-block starting at block
/// `first` (K32), or the two halves of its block `q` (Q2_K).
///
/// # Safety
/// `a` holds the blocks read (`first + 2q + 1`, or `first + q`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn min_pair_sums(a: &[ActBlock], first: usize, q: usize, k32: bool) -> i32 {
    if k32 {
        a.get_unchecked(first + 2 * q).sum_pair
    } else {
        let x = a.get_unchecked(first + q);
        pair_i16(x.half_sums[0], x.half_sums[1])
    }
}

/// Quantizes one activation row (a multiple of `32 * group` long) into `out` (`len / 32`
/// blocks), each `group` consecutive blocks under one scale (see [`PackedFormat::act_group`]),
/// rounding to nearest, ties to even (as the SIMD twins' conversions round).
pub fn quantize_act(x: &[f32], out: &mut [ActBlock], group: usize) {
    debug_assert_eq!(out.len(), x.len() / QK);
    debug_assert!(out.len().is_multiple_of(group));
    for (blocks, xs) in out.chunks_mut(group).zip(x.chunks_exact(group * QK)) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (a, blk) in blocks.iter_mut().zip(xs.chunks_exact(QK)) {
            let mut sums = [0i32; 2];
            for (e, &v) in blk.iter().enumerate() {
                let q = (v * id).round_ties_even() as i32;
                sums[e / 16] += q;
                a.qs[e] = q as i8;
            }
            a.d = d;
            a.s = d * (sums[0] + sums[1]) as f32;
            a.half_sums = sums;
        }
    }
    finish_act_row(out);
}

/// Sixteen rows' dot products (one tile) with each of `R` activation rows: activation row
/// `q`'s sixteen results to `out + q * stride` (stored by the kernel where they go: copied out
/// of a returned array, they cost a memcpy call per row).
pub(crate) type TileRows<const R: usize> =
    unsafe fn(&[u8], [&[ActBlock]; R], usize, *mut f32, usize);

/// The kernels of one format at one SIMD level, for 1, 2, 4 and 8 activation rows.
#[derive(Clone, Copy)]
pub(crate) struct PackedKernels {
    pub one: TileRows<1>,
    pub two: TileRows<2>,
    pub four: TileRows<4>,
    pub eight: TileRows<8>,
}

/// The 1/2/4/8-row instances of a kernel `$rows::<R, FORMAT_ID>` for `$format`.
macro_rules! kernel_set {
    ($rows:ident, $format:expr) => {{
        macro_rules! set {
            ($f:literal) => {
                PackedKernels {
                    one: $rows::<1, $f>,
                    two: $rows::<2, $f>,
                    four: $rows::<4, $f>,
                    eight: $rows::<8, $f>,
                }
            };
        }
        match $format {
            PackedFormat::Q4_0 => set!(0),
            PackedFormat::Q4_1 => set!(1),
            PackedFormat::Q5_0 => set!(2),
            PackedFormat::Q5_1 => set!(3),
            PackedFormat::Q8_0 => set!(4),
            PackedFormat::Q4_K => set!(5),
            PackedFormat::Q5_K => set!(6),
            PackedFormat::Q6_K => set!(7),
            PackedFormat::Q2_K => set!(8),
            PackedFormat::Q3_K => set!(9),
            PackedFormat::IQ4_NL => set!(10),
            PackedFormat::IQ4_XS => set!(11),
        }
    }};
}
use kernel_set;

/// How far ahead of the weight stream the SIMD kernels prefetch.
#[cfg(target_arch = "x86_64")]
pub(crate) const PREFETCH: usize = 8192;

/// How far ahead the SIMD kernels move weights from L2 into L1 (see [`prefetch_line`]; the
/// AMX kernels the same, in their walk's order).
#[cfg(target_arch = "x86_64")]
pub(crate) const PREFETCH_L1: usize = 512;

/// How a kernel asks for the weight lines ahead of the one it loads (see [`prefetch_line`] and
/// [`prefetch_line_paced`]).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Prefetch {
    /// No software prefetch (`simd::prefetch_weights` is off).
    Off,
    /// [`prefetch_line`]: into L2 far ahead, then into L1 shortly before the load.
    Ahead,
    /// [`prefetch_line_paced`]: the one- and two-row kernels, whose work per line is small.
    Paced,
}

#[cfg(target_arch = "x86_64")]
impl Prefetch {
    /// The kind a kernel over `rows` activation rows uses on this CPU.
    pub(crate) fn for_rows(rows: usize) -> Prefetch {
        match (crate::simd::prefetch_weights(), rows <= 2) {
            (false, _) => Prefetch::Off,
            (true, true) => Prefetch::Paced,
            (true, false) => Prefetch::Ahead,
        }
    }

    /// Asks for the line ahead of `p` as this kind does (nothing for `Off`).
    #[inline(always)]
    pub(crate) fn line(self, p: *const u8) {
        match self {
            Prefetch::Off => {}
            Prefetch::Ahead => prefetch_line(p),
            Prefetch::Paced => prefetch_line_paced(p),
        }
    }

    /// Asks for every line that holds part of the `bytes` at `p`: a tile's headers, which the
    /// value loads' own prefetches step over (five of a Q4_K super-block's 37 lines). Only
    /// the paced kind does: with it, the 1.5B's decode matmuls streamed 29.2-31.9 GB/s with
    /// the headers asked for against 29.0-30.1 without (two threads, alternating; the 29.2 in
    /// a round whose plain read was slow too). The batched kernels, which keep a tile's lines
    /// far longer, showed no gain at four and sixteen rows.
    #[inline(always)]
    pub(crate) fn header(self, p: *const u8, bytes: usize) {
        if self != Prefetch::Paced {
            return;
        }
        let mut line = p.wrapping_sub(p as usize % 64);
        let end = p.wrapping_add(bytes);
        while line < end {
            self.line(line);
            line = line.wrapping_add(64);
        }
    }
}

/// Asks for the cache line [`PREFETCH`] bytes past `p` into L2, not L1 (`prefetcht1`), and
/// for the one [`PREFETCH_L1`] bytes past it, by then in L2, into L1 (`prefetcht0`). May point
/// past the matrix: a prefetch never faults.
///
/// Into L1 from memory, each prefetch holds one of the core's few L1 miss buffers for the whole
/// trip, and a full set stalls what comes behind it (so we read the Xeon's profile, which put
/// 60% of the Q4_K decode kernel's samples on its four bunched `prefetcht0`). Into L2, one
/// after each of the block's loads instead of all of them after the block, the 1.5B's decode
/// matmuls alone (`decode_matmuls`, MODEL=qwen1.5b) streamed 26.6-26.9 GB/s against 23.8-24.0
/// (AVX-512; AVX2 22.8-23.0 against 21.7-22.0), the whole decode 25.4-26.0 tok/s against
/// 23.1-23.3. The second, short hop into L1 (an L2 hit, so its buffer is soon free) then gave
/// 27.5-28.9 GB/s against 26.5-27.3 (AVX2 24.2-24.7 against 22.9-23.1), the whole decode
/// 27.6-28.0 tok/s against 26.1-26.3; 256 and 1,024 bytes ahead did as well as 512.
/// On AMD, T1 filling L2 only came with Zen 4 (earlier cores fill L1 for every hint; on a
/// Zen 3 not measured), and from Zen 4 on the kernels do not prefetch at all
/// (`simd::prefetch_weights`). The one- and two-row kernels have since moved to
/// [`prefetch_line_paced`], and the AMX kernels ask for the lines their walk across tiles
/// reaches (`amx::Ahead`); this one serves the batched VNNI and AVX2 kernels.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_line(p: *const u8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
    // SAFETY: a prefetch never faults, wherever it points.
    unsafe {
        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(PREFETCH) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_L1) as *const i8);
    }
}

/// Asks for the cache line [`PREFETCH`] bytes past `p` into L2 (`prefetcht1`), after four
/// `nop`s: the one- and two-row kernels' prefetch.
///
/// Those kernels do little work per line, so when a late line arrives they race through the
/// lines already in L1 and issue a burst of prefetches to memory. Spacing them by a few
/// instructions streamed the 1.5B's decode matmuls (`decode_matmuls`, MODEL=qwen1.5b, two
/// threads, alternating binaries on an Intel Xeon with AVX-512 VNNI) at 30.8-32.1 GB/s against
/// 27.6-28.5 with [`prefetch_line`], and one thread at 16.3-16.7 against 14.7-15.2. Four,
/// six, eight and twelve `nop`s did alike (with or without the second hop into L1), and so did
/// two L1 loads of a static in their place, so what helps is the spacing itself, not a port or
/// the code's alignment; prefetching every other line instead was far slower (23 GB/s). The
/// kernels lose at most ~2% on weights already in L2. Paced, the batched kernels gained
/// nothing (VNNI at 3-9 rows, AMX at sixteen), so they do not pace. The AVX2 kernels pace
/// their one and two rows as well: on the Xeon (`TANDEM_SIMD=avx2`) 24.6-25.5 -> 26.3-27.1
/// GB/s; on an AVX2-only Zen 3 both ways stream at its plain read's speed (two threads
/// 24.6-30.4 against 23.7-28.7 GB/s, one thread 14.8-17.7 against 13.6-17.8, alternating).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_line_paced(p: *const u8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
    // SAFETY: `nop`s touch nothing, and a prefetch never faults, wherever it points.
    unsafe {
        std::arch::asm!(
            "nop",
            "nop",
            "nop",
            "nop",
            options(nostack, preserves_flags)
        );
        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(PREFETCH) as *const i8);
    }
}

/// Whether packed kernels faster than the stored-format ones exist at `level`.
pub fn worth_packing(level: SimdLevel) -> bool {
    level >= SimdLevel::Avx2 && level.is_supported()
}

fn kernels(format: PackedFormat, level: SimdLevel) -> PackedKernels {
    #[cfg(target_arch = "x86_64")]
    if worth_packing(level) {
        return match level {
            SimdLevel::Avx512Vnni | SimdLevel::Amx => avx512::kernels(format),
            _ => avx2::kernels(format),
        };
    }
    let _ = level;
    scalar::kernels(format)
}

/// The activation quantizer for `level` ([`quantize_act`] or its SIMD twin).
pub fn act_quantizer(level: SimdLevel) -> fn(&[f32], &mut [ActBlock], usize) {
    #[cfg(target_arch = "x86_64")]
    if worth_packing(level) {
        // SAFETY: worth_packing checked the level's support (AVX-512 implies AVX2). The AVX2
        // quantizer also serves AVX-512: an AVX-512 twin (16 lanes, `vpmovdb` to bytes) took
        // 0.253 ns an element with a scale per block against its 0.224, and the same with one
        // per 256 elements.
        return |x, out, g| unsafe { avx2::quantize_act(x, out, g) };
    }
    let _ = level;
    quantize_act
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` with packed weights (see [`matmul_packed_many`]).
pub fn matmul_packed(x: &[f32], m: usize, w: &PackedMat, out: &mut [f32], level: SimdLevel) {
    matmul_packed_many(x, m, &[w], &mut [out], level)
}

/// `outs[i][m, n_i] = x[m, k] · ws[i][n_i, k]ᵀ` with packed weights, for matrices that read the
/// same activations (a layer's q/k/v, its gate/up): the activations are quantized once and
/// every matrix's tiles share one parallel loop (a decode step is hundreds of short loops, and
/// each costs a wake-up and a wait for the slowest thread). Each task takes a run of one
/// matrix's tiles, in groups that stay in L2, and runs the activation rows against each group
/// eight at a time; every row's result is computed by the same sequence of operations whatever
/// the number of rows beside it and whatever matrices share the call.
pub fn matmul_packed_many(
    x: &[f32],
    m: usize,
    ws: &[&PackedMat],
    outs: &mut [&mut [f32]],
    level: SimdLevel,
) {
    let Some(k) = ws.first().map(|w| w.cols) else {
        return;
    };
    packed_parts(
        x,
        m,
        ws,
        std::slice::from_ref(&(0..k)),
        Parts::Apart,
        outs,
        level,
    )
}

/// `out[p, m, n] = x[m, cols_p] · w[n, cols_p]ᵀ` for each part `p` of the input columns
/// (`parts` are consecutive and cover them; their bounds fall on `w`'s super-blocks): the
/// sums a tensor-parallel rank makes over its share of the columns, computed by the whole
/// model in the same parts so that both add the same numbers in the same order. Each part is
/// computed exactly as [`matmul_packed`] computes a matrix of those columns alone.
pub fn matmul_packed_parts(
    x: &[f32],
    m: usize,
    w: &PackedMat,
    parts: &[Range<usize>],
    out: &mut [f32],
    level: SimdLevel,
) {
    packed_parts(x, m, &[w], parts, Parts::Apart, &mut [out], level)
}

/// `out[m, n]` = the parts of [`matmul_packed_parts`] added one after another in part order
/// (as `tandem_collective::fold_parts` adds them), each tile's parts summed while they are in
/// L1: the whole model's result for a sum tensor-parallel ranks cut into those parts.
pub fn matmul_packed_summed(
    x: &[f32],
    m: usize,
    w: &PackedMat,
    parts: &[Range<usize>],
    out: &mut [f32],
    level: SimdLevel,
) {
    packed_parts(x, m, &[w], parts, Parts::Summed, &mut [out], level)
}

/// Whether a call's parts come back apart (`[parts, m, n]`) or summed (`[m, n]`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Parts {
    Apart,
    Summed,
}

/// [`matmul_packed_many`] with each matrix's sum cut into `parts` (see
/// [`matmul_packed_parts`]): `outs[i]` is `[parts.len(), m, n_i]`, or `[m, n_i]` summed.
fn packed_parts(
    x: &[f32],
    m: usize,
    ws: &[&PackedMat],
    parts: &[Range<usize>],
    how: Parts,
    outs: &mut [&mut [f32]],
    level: SimdLevel,
) {
    assert_eq!(ws.len(), outs.len(), "matmul: one output per matrix");
    let Some(k) = ws.first().map(|w| w.cols) else {
        return;
    };
    assert_eq!(x.len(), m * k, "matmul: x is not [{m}, {k}]");
    check_parts(parts, k, ws.iter().map(|w| w.format.super_len()));
    for (w, out) in ws.iter().zip(outs.iter()) {
        assert_eq!(
            w.cols, k,
            "matmul: matrices of one call share their input width"
        );
        let n = w.rows;
        let p = if how == Parts::Summed { 1 } else { parts.len() };
        assert_eq!(out.len(), p * m * n, "matmul: out is not [{p}, {m}, {n}]");
    }
    if m == 0 {
        return;
    }
    let nb = k / QK;
    // One quantized copy of the activations per scale grouping the matrices need (the
    // 0.5B's q/k/v mix Q5_0 with Q4_K, say).
    let mut groups: Vec<usize> = ws.iter().map(|w| w.format.act_group()).collect();
    groups.sort_unstable();
    groups.dedup();
    // The calling thread's buffer from its last call (every block is overwritten below): a
    // fresh one per call was zero-filled, page-faulted memory, 2.4% of a batched decode step.
    let mut scratch = ACT_SCRATCH.take();
    let len = m * nb * groups.len();
    if scratch.len() < len {
        scratch.resize(len, ActBlock::default());
    }
    let act = &mut scratch[..len];
    let act_ptr = SyncPtr(act.as_mut_ptr());
    let quantize = act_quantizer(level);
    // The AMX kernels (k-quants, enough rows) read the activations of the
    // k-quants' grouping as rows of contiguous int8, with copies of their scales and sums.
    let amx = amx_plans(ws, m, level);
    #[cfg(target_arch = "x86_64")]
    let (amx_group, want_rows) = (
        groups.iter().position(|&g| g == QK_K / QK),
        amx.iter().any(Option::is_some),
    );
    let mut amx_scratch = AMX_SCRATCH.take();
    #[cfg(target_arch = "x86_64")]
    if want_rows {
        let lines = amx::scratch_bytes(m, k).div_ceil(size_of::<Line>());
        amx_scratch.resize(lines, Line([0; 64]));
    }
    let amx_ptr = SyncPtr(amx_scratch.as_mut_ptr() as *mut u8);
    let row_tasks = m.div_ceil(8);
    for_each_task(row_tasks * groups.len(), |c| {
        let (g, c) = (c / row_tasks, c % row_tasks);
        for i in c * 8..(c * 8 + 8).min(m) {
            // SAFETY: row i's blocks of grouping g are written by this task only.
            let dst = unsafe { act_ptr.slice_mut((g * m + i) * nb, nb) };
            quantize(&x[i * k..(i + 1) * k], dst, groups[g]);
            #[cfg(target_arch = "x86_64")]
            if want_rows && amx_group == Some(g) {
                // SAFETY: row i's values and sums are written by this task only.
                unsafe { amx::copy_row(amx_ptr, m, k, i, dst) };
            }
        }
    });
    // The matrices' tiles as one index space, walked by each thread from its own share (see
    // `for_each_range`), in claims of `CLAIM_BYTES` of weights for one or two activation rows
    // and `BATCH_CLAIM_BYTES` for more.
    let starts: Vec<usize> = ws
        .iter()
        .scan(0, |acc, w| {
            let s = *acc;
            *acc += w.tiles();
            Some(s)
        })
        .collect();
    let tiles: usize = ws.iter().map(|w| w.tiles()).sum();
    let grain = claim_tiles(ws, m).max(amx_claim_tiles(&amx, m));
    let dsts: Vec<SyncPtr<f32>> = outs.iter_mut().map(|o| SyncPtr(o.as_mut_ptr())).collect();
    let sets: Vec<PackedKernels> = ws.iter().map(|w| kernels(w.format, level)).collect();
    let act = &*act;
    let acts: Vec<&[ActBlock]> = ws
        .iter()
        .map(|w| {
            let g = groups.iter().position(|&g| g == w.format.act_group());
            let g = g.expect("every matrix's grouping was quantized");
            &act[g * m * nb..(g + 1) * m * nb]
        })
        .collect();
    for_each_range(tiles, grain, |r| {
        // The range's part in each matrix it spans.
        for (wi, w) in ws.iter().enumerate() {
            let (lo, hi) = (r.start.max(starts[wi]), r.end.min(starts[wi] + w.tiles()));
            if lo < hi {
                let mine = lo - starts[wi]..hi - starts[wi];
                let amx = amx.get(wi).copied().flatten().map(|k| (k, amx_ptr));
                // SAFETY: the range's tiles are this call's only; rows are nb blocks; the
                // AMX scratch was filled for every AMX plan.
                unsafe { tile_run(w, &sets[wi], amx, acts[wi], m, parts, how, mine, dsts[wi]) }
            }
        }
    });
    ACT_SCRATCH.set(scratch);
    AMX_SCRATCH.set(amx_scratch);
}

/// The AMX kernels of an AMX-level call, per matrix: where the level is [`SimdLevel::Amx`],
/// the call has [`amx::MIN_ROWS`] rows or more, and the matrix is a k-quant; empty where no
/// matrix of the call can.
#[cfg(target_arch = "x86_64")]
fn amx_plans(ws: &[&PackedMat], m: usize, level: SimdLevel) -> Vec<Option<amx::Kernels>> {
    // Nothing to allocate for the calls that cannot use AMX (decode's one or two rows).
    if level != SimdLevel::Amx || m < amx::MIN_ROWS || !level.is_supported() {
        return Vec::new();
    }
    ws.iter().map(|w| amx::kernels(w.format)).collect()
}

#[cfg(not(target_arch = "x86_64"))]
fn amx_plans(_: &[&PackedMat], _: usize, _: SimdLevel) -> Vec<Option<AmxKernels>> {
    Vec::new()
}

/// Tiles a claim holds at least where the call runs AMX kernels: one kernel call's (see
/// `amx::tile_run`, which runs a claim's tiles in as few calls as it can).
#[cfg(target_arch = "x86_64")]
fn amx_claim_tiles(amx: &[Option<amx::Kernels>], m: usize) -> usize {
    if amx.iter().any(Option::is_some) {
        amx::call_tiles(m)
    } else {
        1
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn amx_claim_tiles(_: &[Option<AmxKernels>], _: usize) -> usize {
    1
}

#[cfg(target_arch = "x86_64")]
use amx::Kernels as AmxKernels;

/// Nothing: AMX is x86-64's.
#[cfg(not(target_arch = "x86_64"))]
#[derive(Clone, Copy)]
enum AmxKernels {}

/// Tiles a thread claims at a time in [`matmul_packed_many`] with `m` activation rows.
fn claim_tiles(ws: &[&PackedMat], m: usize) -> usize {
    let tile_bytes = ws.iter().map(|w| w.format.tile_bytes(w.cols)).max();
    let claim_bytes = if m <= 2 {
        CLAIM_BYTES
    } else {
        BATCH_CLAIM_BYTES
    };
    (claim_bytes / tile_bytes.unwrap_or(1).max(1)).max(1)
}

/// Says that [`matmul_packed_many`] over `ws` with `m` activation rows comes next, so that
/// pool threads idle before it (while the caller runs the norms, RoPE, the KV writes...)
/// read the start of their shares of the weights into their caches. Only worth it where the
/// matmul streams its weights from memory (one or two rows; more rows reuse each tile long
/// enough to hide its load); nothing is computed, and a wrong hint costs only bandwidth.
pub fn read_ahead_packed(ws: &[&PackedMat], m: usize) {
    if let Some(a) = ahead_of(ws, m) {
        read_ahead(a)
    }
}

/// [`read_ahead_packed`] from the start of the pool's next parallel loop on: said before a
/// matmul about the one after it.
pub fn read_ahead_packed_next(ws: &[&PackedMat], m: usize) {
    if let Some(a) = ahead_of(ws, m) {
        read_ahead_next(a)
    }
}

fn ahead_of(ws: &[&PackedMat], m: usize) -> Option<Ahead> {
    if m > 2 || ws.is_empty() {
        return None;
    }
    let mut ahead = Ahead::default();
    for w in ws {
        ahead.push(w.bytes().as_ptr(), w.format.tile_bytes(w.cols), w.tiles());
    }
    Some(ahead.with_grain(claim_tiles(ws, m)))
}

thread_local! {
    /// Quantized activations of [`matmul_packed_many`], kept between calls on each thread.
    static ACT_SCRATCH: std::cell::Cell<Vec<ActBlock>> = const { std::cell::Cell::new(Vec::new()) };
    /// The same activations as the AMX kernels read them (see `amx::copy_row`).
    static AMX_SCRATCH: std::cell::Cell<Vec<Line>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A cache line of scratch: the AMX kernels' tile loads and copies want 64-byte alignment.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Bytes of weight tiles one claim takes for one or two activation rows: a claim is a
/// compare-and-swap on the thread's own cache line, and a small one lets the other thread
/// take over the end of a slow share.
const CLAIM_BYTES: usize = 16 << 10;

/// The same for more rows, where every row runs against a claim's tiles while they are in
/// L2. Reference model, 64 KiB against 256 KiB in one process, alternating: prefill of 512
/// tokens +5-6%, 32 sequences decoding +2%, 32 KiB worse again; the 1.5B the same within 1%.
const BATCH_CLAIM_BYTES: usize = 64 << 10;

/// Bytes of weight tiles a task runs all activation rows against before moving on, so they
/// are read from memory once and then from L2 (which holds 1-2 MiB per core on the x86 parts
/// this targets).
const TILE_GROUP_BYTES: usize = 256 << 10;

/// Tiles `mine` of `w` against the `m` quantized activation rows `act`, into `dst` (`[parts,
/// m, n]`, or `[m, n]` summed): each part of the columns by its own kernel call on the tile's
/// bytes and the activations' blocks of those columns.
///
/// # Safety
/// `kern` must be `w`'s kernels for a supported level; `act` holds `m` rows of `w.cols / 32`
/// blocks; `parts` are checked by [`check_parts`]; `dst` points at `parts.len() * m * w.rows`
/// floats (`m * w.rows` summed) whose columns of tiles `mine` no other thread touches
/// meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_run(
    w: &PackedMat,
    kern: &PackedKernels,
    amx: Option<(AmxKernels, SyncPtr<u8>)>,
    act: &[ActBlock],
    m: usize,
    parts: &[Range<usize>],
    how: Parts,
    mine: std::ops::Range<usize>,
    dst: SyncPtr<f32>,
) {
    let (n, nb) = (w.rows, w.cols / QK);
    let group = (TILE_GROUP_BYTES / w.format.tile_bytes(w.cols).max(1)).max(1);
    // Bytes of a tile per super-block: its header and values together.
    let super_len = w.format.super_len();
    let super_bytes = w.format.tile_bytes(super_len);
    // Rows the AMX kernel takes, sixteen at a time; the rest below.
    #[cfg(target_arch = "x86_64")]
    let first = amx.map_or(0, |(k, scratch)| {
        amx::tile_run(w, k, scratch, m, parts, how, mine.clone(), dst)
    });
    #[cfg(not(target_arch = "x86_64"))]
    let first = amx.map_or(0, |(k, _)| match k {});
    let mut buffers = PartBuffers::new();
    for g in mine.clone().step_by(group) {
        let mut i = first;
        while i < m {
            let r = match m - i {
                8.. => 8,
                4..=7 => 4,
                2..=3 => 2,
                _ => 1,
            };
            for t in g..(g + group).min(mine.end) {
                let tile = w.tile(t);
                let at = CallAt {
                    m,
                    n,
                    i,
                    r,
                    j0: t * TILE_ROWS,
                };
                buffers.run(at, parts, how, dst, |cols, out, stride| {
                    let bytes = tile.get_unchecked(
                        cols.start / super_len * super_bytes..cols.end / super_len * super_bytes,
                    );
                    let blocks = cols.start / QK..cols.end / QK;
                    let row_act = |q: usize| {
                        let row = (i + q) * nb;
                        act.get_unchecked(row + blocks.start..row + blocks.end)
                    };
                    macro_rules! run {
                        ($kernel:expr) => {
                            $kernel(
                                bytes,
                                std::array::from_fn(row_act),
                                blocks.len(),
                                out,
                                stride,
                            )
                        };
                    }
                    match r {
                        8 => run!(kern.eight),
                        4 => run!(kern.four),
                        2 => run!(kern.two),
                        _ => run!(kern.one),
                    }
                });
            }
            i += r;
        }
    }
}

/// Where in a `[m, n]` result (per part, or summed) one kernel call's block of results goes:
/// rows `i..i + r` against the sixteen weight rows from `j0`.
#[derive(Clone, Copy)]
struct CallAt {
    m: usize,
    n: usize,
    i: usize,
    r: usize,
    j0: usize,
}

/// Most activation rows one kernel call takes (the AMX kernel's chunk of 128).
const MAX_CALL_ROWS: usize = 128;

/// A tile run's buffers for the results that do not go straight to the destination: a last
/// tile of fewer than sixteen rows, an AMX call's padded rows, and the parts of a summed
/// call. Uninitialized: the kernels write every element read back, and zeroing them was ~2%
/// of a decode step once tile runs became many short claims.
struct PartBuffers {
    edge: std::mem::MaybeUninit<[f32; MAX_CALL_ROWS * TILE_ROWS]>,
    sum: std::mem::MaybeUninit<[f32; MAX_CALL_ROWS * TILE_ROWS]>,
}

impl PartBuffers {
    fn new() -> PartBuffers {
        PartBuffers {
            edge: std::mem::MaybeUninit::uninit(),
            sum: std::mem::MaybeUninit::uninit(),
        }
    }

    /// Runs `kernel(cols, out, stride)` for each part of the columns, the kernel writing its
    /// `at.r` rows of sixteen results `stride` floats apart, and puts the results in `dst`
    /// (`[parts, m, n]`, or `[m, n]` summed in part order): the same sums in the same order
    /// whichever kernels ran.
    ///
    /// Rows from `m` on are dropped.
    ///
    /// # Safety
    /// `dst` holds what `how` says for `at`'s `m` and `n`, rows `at.i..at.i + at.r` (those under
    /// `m`) of columns `at.j0..` no other thread writes meanwhile; `at.r <= MAX_CALL_ROWS`.
    #[inline(always)]
    unsafe fn run(
        &mut self,
        at: CallAt,
        parts: &[Range<usize>],
        how: Parts,
        dst: SyncPtr<f32>,
        mut kernel: impl FnMut(&Range<usize>, *mut f32, usize),
    ) {
        let CallAt { m, n, i, r, j0 } = at;
        debug_assert!(r <= MAX_CALL_ROWS);
        let valid = (n - j0).min(TILE_ROWS);
        // Rows past `m` (an AMX call's padding) are computed into the buffers and dropped.
        let rows = r.min(m - i);
        let summed = how == Parts::Summed && parts.len() > 1;
        let (sum, edge) = (
            self.sum.as_mut_ptr() as *mut f32,
            self.edge.as_mut_ptr() as *mut f32,
        );
        for (p, cols) in parts.iter().enumerate() {
            let part_dst = match how {
                Parts::Apart => dst.0.add(p * m * n),
                Parts::Summed => dst.0,
            };
            let (out, stride) = match (summed, p) {
                (true, 0) => (sum, TILE_ROWS),
                (true, _) => (edge, TILE_ROWS),
                (false, _) if valid == TILE_ROWS && rows == r => (part_dst.add(i * n + j0), n),
                (false, _) => (edge, TILE_ROWS),
            };
            kernel(cols, out, stride);
            if summed {
                // The running sum, in part order.
                if p > 0 {
                    for e in 0..r * TILE_ROWS {
                        *sum.add(e) += *edge.add(e);
                    }
                }
                if p + 1 < parts.len() {
                    continue;
                }
            }
            let from = if summed { sum } else { edge };
            if summed || valid < TILE_ROWS || rows < r {
                for q in 0..rows {
                    let o = part_dst.add((i + q) * n + j0);
                    std::ptr::copy_nonoverlapping(from.add(q * TILE_ROWS), o, valid);
                }
            }
        }
    }
}
