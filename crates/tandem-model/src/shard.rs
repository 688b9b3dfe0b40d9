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
    /// The parts of the attention output projection's sum this rank makes.
    pub o_parts: SumParts,
    /// The parts of the down projection's sum this rank makes.
    pub down_parts: SumParts,
}

/// How a row-parallel matrix's sum over its input columns is cut, on one rank.
///
/// The whole model and every group of up to [`EXACT_WORLDS`] ranks cut the sum at the same
/// columns (every rank boundary any of those groups has), compute each part alone and add
/// the parts in column order (`tandem_collective::fold_parts`), so a group's results are the
/// whole model's bit for bit. A larger group cuts at its own boundaries too and is exact only
/// up to the order of that addition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SumParts {
    /// This rank's parts, in its own columns (consecutive, covering them).
    pub mine: Vec<Range<usize>>,
    /// Parts held by each rank.
    pub held: Vec<usize>,
}

/// Groups up to this size get the whole model's bits (see [`SumParts`]). Each size adds cuts
/// to two matrices of every layer, at a few percent of their time per cut for narrow parts.
pub const EXACT_WORLDS: usize = 8;

impl SumParts {
    /// Parts of columns `0..k` cut at `bounds` for ranks holding columns `ranks` (consecutive,
    /// covering `0..k`), on `rank`.
    fn new(bounds: &[usize], ranks: &[Range<usize>], rank: usize) -> SumParts {
        let cuts = |r: &Range<usize>| -> Vec<usize> {
            let mut c: Vec<usize> = bounds
                .iter()
                .copied()
                .filter(|b| r.contains(b) || *b == r.end)
                .chain([r.start, r.end])
                .collect();
            c.sort_unstable();
            c.dedup();
            c
        };
        let held = ranks
            .iter()
            .map(|r| cuts(r).len().saturating_sub(1))
            .collect();
        let mine = &ranks[rank];
        let mine = cuts(mine)
            .windows(2)
            .map(|w| w[0] - mine.start..w[1] - mine.start)
            .collect();
        SumParts { mine, held }
    }
}

/// Every boundary of `split(n, w, r)` for groups of 1 to `max_world` ranks, times `unit`.
fn group_bounds(n: usize, max_world: usize, unit: usize) -> Vec<usize> {
    let mut b: Vec<usize> = (1..=max_world.min(EXACT_WORLDS))
        .flat_map(|w| (0..=w).map(move |r| n * r / w * unit))
        .collect();
    b.sort_unstable();
    b.dedup();
    b
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
        // The sums of the output and down projections, cut where any group could cut them
        // (the output projection's cuts only where its blocks allow a group at all).
        let o_block = weights
            .layers
            .iter()
            .map(|l| l.wo.weight.dtype.block_len())
            .max()
            .unwrap_or(1);
        let head_cols = group * hd;
        let mut o_bounds = group_bounds(n_kv, n_kv, head_cols);
        o_bounds.retain(|b| b.is_multiple_of(o_block));
        let o_ranks: Vec<_> = (0..world)
            .map(|r| {
                let kv = split(n_kv, world, r);
                kv.start * head_cols..kv.end * head_cols
            })
            .collect();
        let n_units = cfg.intermediate_size() / unit;
        let ffn_ranks: Vec<_> = (0..world)
            .map(|r| {
                let u = split(n_units, world, r);
                u.start * unit..u.end * unit
            })
            .collect();
        let plan = ShardPlan {
            rank,
            world,
            kv_heads,
            heads,
            ffn,
            vocab,
            o_parts: SumParts::new(&o_bounds, &o_ranks, rank),
            down_parts: SumParts::new(&group_bounds(n_units, n_kv, unit), &ffn_ranks, rank),
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
        // A column split leaves a partial sum: every rank adds the bias to the whole sum.
        let cols = |l: &Linear, c: &Range<usize>| Linear {
            weight: l
                .weight
                .cols(c.clone())
                .expect("block boundaries checked by ShardPlan::new"),
            bias: l.bias.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every rank's parts, in the whole matrix's columns, in rank order.
    fn global_parts(bounds: &[usize], ranks: &[Range<usize>]) -> Vec<Range<usize>> {
        (0..ranks.len())
            .flat_map(|r| {
                let p = SumParts::new(bounds, ranks, r);
                assert_eq!(p.held[r], p.mine.len());
                let at = ranks[r].start;
                p.mine.into_iter().map(move |c| c.start + at..c.end + at)
            })
            .collect()
    }

    proptest! {
        /// A group of up to `EXACT_WORLDS` ranks (however many units and heads) cuts its sum
        /// into exactly the whole model's parts; a larger group covers the columns in order.
        #[test]
        fn groups_cut_the_whole_models_parts(units in 1usize..200, heads in 1usize..12, world in 1usize..12, unit in prop::sample::select(vec![1usize, 32, 256])) {
            let world = world.min(heads);
            let bounds = group_bounds(units, heads, unit);
            let whole = global_parts(&bounds, std::slice::from_ref(&(0..units * unit)));
            let ranks: Vec<_> = (0..world)
                .map(|r| split(units, world, r))
                .map(|u| u.start * unit..u.end * unit)
                .collect();
            let group = global_parts(&bounds, &ranks);
            let covered: Vec<usize> = group.iter().flat_map(|c| [c.start, c.end]).collect();
            prop_assert_eq!(covered.first().copied(), Some(0));
            prop_assert_eq!(covered.last().copied(), Some(units * unit));
            prop_assert!(group.windows(2).all(|w| w[0].end == w[1].start && w[0].start < w[0].end));
            if world <= EXACT_WORLDS {
                prop_assert_eq!(group, whole);
            }
        }
    }
}
