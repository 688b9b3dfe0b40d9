//! The byte layout of a packed tile, and the repacking into it.
//!
//! A tile is [`TILE_ROWS`] consecutive rows. For each super-block (32 elements, or 256 for the
//! k-quants) it holds a header, then the values of each 32-element block:
//!
//! - header, each field row-major over the tile's rows (f16 and 8-bit integers as stored):
//!   Block32 formats `d[16]` then `m[16]` (Q4_1, Q5_1); K32 (Q4_K, Q5_K) `d[16]`, `dmin[16]`,
//!   then per block `sc[16]` and then per block `mn[16]`; K16 (Q6_K, Q3_K, Q2_K) `d[16]`
//!   (Q2_K: then `dmin[16]`), then per 16-element group `sc[16]` (signed; Q2_K: `sc | mn << 4`).
//! - values: "value register" `j` (64 bytes) holds elements `4j..4j+4` of each of the sixteen
//!   rows (row `r` in bytes `4r..4r+4`), so it multiplies one broadcast activation dword.
//!   Q8_0 stores the eight registers as bytes (`u = q + 128`). The other formats store four
//!   nibble registers, the low nibbles being value register `k` and the high ones register
//!   `4 + k` (ggml's own pairing of elements `e` and `e + 16`), followed by the fifth bits
//!   (Q5: for each nibble register two 64-bit masks, bit `4r + i` of its low then its high
//!   values) or the top two bits (Q6_K: one 64-byte register for the low nibbles, one for the
//!   high, byte `4r + i` holding register `k`'s bits at `2k`). Q2_K and Q3_K store two
//!   registers of 2-bit fields, value register `2t + m` in bits `2t` of register `m`; Q3_K
//!   follows them with its third bits as masks ordered as the Q5 fifth bits. IQ4_NL and IQ4_XS
//!   store their 4-bit table indices as Q4_0 stores its nibbles (IQ4_NL's header is Q4_0's,
//!   IQ4_XS's is Q6_K's, each 32-element scale repeated for both of its 16-element groups).
//!
//! A tile has the bytes its rows have in the stored format, plus, for Q4_K / Q5_K / Q3_K,
//! their 6-bit scales (and minimums) widened to bytes (+2.8% / +2.3% / +3.6%), and for IQ4_XS
//! its scales widened to a byte per 16 elements (+7.4%).

use super::{PackedFormat, Scheme};
use crate::dtype::{QK, QK_K};
use crate::iq4;
use crate::kquant;
use crate::matmul::MatRef;
use crate::mem::WeightBytes;

/// Rows per tile: one 32-bit lane each in a 512-bit register.
pub const TILE_ROWS: usize = 16;

/// One row's super-block decoded from its stored format.
#[derive(Clone, Copy)]
struct Decoded {
    /// The f16 bits of `d` and of `m` (Block32) or `dmin` (K32).
    h: [u16; 2],
    /// Block (K32) or group (K16) scales.
    sc: [u8; 16],
    /// Block minimums (K32).
    mn: [u8; 16],
    /// Unsigned values.
    u: [u8; QK_K],
}

const ZERO: Decoded = Decoded {
    h: [0; 2],
    sc: [0; 16],
    mn: [0; 16],
    u: [0; QK_K],
};

fn f16_bits(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

/// Decodes the super-block at `b` (one stored block) of `format`.
fn decode(format: PackedFormat, b: &[u8]) -> Decoded {
    let mut out = ZERO;
    let nibbles = |out: &mut Decoded, qs: &[u8]| {
        for (e, &q) in qs.iter().enumerate() {
            out.u[e] = q & 0x0f;
            out.u[e + 16] = q >> 4;
        }
    };
    let fifth = |out: &mut Decoded, qh: &[u8]| {
        let bits = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
        for e in 0..QK {
            out.u[e] |= (((bits >> e) & 1) as u8) << 4;
        }
    };
    match format {
        PackedFormat::Q4_0 => {
            out.h[0] = f16_bits(b, 0);
            nibbles(&mut out, &b[2..18]);
        }
        PackedFormat::Q4_1 => {
            out.h = [f16_bits(b, 0), f16_bits(b, 2)];
            nibbles(&mut out, &b[4..20]);
        }
        PackedFormat::Q5_0 => {
            out.h[0] = f16_bits(b, 0);
            nibbles(&mut out, &b[6..22]);
            fifth(&mut out, &b[2..6]);
        }
        PackedFormat::Q5_1 => {
            out.h = [f16_bits(b, 0), f16_bits(b, 2)];
            nibbles(&mut out, &b[8..24]);
            fifth(&mut out, &b[4..8]);
        }
        PackedFormat::Q8_0 => {
            out.h[0] = f16_bits(b, 0);
            for e in 0..QK {
                out.u[e] = b[2 + e] ^ 0x80;
            }
        }
        // The table formats keep their indices; `read_values` and the kernels look them up.
        PackedFormat::IQ4_NL => {
            out.h[0] = f16_bits(b, 0);
            out.u[..QK].copy_from_slice(&iq4::indices(&b[2..18]));
        }
        PackedFormat::IQ4_XS => {
            out.h[0] = f16_bits(b, 0);
            for (blk, qs) in b[8..136].chunks_exact(16).enumerate() {
                out.u[QK * blk..QK * (blk + 1)].copy_from_slice(&iq4::indices(qs));
            }
            let (_, _, sc, _) = kquant::scales(format.dtype(), b);
            out.sc = sc.map(|s| s as u8);
        }
        _ => {
            let k = kquant::decode(format.dtype(), b);
            out.u = k.u;
            if format == PackedFormat::Q6_K {
                out.h[0] = f16_bits(b, 208);
                out.sc = k.sc.map(|s| s as u8);
            } else if format == PackedFormat::Q3_K {
                out.h[0] = f16_bits(b, 108);
                out.sc = k.sc.map(|s| s as u8);
            } else if format == PackedFormat::Q2_K {
                out.h = [f16_bits(b, 80), f16_bits(b, 82)];
                out.sc = std::array::from_fn(|g| k.sc[g] as u8 | (k.mn[g] as u8) << 4);
            } else {
                out.h = [f16_bits(b, 0), f16_bits(b, 2)];
                // The group scales come in equal pairs (one per 32-element block).
                for blk in 0..8 {
                    out.sc[blk] = k.sc[2 * blk] as u8;
                    out.mn[blk] = k.mn[2 * blk] as u8;
                }
            }
        }
    }
    out
}

/// Appends the header of one super-block of a tile.
fn put_header(format: PackedFormat, rows: &[Decoded; TILE_ROWS], out: &mut Vec<u8>) {
    let halves = |i: usize, out: &mut Vec<u8>| {
        for r in rows {
            out.extend_from_slice(&r.h[i].to_le_bytes());
        }
    };
    match format.scheme() {
        Scheme::Block32 { stored_min, .. } => {
            halves(0, out);
            if stored_min {
                halves(1, out);
            }
        }
        Scheme::K32 => {
            halves(0, out);
            halves(1, out);
            for b in 0..8 {
                out.extend(rows.iter().map(|r| r.sc[b]));
            }
            for b in 0..8 {
                out.extend(rows.iter().map(|r| r.mn[b]));
            }
        }
        Scheme::K16 { mins, .. } => {
            halves(0, out);
            if mins {
                halves(1, out);
            }
            for g in 0..16 {
                out.extend(rows.iter().map(|r| r.sc[g]));
            }
        }
    }
}

/// Appends the values of 32-element block `b` of a super-block of a tile.
fn put_values(format: PackedFormat, rows: &[Decoded; TILE_ROWS], b: usize, out: &mut Vec<u8>) {
    let u = |r: usize, e: usize| rows[r].u[QK * b + e];
    // The top-bit masks of the Q5 formats (bit 4) and Q3_K (bit 2), for value register
    // `4 * half + k` at index `2k + half`.
    let masks = |bit: u32, out: &mut Vec<u8>| {
        for k in 0..4 {
            for half in [0, 16] {
                let mut mask = 0u64;
                for r in 0..TILE_ROWS {
                    for i in 0..4 {
                        let b = (u(r, half + 4 * k + i) >> bit) & 1;
                        mask |= u64::from(b) << (4 * r + i);
                    }
                }
                out.extend_from_slice(&mask.to_le_bytes());
            }
        }
    };
    match format.bits() {
        8 => {
            for j in 0..8 {
                for r in 0..TILE_ROWS {
                    out.extend((0..4).map(|i| u(r, 4 * j + i)));
                }
            }
            return;
        }
        2 | 3 => {
            for m in 0..2 {
                for r in 0..TILE_ROWS {
                    out.extend((0..4).map(|i| {
                        (0..4).fold(0u8, |acc, t| {
                            acc | (u(r, 4 * (2 * t + m) + i) & 3) << (2 * t)
                        })
                    }));
                }
            }
            if format.bits() == 3 {
                masks(2, out);
            }
            return;
        }
        _ => {}
    }
    for k in 0..4 {
        for r in 0..TILE_ROWS {
            out.extend((0..4).map(|i| (u(r, 4 * k + i) & 0x0f) | (u(r, 16 + 4 * k + i) << 4)));
        }
    }
    match format.bits() {
        5 => masks(4, out),
        6 => {
            for half in [0, 16] {
                for r in 0..TILE_ROWS {
                    out.extend((0..4).map(|i| {
                        (0..4).fold(0u8, |acc, k| {
                            acc | ((u(r, half + 4 * k + i) >> 4) << (2 * k))
                        })
                    }));
                }
            }
        }
        _ => {}
    }
}

/// Repacks `w` (in `format`'s stored type) into tiles, the last padded with zero rows; runs of
/// tiles are packed on one thread per core (a 1.5B model's matrices take seconds on one).
pub(super) fn pack(format: PackedFormat, w: &MatRef) -> WeightBytes {
    let tiles = w.rows.div_ceil(TILE_ROWS);
    let tb = format.tile_bytes(w.cols);
    let mut out = WeightBytes::zeroed(tiles * tb);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = tiles.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (c, dst) in out.chunks_mut(per * tb).enumerate() {
            s.spawn(move || {
                let mut buf = Vec::with_capacity(dst.len());
                for t in c * per..c * per + dst.len() / tb {
                    pack_tile(format, w, t, &mut buf);
                }
                dst.copy_from_slice(&buf);
            });
        }
    });
    out
}

/// Appends tile `t` of `w`.
fn pack_tile(format: PackedFormat, w: &MatRef, t: usize, out: &mut Vec<u8>) {
    let sb = format.dtype().block_bytes();
    let supers = w.cols / format.super_len();
    let blocks = format.super_len() / QK;
    let mut rows = [ZERO; TILE_ROWS];
    for s in 0..supers {
        for (r, d) in rows.iter_mut().enumerate() {
            let row = t * TILE_ROWS + r;
            *d = if row < w.rows {
                decode(format, &w.row(row)[s * sb..(s + 1) * sb])
            } else {
                ZERO
            };
        }
        put_header(format, &rows, out);
        for b in 0..blocks {
            put_values(format, &rows, b, out);
        }
    }
}

/// The header and values of 32-element block `b` of a tile (which is in super-block
/// `b / blocks`).
fn block_parts(format: PackedFormat, tile: &[u8], b: usize) -> (&[u8], &[u8]) {
    let blocks = format.super_len() / QK;
    let (s, bi) = (b / blocks, b % blocks);
    let super_bytes = format.header_bytes() + blocks * format.block_value_bytes();
    let h = &tile[s * super_bytes..];
    let v = &h[format.header_bytes() + bi * format.block_value_bytes()..];
    (h, v)
}

/// f16 field `i` (`d`, then `m` or `dmin`) of row `r` in a super-block header.
fn header_f16(h: &[u8], i: usize, r: usize) -> f32 {
    half::f16::from_bits(f16_bits(h, 2 * TILE_ROWS * i + 2 * r)).to_f32()
}

/// Row `r`'s scale and minimum of 32-element block `b` of a Block32 tile (the scalar kernel's
/// view): element `e`'s weight is `scale * u[e] + min`.
pub(super) fn block32_scales(format: PackedFormat, tile: &[u8], b: usize, r: usize) -> (f32, f32) {
    let (h, _) = block_parts(format, tile, b);
    let Scheme::Block32 {
        stored_min,
        implied,
    } = format.scheme()
    else {
        unreachable!("{format:?} has super-block scales");
    };
    let d = header_f16(h, 0, r);
    (
        d,
        if stored_min {
            header_f16(h, 1, r)
        } else {
            implied * d
        },
    )
}

/// Row `r`'s scales of super-block `s` of a k-quant tile, as the kernels apply them: element
/// `e`'s weight is `d * sc[e / 16] * (u[e] - offset) - dmin * mn[e / 16]`.
pub(super) struct KScales {
    pub d: f32,
    pub dmin: f32,
    pub sc: [i32; 16],
    pub mn: [i32; 16],
    pub offset: i32,
}

/// See [`KScales`].
pub(super) fn k_scales(format: PackedFormat, tile: &[u8], s: usize, r: usize) -> KScales {
    let blocks = QK_K / QK;
    let (h, _) = block_parts(format, tile, s * blocks);
    let rows = TILE_ROWS;
    let mut k = KScales {
        d: header_f16(h, 0, r),
        dmin: 0.0,
        sc: [0; 16],
        mn: [0; 16],
        offset: 0,
    };
    match format.scheme() {
        Scheme::K32 => {
            k.dmin = header_f16(h, 1, r);
            for g in 0..16 {
                k.sc[g] = h[4 * rows + g / 2 * rows + r] as i32;
                k.mn[g] = h[12 * rows + g / 2 * rows + r] as i32;
            }
        }
        Scheme::K16 { offset, mins } => {
            k.offset = offset;
            if mins {
                k.dmin = header_f16(h, 1, r);
            }
            let scales = if mins { 4 * rows } else { 2 * rows };
            for g in 0..16 {
                let byte = h[scales + g * rows + r];
                if mins {
                    k.sc[g] = (byte & 0x0f) as i32;
                    k.mn[g] = (byte >> 4) as i32;
                } else {
                    k.sc[g] = byte as i8 as i32;
                }
            }
        }
        Scheme::Block32 { .. } => unreachable!("{format:?} has block scales"),
    }
    k
}

/// Row `r`'s unsigned values of 32-element block `b` of a tile, read back from the layout (for
/// the table formats, looked up).
pub(super) fn read_values(format: PackedFormat, tile: &[u8], b: usize, r: usize) -> [u8; QK] {
    let (_, v) = block_parts(format, tile, b);
    // Bit `4r + i` of top-bit mask `idx`.
    let mask_bit = |idx: usize, i: usize| {
        let m = &v[format.block_value_bytes() - 64 + 8 * idx..];
        let mask = u64::from_le_bytes(m[..8].try_into().unwrap());
        ((mask >> (4 * r + i)) & 1) as u8
    };
    std::array::from_fn(|e| {
        let (j, i) = (e / 4, e % 4);
        if format.bits() == 8 {
            v[64 * j + 4 * r + i]
        } else if format.bits() <= 3 {
            let low = (v[64 * (j % 2) + 4 * r + i] >> (2 * (j / 2))) & 3;
            let third = if format.bits() == 3 {
                mask_bit(2 * (j % 4) + j / 4, i) << 2
            } else {
                0
            };
            low | third
        } else {
            let nib = v[64 * (j % 4) + 4 * r + i];
            let low = if j < 4 { nib & 0x0f } else { nib >> 4 };
            if format.table() {
                return iq4::UNSIGNED[low as usize];
            }
            let extra = &v[256..];
            let high = match format.bits() {
                5 => mask_bit(2 * (j % 4) + j / 4, i) << 4,
                6 => ((extra[64 * (j / 4) + 4 * r + i] >> (2 * (j % 4))) & 3) << 4,
                _ => 0,
            };
            low | high
        }
    })
}
