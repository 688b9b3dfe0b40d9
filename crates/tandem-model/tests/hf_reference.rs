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

/// The same weights split into two shards with `model.safetensors.index.json` give the same
/// logits as the single file.
#[test]
fn sharded_safetensors_equal_single_file() {
    use safetensors::tensor::TensorView;
    let src = dir("gqa");
    let out = std::env::temp_dir().join(format!("tandem-sharded-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(src.join("config.json"), out.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<(String, TensorView)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, &None, &out.join(&file)).unwrap();
        for n in part {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(out.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let logits = |d: &std::path::Path| {
        let cfg =
            LlamaConfig::from_hf_json(&std::fs::read_to_string(d.join("config.json")).unwrap())
                .unwrap();
        let w = LlamaWeights::load(
            &SafetensorsFiles::open_dir(d).unwrap(),
            &cfg,
            WeightLayout::Hf,
        )
        .unwrap();
        let m = LlamaModel::new(cfg, w).unwrap();
        let mut kv = KvCache::new(m.config(), 4, 4, KvDType::F32);
        let seq = SeqInput {
            n_tokens: 5,
            context_len: 0,
            block_table: &[0, 1],
            logits: LogitsMode::All,
        };
        m.forward(&[1, 2, 3, 4, 5], &[seq], &mut kv).unwrap().values
    };
    assert_eq!(logits(&out), logits(&src));
}
