//! Kernel tests: every SIMD path against the scalar reference on random inputs, dequantization
//! against gguf-py's reference, and paged attention against a dense textbook implementation.

use half::f16;
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use tandem_kernels::act::{quantize_q8, quantize_q8k, BlockQ8, BlockQ8K};
use tandem_kernels::dequant::dequantize_row;
use tandem_kernels::dot::{kernel, DotKernel};
use tandem_kernels::*;

const QUANTS: [DType; 12] = [
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q5_1,
    DType::Q8_0,
    DType::Q2_K,
    DType::Q3_K,
    DType::Q4_K,
    DType::Q5_K,
    DType::Q6_K,
    DType::IQ4_NL,
    DType::IQ4_XS,
];

fn scale_offsets(d: DType) -> &'static [usize] {
    match d {
        DType::Q4_0 | DType::Q5_0 | DType::Q8_0 | DType::IQ4_NL | DType::IQ4_XS => &[0],
        DType::Q4_1 | DType::Q5_1 | DType::Q4_K | DType::Q5_K => &[0, 2],
        DType::Q2_K => &[80, 82],
        DType::Q3_K => &[108],
        DType::Q6_K => &[208],
        _ => &[],
    }
}

/// Random blocks with finite, modest f16 scales.
fn random_row(rng: &mut StdRng, d: DType, cols: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..d.row_bytes(cols).unwrap()).map(|_| rng.gen()).collect();
    for b in bytes.chunks_exact_mut(d.block_bytes()) {
        for &off in scale_offsets(d) {
            let v = f16::from_f32(rng.gen_range(-0.05..0.05))
                .to_bits()
                .to_le_bytes();
            b[off..off + 2].copy_from_slice(&v);
        }
    }
    bytes
}

fn random_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect()
}

fn dot_with(k: DotKernel, w: &[u8], x: &[f32]) -> f32 {
    match k {
        DotKernel::Q8(f, _) => {
            let mut a = vec![BlockQ8::default(); x.len() / 32];
            quantize_q8(x, &mut a);
            f(w, &a)
        }
        DotKernel::Q8K(f, _) => {
            let mut a = vec![BlockQ8K::default(); x.len() / 256];
            quantize_q8k(x, &mut a);
            f(w, &a)
        }
    }
}

#[test]
fn dequantization_matches_gguf_py() {
    let golden: serde_json::Value =
        serde_json::from_str(include_str!("data/dequant_golden.json")).unwrap();
    for d in QUANTS {
        let g = &golden[d.name()];
        let bytes: Vec<u8> = g["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u8)
            .collect();
        let want: Vec<f32> = g["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let mut got = vec![0f32; want.len()];
        dequantize_row(d, &bytes, &mut got);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{d} element {i}: {a} vs gguf-py {b}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The four-row kernels equal four single-row calls bitwise (batch invariance).
    #[test]
    fn four_row_kernels_equal_single_rows(seed in any::<u64>(), blocks in 1usize..5, which in 0usize..QUANTS.len()) {
        let d = QUANTS[which];
        let mut rng = StdRng::seed_from_u64(seed);
        let cols = blocks * d.block_len();
        let w = random_row(&mut rng, d, cols);
        let xs: Vec<Vec<f32>> = (0..4).map(|_| random_vec(&mut rng, cols)).collect();
        let q8: Vec<Vec<BlockQ8>> = xs.iter().map(|x| {
            let mut a = vec![BlockQ8::default(); cols / 32];
            quantize_q8(x, &mut a);
            a
        }).collect();
        let q8k: Vec<Vec<BlockQ8K>> = xs.iter().map(|x| {
            let mut a = vec![BlockQ8K::default(); cols / 256];
            if cols.is_multiple_of(256) {
                quantize_q8k(x, &mut a);
            }
            a
        }).collect();
        {
            let (got, want): ([f32; 4], [f32; 4]) = match kernel(d) {
                Some(DotKernel::Q8(one, Some(four))) => (
                    four(&w, [&q8[0], &q8[1], &q8[2], &q8[3]]),
                    std::array::from_fn(|r| one(&w, &q8[r])),
                ),
                Some(DotKernel::Q8K(one, Some(four))) => (
                    four(&w, [&q8k[0], &q8k[1], &q8k[2], &q8k[3]]),
                    std::array::from_fn(|r| one(&w, &q8k[r])),
                ),
                _ => return Ok(()),
            };
            for r in 0..4 {
                prop_assert_eq!(got[r].to_bits(), want[r].to_bits(), "{} row {}: {} vs {}", d, r, got[r], want[r]);
            }
        }
    }

    /// The integer dot product approximates the exact f32 one within quantization error.
    #[test]
    fn quantized_dot_approximates_float(seed in any::<u64>(), which in 0usize..QUANTS.len()) {
        let d = QUANTS[which];
        let mut rng = StdRng::seed_from_u64(seed);
        let cols = 2 * 256;
        let w = random_row(&mut rng, d, cols);
        let x = random_vec(&mut rng, cols);
        let mut wf = vec![0f32; cols];
        dequantize_row(d, &w, &mut wf);
        let exact: f32 = wf.iter().zip(&x).map(|(a, b)| a * b).sum();
        let bound: f32 = wf.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum::<f32>() * 0.02 + 1e-6;
        let got = dot_with(kernel(d).unwrap(), &w, &x);
        prop_assert!((got - exact).abs() <= bound, "{}: {} vs {} (bound {})", d, got, exact, bound);
    }
}

/// Matmul on every format: the exact path against a naive loop over dequantized rows, and the
/// stored-format fast path against the exact one.
#[test]
fn matmul_paths_agree() {
    let mut rng = StdRng::seed_from_u64(7);
    for d in DType::ALL {
        let (m, n, k) = (5, 37, 512);
        let data: Vec<u8> = (0..n).flat_map(|_| random_row(&mut rng, d, k)).collect();
        let data = if d.is_quantized() {
            data
        } else {
            // Plain float formats: write sane values rather than random bit patterns.
            let vals = random_vec(&mut rng, n * k);
            match d {
                DType::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
                DType::F16 => vals
                    .iter()
                    .flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes())
                    .collect(),
                _ => vals
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
                    .collect(),
            }
        };
        let w = MatRef::new(d, n, k, &data).unwrap();
        let x = random_vec(&mut rng, m * k);
        let mut naive = vec![0f32; m * n];
        // Sum of |terms| per output: summation-order error scales with it, not with the result.
        let mut magnitude = vec![0f32; m * n];
        let mut row = vec![0f32; k];
        for j in 0..n {
            w.row_f32(j, &mut row);
            for i in 0..m {
                let xs = &x[i * k..(i + 1) * k];
                naive[i * n + j] = xs.iter().zip(&row).map(|(a, b)| a * b).sum();
                magnitude[i * n + j] = xs.iter().zip(&row).map(|(a, b)| (a * b).abs()).sum();
            }
        }
        let mut exact = vec![0f32; m * n];
        matmul(&x, m, &w, &mut exact, Precision::Exact);
        for ((a, b), mag) in exact.iter().zip(&naive).zip(&magnitude) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0) + 1e-6 * mag,
                "{d} exact: {a} vs {b}"
            );
        }
        // The quantized fast path against the exact one, within quantization error.
        let mut fast = vec![0f32; m * n];
        matmul(&x, m, &w, &mut fast, Precision::Fast);
        for ((a, b), mag) in fast.iter().zip(&exact).zip(&magnitude) {
            assert!(
                (a - b).abs() <= 0.02 * mag + 1e-4,
                "{d} fast: {a} vs exact {b}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// The SIMD activation quantizers equal the scalar one bit for bit, with a scale per
    /// block and per eight blocks; a group's blocks share its scale, set by its largest value.
    #[test]
    fn packed_act_quantizers_agree(seed in any::<u64>(), groups in 1usize..4, per_super in any::<bool>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        let group = if per_super { 8 } else { 1 };
        let blocks = groups * group;
        let x = random_vec(&mut rng, blocks * 32);
        let mut want = vec![packed::ActBlock::default(); blocks];
        packed::quantize_act(&x, &mut want, group);
        for (g, xs) in want.chunks(group).zip(x.chunks(group * 32)) {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            prop_assert!(g.iter().all(|a| a.d == amax / 127.0));
        }
        for level in SimdLevel::supported() {
            let mut got = vec![packed::ActBlock::default(); blocks];
            packed::act_quantizer(level)(&x, &mut got, group);
            prop_assert_eq!(&got, &want);
        }
    }

    /// Packed weights (every packed format, ragged last tiles): the result equals the
    /// dequantized weights times the dequantized activations (f64) within float rounding;
    /// every level agrees with the scalar kernel bit for bit; and a row's result is bitwise
    /// the same alone as among 1..39 rows (8-, 4-, 2- and 1-row kernels, and from 10 rows the
    /// AMX level's products for the k-quants, a last group padded; see also the next test).
    #[test]
    fn packed_matmul_matches_dequantized(seed in any::<u64>(), which in 0usize..12, supers in 1usize..4, m in 1usize..40, n in 1usize..40) {
        let d = [DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0, DType::Q4_K, DType::Q5_K, DType::Q6_K, DType::Q2_K, DType::Q3_K, DType::IQ4_NL, DType::IQ4_XS][which];
        let mut rng = StdRng::seed_from_u64(seed);
        let k = supers * d.block_len();
        let data: Vec<u8> = (0..n).flat_map(|_| random_row(&mut rng, d, k)).collect();
        let w = MatRef::new(d, n, k, &data).unwrap();
        let p = PackedMat::pack(&w).unwrap();
        let x = random_vec(&mut rng, m * k);
        let mut acts = vec![packed::ActBlock::default(); m * k / 32];
        for (row, a) in x.chunks_exact(k).zip(acts.chunks_exact_mut(k / 32)) {
            packed::quantize_act(row, a, p.format.act_group());
        }
        let mut wrow = vec![0f32; k];
        let mut scalar = vec![0f32; m * n];
        packed::matmul_packed(&x, m, &p, &mut scalar, SimdLevel::Scalar);
        for j in 0..n {
            w.row_f32(j, &mut wrow);
            for i in 0..m {
                let (mut want, mut mag) = (0f64, 0f64);
                for (e, &wv) in wrow.iter().enumerate() {
                    let a = &acts[i * k / 32 + e / 32];
                    let t = wv as f64 * (a.d as f64 * a.qs[e % 32] as f64);
                    want += t;
                    mag += t.abs();
                }
                let got = scalar[i * n + j] as f64;
                prop_assert!((got - want).abs() <= 1e-5 * mag.max(1e-3), "{} [{}, {}]: {} vs {}", d, i, j, got, want);
            }
        }
        for level in SimdLevel::supported() {
            let mut all = vec![0f32; m * n];
            packed::matmul_packed(&x, m, &p, &mut all, level);
            prop_assert_eq!(&all, &scalar, "{} {:?}", d, level);
            let mut alone = vec![0f32; n];
            packed::matmul_packed(&x[(m - 1) * k..], 1, &p, &mut alone, level);
            prop_assert_eq!(&alone[..], &all[(m - 1) * n..]);
        }
    }
}

/// Batches large enough for several groups of the AMX level's k-quant products (ragged row
/// counts and tiles; the last, two chunks of rows against kernel calls of two tiles): every
/// level equals the scalar kernel bit for bit, and a row's result is the same in the batch as
/// alone.
#[test]
fn packed_k_quant_batches_equal_the_scalar_kernel() {
    let k_quants = [
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
        DType::Q2_K,
        DType::Q3_K,
        DType::IQ4_XS,
    ];
    for (f, d) in k_quants.into_iter().enumerate() {
        for (c, (m, n, supers)) in [
            (32, 17, 1),
            (64, 16, 2),
            (79, 33, 1),
            (130, 5, 2),
            (150, 40, 2),
        ]
        .into_iter()
        .enumerate()
        {
            let mut rng = StdRng::seed_from_u64((f * 16 + c) as u64);
            let k = supers * d.block_len();
            let data: Vec<u8> = (0..n).flat_map(|_| random_row(&mut rng, d, k)).collect();
            let p = PackedMat::pack(&MatRef::new(d, n, k, &data).unwrap()).unwrap();
            let x = random_vec(&mut rng, m * k);
            let mut scalar = vec![0f32; m * n];
            packed::matmul_packed(&x, m, &p, &mut scalar, SimdLevel::Scalar);
            for level in SimdLevel::supported() {
                let mut all = vec![0f32; m * n];
                packed::matmul_packed(&x, m, &p, &mut all, level);
                assert_eq!(all, scalar, "{d} {level:?} m={m}");
                let mut alone = vec![0f32; n];
                packed::matmul_packed(&x[(m - 1) * k..], 1, &p, &mut alone, level);
                assert_eq!(&alone[..], &all[(m - 1) * n..], "{d} {level:?} m={m}");
            }
        }
    }
}

/// The k-quant kernels' integer sums at their extremes: every 4-bit value 0 or 15 (all value
/// bytes 0x00 or 0xff) against activations all at +-127, where a Q4_K block's sum taken around
/// 8 reaches its 16-bit bound (32 x 8 x 127), at the row counts of each batched kernel.
#[test]
fn packed_k_quant_extreme_sums_equal_the_scalar_kernel() {
    let mut rng = StdRng::seed_from_u64(7);
    let k = 2 * 256;
    for d in [DType::Q4_K, DType::Q5_K, DType::Q6_K] {
        for fill in [0x00u8, 0xff] {
            let mut data: Vec<u8> = (0..16).flat_map(|_| random_row(&mut rng, d, k)).collect();
            if d == DType::Q4_K {
                // Q4_K's 144-byte block: d, dmin, 12 scale bytes, then the values.
                for b in data.chunks_exact_mut(144) {
                    b[16..].fill(fill);
                }
            } else {
                for b in data.chunks_exact_mut(d.block_bytes()) {
                    let keep: Vec<(usize, [u8; 2])> = scale_offsets(d)
                        .iter()
                        .map(|&o| (o, [b[o], b[o + 1]]))
                        .collect();
                    b.fill(fill);
                    for (o, v) in keep {
                        b[o..o + 2].copy_from_slice(&v);
                    }
                }
            }
            let p = PackedMat::pack(&MatRef::new(d, 16, k, &data).unwrap()).unwrap();
            for m in [1, 2, 4, 8, 12, 16, 24] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| match (i / k) % 3 {
                        0 => 1.5,
                        1 => -1.5,
                        _ => {
                            if i % 2 == 0 {
                                1.5
                            } else {
                                -1.5
                            }
                        }
                    })
                    .collect();
                let mut scalar = vec![0f32; m * 16];
                packed::matmul_packed(&x, m, &p, &mut scalar, SimdLevel::Scalar);
                for level in SimdLevel::supported() {
                    let mut got = vec![0f32; m * 16];
                    packed::matmul_packed(&x, m, &p, &mut got, level);
                    assert_eq!(got, scalar, "{d} {level:?} m={m} fill {fill:#x}");
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Matrices of different formats sharing one call (q/k/v, gate/up) give bitwise what each
    /// gives alone, on 1 or 3 threads.
    #[test]
    fn packed_matmul_many_equals_separate_calls(seed in any::<u64>(), a in 0usize..12, b in 0usize..12, m in 1usize..36, n1 in 1usize..70, n2 in 1usize..40, pooled in any::<bool>()) {
        let types = [DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0, DType::Q4_K, DType::Q5_K, DType::Q6_K, DType::Q2_K, DType::Q3_K, DType::IQ4_NL, DType::IQ4_XS];
        let mut rng = StdRng::seed_from_u64(seed);
        let k = 256;
        let mut mat = |d: DType, n: usize| {
            let data: Vec<u8> = (0..n).flat_map(|_| random_row(&mut rng, d, k)).collect();
            PackedMat::pack(&MatRef::new(d, n, k, &data).unwrap()).unwrap()
        };
        let (p1, p2) = (mat(types[a], n1), mat(types[b], n2));
        let x = random_vec(&mut rng, m * k);
        for level in SimdLevel::supported() {
            let (mut want1, mut want2) = (vec![0f32; m * n1], vec![0f32; m * n2]);
            packed::matmul_packed(&x, m, &p1, &mut want1, level);
            packed::matmul_packed(&x, m, &p2, &mut want2, level);
            let (mut got1, mut got2) = (vec![0f32; m * n1], vec![0f32; m * n2]);
            let mut run = || packed::matmul_packed_many(&x, m, &[&p1, &p2], &mut [&mut got1, &mut got2], level);
            if pooled { ThreadPool::new(3).unwrap().install(run) } else { run() }
            prop_assert_eq!(&got1, &want1, "{:?}", level);
            prop_assert_eq!(&got2, &want2, "{:?}", level);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// The fused residual add + RMSNorm gives bitwise what the two separate passes give, and
    /// the row-parallel norm and RoPE give on a pool what they give on one thread.
    #[test]
    fn row_ops_are_the_same_fused_and_on_a_pool(seed in any::<u64>(), rows in 1usize..40, heads in 1usize..4, interleaved in any::<bool>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        let (hd, d) = (16, 48);
        let (x, y, w) = (random_vec(&mut rng, rows * d), random_vec(&mut rng, rows * d), random_vec(&mut rng, d));
        let (cos, sin) = (random_vec(&mut rng, rows * hd / 2), random_vec(&mut rng, rows * hd / 2));
        let q = random_vec(&mut rng, rows * heads * hd);
        let style = if interleaved { RopeStyle::Interleaved } else { RopeStyle::Half };
        let (mut want_x, mut want) = (x.clone(), vec![0f32; rows * d]);
        ops::add_assign(&mut want_x, &y);
        ops::rms_norm(&want_x, &w, 1e-5, &mut want);
        let mut want_q = q.clone();
        ops::rope(&mut want_q, heads, hd, &cos, &sin, style);
        let (mut got_x, mut got, mut got_q) = (x.clone(), vec![0f32; rows * d], q.clone());
        ThreadPool::new(3).unwrap().install(|| {
            ops::add_rms_norm(&mut got_x, &y, &w, 1e-5, &mut got);
            ops::rope(&mut got_q, heads, hd, &cos, &sin, style);
        });
        prop_assert_eq!(got_x, want_x);
        prop_assert_eq!(got, want);
        prop_assert_eq!(got_q, want_q);
    }

    /// The new rows' one pass (biases, RoPE, KV writes) on a pool gives bitwise what the bias
    /// adds, the two rotations and `write_kv` give one after the other on one thread, for
    /// ragged batches over shuffled blocks, and where two sequences' new tokens share slots
    /// (the last row's write wins, as one by one).
    #[test]
    fn new_rows_in_one_pass_are_the_separate_passes(seed in any::<u64>(), lens in prop::collection::vec(1usize..20, 1..4), ctx in 0usize..40, f16_pool in any::<bool>(), with_bias in any::<bool>(), interleaved in any::<bool>(), nkv in 1usize..3, shared in any::<bool>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        let (hd, bs, rep) = (16, [4, 16][seed as usize % 2], 3);
        let (nh, w) = (nkv * rep, nkv * hd);
        let layout = PagedLayout { block_size: bs, n_kv_heads: nkv, head_dim: hd };
        let per_seq = (ctx + 20).div_ceil(bs);
        let nblocks = per_seq * lens.len();
        let mut ids: Vec<u32> = (0..nblocks as u32).collect();
        for i in (1..ids.len()).rev() { ids.swap(i, rng.gen_range(0..=i)); }
        let tables: Vec<&[u32]> = (0..lens.len()).map(|i| {
            let i = if shared { 0 } else { i };
            &ids[i * per_seq..(i + 1) * per_seq]
        }).collect();
        let mut seqs = Vec::new();
        let mut row = 0;
        for (i, &n) in lens.iter().enumerate() {
            seqs.push(AttnSeq { row_start: row, n_new: n, context_len: ctx, block_table: tables[i] });
            row += n;
        }
        let rows = row;
        let (q, k, v) = (random_vec(&mut rng, rows * nh * hd), random_vec(&mut rng, rows * w), random_vec(&mut rng, rows * w));
        let (cos, sin) = (random_vec(&mut rng, rows * hd / 2), random_vec(&mut rng, rows * hd / 2));
        let biases = [random_vec(&mut rng, nh * hd), random_vec(&mut rng, w), random_vec(&mut rng, w)];
        let bias = if with_bias { [Some(&biases[0][..]), Some(&biases[1][..]), Some(&biases[2][..])] } else { [None; 3] };
        let style = if interleaved { RopeStyle::Interleaved } else { RopeStyle::Half };
        let size = nblocks * bs * w;
        let bits = |k32: &[f32], k16: &[f16]| -> Vec<u32> {
            if f16_pool { k16.iter().map(|x| x.to_bits() as u32).collect() } else { k32.iter().map(|x| x.to_bits()).collect() }
        };
        // One after the other, on this thread.
        let (mut wq, mut wk, mut wv) = (q.clone(), k.clone(), v.clone());
        for (x, b) in [&mut wq, &mut wk, &mut wv].into_iter().zip(bias) {
            if let Some(b) = b { ops::add_bias(x, b); }
        }
        ops::rope(&mut wq, nh, hd, &cos, &sin, style);
        ops::rope(&mut wk, nkv, hd, &cos, &sin, style);
        let (mut k32, mut v32, mut k16, mut v16) = (vec![f32::NAN; size], vec![f32::NAN; size], vec![f16::NAN; size], vec![f16::NAN; size]);
        {
            let (mut km, mut vm) = if f16_pool { (KvMut::F16(&mut k16), KvMut::F16(&mut v16)) } else { (KvMut::F32(&mut k32), KvMut::F32(&mut v32)) };
            write_kv(&layout, &seqs, &wk, &wv, &mut km, &mut vm);
        }
        let (want_k, want_v) = (bits(&k32, &k16), bits(&v32, &v16));
        // In one pass, on a pool.
        let (mut gq, mut gk, mut gv) = (q.clone(), k.clone(), v.clone());
        let (mut k32, mut v32, mut k16, mut v16) = (vec![f32::NAN; size], vec![f32::NAN; size], vec![f16::NAN; size], vec![f16::NAN; size]);
        {
            let (mut km, mut vm) = if f16_pool { (KvMut::F16(&mut k16), KvMut::F16(&mut v16)) } else { (KvMut::F32(&mut k32), KvMut::F32(&mut v32)) };
            let rot = Rotation { cos: &cos, sin: &sin, style };
            ThreadPool::new(3).unwrap().install(|| {
                prepare_new_rows(&layout, &seqs, &mut gq, &mut gk, &mut gv, bias, rot, (&mut km, &mut vm))
            });
        }
        prop_assert_eq!(gq, wq);
        prop_assert_eq!(gk, wk);
        prop_assert_eq!(gv, wv);
        prop_assert_eq!(bits(&k32, &k16), want_k);
        prop_assert_eq!(bits(&v32, &v16), want_v);
    }

    /// RMSNorm (its sum of squares in lanes, then the tail) against the textbook formula in
    /// f64, on row widths with and without a tail.
    #[test]
    fn rms_norm_matches_f64(seed in any::<u64>(), rows in 1usize..4, d in 1usize..100) {
        let mut rng = StdRng::seed_from_u64(seed);
        let (x, w) = (random_vec(&mut rng, rows * d), random_vec(&mut rng, d));
        let mut got = vec![0f32; rows * d];
        ops::rms_norm(&x, &w, 1e-5, &mut got);
        for (xr, gr) in x.chunks(d).zip(got.chunks(d)) {
            let ms = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            for ((&v, &g), &o) in xr.iter().zip(&w).zip(gr) {
                let want = v as f64 * inv * g as f64;
                prop_assert!((o as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "{o} vs {want}");
            }
        }
    }
}

#[test]
fn shape_errors_are_typed() {
    assert!(matches!(
        MatRef::new(DType::Q4_0, 2, 33, &[0; 36]),
        Err(KernelError::RowNotBlockAligned { .. })
    ));
    assert_eq!(
        MatRef::new(DType::Q8_0, 2, 32, &[0; 30]).unwrap_err(),
        KernelError::SizeMismatch {
            expected: 68,
            actual: 30
        }
    );
}

/// Dense causal attention over contiguous K/V, the textbook way.
#[allow(clippy::too_many_arguments)]
fn dense_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    ctx0: usize,
    n_new: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    window: Option<usize>,
) -> Vec<f32> {
    let mut out = vec![0f32; n_new * nh * hd];
    let rep = nh / nkv;
    for t in 0..n_new {
        let pos = ctx0 + t;
        for h in 0..nh {
            let g = h / rep;
            let qv = &q[(t * nh + h) * hd..][..hd];
            let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let s: Vec<f32> = (first..=pos)
                .map(|p| {
                    qv.iter()
                        .zip(&k[(p * nkv + g) * hd..][..hd])
                        .map(|(a, b)| a * b)
                        .sum::<f32>()
                        / (hd as f32).sqrt()
                })
                .collect();
            let mx = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = s.iter().map(|x| (x - mx).exp()).collect();
            let z: f32 = e.iter().sum();
            for (p, w) in (first..=pos).zip(&e) {
                for i in 0..hd {
                    out[(t * nh + h) * hd + i] += w / z * v[(p * nkv + g) * hd + i];
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Paged attention over shuffled blocks equals dense attention, for f32 and f16 pools, with
    /// and without a sliding window.
    #[test]
    fn paged_attention_matches_dense(seed in any::<u64>(), ctx0 in 0usize..300, n_new in 1usize..40, bs_sel in 0usize..12, f16_pool in any::<bool>(), hd_sel in 0usize..4, pooled in any::<bool>(), window in prop::option::of(1usize..200), rep_sel in 0usize..4) {
        let mut rng = StdRng::seed_from_u64(seed);
        // head_dim 16 and 64 take the AVX-512 block step where present; contexts past 128 keys
        // are merged from key chunks, and inside a pool a short query chunk's key chunks are
        // spread over tasks. Three, six and seven query heads per KV head take that step's
        // passes of three rows, of six, and of four and three; the AVX2 step's passes take
        // three, four and two, four and three, and one (a head per KV head).
        let (nh, nkv, hd) = ([6, 12, 14, 2][rep_sel], 2, [8, 16, 48, 64][hd_sel]);
        // Blocks of more than 16 keys take several wide steps each.
        let bs = [1, 2, 3, 4, 5, 6, 7, 8, 16, 17, 24, 32][bs_sel];
        let layout = PagedLayout { block_size: bs, n_kv_heads: nkv, head_dim: hd };
        let total = ctx0 + n_new;
        let nblocks = total.div_ceil(bs) + 3;
        let mut table: Vec<u32> = (0..nblocks as u32).collect();
        for i in (1..table.len()).rev() { table.swap(i, rng.gen_range(0..=i)); }
        let table = &table[..total.div_ceil(bs)];
        let k_all = random_vec(&mut rng, total * nkv * hd);
        let v_all = random_vec(&mut rng, total * nkv * hd);
        // Round through the pool's precision so the dense reference sees the same values.
        let round = |x: &[f32]| -> Vec<f32> { if f16_pool { x.iter().map(|v| f16::from_f32(*v).to_f32()).collect() } else { x.to_vec() } };
        let (k_ref, v_ref) = (round(&k_all), round(&v_all));
        let q = random_vec(&mut rng, n_new * nh * hd);
        let pool = nblocks * bs * nkv * hd;
        // Slots no sequence wrote hold NaN: a kernel reading past a sequence's keys (the AVX2
        // step reads whole vectors) must mask them out without arithmetic.
        let (mut k32, mut v32) = (vec![f32::NAN; pool], vec![f32::NAN; pool]);
        let (mut k16, mut v16) = (vec![f16::NAN; pool], vec![f16::NAN; pool]);
        let seq0 = [AttnSeq { row_start: 0, n_new: total, context_len: 0, block_table: table }];
        {
            let (mut km, mut vm) = if f16_pool { (KvMut::F16(&mut k16), KvMut::F16(&mut v16)) } else { (KvMut::F32(&mut k32), KvMut::F32(&mut v32)) };
            write_kv(&layout, &seq0, &k_all, &v_all, &mut km, &mut vm);
        }
        let (kr, vr) = if f16_pool { (KvRef::F16(&k16), KvRef::F16(&v16)) } else { (KvRef::F32(&k32), KvRef::F32(&v32)) };
        let seqs = [AttnSeq { row_start: 0, n_new, context_len: ctx0, block_table: table }];
        let mut out = vec![0f32; q.len()];
        let mut run = || paged_attention(&layout, &seqs, &q, nh, 1.0 / (hd as f32).sqrt(), window, kr, vr, &mut out);
        if pooled { ThreadPool::new(3).unwrap().install(run) } else { run() }
        let want = dense_attention(&q, &k_ref, &v_ref, ctx0, n_new, nh, nkv, hd, window);
        for (a, b) in out.iter().zip(&want) {
            prop_assert!((a - b).abs() <= 1e-4, "{} vs {}", a, b);
        }
    }
}

/// A random K/V pool holding `lens` sequences' keys, with shuffled block tables.
struct Pool {
    layout: PagedLayout,
    k: Vec<f16>,
    v: Vec<f16>,
    tables: Vec<Vec<u32>>,
}

fn random_pool(rng: &mut StdRng, lens: &[usize], bs: usize, nkv: usize, hd: usize) -> Pool {
    let layout = PagedLayout {
        block_size: bs,
        n_kv_heads: nkv,
        head_dim: hd,
    };
    let nblocks: usize = lens.iter().map(|l| l.div_ceil(bs)).sum();
    let mut ids: Vec<u32> = (0..nblocks as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.gen_range(0..=i));
    }
    let mut tables = Vec::new();
    let mut next = 0;
    for l in lens {
        tables.push(ids[next..next + l.div_ceil(bs)].to_vec());
        next += l.div_ceil(bs);
    }
    let size = nblocks * bs * nkv * hd;
    let mut k = vec![f16::ZERO; size];
    let mut v = vec![f16::ZERO; size];
    for (i, l) in lens.iter().enumerate() {
        let seq = [AttnSeq {
            row_start: 0,
            n_new: *l,
            context_len: 0,
            block_table: &tables[i],
        }];
        let (ka, va) = (random_vec(rng, l * nkv * hd), random_vec(rng, l * nkv * hd));
        write_kv(
            &layout,
            &seq,
            &ka,
            &va,
            &mut KvMut::F16(&mut k),
            &mut KvMut::F16(&mut v),
        );
    }
    Pool {
        layout,
        k,
        v,
        tables,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// A sequence's attention output is bitwise the same alone, inside any batch, with its new
    /// tokens in one call or two, and on 1, 2 or 3 threads.
    #[test]
    fn attention_is_batch_chunk_and_thread_invariant(seed in any::<u64>(), ctx in 0usize..600, n_new in 1usize..24, others in 0usize..3, bs_sel in 0usize..3, window in prop::option::of(1usize..400)) {
        let mut rng = StdRng::seed_from_u64(seed);
        let (nh, nkv, hd, bs) = (6, 2, 64, [16, 8, 32][bs_sel]);
        let mut lens = vec![ctx + n_new];
        let other_new: Vec<usize> = (0..others).map(|_| rng.gen_range(1..9)).collect();
        for n in &other_new {
            lens.push(rng.gen_range(0..500) + n);
        }
        let pool = random_pool(&mut rng, &lens, bs, nkv, hd);
        let (kr, vr) = (KvRef::F16(&pool.k), KvRef::F16(&pool.v));
        let scale = 1.0 / (hd as f32).sqrt();
        let w = nh * hd;
        let q = random_vec(&mut rng, n_new * w);
        let attend = |seqs: &[AttnSeq], q: &[f32], threads: usize| {
            let mut out = vec![0f32; q.len()];
            let mut run = || paged_attention(&pool.layout, seqs, q, nh, scale, window, kr, vr, &mut out);
            if threads > 1 { ThreadPool::new(threads).unwrap().install(run) } else { run() }
            out
        };
        let alone = attend(&[AttnSeq { row_start: 0, n_new, context_len: ctx, block_table: &pool.tables[0] }], &q, 1);
        // In a batch: other sequences' rows first, then this one's.
        let mut batch_q = Vec::new();
        let mut seqs = Vec::new();
        let mut row = 0;
        for (i, n) in other_new.iter().enumerate() {
            batch_q.extend(random_vec(&mut rng, n * w));
            seqs.push(AttnSeq { row_start: row, n_new: *n, context_len: lens[i + 1] - n, block_table: &pool.tables[i + 1] });
            row += n;
        }
        seqs.push(AttnSeq { row_start: row, n_new, context_len: ctx, block_table: &pool.tables[0] });
        batch_q.extend_from_slice(&q);
        for threads in [1, 2, 3] {
            let out = attend(&seqs, &batch_q, threads);
            prop_assert!(out[row * w..] == alone[..], "batch of {} on {} threads differs", seqs.len(), threads);
        }
        // The new tokens in two calls (as a chunked prefill runs them).
        if n_new > 1 {
            let half = n_new / 2;
            let first = attend(&[AttnSeq { row_start: 0, n_new: half, context_len: ctx, block_table: &pool.tables[0] }], &q[..half * w], 2);
            let second = attend(&[AttnSeq { row_start: 0, n_new: n_new - half, context_len: ctx + half, block_table: &pool.tables[0] }], &q[half * w..], 3);
            prop_assert!(first[..] == alone[..half * w] && second[..] == alone[half * w..], "chunked differs");
        }
    }
}

/// Rows `cols` of each row of `data` (`n` rows of `k` elements of `d`), as a matrix's bytes.
fn column_slice(d: DType, data: &[u8], k: usize, cols: std::ops::Range<usize>) -> Vec<u8> {
    let rb = d.row_bytes(k).unwrap();
    let (a, b) = (
        d.row_bytes(cols.start).unwrap(),
        d.row_bytes(cols.end).unwrap(),
    );
    data.chunks_exact(rb)
        .flat_map(|r| r[a..b].to_vec())
        .collect()
}

/// A sum cut into parts of the input columns (as tensor-parallel ranks hold them): each part
/// is bitwise what a matrix of those columns alone gives on those columns of the activations,
/// on the packed path at every level and on both unpacked paths, on 1 or 3 threads; the packed
/// path's in-kernel sum is the parts added in order. `cuts` are in units of the format's
/// block (those at or past the end are dropped).
fn check_parts_equal_column_slices(
    seed: u64,
    d: DType,
    supers: usize,
    cuts: &[usize],
    m: usize,
    n: usize,
    pooled: bool,
) -> Result<(), TestCaseError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (bl, k) = (d.block_len(), supers * 256);
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c * bl).filter(|&c| c < k).collect();
    bounds.extend([0, k]);
    bounds.sort_unstable();
    bounds.dedup();
    let parts: Vec<_> = bounds.windows(2).map(|b| b[0]..b[1]).collect();
    let data: Vec<u8> = (0..n).flat_map(|_| random_row(&mut rng, d, k)).collect();
    let w = MatRef::new(d, n, k, &data).unwrap();
    let x = random_vec(&mut rng, m * k);
    let slice = |c: &std::ops::Range<usize>| -> (Vec<f32>, Vec<u8>) {
        let xs = x
            .chunks_exact(k)
            .flat_map(|r| r[c.clone()].to_vec())
            .collect();
        (xs, column_slice(d, &data, k, c.clone()))
    };
    let p = parts.len();
    let run = |f: &mut dyn FnMut()| {
        if pooled {
            ThreadPool::new(3).unwrap().install(f)
        } else {
            f()
        }
    };
    for level in SimdLevel::supported() {
        let mut got = vec![0f32; p * m * n];
        let packed = PackedMat::pack(&w).unwrap();
        run(&mut || packed::matmul_packed_parts(&x, m, &packed, &parts, &mut got, level));
        // Summed in the kernel: the parts added one after another in part order.
        let mut summed = vec![0f32; m * n];
        run(&mut || packed::matmul_packed_summed(&x, m, &packed, &parts, &mut summed, level));
        let mut want = got[..m * n].to_vec();
        for part in got.chunks_exact(m * n).skip(1) {
            want.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        prop_assert_eq!(&summed, &want, "{} {:?} summed", d, level);
        for (i, c) in parts.iter().enumerate() {
            let (xs, ws) = slice(c);
            let part = PackedMat::pack(&MatRef::new(d, n, c.len(), &ws).unwrap()).unwrap();
            let mut want = vec![0f32; m * n];
            packed::matmul_packed(&xs, m, &part, &mut want, level);
            prop_assert_eq!(
                &got[i * m * n..(i + 1) * m * n],
                &want[..],
                "{} {:?} part {:?}",
                d,
                level,
                c
            );
        }
    }
    for precision in [Precision::Fast, Precision::Exact] {
        let mut got = vec![0f32; p * m * n];
        run(&mut || matmul_parts(&x, m, &w, &parts, &mut got, precision));
        for (i, c) in parts.iter().enumerate() {
            let (xs, ws) = slice(c);
            let mut want = vec![0f32; m * n];
            matmul(
                &xs,
                m,
                &MatRef::new(d, n, c.len(), &ws).unwrap(),
                &mut want,
                precision,
            );
            prop_assert_eq!(
                &got[i * m * n..(i + 1) * m * n],
                &want[..],
                "{} {:?} part {:?}",
                d,
                precision,
                c
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// [`check_parts_equal_column_slices`] on random shapes and cuts.
    #[test]
    fn matmul_parts_equal_column_slices(seed in any::<u64>(), which in 0usize..QUANTS.len(), supers in 1usize..7, cuts in proptest::collection::vec(1usize..48, 0..4), m in 1usize..20, n in 1usize..40, pooled in any::<bool>()) {
        check_parts_equal_column_slices(seed, QUANTS[which], supers, &cuts, m, n, pooled)?;
    }
}

/// [`check_parts_equal_column_slices`] for the k-quants in batches large enough for the AMX
/// level's products (from 10 rows), cut into three and four parts, with a ragged last tile
/// and rows past the last sixteen.
#[test]
fn k_quant_batch_parts_equal_column_slices() {
    for (f, d) in QUANTS
        .into_iter()
        .filter(|d| d.block_len() == 256)
        .enumerate()
    {
        for (c, (m, cuts)) in [(32, vec![1, 3]), (49, vec![2, 3, 4])]
            .into_iter()
            .enumerate()
        {
            let seed = (f * 4 + c) as u64;
            check_parts_equal_column_slices(seed, d, 5, &cuts, m, 21, c == 1).unwrap();
        }
    }
}

/// The float path's documented order: product `e` into sum `e % 8` by a fused multiply-add,
/// a partial last step adding zero products to the other sums, the eight sums added as
/// (0+4, 1+5, 2+6, 3+7), then (0+2, 1+3), then the two.
fn fixed_order_dot(x: &[f32], w: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let padded = x.len().div_ceil(8) * 8;
    for e in 0..padded {
        let (a, b) = if e < x.len() {
            (x[e], w[e])
        } else {
            (0.0, 0.0)
        };
        acc[e % 8] = a.mul_add(b, acc[e % 8]);
    }
    let q = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (q[0] + q[2]) + (q[1] + q[3])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The float path adds in one fixed order: every result equals the documented dot product
    /// bit for bit, so a row's result does not depend on the batch, the matrix's other rows,
    /// the thread count or the SIMD level (`scripts/test.sh` runs this at every level).
    #[test]
    fn float_path_adds_in_a_fixed_order(seed in any::<u64>(), m in 1usize..11, n in 1usize..30, k8 in 1usize..40, odd in 0usize..8, quant in any::<bool>(), pooled in any::<bool>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        let (d, k) = if quant { (DType::Q4_0, k8 * 32) } else { (DType::F32, k8 * 8 + odd) };
        let data: Vec<u8> = (0..n).flat_map(|_| random_row(&mut rng, d, k)).collect();
        let data = if quant { data } else {
            (0..n * k).flat_map(|_| rng.gen_range(-1f32..1.0).to_le_bytes()).collect()
        };
        let w = MatRef::new(d, n, k, &data).unwrap();
        let x = random_vec(&mut rng, m * k);
        let mut got = vec![0f32; m * n];
        let mut run = || matmul(&x, m, &w, &mut got, Precision::Exact);
        if pooled { ThreadPool::new(3).unwrap().install(&mut run) } else { run() }
        let mut wrow = vec![0f32; k];
        for j in 0..n {
            w.row_f32(j, &mut wrow);
            for i in 0..m {
                let want = fixed_order_dot(&x[i * k..(i + 1) * k], &wrow);
                prop_assert_eq!(got[i * n + j].to_bits(), want.to_bits(), "[{}, {}] of {}x{}x{}", i, j, m, n, k);
            }
        }
    }
}

/// The rows' argmax on a pool equals each row's alone, ties included (few distinct values).
#[test]
fn argmax_rows_on_a_pool_equal_each_row_alone() {
    let mut rng = StdRng::seed_from_u64(11);
    let (n, len) = (13, 1000);
    let values: Vec<f32> = (0..n * len).map(|_| rng.gen_range(-3..3) as f32).collect();
    let rows: Vec<usize> = (0..n).rev().step_by(2).collect();
    let pool = ThreadPool::new(3).unwrap();
    let got = pool.install(|| ops::argmax_rows(&values, len, &rows));
    let want: Vec<u32> = rows
        .iter()
        .map(|&r| ops::argmax(&values[r * len..(r + 1) * len]))
        .collect();
    assert_eq!(got, want);
    for (&r, &t) in rows.iter().zip(&want) {
        let row = &values[r * len..(r + 1) * len];
        let first = row.iter().position(|&v| v == 2.0);
        assert_eq!(Some(t as usize), first, "row {r}: the first of its largest");
    }
}
