//! Scalar dequantization of stored rows to f32: the reference every other path is checked
//! against, and the way embeddings and the exact (float) matmul read quantized weights.

use crate::dtype::{f16_at, DType, QK, QK_K};
use crate::iq4;
use crate::kquant;

/// Dequantizes `out.len()` elements of `dtype` from `src` (which must hold exactly that many).
///
/// # Panics
/// If `src` is not exactly `dtype.row_bytes(out.len())` bytes; callers validate shapes first.
pub fn dequantize_row(dtype: DType, src: &[u8], out: &mut [f32]) {
    let n = out.len();
    assert_eq!(
        Some(src.len()),
        dtype.row_bytes(n),
        "dequantize_row: {} bytes for {n} {dtype} elements",
        src.len()
    );
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        DType::Q4_0 => blocks(src, out, 18, QK, q4_0_block),
        DType::Q4_1 => blocks(src, out, 20, QK, q4_1_block),
        DType::Q5_0 => blocks(src, out, 22, QK, q5_0_block),
        DType::Q5_1 => blocks(src, out, 24, QK, q5_1_block),
        DType::Q8_0 => blocks(src, out, 34, QK, q8_0_block),
        DType::IQ4_NL => blocks(src, out, 18, QK, iq4_nl_block),
        DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K | DType::IQ4_XS => {
            for (b, o) in src
                .chunks_exact(dtype.block_bytes())
                .zip(out.chunks_exact_mut(QK_K))
            {
                kquant::dequantize(dtype, b, o);
            }
        }
    }
}

fn blocks(src: &[u8], out: &mut [f32], bb: usize, bl: usize, f: fn(&[u8], &mut [f32])) {
    for (b, o) in src.chunks_exact(bb).zip(out.chunks_exact_mut(bl)) {
        f(b, o);
    }
}

fn q4_0_block(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

fn q4_1_block(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    for j in 0..16 {
        let q = b[4 + j];
        y[j] = (q & 0x0f) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// The 5-bit values of a Q5_0 / Q5_1 block's 32 elements (unsigned, 0..32): low nibbles from
/// `qs`, fifth bits from the little-endian `qh` word (bit j for element j).
#[inline(always)]
pub(crate) fn q5_values(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let h = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut v = [0u8; 32];
    for j in 0..16 {
        v[j] = (qs[j] & 0x0f) | ((((h >> j) & 1) as u8) << 4);
        v[j + 16] = (qs[j] >> 4) | ((((h >> (j + 16)) & 1) as u8) << 4);
    }
    v
}

fn q5_0_block(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in y.iter_mut().zip(&q5_values(&b[2..6], &b[6..22])) {
        *o = (q as i32 - 16) as f32 * d;
    }
}

fn q5_1_block(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (o, &q) in y.iter_mut().zip(&q5_values(&b[4..8], &b[8..24])) {
        *o = q as f32 * d + m;
    }
}

fn q8_0_block(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = b[2 + j] as i8 as f32 * d;
    }
}

fn iq4_nl_block(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, i) in y.iter_mut().zip(iq4::indices(&b[2..18])) {
        *o = d * iq4::VALUES[i as usize] as f32;
    }
}
