//! `LlamaConfig` from and back to HF config.json, GGUF metadata and MindFormers YAML.

use std::collections::BTreeMap;

use tandem_model::config::{ExtendMethod, ScalingFactor};
use tandem_model::gguf::GgufValue;
use tandem_model::LlamaConfig;

const LLAMA31_YAML: &str = r#"
seed: 0
run_mode: 'predict'
model:
  model_config:
    type: LlamaConfig
    batch_size: 1
    seq_length: 8192
    hidden_size: 4096
    num_layers: 32
    num_heads: 32
    n_kv_heads: 8
    vocab_size: 128256
    intermediate_size: 14336
    max_position_embedding: 131072
    multiple_of: 256
    rms_norm_eps: 1.0e-5
    bos_token_id: 128000
    eos_token_id: 128001
    pad_token_id: 128002
    theta: 500000
    param_init_type: "bfloat16"
    use_past: True
    extend_method: "LLAMA3"
    scaling_factor:
      factor: 8.0
      low_freq_factor: 1.0
      high_freq_factor: 4.0
      original_max_position_embeddings: 8192
    block_size: 16
    num_blocks: 1024
    top_k: 3
    do_sample: False
  arch:
    type: LlamaForCausalLM
"#;

#[test]
fn mindformers_yaml_round_trips() {
    let c = LlamaConfig::from_mindformers_yaml(LLAMA31_YAML).unwrap();
    assert_eq!(
        (c.kv_heads(), c.head_dim(), c.intermediate_size()),
        (8, 128, 14336)
    );
    assert_eq!(c.extend_method, ExtendMethod::Llama3);
    assert_eq!(c.max_positions(), 131072);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!(c.top_k, 3);
    // Unset fields keep MindFormers' defaults.
    assert_eq!(
        (
            c.compute_dtype.as_str(),
            c.repetition_penalty,
            c.max_decode_length
        ),
        ("float16", 1.0, 1024)
    );
    let back = LlamaConfig::from_mindformers_yaml(&c.to_mindformers_yaml()).unwrap();
    assert_eq!(back, c);
    // A bare model_config mapping works too.
    let bare = LlamaConfig::from_mindformers_yaml("hidden_size: 64\nnum_heads: 4\nnum_layers: 2\n")
        .unwrap();
    assert_eq!(bare.intermediate_size(), 256);
}

#[test]
fn hf_config_round_trips() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/tiny/rope_llama3/config.json"
    ))
    .unwrap();
    let c = LlamaConfig::from_hf_json(&text).unwrap();
    assert_eq!(c.extend_method, ExtendMethod::Llama3);
    assert_eq!(c.n_kv_heads, Some(2));
    let back = LlamaConfig::from_hf_json(&c.to_hf_json().to_string()).unwrap();
    assert_eq!(back.rope_params().unwrap(), c.rope_params().unwrap());
    assert_eq!(
        (
            back.hidden_size,
            back.kv_heads(),
            back.intermediate_size(),
            back.vocab_size
        ),
        (32, 2, 64, 64)
    );
    // The older `rope_scaling` + `rope_theta` form maps the same way.
    let old = r#"{"model_type":"llama","hidden_size":64,"num_attention_heads":4,"num_hidden_layers":1,
        "intermediate_size":128,"vocab_size":100,"rope_theta":500000.0,"max_position_embeddings":1024,
        "rope_scaling":{"type":"linear","factor":4.0},"eos_token_id":[7,8]}"#;
    let c = LlamaConfig::from_hf_json(old).unwrap();
    assert_eq!(
        (c.extend_method, c.scaling_factor.clone(), c.theta),
        (ExtendMethod::Pi, ScalingFactor::Float(4.0), 500000.0)
    );
    assert_eq!(c.eos_ids(), vec![7, 8]);
}

#[test]
fn gguf_metadata_round_trips() {
    let c = LlamaConfig::from_mindformers_yaml(LLAMA31_YAML).unwrap();
    let meta: BTreeMap<String, GgufValue> = c.to_gguf_metadata().into_iter().collect();
    let back = LlamaConfig::from_gguf_metadata(&meta).unwrap();
    assert_eq!(
        (
            back.hidden_size,
            back.num_layers,
            back.kv_heads(),
            back.intermediate_size()
        ),
        (4096, 32, 8, 14336)
    );
    assert_eq!(
        (back.theta, back.bos_token_id, back.eos_ids()),
        (500000.0, 128000, vec![128001])
    );
}

/// Qwen2 GGUFs use their architecture's key prefix and have q/k/v biases; other
/// architectures (the Gemma 3 GGUF people download, say) are refused by name.
#[test]
fn gguf_architectures_served_and_refused() {
    let c = LlamaConfig::from_mindformers_yaml(LLAMA31_YAML).unwrap();
    let as_arch = |arch: &str| -> BTreeMap<String, GgufValue> {
        c.to_gguf_metadata()
            .into_iter()
            .map(|(k, v)| match k.strip_prefix("llama.") {
                Some(rest) => (format!("{arch}.{rest}"), v),
                None if k == "general.architecture" => (k, GgufValue::String(arch.into())),
                None => (k, v),
            })
            .collect()
    };
    let qwen = LlamaConfig::from_gguf_metadata(&as_arch("qwen2")).unwrap();
    assert_eq!((qwen.hidden_size, qwen.kv_heads()), (4096, 8));
    assert!(
        qwen.qkv_has_bias
            && !LlamaConfig::from_gguf_metadata(&as_arch("llama"))
                .unwrap()
                .qkv_has_bias
    );
    assert!(LlamaConfig::gguf_neox_rope(&as_arch("qwen2")));
    assert!(!LlamaConfig::gguf_neox_rope(&as_arch("llama")));
    let e = LlamaConfig::from_gguf_metadata(&as_arch("gemma3"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("\"gemma3\"") && e.contains("llama, qwen2"),
        "{e}"
    );
}

#[test]
fn bad_configs_are_clear_errors() {
    let err = |t: &str| LlamaConfig::from_hf_json(t).unwrap_err().to_string();
    assert!(err("{").contains("cannot parse"));
    assert!(err(r#"{"model_type":"gpt2"}"#).contains("gpt2"));
    assert!(err(r#"{"hidden_size":"big"}"#).contains("hidden_size"));
    assert!(err(r#"{"hidden_size":100,"num_attention_heads":3}"#).contains("not divisible"));
    assert!(err(r#"{"num_key_value_heads":5}"#).contains("n_kv_heads 5"));
    assert!(err(r#"{"rope_scaling":{"type":"llama3","factor":8.0}}"#)
        .contains("rope_scaling.low_freq_factor"));
    assert!(err(r#"{"rope_scaling":{"type":"dynamic","factor":2.0}}"#).contains("DYNAMIC_NTK"));
    let yaml = |t: &str| {
        LlamaConfig::from_mindformers_yaml(t)
            .unwrap_err()
            .to_string()
    };
    assert!(yaml("compute_dtype: int3").contains("int3"));
    assert!(yaml("extend_method: LLAMA3\nscaling_factor: 2.0").contains("dict"));
    assert!(yaml("extend_method: PI\nscaling_factor: {factor: 2.0}").contains("number"));
    assert!(yaml("model:\n  model_config:\n    type: GPTConfig").contains("GPTConfig"));
    assert!(yaml("num_layers: 0").contains("num_layers"));
}

#[test]
fn rope_extend_methods_scale_frequencies() {
    let base = LlamaConfig {
        hidden_size: 64,
        num_heads: 1,
        ..Default::default()
    };
    let f0 = base.rope_params().unwrap().inv_freq;
    let pi = LlamaConfig {
        extend_method: ExtendMethod::Pi,
        scaling_factor: ScalingFactor::Float(4.0),
        ..base.clone()
    };
    for (a, b) in pi.rope_params().unwrap().inv_freq.iter().zip(&f0) {
        assert!((a * 4.0 - b).abs() < 1e-12);
    }
    let ntk = LlamaConfig {
        extend_method: ExtendMethod::Ntk,
        scaling_factor: ScalingFactor::Float(4.0),
        ..base.clone()
    };
    let want = LlamaConfig {
        theta: 40000.0,
        ..base
    };
    assert_eq!(ntk.rope_params().unwrap(), want.rope_params().unwrap());
}

/// HF directories of the Llama-like families: Qwen2 gets its q/k/v biases, a sliding window
/// (Mistral v0.1 in every layer, Qwen2 with `use_sliding_window` from `max_window_layers` on)
/// is kept for the attention without limiting the context, and other model types are refused
/// by name.
#[test]
fn hf_model_types_served_and_refused() {
    let cfg = |extra: &str| {
        format!(
            r#"{{"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100,
                "max_position_embeddings": 32768, {extra}}}"#
        )
    };
    let qwen = LlamaConfig::from_hf_json(&cfg(
        r#""model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": false"#,
    ))
    .unwrap();
    assert!(qwen.qkv_has_bias && !qwen.attn_proj_has_bias);
    assert_eq!(qwen.seq_length, 32768);
    assert_eq!(qwen.attention_window(3), None);
    let qwen_sw = LlamaConfig::from_hf_json(&cfg(
        r#""model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": true, "max_window_layers": 2"#,
    ))
    .unwrap();
    assert_eq!(qwen_sw.seq_length, 32768);
    assert_eq!(
        (0..4)
            .map(|l| qwen_sw.attention_window(l))
            .collect::<Vec<_>>(),
        [None, None, Some(4096), Some(4096)]
    );
    let mistral01 =
        LlamaConfig::from_hf_json(&cfg(r#""model_type": "mistral", "sliding_window": 4096"#))
            .unwrap();
    assert_eq!(
        (mistral01.seq_length, mistral01.qkv_has_bias),
        (32768, false)
    );
    assert!((0..4).all(|l| mistral01.attention_window(l) == Some(4096)));
    let mistral02 =
        LlamaConfig::from_hf_json(&cfg(r#""model_type": "mistral", "sliding_window": null"#))
            .unwrap();
    assert_eq!(mistral02.seq_length, 32768);
    assert_eq!(mistral02.attention_window(0), None);
    let e = LlamaConfig::from_hf_json(&cfg(r#""model_type": "gemma3""#))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("\"gemma3\"") && e.contains("llama, mistral, qwen2"),
        "{e}"
    );
}
