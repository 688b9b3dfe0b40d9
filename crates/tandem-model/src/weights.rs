//! Model weights in their stored formats, gathered from GGUF or safetensors under one naming
//! scheme, with every shape checked against the config.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use tandem_kernels::{dequant::dequantize_row, DType, MatRef, RopeStyle};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};

/// A tensor's bytes inside a memory-mapped file.
#[derive(Clone)]
pub struct TensorData {
    /// Name in the source file.
    pub name: String,
    /// Storage format.
    pub dtype: DType,
    /// Row-major shape, outermost first.
    pub shape: Vec<usize>,
    /// The file's mapping (or, for a column slice, bytes of its own).
    pub(crate) map: Arc<dyn AsRef<[u8]> + Send + Sync>,
    pub(crate) range: Range<usize>,
}

impl std::fmt::Debug for TensorData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TensorData({} {} {:?})",
            self.name, self.dtype, self.shape
        )
    }
}

impl TensorData {
    /// The stored bytes.
    pub fn bytes(&self) -> &[u8] {
        &(*self.map).as_ref()[self.range.clone()]
    }

    /// Rows `rows` of a 2-D tensor (a view of the same bytes).
    pub fn rows(&self, rows: Range<usize>) -> TensorData {
        let rb = self.mat().row_bytes();
        TensorData {
            name: self.name.clone(),
            dtype: self.dtype,
            shape: vec![rows.len(), self.shape[1]],
            map: self.map.clone(),
            range: self.range.start + rows.start * rb..self.range.start + rows.end * rb,
        }
    }

    /// Columns `cols` of a 2-D tensor, copied; `None` unless both ends fall on the format's
    /// block boundaries (a quantized block cannot be cut).
    pub fn cols(&self, cols: Range<usize>) -> Option<TensorData> {
        let bl = self.dtype.block_len();
        if !cols.start.is_multiple_of(bl)
            || !cols.end.is_multiple_of(bl)
            || cols.end > self.shape[1]
        {
            return None;
        }
        let bb = self.dtype.block_bytes();
        let (b0, b1) = (cols.start / bl * bb, cols.end / bl * bb);
        let m = self.mat();
        let mut bytes = Vec::with_capacity(self.shape[0] * (b1 - b0));
        for r in 0..self.shape[0] {
            bytes.extend_from_slice(&m.row(r)[b0..b1]);
        }
        Some(TensorData {
            name: self.name.clone(),
            dtype: self.dtype,
            shape: vec![self.shape[0], cols.len()],
            range: 0..bytes.len(),
            map: Arc::new(bytes),
        })
    }

    /// A 2-D view for matmuls (`[rows, cols]`).
    pub fn mat(&self) -> MatRef<'_> {
        MatRef::new(self.dtype, self.shape[0], self.shape[1], self.bytes())
            .expect("shape validated at load")
    }

    /// All elements as f32 (for small vectors: norms, biases).
    pub fn to_f32(&self) -> Vec<f32> {
        let n: usize = self.shape.iter().product();
        let mut out = vec![0f32; n];
        dequantize_row(self.dtype, self.bytes(), &mut out);
        out
    }
}

/// Where the weights came from, which fixes names and the RoPE pairing of Q/K rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// llama.cpp's names.
    Gguf,
    /// HF transformers' names; rotate-half RoPE.
    Hf,
}

/// A linear layer: stored weight `[out, in]` and optional f32 bias.
#[derive(Clone, Debug)]
pub struct Linear {
    /// The weight matrix.
    pub weight: TensorData,
    /// The bias, if the layer has one.
    pub bias: Option<Vec<f32>>,
}

/// One transformer block's weights.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    pub wo: Linear,
    pub ffn_norm: Vec<f32>,
    pub w_gate: Linear,
    pub w_up: Linear,
    pub w_down: Linear,
}

/// All weights of a Llama model.
#[derive(Clone, Debug)]
pub struct LlamaWeights {
    /// Token embeddings `[vocab, hidden]`.
    pub embed: TensorData,
    /// Transformer blocks.
    pub layers: Vec<LayerWeights>,
    /// Final norm.
    pub norm: Vec<f32>,
    /// LM head `[vocab, hidden]` (the embeddings when tied).
    pub lm_head: TensorData,
    /// Per-dimension RoPE frequency divisors (GGUF `rope_freqs.weight`, Llama 3.1 style).
    pub rope_freqs: Option<Vec<f32>>,
    /// Naming of the source.
    pub layout: WeightLayout,
    /// How Q/K rows pair up under RoPE: interleaved for llama GGUFs (whose converter permutes
    /// the rows), rotate-half for HF checkpoints and GGUFs of NEOX-rope architectures (qwen2).
    pub rope_style: RopeStyle,
}

/// Something tensors can be looked up in by name.
pub trait TensorSource {
    /// The tensor called `name`, if present.
    fn tensor(&self, name: &str) -> Option<TensorData>;
    /// The file to name in errors.
    fn path(&self) -> &Path;
}

struct Names {
    layout: WeightLayout,
}

impl Names {
    fn global(&self, what: &str) -> String {
        match (self.layout, what) {
            (WeightLayout::Gguf, "embed") => "token_embd.weight".into(),
            (WeightLayout::Gguf, "norm") => "output_norm.weight".into(),
            (WeightLayout::Gguf, "lm_head") => "output.weight".into(),
            (WeightLayout::Hf, "embed") => "model.embed_tokens.weight".into(),
            (WeightLayout::Hf, "norm") => "model.norm.weight".into(),
            (WeightLayout::Hf, "lm_head") => "lm_head.weight".into(),
            _ => unreachable!("known global tensor"),
        }
    }

    fn layer(&self, i: usize, what: &str, suffix: &str) -> String {
        match self.layout {
            WeightLayout::Gguf => {
                let n = match what {
                    "attn_norm" => "attn_norm",
                    "q" => "attn_q",
                    "k" => "attn_k",
                    "v" => "attn_v",
                    "o" => "attn_output",
                    "ffn_norm" => "ffn_norm",
                    "gate" => "ffn_gate",
                    "up" => "ffn_up",
                    _ => "ffn_down",
                };
                format!("blk.{i}.{n}.{suffix}")
            }
            WeightLayout::Hf => {
                let n = match what {
                    "attn_norm" => "input_layernorm",
                    "q" => "self_attn.q_proj",
                    "k" => "self_attn.k_proj",
                    "v" => "self_attn.v_proj",
                    "o" => "self_attn.o_proj",
                    "ffn_norm" => "post_attention_layernorm",
                    "gate" => "mlp.gate_proj",
                    "up" => "mlp.up_proj",
                    _ => "mlp.down_proj",
                };
                format!("model.layers.{i}.{n}.{suffix}")
            }
        }
    }
}

fn take(src: &dyn TensorSource, name: &str, shape: &[usize]) -> Result<TensorData> {
    let t = src.tensor(name).ok_or_else(|| ModelError::MissingTensor {
        path: src.path().into(),
        tensor: name.into(),
    })?;
    check_shape(src.path(), &t, shape)?;
    Ok(t)
}

fn check_shape(path: &Path, t: &TensorData, shape: &[usize]) -> Result<()> {
    if t.shape != shape {
        return Err(ModelError::ShapeMismatch {
            path: path.into(),
            tensor: t.name.clone(),
            expected: shape.to_vec(),
            actual: t.shape.clone(),
        });
    }
    if shape.len() == 2 && t.dtype.row_bytes(shape[1]).is_none() {
        return Err(ModelError::UnsupportedTensorType {
            path: path.into(),
            tensor: t.name.clone(),
            ty: format!("{} with rows of {} (not whole blocks)", t.dtype, shape[1]),
        });
    }
    Ok(())
}

fn vector(src: &dyn TensorSource, name: &str, len: usize) -> Result<Vec<f32>> {
    Ok(take(src, name, &[len])?.to_f32())
}

impl LlamaWeights {
    /// Gathers and shape-checks every tensor the config implies.
    pub fn load(
        src: &dyn TensorSource,
        cfg: &LlamaConfig,
        layout: WeightLayout,
    ) -> Result<LlamaWeights> {
        let names = Names { layout };
        let (d, hd) = (cfg.hidden_size, cfg.head_dim());
        let (q_out, kv_out, ffn, vocab) = (
            cfg.num_heads * hd,
            cfg.kv_heads() * hd,
            cfg.intermediate_size(),
            cfg.vocab_size,
        );
        let linear = |i: usize, what: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let weight = take(src, &names.layer(i, what, "weight"), &[out, inp])?;
            let bias_name = names.layer(i, what, "bias");
            let bias = match src.tensor(&bias_name) {
                Some(b) => {
                    check_shape(src.path(), &b, &[out])?;
                    Some(b.to_f32())
                }
                None if bias => {
                    return Err(ModelError::MissingTensor {
                        path: src.path().into(),
                        tensor: bias_name,
                    })
                }
                None => None,
            };
            Ok(Linear { weight, bias })
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            layers.push(LayerWeights {
                attn_norm: vector(src, &names.layer(i, "attn_norm", "weight"), d)?,
                wq: linear(i, "q", q_out, d, cfg.qkv_has_bias)?,
                wk: linear(i, "k", kv_out, d, cfg.qkv_has_bias)?,
                wv: linear(i, "v", kv_out, d, cfg.qkv_has_bias)?,
                wo: linear(i, "o", d, q_out, cfg.attn_proj_has_bias)?,
                ffn_norm: vector(src, &names.layer(i, "ffn_norm", "weight"), d)?,
                w_gate: linear(i, "gate", ffn, d, false)?,
                w_up: linear(i, "up", ffn, d, false)?,
                w_down: linear(i, "down", d, ffn, false)?,
            });
        }
        let embed = take(src, &names.global("embed"), &[vocab, d])?;
        let lm_head = match src.tensor(&names.global("lm_head")) {
            Some(t) if !cfg.tie_word_embeddings => {
                check_shape(src.path(), &t, &[vocab, d])?;
                t
            }
            _ if cfg.tie_word_embeddings || layout == WeightLayout::Gguf => embed.clone(),
            _ => {
                return Err(ModelError::MissingTensor {
                    path: src.path().into(),
                    tensor: names.global("lm_head"),
                })
            }
        };
        let rope_freqs = match src.tensor("rope_freqs.weight") {
            Some(t) => {
                check_shape(src.path(), &t, &[hd / 2])?;
                Some(t.to_f32())
            }
            None => None,
        };
        Ok(LlamaWeights {
            embed,
            layers,
            norm: vector(src, &names.global("norm"), d)?,
            lm_head,
            rope_freqs,
            layout,
            rope_style: match layout {
                WeightLayout::Gguf => RopeStyle::Interleaved,
                WeightLayout::Hf => RopeStyle::Half,
            },
        })
    }
}
