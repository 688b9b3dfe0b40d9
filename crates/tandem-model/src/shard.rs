//! Tensor-parallel sharding (Megatron-style): each rank holds whole KV-head groups of the
//! attention (Q/K/V rows, the output projection's matching columns), a slice of the FFN's
//! intermediate size (gate/up rows, down columns) and a slice of the vocabulary (embedding and
//! LM head rows). The output and down projections then give partial sums that one all-reduce
//! each per layer completes; the embedding's rows are summed the same way (each token found
//! on exactly one rank) and the LM head's logits are gathered to rank 0.

use std::ops::Range;

use crate::config::LlamaConfig;
use crate::error::ConfigError;
use crate::weights::{LayerWeights, Linear, LlamaWeights, TensorData};

/// The part of the model one rank holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardPlan {
    /// This rank.
    pub rank: usize,
    /// Ranks in the group.
    pub world: usize,
    /// KV heads held.
    pub kv_heads: Range<usize>,
    /// Query heads held (the groups of `kv_heads`).
    pub heads: Range<usize>,
    /// FFN intermediate columns held.
    pub ffn: Range<usize>,
    /// Vocabulary rows held, for each rank (every rank needs them all to assemble logits).
    pub vocab: Vec<Range<usize>>,
}

/// Part `rank` of `n` units split as evenly as possible into `world` consecutive parts.
fn split(n: usize, world: usize, rank: usize) -> Range<usize> {
    n * rank / world..n * (rank + 1) / world
}

/// Refuses a group of more ranks than the model has KV heads (a rank holds at least one whole
/// KV head and its query heads; KV heads are not replicated).
pub fn check_world(cfg: &LlamaConfig, world: usize) -> Result<(), ConfigError> {
    let n_kv = cfg.kv_heads();
    if world > n_kv {
        return Err(ConfigError::Unsupported(format!(
            "tensor_parallel={world} exceeds the model's {n_kv} KV heads (each rank holds at least one whole KV head and its query heads)"
        )));
    }
    Ok(())
}

impl ShardPlan {
    /// The plan for `rank` of `world` on `weights` (of model `cfg`). KV heads are split as
    /// evenly as whole heads allow (3 KV heads over 2 ranks: 2 and 1), so a group larger than
    /// the model's KV heads is refused, as is a split that would cut a quantized block of the
    /// output or down projection.
    pub fn new(
        cfg: &LlamaConfig,
        weights: &LlamaWeights,
        rank: usize,
        world: usize,
    ) -> Result<ShardPlan, ConfigError> {
        let n_kv = cfg.kv_heads();
        if world == 0 || rank >= world {
            return Err(ConfigError::Unsupported(format!(
                "rank {rank} of a tensor-parallel group of {world}"
            )));
        }
        check_world(cfg, world)?;
        let group = cfg.num_heads / n_kv;
        let kv_heads = split(n_kv, world, rank);
        let heads = kv_heads.start * group..kv_heads.end * group;
        let hd = cfg.head_dim();
        // The FFN splits in whole blocks of the down projection's format.
        let unit = weights
            .layers
            .iter()
            .map(|l| l.w_down.weight.dtype.block_len())
            .max()
            .unwrap_or(1);
        let units = split(cfg.intermediate_size() / unit, world, rank);
        let ffn = units.start * unit..units.end * unit;
        let vocab = (0..world)
            .map(|r| split(cfg.vocab_size, world, r))
            .collect();
        let plan = ShardPlan {
            rank,
            world,
            kv_heads,
            heads,
            ffn,
            vocab,
        };
        // Every rank's column boundaries must fall on the output projection's blocks.
        for r in 0..world {
            let kv = split(n_kv, world, r);
            let cols = kv.start * group * hd..kv.end * group * hd;
            for (i, l) in weights.layers.iter().enumerate() {
                let bl = l.wo.weight.dtype.block_len();
                if !cols.start.is_multiple_of(bl) || !cols.end.is_multiple_of(bl) {
                    return Err(ConfigError::Unsupported(format!(
                        "tensor_parallel={world}: layer {i}'s attention output ({}, blocks of {bl}) cannot be split at rank {r}'s head boundary (columns {cols:?})",
                        l.wo.weight.dtype
                    )));
                }
            }
        }
        Ok(plan)
    }

    /// This rank's vocabulary rows.
    pub fn my_vocab(&self) -> Range<usize> {
        self.vocab[self.rank].clone()
    }

    /// This rank's slice of `w`.
    pub fn shard(&self, w: &LlamaWeights, cfg: &LlamaConfig) -> LlamaWeights {
        let hd = cfg.head_dim();
        let q = self.heads.start * hd..self.heads.end * hd;
        let kv = self.kv_heads.start * hd..self.kv_heads.end * hd;
        let rows = |l: &Linear, r: &Range<usize>| Linear {
            weight: l.weight.rows(r.clone()),
            bias: l.bias.as_ref().map(|b| b[r.clone()].to_vec()),
        };
        // A column split leaves a partial sum: the bias is added once, on rank 0.
        let cols = |l: &Linear, c: &Range<usize>| Linear {
            weight: l
                .weight
                .cols(c.clone())
                .expect("block boundaries checked by ShardPlan::new"),
            bias: l.bias.clone().filter(|_| self.rank == 0),
        };
        let layers = w
            .layers
            .iter()
            .map(|l| LayerWeights {
                attn_norm: l.attn_norm.clone(),
                wq: rows(&l.wq, &q),
                wk: rows(&l.wk, &kv),
                wv: rows(&l.wv, &kv),
                wo: cols(&l.wo, &q),
                ffn_norm: l.ffn_norm.clone(),
                w_gate: rows(&l.w_gate, &self.ffn),
                w_up: rows(&l.w_up, &self.ffn),
                w_down: cols(&l.w_down, &self.ffn),
            })
            .collect();
        let vocab = self.my_vocab();
        let slice = |t: &TensorData| t.rows(vocab.clone());
        LlamaWeights {
            embed: slice(&w.embed),
            layers,
            norm: w.norm.clone(),
            lm_head: slice(&w.lm_head),
            rope_freqs: w.rope_freqs.clone(),
            layout: w.layout,
            rope_style: w.rope_style,
        }
    }
}
