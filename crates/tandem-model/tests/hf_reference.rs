//! Tandem's logits against HF transformers on tiny random-weight Llamas (f32 safetensors,
//! goldens from `scripts/gen_tiny_golden.py`): whole-prompt prefill and each greedy decode
//! step, for MHA, GQA, tied embeddings, qkv bias and RoPE scaling (llama3, linear, yarn).

use std::path::PathBuf;

use tandem_model::safetensors_files::SafetensorsFiles;
use tandem_model::weights::{LlamaWeights, WeightLayout};
use tandem_model::*;

const TOL: f32 = 1e-4;

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tiny")
        .join(name)
}

fn load(name: &str, precision: Precision, level: SimdLevel) -> LlamaModel {
    let d = dir(name);
    let cfg = LlamaConfig::from_hf_json(&std::fs::read_to_string(d.join("config.json")).unwrap())
        .unwrap();
    let files = SafetensorsFiles::open_dir(&d).unwrap();
    let w = LlamaWeights::load(&files, &cfg, WeightLayout::Hf).unwrap();
    LlamaModel::new(cfg, w)
        .unwrap()
        .with_precision(precision)
        .with_simd(level)
}

fn golden(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir(name).join("golden.json")).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check_variant(name: &str) {
    let g = golden(name);
    let prompt: Vec<u32> = g["prompt"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    for level in SimdLevel::supported() {
        let m = load(name, Precision::Exact, level);
        let mut kv = KvCache::new(m.config(), 16, 4, KvDType::F32);
        let table: Vec<u32> = (0..16).rev().collect();
        let seq = SeqInput {
            n_tokens: prompt.len(),
            context_len: 0,
            block_table: &table,
            logits: LogitsMode::All,
        };
        let out = m.forward(&prompt, &[seq], &mut kv).unwrap();
        for (i, want) in g["prefill_logits"].as_array().unwrap().iter().enumerate() {
            let d = max_abs_diff(out.row(i), &floats(want));
            assert!(
                d <= TOL,
                "{name} {level:?}: prefill position {i} differs from transformers by {d}"
            );
        }
        for (s, step) in g["steps"].as_array().unwrap().iter().enumerate() {
            let ctx = prompt.len() + s;
            let tok = step["token"].as_u64().unwrap() as u32;
            let seq = SeqInput {
                n_tokens: 1,
                context_len: ctx,
                block_table: &table,
                logits: LogitsMode::Last,
            };
            let out = m.forward(&[tok], &[seq], &mut kv).unwrap();
            let d = max_abs_diff(out.row(0), &floats(&step["logits"]));
            assert!(
                d <= TOL,
                "{name} {level:?}: decode step {s} differs from transformers by {d}"
            );
        }
    }
}

#[test]
fn mha_matches_transformers() {
    check_variant("mha");
}

#[test]
fn gqa_matches_transformers() {
    check_variant("gqa");
}

#[test]
fn tied_embeddings_match_transformers() {
    check_variant("tied");
}

#[test]
fn qkv_bias_matches_transformers() {
    check_variant("qkv_bias");
}

#[test]
fn rope_llama3_matches_transformers() {
    check_variant("rope_llama3");
}

#[test]
fn rope_linear_matches_transformers() {
    check_variant("rope_linear");
}

#[test]
fn rope_yarn_matches_transformers() {
    check_variant("rope_yarn");
}
