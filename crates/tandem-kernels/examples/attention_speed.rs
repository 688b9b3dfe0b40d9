//! Speed of batched decode attention over an f16 pool far larger than the caches: `SEQS`
//! sequences (16) each decoding one token (or prefilling `NEW` tokens) at `CTX` positions
//! (144), the reference model's shape (9 query heads over 3 KV heads of 64; `KVH` KV heads,
//! each with `REP` (3) query heads of `HD` (64) dimensions; the Qwen2.5-1.5B's is `KVH=2
//! REP=6 HD=128 LAYERS=28`), `LAYERS` (30) layers' pools, blocks scattered over the pool
//! as a long-running server leaves them (in order with `SORTED=1`, as a fresh pool hands them
//! out); on `THREADS` threads (2), pinned to the first cores with `PIN=1`; five timings of
//! `REPS` (20) steps each, the KV read from memory as in a decode step with `COLD=1`:
//! `cargo run --release -p tandem-kernels --example attention_speed`.
use half::f16;
use std::time::Instant;
use tandem_kernels::{paged_attention, AttnSeq, KvRef, PagedLayout, ThreadPool};

fn main() {
    let env = |v: &str, d: usize| std::env::var(v).map_or(d, |s| s.parse().unwrap());
    let (seqs, ctx, threads, layers, new) = (
        env("SEQS", 16),
        env("CTX", 144),
        env("THREADS", 2),
        env("LAYERS", 30),
        env("NEW", 1),
    );
    let layout = PagedLayout {
        block_size: 16,
        n_kv_heads: env("KVH", 3),
        head_dim: env("HD", 64),
    };
    let n_heads = env("REP", 3) * layout.n_kv_heads;
    let per_seq = (ctx + new).div_ceil(layout.block_size);
    // Every sequence's blocks drawn from a pool twice the size needed, shuffled.
    let pool_blocks = 2 * seqs * per_seq;
    let mut ids: Vec<u32> = (0..pool_blocks as u32).collect();
    let mut r = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..ids.len()).rev() {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        ids.swap(i, (r % (i as u64 + 1)) as usize);
    }
    // With SORTED=1 each sequence's blocks follow one another, as a fresh pool hands them out.
    if std::env::var_os("SORTED").is_some() {
        ids.sort_unstable();
    }
    let len = pool_blocks * layout.block_width();
    let value = |i: usize, l: usize| f16::from_f32(((i * 7 + l) % 13) as f32 * 0.05 - 0.3);
    let pools: Vec<(Vec<f16>, Vec<f16>)> = (0..layers)
        .map(|l| {
            let k: Vec<f16> = (0..len).map(|i| value(i, l)).collect();
            let v: Vec<f16> = (0..len).map(|i| value(i + 5, l)).collect();
            (k, v)
        })
        .collect();
    let batch: Vec<AttnSeq> = ids
        .chunks(per_seq)
        .take(seqs)
        .enumerate()
        .map(|(i, table)| AttnSeq {
            row_start: i * new,
            n_new: new,
            context_len: ctx,
            block_table: table,
        })
        .collect();
    let q: Vec<f32> = (0..seqs * new * n_heads * layout.head_dim)
        .map(|i| (i % 17) as f32 * 0.1 - 0.8)
        .collect();
    let mut out = vec![0f32; q.len()];
    let pool = if std::env::var_os("PIN").is_some() {
        ThreadPool::pinned(&(0..threads).collect::<Vec<_>>()).expect("a pinned pool")
    } else {
        ThreadPool::new(threads).expect("a pool")
    };
    let scale = 1.0 / (layout.head_dim as f32).sqrt();
    let bytes = (layers * seqs * (ctx + new) * layout.token_width() * 2 * 2) as f64;
    // With COLD=1 a model's worth of weights (96 MB) is read before each step, untimed, so
    // the KV comes from memory as in a decode step, not from the L3 the pools fit in.
    let cold = std::env::var_os("COLD").map(|_| vec![1u64; 96 << 17]);
    let mut sink = 0u64;
    for _ in 0..5 {
        let reps = env("REPS", 20);
        let secs = pool.install(|| {
            let mut secs = 0.0;
            for _ in 0..reps {
                if let Some(c) = &cold {
                    sink = sink.wrapping_add(tandem_kernels::mem::sum_streamed(c));
                }
                let t = Instant::now();
                for (k, v) in &pools {
                    let (k, v) = (KvRef::F16(k), KvRef::F16(v));
                    paged_attention(&layout, &batch, &q, n_heads, scale, None, k, v, &mut out);
                }
                secs += t.elapsed().as_secs_f64();
            }
            secs / reps as f64
        });
        println!(
            "{:.4} ms per step ({layers} layers), {:.1} GB/s of K and V",
            secs * 1e3,
            bytes / secs / 1e9
        );
    }
    std::hint::black_box(sink);
}
