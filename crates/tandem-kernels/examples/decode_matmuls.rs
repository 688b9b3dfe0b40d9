//! A model's decode matmuls alone (synthetic weights of its shapes and types), so their speed
//! shows without the rest of the forward: ms and GB/s per token, `ROUNDS` (5) rounds of
//! `TOKENS` (100) tokens on `THREADS` threads (one per core), with `GAP_US` microseconds of
//! serial spinning after each call (0) standing for the norms and the like between them (its
//! time is not counted), `M` (1) activation rows a call (a batched decode step's sequences:
//! from 9 rows the k-quants run on AMX where the CPU has it, each step still reading every
//! weight from memory). `MODEL` picks the shapes: `smollm` (default: the reference model, 30
//! layers of Q4_1 q/k/v, output, gate/up and down, and a Q8_0 LM head, 96 MB a token) or
//! `qwen1.5b` (Qwen2.5-1.5B Q4_K_M: 28 layers of Q4_K, with Q6_K for v and down in 14 of them,
//! and a Q6_K LM head, 980 MB a token, far past the caches):
//! `MODEL=qwen1.5b cargo run --release -p tandem-kernels --example decode_matmuls`.
mod common;

use common::synthetic_packed as mat;
use std::collections::BTreeMap;
use std::time::Instant;
use tandem_kernels::packed::{matmul_packed_many, PackedMat};
use tandem_kernels::{DType, ThreadPool};

fn main() {
    let pool = match std::env::var("THREADS") {
        Ok(_) => ThreadPool::new(env("THREADS", 0).max(1)).expect("a thread pool"),
        _ => ThreadPool::with_default_threads().expect("a thread pool"),
    };
    let qwen = match std::env::var("MODEL").as_deref() {
        Err(_) | Ok("smollm") => false,
        Ok("qwen1.5b") => true,
        Ok(other) => panic!("MODEL={other}: expected smollm or qwen1.5b"),
    };
    let (d, kv, f, layers, vocab) = if qwen {
        (1536, 256, 8960, 28, 151936)
    } else {
        (576, 192, 1536, 30, 49152)
    };
    // llama.cpp's Q4_K_M gives v and down more bits in the first and last eighth of the
    // layers and in every third one between.
    let more_bits = |l: usize| l < layers / 8 || l >= 7 * layers / 8 || (l - layers / 8) % 3 == 2;
    let q = if qwen { DType::Q4_K } else { DType::Q4_1 };
    let ws: Vec<[Vec<PackedMat>; 4]> = (0..layers)
        .map(|l| {
            let vd = if qwen && more_bits(l) { DType::Q6_K } else { q };
            [
                vec![mat(q, d, d, l), mat(q, kv, d, l + 1), mat(vd, kv, d, l + 2)],
                vec![mat(q, d, d, l + 3)],
                vec![mat(q, f, d, l + 4), mat(q, f, d, l + 5)],
                vec![mat(vd, d, f, l + 6)],
            ]
        })
        .collect();
    let head = mat(if qwen { DType::Q6_K } else { DType::Q8_0 }, vocab, d, 99);
    let bytes: usize = ws
        .iter()
        .flatten()
        .flatten()
        .map(|w| w.bytes().len())
        .sum::<usize>()
        + head.bytes().len();
    let level = tandem_kernels::simd::active();
    let m = env("M", 1).max(1);
    let x: Vec<f32> = (0..f * m).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut outs: Vec<Vec<f32>> = vec![vec![0.0; vocab * m]; 3];
    let tokens = env("TOKENS", 100).max(1);
    // Serial work between the matmuls, as the caller's norms and quantization leave.
    let gap_us: f64 = std::env::var("GAP_US").map_or(0.0, |g| g.parse().unwrap());
    let mut probe_buf = vec![0u64; 1 << 26];
    tandem_kernels::mem::advise_huge_pages(&mut probe_buf);
    probe_buf
        .iter_mut()
        .enumerate()
        .for_each(|(i, w)| *w = i as u64);
    for round in 0..env("ROUNDS", 5) {
        // Time and bytes per kind of call, named by its matrices' formats.
        let mut kinds: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        let mut timed = |refs: &[&PackedMat], o: &mut [&mut [f32]], k: usize| {
            let t = Instant::now();
            matmul_packed_many(&x[..k * m], m, refs, o, level);
            let name: Vec<String> = refs.iter().map(|w| format!("{:?}", w.format)).collect();
            let e = kinds.entry(name.join("+")).or_default();
            e.0 += t.elapsed().as_secs_f64();
            e.1 += refs.iter().map(|w| w.bytes().len()).sum::<usize>();
        };
        let t = Instant::now();
        pool.install(|| {
            for _ in 0..tokens {
                for layer in &ws {
                    for group in layer {
                        let k = group[0].cols;
                        let mut o: Vec<&mut [f32]> = outs
                            .iter_mut()
                            .zip(group)
                            .map(|(o, w)| &mut o[..w.rows * m])
                            .collect();
                        let refs: Vec<&PackedMat> = group.iter().collect();
                        timed(&refs, &mut o, k);
                        let g = Instant::now();
                        while g.elapsed().as_secs_f64() * 1e6 < gap_us {
                            std::hint::spin_loop();
                        }
                    }
                }
                let (a, _) = outs.split_at_mut(1);
                timed(&[&head], &mut [&mut a[0][..]], d);
            }
        });
        let ms =
            t.elapsed().as_secs_f64() * 1e3 / tokens as f64 - gap_us * (4 * layers) as f64 / 1e3;
        let gbs = bytes as f64 / ms / 1e6;
        let probe = probe(&probe_buf, pool.threads());
        println!(
            "round {round}: {ms:.3} ms/token ({m} rows a step), {gbs:.1} GB/s over {:.1} MB; a plain read: {probe:.1} GB/s ({:.0}%)",
            bytes as f64 / 1e6,
            100.0 * gbs / probe
        );
        for (name, (secs, bytes)) in kinds {
            println!("  {name}: {:.1} GB/s", bytes as f64 / secs / 1e9);
        }
    }
}

/// The whole number in the environment variable `name`, or `default` where it is unset.
fn env(name: &str, default: usize) -> usize {
    std::env::var(name).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v}: expected a whole number"))
    })
}

/// The read bandwidth of `threads` threads summing `buf` (512 MiB, past the caches) in
/// GB/s, best of three passes, as the kernels stream weights (`sum_streamed`).
fn probe(buf: &[u64], threads: usize) -> f64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            std::thread::scope(|s| {
                for part in buf.chunks(buf.len().div_ceil(threads)) {
                    s.spawn(|| std::hint::black_box(tandem_kernels::mem::sum_streamed(part)));
                }
            });
            (buf.len() * 8) as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}
