//! Float dot products whose additions come in one fixed order: every product `x[e] · w[e]`
//! goes by a fused multiply-add into running sum `e % 8`, in element order, and the eight
//! sums are added in a fixed tree. An element's result then depends only on its two rows, not
//! on the matrix's shape, the batch, the thread count or the SIMD level, so the float path is
//! batch-invariant and a tensor-parallel rank computes the whole model's sums bit for bit
//! (a `gemm` picks its algorithm, and with it the order, by the matrix's shape).

use crate::simd::SimdLevel;

/// Running sums per dot product (one AVX2 register).
const LANES: usize = 8;

/// Rows of `x` and of `w` for [`dots`]: `rows` rows of `len` elements, row `i` at `i * stride`.
#[derive(Clone, Copy)]
pub(crate) struct Rows<'a> {
    /// The elements.
    pub data: &'a [f32],
    /// Rows.
    pub rows: usize,
    /// Distance between rows.
    pub stride: usize,
}

/// `out(i, j) = x row i · w row j` for every pair, each over `len` elements, written by
/// `put(i, j, value)`.
pub(crate) fn dots(
    x: Rows,
    w: Rows,
    len: usize,
    level: SimdLevel,
    put: &mut dyn FnMut(usize, usize, f32),
) {
    for r in [&x, &w] {
        if r.rows > 0 {
            assert!(
                (r.rows - 1) * r.stride + len <= r.data.len(),
                "dots: rows out of range"
            );
        }
    }
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 {
        // SAFETY: AVX2 and FMA are supported at this level; the rows are in range (above).
        return unsafe { avx2::dots(x, w, len, put) };
    }
    let _ = level;
    for i in 0..x.rows {
        let xr = &x.data[i * x.stride..i * x.stride + len];
        for j in 0..w.rows {
            put(i, j, dot(xr, &w.data[j * w.stride..j * w.stride + len]));
        }
    }
}

/// The scalar twin: the same fused multiply-adds into the same sums, added in the same tree.
fn dot(x: &[f32], w: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for (e, (a, b)) in x.iter().zip(w).enumerate() {
        acc[e % LANES] = a.mul_add(*b, acc[e % LANES]);
    }
    // A partial last step adds zero products to the other sums, as the SIMD tail does.
    let rem = x.len() % LANES;
    if rem != 0 {
        for s in &mut acc[rem..] {
            *s = 0f32.mul_add(0.0, *s);
        }
    }
    reduce(acc)
}

/// The tree the eight sums are added in: lanes `l` and `l + 4`, then `l` and `l + 2`, then
/// the last two.
fn reduce(a: [f32; LANES]) -> f32 {
    let q = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let h = [q[0] + q[2], q[1] + q[3]];
    h[0] + h[1]
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Rows, LANES};
    use std::arch::x86_64::*;

    /// Four rows of `x` against three of `w` at a time (twelve sums in registers); fewer rows
    /// of `x` one at a time against four of `w` (streaming `w`).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots(
        x: Rows,
        w: Rows,
        len: usize,
        put: &mut dyn FnMut(usize, usize, f32),
    ) {
        let mut i = 0;
        while i < x.rows {
            let r = (x.rows - i).min(4);
            let mut j = 0;
            while j < w.rows {
                let c = (w.rows - j).min(if r == 4 { 3 } else { 4 });
                for q in (0..r).step_by(if r == 4 { 4 } else { 1 }) {
                    match (r, c) {
                        (4, 3) => block::<4, 3>(x, i, w, j, len, put),
                        (4, 2) => block::<4, 2>(x, i, w, j, len, put),
                        (4, _) => block::<4, 1>(x, i, w, j, len, put),
                        (_, 4) => block::<1, 4>(x, i + q, w, j, len, put),
                        (_, 3) => block::<1, 3>(x, i + q, w, j, len, put),
                        (_, 2) => block::<1, 2>(x, i + q, w, j, len, put),
                        _ => block::<1, 1>(x, i + q, w, j, len, put),
                    }
                }
                j += c;
            }
            i += r;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn block<const R: usize, const C: usize>(
        x: Rows,
        i: usize,
        w: Rows,
        j: usize,
        len: usize,
        put: &mut dyn FnMut(usize, usize, f32),
    ) {
        let xp = x.data.as_ptr().add(i * x.stride);
        let wp = w.data.as_ptr().add(j * w.stride);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let full = len / LANES * LANES;
        let step = |acc: &mut [[__m256; C]; R], xs: [__m256; R], ws: [__m256; C]| {
            for (a, xv) in acc.iter_mut().zip(xs) {
                for (s, wv) in a.iter_mut().zip(ws) {
                    *s = _mm256_fmadd_ps(xv, wv, *s);
                }
            }
        };
        for e in (0..full).step_by(LANES) {
            let ws = std::array::from_fn(|c| _mm256_loadu_ps(wp.add(c * w.stride + e)));
            let xs = std::array::from_fn(|q| _mm256_loadu_ps(xp.add(q * x.stride + e)));
            step(&mut acc, xs, ws);
        }
        if full < len {
            // The last elements, with zeros in the lanes past the end.
            let tail = |p: *const f32| {
                let mut v = [0f32; LANES];
                std::ptr::copy_nonoverlapping(p.add(full), v.as_mut_ptr(), len - full);
                _mm256_loadu_ps(v.as_ptr())
            };
            let ws = std::array::from_fn(|c| tail(wp.add(c * w.stride)));
            let xs = std::array::from_fn(|q| tail(xp.add(q * x.stride)));
            step(&mut acc, xs, ws);
        }
        for (q, a) in acc.iter().enumerate() {
            for (c, s) in a.iter().enumerate() {
                let mut lanes = [0f32; LANES];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *s);
                put(i + q, j + c, super::reduce(lanes));
            }
        }
    }
}
