//! Real models against HF transformers loading the same GGUF (goldens from
//! `scripts/gen_real_golden.py`): tokenization and chat templates, the float reference path's
//! logits, the fast path's greedy tokens, chunking and batch invariance, bad input. Each test
//! runs on the reference model (SmolLM2-135M-Instruct, Q4_1, llama) and on
//! Qwen2.5-Coder-0.5B-Instruct (qwen2: q/k/v biases, NEOX RoPE, untied LM head, GQA 14/2,
//! Q5_0 / Q8_0 / Q4_K / Q6_K tensors, 151,936-token byte-level BPE).

use std::sync::OnceLock;

use tandem_model::*;

struct Fixture {
    fast: LoadedModel,
    exact: LlamaModel,
    golden: serde_json::Value,
}

/// The models these tests run on.
#[derive(Clone, Copy)]
enum Which {
    SmolLm2,
    Qwen25Coder05,
}

fn fixture(which: Which) -> &'static Fixture {
    static SMOL: OnceLock<Fixture> = OnceLock::new();
    static QWEN: OnceLock<Fixture> = OnceLock::new();
    let (cell, name, golden) = match which {
        Which::SmolLm2 => (
            &SMOL,
            "SmolLM2-135M-Instruct",
            include_str!("data/real_golden.json"),
        ),
        Which::Qwen25Coder05 => (
            &QWEN,
            "Qwen2.5-Coder-0.5B-Instruct",
            include_str!("data/qwen2.5-coder-0.5b_golden.json"),
        ),
    };
    cell.get_or_init(|| {
        let model = fetch::named_model(name).expect("a named model");
        let path = fetch::ensure_model(model, false).expect("model fetched");
        let fast = load(&path).unwrap();
        let exact = load(&path).unwrap().model.with_precision(Precision::Exact);
        let golden = serde_json::from_str(golden).unwrap();
        Fixture {
            fast,
            exact,
            golden,
        }
    })
}

/// Each test, once per model.
macro_rules! on_each_model {
    ($($test:ident),* $(,)?) => {
        mod smollm2_135m {
            $(#[test] fn $test() { super::$test(super::fixture(super::Which::SmolLm2)) })*
        }
        mod qwen2_5_coder_0_5b {
            $(#[test] fn $test() { super::$test(super::fixture(super::Which::Qwen25Coder05)) })*
        }
    };
}

on_each_model!(
    tokenization_equals_transformers,
    float_path_logits_match_transformers,
    fast_path_greedy_agrees_except_near_ties,
    chunking_invariance,
    ragged_batch_equals_each_alone,
    bad_batches_are_errors,
    incremental_decoding_is_utf8_safe,
);

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The golden cases that have a greedy continuation.
fn cases(f: &Fixture) -> Vec<&serde_json::Value> {
    f.golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c.get("greedy_ids").is_some())
        .collect()
}

fn messages(v: &serde_json::Value) -> Vec<ChatMessage> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Runs `tokens` through `model` in chunks of the given sizes; returns every position's logits.
fn run_chunks(
    model: &LlamaModel,
    tokens: &[u32],
    chunks: &[usize],
    dtype: KvDType,
) -> Vec<Vec<f32>> {
    let mut kv = KvCache::new(model.config(), 64, 16, dtype);
    let table: Vec<u32> = (0..64).collect();
    let (mut pos, mut out) = (0, vec![]);
    let mut sizes = chunks.iter().cycle();
    while pos < tokens.len() {
        let n = (*sizes.next().unwrap()).min(tokens.len() - pos);
        let seq = SeqInput {
            n_tokens: n,
            context_len: pos,
            block_table: &table,
            logits: LogitsMode::All,
        };
        let l = model
            .forward(&tokens[pos..pos + n], &[seq], &mut kv)
            .unwrap();
        out.extend((0..n).map(|i| l.row(i).to_vec()));
        pos += n;
    }
    out
}

fn tokenization_equals_transformers(f: &Fixture) {
    let tok = &f.fast.tokenizer;
    for c in f.golden["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let msgs = match c.get("user") {
            Some(u) => vec![ChatMessage::new("user", u.as_str().unwrap())],
            None => c.get("messages").map(messages).unwrap_or_default(),
        };
        let rendered = match c["kind"].as_str().unwrap() {
            "chat" => Some(tok.apply_chat_template(&msgs, true).unwrap()),
            "tools" => Some(
                tok.apply_chat_template_with_tools(&msgs, &c["tools"], true)
                    .unwrap(),
            ),
            _ => None,
        };
        if let Some(r) = rendered {
            assert_eq!(r, text, "chat template rendering");
        }
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&c["prompt_ids"]),
            "tokens of {text:?}"
        );
        // Decoding gives the text back (byte-level BPE is lossless).
        assert_eq!(tok.decode(&ids(&c["prompt_ids"]), false).unwrap(), text);
    }
}

/// The float reference path (weights dequantized to f32, f32 KV) against transformers' f32
/// logits, teacher-forced along transformers' greedy continuation.
fn float_path_logits_match_transformers(f: &Fixture) {
    let mut worst = 0f32;
    for c in cases(f) {
        let mut tokens = ids(&c["prompt_ids"]);
        let greedy = ids(&c["greedy_ids"]);
        let p = tokens.len();
        tokens.extend(&greedy[..greedy.len() - 1]);
        let logits = run_chunks(&f.exact, &tokens, &[tokens.len()], KvDType::F32);
        for (s, step) in c["steps"].as_array().unwrap().iter().enumerate() {
            let row = &logits[p - 1 + s];
            for (id, want) in ids(&step["top_ids"])
                .iter()
                .zip(step["top_logits"].as_array().unwrap())
            {
                let d = (row[*id as usize] - want.as_f64().unwrap() as f32).abs();
                worst = worst.max(d);
            }
        }
    }
    println!("float path: worst top-k logit difference from transformers {worst:.2e}");
    assert!(
        worst < 5e-4,
        "float path differs from transformers by {worst}"
    );
}

/// The fast path (int8 activations) generates transformers' greedy tokens, diverging only
/// where transformers' own top-1/top-2 margin is a near-tie. The KV cache is f32 here, as in
/// transformers, so the comparison isolates activation quantization; measured on these cases the
/// fast path's top-1/top-2 margin differs from transformers' by p50 0.09 / p90 0.23 with f32 KV
/// and p50 0.09 / p90 0.26 with f16 KV (max 0.55 / 0.66).
fn fast_path_greedy_agrees_except_near_ties(f: &Fixture) {
    let m = &f.fast.model;
    let mut diverged = 0;
    for c in cases(f) {
        let prompt = ids(&c["prompt_ids"]);
        let greedy = ids(&c["greedy_ids"]);
        let mut kv = KvCache::new(m.config(), 64, 16, KvDType::F32);
        let table: Vec<u32> = (0..64).collect();
        let seq = SeqInput {
            n_tokens: prompt.len(),
            context_len: 0,
            block_table: &table,
            logits: LogitsMode::Last,
        };
        let mut next = argmax(m.forward(&prompt, &[seq], &mut kv).unwrap().row(0));
        for (s, step) in c["steps"].as_array().unwrap().iter().enumerate() {
            let ctx = prompt.len() + s;
            if next != greedy[s] {
                let margin = step["margin"].as_f64().unwrap();
                assert!(
                    margin < 0.3,
                    "{:?} step {s}: got {next}, transformers {} with margin {margin}",
                    c["text"],
                    greedy[s]
                );
                diverged += 1;
                break;
            }
            let seq = SeqInput {
                n_tokens: 1,
                context_len: ctx,
                block_table: &table,
                logits: LogitsMode::Last,
            };
            next = argmax(m.forward(&[next], &[seq], &mut kv).unwrap().row(0));
        }
    }
    println!(
        "fast path: {diverged} of {} continuations diverged (all at near-ties)",
        cases(f).len()
    );
}

/// Whole, chunked and token-by-token prefill give the same logits (f32 KV, fast path).
fn chunking_invariance(f: &Fixture) {
    let m = &f.fast.model;
    let c = &cases(f)[2];
    let mut tokens = ids(&c["prompt_ids"]);
    tokens.extend(ids(&c["greedy_ids"]));
    let whole = run_chunks(m, &tokens, &[tokens.len()], KvDType::F32);
    for chunks in [vec![1], vec![5, 3, 17, 1, 2], vec![16], vec![7]] {
        let got = run_chunks(m, &tokens, &chunks, KvDType::F32);
        for (p, (a, b)) in got.iter().zip(&whole).enumerate() {
            let scale = b.iter().fold(0f32, |x, v| x.max(v.abs()));
            let d = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                d <= 1e-4 * scale,
                "chunks {chunks:?} position {p}: max diff {d} (scale {scale})"
            );
        }
    }
}

/// A ragged batch (prefills, a chunk continuation and decodes together) gives every sequence
/// the logits it gets alone.
fn ragged_batch_equals_each_alone(f: &Fixture) {
    let m = &f.fast.model;
    let seqs: Vec<Vec<u32>> = cases(f)
        .iter()
        .take(5)
        .map(|c| ids(&c["prompt_ids"]))
        .collect();
    let alone: Vec<Vec<Vec<f32>>> = seqs
        .iter()
        .map(|s| run_chunks(m, s, &[s.len()], KvDType::F32))
        .collect();
    // Each sequence gets its own 8 blocks of 16; sequence i first runs a prefix of i tokens
    // alone, then the rest joins one batch with everyone else.
    let mut kv = KvCache::new(m.config(), 64, 16, KvDType::F32);
    let tables: Vec<Vec<u32>> = (0..seqs.len() as u32)
        .map(|i| (i * 8..i * 8 + 8).collect())
        .collect();
    for (i, s) in seqs.iter().enumerate().filter(|(i, _)| *i > 0) {
        let seq = SeqInput {
            n_tokens: i,
            context_len: 0,
            block_table: &tables[i],
            logits: LogitsMode::None,
        };
        m.forward(&s[..i], &[seq], &mut kv).unwrap();
    }
    let mut flat = vec![];
    let mut inputs = vec![];
    for (i, s) in seqs.iter().enumerate() {
        flat.extend_from_slice(&s[i..]);
        inputs.push(SeqInput {
            n_tokens: s.len() - i,
            context_len: i,
            block_table: &tables[i],
            logits: LogitsMode::All,
        });
    }
    let out = m.forward(&flat, &inputs, &mut kv).unwrap();
    for (r, &(si, pos)) in out.rows.iter().enumerate() {
        let want = &alone[si][pos];
        let d = out
            .row(r)
            .iter()
            .zip(want)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            d <= 1e-4 * want.iter().fold(0f32, |x, v| x.max(v.abs())),
            "sequence {si} position {pos}: diff {d}"
        );
    }
}

fn bad_batches_are_errors(f: &Fixture) {
    let m = &f.fast.model;
    let (vocab, max) = (m.config().vocab_size as u32, m.max_context());
    let mut kv = KvCache::new(m.config(), 4, 16, KvDType::F16);
    let t = [0u32, 1, 2, 3];
    let one = |n, ctx, table: &'static [u32]| SeqInput {
        n_tokens: n,
        context_len: ctx,
        block_table: table,
        logits: LogitsMode::Last,
    };
    let err = |tokens: &[u32], s: SeqInput| {
        m.forward(
            tokens,
            &[s],
            &mut KvCache::new(m.config(), 4, 16, KvDType::F16),
        )
        .unwrap_err()
        .to_string()
    };
    assert!(err(&t, one(3, 0, &[0])).contains("claim 3 tokens"));
    assert!(err(&[vocab], one(1, 0, &[0])).contains("outside the vocabulary"));
    assert!(err(&t, one(4, 14, &[0])).contains("cannot hold 18"));
    assert!(err(&t, one(4, 0, &[9])).contains("outside the pool"));
    let overflow = m
        .forward(&t, &[one(4, max - 2, &[0])], &mut kv)
        .unwrap_err();
    assert!(
        matches!(overflow, ModelError::ContextOverflow { len, max: m } if len == max + 2 && m == max),
        "{overflow}"
    );
    let shared: &'static [u32] = &[0];
    let two = [one(2, 0, shared), one(2, 0, shared)];
    assert!(m
        .forward(&t, &two, &mut kv)
        .unwrap_err()
        .to_string()
        .contains("another token"));
}

/// Streaming detokenization never emits broken UTF-8 and reassembles the full text, even when
/// characters span several byte-level tokens (CJK, emoji).
fn incremental_decoding_is_utf8_safe(f: &Fixture) {
    let tok = &f.fast.tokenizer;
    for text in [
        "Les élèves — naïve café, 東京, emoji 🙂🙂!",
        "plain ascii",
        " 🙂 😀😀 中文字符",
    ] {
        let ids = tok.encode(text, false).unwrap();
        let mut dec = IncrementalDecoder::new(&[]);
        let mut out = String::new();
        for &id in &ids {
            let piece = dec.push(tok, id).unwrap();
            assert!(
                !piece.contains('\u{FFFD}'),
                "broken UTF-8 piece {piece:?} in {text:?}"
            );
            out.push_str(&piece);
        }
        out.push_str(&dec.flush(tok).unwrap());
        assert_eq!(out, text);
    }
}
