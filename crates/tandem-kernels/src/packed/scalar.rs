//! The reference dot product on packed weights, which the SIMD kernels are tested against.

use super::{f16_at, ActGroup, PackedFormat, PackedKernels, GROUP_BLOCKS};

/// Dot product of packed row `w` (`nb` blocks) with one activation row.
pub fn dot(format: PackedFormat, w: &[u8], act: &[ActGroup], nb: usize) -> f32 {
    let mut sum = 0f32;
    let mut p = 0;
    for (g, a) in act.iter().enumerate() {
        let tb = (nb - g * GROUP_BLOCKS).min(GROUP_BLOCKS);
        let bytes = &w[p..p + format.group_bytes(tb)];
        let values = &bytes[tb * if format.stores_min() { 4 } else { 2 }..];
        for b in 0..tb {
            let d = f16_at(bytes, b);
            let m = if format.stores_min() {
                f16_at(&bytes[2 * tb..], b)
            } else {
                format.implied_min() * d
            };
            // Fifth bits (Q5): after the nibbles, 16 per block for each half.
            let fifth = |half: usize, e: usize| {
                let m = &values[16 * tb + 2 * tb * half + 2 * b..];
                let bits = u16::from_le_bytes([m[0], m[1]]);
                (((bits >> e) & 1) as u8) << 4
            };
            let mut isum = 0i32;
            for e in 0..16 {
                let (lo, hi) = match format.bits() {
                    4 => {
                        let v = values[16 * b + e];
                        (v & 0x0f, v >> 4)
                    }
                    5 => {
                        let v = values[16 * b + e];
                        ((v & 0x0f) | fifth(0, e), (v >> 4) | fifth(1, e))
                    }
                    _ => (values[16 * b + e], values[16 * tb + 16 * b + e]),
                };
                isum += lo as i32 * a.qs[16 * b + e] as i32;
                isum += hi as i32 * a.qs[64 + 16 * b + e] as i32;
            }
            sum += d * a.d[4 * b] * isum as f32 + m * a.s[b];
        }
        p += bytes.len();
    }
    sum
}

fn rows<const R: usize, const F: u8>(w: &[u8], acts: [&[ActGroup]; R], nb: usize) -> [f32; R] {
    acts.map(|a| dot(PackedFormat::from_id(F), w, a, nb))
}

pub(super) fn kernels(format: PackedFormat) -> PackedKernels {
    super::kernel_set!(rows, format)
}
