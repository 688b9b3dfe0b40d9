//! HF transformers `config.json` ↔ `LlamaConfig` (MindFormers' alias table).

use serde_json::{json, Map, Value};

use super::{ExtendMethod, LlamaConfig, ScalingFactor, TokenIds};
use crate::error::ConfigError;

fn get_usize(m: &Map<String, Value>, key: &str) -> Result<Option<usize>, ConfigError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|u| Some(u as usize))
            .ok_or_else(|| ConfigError::BadValue {
                key: key.into(),
                why: format!("expected a non-negative integer, found {v}"),
            }),
    }
}

fn get_f64(m: &Map<String, Value>, key: &str) -> Result<Option<f64>, ConfigError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| ConfigError::BadValue {
            key: key.into(),
            why: format!("expected a number, found {v}"),
        }),
    }
}

fn get_bool(m: &Map<String, Value>, key: &str) -> Result<Option<bool>, ConfigError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| ConfigError::BadValue {
            key: key.into(),
            why: format!("expected true or false, found {v}"),
        }),
    }
}

fn token_ids(m: &Map<String, Value>, key: &str) -> Result<Option<TokenIds>, ConfigError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|_| ConfigError::BadValue {
                key: key.into(),
                why: format!("expected a token id or a list of them, found {v}"),
            }),
    }
}

/// HF `model_type`s served: Llama's and the Llama-like families (Mistral, Qwen2).
pub const HF_MODEL_TYPES: [&str; 3] = ["llama", "mistral", "qwen2"];

/// The attention window a config asks for and the first layer using it: Mistral's
/// `sliding_window` (null from v0.2 on) in every layer, Qwen2's when `use_sliding_window` is
/// set, in layers from `max_window_layers` on (as transformers applies it).
fn sliding_window(
    m: &Map<String, Value>,
    model_type: &str,
    num_layers: usize,
) -> Result<Option<(usize, usize)>, ConfigError> {
    let window = get_usize(m, "sliding_window")?.filter(|&w| w > 0);
    Ok(match model_type {
        "mistral" => window.map(|w| (w, 0)),
        "qwen2" => {
            let used = get_bool(m, "use_sliding_window")?.unwrap_or(false);
            let from = get_usize(m, "max_window_layers")?.unwrap_or(num_layers);
            window
                .filter(|_| used && from < num_layers)
                .map(|w| (w, from))
        }
        _ => None,
    })
}

impl LlamaConfig {
    /// Builds a config from an HF `config.json` document (HF's own defaults for missing keys).
    pub fn from_hf_json(text: &str) -> Result<LlamaConfig, ConfigError> {
        let v: Value = serde_json::from_str(text).map_err(|e| ConfigError::Parse {
            format: "HF config.json",
            why: e.to_string(),
        })?;
        let m = v.as_object().ok_or(ConfigError::Parse {
            format: "HF config.json",
            why: "not a JSON object".into(),
        })?;
        let model_type = m
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("llama");
        if !HF_MODEL_TYPES.contains(&model_type) {
            return Err(ConfigError::Unsupported(format!(
                "model_type {model_type:?} (Tandem serves {})",
                HF_MODEL_TYPES.join(", ")
            )));
        }
        if let Some(act) = m.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(ConfigError::Unsupported(format!(
                    "hidden_act {act:?} (Llama's SwiGLU uses silu)"
                )));
            }
        }
        if get_bool(m, "mlp_bias")? == Some(true) {
            return Err(ConfigError::Unsupported("mlp_bias = true".into()));
        }
        let max_pos = get_usize(m, "max_position_embeddings")?.unwrap_or(2048);
        let mut c = LlamaConfig {
            hidden_size: get_usize(m, "hidden_size")?.unwrap_or(4096),
            num_layers: get_usize(m, "num_hidden_layers")?.unwrap_or(32),
            num_heads: get_usize(m, "num_attention_heads")?.unwrap_or(32),
            n_kv_heads: get_usize(m, "num_key_value_heads")?,
            intermediate_size: Some(get_usize(m, "intermediate_size")?.unwrap_or(11008)),
            vocab_size: get_usize(m, "vocab_size")?.unwrap_or(32000),
            rms_norm_eps: get_f64(m, "rms_norm_eps")?.unwrap_or(1e-6),
            theta: match get_f64(m, "rope_theta")? {
                Some(t) => t,
                None => match m.get("rope_parameters").and_then(Value::as_object) {
                    Some(rp) => get_f64(rp, "rope_theta")?.unwrap_or(10000.0),
                    None => 10000.0,
                },
            },
            max_position_embedding: Some(max_pos),
            seq_length: max_pos,
            tie_word_embeddings: get_bool(m, "tie_word_embeddings")?.unwrap_or(false),
            // Qwen2's attention always has q/k/v biases (and none on o_proj).
            qkv_has_bias: model_type == "qwen2" || get_bool(m, "attention_bias")?.unwrap_or(false),
            attn_proj_has_bias: get_bool(m, "attention_bias")?.unwrap_or(false),
            init_method_std: get_f64(m, "initializer_range")?.unwrap_or(0.02),
            head_dim: get_usize(m, "head_dim")?,
            use_past: true,
            ..LlamaConfig::default()
        };
        if let Some((w, from)) = sliding_window(m, model_type, c.num_layers)? {
            c.sliding_window = Some(w);
            c.window_from_layer = from;
        }
        // HF's head_dim is only an extension when it differs from hidden_size / num_heads.
        if c.head_dim == Some(c.hidden_size / c.num_heads.max(1)) {
            c.head_dim = None;
        }
        if let Some(b) = token_ids(m, "bos_token_id")? {
            c.bos_token_id = b.ids().first().map_or(-1, |&i| i as i64);
        }
        if let Some(e) = token_ids(m, "eos_token_id")? {
            c.eos_token_id = e;
        }
        if let Some(p) = token_ids(m, "pad_token_id")? {
            c.pad_token_id = p.ids().first().map_or(-1, |&i| i as i64);
        }
        if let Some(dt) = m
            .get("torch_dtype")
            .or_else(|| m.get("dtype"))
            .and_then(Value::as_str)
        {
            c.param_init_type = dt.to_string();
            c.compute_dtype = dt.to_string();
        }
        // transformers < 5 writes `rope_scaling`; 5.x writes `rope_parameters` (theta inside).
        if let Some(rs) = m
            .get("rope_scaling")
            .filter(|v| !v.is_null())
            .or_else(|| m.get("rope_parameters"))
        {
            let rs = rs.as_object().ok_or_else(|| ConfigError::BadValue {
                key: "rope_scaling".into(),
                why: "expected an object".into(),
            })?;
            let kind = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            let num = |k: &str| -> Result<f64, ConfigError> {
                get_f64(rs, k)?.ok_or_else(|| ConfigError::Missing(format!("rope_scaling.{k}")))
            };
            match kind {
                "default" => {}
                "linear" => {
                    c.extend_method = ExtendMethod::Pi;
                    c.scaling_factor = ScalingFactor::Float(num("factor")?);
                }
                "dynamic" => {
                    c.extend_method = ExtendMethod::DynamicNtk;
                    c.scaling_factor = ScalingFactor::Float(num("factor")?);
                }
                "llama3" => {
                    c.extend_method = ExtendMethod::Llama3;
                    c.scaling_factor = ScalingFactor::Dict(
                        [
                            "factor",
                            "low_freq_factor",
                            "high_freq_factor",
                            "original_max_position_embeddings",
                        ]
                        .into_iter()
                        .map(|k| Ok((k.to_string(), num(k)?)))
                        .collect::<Result<_, ConfigError>>()?,
                    );
                }
                "yarn" => {
                    if rs.get("attention_factor").is_some_and(|v| !v.is_null()) {
                        return Err(ConfigError::Unsupported(
                            "rope_scaling.attention_factor".into(),
                        ));
                    }
                    if rs.get("truncate").and_then(Value::as_bool) == Some(false) {
                        return Err(ConfigError::Unsupported(
                            "rope_scaling.truncate = false".into(),
                        ));
                    }
                    let opt = |k: &str, d: f64| -> Result<f64, ConfigError> {
                        Ok(get_f64(rs, k)?.unwrap_or(d))
                    };
                    c.extend_method = ExtendMethod::Yarn;
                    c.scaling_factor = ScalingFactor::Dict(
                        [
                            ("factor", num("factor")?),
                            (
                                "original_max_position_embeddings",
                                opt("original_max_position_embeddings", max_pos as f64)?,
                            ),
                            ("beta_fast", opt("beta_fast", 32.0)?),
                            ("beta_slow", opt("beta_slow", 1.0)?),
                            ("mscale", opt("mscale", 0.0)?),
                            ("mscale_all_dim", opt("mscale_all_dim", 0.0)?),
                        ]
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                    );
                }
                other => {
                    return Err(ConfigError::Unsupported(format!(
                        "rope_scaling type {other:?}"
                    )))
                }
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// The HF `config.json` document for this config.
    pub fn to_hf_json(&self) -> Value {
        let rope_scaling = match (self.extend_method, &self.scaling_factor) {
            (ExtendMethod::None, _) => Value::Null,
            (ExtendMethod::Pi | ExtendMethod::Linear, ScalingFactor::Float(f)) => {
                json!({"rope_type": "linear", "factor": f})
            }
            (ExtendMethod::Linear, ScalingFactor::Dict(d)) => {
                json!({"rope_type": "linear", "factor": d.get("factor")})
            }
            (ExtendMethod::Ntk, ScalingFactor::Float(f)) => {
                json!({"rope_type": "ntk", "factor": f})
            }
            (ExtendMethod::DynamicNtk, ScalingFactor::Float(f)) => {
                json!({"rope_type": "dynamic", "factor": f})
            }
            (ExtendMethod::Llama3, ScalingFactor::Dict(d)) => {
                let mut o = json!({"rope_type": "llama3"});
                o.as_object_mut()
                    .unwrap()
                    .extend(d.iter().map(|(k, v)| (k.clone(), json!(v))));
                o
            }
            (ExtendMethod::Yarn, ScalingFactor::Dict(d)) => {
                let mut o = json!({"rope_type": "yarn"});
                o.as_object_mut()
                    .unwrap()
                    .extend(d.iter().map(|(k, v)| (k.clone(), json!(v))));
                o
            }
            (m, f) => json!({"rope_type": m.as_str(), "factor": f}),
        };
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.kv_heads(),
            "head_dim": self.head_dim(),
            "intermediate_size": self.intermediate_size(),
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_positions(),
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.qkv_has_bias,
            "mlp_bias": false,
            "initializer_range": self.init_method_std,
            "torch_dtype": self.param_init_type,
        })
    }
}
