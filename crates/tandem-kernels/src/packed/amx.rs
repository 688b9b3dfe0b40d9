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
//! Q4_K and Q5_K split the scale instead (`sc = 8 * sh + sl`, planes `u * sl` and `u * sh`), so
//! one 16-bit multiply builds each plane register ([`split_planes`]).
//!
//! Each super-block's planes are built from the tile's packed values once per tile and chunk
//! of [`CHUNK_ROWS`] activation rows and serve all its sixteen-row groups while they are in L1,
//! so a call runs here from one group on ([`MIN_ROWS`]). The activations are read as int8
//! copies of the quantized blocks' values, made once per matmul and laid out a super-block
//! at a time ([`copy_row`]). A kernel call walks several tiles super-block by super-block
//! ([`rows`]), so each super-block's activations serve all of them while they are in L1.

use std::arch::asm;
use std::arch::x86_64::*;
use std::ops::Range;

use super::avx512::{bytes_epi32, super_step, values, RowSums};
use super::layout::TILE_ROWS;
use super::{
    min_pair_sums, ActBlock, CallAt, PackedFormat, PackedMat, PartBuffers, Parts, Prefetch, Scheme,
    PREFETCH_L1,
};
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

/// Defines `$name(a, stride, lo, hi, c)`, the two products of one super-block: `c[0]` += `a`
/// (16 rows of 256 int8, `stride` bytes apart) times the unsigned low plane `lo` (4 KiB),
/// `c[1]` += `a` times the high plane `hi` (`$hi` the instruction that reads it as signed or
/// unsigned bytes), stored as 16 rows of 16 i32 each.
macro_rules! super_products {
    ($name:ident, $hi:literal) => {
        /// See `super_products!`.
        ///
        /// # Safety
        /// A [`Tiles`] of this thread is live; the pointers hold what is described.
        #[inline(always)]
        unsafe fn $name(a: *const i8, stride: usize, lo: *const u8, hi: *const u8, c: *mut u8) {
            // SAFETY: per the caller's contract.
            unsafe {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tileloadd tmm2, [{a} + {sa} * 1]",
                    "tileloadd tmm3, [{lo} + {s64} * 1]",
                    "tileloadd tmm4, [{hi} + {s64} * 1]",
                    "tdpbsud tmm0, tmm2, tmm3",
                    concat!($hi, " tmm1, tmm2, tmm4"),
                    "tileloadd tmm5, [{a} + {sa} * 1 + 64]",
                    "tileloadd tmm6, [{lo} + {s64} * 1 + 1024]",
                    "tileloadd tmm7, [{hi} + {s64} * 1 + 1024]",
                    "tdpbsud tmm0, tmm5, tmm6",
                    concat!($hi, " tmm1, tmm5, tmm7"),
                    "tileloadd tmm2, [{a} + {sa} * 1 + 128]",
                    "tileloadd tmm3, [{lo} + {s64} * 1 + 2048]",
                    "tileloadd tmm4, [{hi} + {s64} * 1 + 2048]",
                    "tdpbsud tmm0, tmm2, tmm3",
                    concat!($hi, " tmm1, tmm2, tmm4"),
                    "tileloadd tmm5, [{a} + {sa} * 1 + 192]",
                    "tileloadd tmm6, [{lo} + {s64} * 1 + 3072]",
                    "tileloadd tmm7, [{hi} + {s64} * 1 + 3072]",
                    "tdpbsud tmm0, tmm5, tmm6",
                    concat!($hi, " tmm1, tmm5, tmm7"),
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
    };
}

super_products!(products_signed_high, "tdpbssd");
super_products!(products_unsigned_high, "tdpbsud");

/// Whether format `F`'s planes split the block scale instead of the weight (see
/// [`split_planes`]): Q4_K's and Q5_K's, whose 4- and 5-bit values and 6-bit scales allow it.
const fn splits_scale(f: u8) -> bool {
    f == PackedFormat::Q4_K as u8 || f == PackedFormat::Q5_K as u8
}

/// Activation rows from which a k-quant matmul runs on AMX, in one group padded to sixteen
/// below that. With each super-block's planes built where the products read them (in L1), AMX
/// wins at sixteen rows: `packed_speed` at 16 rows, two threads, VNNI against AMX (GMAC/s): the
/// LM head's shape (151,936 x 1,536, Q6_K) 211-215 / 237-245, the down projection's (1,536 x
/// 8,960) Q4_K 306-311 / 341-355 and Q6_K 241-249 / 353-361, gate and up's (17,920 x 1,536,
/// Q4_K) 320-336 / 333-355. Padded, it wins from ten, where the VNNI kernels need two passes
/// over the weights (8 + 2 rows): 17,920 x 1,536, two threads, m = 8 / 9 / 10 / 11 / 12, Q4_K
/// 346-349 / 312-316 / 306-319 / 286-290 / 285-320 against 271-274 / 301-305 / 295-330 /
/// 351-354 / 384-387, Q6_K 275-277 / 239-240 / 239-241 / 218-223 / 258-264 against 214-218 /
/// 243-246 / 266-269 / 288-290 / 316-320. Since the kernels walk several tiles a call (see
/// [`rows`]), it wins from nine: the 1.5B's matmuls from memory (`decode_matmuls`, two
/// threads, ms a step, AMX against VNNI) at 9 rows 74.0 / 78.7 against 78.4 / 88.5, at 8 rows
/// 73.0 / 84.0 against 67.4 / 73.9. Serving's steps have fewer than sixteen rows while its
/// batch fills and drains.
pub(super) const MIN_ROWS: usize = 9;

/// One format's AMX kernel: a run of tiles against groups of sixteen activation rows (see
/// [`rows`]).
pub(super) type Kernels = unsafe fn(&Call);

/// What one AMX kernel call computes: `tiles` tiles of a k-quant, from their super-block `s0`
/// on for `supers` super-blocks, against `groups` groups of sixteen activation rows.
pub(super) struct Call {
    /// The first tile's super-block `s0` (its header); each next tile's is `tile_stride`
    /// bytes on.
    pub weights: *const u8,
    pub tiles: usize,
    pub tile_stride: usize,
    /// The rows' int8 values and [`SuperSums`] in [`copy_row`]'s layout from super-block `s0`
    /// on (each super-block `stored` rows after the last).
    pub act: *const i8,
    pub sums: *const SuperSums,
    pub stored: usize,
    pub groups: usize,
    pub s0: usize,
    pub supers: usize,
    /// Tile `t`'s sixteen results for activation row `q` go to `out + q * out_stride + 16 t`,
    /// for the rows below `rows` (a padded group's others are dropped).
    pub out: *mut f32,
    pub out_stride: usize,
    pub rows: usize,
}

/// The AMX kernel of `format`, for the k-quants (the formats whose block scales are integers).
pub(super) fn kernels(format: PackedFormat) -> Option<Kernels> {
    Some(match format {
        PackedFormat::Q4_K => rows::<5>,
        PackedFormat::Q5_K => rows::<6>,
        PackedFormat::Q6_K => rows::<7>,
        PackedFormat::Q2_K => rows::<8>,
        PackedFormat::Q3_K => rows::<9>,
        PackedFormat::IQ4_XS => rows::<11>,
        _ => return None,
    })
}

/// The weight planes of the super-block at `sb` (its header, then its blocks' values) into
/// `out`: the low plane's 64 registers, then the high plane's, each register four consecutive
/// elements of sixteen rows (the packed values' order). In general they hold `lo` and `hi` of
/// `w = (u - offset) * sc`; Q4_K's split the scale instead ([`split_planes`]). With `ahead`
/// (`simd::prefetch_weights`), each line read asks for the same line of the super-blocks the
/// walk reaches [`AHEAD_STEPS`] steps and one step later, into L2 and L1 ([`Ahead`]): the LM
/// head's shape (151,936 x 1,536, two threads) at 32 / 64 rows ran Q6_K at 284-303 / 369-394
/// GMAC/s against 269-275 / 322-363 without prefetches.
///
/// # Safety
/// AVX-512 BW is supported; `sb` holds a super-block of format `F`, a k-quant.
#[inline(always)]
unsafe fn super_planes<const F: u8>(
    sb: *const u8,
    out: &mut [__m512i; 2 * PLANE_REGS],
    ahead: Option<Ahead>,
) {
    let format = PackedFormat::from_id(F);
    let blocks = QK_K / QK;
    let rows = TILE_ROWS;
    let low_byte = _mm512_set1_epi16(0x00ff);
    let high_byte = _mm512_set1_epi16(0xff00u16 as i16);
    let h = sb;
    let mut p = sb.add(format.header_bytes());
    let (lo_plane, hi_plane) = out.split_at_mut(PLANE_REGS);
    for bi in 0..blocks {
        if let Some(a) = ahead {
            a.lines(p as usize - sb as usize, format.block_value_bytes());
        }
        let v = values::<F>(p, false, Prefetch::Off);
        p = p.add(format.block_value_bytes());
        if splits_scale(F) {
            let sc = bytes_epi32::<false>(h.add(4 * rows + rows * bi));
            split_planes(v, sc, bi, lo_plane, hi_plane);
            continue;
        }
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
        // Per half of the block: each row's scale as a signed byte in the even (then the odd)
        // byte of every 16-bit lane, so that `vpmaddubsw` takes the even (odd) values'
        // products alone, and `offset * sc` in every 16-bit lane.
        let mut even_sc = [_mm512_setzero_si512(); 2];
        let mut odd_sc = even_sc;
        let mut off_sc = even_sc;
        for h in 0..2 {
            let sc = scales[h];
            let sc16 = _mm512_or_si512(
                _mm512_and_si512(sc, _mm512_set1_epi32(0xffff)),
                _mm512_slli_epi32::<16>(sc),
            );
            even_sc[h] = _mm512_and_si512(sc16, low_byte);
            odd_sc[h] = _mm512_slli_epi16::<8>(sc16);
            off_sc[h] = _mm512_mullo_epi16(sc16, _mm512_set1_epi16(offset as i16));
        }
        for (j, &reg) in v.iter().enumerate() {
            let h = j / 4;
            // The values are unsigned bytes; each product, at most 255 x 128, fits 16 bits.
            let pe = _mm512_sub_epi16(_mm512_maddubs_epi16(reg, even_sc[h]), off_sc[h]);
            let po = _mm512_sub_epi16(_mm512_maddubs_epi16(reg, odd_sc[h]), off_sc[h]);
            let lo = _mm512_or_si512(_mm512_and_si512(pe, low_byte), _mm512_slli_epi16::<8>(po));
            let hi = _mm512_or_si512(
                _mm512_and_si512(_mm512_srai_epi16::<8>(pe), low_byte),
                _mm512_and_si512(po, high_byte),
            );
            // Block bi's register j is row 8 * (bi % 2) + j of 64-element chunk bi / 2.
            let at = 16 * (bi / 2) + 8 * (bi % 2) + j;
            lo_plane[at] = lo;
            hi_plane[at] = hi;
        }
    }
}

/// Q4_K's and Q5_K's planes for block `bi` of a super-block, its values `v` (`u` in 0..16 or
/// 0..32) and scales `sc` (0..64 per row, in i32 lanes): with `sc = 8 * sh + sl`, the low plane
/// holds `u * sl` and the high one `u * sh` (both at most 217, so unsigned bytes), and the sums
/// combine as `sum(a * lo) + 8 * sum(a * hi)`, the same integer as `sum(a * u * sc)`. One
/// `vpmullw` per register multiplies both of each 16-bit lane's values: the low one's product
/// stays under 256, so nothing carries into the high byte. A `vpermi2b` lookup (two cycles on
/// the one shuffle port) was Q4_K's plane build's bound: at 16 / 32 rows it ran 225 / 239
/// GMAC/s with it and 233 / 260 with this; the general path's byte splits cost about three
/// times the operations.
#[inline(always)]
unsafe fn split_planes(
    v: [__m512i; 8],
    sc: __m512i,
    bi: usize,
    lo_plane: &mut [__m512i],
    hi_plane: &mut [__m512i],
) {
    // Each row's split scale in both 16-bit halves of its dword.
    let spread = |s: __m512i| _mm512_mullo_epi32(s, _mm512_set1_epi32(0x0001_0001));
    let sl = spread(_mm512_and_si512(sc, _mm512_set1_epi32(7)));
    let sh = spread(_mm512_srli_epi32::<3>(sc));
    for (j, u) in v.into_iter().enumerate() {
        let at = 16 * (bi / 2) + 8 * (bi % 2) + j;
        *lo_plane.get_unchecked_mut(at) = _mm512_mullo_epi16(u, sl);
        *hi_plane.get_unchecked_mut(at) = _mm512_mullo_epi16(u, sh);
    }
}

/// Where a kernel's walk reads (`here`), and the super-blocks it reaches one step (`near`)
/// and [`AHEAD_STEPS`] steps (`far`) later. As it reads each line, it asks for the same line
/// of `far` into L2, and for the line [`PREFETCH_L1`] bytes on in the walk's order (in
/// `here`, or at the start of `near`) into L1: the walk goes super-block by super-block
/// across its tiles, so the lines it needs next are not the ones that follow in memory.
#[derive(Clone, Copy)]
struct Ahead {
    here: *const u8,
    near: *const u8,
    far: *const u8,
    super_bytes: usize,
}

impl Ahead {
    /// Asks for what reading the `bytes` at `offset` into `here` calls for.
    #[inline(always)]
    fn lines(self, offset: usize, bytes: usize) {
        for l in (offset..offset + bytes).step_by(64) {
            let next = l + PREFETCH_L1;
            let next = if next < self.super_bytes {
                self.here.wrapping_add(next)
            } else {
                self.near.wrapping_add(next - self.super_bytes)
            };
            // SAFETY: a prefetch never faults, wherever it points.
            unsafe {
                _mm_prefetch::<_MM_HINT_T1>(self.far.wrapping_add(l) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(next as *const i8);
            }
        }
    }
}

/// A place in a kernel call's walk: super-block `s` of tile `t`. Past the call's last
/// super-block the walk goes on over the next `tiles` tiles as if they were the call's (where
/// this thread's next claim most likely starts), so that the prefetches ahead of it land.
#[derive(Clone, Copy, Default)]
struct Walk {
    s: usize,
    t: usize,
    /// The first tile of the `tiles` being walked.
    first: usize,
}

impl Walk {
    /// The next place: the next tile's super-block `s`, or after the last tile, the first
    /// tile's next super-block.
    #[inline(always)]
    fn step(&mut self, c: &Call) {
        self.t += 1;
        if self.t == self.first + c.tiles {
            self.t = self.first;
            self.s += 1;
            if self.s == c.supers {
                self.s = 0;
                self.first += c.tiles;
                self.t = self.first;
            }
        }
    }

    /// The super-block's address (its header).
    #[inline(always)]
    fn at(&self, c: &Call, super_bytes: usize) -> *const u8 {
        c.weights
            .wrapping_add(self.t * c.tile_stride + self.s * super_bytes)
    }
}

/// Steps of the walk (super-blocks) ahead that a kernel asks for into L2: ~9 KiB, as far as
/// the VNNI kernels ask ahead in their straight stream ([`super::PREFETCH`]).
const AHEAD_STEPS: usize = 4;

/// [`Call`]'s tiles against its groups of activation rows, walked super-block by
/// super-block: super-block `s` of every tile, then `s + 1`. Each tile's super-block
/// planes are built once and serve every group while they are in L1 (built for a whole tile
/// first, 48 KiB on the 1.5B's shapes, they went to L2 and back, and the planes' stores and
/// tile loads took most of the time at sixteen rows); each super-block's activations (4 KiB a
/// group) serve every tile while they are in L1. Tile by tile, a sixteen-row step read them
/// from L2 once per tile, and with the weights coming from memory that cost ~10%: pointing
/// every super-block at one group's values (wrong sums, the same work) took the 1.5B's
/// matmuls at 16 rows from 73-76 to 66 ms a step. Each (tile, group)'s float steps still run
/// in super-block order, so the results have the same bits as tile by tile.
///
/// # Safety
/// A [`Tiles`] of this thread is live; AVX-512 BW is supported; the pointers hold what
/// [`Call`] describes (whole super-blocks), `tiles * groups` at most [`MAX_SLOTS`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows<const F: u8>(c: &Call) {
    let format = PackedFormat::from_id(F);
    debug_assert!(c.tiles * c.groups <= MAX_SLOTS);
    #[repr(C, align(64))]
    struct Products([i32; 2 * 2 * ROWS * 16]);
    // The tile stores write each set before the float step reads it: zeroing the 4 KiB each
    // call showed in a sixteen-row step's profile as `memset`.
    let mut products = std::mem::MaybeUninit::<Products>::uninit();
    let c0 = products.as_mut_ptr() as *mut u8;
    // Every register is written before it is read: zeroing the planes would double their
    // stores.
    let mut planes = std::mem::MaybeUninit::<[__m512i; 2 * PLANE_REGS]>::uninit();
    let planes = planes.assume_init_mut();
    // One set of sixteen rows' sums per tile and group (`t * groups + g`); only those are
    // zeroed (all of them are 32 KiB).
    let mut acc = std::mem::MaybeUninit::<[[__m512; ROWS]; MAX_SLOTS]>::uninit();
    let acc = acc.assume_init_mut();
    for slot in acc.iter_mut().take(c.tiles * c.groups) {
        *slot = [_mm512_setzero_ps(); ROWS];
    }
    let prefetch = crate::simd::prefetch_weights();
    let super_bytes = format.tile_bytes(QK_K);
    // Where the walk is, and where it will be one and `AHEAD_STEPS` steps on.
    let mut here = Walk::default();
    let mut near = here;
    near.step(c);
    let mut far = near;
    for _ in 1..AHEAD_STEPS {
        far.step(c);
    }
    // The float step of the products issued before the last (product `at`, super-block `s` at
    // `sb`, group `g`, sums `slot`): its sums' tile store has long reached L1 when the vector
    // loads read them.
    let step = |at: usize,
                sb: *const u8,
                s: usize,
                g: usize,
                slot: usize,
                acc: &mut [[__m512; ROWS]; MAX_SLOTS]| {
        let p = c0.add(2048 * (at % 2));
        let isum: [__m512i; ROWS] = std::array::from_fn(|r| {
            let lo = _mm512_load_si512(p.add(64 * r) as *const __m512i);
            let hi = _mm512_load_si512(p.add(1024 + 64 * r) as *const __m512i);
            let hi = if splits_scale(F) {
                _mm512_slli_epi32::<3>(hi)
            } else {
                _mm512_slli_epi32::<8>(hi)
            };
            _mm512_add_epi32(lo, hi)
        });
        let rows = GroupSums(c.sums.add(s * c.stored + g * ROWS));
        super_step::<ROWS, F>(sb, &rows, c.s0 + s, &isum, acc.get_unchecked_mut(slot));
    };
    let mut at = 0;
    let mut last = None;
    for s in 0..c.supers {
        for t in 0..c.tiles {
            debug_assert_eq!((here.s, here.t), (s, t));
            let sb = here.at(c, super_bytes);
            let ahead = prefetch.then(|| Ahead {
                here: sb,
                near: near.at(c, super_bytes),
                far: far.at(c, super_bytes),
                super_bytes,
            });
            for w in [&mut here, &mut near, &mut far] {
                w.step(c);
            }
            super_planes::<F>(sb, planes, ahead);
            let (lo, hi) = (
                planes.as_ptr() as *const u8,
                planes.as_ptr().add(PLANE_REGS) as *const u8,
            );
            for g in 0..c.groups {
                let a = c.act.add((s * c.stored + g * ROWS) * QK_K);
                let p = c0.add(2048 * (at % 2));
                if splits_scale(F) {
                    products_unsigned_high(a, QK_K, lo, hi, p);
                } else {
                    products_signed_high(a, QK_K, lo, hi, p);
                }
                if let Some((sb, s, g, slot)) = last {
                    step(at - 1, sb, s, g, slot, acc);
                }
                last = Some((sb, s, g, t * c.groups + g));
                at += 1;
            }
        }
    }
    if let Some((sb, s, g, slot)) = last {
        step(at - 1, sb, s, g, slot, acc);
    }
    for t in 0..c.tiles {
        for g in 0..c.groups {
            for (r, x) in acc[t * c.groups + g].iter().enumerate() {
                let q = g * ROWS + r;
                if q < c.rows {
                    _mm512_storeu_ps(c.out.add(q * c.out_stride + TILE_ROWS * t), *x);
                }
            }
        }
    }
}

/// Rows of activations the AMX kernels run against a tile before the next one: each
/// super-block's planes are built once per tile and chunk, and the chunk's int8 rows stay in
/// L2 across the tiles of a claim.
const CHUNK_ROWS: usize = 128;
const _: () = assert!(CHUNK_ROWS <= super::MAX_CALL_ROWS);

/// Sets of sixteen rows' sums a kernel call keeps (tiles x groups): four tiles of a whole
/// chunk's eight groups, so that each super-block's activations of a chunk (32 KiB) serve four
/// tiles from L1 and L2 where they served one. At 512 rows (`packed_speed`, two threads, GMAC/s,
/// against one tile a call) the down projection's shape (1,536 x 8,960), whose chunk of 1.1 MiB
/// came from L2 and beyond once per tile, ran Q4_K at 500-525 against 350-364 and Q6_K at
/// 551-608 against 402-420; 17,920 x 1,536 gained 3-5%. Sixty-four gained another 5-8% on the
/// first shape for 64 KiB of stack.
const MAX_SLOTS: usize = 32;
const _: () = assert!(CHUNK_ROWS / ROWS <= MAX_SLOTS);

/// Most tiles a kernel call takes (and a claim holds for it): more would leave a thread's
/// claims too few to even out the threads' shares.
const MAX_TILES: usize = 8;

/// Tiles one kernel call takes with `groups` groups of sixteen rows.
fn tiles_per_call(groups: usize) -> usize {
    (MAX_SLOTS / groups.max(1)).min(MAX_TILES)
}

/// Tiles a claim holds at least with `m` activation rows (see [`tile_run`]): what one kernel
/// call takes for the first chunk's groups. At sixteen rows that is eight; claims of 64 KiB
/// held four of the 1.5B's q/k/v or gate/up tiles and one of its down projection's, and its
/// matmuls at 16 rows took 70.6-72.2 ms a step against 64.0-64.8 with claims of eight tiles.
pub(super) fn call_tiles(m: usize) -> usize {
    tiles_per_call(amx_rows(m).min(CHUNK_ROWS) / ROWS)
}

/// The activation rows an AMX call runs: `m` to a whole group, padded below one group
/// ([`MIN_ROWS`] on) or where at least [`PAD_FROM`] rows are left over, else down (the VNNI
/// kernels take the rest).
fn amx_rows(m: usize) -> usize {
    if m < ROWS || m % ROWS >= PAD_FROM {
        m.div_ceil(ROWS) * ROWS
    } else {
        m / ROWS * ROWS
    }
}

/// Rows left over from which the last group is padded (its extra rows' results dropped)
/// rather than left to the VNNI kernels, which pass over the weights once per 8, 4, 2 or 1
/// rows. `packed_speed` (17,920 x 1,536, two threads, GMAC/s) left over against padded: 17
/// rows Q4_K 351 / 268, Q6_K 299 / 287; 20 rows 297 / 319 and 219 / 330; 28 rows 312 / 438
/// and 276 / 429.
const PAD_FROM: usize = 4;

/// The activation rows [`copy_row`] lays out for an AMX call: every row, and the padding.
fn stored_rows(m: usize) -> usize {
    amx_rows(m).max(m)
}

/// One activation row's numbers that a super-block's float step reads besides the integer
/// sums: its scale and its sums against the minimums (both pairings, as matrices of one
/// call may differ). Copied per super-block next to the int8 values, a sixteen-row group's
/// take 13 cache lines; read from the rows' quantized blocks they took 128 (eight blocks of
/// sixteen rows), and the step ran 15-19% slower (Q4_K at 16 rows).
#[derive(Clone, Copy)]
#[repr(C)]
pub(super) struct SuperSums {
    d: f32,
    /// [`min_pair_sums`] for K32's four pairs of blocks.
    k32: [i32; 4],
    /// [`min_pair_sums`] for Q2_K's eight blocks.
    halves: [i32; 8],
}

/// Sixteen rows' [`SuperSums`] for one super-block.
struct GroupSums(*const SuperSums);

impl RowSums for GroupSums {
    #[inline(always)]
    unsafe fn scale(&self, r: usize, _: usize) -> f32 {
        (*self.0.add(r)).d
    }

    #[inline(always)]
    unsafe fn min_pair(&self, r: usize, _: usize, q: usize, k32: bool) -> i32 {
        let x = &*self.0.add(r);
        if k32 {
            *x.k32.get_unchecked(q)
        } else {
            *x.halves.get_unchecked(q)
        }
    }
}

/// Bytes of the scratch [`copy_row`] fills for `m` rows of `k` activations: the int8 values,
/// then the [`SuperSums`].
pub(super) fn scratch_bytes(m: usize, k: usize) -> usize {
    let rows = stored_rows(m);
    rows * k + rows * (k / QK_K) * size_of::<SuperSums>()
}

/// Copies row `i` of `m` activation rows (`blocks`, `k / 32` quantized blocks) to `scratch`
/// (64-byte aligned, [`scratch_bytes`] long): its int8 values, which the tile products read,
/// and its [`SuperSums`] after all rows' values. Both per chunk of [`CHUNK_ROWS`] rows, a
/// super-block at a time, each super-block's values (or sums) of the chunk's rows one after
/// the other. A tile load then reads 4 KiB in one piece: read straight from rows `k` bytes
/// apart, the down projection's (k = 8,960) sixteen-row groups spread over 128 pages of each
/// chunk and ran at 214-263 against 332-341 GMAC/s with 512 rows.
///
/// # Safety
/// `scratch` is as described; no other thread writes row `i`'s.
pub(super) unsafe fn copy_row(
    scratch: SyncPtr<u8>,
    m: usize,
    k: usize,
    i: usize,
    blocks: &[ActBlock],
) {
    let chunk = i / CHUNK_ROWS * CHUNK_ROWS;
    let r = (stored_rows(m) - chunk).min(CHUNK_ROWS);
    let row = scratch.0.add(chunk * k + (i - chunk) * QK_K) as *mut i8;
    for (b, a) in blocks.iter().enumerate() {
        let at = row.add(b * QK / QK_K * r * QK_K + b * QK % QK_K);
        std::ptr::copy_nonoverlapping(a.qs.as_ptr(), at, QK);
    }
    let supers = k / QK_K;
    let sums = scratch.0.add(stored_rows(m) * k) as *mut SuperSums;
    let sums = sums.add(chunk * supers + (i - chunk));
    for s in 0..supers {
        let first = s * (QK_K / QK);
        *sums.add(s * r) = SuperSums {
            d: blocks.get_unchecked(first).d,
            k32: std::array::from_fn(|q| min_pair_sums(blocks, first, q, true)),
            halves: std::array::from_fn(|q| min_pair_sums(blocks, first, q, false)),
        };
    }
}

/// The `m` rows against tiles `mine` of `w` through the AMX kernel `k`, a chunk at a time,
/// into `dst` (each part of the columns alone, as `packed::tile_run` puts them), the last
/// group padded ([`stored_rows`]). Where the results can go straight to `dst` (one part,
/// sixteen rows a tile; a padded group's extra rows are not stored), one kernel call takes as
/// many tiles as [`tiles_per_call`] allows for the chunk's groups; the rest go tile by tile
/// through the part buffers.
///
/// # Safety
/// As for `packed::tile_run`; `k` is `w`'s kernel; `scratch` holds the `m` rows of `w.cols`
/// activations as [`copy_row`] puts them.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile_run(
    w: &PackedMat,
    k: Kernels,
    scratch: SyncPtr<u8>,
    m: usize,
    parts: &[Range<usize>],
    how: Parts,
    mine: Range<usize>,
    dst: SyncPtr<f32>,
) -> usize {
    let (n, cols) = (w.rows, w.cols);
    let super_bytes = w.format.tile_bytes(QK_K);
    let tile_bytes = w.format.tile_bytes(cols);
    let supers = cols / QK_K;
    let full = amx_rows(m);
    let sums = scratch.0.add(stored_rows(m) * cols) as *const SuperSums;
    let _tiles = Tiles::configure();
    let mut buffers = PartBuffers::new();
    // Tiles whose sixteen rows all exist.
    let whole = mine.end.min(n / TILE_ROWS);
    for chunk in (0..full).step_by(CHUNK_ROWS) {
        // The rows this run takes, and those `copy_row` laid out in the chunk.
        let (r, stored) = (
            (full - chunk).min(CHUNK_ROWS),
            (stored_rows(m) - chunk).min(CHUNK_ROWS),
        );
        let groups = r / ROWS;
        // The call for tiles `t..t + tiles` over the part's super-blocks.
        let call =
            |t: usize, tiles: usize, part: &Range<usize>, out: *mut f32, out_stride, rows| {
                let (s0, s1) = (part.start / QK_K, part.end / QK_K);
                Call {
                    weights: w.bytes().as_ptr().add(t * tile_bytes + s0 * super_bytes),
                    tiles,
                    tile_stride: tile_bytes,
                    act: scratch.0.add(chunk * cols + s0 * stored * QK_K) as *const i8,
                    sums: sums.add(chunk * supers + s0 * stored),
                    stored,
                    groups,
                    s0,
                    supers: s1 - s0,
                    out,
                    out_stride,
                    rows,
                }
            };
        let direct = parts.len() == 1;
        let mut t = mine.start;
        while t < mine.end {
            if direct && t < whole {
                let tiles = (whole - t).min(tiles_per_call(groups));
                let out = dst.0.add(chunk * n + t * TILE_ROWS);
                k(&call(t, tiles, &parts[0], out, n, r.min(m - chunk)));
                t += tiles;
                continue;
            }
            let at = CallAt {
                m,
                n,
                i: chunk,
                r,
                j0: t * TILE_ROWS,
            };
            buffers.run(at, parts, how, dst, |part, out, stride| {
                k(&call(t, 1, part, out, stride, r))
            });
            t += 1;
        }
    }
    full
}
