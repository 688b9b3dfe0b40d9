//! The Llama forward over a ragged batch: one call runs any mix of whole prompts, prompt chunks
//! and decode steps of many sequences, writes their K/V into the paged pool, and computes
//! logits only for the rows asked for.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tandem_collective::{fold_parts, Collective};

use tandem_kernels::packed::{
    matmul_packed, matmul_packed_many, matmul_packed_parts, matmul_packed_summed,
    read_ahead_packed, read_ahead_packed_next, worth_packing,
};
use tandem_kernels::{
    matmul, matmul_parts, ops, paged_attention, prepare_new_rows, AttnSeq, KvDType, PackedMat,
    Precision, RopeStyle, Rotation, SimdLevel, ThreadPool,
};

use crate::config::{LlamaConfig, RopeParams};
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::shard::{ShardPlan, SumParts};
use crate::step::{self, Step};
use crate::weights::{Linear, LlamaWeights};

/// Which of a sequence's new tokens need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsMode {
    /// None (a prompt chunk that is not the last).
    None,
    /// The last new token (the next token is sampled from it).
    Last,
    /// Every new token (prompt scoring, tests).
    All,
}

/// One sequence's share of a ragged batch.
#[derive(Clone, Copy, Debug)]
pub struct SeqInput<'a> {
    /// How many of the batch's tokens (consecutive, in sequence order) are this sequence's.
    pub n_tokens: usize,
    /// Tokens of this sequence already in the KV pool (the first new token's position).
    pub context_len: usize,
    /// Blocks holding positions `0..context_len + n_tokens`.
    pub block_table: &'a [u32],
    /// Which logits to return.
    pub logits: LogitsMode,
}

/// Logits of the rows that asked for them, in batch order.
#[derive(Clone, Debug)]
pub struct Logits {
    /// Vocabulary size (row length).
    pub vocab: usize,
    /// `(sequence index in the batch, position)` of each row.
    pub rows: Vec<(usize, usize)>,
    /// `rows.len() * vocab` values.
    pub values: Vec<f32>,
}

impl Logits {
    /// The logits of row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.vocab..(i + 1) * self.vocab]
    }

    /// The logits of row `i`, to sample from in place.
    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.values[i * self.vocab..(i + 1) * self.vocab]
    }

    /// The logits of the last row of sequence `seq`, if it asked for any.
    pub fn last_of(&self, seq: usize) -> Option<&[f32]> {
        self.rows
            .iter()
            .rposition(|r| r.0 == seq)
            .map(|i| self.row(i))
    }
}

// Indices into [`layer_mats`].
const WQ: usize = 0;
const WK: usize = 1;
const WV: usize = 2;
const WO: usize = 3;
const W_GATE: usize = 4;
const W_UP: usize = 5;
const W_DOWN: usize = 6;

/// The matrices of one layer repacked for the wide SIMD kernels, in [`layer_mats`] order
/// (`None` for a matrix whose format has no packed kernels).
type PackedLayer = [Option<PackedMat>; 7];

/// The seven matrices of a layer.
fn layer_mats(w: &crate::weights::LayerWeights) -> [&Linear; 7] {
    [&w.wq, &w.wk, &w.wv, &w.wo, &w.w_gate, &w.w_up, &w.w_down]
}

/// Weights repacked at load time for the CPU's widest kernels, matrix by matrix: files mix
/// formats (Q4_K_M holds Q4_K, Q5_0, Q6_K and Q8_0 tensors), and each matrix whose format has
/// packed kernels gets them.
struct PackedWeights {
    layers: Vec<PackedLayer>,
    lm_head: Option<PackedMat>,
}

impl PackedWeights {
    fn new(w: &LlamaWeights) -> PackedWeights {
        let pack = |l: &Linear| PackedMat::pack(&l.weight.mat());
        PackedWeights {
            layers: w.layers.iter().map(|l| layer_mats(l).map(pack)).collect(),
            lm_head: PackedMat::pack(&w.lm_head.mat()),
        }
    }
}

/// A tensor-parallel rank's place in its group.
struct TensorParallel {
    plan: ShardPlan,
    comm: Arc<dyn Collective>,
}

/// A loaded Llama model ready to run: the whole model, or one tensor-parallel rank's shard.
pub struct LlamaModel {
    /// The compute threads every kernel of a forward runs on (spinning between kernels).
    pool: std::sync::Arc<ThreadPool>,
    config: LlamaConfig,
    weights: LlamaWeights,
    packed: Option<PackedWeights>,
    rope: RopeParams,
    style: RopeStyle,
    precision: Precision,
    level: SimdLevel,
    tp: Option<TensorParallel>,
    /// The parts the output and down projections' sums are cut in (see [`SumParts`]).
    o_parts: SumParts,
    down_parts: SumParts,
    /// The last forward's logits buffer, given back by [`recycle`](Self::recycle).
    spare_logits: Mutex<Vec<f32>>,
}

/// Most rows of logits per compute thread whose buffer [`LlamaModel::recycle`] keeps for the
/// next forward: a decode step's rows at the engine's default batch limits (at most 16
/// sequences a thread, on AMX) and then some, so that the default steps reuse it on any core
/// count.
const SPARE_LOGIT_ROWS_PER_THREAD: usize = 32;

/// Scratch activations for one forward call.
struct Buffers {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// The parts of a row-parallel matrix's sum, `[parts, t, d]`.
    parts: Vec<f32>,
}

impl LlamaModel {
    /// Builds the model from a validated config and its weights.
    pub fn new(
        config: LlamaConfig,
        weights: LlamaWeights,
    ) -> std::result::Result<LlamaModel, crate::error::ConfigError> {
        LlamaModel::build(config, weights, None)
    }

    /// Builds rank `comm.rank()`'s shard of the model (see [`ShardPlan`]): the weights it does
    /// not hold are never read. Rank 0 runs [`forward`](Self::forward), which first sends the
    /// batch to the other ranks, waiting in [`follow`](Self::follow).
    pub fn sharded(
        config: LlamaConfig,
        weights: LlamaWeights,
        comm: Arc<dyn Collective>,
    ) -> std::result::Result<LlamaModel, crate::error::ConfigError> {
        config.validate()?;
        let plan = ShardPlan::new(&config, &weights, comm.rank(), comm.world())?;
        let weights = plan.shard(&weights, &config);
        LlamaModel::build(config, weights, Some(TensorParallel { plan, comm }))
    }

    fn build(
        config: LlamaConfig,
        weights: LlamaWeights,
        tp: Option<TensorParallel>,
    ) -> std::result::Result<LlamaModel, crate::error::ConfigError> {
        config.validate()?;
        let mut rope = config.rope_params()?;
        if let Some(f) = &weights.rope_freqs {
            rope.apply_freq_factors(f);
        }
        let style = weights.rope_style;
        let pool = ThreadPool::with_default_threads().map_err(|e| {
            crate::error::ConfigError::Unsupported(format!("cannot start compute threads: {e}"))
        })?;
        let level = tandem_kernels::simd::active();
        let packed = worth_packing(level).then(|| PackedWeights::new(&weights));
        // A whole model cuts its sums as a group's ranks do (the plan of a group of one).
        let (o_parts, down_parts) = match &tp {
            Some(t) => (t.plan.o_parts.clone(), t.plan.down_parts.clone()),
            None => {
                let whole = ShardPlan::new(&config, &weights, 0, 1)?;
                (whole.o_parts, whole.down_parts)
            }
        };
        Ok(LlamaModel {
            pool: std::sync::Arc::new(pool),
            config,
            weights,
            packed,
            rope,
            style,
            precision: Precision::Fast,
            level,
            tp,
            o_parts,
            down_parts,
            spare_logits: Mutex::new(Vec::new()),
        })
    }

    /// Uses `precision` for matmuls (`Exact` is the float reference path).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// Runs on `threads` compute threads (the caller included) instead of one per core.
    pub fn with_threads(mut self, threads: usize) -> std::io::Result<Self> {
        self.pool = std::sync::Arc::new(ThreadPool::new(threads)?);
        Ok(self)
    }

    /// Runs on one compute thread per core in `cores`, each pinned to its core (the caller
    /// to the first while it runs a forward).
    pub fn with_cores(mut self, cores: &[usize]) -> std::io::Result<Self> {
        self.pool = std::sync::Arc::new(ThreadPool::pinned(cores)?);
        Ok(self)
    }

    /// Uses SIMD `level` (capped at what the CPU supports).
    pub fn with_simd(mut self, level: SimdLevel) -> Self {
        self.level = level.min(SimdLevel::best());
        self
    }

    /// The model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The model's weights.
    pub fn weights(&self) -> &LlamaWeights {
        &self.weights
    }

    /// This rank and the group's size (`(0, 1)` for a whole model).
    pub fn rank(&self) -> (usize, usize) {
        self.tp
            .as_ref()
            .map_or((0, 1), |t| (t.plan.rank, t.plan.world))
    }

    /// Query and KV heads this rank computes.
    fn local_heads(&self) -> (usize, usize) {
        match &self.tp {
            Some(t) => (t.plan.heads.len(), t.plan.kv_heads.len()),
            None => (self.config.num_heads, self.config.kv_heads()),
        }
    }

    /// A KV pool for this model (for a shard: its KV heads only; every rank of a group makes
    /// one of the same number of blocks, since block ids are shared).
    pub fn new_kv_cache(&self, num_blocks: usize, block_size: usize, dtype: KvDType) -> KvCache {
        let layout = tandem_kernels::PagedLayout {
            block_size,
            n_kv_heads: self.local_heads().1,
            head_dim: self.config.head_dim(),
        };
        KvCache::with_layout(self.config.num_layers, layout, num_blocks, dtype)
    }

    /// The longest sequence the model accepts.
    pub fn max_context(&self) -> usize {
        self.config.max_positions()
    }

    /// The packed weights, when this model's precision and SIMD level use them.
    fn packed(&self) -> Option<&PackedWeights> {
        self.packed
            .as_ref()
            .filter(|_| self.precision == Precision::Fast && worth_packing(self.level))
    }

    /// Several of a layer's matrices on the same input (q/k/v, gate/up): packed ones in one
    /// call (one activation quantization, one parallel loop). Their biases are the caller's
    /// to add (see [`Self::biases`]).
    fn linears<const N: usize>(
        &self,
        x: &[f32],
        rows: usize,
        layer: usize,
        which: &[usize; N],
        outs: &mut [&mut [f32]; N],
    ) {
        let mats = layer_mats(&self.weights.layers[layer]);
        let packed = self
            .packed()
            .map(|p| which.map(|i| p.layers[layer][i].as_ref()));
        match packed.filter(|p| p.iter().all(Option::is_some)) {
            Some(p) => matmul_packed_many(x, rows, &p.map(Option::unwrap), outs, self.level),
            None => {
                for (&i, out) in which.iter().zip(outs.iter_mut()) {
                    matmul(x, rows, &mats[i].weight.mat(), out, self.precision);
                }
            }
        }
    }

    /// A layer's biases of matrices `which` (Qwen2's q/k/v have them).
    fn biases<const N: usize>(&self, layer: usize, which: &[usize; N]) -> [Option<&[f32]>; N] {
        let mats = layer_mats(&self.weights.layers[layer]);
        which.map(|i| mats[i].bias.as_deref())
    }

    fn validate(&self, tokens: &[u32], seqs: &[SeqInput], kv: &KvCache) -> Result<()> {
        let c = &self.config;
        let layout = kv.layout();
        if layout.n_kv_heads != self.local_heads().1
            || layout.head_dim != c.head_dim()
            || kv.num_layers() != c.num_layers
        {
            return Err(ModelError::Batch(
                "the KV pool was made for a different model shape".into(),
            ));
        }
        let total: usize = seqs.iter().map(|s| s.n_tokens).sum();
        if total != tokens.len() {
            return Err(ModelError::Batch(format!(
                "sequences claim {total} tokens but the batch has {}",
                tokens.len()
            )));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ModelError::Batch(format!(
                "token id {t} is outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        let mut written = HashSet::new();
        for (i, s) in seqs.iter().enumerate() {
            if s.n_tokens == 0 {
                return Err(ModelError::Batch(format!("sequence {i} has no tokens")));
            }
            let end = s.context_len + s.n_tokens;
            if end > self.max_context() {
                return Err(ModelError::ContextOverflow {
                    len: end,
                    max: self.max_context(),
                });
            }
            if s.block_table.len() * layout.block_size < end {
                return Err(ModelError::Batch(format!(
                    "sequence {i}: {} blocks of {} cannot hold {end} positions",
                    s.block_table.len(),
                    layout.block_size
                )));
            }
            if let Some(&b) = s
                .block_table
                .iter()
                .find(|&&b| b as usize >= kv.num_blocks())
            {
                return Err(ModelError::Batch(format!(
                    "sequence {i}: block {b} is outside the pool of {}",
                    kv.num_blocks()
                )));
            }
            for p in s.context_len..end {
                let slot = (s.block_table[p / layout.block_size], p % layout.block_size);
                if !written.insert(slot) {
                    return Err(ModelError::Batch(format!("sequence {i} writes KV slot {slot:?} that another token of this batch writes")));
                }
            }
        }
        Ok(())
    }

    /// Runs one forward pass over a ragged batch (see [`SeqInput`]), writing K/V into `kv`.
    /// On rank 0 of a tensor-parallel group the other ranks run it too, and the logits are the
    /// whole vocabulary's; a failure of the group is [`ModelError::Collective`].
    pub fn forward(&self, tokens: &[u32], seqs: &[SeqInput], kv: &mut KvCache) -> Result<Logits> {
        self.validate(tokens, seqs, kv)?;
        if let Some(tp) = &self.tp {
            if tp.plan.rank != 0 {
                return Err(ModelError::Batch(
                    "a tensor-parallel rank other than 0 follows rank 0's steps".into(),
                ));
            }
            let mut msg = Vec::new();
            step::encode_forward(tokens, seqs, &mut msg);
            tp.comm.broadcast(&mut msg)?;
        }
        self.pool.install(|| self.run(tokens, seqs, kv))
    }

    /// Ranks other than 0: runs rank 0's forward passes on this shard until rank 0 stops the
    /// group (`Ok`) or the group fails.
    pub fn follow(&self, kv: &mut KvCache) -> Result<()> {
        let Some(tp) = self.tp.as_ref().filter(|t| t.plan.rank != 0) else {
            return Err(ModelError::Batch(
                "only tensor-parallel ranks other than 0 follow".into(),
            ));
        };
        let mut msg = Vec::new();
        loop {
            tp.comm.broadcast(&mut msg)?;
            match step::decode(&msg) {
                Some(Step::Stop) => return Ok(()),
                Some(Step::Forward { tokens, seqs }) => {
                    let seqs: Vec<SeqInput> = seqs.iter().map(|s| s.as_input()).collect();
                    if let Err(e) = self.validate(&tokens, &seqs, kv) {
                        // Rank 0 validated the same batch: the ranks are out of step.
                        tp.comm.abort();
                        return Err(e);
                    }
                    self.pool.install(|| self.run(&tokens, &seqs, kv))?;
                }
                None => {
                    tp.comm.abort();
                    return Err(ModelError::Batch(
                        "undecodable step from tensor-parallel rank 0".into(),
                    ));
                }
            }
        }
    }

    /// Fails if this model's tensor-parallel group is broken (a rank died), without running
    /// anything; always fine for a whole model.
    pub fn check_group(&self) -> Result<()> {
        if let Some(tp) = &self.tp {
            tp.comm.check()?;
        }
        Ok(())
    }

    /// `out = x · wᵀ (+ bias)` for row-parallel matrix `which` (the output or down
    /// projection) of `layer`: its sum cut into `parts`, each computed alone, then added in
    /// part order here or, across a group, by its all-reduce; `scratch` holds the parts.
    #[allow(clippy::too_many_arguments)]
    fn row_parallel(
        &self,
        x: &[f32],
        rows: usize,
        layer: usize,
        which: usize,
        parts: &SumParts,
        scratch: &mut Vec<f32>,
        out: &mut [f32],
    ) -> Result<()> {
        let linear = layer_mats(&self.weights.layers[layer])[which];
        let packed = self.packed().and_then(|p| p.layers[layer][which].as_ref());
        match (packed, &self.tp) {
            // A whole model adds its parts in the kernel, while each tile's are in L1.
            (Some(p), None) => matmul_packed_summed(x, rows, p, &parts.mine, out, self.level),
            (packed, tp) => {
                scratch.resize(parts.mine.len() * out.len(), 0.0);
                match packed {
                    // A rank left no columns (more ranks than units) contributes no parts.
                    _ if parts.mine.is_empty() => {}
                    Some(p) => matmul_packed_parts(x, rows, p, &parts.mine, scratch, self.level),
                    None => {
                        let w = linear.weight.mat();
                        matmul_parts(x, rows, &w, &parts.mine, scratch, self.precision)
                    }
                }
                match tp {
                    Some(tp) => tp.comm.all_reduce_parts(scratch, &parts.held, out)?,
                    None => fold_parts(scratch.chunks_exact(out.len().max(1)), out),
                }
            }
        }
        if let Some(b) = &linear.bias {
            ops::add_bias(out, b);
        }
        Ok(())
    }

    /// Sums a partial result over the group (nothing to do for a whole model).
    fn all_reduce(&self, x: &mut [f32]) -> Result<()> {
        if let Some(tp) = &self.tp {
            tp.comm.all_reduce_sum(x)?;
        }
        Ok(())
    }

    /// Tells the compute pool that matrices `which` of `layer` (the LM head past the last
    /// layer) come next on `rows` rows (see [`read_ahead_packed`]); with `soon`, from the start
    /// of its next parallel loop on rather than now (said before a matmul about the one after).
    fn read_ahead(&self, layer: usize, which: &[usize], rows: usize, soon: bool) {
        let Some(p) = self.packed() else { return };
        // As in `linears`: packed kernels only when every matrix of the call has them.
        let mats: Option<Vec<&PackedMat>> = match p.layers.get(layer) {
            Some(l) => which.iter().map(|&i| l[i].as_ref()).collect(),
            None => p.lm_head.as_ref().map(|h| vec![h]),
        };
        match mats {
            Some(mats) if soon => read_ahead_packed_next(&mats, rows),
            Some(mats) => read_ahead_packed(&mats, rows),
            None => {}
        }
    }

    fn run(&self, tokens: &[u32], seqs: &[SeqInput], kv: &mut KvCache) -> Result<Logits> {
        let c = &self.config;
        let (t, d, hd) = (tokens.len(), c.hidden_size, c.head_dim());
        let (nh, nkv) = self.local_heads();
        let ffn = match &self.tp {
            Some(tp) => tp.plan.ffn.len(),
            None => c.intermediate_size(),
        };
        let eps = c.rms_norm_eps as f32;
        let mut b = Buffers {
            x: vec![0.0; t * d],
            h: vec![0.0; t * d],
            q: vec![0.0; t * nh * hd],
            k: vec![0.0; t * nkv * hd],
            v: vec![0.0; t * nkv * hd],
            att: vec![0.0; t * nh * hd],
            o: vec![0.0; t * d],
            gate: vec![0.0; t * ffn],
            up: vec![0.0; t * ffn],
            parts: Vec::new(),
        };
        // A shard holds some vocabulary rows: each token's row comes from one rank, zeros from
        // the others, and the sum over ranks is the embedding.
        let vocab_rows = self
            .tp
            .as_ref()
            .map_or(0..c.vocab_size, |t| t.plan.my_vocab());
        let embed = self.weights.embed.mat();
        for (row, &tok) in b.x.chunks_exact_mut(d).zip(tokens) {
            if vocab_rows.contains(&(tok as usize)) {
                embed.row_f32(tok as usize - vocab_rows.start, row);
            }
        }
        self.all_reduce(&mut b.x)?;
        let mut attn_seqs = Vec::with_capacity(seqs.len());
        let (mut cos, mut sin) = (vec![0f32; t * hd / 2], vec![0f32; t * hd / 2]);
        let mut row = 0;
        for s in seqs {
            attn_seqs.push(AttnSeq {
                row_start: row,
                n_new: s.n_tokens,
                context_len: s.context_len,
                block_table: s.block_table,
            });
            for i in 0..s.n_tokens {
                let r = (row + i) * hd / 2;
                self.rope.angles(
                    s.context_len + i,
                    &mut cos[r..r + hd / 2],
                    &mut sin[r..r + hd / 2],
                );
            }
            row += s.n_tokens;
        }
        let layout = kv.layout();
        let scale = 1.0 / (hd as f32).sqrt();
        let logit_rows: usize = seqs
            .iter()
            .map(|s| match s.logits {
                LogitsMode::None => 0,
                LogitsMode::Last => 1,
                LogitsMode::All => s.n_tokens,
            })
            .sum();
        // Before each matmul, the one after it (see `read_ahead`); the first one now.
        self.read_ahead(0, &[WQ, WK, WV], t, false);
        for (l, w) in self.weights.layers.iter().enumerate() {
            // The residual add of the layer before goes with this norm (one pass).
            if l == 0 {
                ops::rms_norm(&b.x, &w.attn_norm, eps, &mut b.h);
            } else {
                ops::add_rms_norm(&mut b.x, &b.o, &w.attn_norm, eps, &mut b.h);
            }
            self.read_ahead(l, &[WO], t, true);
            self.linears(
                &b.h,
                t,
                l,
                &[WQ, WK, WV],
                &mut [&mut b.q, &mut b.k, &mut b.v],
            );
            {
                let (mut km, mut vm) = kv.layer_mut(l);
                let rot = Rotation {
                    cos: &cos,
                    sin: &sin,
                    style: self.style,
                };
                let bias = self.biases(l, &[WQ, WK, WV]);
                let (q, k, v) = (&mut b.q, &mut b.k, &mut b.v);
                prepare_new_rows(&layout, &attn_seqs, q, k, v, bias, rot, (&mut km, &mut vm));
            }
            let (kr, vr) = kv.layer(l);
            let window = self.config.attention_window(l);
            paged_attention(
                &layout, &attn_seqs, &b.q, nh, scale, window, kr, vr, &mut b.att,
            );
            self.read_ahead(l, &[W_GATE, W_UP], t, true);
            self.row_parallel(&b.att, t, l, WO, &self.o_parts, &mut b.parts, &mut b.o)?;
            ops::add_rms_norm(&mut b.x, &b.o, &w.ffn_norm, eps, &mut b.h);
            self.read_ahead(l, &[W_DOWN], t, true);
            self.linears(&b.h, t, l, &[W_GATE, W_UP], &mut [&mut b.gate, &mut b.up]);
            for (out, bias) in [&mut b.gate, &mut b.up]
                .into_iter()
                .zip(self.biases(l, &[W_GATE, W_UP]))
            {
                if let Some(bias) = bias {
                    ops::add_bias(out, bias);
                }
            }
            ops::silu_mul(&mut b.gate, &b.up);
            // The next layer's q/k/v, or past the last layer the LM head.
            match l + 1 < self.weights.layers.len() {
                true => self.read_ahead(l + 1, &[WQ, WK, WV], t, true),
                false => self.read_ahead(l + 1, &[], logit_rows, true),
            }
            let down = &self.down_parts;
            self.row_parallel(&b.gate, t, l, W_DOWN, down, &mut b.parts, &mut b.o)?;
        }
        ops::add_assign(&mut b.x, &b.o);
        // Final norm and LM head only on the rows that need logits.
        let mut rows = Vec::new();
        let mut picked = Vec::new();
        let mut start = 0;
        for (si, s) in seqs.iter().enumerate() {
            let wanted = match s.logits {
                LogitsMode::None => 0..0,
                LogitsMode::Last => s.n_tokens - 1..s.n_tokens,
                LogitsMode::All => 0..s.n_tokens,
            };
            for i in wanted {
                rows.push((si, s.context_len + i));
                picked.extend_from_slice(&b.x[(start + i) * d..(start + i + 1) * d]);
            }
            start += s.n_tokens;
        }
        let mut normed = vec![0f32; picked.len()];
        ops::rms_norm(&picked, &self.weights.norm, eps, &mut normed);
        let vocab = vocab_rows.len();
        let mut values = self.logits_buffer(rows.len() * vocab);
        match self.packed().and_then(|p| p.lm_head.as_ref()) {
            Some(p) => matmul_packed(&normed, rows.len(), p, &mut values, self.level),
            None => matmul(
                &normed,
                rows.len(),
                &self.weights.lm_head.mat(),
                &mut values,
                self.precision,
            ),
        }
        if let Some(tp) = &self.tp {
            values = self.gather_logits(tp, rows.len(), &values)?;
        }
        Ok(Logits {
            vocab: c.vocab_size,
            rows,
            values,
        })
    }

    /// A buffer for `n` logits, which the LM head overwrites: the one given back with
    /// [`recycle`](Self::recycle) when there is one. A new buffer is zeroed (and its pages
    /// faulted in) on the engine thread while the compute threads wait: for sixteen rows of a
    /// 151,936-token vocabulary that is 9.7 MB a step.
    fn logits_buffer(&self, n: usize) -> Vec<f32> {
        let mut spare = self.spare_logits.lock().unwrap_or_else(|e| e.into_inner());
        let mut values = std::mem::take(&mut *spare);
        values.resize(n, 0.0);
        values
    }

    /// [`argmax`](crate::argmax) of rows `rows` of `logits`, on this model's compute threads.
    pub fn argmax_rows(&self, logits: &Logits, rows: &[usize]) -> Vec<u32> {
        self.pool
            .install(|| ops::argmax_rows(&logits.values, logits.vocab, rows))
    }

    /// Gives a forward's logits back once they are read, so that the next forward writes its
    /// logits into the same memory (see [`logits_buffer`](Self::logits_buffer)). A buffer of
    /// more than [`SPARE_LOGIT_ROWS_PER_THREAD`] rows a compute thread (a long prompt scored
    /// position by position: 311 MB for 512 rows of a 151,936-token vocabulary) is freed
    /// instead of held for good.
    pub fn recycle(&self, logits: Logits) {
        let rows = SPARE_LOGIT_ROWS_PER_THREAD * self.pool.threads();
        if logits.values.capacity() <= rows * logits.vocab {
            *self.spare_logits.lock().unwrap_or_else(|e| e.into_inner()) = logits.values;
        }
    }

    /// Rank 0 assembles whole-vocabulary rows from every rank's slice (other ranks get none).
    fn gather_logits(&self, tp: &TensorParallel, rows: usize, mine: &[f32]) -> Result<Vec<f32>> {
        let lens: Vec<usize> = tp.plan.vocab.iter().map(|v| rows * v.len()).collect();
        let mut parts = Vec::new();
        tp.comm.gather(mine, &lens, &mut parts)?;
        if tp.plan.rank != 0 {
            return Ok(Vec::new());
        }
        let vocab = self.config.vocab_size;
        let mut out = vec![0f32; rows * vocab];
        let mut at = 0;
        for v in &tp.plan.vocab {
            for r in 0..rows {
                out[r * vocab + v.start..r * vocab + v.end]
                    .copy_from_slice(&parts[at + r * v.len()..at + (r + 1) * v.len()]);
            }
            at += rows * v.len();
        }
        Ok(out)
    }
}

impl Drop for LlamaModel {
    fn drop(&mut self) {
        // Rank 0 going away stops the ranks that follow it.
        if let Some(tp) = self.tp.as_ref().filter(|t| t.plan.rank == 0) {
            let _ = tp.comm.broadcast(&mut step::encode_stop());
        }
    }
}
