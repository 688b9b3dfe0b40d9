//! Element-wise and row-wise operations of the Llama block.

use crate::par::{for_each_task, SyncPtr};

/// Runs `f(row)` for rows `0..rows`, in parallel chunks of at least eight rows (fewer rows
/// than that run on the calling thread: a decode step's one row is not worth a pool wake-up).
pub(crate) fn for_each_row(rows: usize, f: impl Fn(usize) + Sync) {
    let per = rows.div_ceil(crate::par::current_threads() * 4).max(8);
    for_each_task(rows.div_ceil(per), |c| {
        for r in c * per..((c + 1) * per).min(rows) {
            f(r);
        }
    });
}

/// The sum of `x[i]²`, in sixteen lanes (element `i` into lane `i % 16`) folded pairwise in a
/// fixed order, then the tail. One sequential sum was a chain of dependent adds the compiler
/// may not reorder: the norms were 4.7% of the reference model's prefill, at ~0.9 ns an element.
/// The order depends only on the row's length, so every row's bits are the same on any SIMD
/// level, thread count or batch.
#[inline]
fn sum_squares(x: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v * v;
        }
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
    }
    tail.iter().fold(lanes[0], |s, v| s + v * v)
}

/// One row of [`rms_norm`].
#[inline]
fn norm_row(xr: &[f32], weight: &[f32], eps: f32, o: &mut [f32]) {
    let ss = sum_squares(xr) / xr.len() as f32;
    let inv = 1.0 / (ss + eps).sqrt();
    for ((o, &v), &g) in o.iter_mut().zip(xr).zip(weight) {
        *o = v * inv * g;
    }
}

/// Row-wise RMSNorm: `out[r] = x[r] / sqrt(mean(x[r]²) + eps) * weight`, rows of `weight.len()`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    assert_eq!(x.len(), out.len());
    let dst = SyncPtr(out.as_mut_ptr());
    for_each_row(x.len() / d.max(1), |r| {
        // SAFETY: row r is written by this task only.
        let o = unsafe { dst.slice_mut(r * d, d) };
        norm_row(&x[r * d..(r + 1) * d], weight, eps, o);
    });
}

/// A residual add and the RMSNorm after it in one pass over the rows: `x += y`, then
/// `out = rms_norm(x)` (bitwise what [`add_assign`] then [`rms_norm`] give; one parallel loop
/// where they were a serial pass and a loop).
pub fn add_rms_norm(x: &mut [f32], y: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    assert_eq!(x.len(), y.len());
    assert_eq!(x.len(), out.len());
    let (xs, dst) = (SyncPtr(x.as_mut_ptr()), SyncPtr(out.as_mut_ptr()));
    for_each_row(y.len() / d.max(1), |r| {
        // SAFETY: row r of x and of out is touched by this task only.
        let (xr, o) = unsafe { (xs.slice_mut(r * d, d), dst.slice_mut(r * d, d)) };
        add_assign(xr, &y[r * d..(r + 1) * d]);
        norm_row(xr, weight, eps, o);
    });
}

/// SwiGLU's gate: `gate[i] = silu(gate[i]) * up[i]`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    const CHUNK: usize = 4096;
    let n = gate.len();
    let dst = SyncPtr(gate.as_mut_ptr());
    for_each_task(n.div_ceil(CHUNK), |c| {
        let range = c * CHUNK..((c + 1) * CHUNK).min(n);
        // SAFETY: each task owns its chunk.
        let g = unsafe { dst.slice_mut(range.start, range.len()) };
        crate::math::silu_mul_chunk(g, &up[range]);
    });
}

/// The id of the largest entry (by `total_cmp`; ties go to the lower id): a greedy step's whole
/// sampling cost.
pub fn argmax(logits: &[f32]) -> u32 {
    crate::math::argmax(logits)
}

/// [`argmax`] of rows `rows` of `values` (rows of `row_len`), one task a row: a decode step's
/// sixteen rows of a 151,936-token vocabulary are 9.7 MB to read, which the engine thread read
/// alone while the other compute threads waited.
pub fn argmax_rows(values: &[f32], row_len: usize, rows: &[usize]) -> Vec<u32> {
    let mut out = vec![0u32; rows.len()];
    let dst = SyncPtr(out.as_mut_ptr());
    for_each_task(rows.len(), |i| {
        let r = rows[i];
        // SAFETY: each task writes its own entry.
        unsafe { dst.slice_mut(i, 1)[0] = argmax(&values[r * row_len..(r + 1) * row_len]) };
    });
    out
}

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len());
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Adds `bias` to every row of `x` (rows of `bias.len()`).
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        add_assign(row, bias);
    }
}

/// Which elements RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(x[2i], x[2i+1])`: Meta's layout, and GGUF's after llama.cpp's Q/K permutation.
    Interleaved,
    /// Pairs `(x[i], x[i + d/2])`: HF transformers' `rotate_half` layout.
    Half,
}

/// Rotates each head of each row of `x` (`[rows, heads * head_dim]`) in place, row `r` by the
/// angles whose cosines and sines are `cos[r * head_dim/2 ..]`, `sin[r * head_dim/2 ..]`.
pub fn rope(
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
    style: RopeStyle,
) {
    let half = head_dim / 2;
    let width = heads * head_dim;
    let xs = SyncPtr(x.as_mut_ptr());
    for_each_row(x.len() / width.max(1), |r| {
        // SAFETY: row r is touched by this task only.
        let row = unsafe { xs.slice_mut(r * width, width) };
        let angles = r * half..(r + 1) * half;
        rope_row(row, head_dim, &cos[angles.clone()], &sin[angles], style);
    });
}

/// Rotates each head of one row (`head_dim` elements a head) by the angles whose cosines and
/// sines are `c` and `s` (`head_dim / 2` each).
#[inline]
pub(crate) fn rope_row(row: &mut [f32], head_dim: usize, c: &[f32], s: &[f32], style: RopeStyle) {
    let half = head_dim / 2;
    for h in row.chunks_exact_mut(head_dim) {
        match style {
            RopeStyle::Interleaved => {
                for i in 0..half {
                    let (a, b) = (h[2 * i], h[2 * i + 1]);
                    h[2 * i] = a * c[i] - b * s[i];
                    h[2 * i + 1] = a * s[i] + b * c[i];
                }
            }
            RopeStyle::Half => {
                for i in 0..half {
                    let (a, b) = (h[i], h[i + half]);
                    h[i] = a * c[i] - b * s[i];
                    h[i + half] = b * c[i] + a * s[i];
                }
            }
        }
    }
}
