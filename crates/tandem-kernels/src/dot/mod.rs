//! Dot products between one stored weight row and one quantized activation row: the fast
//! path at [`crate::SimdLevel::Scalar`]. SIMD levels run weights repacked into tiles instead
//! ([`crate::packed`]), which every quantized format has.

mod scalar;

use crate::act::{BlockQ8, BlockQ8K};
use crate::dtype::DType;

/// Dot product of a weight row (stored bytes) with int8 activations in 32-blocks.
pub type DotQ8 = fn(&[u8], &[BlockQ8]) -> f32;
/// Dot products of one weight row with four activation rows at once: the weight block is
/// decoded once and used four times (prefill and batched decode).
pub type DotQ8x4 = fn(&[u8], [&[BlockQ8]; 4]) -> [f32; 4];
/// Dot product of a weight row (stored bytes) with int8 activations in 256-blocks.
pub type DotQ8K = fn(&[u8], &[BlockQ8K]) -> f32;
/// [`DotQ8K`] for four activation rows at once.
pub type DotQ8Kx4 = fn(&[u8], [&[BlockQ8K]; 4]) -> [f32; 4];

/// The activation format a quantized weight format is multiplied with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActFormat {
    /// [`BlockQ8`] (32 values).
    Q8,
    /// [`BlockQ8K`] (256 values).
    Q8K,
}

/// The kernel for one weight format at one SIMD level.
#[derive(Clone, Copy)]
pub enum DotKernel {
    /// Weights meet [`BlockQ8`] activations (with a four-row kernel where one exists).
    Q8(DotQ8, Option<DotQ8x4>),
    /// Weights meet [`BlockQ8K`] activations (with a four-row kernel where one exists).
    Q8K(DotQ8K, Option<DotQ8Kx4>),
}

impl DotKernel {
    /// The activation format this kernel consumes.
    pub fn act_format(&self) -> ActFormat {
        match self {
            DotKernel::Q8(..) => ActFormat::Q8,
            DotKernel::Q8K(..) => ActFormat::Q8K,
        }
    }
}

/// The integer dot kernel for `dtype`, or `None` for float formats.
pub fn kernel(dtype: DType) -> Option<DotKernel> {
    scalar::kernel(dtype)
}
