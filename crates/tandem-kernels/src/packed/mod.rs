//! Weights repacked at load time for wide integer dot products.
//!
//! ggml's 32-element blocks interleave each block's scale with its values, so a kernel handles
//! one block (32 values) per step. Here each row is regrouped four blocks at a time: the four
//! scales, then the four minimums (Q4_1 only), then the values of the four blocks, so one
//! 64-byte load brings 128 weights and one `vpdpbusd` multiplies 64 of them. A group has
//! exactly the bytes of its four source blocks, so a packed matrix reads as many bytes as the
//! stored one. Activations are quantized into [`ActGroup`]s whose value order matches.
//!
//! Value order inside a group of `tb` blocks (4, or 1..3 for a row's last group): the first
//! part holds elements 0..16 of each block (16 bytes per block), the second elements 16..32.
//! For the nibble formats one byte carries both (low nibble: element `e`, high: `e + 16`, as
//! in ggml); Q8_0 values are stored as `q + 128` so all weights are unsigned, and every format
//! becomes `value = d * u + m` with `m` stored (Q4_1, Q5_1) or `-8d` / `-16d` / `-128d`
//! (Q4_0 / Q5_0 / Q8_0). The Q5 formats keep the nibbles as Q4 does and follow them with their
//! fifth bits as two bit masks over the group's value bytes (the first part's, then the
//! second's; 2 bytes per block each), so one mask register adds 16 to 64 values at once.

mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use half::f16;

use crate::dtype::{DType, QK};
use crate::matmul::MatRef;
use crate::par::{chunk_rows, for_each_task, SyncPtr};
use crate::simd::SimdLevel;

/// Blocks per group.
pub const GROUP_BLOCKS: usize = 4;
/// Elements per group.
pub const GROUP_LEN: usize = GROUP_BLOCKS * QK;

/// The source format of a packed matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackedFormat {
    /// 4-bit values, offset -8 (`m = -8d`).
    Q4_0,
    /// 4-bit values with a stored minimum.
    Q4_1,
    /// 8-bit values stored with +128 (`m = -128d`).
    Q8_0,
    /// 5-bit values, offset -16 (`m = -16d`).
    Q5_0,
    /// 5-bit values with a stored minimum.
    Q5_1,
}

impl PackedFormat {
    /// The format of a kernel's const parameter (0..4: Q4_0, Q4_1, Q8_0, Q5_0, Q5_1).
    pub(crate) const fn from_id(id: u8) -> PackedFormat {
        match id {
            0 => PackedFormat::Q4_0,
            1 => PackedFormat::Q4_1,
            2 => PackedFormat::Q8_0,
            3 => PackedFormat::Q5_0,
            _ => PackedFormat::Q5_1,
        }
    }

    fn of(dtype: DType) -> Option<PackedFormat> {
        match dtype {
            DType::Q4_0 => Some(PackedFormat::Q4_0),
            DType::Q4_1 => Some(PackedFormat::Q4_1),
            DType::Q8_0 => Some(PackedFormat::Q8_0),
            DType::Q5_0 => Some(PackedFormat::Q5_0),
            DType::Q5_1 => Some(PackedFormat::Q5_1),
            _ => None,
        }
    }

    /// Whether each block stores its minimum.
    pub(crate) const fn stores_min(self) -> bool {
        matches!(self, PackedFormat::Q4_1 | PackedFormat::Q5_1)
    }

    /// Bits per value.
    pub(crate) const fn bits(self) -> usize {
        match self {
            PackedFormat::Q8_0 => 8,
            PackedFormat::Q5_0 | PackedFormat::Q5_1 => 5,
            _ => 4,
        }
    }

    /// Whether values are nibbles (with fifth bits for Q5) rather than bytes.
    pub(crate) const fn nibbles(self) -> bool {
        self.bits() < 8
    }

    /// `m / d` for formats whose minimum is implied by the scale.
    pub(crate) fn implied_min(self) -> f32 {
        match self {
            PackedFormat::Q4_0 => -8.0,
            PackedFormat::Q5_0 => -16.0,
            PackedFormat::Q8_0 => -128.0,
            PackedFormat::Q4_1 | PackedFormat::Q5_1 => 0.0,
        }
    }

    /// Bytes of a group of `tb` blocks.
    pub(crate) fn group_bytes(self, tb: usize) -> usize {
        let scales = if self.stores_min() { 4 } else { 2 };
        tb * (scales + QK * self.bits() / 8)
    }
}

/// A weight matrix in the packed layout (see the module docs).
#[derive(Clone, Debug)]
pub struct PackedMat {
    /// Source format.
    pub format: PackedFormat,
    /// Rows (output features).
    pub rows: usize,
    /// Elements per row (input features), a multiple of 32.
    pub cols: usize,
    data: Vec<u8>,
}

impl PackedMat {
    /// Repacks a Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 matrix; `None` for other formats.
    pub fn pack(w: &MatRef) -> Option<PackedMat> {
        let format = PackedFormat::of(w.dtype)?;
        let mut data = Vec::with_capacity(w.data.len());
        let bb = w.dtype.block_bytes();
        for r in 0..w.rows {
            for group in w.row(r).chunks(GROUP_BLOCKS * bb) {
                pack_group(format, group, bb, &mut data);
            }
        }
        debug_assert_eq!(data.len(), w.data.len());
        Some(PackedMat {
            format,
            rows: w.rows,
            cols: w.cols,
            data,
        })
    }

    /// Blocks per row.
    pub fn blocks(&self) -> usize {
        self.cols / QK
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.rows.max(1)
    }

    /// The packed bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
}

/// Appends one group (the source blocks `src`, `bb` bytes each) in the packed layout.
fn pack_group(format: PackedFormat, src: &[u8], bb: usize, out: &mut Vec<u8>) {
    let blocks: Vec<&[u8]> = src.chunks_exact(bb).collect();
    for b in &blocks {
        out.extend_from_slice(&b[..2]);
    }
    if format.stores_min() {
        for b in &blocks {
            out.extend_from_slice(&b[2..4]);
        }
    }
    let values = if format.stores_min() { 4 } else { 2 };
    match format {
        PackedFormat::Q4_0 | PackedFormat::Q4_1 => {
            for b in &blocks {
                out.extend_from_slice(&b[values..values + 16]);
            }
        }
        PackedFormat::Q5_0 | PackedFormat::Q5_1 => {
            // Source blocks: scales, the 32-bit fifth-bit word (bit e for element e), nibbles.
            for b in &blocks {
                out.extend_from_slice(&b[values + 4..values + 20]);
            }
            for half in [0..2, 2..4] {
                for b in &blocks {
                    out.extend_from_slice(&b[values + half.start..values + half.end]);
                }
            }
        }
        PackedFormat::Q8_0 => {
            for half in [0..16, 16..32] {
                for b in &blocks {
                    out.extend(b[2 + half.start..2 + half.end].iter().map(|&q| q ^ 0x80));
                }
            }
        }
    }
}

/// Four 32-element blocks of one activation row, quantized to int8, in the packed value order.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
pub struct ActGroup {
    /// Values: element `e < 16` of block `b` at `16b + e`, element `16 + e` at `64 + 16b + e`.
    pub qs: [i8; 2 * 64],
    /// Each block's scale, repeated over the block's four 32-bit lanes.
    pub d: [f32; 16],
    /// Each block's `d * sum(qs)` (for the weight minimums).
    pub s: [f32; 4],
}

impl Default for ActGroup {
    fn default() -> Self {
        ActGroup {
            qs: [0; 128],
            d: [0.0; 16],
            s: [0.0; 4],
        }
    }
}

/// Quantizes one activation row (a multiple of 32 long) into `out` (`ceil(len / 128)` groups);
/// blocks past the row's end are zero.
pub fn quantize_act(x: &[f32], out: &mut [ActGroup]) {
    debug_assert_eq!(out.len(), x.len().div_ceil(GROUP_LEN));
    for (g, xs) in out.iter_mut().zip(x.chunks(GROUP_LEN)) {
        *g = ActGroup::default();
        for (b, blk) in xs.chunks_exact(QK).enumerate() {
            let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (e, &v) in blk.iter().enumerate() {
                // Ties to even, as the SIMD twin's conversion rounds.
                let q = (v * id).round_ties_even() as i32;
                sum += q;
                g.qs[(e / 16) * 64 + 16 * b + e % 16] = q as i8;
            }
            g.d[4 * b..4 * b + 4].fill(d);
            g.s[b] = d * sum as f32;
        }
    }
}

/// Dot products of one packed weight row with `R` activation rows.
pub(crate) type DotRows<const R: usize> = unsafe fn(&[u8], [&[ActGroup]; R], usize) -> [f32; R];

/// The kernels of one format at one SIMD level, for 1, 2, 4 and 8 activation rows.
#[derive(Clone, Copy)]
pub(crate) struct PackedKernels {
    pub one: DotRows<1>,
    pub two: DotRows<2>,
    pub four: DotRows<4>,
    pub eight: DotRows<8>,
}

/// The 1/2/4/8-row instances of a kernel `$rows::<R, FORMAT_ID>` for `$format`.
macro_rules! kernel_set {
    ($rows:ident, $format:expr) => {{
        macro_rules! set {
            ($f:literal) => {
                PackedKernels {
                    one: $rows::<1, $f>,
                    two: $rows::<2, $f>,
                    four: $rows::<4, $f>,
                    eight: $rows::<8, $f>,
                }
            };
        }
        match $format {
            PackedFormat::Q4_0 => set!(0),
            PackedFormat::Q4_1 => set!(1),
            PackedFormat::Q8_0 => set!(2),
            PackedFormat::Q5_0 => set!(3),
            PackedFormat::Q5_1 => set!(4),
        }
    }};
}
use kernel_set;

/// Whether packed kernels faster than the stored-format ones exist at `level`.
pub fn worth_packing(level: SimdLevel) -> bool {
    level >= SimdLevel::Avx512Vnni && level.is_supported()
}

fn kernels(format: PackedFormat, level: SimdLevel) -> PackedKernels {
    #[cfg(target_arch = "x86_64")]
    if worth_packing(level) {
        return x86::kernels(format);
    }
    let _ = level;
    scalar::kernels(format)
}

/// The activation quantizer for `level` ([`quantize_act`] or its SIMD twin).
pub fn act_quantizer(level: SimdLevel) -> fn(&[f32], &mut [ActGroup]) {
    #[cfg(target_arch = "x86_64")]
    if worth_packing(level) {
        // SAFETY: worth_packing checked AVX-512 F/BW/VL support.
        return |x, out| unsafe { x86::quantize_act(x, out) };
    }
    let _ = level;
    quantize_act
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` with packed weights. Each task takes a slice of weight rows
/// and runs the activation rows against it eight at a time, so a weight group is unpacked once
/// per eight rows; a row's result does not depend on how many rows run with it.
pub fn matmul_packed(x: &[f32], m: usize, w: &PackedMat, out: &mut [f32], level: SimdLevel) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k, "matmul: x is not [{m}, {k}]");
    assert_eq!(out.len(), m * n, "matmul: out is not [{m}, {n}]");
    if m == 0 || n == 0 {
        return;
    }
    let groups = k.div_ceil(GROUP_LEN);
    let mut act = vec![ActGroup::default(); m * groups];
    let act_ptr = SyncPtr(act.as_mut_ptr());
    let quantize = act_quantizer(level);
    for_each_task(m.div_ceil(8), |c| {
        for i in c * 8..(c * 8 + 8).min(m) {
            // SAFETY: row i's groups are written by this task only.
            let dst = unsafe { act_ptr.slice_mut(i * groups, groups) };
            quantize(&x[i * k..(i + 1) * k], dst);
        }
    });
    let kern = kernels(w.format, level);
    let nb = w.blocks();
    let rb = w.row_bytes();
    let chunk = chunk_rows(n, 4);
    let dst = SyncPtr(out.as_mut_ptr());
    let row_act = |i: usize| &act[i * groups..(i + 1) * groups];
    for_each_task(n.div_ceil(chunk), |c| {
        let rows = c * chunk..((c + 1) * chunk).min(n);
        let put = |i: usize, j: usize, v: &[f32]| {
            for (q, &v) in v.iter().enumerate() {
                // SAFETY: column j is in this task's row range; no other task writes it.
                unsafe { dst.write((i + q) * n + j, v) };
            }
        };
        let mut i = 0;
        while i < m {
            let left = m - i;
            for j in rows.clone() {
                let wr = &w.data[j * rb..(j + 1) * rb];
                // SAFETY: the kernels were chosen for a supported level; rows are nb blocks.
                unsafe {
                    match left {
                        8.. => {
                            let a = std::array::from_fn(|q| row_act(i + q));
                            put(i, j, &(kern.eight)(wr, a, nb))
                        }
                        4..=7 => put(
                            i,
                            j,
                            &(kern.four)(wr, std::array::from_fn(|q| row_act(i + q)), nb),
                        ),
                        2..=3 => put(i, j, &(kern.two)(wr, [row_act(i), row_act(i + 1)], nb)),
                        _ => put(i, j, &(kern.one)(wr, [row_act(i)], nb)),
                    }
                }
            }
            i += match left {
                8.. => 8,
                4..=7 => 4,
                2..=3 => 2,
                _ => 1,
            };
        }
    });
}

/// The f16 at `p` as f32.
#[inline(always)]
pub(crate) fn f16_at(p: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([p[2 * i], p[2 * i + 1]]).to_f32()
}
