//! The engine on the reference model: batch invariance, prefix reuse, preemption under a tiny
//! KV pool, KV handoff between engines, cancellation, stop strings, seeds, streaming and bad
//! input. Batch invariance, preemption and the KV handoff also run on Qwen2.5-Coder-0.5B.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tandem_engine::*;
use tandem_model::{load, LoadedModel, Precision};

fn model() -> LoadedModel {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    let p = PATH
        .get_or_init(|| tandem_model::fetch::ensure_default_model(false).expect("default model"));
    load(p).unwrap()
}

fn pipeline(cfg: EngineConfig) -> Pipeline {
    Pipeline::from_loaded(model(), cfg).unwrap()
}

/// Qwen2.5-Coder-0.5B-Instruct (q/k/v biases, NeoX rope, a Q5_0 / Q8_0 / k-quant mix).
fn qwen() -> LoadedModel {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    let p = PATH.get_or_init(|| {
        let m = tandem_model::fetch::named_model("Qwen2.5-Coder-0.5B-Instruct").expect("named");
        tandem_model::fetch::ensure_model(m, false).expect("Qwen2.5-Coder-0.5B fetched")
    });
    load(p).unwrap()
}

fn golden_prompts() -> Vec<Vec<u32>> {
    golden_prompts_of("real_golden.json")
}

/// The prompts of a real-model golden file in `tandem-model/tests/data`.
fn golden_prompts_of(file: &str) -> Vec<Vec<u32>> {
    let path = format!(
        "{}/../tandem-model/tests/data/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            c["prompt_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn greedy(n: usize) -> GenerateParams {
    GenerateParams {
        max_new_tokens: Some(n),
        ignore_eos: true,
        ..GenerateParams::greedy()
    }
}

/// A request's greedy tokens are the same alone and inside a batch, on 1, 2 and 3 compute
/// threads: the reference prompts, and two long ones whose keys span several attention chunks.
#[test]
fn tokens_do_not_depend_on_batch_or_thread_count() {
    batch_and_thread_invariance(model, golden_prompts(), &[1, 2, 3], Precision::Fast);
}

/// The same on the float path (its dot products add in one fixed order).
#[test]
fn float_path_tokens_do_not_depend_on_batch_or_thread_count() {
    batch_and_thread_invariance(model, golden_prompts(), &[1, 3], Precision::Exact);
}

/// The same on Qwen2.5-Coder-0.5B (1 and 2 threads: its forward is ~4x the reference's).
#[test]
fn qwen_tokens_do_not_depend_on_batch_or_thread_count() {
    batch_and_thread_invariance(
        qwen,
        golden_prompts_of("qwen2.5-coder-0.5b_golden.json"),
        &[1, 2],
        Precision::Fast,
    );
}

fn batch_and_thread_invariance(
    model: fn() -> LoadedModel,
    mut prompts: Vec<Vec<u32>>,
    thread_counts: &[usize],
    precision: Precision,
) {
    let tok = model().tokenizer;
    for text in [
        "In a quiet town by the river there lived an old clockmaker who repaired every kind of clock. ",
        "The history of mathematics spans many centuries and cultures, from counting to calculus. ",
    ] {
        prompts.push(tok.encode(&text.repeat(8), true).unwrap());
    }
    let mut reference: Option<Vec<Vec<u32>>> = None;
    for &threads in thread_counts {
        let mut loaded = model();
        loaded.model = loaded
            .model
            .with_threads(threads)
            .unwrap()
            .with_precision(precision);
        let p = Pipeline::from_loaded(
            loaded,
            EngineConfig {
                max_batch_tokens: Some(64),
                ..Default::default()
            },
        )
        .unwrap();
        let together: Vec<Vec<u32>> = p
            .generate_tokens(prompts.clone(), &greedy(12))
            .unwrap()
            .into_iter()
            .map(|r| r.token_ids)
            .collect();
        let alone: Vec<Vec<u32>> = prompts
            .iter()
            .map(|pr| {
                p.generate_tokens(vec![pr.clone()], &greedy(12)).unwrap()[0]
                    .token_ids
                    .clone()
            })
            .collect();
        assert!(alone.iter().all(|t| t.len() == 12));
        assert_eq!(together, alone, "{threads} threads: in a batch vs alone");
        match &reference {
            None => reference = Some(alone),
            Some(r) => assert_eq!(&alone, r, "{threads} threads vs 1"),
        }
    }
}

#[test]
fn prefix_reuse_recomputes_only_new_blocks() {
    let p = pipeline(EngineConfig::default());
    let tok = p.engine().unwrap().tokenizer().clone();
    let base = "In a quiet town by the river there lived an old clockmaker who repaired every kind of clock. ".repeat(6);
    let a = tok
        .encode(
            &format!("{base}One morning a child arrived with a broken watch."),
            true,
        )
        .unwrap();
    let b = tok
        .encode(
            &format!("{base}Years later, the town had grown into a city."),
            true,
        )
        .unwrap();
    let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    assert!(shared >= 96, "prompts share {shared} tokens");
    p.generate_tokens(vec![a], &greedy(4)).unwrap();
    let before = p.engine().unwrap().stats();
    let reused = p.generate_tokens(vec![b.clone()], &greedy(8)).unwrap();
    let after = p.engine().unwrap().stats();
    let bs = p.engine().unwrap().info().block_size;
    assert_eq!(
        after.prefix_hits - before.prefix_hits,
        (shared / bs) as u64,
        "every full shared block is a hit"
    );
    let computed = (after.tokens_computed - before.tokens_computed) as usize;
    assert_eq!(
        computed,
        b.len() - (shared / bs) * bs + 7,
        "only the new blocks and decodes are computed"
    );
    assert_eq!(reused[0].usage.unwrap().cached_tokens, (shared / bs) * bs);
    // Identical output to a fresh engine with nothing cached.
    let fresh = pipeline(EngineConfig::default())
        .generate_tokens(vec![b], &greedy(8))
        .unwrap();
    assert_eq!(fresh[0].token_ids, reused[0].token_ids);
}

#[test]
fn preemption_with_a_tiny_pool_completes_everything_identically() {
    preemption_completes_identically(model, golden_prompts());
}

/// The same on Qwen2.5-Coder-0.5B (its KV blocks are per layer 2 KV heads of 64).
#[test]
fn qwen_preemption_with_a_tiny_pool_completes_everything_identically() {
    preemption_completes_identically(qwen, golden_prompts_of("qwen2.5-coder-0.5b_golden.json"));
}

fn preemption_completes_identically(model: fn() -> LoadedModel, prompts: Vec<Vec<u32>>) {
    let prompts: Vec<Vec<u32>> = prompts.into_iter().take(6).collect();
    let big = Pipeline::from_loaded(model(), EngineConfig::default())
        .unwrap()
        .generate_tokens(prompts.clone(), &greedy(40))
        .unwrap();
    // 8 blocks of 16 tokens: room for two of these sequences at a time.
    let p = Pipeline::from_loaded(
        model(),
        EngineConfig {
            num_blocks: Some(8),
            max_batch_tokens: Some(48),
            ..Default::default()
        },
    )
    .unwrap();
    let small = p.generate_tokens(prompts, &greedy(40)).unwrap();
    let s = p.engine().unwrap().stats();
    assert!(s.preemptions > 0, "the tiny pool must force preemption");
    for (a, b) in big.iter().zip(&small) {
        assert_eq!(a.token_ids, b.token_ids);
    }
    assert_eq!(s.blocks_in_use, 0, "all KV returned");
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn dropping_the_stream_cancels_and_frees_kv() {
    let p = pipeline(EngineConfig::default());
    let params = GenerateParams {
        max_new_tokens: Some(1000),
        ignore_eos: true,
        ..GenerateParams::greedy()
    };
    let mut s = p
        .stream("Tell me a very long story about dragons.", &params)
        .unwrap();
    for _ in 0..3 {
        assert!(s.blocking_recv().unwrap().finish.is_none());
    }
    let e = p.engine().unwrap();
    assert!(e.stats().blocks_in_use > 0);
    drop(s);
    wait_until("KV to be freed", || {
        e.stats().blocks_in_use == 0 && e.stats().running == 0
    });
    // Still serving.
    assert_eq!(
        p.generate(&["Hello"], &greedy(3)).unwrap()[0].generated_length,
        3
    );
}

#[test]
fn stop_strings_streaming_and_seeds() {
    let p = pipeline(EngineConfig::default());
    let base = p
        .generate(&["The capital of France is"], &greedy(12))
        .unwrap()
        .remove(0);
    // Stop on a string that the greedy continuation contains (spanning token boundaries).
    let stop = base.generated_text[3..9].to_string();
    let stopped = p
        .generate(
            &["The capital of France is"],
            &GenerateParams {
                stop: vec![stop.clone()],
                ..greedy(12)
            },
        )
        .unwrap()
        .remove(0);
    assert_eq!(stopped.finish_reason, FinishReason::Stop);
    assert_eq!(stopped.generated_text, base.generated_text[..3]);
    // Streamed pieces add up to the text.
    let mut s = p.stream("The capital of France is", &greedy(12)).unwrap();
    let mut text = String::new();
    while let Some(ev) = s.blocking_recv() {
        text.push_str(&ev.text);
        if ev.finish.is_some() {
            break;
        }
    }
    assert_eq!(text, base.generated_text);
    // Seeds reproduce sampled output.
    let sampled = |seed| {
        let params = GenerateParams {
            seed: Some(seed),
            max_new_tokens: Some(16),
            temperature: Some(1.2),
            top_p: 1.0,
            ignore_eos: true,
            ..Default::default()
        };
        p.generate(&["Once upon a time"], &params)
            .unwrap()
            .remove(0)
            .token_ids
    };
    assert_eq!(sampled(1), sampled(1));
    assert_ne!(sampled(1), sampled(2));
}

#[test]
fn logprobs_and_return_full_text() {
    let p = pipeline(EngineConfig::default());
    let params = GenerateParams {
        logprobs: Some(3),
        return_full_text: true,
        ..greedy(4)
    };
    let r = p
        .generate(&["The capital of France is"], &params)
        .unwrap()
        .remove(0);
    assert!(r.generated_text.starts_with("The capital of France is"));
    let lps = r.logprobs.unwrap();
    assert_eq!(lps.len(), 4);
    for (lp, &t) in lps.iter().zip(&r.token_ids) {
        assert_eq!(lp.top[0].0, t, "greedy picks the top token");
        assert!(lp.logprob <= 0.0 && (lp.logprob - lp.top[0].1).abs() < 1e-6);
    }
}

#[test]
fn bad_requests_are_clear_errors_and_the_engine_keeps_serving() {
    let p = pipeline(EngineConfig {
        max_length: Some(64),
        ..Default::default()
    });
    let long = "word ".repeat(100);
    let cases: Vec<(&str, GenerateParams)> = vec![
        ("", greedy(4)),
        (long.as_str(), greedy(4)),
        (
            "hi",
            GenerateParams {
                max_length: Some(1),
                ..greedy(4)
            },
        ),
        (
            "hi",
            GenerateParams {
                max_length: Some(10_000),
                ..greedy(4)
            },
        ),
        (
            "hi",
            GenerateParams {
                top_p: 0.0,
                ..Default::default()
            },
        ),
        (
            "hi",
            GenerateParams {
                top_p: 1.5,
                ..Default::default()
            },
        ),
        (
            "hi",
            GenerateParams {
                temperature: Some(-1.0),
                ..Default::default()
            },
        ),
        (
            "hi",
            GenerateParams {
                max_new_tokens: Some(0),
                ..Default::default()
            },
        ),
        (
            "hi",
            GenerateParams {
                top_k: Some(0),
                ..Default::default()
            },
        ),
        (
            "hi",
            GenerateParams {
                repetition_penalty: f32::NAN,
                ..Default::default()
            },
        ),
        (
            "hi",
            GenerateParams {
                logprobs: Some(1000),
                ..Default::default()
            },
        ),
        (
            "hi",
            GenerateParams {
                stop: vec![String::new()],
                ..Default::default()
            },
        ),
    ];
    for (prompt, params) in cases {
        let e = p.generate(&[prompt], &params).unwrap_err();
        assert!(
            matches!(e, EngineError::Param(_)),
            "{prompt:?} {params:?}: {e}"
        );
    }
    let e = p
        .generate_tokens(vec![vec![1, 999_999]], &greedy(2))
        .unwrap_err();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    // A good request in the same call as a bad one fails the call before anything runs...
    assert!(p.generate(&["fine", ""], &greedy(2)).is_err());
    // ...and the engine still serves.
    assert_eq!(
        p.generate(&["fine"], &greedy(2)).unwrap()[0].generated_length,
        2
    );
    assert_eq!(p.engine().unwrap().stats().blocks_in_use, 0);
}

#[test]
fn destroyed_pipeline_refuses_work() {
    let mut p = pipeline(EngineConfig::default());
    p.destroy();
    assert!(matches!(
        p.generate(&["hi"], &greedy(1)),
        Err(EngineError::Closed)
    ));
}

/// Requests sharing a cached prefix, admitted together into a pool so small that their
/// allocations evict cached blocks, all finish with the output they get alone.
#[test]
fn shared_prefixes_under_eviction_pressure() {
    let tok = pipeline(EngineConfig::default())
        .engine()
        .unwrap()
        .tokenizer()
        .clone();
    let base = "A long shared preamble about the history of clocks and the people who made them. "
        .repeat(3);
    let prompts: Vec<Vec<u32>> = [
        "First question?",
        "Second question!",
        "Third, different one.",
        "Fourth.",
    ]
    .iter()
    .map(|q| tok.encode(&format!("{base}{q}"), true).unwrap())
    .collect();
    let want = pipeline(EngineConfig::default())
        .generate_tokens(prompts.clone(), &greedy(6))
        .unwrap();
    let longest = prompts.iter().map(Vec::len).max().unwrap() + 6;
    // Room for about two sequences, so later admissions must evict cached blocks.
    let p = pipeline(EngineConfig {
        num_blocks: Some(2 * longest.div_ceil(16) + 1),
        ..Default::default()
    });
    p.generate_tokens(vec![prompts[0].clone()], &greedy(2))
        .unwrap(); // caches the preamble
    let got = p.generate_tokens(prompts, &greedy(6)).unwrap();
    for (a, b) in want.iter().zip(&got) {
        assert_eq!(a.token_ids, b.token_ids);
    }
    let s = p.engine().unwrap().stats();
    assert!(s.prefix_hits > 0);
    assert_eq!(s.blocks_in_use, 0);
}

fn tokens_of(mut s: EventStream) -> Vec<u32> {
    let mut out = Vec::new();
    while let Some(ev) = s.blocking_recv() {
        out.extend(ev.token);
        if ev.finish.is_some() {
            break;
        }
    }
    out
}

/// Copies blocks between two engines' pools, as a KV transfer library would.
fn copy_blocks(from: &Engine, src: &[u32], to: &Engine, dst: &[u32]) {
    for (ra, rb) in from.kv_regions().iter().zip(to.kv_regions()) {
        let block = ra.len / from.info().num_blocks;
        for (&s, &d) in src.iter().zip(dst) {
            // SAFETY: block ids come from the engines' own tables, inside their pools; the
            // source blocks are held and the destination blocks reserved, so no step touches
            // them meanwhile.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (ra.addr as usize + s as usize * block) as *const u8,
                    (rb.addr as usize + d as usize * block) as *mut u8,
                    block,
                )
            };
        }
    }
}

/// Two engines: each prompt prefilled on one, its KV blocks copied into the other's pool and
/// decoded there, gives the tokens the first engine generates alone. Returns the engines (with
/// nothing held) and a runtime for further checks.
fn handoff_matches_colocated(
    model: fn() -> LoadedModel,
    prompts: Vec<Vec<u32>>,
) -> (Engine, Engine, tokio::runtime::Runtime) {
    let cfg = EngineConfig {
        num_blocks: Some(256),
        max_batch_tokens: Some(64),
        kv_hold_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let prefill = Engine::start(model(), cfg.clone()).unwrap();
    let decode = Engine::start(model(), cfg).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for prompt in prompts.into_iter().take(3) {
        let colocated = tokens_of(prefill.submit(prompt.clone(), greedy(10)).unwrap());
        let (stream, held) = prefill.submit_prefill(prompt.clone(), greedy(10)).unwrap();
        let first = tokens_of(stream);
        assert_eq!(first.len(), 1);
        let held = rt.block_on(held).unwrap();
        assert!(prefill.stats().blocks_held >= prompt.len().div_ceil(16));
        let reservation = rt.block_on(decode.reserve(prompt.len())).unwrap();
        let n = reservation.blocks().len();
        copy_blocks(&prefill, &held.blocks[..n], &decode, reservation.blocks());
        prefill.release(held.handle);
        let out = decode
            .submit_imported(reservation, prompt.clone(), first[0], greedy(10))
            .unwrap();
        assert_eq!(tokens_of(out), colocated, "prompt {prompt:?}");
    }
    (prefill, decode, rt)
}

/// The same on Qwen2.5-Coder-0.5B.
#[test]
fn qwen_kv_handoff_between_engines_matches_colocated_generation() {
    let (prefill, decode, _rt) =
        handoff_matches_colocated(qwen, golden_prompts_of("qwen2.5-coder-0.5b_golden.json"));
    wait_until("held KV released", || prefill.stats().blocks_held == 0);
    wait_until("decode KV freed", || decode.stats().blocks_in_use == 0);
}

#[test]
fn kv_handoff_between_engines_matches_colocated_generation() {
    let (prefill, decode, rt) = handoff_matches_colocated(model, golden_prompts());
    wait_until("held KV released", || prefill.stats().blocks_held == 0);
    wait_until("decode KV freed", || decode.stats().blocks_in_use == 0);

    // Aborts free KV on both sides: an unused reservation returns its blocks when dropped,
    // and unreleased held KV expires.
    let reservation = rt.block_on(decode.reserve(100)).unwrap();
    wait_until("reservation counted", || {
        decode.stats().blocks_reserved == 7
    });
    drop(reservation);
    wait_until("reservation returned", || {
        decode.stats().blocks_reserved == 0 && decode.stats().blocks_in_use == 0
    });
    let (stream, held) = prefill.submit_prefill(vec![1, 2, 3, 4], greedy(5)).unwrap();
    drop(tokens_of(stream));
    let _unreleased = rt.block_on(held).unwrap();
    wait_until("held KV expired", || {
        prefill.stats().blocks_held == 0 && prefill.stats().blocks_in_use == 0
    });
    // A reservation larger than the pool is a clear error.
    assert!(matches!(
        rt.block_on(decode.reserve(1 << 20)),
        Err(EngineError::NoFreeBlocks { .. })
    ));
}
