//! The reference model's decode matmuls alone (30 layers of Q4_1 q/k/v, output, gate/up and
//! down, and a Q8_0 LM head; synthetic weights, 96 MB a token), so their speed shows without
//! the rest of the forward: ms and GB/s per token, `ROUNDS` (5) rounds of 100 tokens, with
//! `GAP_US` microseconds of serial spinning after each call (0) standing for the norms and
//! the like between them (its time is not counted):
//! `cargo run --release -p tandem-kernels --example decode_matmuls`.
mod common;

use common::synthetic_packed as mat;
use std::time::Instant;
use tandem_kernels::packed::{matmul_packed_many, PackedMat};
use tandem_kernels::{DType, SimdLevel, ThreadPool};

fn main() {
    let pool = ThreadPool::with_default_threads().unwrap();
    let (d, f, layers) = (576, 1536, 30);
    let q = DType::Q4_1;
    let ws: Vec<[Vec<PackedMat>; 4]> = (0..layers)
        .map(|l| {
            [
                vec![
                    mat(q, d, d, l),
                    mat(q, 192, d, l + 1),
                    mat(q, 192, d, l + 2),
                ],
                vec![mat(q, d, d, l + 3)],
                vec![mat(q, f, d, l + 4), mat(q, f, d, l + 5)],
                vec![mat(q, d, f, l + 6)],
            ]
        })
        .collect();
    let head = mat(DType::Q8_0, 49152, d, 99);
    let bytes: usize = ws
        .iter()
        .flatten()
        .flatten()
        .map(|w| w.bytes().len())
        .sum::<usize>()
        + head.bytes().len();
    let level = SimdLevel::best();
    let x: Vec<f32> = (0..f).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut outs: Vec<Vec<f32>> = vec![vec![0.0; 49152]; 3];
    let tokens = 100;
    // Serial work between the matmuls, as the caller's norms and quantization leave.
    let gap_us: f64 = std::env::var("GAP_US").map_or(0.0, |g| g.parse().unwrap());
    for round in 0..std::env::var("ROUNDS").map_or(5, |r| r.parse().unwrap()) {
        let t = Instant::now();
        pool.install(|| {
            for _ in 0..tokens {
                for layer in &ws {
                    for group in layer {
                        let k = group[0].cols;
                        let mut o: Vec<&mut [f32]> = outs
                            .iter_mut()
                            .zip(group)
                            .map(|(o, w)| &mut o[..w.rows])
                            .collect();
                        let refs: Vec<&PackedMat> = group.iter().collect();
                        matmul_packed_many(&x[..k], 1, &refs, &mut o, level);
                        let g = Instant::now();
                        while g.elapsed().as_secs_f64() * 1e6 < gap_us {
                            std::hint::spin_loop();
                        }
                    }
                }
                let (a, _) = outs.split_at_mut(1);
                matmul_packed_many(&x[..d], 1, &[&head], &mut [&mut a[0][..]], level);
            }
        });
        let ms = t.elapsed().as_secs_f64() * 1e3 / tokens as f64 - gap_us * 120.0 / 1e3;
        println!(
            "round {round}: {ms:.3} ms/token, {:.1} GB/s over {:.1} MB",
            bytes as f64 / ms / 1e6,
            bytes as f64 / 1e6
        );
    }
}
