//! Portable reference dot products.

use super::DotKernel;
use crate::act::{BlockQ8, BlockQ8K};
use crate::dequant::{q4_k_scale_min, q5_values, q6_k_values};
use crate::dtype::{f16_at, DType, QK_K};

pub(super) fn kernel(dtype: DType) -> Option<DotKernel> {
    Some(match dtype {
        DType::Q4_0 => DotKernel::Q8(q4_0, None),
        DType::Q4_1 => DotKernel::Q8(q4_1, None),
        DType::Q5_0 => DotKernel::Q8(q5_0, None),
        DType::Q5_1 => DotKernel::Q8(q5_1, None),
        DType::Q8_0 => DotKernel::Q8(q8_0, None),
        DType::Q4_K => DotKernel::Q8K(q4_k),
        DType::Q6_K => DotKernel::Q8K(q6_k),
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

fn q4_k(w: &[u8], a: &[BlockQ8K]) -> f32 {
    let mut acc = 0f32;
    for (b, y) in w.chunks_exact(144).zip(a) {
        let scales = &b[4..16];
        let qs = &b[16..144];
        let (mut sumi, mut summ) = (0i32, 0i32);
        for j in 0..8 {
            let (sc, m) = q4_k_scale_min(j, scales);
            let q = &qs[32 * (j / 2)..32 * (j / 2) + 32];
            let yq = &y.qs[32 * j..32 * j + 32];
            let shift = 4 * (j % 2) as u32;
            let isum: i32 = q
                .iter()
                .zip(yq)
                .map(|(&q, &v)| ((q >> shift) & 0x0f) as i32 * v as i32)
                .sum();
            sumi += sc as i32 * isum;
            summ += m as i32 * (y.bsums[2 * j] as i32 + y.bsums[2 * j + 1] as i32);
        }
        acc += f16_at(b, 0) * y.d * sumi as f32 - f16_at(b, 2) * y.d * summ as f32;
    }
    acc
}

fn q6_k(w: &[u8], a: &[BlockQ8K]) -> f32 {
    let mut acc = 0f32;
    let mut q = [0i8; QK_K];
    for (b, y) in w.chunks_exact(210).zip(a) {
        q6_k_values(b, &mut q);
        let mut sumi = 0i32;
        for g in 0..16 {
            let isum: i32 = q[16 * g..16 * g + 16]
                .iter()
                .zip(&y.qs[16 * g..16 * g + 16])
                .map(|(&q, &v)| q as i32 * v as i32)
                .sum();
            sumi += b[192 + g] as i8 as i32 * isum;
        }
        acc += f16_at(b, 208) * y.d * sumi as f32;
    }
    acc
}
