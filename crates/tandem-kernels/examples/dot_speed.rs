//! Cache-resident speed of the Q4_1 dot kernels (ns per 32-element block and activation row),
//! single-row and four-row, per SIMD level: `cargo run --release -p tandem-kernels --example dot_speed`.
use std::time::Instant;
use tandem_kernels::act::{quantize_q8, BlockQ8};
use tandem_kernels::dot::{kernel, DotKernel};
use tandem_kernels::{DType, SimdLevel};

fn main() {
    let k = 576;
    let rows = 64;
    let w: Vec<u8> = (0..rows * k / 32 * 20)
        .map(|i| (i * 7 % 251) as u8 & 0x3f)
        .collect();
    let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut a = vec![BlockQ8::default(); k / 32];
    quantize_q8(&x, &mut a);
    for level in SimdLevel::supported() {
        let DotKernel::Q8(f, f4) = kernel(DType::Q4_1, level).unwrap() else {
            unreachable!()
        };
        let iters = 20_000;
        let t = Instant::now();
        let mut s = 0f32;
        for _ in 0..iters {
            for r in 0..rows {
                s += f(&w[r * k / 32 * 20..(r + 1) * k / 32 * 20], &a);
            }
        }
        let ns = t.elapsed().as_nanos() as f64 / (iters * rows * k / 32) as f64;
        println!("{level:?}: {ns:.2} ns/block ({s})");
        if let Some(f4) = f4 {
            let t = Instant::now();
            for _ in 0..iters / 4 {
                for r in 0..rows {
                    let o = f4(&w[r * k / 32 * 20..(r + 1) * k / 32 * 20], [&a, &a, &a, &a]);
                    s += o[0];
                }
            }
            let ns = t.elapsed().as_nanos() as f64 / (iters * rows * k / 32) as f64;
            println!("{level:?} x4: {ns:.2} ns/block/row ({s})");
        }
    }
}
