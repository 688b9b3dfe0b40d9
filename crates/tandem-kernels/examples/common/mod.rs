//! What the speed examples share.

use tandem_kernels::packed::PackedMat;
use tandem_kernels::{DType, MatRef};

/// An `n` x `k` matrix of format `d` with synthetic bytes and sane f16 scales (0x3c00 = 1.0
/// everywhere scales are read), repacked; `seed` varies the values between matrices.
pub fn synthetic_packed(d: DType, n: usize, k: usize, seed: usize) -> PackedMat {
    let rb = d
        .row_bytes(k)
        .expect("a quantized type and a fitting width");
    let data: Vec<u8> = (0..n * rb)
        .map(|i| {
            if i % 2 == 1 {
                0x2c
            } else {
                ((i + seed) * 7 % 251) as u8
            }
        })
        .collect();
    let w = MatRef::new(d, n, k, &data).expect("a consistent shape");
    PackedMat::pack(&w).expect("a format with packed kernels")
}
