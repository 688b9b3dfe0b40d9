//! AMX-INT8 tile products for the k-quants, sixteen activation rows at a time.
//!
//! AMX multiplies 16 x 64-byte tiles of int8 into 16 x 16 i32 sums held in a tile register,
//! ~6x the `vpdpbusd` rate, but the sums must go through memory to be scaled, and AMX stores do
//! not forward to vector loads: with a float scale per 32-element block (Q4_0, Q4_1, Q8_0...)
//! one 1 KiB store per 8,192 products made it no faster than the VNNI kernels (see
//! `docs/perf-notes.md`). The k-quants' block scales are integers, so here they are folded into
//! the weights: `w = (u - offset) * sc` per element (at most 4,096 in magnitude) is split into
//! an unsigned low byte and a signed high part, `w = lo + 256 * hi`, and two tile products,
//! `sum(a * lo)` and `sum(a * hi)`, accumulate over a whole 256-element super-block before one
//! store. `sum(a * lo) + 256 * sum(a * hi)` is exactly the integer sum the VNNI kernels build
//! block by block, and the same float step follows ([`super::avx512::super_step`]), so every
//! result has the same bits at every level.
//!
//! The weight planes are built from a tile's packed values once per tile and chunk of
//! [`AMX_CHUNK_ROWS`] activation rows, and serve each sixteen of them; so a call runs here only
//! from [`MIN_ROWS`] rows on. The activations are read as rows of contiguous int8 (a copy of
//! the quantized blocks' values, made once per matmul).

use std::arch::asm;
use std::arch::x86_64::*;
use std::ops::Range;

use super::avx512::{bytes_epi32, super_step, values};
use super::layout::TILE_ROWS;
use super::{ActBlock, CallAt, PackedFormat, PackedMat, PartBuffers, Parts, Scheme};
use crate::dtype::{QK, QK_K};
use crate::par::SyncPtr;

/// Activation rows per tile product.
pub(super) const ROWS: usize = 16;

/// Registers of one plane per super-block: 256 elements of sixteen rows.
const PLANE_REGS: usize = QK_K / 4;

/// The tile configuration (`ldtilecfg`'s 64-byte operand, palette 1): every tile 16 rows of 64
/// bytes (tmm0, tmm1 the low and high sums; tmm2-4 and tmm5-7 an activation tile and the two
/// weight planes, alternately per 64 elements).
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// This thread's tiles, configured while the value lives.
pub(super) struct Tiles(());

impl Tiles {
    /// Configures this thread's tiles.
    ///
    /// # Safety
    /// `SimdLevel::Amx` is supported (the CPU has AMX-INT8 and Linux granted its state).
    pub(super) unsafe fn configure() -> Tiles {
        let mut c = Config {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            c.rows[t] = 16;
            c.colsb[t] = 64;
        }
        // SAFETY: the caller checked AMX; `c` is a valid palette-1 configuration.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &c, options(nostack, readonly)) };
        Tiles(())
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured, so AMX is there; this returns them to their
        // initial state, and the thread's AMX state to unused.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// The two products of one super-block: `c[0]` += `a` (16 rows of 256 int8, `stride` bytes
/// apart) times the low plane `lo` (4 KiB), `c[1]` += `a` times the high plane `hi`, stored
/// as 16 rows of 16 i32 each.
///
/// # Safety
/// A [`Tiles`] of this thread is live; the pointers hold what is described.
#[inline(always)]
unsafe fn super_products(a: *const i8, stride: usize, lo: *const u8, hi: *const u8, c: *mut u8) {
    // SAFETY: per the caller's contract.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tileloadd tmm2, [{a} + {sa} * 1]",
            "tileloadd tmm3, [{lo} + {s64} * 1]",
            "tileloadd tmm4, [{hi} + {s64} * 1]",
            "tdpbsud tmm0, tmm2, tmm3",
            "tdpbssd tmm1, tmm2, tmm4",
            "tileloadd tmm5, [{a} + {sa} * 1 + 64]",
            "tileloadd tmm6, [{lo} + {s64} * 1 + 1024]",
            "tileloadd tmm7, [{hi} + {s64} * 1 + 1024]",
            "tdpbsud tmm0, tmm5, tmm6",
            "tdpbssd tmm1, tmm5, tmm7",
            "tileloadd tmm2, [{a} + {sa} * 1 + 128]",
            "tileloadd tmm3, [{lo} + {s64} * 1 + 2048]",
            "tileloadd tmm4, [{hi} + {s64} * 1 + 2048]",
            "tdpbsud tmm0, tmm2, tmm3",
            "tdpbssd tmm1, tmm2, tmm4",
            "tileloadd tmm5, [{a} + {sa} * 1 + 192]",
            "tileloadd tmm6, [{lo} + {s64} * 1 + 3072]",
            "tileloadd tmm7, [{hi} + {s64} * 1 + 3072]",
            "tdpbsud tmm0, tmm5, tmm6",
            "tdpbssd tmm1, tmm5, tmm7",
            "tilestored [{c} + {s64} * 1], tmm0",
            "tilestored [{c1} + {s64} * 1], tmm1",
            a = in(reg) a,
            sa = in(reg) stride,
            lo = in(reg) lo,
            hi = in(reg) hi,
            c = in(reg) c,
            c1 = in(reg) c.add(1024),
            s64 = in(reg) 64usize,
            options(nostack),
        )
    }
}

/// Activation rows from which a k-quant matmul runs on AMX: the weight planes are built once
/// per tile and call (about as many operations per block as the VNNI kernels spend on ten
/// activation rows), so they must serve several sixteen-row products. `packed_speed` (16,384
/// x 1,536, one thread) at 16 / 32 / 64 / 128 rows: Q4_K 136 / 184-199 / 232 / 238 GMAC/s
/// against the VNNI kernels' 158-174, Q6_K 146 / 211-217 / 239 / 266 against 127-139. At 16
/// rows Q6_K gains a little, but the LM head's shape ran slower (`docs/perf-notes.md`).
pub(super) const MIN_ROWS: usize = 32;

/// One format's AMX kernels: the planes of a tile and the tile against sixteen rows.
#[derive(Clone, Copy)]
pub(super) struct Kernels {
    /// Builds the weight planes of `nb` blocks of a tile (see [`planes`]).
    pub planes: unsafe fn(&[u8], usize, &mut Vec<__m512i>),
    /// Sixteen activation rows against a tile (see [`rows`]).
    pub rows: Rows,
}

/// See [`rows`].
pub(super) type Rows =
    unsafe fn(&[__m512i], &[u8], *const i8, usize, [&[ActBlock]; ROWS], usize, *mut f32, usize);

/// The AMX kernels of `format`, for the k-quants (the formats whose block scales are integers).
pub(super) fn kernels(format: PackedFormat) -> Option<Kernels> {
    macro_rules! set {
        ($f:literal) => {
            Kernels {
                planes: planes::<$f>,
                rows: rows::<$f>,
            }
        };
    }
    Some(match format {
        PackedFormat::Q4_K => set!(5),
        PackedFormat::Q5_K => set!(6),
        PackedFormat::Q6_K => set!(7),
        PackedFormat::Q2_K => set!(8),
        PackedFormat::Q3_K => set!(9),
        PackedFormat::IQ4_XS => set!(11),
        _ => return None,
    })
}

/// The weight planes of the first `nb` blocks of `tile` into `out`: per super-block the low
/// plane's 64 registers, then the high plane's, each register four consecutive elements of
/// sixteen rows (the packed values' order), holding `lo` and `hi` of `w = (u - offset) * sc`.
/// The tile's lines are prefetched as they are read, as the VNNI kernels do
/// (`simd::prefetch_weights`): the LM head's shape (151,936 x 1,536, two threads) at 32 / 64
/// rows ran Q6_K at 284-303 / 369-394 GMAC/s against 269-275 / 322-363 without.
///
/// # Safety
/// AVX-512 BW is supported; `tile` holds `nb` blocks of format `F`, a k-quant.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn planes<const F: u8>(tile: &[u8], nb: usize, out: &mut Vec<__m512i>) {
    let format = PackedFormat::from_id(F);
    let blocks = QK_K / QK;
    let rows = TILE_ROWS;
    // Every register is written below: only grow the buffer, never clear it (zeroing it
    // doubled the stores of a plane build).
    out.resize(nb / blocks * 2 * PLANE_REGS, _mm512_setzero_si512());
    let low_byte = _mm512_set1_epi16(0x00ff);
    let high_byte = _mm512_set1_epi16(0xff00u16 as i16);
    let prefetch = crate::simd::prefetch_weights();
    let mut p = tile.as_ptr();
    for s in 0..nb / blocks {
        let h = p;
        p = p.add(format.header_bytes());
        let (lo_plane, hi_plane) =
            out[s * 2 * PLANE_REGS..(s + 1) * 2 * PLANE_REGS].split_at_mut(PLANE_REGS);
        for bi in 0..blocks {
            let v = values::<F>(p, false, prefetch);
            // Each register's scale per row (i32 lanes) and the offset its values carry.
            let (scales, offset) = match format.scheme() {
                Scheme::K32 => {
                    let sc = bytes_epi32::<false>(h.add(4 * rows + rows * bi));
                    ([sc, sc], 0)
                }
                Scheme::K16 { offset, mins } => {
                    let at = h.add(if mins { 4 } else { 2 } * rows + 2 * rows * bi);
                    let halves = if mins {
                        let nib = _mm512_set1_epi32(0x0f);
                        [at, at.add(rows)].map(|q| _mm512_and_si512(bytes_epi32::<false>(q), nib))
                    } else {
                        [at, at.add(rows)].map(|q| bytes_epi32::<true>(q))
                    };
                    (halves, offset)
                }
                Scheme::Block32 { .. } => unreachable!("AMX kernels are the k-quants'"),
            };
            let off = _mm512_set1_epi16(offset as i16);
            for (j, &reg) in v.iter().enumerate() {
                let sc = scales[j / 4];
                // The row's scale in both 16-bit halves of its dword.
                let sc16 = _mm512_or_si512(
                    _mm512_and_si512(sc, _mm512_set1_epi32(0xffff)),
                    _mm512_slli_epi32::<16>(sc),
                );
                let even = _mm512_sub_epi16(_mm512_and_si512(reg, low_byte), off);
                let odd = _mm512_sub_epi16(_mm512_srli_epi16::<8>(reg), off);
                let pe = _mm512_mullo_epi16(even, sc16);
                let po = _mm512_mullo_epi16(odd, sc16);
                let lo =
                    _mm512_or_si512(_mm512_and_si512(pe, low_byte), _mm512_slli_epi16::<8>(po));
                let hi = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srai_epi16::<8>(pe), low_byte),
                    _mm512_and_si512(po, high_byte),
                );
                // Block bi's register j is row 8 * (bi % 2) + j of 64-element chunk bi / 2.
                let at = 16 * (bi / 2) + 8 * (bi % 2) + j;
                lo_plane[at] = lo;
                hi_plane[at] = hi;
            }
            p = p.add(format.block_value_bytes());
        }
    }
}

/// Sixteen activation rows against a tile of format `F` (a k-quant), from the tile's weight
/// planes `planes` (from [`planes`]): `act` is row 0's first int8, rows `stride` bytes apart,
/// and `acts` the same rows' quantized blocks (scales and sums); results as the VNNI kernels
/// write them, row `q` at `out + q * out_stride`.
///
/// # Safety
/// A [`Tiles`] of this thread is live; the pointers and slices hold `nb` blocks (a whole
/// number of super-blocks) of what is described; `out` holds sixteen rows of [`TILE_ROWS`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows<const F: u8>(
    planes: &[__m512i],
    tile: &[u8],
    act: *const i8,
    stride: usize,
    acts: [&[ActBlock]; ROWS],
    nb: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let format = PackedFormat::from_id(F);
    #[repr(C, align(64))]
    struct Sums([i32; 2 * ROWS * 16]);
    let mut sums = Sums([0; 2 * ROWS * 16]);
    let mut acc = [_mm512_setzero_ps(); ROWS];
    let super_bytes = format.tile_bytes(QK_K);
    for s in 0..nb / (QK_K / QK) {
        let plane = planes.as_ptr().add(s * 2 * PLANE_REGS) as *const u8;
        let c = sums.0.as_mut_ptr() as *mut u8;
        super_products(
            act.add(s * QK_K),
            stride,
            plane,
            plane.add(64 * PLANE_REGS),
            c,
        );
        let isum: [__m512i; ROWS] = std::array::from_fn(|r| {
            let lo = _mm512_load_si512(c.add(64 * r) as *const __m512i);
            let hi = _mm512_load_si512(c.add(1024 + 64 * r) as *const __m512i);
            _mm512_add_epi32(lo, _mm512_slli_epi32::<8>(hi))
        });
        super_step::<ROWS, F>(
            tile.as_ptr().add(s * super_bytes),
            &acts,
            s,
            &isum,
            &mut acc,
        );
    }
    for (r, x) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.add(r * out_stride), *x);
    }
}

thread_local! {
    /// A tile's weight planes for the AMX kernels, kept between calls on each thread.
    static AMX_PLANES: std::cell::Cell<Vec<std::arch::x86_64::__m512i>> =
        const { std::cell::Cell::new(Vec::new()) };
}

/// Rows of activations the AMX kernels run against a tile before the next one: its weight
/// planes (two bytes a weight) are built once per tile and chunk, and the chunk's int8 rows
/// stay in L2 across the tiles of a claim.
const AMX_CHUNK_ROWS: usize = 128;

/// Sixteen rows at a time of the first `m / 16 * 16` rows against tiles `mine` of `w` through
/// the AMX kernels `k`, into `dst` (each part of the columns alone, as `packed::tile_run`
/// puts them); returns the rows done.
///
/// # Safety
/// As for `packed::tile_run`; `k` are `w`'s kernels; `rows` holds `m` rows of `w.cols` int8,
/// the values of `act`'s blocks.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile_run(
    w: &PackedMat,
    k: Kernels,
    rows: SyncPtr<i8>,
    act: &[ActBlock],
    m: usize,
    parts: &[Range<usize>],
    how: Parts,
    mine: Range<usize>,
    dst: SyncPtr<f32>,
) -> usize {
    let (n, cols) = (w.rows, w.cols);
    let nb = cols / QK;
    let super_bytes = w.format.tile_bytes(QK_K);
    let full = m / ROWS * ROWS;
    let _tiles = Tiles::configure();
    let mut planes = AMX_PLANES.take();
    let mut buffers = PartBuffers::new();
    for chunk in (0..full).step_by(AMX_CHUNK_ROWS) {
        for t in mine.clone() {
            let tile = w.tile(t);
            (k.planes)(tile, nb, &mut planes);
            for i in (chunk..(chunk + AMX_CHUNK_ROWS).min(full)).step_by(ROWS) {
                let at = CallAt {
                    m,
                    n,
                    i,
                    r: ROWS,
                    j0: t * TILE_ROWS,
                };
                buffers.run(at, parts, how, dst, |part, out, stride| {
                    // The part's super-blocks: its planes, headers, values and activations.
                    let (s0, blocks) = (part.start / QK_K, part.start / QK..part.end / QK);
                    let row_blocks = |q: usize| {
                        act.get_unchecked((i + q) * nb + blocks.start..(i + q) * nb + blocks.end)
                    };
                    (k.rows)(
                        planes.get_unchecked(s0 * 2 * PLANE_REGS..),
                        tile.get_unchecked(s0 * super_bytes..),
                        rows.0.add(i * cols + part.start),
                        cols,
                        std::array::from_fn(row_blocks),
                        blocks.len(),
                        out,
                        stride,
                    )
                });
            }
        }
    }
    AMX_PLANES.set(planes);
    full
}
