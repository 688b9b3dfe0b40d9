//! The reference kernel on packed tiles, reading the layout value by value. It performs the
//! SIMD kernels' float operations in their order, so the two agree bit for bit.

use super::layout::{block32_scales, k_scales, read_values, TILE_ROWS};
use super::{ActBlock, PackedFormat, PackedKernels};
use crate::dtype::{QK, QK_K};

/// Row `r` of `tile` (`nb` blocks) dotted with one activation row.
pub fn dot(format: PackedFormat, tile: &[u8], r: usize, act: &[ActBlock], nb: usize) -> f32 {
    if format.super_len() == QK_K {
        return dot_k(format, tile, r, act, nb);
    }
    let (mut acc, mut macc) = (0f32, 0f32);
    for (b, a) in act.iter().enumerate().take(nb) {
        let u = read_values(format, tile, b, r);
        let (scale, min) = block32_scales(format, tile, b, r);
        let isum: i32 = u
            .iter()
            .zip(&a.qs)
            .map(|(&u, &q)| u as i32 * q as i32)
            .sum();
        let sum = a.half_sums[0] + a.half_sums[1];
        let i = isum - format.int_offset() * sum;
        acc = (i as f32).mul_add(scale * a.d, acc);
        if format.float_min() {
            macc = min.mul_add(a.s, macc);
        }
    }
    acc + macc
}

/// [`dot`] for the k-quants: per super-block, the integer sum of every 16 elements' products
/// times their integer scale (less the offset or the minimums' products with the activation
/// sums), then one float step with `d` (and `dmin`) and the super-block's activation scale.
fn dot_k(format: PackedFormat, tile: &[u8], r: usize, act: &[ActBlock], nb: usize) -> f32 {
    let blocks = QK_K / QK;
    let mut acc = 0f32;
    for (s, a) in act[..nb].chunks_exact(blocks).enumerate() {
        let k = k_scales(format, tile, s, r);
        let (mut isum, mut msum) = (0i32, 0i32);
        for (bi, a) in a.iter().enumerate() {
            let u = read_values(format, tile, s * blocks + bi, r);
            for h in 0..2 {
                let g = 2 * bi + h;
                let dot: i32 = (16 * h..16 * h + 16)
                    .map(|e| u[e] as i32 * a.qs[e] as i32)
                    .sum();
                isum += k.sc[g] * (dot - k.offset * a.half_sums[h]);
                msum += k.mn[g] * a.half_sums[h];
            }
        }
        let da = a[0].d;
        acc = (isum as f32).mul_add(k.d * da, acc);
        if format.float_min() {
            acc = (msum as f32).mul_add(-k.dmin * da, acc);
        }
    }
    acc
}

/// # Safety
/// `out` must hold `R` rows of [`TILE_ROWS`] floats, `stride` apart.
unsafe fn rows<const R: usize, const F: u8>(
    tile: &[u8],
    acts: [&[ActBlock]; R],
    nb: usize,
    out: *mut f32,
    stride: usize,
) {
    let format = PackedFormat::from_id(F);
    for (q, a) in acts.into_iter().enumerate() {
        for r in 0..TILE_ROWS {
            // SAFETY: the caller gives R rows of TILE_ROWS floats `stride` apart at `out`.
            unsafe { *out.add(q * stride + r) = dot(format, tile, r, a, nb) };
        }
    }
}

pub(super) fn kernels(format: PackedFormat) -> PackedKernels {
    super::kernel_set!(rows, format)
}
