//! Scalar dequantization of stored rows to f32: the reference every other path is checked
//! against, and the way embeddings and the exact (float) matmul read quantized weights.

use crate::dtype::{f16_at, DType, QK, QK_K};

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
        DType::Q4_K => blocks(src, out, 144, QK_K, q4_k_block),
        DType::Q6_K => blocks(src, out, 210, QK_K, q6_k_block),
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

/// The 6-bit scale and min of sub-block `j` of a Q4_K block (ggml's `get_scale_min_k4`).
#[inline(always)]
pub(crate) fn q4_k_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn q4_k_block(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (chunk, (q, yy)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (s1, m1) = q4_k_scale_min(2 * chunk, scales);
        let (s2, m2) = q4_k_scale_min(2 * chunk + 1, scales);
        let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
        for l in 0..32 {
            yy[l] = d1 * (q[l] & 0x0f) as f32 - m1;
            yy[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// The signed 6-bit values of a Q6_K block, in element order, with their 16-element scales.
#[inline(always)]
pub(crate) fn q6_k_values(b: &[u8], out: &mut [i8; QK_K]) {
    let (ql, qh) = (&b[0..128], &b[128..192]);
    for half in 0..2 {
        let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
        let o = &mut out[128 * half..];
        for l in 0..32 {
            o[l] = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i8 - 32;
            o[l + 32] = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            o[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            o[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
        }
    }
}

fn q6_k_block(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    let mut q = [0i8; QK_K];
    q6_k_values(b, &mut q);
    for (g, (qq, yy)) in q.chunks_exact(16).zip(y.chunks_exact_mut(16)).enumerate() {
        let s = d * b[192 + g] as i8 as f32;
        for (o, &v) in yy.iter_mut().zip(qq) {
            *o = s * v as f32;
        }
    }
}
