//! The reference kernel on packed tiles, reading the layout value by value. It performs the
//! SIMD kernels' float operations in their order, so the two agree bit for bit.

use super::layout::{read_block, TILE_ROWS};
use super::{ActBlock, PackedFormat, PackedKernels, Scheme};

/// Row `r` of `tile` (`nb` blocks) dotted with one activation row.
pub fn dot(format: PackedFormat, tile: &[u8], r: usize, act: &[ActBlock], nb: usize) -> f32 {
    let (mut acc, mut macc) = (0f32, 0f32);
    for (b, a) in act.iter().enumerate().take(nb) {
        let (u, scale, min, offset) = read_block(format, tile, b, r);
        let mut isum = [0i32; 2];
        for (e, (&u, &q)) in u.iter().zip(&a.qs).enumerate() {
            isum[e / 16] += u as i32 * q as i32;
        }
        match format.scheme() {
            Scheme::K16 { mins, .. } => {
                let lo = isum[0] - offset * a.half_sums[0];
                let hi = isum[1] - offset * a.half_sums[1];
                acc = (lo as f32).mul_add(scale[0] * a.d, acc);
                macc = (hi as f32).mul_add(scale[1] * a.d, macc);
                if mins {
                    acc = min[0].mul_add(a.d * a.half_sums[0] as f32, acc);
                    macc = min[1].mul_add(a.d * a.half_sums[1] as f32, macc);
                }
            }
            _ => {
                let sum = a.half_sums[0] + a.half_sums[1];
                let i = isum[0] + isum[1] - format.int_offset() * sum;
                acc = (i as f32).mul_add(scale[0] * a.d, acc);
                if format.float_min() {
                    macc = min[0].mul_add(a.s, macc);
                }
            }
        }
    }
    acc + macc
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
