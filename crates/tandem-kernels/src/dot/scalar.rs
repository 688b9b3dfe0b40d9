//! Portable reference dot products.

use super::DotKernel;
use crate::act::{BlockQ8, BlockQ8K};
use crate::dequant::q5_values;
use crate::dtype::{f16_at, DType};
use crate::iq4;
use crate::kquant::{self, k_format, K_IQ4_XS, K_Q2, K_Q3, K_Q4, K_Q5, K_Q6};

pub(super) fn kernel(dtype: DType) -> Option<DotKernel> {
    Some(match dtype {
        DType::Q4_0 => DotKernel::Q8(q4_0, None),
        DType::Q4_1 => DotKernel::Q8(q4_1, None),
        DType::Q5_0 => DotKernel::Q8(q5_0, None),
        DType::Q5_1 => DotKernel::Q8(q5_1, None),
        DType::Q8_0 => DotKernel::Q8(q8_0, None),
        DType::Q2_K => DotKernel::Q8K(k_quant::<{ K_Q2 }>, None),
        DType::Q3_K => DotKernel::Q8K(k_quant::<{ K_Q3 }>, None),
        DType::Q4_K => DotKernel::Q8K(k_quant::<{ K_Q4 }>, None),
        DType::Q5_K => DotKernel::Q8K(k_quant::<{ K_Q5 }>, None),
        DType::Q6_K => DotKernel::Q8K(k_quant::<{ K_Q6 }>, None),
        DType::IQ4_NL => DotKernel::Q8(iq4_nl, None),
        DType::IQ4_XS => DotKernel::Q8K(k_quant::<{ K_IQ4_XS }>, None),
        DType::F32 | DType::F16 | DType::BF16 => return None,
    })
}

#[inline(always)]
fn nibble_dot(qs: &[u8], y: &[i8; 32]) -> i32 {
    let mut s = 0i32;
    for j in 0..16 {
        s += (qs[j] & 0x0f) as i32 * y[j] as i32 + (qs[j] >> 4) as i32 * y[j + 16] as i32;
    }
    s
}

fn q4_0(w: &[u8], a: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(18).zip(a) {
        let d = f16_at(b, 0);
        acc += d * (y.d * nibble_dot(&b[2..18], &y.qs) as f32) - 8.0 * d * y.s;
    }
    acc
}

fn q4_1(w: &[u8], a: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(20).zip(a) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        acc += d * y.d * nibble_dot(&b[4..20], &y.qs) as f32 + m * y.s;
    }
    acc
}

#[inline(always)]
fn q5_dot(v: &[u8; 32], y: &[i8; 32]) -> i32 {
    v.iter().zip(y).map(|(&q, &y)| q as i32 * y as i32).sum()
}

fn q5_0(w: &[u8], a: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(22).zip(a) {
        let d = f16_at(b, 0);
        let v = q5_values(&b[2..6], &b[6..22]);
        acc += d * (y.d * q5_dot(&v, &y.qs) as f32) - 16.0 * d * y.s;
    }
    acc
}

fn q5_1(w: &[u8], a: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(24).zip(a) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        let v = q5_values(&b[4..8], &b[8..24]);
        acc += d * y.d * q5_dot(&v, &y.qs) as f32 + m * y.s;
    }
    acc
}

fn q8_0(w: &[u8], a: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(34).zip(a) {
        let s: i32 = b[2..34]
            .iter()
            .zip(&y.qs)
            .map(|(&q, &v)| q as i8 as i32 * v as i32)
            .sum();
        acc += f16_at(b, 0) * y.d * s as f32;
    }
    acc
}

fn iq4_nl(w: &[u8], a: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(18).zip(a) {
        let s: i32 = iq4::indices(&b[2..18])
            .iter()
            .zip(&y.qs)
            .map(|(&i, &v)| iq4::VALUES[i as usize] as i32 * v as i32)
            .sum();
        acc += f16_at(b, 0) * y.d * s as f32;
    }
    acc
}

/// A k-quant row against 256-element activation blocks, through the common decoded shape.
fn k_quant<const F: u8>(w: &[u8], a: &[BlockQ8K]) -> f32 {
    let dtype = k_format(F);
    let off = kquant::offset(dtype);
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(dtype.block_bytes()).zip(a) {
        let k = kquant::decode(dtype, b);
        let (mut sumi, mut summ) = (0i32, 0i32);
        for g in 0..16 {
            let isum: i32 = k.u[16 * g..16 * g + 16]
                .iter()
                .zip(&y.qs[16 * g..16 * g + 16])
                .map(|(&u, &v)| u as i32 * v as i32)
                .sum();
            let bsum = y.bsums[g] as i32;
            sumi += k.sc[g] as i32 * (isum - off * bsum);
            summ += k.mn[g] as i32 * bsum;
        }
        acc += y.d * (k.d * sumi as f32 - k.dmin * summ as f32);
    }
    acc
}
