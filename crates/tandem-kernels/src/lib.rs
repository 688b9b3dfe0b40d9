//! Tandem's compute backend for CPUs.
//!
//! Tensors stay in their stored formats (ggml's quantized blocks, f16/bf16/f32); matmuls on
//! quantized weights quantize the activations once and use integer dot products; SIMD paths
//! are chosen at run time ([`simd::active`]) and each has a scalar twin. All of Tandem's
//! `unsafe` code lives in this crate.

pub mod act;
pub mod attention;
pub mod dequant;
pub mod dot;
pub mod dtype;
mod fdot;
mod iq4;
mod kquant;
pub mod math;
pub mod matmul;
pub mod mem;
pub mod ops;
pub mod packed;
mod par;
pub mod simd;

pub use attention::{
    paged_attention, prepare_new_rows, write_kv, AttnSeq, KvDType, KvMut, KvRef, PagedLayout,
    Rotation,
};
pub use dtype::DType;
pub use matmul::{matmul, matmul_parts, MatRef, Precision};
pub use ops::RopeStyle;
pub use packed::PackedMat;
pub use par::{allowed_cores, default_threads, pin_current_thread, ThreadPool};
pub use simd::SimdLevel;

/// Errors from checking tensor shapes against their storage.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    /// A row is not a whole number of the format's blocks.
    #[error("a row of {cols} elements is not a whole number of {dtype} blocks of {block}")]
    RowNotBlockAligned {
        dtype: DType,
        cols: usize,
        block: usize,
    },
    /// The data is not the size the shape implies.
    #[error("expected {expected} bytes of tensor data, found {actual}")]
    SizeMismatch { expected: usize, actual: usize },
    /// The shape overflows the address space.
    #[error("tensor shape too large")]
    TooLarge,
}
