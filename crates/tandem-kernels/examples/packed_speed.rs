//! Speed of the packed matmul on a matrix far larger than the caches, per SIMD level and
//! format: GB/s of weights streamed with one activation row (decode) and integer GMAC/s with
//! 64 rows (prefill), on a pool of one thread per core (`THREADS`), an `N` x `K` matrix (65536 x
//! 4096), `REPS` times the default repetitions (for a profiler), `M` rows for the batched figure
//! (64), only `LEVEL` (`scalar`, `avx2`, `avx512` or `amx`) if given:
//! `cargo run --release -p tandem-kernels --example packed_speed [Q4_K Q6_K ...]`.
mod common;

use common::synthetic_packed;
use std::time::Instant;
use tandem_kernels::packed::{matmul_packed, worth_packing};
use tandem_kernels::{DType, SimdLevel, ThreadPool};

fn main() {
    let formats: Vec<DType> = std::env::args()
        .skip(1)
        .map(|s| {
            DType::ALL
                .into_iter()
                .find(|d| d.name() == s)
                .expect("a quantized type")
        })
        .collect();
    let formats = if formats.is_empty() {
        vec![DType::Q4_K, DType::Q6_K, DType::Q4_0]
    } else {
        formats
    };
    let pool = match std::env::var("THREADS") {
        Ok(t) => ThreadPool::new(t.parse().unwrap()).unwrap(),
        _ => ThreadPool::with_default_threads().expect("a thread pool"),
    };
    let env = |v: &str, d: usize| std::env::var(v).map_or(d, |s| s.parse().unwrap());
    let (n, k) = (env("N", 64 * 1024), env("K", 4096));
    let only = std::env::var("LEVEL")
        .ok()
        .map(|l| SimdLevel::parse(&l).expect("LEVEL: scalar, avx2, avx512 or amx"));
    for d in formats {
        let p = synthetic_packed(d, n, k, 0);
        for level in SimdLevel::supported()
            .into_iter()
            .filter(|l| worth_packing(*l) && only.is_none_or(|o| o == *l))
        {
            for m in [1usize, env("M", 64)] {
                let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
                let mut out = vec![0f32; m * n];
                let reps = env("REPS", 1) * if m == 1 { 20 } else { 3 };
                let secs = pool.install(|| {
                    matmul_packed(&x, m, &p, &mut out, level);
                    let t = Instant::now();
                    for _ in 0..reps {
                        matmul_packed(&x, m, &p, &mut out, level);
                    }
                    t.elapsed().as_secs_f64() / reps as f64
                });
                if m == 1 {
                    let gbs = p.bytes().len() as f64 / secs / 1e9;
                    println!("{d} {level:?} m=1: {gbs:.1} GB/s ({:.2} ms)", secs * 1e3);
                } else {
                    let gmacs = (m * n * k) as f64 / secs / 1e9;
                    println!("{d} {level:?} m={m}: {gmacs:.0} GMAC/s");
                }
            }
        }
    }
}
