//! The int8 multiply peak of this core, the compute roofline the packed kernels are held to:
//! `vpdpbusd` (AVX-512 VNNI, 64 multiply-adds each) issued on sixteen independent chains with
//! register operands, then with the second operand broadcast from memory as the kernels read
//! activations, then one dependent chain (its latency); and the clock, from a chain of
//! dependent 64-bit multiplies (three cycles each). Run it once per thread count: the
//! threads run the loops at once, and each reports its own rate:
//! `THREADS=2 cargo run --release -p tandem-kernels --example vnni_peak`.
//!
//! One `vpdpbusd` a cycle was long assumed here; a Xeon reporting AMX issued two a cycle
//! (6.7 G a second a thread), which put the batched kernels at ~40% of the peak, not ~90%.
//!
//! On a CPU without AVX-512 VNNI it measures the AVX2 kernels' multiply instead: `vpmaddubsw`
//! (32 multiplies, pairs added into 16 bits) on twelve independent chains, and the clock.

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("an x86-64 measurement");
}

#[cfg(target_arch = "x86_64")]
fn main() {
    let threads: usize = std::env::var("THREADS").map_or(1, |t| {
        t.parse()
            .ok()
            .filter(|&t| t > 0)
            .expect("THREADS: a count of at least 1")
    });
    if !is_x86_feature_detected!("avx512vnni") || !is_x86_feature_detected!("avx512f") {
        if !is_x86_feature_detected!("avx2") {
            eprintln!("this CPU has neither AVX-512 VNNI nor AVX2");
            return;
        }
        avx2_peak(threads);
        return;
    }
    let rates: Vec<[f64; 4]> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| unsafe { x86::measure() }))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (t, [reg, mem, dep, ghz]) in rates.iter().enumerate() {
        println!(
            "thread {t}: vpdpbusd {reg:.2} G/s with registers ({:.0} GMAC/s), {mem:.2} G/s with a \
             broadcast from memory, {dep:.3} G/s on one chain ({:.1} cycles at {ghz:.2} GHz)",
            reg * 64.0,
            ghz / dep
        );
    }
    let sum: f64 = rates.iter().map(|r| r[0] * 64.0).sum();
    println!("all {threads} threads: {sum:.0} GMAC/s with registers");
}

/// The AVX2 twin of the VNNI measurement: `vpmaddubsw` with registers, and the clock.
#[cfg(target_arch = "x86_64")]
fn avx2_peak(threads: usize) {
    let rates: Vec<[f64; 2]> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| unsafe { [x86::maddubs(), x86::clock()] }))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (t, [reg, ghz]) in rates.iter().enumerate() {
        println!(
            "thread {t}: vpmaddubsw {reg:.2} G/s with registers ({:.0} GMAC/s, {:.2} a cycle at \
             {ghz:.2} GHz)",
            reg * 32.0,
            reg / ghz
        );
    }
    let sum: f64 = rates.iter().map(|r| r[0] * 32.0).sum();
    println!("all {threads} threads: {sum:.0} GMAC/s with registers");
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;
    use std::hint::black_box;
    use std::time::Instant;

    const ITERS: u64 = 50_000_000;

    /// [register rate, memory-broadcast rate, one chain's rate] in G instructions a second,
    /// and the clock in GHz.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn measure() -> [f64; 4] {
        [registers(), broadcast(), chain(), clock()]
    }

    /// Sixteen accumulators against two register operands.
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn registers() -> f64 {
        let a = black_box(_mm512_set1_epi8(3));
        let b = black_box(_mm512_set1_epi8(5));
        let mut acc = [_mm512_setzero_si512(); 16];
        let t = Instant::now();
        for _ in 0..ITERS {
            for x in acc.iter_mut() {
                *x = _mm512_dpbusd_epi32(*x, a, b);
            }
        }
        let secs = t.elapsed().as_secs_f64();
        black_box(acc);
        16.0 * ITERS as f64 / secs / 1e9
    }

    /// Sixteen accumulators, the second operand of each a dword broadcast from memory (how the
    /// kernels take an activation row's four values).
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn broadcast() -> f64 {
        let words: [i32; 16] = std::array::from_fn(|i| i as i32 * 0x0101_0101);
        let a = black_box(_mm512_set1_epi8(3));
        let mut acc = [_mm512_setzero_si512(); 16];
        let t = Instant::now();
        for _ in 0..ITERS {
            // Opaque each time round, so the loads are not hoisted out of the loop.
            let p = black_box(words.as_ptr());
            for (i, x) in acc.iter_mut().enumerate() {
                *x = _mm512_dpbusd_epi32(*x, a, _mm512_set1_epi32(p.add(i).read()));
            }
        }
        let secs = t.elapsed().as_secs_f64();
        black_box(acc);
        16.0 * ITERS as f64 / secs / 1e9
    }

    /// One dependency chain: its rate is the clock over the instruction's latency.
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn chain() -> f64 {
        let a = black_box(_mm512_set1_epi8(3));
        let b = black_box(_mm512_set1_epi8(5));
        let mut acc = _mm512_setzero_si512();
        let t = Instant::now();
        for _ in 0..ITERS / 4 {
            for _ in 0..4 {
                acc = _mm512_dpbusd_epi32(acc, a, b);
            }
        }
        let secs = t.elapsed().as_secs_f64();
        black_box(acc);
        ITERS as f64 / secs / 1e9
    }

    /// Twelve chains of `vpmaddubsw` (with the other operand, thirteen of the sixteen
    /// registers), each product fed back as the next one's bytes (so the compiler cannot
    /// compute it once): its rate on the multiply ports.
    #[target_feature(enable = "avx2")]
    pub unsafe fn maddubs() -> f64 {
        let b = black_box(_mm256_set1_epi8(5));
        let mut acc: [__m256i; 12] =
            std::array::from_fn(|i| black_box(_mm256_set1_epi8(i as i8 + 1)));
        let t = Instant::now();
        for _ in 0..ITERS {
            for x in acc.iter_mut() {
                *x = _mm256_maddubs_epi16(*x, b);
            }
        }
        let secs = t.elapsed().as_secs_f64();
        black_box(acc);
        12.0 * ITERS as f64 / secs / 1e9
    }

    /// The core clock in GHz: dependent `imul`s, three cycles each (not removable at rename,
    /// as recent cores remove dependent adds of constants).
    pub fn clock() -> f64 {
        let (mut x, y) = (1u64, black_box(3u64));
        let t = Instant::now();
        for _ in 0..ITERS {
            unsafe {
                asm!(
                    "imul {x}, {y}", "imul {x}, {y}", "imul {x}, {y}", "imul {x}, {y}",
                    x = inout(reg) x, y = in(reg) y, options(pure, nomem, nostack)
                );
            }
        }
        let secs = t.elapsed().as_secs_f64();
        black_box(x);
        3.0 * 4.0 * ITERS as f64 / secs / 1e9
    }
}
