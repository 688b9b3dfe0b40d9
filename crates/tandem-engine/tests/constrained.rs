//! Constrained decoding (llguidance grammars), stop token ids, and prompt scoring on the
//! reference model.

use std::sync::OnceLock;

use tandem_engine::*;
use tandem_model::{load, LoadedModel, LogitsMode, Precision, SeqInput};

fn model() -> LoadedModel {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    let p = PATH
        .get_or_init(|| tandem_model::fetch::ensure_default_model(false).expect("default model"));
    load(p).unwrap()
}

fn pipeline(cfg: EngineConfig) -> Pipeline {
    Pipeline::from_loaded(model(), cfg).unwrap()
}

fn chat(p: &Pipeline, user: &str) -> Vec<u32> {
    let tok = p.engine().unwrap().tokenizer().clone();
    let text = tok
        .apply_chat_template(&[tandem_model::ChatMessage::new("user", user)], true)
        .unwrap();
    tok.encode(&text, false).unwrap()
}

fn constrained(g: Grammar, sample: bool, seed: u64) -> GenerateParams {
    GenerateParams {
        max_new_tokens: Some(200),
        grammar: Some(g),
        do_sample: sample,
        seed: Some(seed),
        ..GenerateParams::default()
    }
}

#[test]
fn json_schema_outputs_validate() {
    let p = pipeline(EngineConfig::default());
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3}
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": false
    });
    for (i, prompt) in [
        "Describe a person as JSON.",
        "Give me a user record.",
        "Who are you?",
    ]
    .iter()
    .enumerate()
    {
        for sample in [false, true] {
            let out = p
                .generate_tokens(
                    vec![chat(&p, prompt)],
                    &constrained(Grammar::JsonSchema(schema.clone()), sample, i as u64),
                )
                .unwrap();
            let r = &out[0];
            assert_eq!(
                r.finish_reason,
                FinishReason::Stop,
                "{:?}",
                r.generated_text
            );
            let v: serde_json::Value = serde_json::from_str(&r.generated_text)
                .unwrap_or_else(|e| panic!("{e}: {:?}", r.generated_text));
            let obj = v.as_object().unwrap();
            assert_eq!(obj.len(), 3, "{v}");
            assert!(obj["name"].as_str().unwrap().chars().count() <= 20);
            assert!((0..=150).contains(&obj["age"].as_i64().unwrap()));
            for t in obj["tags"].as_array().unwrap() {
                assert!(["a", "b", "c"].contains(&t.as_str().unwrap()));
            }
        }
    }
}

/// Between two tokens of a JSON value the grammar allows at most twenty characters of
/// whitespace, in any mix (sampling at temperature 0.8, the model once spent all of its
/// `max_tokens` on newlines after a value); a schema's own `x-guidance` wins.
#[test]
fn json_whitespace_is_bounded_unless_the_schema_says_otherwise() {
    let p = pipeline(EngineConfig::default());
    let engine = p.engine().unwrap();
    let tok = engine.tokenizer().clone();
    let id = |s: &str| {
        let ids = tok.encode(s, false).unwrap();
        assert_eq!(ids.len(), 1, "{s:?} is one token");
        ids[0]
    };
    let (nl, sp, close) = (id("\n"), id(" "), id("}"));
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": false
    });
    // A constraint that has read `{"ok": false`.
    let after_value = |schema: &serde_json::Value| {
        let mut c = engine
            .grammars()
            .compile(&Grammar::JsonSchema(schema.clone()))
            .unwrap();
        for t in tok.encode("{\"ok\": false", false).unwrap() {
            c.consume(t).unwrap();
        }
        c
    };
    let mut c = after_value(&schema);
    for i in 0..20 {
        c.consume(if i % 3 == 1 { sp } else { nl }).unwrap();
    }
    assert!(c.consume(nl).is_err(), "a 21st character of whitespace");
    let mut c = after_value(&schema);
    for t in [nl, sp, nl, close] {
        c.consume(t).unwrap();
    }
    assert!(c.is_finished());
    let mut own = schema.clone();
    own["x-guidance"] = serde_json::json!({"whitespace_flexible": true});
    let mut c = after_value(&own);
    for _ in 0..30 {
        c.consume(nl).unwrap();
    }
    c.consume(close).unwrap();
    assert!(c.is_finished());
}

#[test]
fn regex_choice_and_json_object() {
    let p = pipeline(EngineConfig::default());
    let prompt = chat(&p, "What is 2 + 2?");
    let r = &p
        .generate_tokens(
            vec![prompt.clone()],
            &constrained(Grammar::Regex(r"[0-9]{1,3}-[a-z]{2}".into()), true, 1),
        )
        .unwrap()[0];
    assert_eq!(r.finish_reason, FinishReason::Stop);
    let (d, l) = r.generated_text.split_once('-').unwrap();
    assert!((1..=3).contains(&d.len()) && d.chars().all(|c| c.is_ascii_digit()));
    assert!(l.len() == 2 && l.chars().all(|c| c.is_ascii_lowercase()));
    for seed in 0..4 {
        let r = &p
            .generate_tokens(
                vec![prompt.clone()],
                &constrained(
                    Grammar::Choice(vec!["four".into(), "five".into(), "twenty two".into()]),
                    true,
                    seed,
                ),
            )
            .unwrap()[0];
        assert!(
            ["four", "five", "twenty two"].contains(&r.generated_text.as_str()),
            "{:?}",
            r.generated_text
        );
    }
    // A copying task: a free one ("List three fruits.") ran greedily into a string of emoji
    // until `max_tokens` with the AVX2 kernels, whose rounding differs from the others'.
    let r = &p
        .generate_tokens(
            vec![chat(
                &p,
                r#"Repeat this JSON object: {"fruits": ["apple", "banana", "cherry"]}"#,
            )],
            &constrained(Grammar::JsonObject, false, 0),
        )
        .unwrap()[0];
    let v: serde_json::Value = serde_json::from_str(&r.generated_text).unwrap();
    assert!(v.is_object(), "{v}");
    let engine = p.engine().unwrap();
    let mut c = engine.grammars().compile(&Grammar::JsonObject).unwrap();
    let open = engine.tokenizer().encode("[", false).unwrap();
    assert!(
        c.consume(open[0]).is_err(),
        "json_object allows only an object"
    );
}

#[test]
fn bad_grammars_are_refused_before_running() {
    let p = pipeline(EngineConfig::default());
    let prompt = chat(&p, "hi");
    for g in [
        Grammar::Regex("(unclosed".into()),
        Grammar::Lark("start: undefined_rule".into()),
        Grammar::JsonSchema(serde_json::json!({"type": "no-such-type"})),
        Grammar::Choice(vec![]),
    ] {
        let e = p
            .generate_tokens(vec![prompt.clone()], &constrained(g.clone(), false, 0))
            .unwrap_err();
        assert!(
            matches!(
                e,
                EngineError::Param(ParamError::Invalid {
                    name: "grammar",
                    ..
                })
            ),
            "{g:?}: {e}"
        );
    }
    // The engine still serves.
    let ok = p
        .generate_tokens(vec![prompt], &GenerateParams::greedy())
        .unwrap();
    assert!(ok[0].generated_length > 0);
}

#[test]
fn stop_token_ids_end_generation() {
    let p = pipeline(EngineConfig::default());
    let prompt = chat(&p, "Count from one to ten.");
    let free = &p
        .generate_tokens(
            vec![prompt.clone()],
            &GenerateParams {
                max_new_tokens: Some(12),
                ignore_eos: true,
                ..GenerateParams::greedy()
            },
        )
        .unwrap()[0];
    let stop = free.token_ids[5];
    let first = free.token_ids.iter().position(|&t| t == stop).unwrap();
    let r = &p
        .generate_tokens(
            vec![prompt],
            &GenerateParams {
                max_new_tokens: Some(12),
                ignore_eos: true,
                stop_token_ids: vec![stop],
                ..GenerateParams::greedy()
            },
        )
        .unwrap()[0];
    assert_eq!(r.finish_reason, FinishReason::Stop);
    assert_eq!(r.token_ids, free.token_ids[..first]);
}

/// Scoring a prompt (no new tokens) gives the model's own log-softmax at every position, on
/// the float path.
#[test]
fn prompt_logprobs_equal_the_models_log_softmax() {
    let reference = model();
    let prompt = reference
        .tokenizer
        .encode("The quick brown fox jumps over the lazy dog because", true)
        .unwrap();
    // Reference: one forward over the whole prompt with every position's logits.
    let m = reference.model.with_precision(Precision::Exact);
    let mut kv = tandem_model::KvCache::new(m.config(), 8, 16, tandem_model::KvDType::F32);
    let table: Vec<u32> = (0..8).collect();
    let logits = m
        .forward(
            &prompt,
            &[SeqInput {
                n_tokens: prompt.len(),
                context_len: 0,
                block_table: &table,
                logits: LogitsMode::All,
            }],
            &mut kv,
        )
        .unwrap();
    let p = Pipeline::from_loaded(
        model(),
        EngineConfig {
            precision: Precision::Exact,
            kv_dtype: tandem_model::KvDType::F32,
            // Small chunks: the prompt is scored across several steps.
            max_batch_tokens: Some(4),
            ..Default::default()
        },
    )
    .unwrap();
    let params = GenerateParams {
        max_new_tokens: Some(0),
        prompt_logprobs: Some(2),
        ..GenerateParams::greedy()
    };
    let mut s = p.engine().unwrap().submit(prompt.clone(), params).unwrap();
    let ev = s.blocking_recv().unwrap();
    assert_eq!(ev.finish, Some(FinishReason::Length));
    assert!(ev.token.is_none());
    let lps = ev.prompt_logprobs.unwrap();
    assert_eq!(lps.len(), prompt.len());
    assert!(lps[0].is_none());
    for i in 1..prompt.len() {
        let row = logits.row(i - 1);
        let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let lz = row.iter().map(|l| (l - mx).exp()).sum::<f32>().ln();
        let want = row[prompt[i] as usize] - mx - lz;
        let got = lps[i].as_ref().unwrap();
        assert!(
            (got.logprob - want).abs() < 1e-4,
            "position {i}: {} vs {want}",
            got.logprob
        );
        assert_eq!(got.top.len(), 2);
        assert!(got.top[0].1 >= got.top[1].1);
    }
}
