//! GGUF metadata (`llama.*`, `tokenizer.ggml.*` ids) ↔ `LlamaConfig`.

use std::collections::BTreeMap;

use super::{ExtendMethod, LlamaConfig, ScalingFactor, TokenIds};
use crate::error::ConfigError;
use crate::gguf::GgufValue;

/// GGUF architectures served: Llama's and Qwen2's (q/k/v biases, NEOX RoPE).
pub const GGUF_ARCHITECTURES: [&str; 2] = ["llama", "qwen2"];

fn architecture(meta: &BTreeMap<String, GgufValue>) -> &str {
    meta.get("general.architecture")
        .and_then(GgufValue::as_str)
        .unwrap_or("llama")
}

impl LlamaConfig {
    /// Whether a GGUF's architecture pairs Q/K rows rotate-half (NEOX) style: its converter
    /// does not permute them as it does for `llama`.
    pub fn gguf_neox_rope(meta: &BTreeMap<String, GgufValue>) -> bool {
        architecture(meta) == "qwen2"
    }

    /// Builds a config from GGUF metadata of a model of one of [`GGUF_ARCHITECTURES`].
    pub fn from_gguf_metadata(
        meta: &BTreeMap<String, GgufValue>,
    ) -> Result<LlamaConfig, ConfigError> {
        let arch = architecture(meta);
        if !GGUF_ARCHITECTURES.contains(&arch) {
            return Err(ConfigError::Unsupported(format!(
                "GGUF architecture {arch:?} (Tandem serves {})",
                GGUF_ARCHITECTURES.join(", ")
            )));
        }
        let req = |k: &str| -> Result<usize, ConfigError> {
            let key = format!("{arch}.{k}");
            meta.get(&key)
                .ok_or(ConfigError::Missing(key.clone()))?
                .as_u64()
                .map(|v| v as usize)
                .ok_or(ConfigError::BadValue {
                    key,
                    why: "expected an unsigned integer".into(),
                })
        };
        let opt_u = |k: &str| {
            meta.get(&format!("{arch}.{k}"))
                .or_else(|| meta.get(k))
                .and_then(GgufValue::as_u64)
                .map(|v| v as usize)
        };
        let opt_f = |k: &str| {
            meta.get(&format!("{arch}.{k}"))
                .or_else(|| meta.get(k))
                .and_then(GgufValue::as_f64)
        };
        let ctx = req("context_length")?;
        let heads = req("attention.head_count")?;
        let hidden = req("embedding_length")?;
        let vocab = opt_u("vocab_size")
            .or_else(|| {
                meta.get("tokenizer.ggml.tokens")
                    .and_then(GgufValue::as_array)
                    .map(<[_]>::len)
            })
            .ok_or(ConfigError::Missing(format!("{arch}.vocab_size")))?;
        let mut c = LlamaConfig {
            seq_length: ctx,
            max_position_embedding: Some(ctx),
            hidden_size: hidden,
            num_layers: req("block_count")?,
            num_heads: heads,
            n_kv_heads: opt_u("attention.head_count_kv"),
            intermediate_size: Some(req("feed_forward_length")?),
            vocab_size: vocab,
            rms_norm_eps: opt_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            theta: opt_f("rope.freq_base").unwrap_or(10000.0),
            use_past: true,
            // Qwen2 has q/k/v biases (MindFormers' `qkv_has_bias`) and an untied LM head.
            qkv_has_bias: arch == "qwen2",
            ..LlamaConfig::default()
        };
        if let Some(rd) = opt_u("rope.dimension_count") {
            if rd != hidden / heads.max(1) {
                if opt_u("attention.key_length").is_some_and(|k| k == rd) {
                    c.head_dim = Some(rd);
                } else {
                    return Err(ConfigError::Unsupported(format!(
                        "partial rotary embedding (rope.dimension_count {rd})"
                    )));
                }
            }
        }
        if let Some(b) = opt_u("tokenizer.ggml.bos_token_id") {
            c.bos_token_id = b as i64;
        }
        if let Some(e) = opt_u("tokenizer.ggml.eos_token_id") {
            c.eos_token_id = TokenIds::One(e as i64);
        }
        if let Some(p) = opt_u("tokenizer.ggml.padding_token_id") {
            c.pad_token_id = p as i64;
        }
        match meta
            .get(&format!("{arch}.rope.scaling.type"))
            .and_then(GgufValue::as_str)
        {
            None | Some("none") => {}
            Some("linear") => {
                c.extend_method = ExtendMethod::Pi;
                c.scaling_factor =
                    ScalingFactor::Float(opt_f("rope.scaling.factor").unwrap_or(1.0));
            }
            Some("yarn") => {
                let factor = opt_f("rope.scaling.factor").unwrap_or(1.0);
                let orig = opt_f("rope.scaling.original_context_length").unwrap_or(ctx as f64);
                c.extend_method = ExtendMethod::Yarn;
                c.scaling_factor = ScalingFactor::Dict(
                    [
                        ("factor", factor),
                        ("original_max_position_embeddings", orig),
                        ("beta_fast", 32.0),
                        ("beta_slow", 1.0),
                        ("mscale", 0.0),
                        ("mscale_all_dim", 0.0),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
                );
            }
            Some(other) => {
                return Err(ConfigError::Unsupported(format!(
                    "GGUF rope scaling type {other:?}"
                )))
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// The `llama.*` metadata (and token ids) describing this config in a GGUF file.
    pub fn to_gguf_metadata(&self) -> Vec<(String, GgufValue)> {
        let u = |v: usize| GgufValue::U32(v as u32);
        let mut out = vec![
            (
                "general.architecture".to_string(),
                GgufValue::String("llama".into()),
            ),
            ("llama.context_length".into(), u(self.max_positions())),
            ("llama.embedding_length".into(), u(self.hidden_size)),
            ("llama.block_count".into(), u(self.num_layers)),
            (
                "llama.feed_forward_length".into(),
                u(self.intermediate_size()),
            ),
            ("llama.attention.head_count".into(), u(self.num_heads)),
            ("llama.attention.head_count_kv".into(), u(self.kv_heads())),
            (
                "llama.attention.layer_norm_rms_epsilon".into(),
                GgufValue::F32(self.rms_norm_eps as f32),
            ),
            (
                "llama.rope.freq_base".into(),
                GgufValue::F32(self.theta as f32),
            ),
            ("llama.rope.dimension_count".into(), u(self.head_dim())),
            ("llama.vocab_size".into(), u(self.vocab_size)),
            (
                "tokenizer.ggml.bos_token_id".into(),
                u(self.bos_token_id.max(0) as usize),
            ),
            (
                "tokenizer.ggml.padding_token_id".into(),
                u(self.pad_token_id.max(0) as usize),
            ),
        ];
        if let Some(&e) = self.eos_ids().first() {
            out.push(("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(e)));
        }
        match (self.extend_method, &self.scaling_factor) {
            (ExtendMethod::Pi | ExtendMethod::Linear, ScalingFactor::Float(f)) => {
                out.push((
                    "llama.rope.scaling.type".into(),
                    GgufValue::String("linear".into()),
                ));
                out.push((
                    "llama.rope.scaling.factor".into(),
                    GgufValue::F32(*f as f32),
                ));
            }
            (ExtendMethod::Yarn, ScalingFactor::Dict(d)) => {
                out.push((
                    "llama.rope.scaling.type".into(),
                    GgufValue::String("yarn".into()),
                ));
                out.push((
                    "llama.rope.scaling.factor".into(),
                    GgufValue::F32(d["factor"] as f32),
                ));
                out.push((
                    "llama.rope.scaling.original_context_length".into(),
                    GgufValue::U32(d["original_max_position_embeddings"] as u32),
                ));
            }
            _ => {}
        }
        out
    }
}
