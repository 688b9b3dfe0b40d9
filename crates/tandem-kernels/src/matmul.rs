//! `out[m, n] = x[m, k] · w[n, k]ᵀ` with `w` in its stored format.
//!
//! Quantized weights (fast path, the scalar reference: SIMD levels run repacked weights through
//! [`crate::packed`]): the activations are quantized once to int8 blocks, then each parallel
//! task takes a slice of weight rows and runs every activation row against it, so each weight
//! byte is read once per call whatever the batch size. Float weights and the exact path
//! dequantize a tile of weight rows to f32 and take dot products in a fixed order
//! ([`crate::fdot`]), so that each result is the same whatever the matrix's shape.

use std::ops::Range;

use crate::act::{quantize_q8, quantize_q8k, BlockQ8, BlockQ8K};
use crate::dequant::dequantize_row;
use crate::dot::{kernel, DotKernel};
use crate::dtype::{DType, QK, QK_K};
use crate::fdot::{dots, Rows};
use crate::par::{chunk_rows, for_each_task, SyncPtr};
use crate::KernelError;

/// A borrowed 2-D weight matrix in its stored format, rows of `cols` elements.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    /// Storage format.
    pub dtype: DType,
    /// Number of rows (output features).
    pub rows: usize,
    /// Elements per row (input features).
    pub cols: usize,
    /// `rows * row_bytes(cols)` bytes.
    pub data: &'a [u8],
}

impl<'a> MatRef<'a> {
    /// Checks that `data` holds exactly `rows` rows of `cols` elements of `dtype`.
    pub fn new(
        dtype: DType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
    ) -> Result<Self, KernelError> {
        let row = dtype
            .row_bytes(cols)
            .ok_or(KernelError::RowNotBlockAligned {
                dtype,
                cols,
                block: dtype.block_len(),
            })?;
        let want = row.checked_mul(rows).ok_or(KernelError::TooLarge)?;
        if data.len() != want {
            return Err(KernelError::SizeMismatch {
                expected: want,
                actual: data.len(),
            });
        }
        Ok(MatRef {
            dtype,
            rows,
            cols,
            data,
        })
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.rows.max(1)
    }

    /// The stored bytes of row `i`.
    pub fn row(&self, i: usize) -> &'a [u8] {
        let rb = self.row_bytes();
        &self.data[i * rb..(i + 1) * rb]
    }

    /// Row `i` dequantized to f32.
    pub fn row_f32(&self, i: usize, out: &mut [f32]) {
        dequantize_row(self.dtype, self.row(i), &mut out[..self.cols]);
    }
}

/// How a matmul treats activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Quantize activations to int8 for quantized weights (integer dot products).
    Fast,
    /// Dequantize weights to f32 and multiply in f32: the float reference path.
    Exact,
}

/// Computes `out[m, n] = x[m, k] · w[n, k]ᵀ` (`n = w.rows`, `k = w.cols`).
pub fn matmul(x: &[f32], m: usize, w: &MatRef, out: &mut [f32], precision: Precision) {
    matmul_parts(x, m, w, std::slice::from_ref(&(0..w.cols)), out, precision)
}

/// `out[p, m, n] = x[m, cols_p] · w[n, cols_p]ᵀ` for each part `p` of the input columns
/// (consecutive, covering them, bounds on `w`'s blocks): a row-parallel matrix's sum in the
/// parts tensor-parallel ranks hold (see `matmul_packed_parts`). Each part is computed
/// exactly as [`matmul`] computes a matrix of those columns alone.
pub fn matmul_parts(
    x: &[f32],
    m: usize,
    w: &MatRef,
    parts: &[Range<usize>],
    out: &mut [f32],
    precision: Precision,
) {
    let (n, k, p) = (w.rows, w.cols, parts.len());
    assert_eq!(x.len(), m * k, "matmul: x is not [{m}, {k}]");
    assert_eq!(out.len(), p * m * n, "matmul: out is not [{p}, {m}, {n}]");
    if m == 0 || n == 0 {
        return;
    }
    match (precision, kernel(w.dtype)) {
        (Precision::Fast, Some(DotKernel::Q8(dot, dot4))) => {
            check_parts(parts, k, [w.dtype.block_len(), QK]);
            let mut act = vec![BlockQ8::default(); m * k / QK];
            quantize_rows(x, k, &mut act, k / QK, quantize_q8);
            quantized(w, &act, QK, m, parts, out, dot, dot4);
        }
        (Precision::Fast, Some(DotKernel::Q8K(dot, dot4))) => {
            check_parts(parts, k, [w.dtype.block_len(), QK_K]);
            let mut act = vec![BlockQ8K::default(); m * k / QK_K];
            quantize_rows(x, k, &mut act, k / QK_K, quantize_q8k);
            quantized(w, &act, QK_K, m, parts, out, dot, dot4);
        }
        _ => {
            check_parts(parts, k, [w.dtype.block_len()]);
            float(x, m, w, parts, out)
        }
    }
}

/// Panics unless `parts` are consecutive column ranges covering `0..k` whose bounds are
/// multiples of every block length in `blocks` (a caller's bug otherwise).
pub(crate) fn check_parts(
    parts: &[Range<usize>],
    k: usize,
    blocks: impl IntoIterator<Item = usize>,
) {
    let bounds_ok = parts.first().is_some_and(|p| p.start == 0)
        && parts.last().is_some_and(|p| p.end == k)
        && parts.windows(2).all(|w| w[0].end == w[1].start)
        && parts.iter().all(|p| p.start < p.end);
    assert!(bounds_ok, "matmul: parts {parts:?} do not cut 0..{k}");
    for b in blocks {
        assert!(
            parts.iter().all(|p| p.end % b == 0),
            "matmul: parts {parts:?} cut blocks of {b}"
        );
    }
}

/// Quantizes each `k`-long row of `x` into its `per_row` blocks of `act`, rows in parallel.
fn quantize_rows<A: Send>(
    x: &[f32],
    k: usize,
    act: &mut [A],
    per_row: usize,
    q: fn(&[f32], &mut [A]),
) {
    let rows = x.len() / k;
    let dst = SyncPtr(act.as_mut_ptr());
    for_each_task(rows.div_ceil(8), |c| {
        for r in c * 8..(c * 8 + 8).min(rows) {
            // SAFETY: row r's blocks are written by this task only.
            q(&x[r * k..(r + 1) * k], unsafe {
                dst.slice_mut(r * per_row, per_row)
            });
        }
    });
}

/// A four-activation-row dot kernel over activation blocks `A`.
type Dot4<A> = fn(&[u8], [&[A]; 4]) -> [f32; 4];

/// Each task takes a slice of weight rows; every part of every row is one dot product over
/// the part's bytes of the row and its activation blocks (`ablock` elements each).
#[allow(clippy::too_many_arguments)]
fn quantized<A: Sync>(
    w: &MatRef,
    act: &[A],
    ablock: usize,
    m: usize,
    parts: &[Range<usize>],
    out: &mut [f32],
    dot: fn(&[u8], &[A]) -> f32,
    dot4: Option<Dot4<A>>,
) {
    let (n, k) = (w.rows, w.cols);
    let blocks = k / ablock;
    let chunk = chunk_rows(n, 8);
    let dst = SyncPtr(out.as_mut_ptr());
    // Each part's byte range in a row and block range in an activation row.
    let spans: Vec<(Range<usize>, Range<usize>)> = parts
        .iter()
        .map(|c| {
            let bytes = |cols: usize| w.dtype.row_bytes(cols).expect("checked block bounds");
            (
                bytes(c.start)..bytes(c.end),
                c.start / ablock..c.end / ablock,
            )
        })
        .collect();
    for_each_task(n.div_ceil(chunk), |c| {
        let rows = c * chunk..((c + 1) * chunk).min(n);
        for (p, (bytes, ab)) in spans.iter().enumerate() {
            let row_act = |i: usize| &act[i * blocks + ab.start..i * blocks + ab.end];
            let row_w = |j: usize| &w.row(j)[bytes.clone()];
            let at = |i: usize, j: usize| (p * m + i) * n + j;
            // Activation rows four at a time against this task's weight rows (which stay in
            // cache).
            let mut i = 0;
            if let Some(dot4) = dot4 {
                while i + 4 <= m {
                    let a = [row_act(i), row_act(i + 1), row_act(i + 2), row_act(i + 3)];
                    for j in rows.clone() {
                        let r = dot4(row_w(j), a);
                        for (q, v) in r.into_iter().enumerate() {
                            // SAFETY: column j is in this task's row range; no other task
                            // writes it.
                            unsafe { dst.write(at(i + q, j), v) };
                        }
                    }
                    i += 4;
                }
            }
            for i in i..m {
                let a = row_act(i);
                for j in rows.clone() {
                    // SAFETY: (i, j) with j in this task's row range is written by this task
                    // only.
                    unsafe { dst.write(at(i, j), dot(row_w(j), a)) };
                }
            }
        }
    });
}

/// f32 view of the weight bytes when they already are aligned f32.
fn as_f32<'a>(w: &MatRef<'a>) -> Option<&'a [f32]> {
    if w.dtype != DType::F32
        || !(w.data.as_ptr() as usize).is_multiple_of(std::mem::align_of::<f32>())
        || cfg!(target_endian = "big")
    {
        return None;
    }
    // SAFETY: aligned, little-endian, and every bit pattern is a valid f32.
    Some(unsafe { std::slice::from_raw_parts(w.data.as_ptr() as *const f32, w.data.len() / 4) })
}

fn float(x: &[f32], m: usize, w: &MatRef, parts: &[Range<usize>], out: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    let chunk = chunk_rows(n, 16);
    let dst = SyncPtr(out.as_mut_ptr());
    let direct = as_f32(w);
    for_each_task(n.div_ceil(chunk), |c| {
        let mut scratch = Vec::new();
        let rows = c * chunk..((c + 1) * chunk).min(n);
        let nc = rows.len();
        let tile: &[f32] = match direct {
            Some(all) => &all[rows.start * k..rows.end * k],
            None => {
                scratch.resize(nc * k, 0.0);
                for (r, o) in rows.clone().zip(scratch.chunks_exact_mut(k)) {
                    w.row_f32(r, o);
                }
                &scratch
            }
        };
        let level = crate::simd::active();
        for (p, cols) in parts.iter().enumerate() {
            let xs = Rows {
                data: &x[cols.start..],
                rows: m,
                stride: k,
            };
            let ws = Rows {
                data: &tile[cols.start..],
                rows: nc,
                stride: k,
            };
            dots(xs, ws, cols.len(), level, &mut |i, j, v| {
                // SAFETY: (i, rows.start + j) of part p is in this task's columns; no other
                // task writes it.
                unsafe { dst.write((p * m + i) * n + rows.start + j, v) }
            });
        }
    });
}
