//! Activation quantization: each row of activations is quantized once per matmul to int8
//! blocks, so the weight dot products run on integers. Rounding is to nearest, ties to even,
//! in every quantizer (as SIMD conversions round), so all paths see the same integers.

use crate::dtype::{QK, QK_K};

/// 32 activations as int8 with their scale and the scaled sum (for formats with an offset).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct BlockQ8 {
    /// Scale: value = `d * qs[i]`.
    pub d: f32,
    /// `d * sum(qs)`, used by formats whose weights carry a minimum (Q4_1) or offset (Q4_0).
    pub s: f32,
    /// Quantized values.
    pub qs: [i8; QK],
}

/// 256 activations as int8 with their scale and per-16 sums (the k-quant partner format).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ8K {
    /// Scale: value = `d * qs[i]`.
    pub d: f32,
    /// Quantized values.
    pub qs: [i8; QK_K],
    /// Sum of each group of 16 quantized values.
    pub bsums: [i16; 16],
}

impl Default for BlockQ8K {
    fn default() -> Self {
        BlockQ8K {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; 16],
        }
    }
}

#[inline(always)]
fn scale_of(x: &[f32]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    (d, id)
}

/// Quantizes `x` (a multiple of 32 long) into `out` (`x.len() / 32` blocks).
pub fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    debug_assert_eq!(x.len(), out.len() * QK);
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let (d, id) = scale_of(xs);
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(xs) {
            let r = (v * id).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        b.d = d;
        b.s = d * sum as f32;
    }
}

/// Quantizes `x` (a multiple of 256 long) into `out` (`x.len() / 256` blocks).
pub fn quantize_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    debug_assert_eq!(x.len(), out.len() * QK_K);
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        let (d, id) = scale_of(xs);
        for (q, &v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round_ties_even() as i8;
        }
        for (s, g) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
            *s = g.iter().map(|&q| q as i16).sum();
        }
        b.d = d;
    }
}
