//! `LlamaConfig`: MindFormers' Llama configuration surface, with its defaults, derived sizes and
//! validation, read from and written back to HF `config.json`, GGUF metadata and MindFormers YAML.

mod gguf_meta;
mod hf;
mod rope;
mod yaml;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use rope::{ExtendMethod, RopeParams, ScalingFactor};

use crate::error::ConfigError;

/// One token id or several (HF configs list several EOS ids for Llama-3 style models).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(i64),
    /// Several ids; the first is the canonical one.
    Many(Vec<i64>),
}

impl TokenIds {
    /// All ids that are valid (non-negative).
    pub fn ids(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
        .into_iter()
        .filter_map(|i| u32::try_from(i).ok())
        .collect()
    }
}

/// MindFormers `LlamaConfig`: every field and default of the class, plus `head_dim` (HF's
/// explicit head size, `None` meaning `hidden_size / num_heads`) and any further keys kept in
/// `extra` so that round trips lose nothing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LlamaConfig {
    pub batch_size: usize,
    /// Maximum sequence length served; generation's `max_length` is capped to it.
    pub seq_length: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// `None` means multi-head attention (`n_kv_heads = num_heads`).
    pub n_kv_heads: Option<usize>,
    /// Length of the RoPE table; `None` means `seq_length`.
    pub max_position_embedding: Option<usize>,
    /// FFN width; `None` derives it from `multiple_of` and `ffn_dim_multiplier`.
    pub intermediate_size: Option<usize>,
    pub vocab_size: usize,
    pub multiple_of: usize,
    pub ffn_dim_multiplier: Option<f64>,
    pub rms_norm_eps: f64,
    pub bos_token_id: i64,
    pub eos_token_id: TokenIds,
    pub pad_token_id: i64,
    pub ignore_token_id: i64,
    /// RoPE base.
    pub theta: f64,
    pub compute_dtype: String,
    pub layernorm_compute_type: String,
    pub softmax_compute_type: String,
    pub rotary_dtype: String,
    pub param_init_type: String,
    pub residual_dtype: Option<String>,
    pub embedding_init_type: Option<String>,
    pub qkv_has_bias: bool,
    pub qkv_concat: bool,
    pub attn_proj_has_bias: bool,
    pub parallel_config: Value,
    pub moe_config: Value,
    pub use_past: bool,
    pub extend_method: ExtendMethod,
    pub scaling_factor: ScalingFactor,
    pub is_dynamic: bool,
    pub use_rope_slice: bool,
    pub use_flash_attention: bool,
    pub use_ring_attention: bool,
    pub use_attn_mask_compression: bool,
    pub parallel_optimizer: bool,
    pub fine_grain_interleave: usize,
    pub pp_interleave_num: usize,
    pub offset: Value,
    pub init_method_std: f64,
    pub checkpoint_name_or_path: String,
    pub repetition_penalty: f64,
    /// Generation's default `max_length` (prompt + new tokens).
    pub max_decode_length: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Blocks in the KV pool.
    pub num_blocks: usize,
    pub top_k: usize,
    pub top_p: f64,
    pub do_sample: bool,
    pub quant_config: Option<Value>,
    pub tie_word_embeddings: bool,
    pub llm_backend: String,
    pub fused_rms_norm: bool,
    pub input_sliced_sig: bool,
    pub rmsnorm_compute_2d: bool,
    pub chunk_prefill: bool,
    pub calculate_per_token_loss: bool,
    pub pipeline_stage: Option<Value>,
    /// Explicit head size (HF `head_dim`); `None` means `hidden_size / num_heads`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Sliding-window attention (Mistral v0.1, Qwen2 with `use_sliding_window`): each query
    /// sees at most this many keys, its own included, in layers from `window_from_layer` on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// First layer that uses `sliding_window` (Qwen2's `max_window_layers`; 0 for Mistral).
    #[serde(skip_serializing_if = "is_zero")]
    pub window_from_layer: usize,
    /// Keys beyond the class signature (`**kwargs`), kept for round trips.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Default for LlamaConfig {
    fn default() -> Self {
        LlamaConfig {
            batch_size: 1,
            seq_length: 2048,
            hidden_size: 4096,
            num_layers: 32,
            num_heads: 32,
            n_kv_heads: None,
            max_position_embedding: None,
            intermediate_size: None,
            vocab_size: 32000,
            multiple_of: 256,
            ffn_dim_multiplier: None,
            rms_norm_eps: 1e-5,
            bos_token_id: 1,
            eos_token_id: TokenIds::One(2),
            pad_token_id: 0,
            ignore_token_id: -100,
            theta: 10000.0,
            compute_dtype: "float16".into(),
            layernorm_compute_type: "float32".into(),
            softmax_compute_type: "float32".into(),
            rotary_dtype: "float32".into(),
            param_init_type: "float16".into(),
            residual_dtype: None,
            embedding_init_type: None,
            qkv_has_bias: false,
            qkv_concat: false,
            attn_proj_has_bias: false,
            parallel_config: serde_json::json!({
                "data_parallel": 1, "model_parallel": 1, "context_parallel": 1,
                "pipeline_stage": 1, "micro_batch_num": 1, "vocab_emb_dp": true,
                "use_seq_parallel": false
            }),
            moe_config: serde_json::json!({ "expert_num": 1, "num_experts_chosen": 1 }),
            use_past: false,
            extend_method: ExtendMethod::None,
            scaling_factor: ScalingFactor::Float(1.0),
            is_dynamic: false,
            use_rope_slice: false,
            use_flash_attention: false,
            use_ring_attention: false,
            use_attn_mask_compression: false,
            parallel_optimizer: false,
            fine_grain_interleave: 1,
            pp_interleave_num: 1,
            offset: Value::from(0),
            init_method_std: 0.01,
            checkpoint_name_or_path: String::new(),
            repetition_penalty: 1.0,
            max_decode_length: 1024,
            block_size: 16,
            num_blocks: 512,
            top_k: 5,
            top_p: 1.0,
            do_sample: true,
            quant_config: None,
            tie_word_embeddings: false,
            llm_backend: String::new(),
            fused_rms_norm: true,
            input_sliced_sig: false,
            rmsnorm_compute_2d: false,
            chunk_prefill: false,
            calculate_per_token_loss: false,
            pipeline_stage: None,
            head_dim: None,
            sliding_window: None,
            window_from_layer: 0,
            extra: BTreeMap::new(),
        }
    }
}

const DTYPES: [&str; 3] = ["float16", "bfloat16", "float32"];

impl LlamaConfig {
    /// Number of key/value heads (`num_heads` when `n_kv_heads` is `None`).
    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.num_heads)
    }

    /// Elements per attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_heads.max(1))
    }

    /// FFN width: explicit, or derived as MindFormers does (`4h`, times `ffn_dim_multiplier`,
    /// two thirds, rounded up to `multiple_of`).
    pub fn intermediate_size(&self) -> usize {
        if let Some(i) = self.intermediate_size {
            return i;
        }
        let mut h = 4 * self.hidden_size;
        if let Some(m) = self.ffn_dim_multiplier {
            h = ((m + 0.01) * h as f64) as usize;
        }
        h = 2 * h / 3;
        let m = self.multiple_of.max(1);
        m * h.div_ceil(m)
    }

    /// Longest position the model may see: the larger of `max_position_embedding` and `seq_length`.
    pub fn max_positions(&self) -> usize {
        self.max_position_embedding
            .unwrap_or(self.seq_length)
            .max(self.seq_length)
    }

    /// The attention window of layer `layer`, if it uses sliding-window attention.
    pub fn attention_window(&self, layer: usize) -> Option<usize> {
        self.sliding_window
            .filter(|_| layer >= self.window_from_layer)
    }

    /// EOS ids (all of them when the source listed several).
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id.ids()
    }

    /// Checks every constraint; the model is only built from a validated config.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, v) in [
            ("batch_size", self.batch_size),
            ("seq_length", self.seq_length),
            ("hidden_size", self.hidden_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("vocab_size", self.vocab_size),
            ("multiple_of", self.multiple_of),
            ("block_size", self.block_size),
            ("num_blocks", self.num_blocks),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.intermediate_size == Some(0) {
            return Err(ConfigError::Zero("intermediate_size"));
        }
        if self.max_position_embedding == Some(0) {
            return Err(ConfigError::Zero("max_position_embedding"));
        }
        match self.head_dim {
            Some(0) => return Err(ConfigError::Zero("head_dim")),
            Some(_) => {}
            None if !self.hidden_size.is_multiple_of(self.num_heads) => {
                return Err(ConfigError::HeadsDoNotDivideHidden {
                    hidden: self.hidden_size,
                    heads: self.num_heads,
                })
            }
            None => {}
        }
        let kv = self.kv_heads();
        if kv == 0 {
            return Err(ConfigError::Zero("n_kv_heads"));
        }
        if !self.num_heads.is_multiple_of(kv) {
            return Err(ConfigError::KvHeadsDoNotDivideHeads {
                heads: self.num_heads,
                kv,
            });
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(ConfigError::OddHeadDim(self.head_dim()));
        }
        let positive = |field: &'static str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(ConfigError::OutOfRange {
                    field,
                    value: v.to_string(),
                    why: "must be a finite number above zero",
                })
            }
        };
        positive("rms_norm_eps", self.rms_norm_eps)?;
        positive("theta", self.theta)?;
        positive("repetition_penalty", self.repetition_penalty)?;
        if let Some(m) = self.ffn_dim_multiplier {
            positive("ffn_dim_multiplier", m)?;
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ConfigError::OutOfRange {
                field: "top_p",
                value: self.top_p.to_string(),
                why: "must be in (0, 1]",
            });
        }
        for (field, v) in [
            ("compute_dtype", Some(&self.compute_dtype)),
            ("layernorm_compute_type", Some(&self.layernorm_compute_type)),
            ("softmax_compute_type", Some(&self.softmax_compute_type)),
            ("rotary_dtype", Some(&self.rotary_dtype)),
            ("param_init_type", Some(&self.param_init_type)),
            ("residual_dtype", self.residual_dtype.as_ref()),
            ("embedding_init_type", self.embedding_init_type.as_ref()),
        ] {
            if let Some(v) = v {
                if !DTYPES.contains(&v.as_str()) {
                    return Err(ConfigError::BadDtype {
                        field,
                        value: v.clone(),
                    });
                }
            }
        }
        self.rope_params()?;
        Ok(())
    }
}

/// Serde's skip test for zero counts.
fn is_zero(v: &usize) -> bool {
    *v == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intermediate_size_is_derived_like_mindformers() {
        let c = LlamaConfig::default();
        assert_eq!(c.intermediate_size(), 11008);
        let c = LlamaConfig {
            hidden_size: 8192,
            ffn_dim_multiplier: Some(1.3),
            ..Default::default()
        };
        assert_eq!(c.intermediate_size(), 28672);
        let c = LlamaConfig {
            intermediate_size: Some(14336),
            ..Default::default()
        };
        assert_eq!(c.intermediate_size(), 14336);
    }

    #[test]
    fn validation_names_the_problem() {
        let bad = |c: LlamaConfig| c.validate().unwrap_err().to_string();
        assert!(bad(LlamaConfig {
            num_heads: 30,
            ..Default::default()
        })
        .contains("not divisible by num_heads 30"));
        assert!(bad(LlamaConfig {
            n_kv_heads: Some(5),
            ..Default::default()
        })
        .contains("not divisible by n_kv_heads 5"));
        assert!(bad(LlamaConfig {
            hidden_size: 0,
            ..Default::default()
        })
        .contains("hidden_size"));
        assert!(bad(LlamaConfig {
            compute_dtype: "int4".into(),
            ..Default::default()
        })
        .contains("int4"));
        assert!(bad(LlamaConfig {
            top_p: 0.0,
            ..Default::default()
        })
        .contains("top_p"));
        assert_eq!(
            LlamaConfig::default().kv_heads(),
            32,
            "n_kv_heads None means MHA"
        );
        LlamaConfig::default().validate().unwrap();
    }
}
