//! The engine handle: starts the engine loop on its own thread, validates and submits
//! requests, and reports stats. The loop owns the model, the KV pool and every sequence.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tandem_model::{KvCache, KvDType, LoadedModel, Precision, SimdLevel, Tokenizer};

use crate::error::{EngineError, ParamError};
use crate::grammar::GrammarCompiler;
use crate::handoff::{HeldKv, KvRegion, Reservation};
use crate::params::GenerateParams;
use crate::request::{EventStream, Request};
use crate::worker::{Command, Worker};

/// Engine settings (FastGen's state-manager knobs plus the KV pool size).
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Tokens per forward, the SplitFuse budget (FastGen's `max_ragged_batch_size`); `None`
    /// takes [`default_max_batch_tokens`]. FastGen's 768 suits GPUs, where a
    /// 768-token forward costs about as much as a 1-token one; on a CPU every token costs
    /// compute, and every prompt token in a step lengthens the step of each sequence decoding
    /// in it (measured in docs/perf-notes.md). Lower it for smoother decodes, raise it for TTFT.
    pub max_batch_tokens: Option<usize>,
    /// Sequences per forward (`max_ragged_sequence_count`). FastGen's 512 suits GPUs; on a
    /// CPU more sequences per step lengthen every step of every request (TPOT), while fewer
    /// leave the rest waiting for a slot (TTFT). The default, [`default_max_batch_seqs`], is 16
    /// per compute thread where the matmuls run on AMX, 8 on AVX-512 VNNI, 4 on AVX2 (measured
    /// in docs/perf-notes.md).
    pub max_batch_seqs: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks; `None` sizes the pool from `kv_memory_fraction`.
    pub num_blocks: Option<usize>,
    /// Fraction of physical memory for the KV pool when `num_blocks` is `None`.
    pub kv_memory_fraction: f64,
    /// KV element type.
    pub kv_dtype: KvDType,
    /// Default cap on prompt + generated tokens; `None` means the model's `seq_length`.
    pub max_length: Option<usize>,
    /// Matmul precision.
    pub precision: Precision,
    /// How long a prefill-only request's KV stays held for its consumer before it is freed.
    pub kv_hold_timeout: Duration,
}

/// Sequences per forward by default, per compute thread of a default pool: 16 where the
/// k-quants' batched matmuls run on AMX, 8 on the AVX-512 VNNI kernels, 4 on the AVX2 (and
/// scalar) ones. On AMX the steps' rows share each weight read and their tiles' planes, so per
/// row they cost less the more there are: served 32 concurrent requests, the 1.5B on two cores
/// of a Xeon gave 117-122 tok/s at a TPOT of 110-116 ms and a TTFT of 11.4-11.7 s with 8 per
/// thread, and 131-138 tok/s at 163-170 ms and 6.6-7.2 s with 16 (llama-server `--parallel 8`
/// the same day: 24 tok/s, TPOT 249 ms, TTFT 74 s). The VNNI kernels are compute-bound from
/// ~13 rows on two cores of a Zen 4: 4 a thread cost 15% of the throughput there. The AVX2
/// kernels are compute-bound from fewer rows still, so more only lengthen each step: on an
/// AVX2-only Zen 3 the same load gave 45.2-48.7 tok/s at a TPOT of 460-517 ms with 16 a
/// thread, 47.6-49.2 tok/s at 269-292 ms with 8, and 46.0-47.7 tok/s at 149-164 ms with 4
/// (TTFT 22, 31 and 37 s); the reference model 349-373 tok/s at 37-39 ms with 8 and 330-355
/// at 20-22 ms with 4. Lower it for a shorter TPOT under load, raise it for a shorter TTFT.
pub fn default_max_batch_seqs() -> usize {
    let per_thread = match tandem_model::simd_level() {
        SimdLevel::Amx => 16,
        SimdLevel::Avx512Vnni => 8,
        SimdLevel::Avx2 | SimdLevel::Scalar => 4,
    };
    tandem_model::default_threads().saturating_mul(per_thread)
}

/// The most tokens a default budget gives a step: 32 per compute thread.
fn default_prefill_tokens() -> usize {
    tandem_model::default_threads().saturating_mul(32)
}

/// The default SplitFuse budget with `max_batch_seqs` sequences per step: a token for each
/// sequence that decodes, and 32 per compute thread more (as in steps where nothing decodes),
/// so that prompts still advance by that much when every slot decodes. Steps of that many rows
/// share each weight read among more rows, and reach the rows from which the k-quants'
/// matmuls run on AMX where the CPU has it. With 32 sequences in flight, the 1.5B served 32
/// concurrent requests at 123-125 tok/s with a budget of 64, 131-138 with 96 and 134-136
/// with 128, for TPOTs of 163, 163-170 and 169-173 ms: with less, the last prompts of a burst
/// are still prefilling a few tokens a step while the first ones decode, and the burst ends
/// on a tail of steps with few rows (docs/perf-notes.md). Lower it for smoother decodes.
pub fn default_max_batch_tokens(max_batch_seqs: usize) -> usize {
    max_batch_seqs.saturating_add(default_prefill_tokens())
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch_tokens: None,
            max_batch_seqs: default_max_batch_seqs(),
            block_size: 16,
            num_blocks: None,
            kv_memory_fraction: 0.1,
            kv_dtype: KvDType::F16,
            max_length: None,
            precision: Precision::Fast,
            kv_hold_timeout: Duration::from_secs(60),
        }
    }
}

/// Fixed facts about a running engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EngineInfo {
    /// KV blocks in the pool.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Bytes of the KV pool.
    pub kv_bytes: usize,
    /// Default (and largest) `max_length`.
    pub max_length: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
}

impl EngineInfo {
    /// Checks a request against this engine (options, vocabulary, KV capacity) and returns
    /// how many tokens it may generate.
    pub fn check(&self, prompt: &[u32], params: &GenerateParams) -> Result<usize, EngineError> {
        let max_new = params.validate(prompt.len(), self.max_length)?;
        let outside = |t: u32| t as usize >= self.vocab_size;
        for (name, ids) in [
            (
                "logit_bias",
                params.logit_bias.iter().map(|b| b.0).collect::<Vec<_>>(),
            ),
            ("stop_token_ids", params.stop_token_ids.clone()),
        ] {
            if let Some(t) = ids.into_iter().find(|&t| outside(t)) {
                return Err(ParamError::Invalid {
                    name,
                    why: format!(
                        "token id {t} is outside the vocabulary of {}",
                        self.vocab_size
                    ),
                }
                .into());
            }
        }
        if let Some(&t) = prompt.iter().find(|&&t| outside(t)) {
            return Err(ParamError::Invalid {
                name: "prompt",
                why: format!(
                    "token id {t} is outside the vocabulary of {}",
                    self.vocab_size
                ),
            }
            .into());
        }
        let capacity = self.num_blocks * self.block_size;
        if prompt.len() + 1 > capacity {
            return Err(EngineError::KvTooSmall {
                tokens: prompt.len() + 1,
                blocks: self.num_blocks,
                block_size: self.block_size,
            });
        }
        // A sequence never outgrows the pool, so the oldest one can always finish.
        Ok(max_new.min(capacity - prompt.len()))
    }
}

/// Live counters, updated by the engine loop after every step.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EngineStats {
    /// Sequences holding KV.
    pub running: usize,
    /// Requests waiting for admission.
    pub waiting: usize,
    /// KV blocks in use.
    pub blocks_in_use: usize,
    /// Free blocks still holding a cached prefix.
    pub blocks_cached: usize,
    /// Prefix-cache lookups and hits.
    pub prefix_lookups: u64,
    /// Prefix-cache hits.
    pub prefix_hits: u64,
    /// Tokens computed by forwards (prompt and decode).
    pub tokens_computed: u64,
    /// Forward passes run.
    pub steps: u64,
    /// Preemptions.
    pub preemptions: u64,
    /// Blocks held for KV consumers (prefill side of disaggregation).
    pub blocks_held: usize,
    /// Blocks reserved for imported KV (decode side).
    pub blocks_reserved: usize,
}

impl std::ops::AddAssign for EngineStats {
    /// Sums counters (of several engines).
    fn add_assign(&mut self, s: Self) {
        self.running += s.running;
        self.waiting += s.waiting;
        self.blocks_in_use += s.blocks_in_use;
        self.blocks_cached += s.blocks_cached;
        self.prefix_lookups += s.prefix_lookups;
        self.prefix_hits += s.prefix_hits;
        self.tokens_computed += s.tokens_computed;
        self.steps += s.steps;
        self.preemptions += s.preemptions;
        self.blocks_held += s.blocks_held;
        self.blocks_reserved += s.blocks_reserved;
    }
}

/// Handle on an engine thread. Dropping it shuts the engine down (open requests end with
/// `abort`).
pub struct Engine {
    tx: Sender<Command>,
    join: Option<JoinHandle<()>>,
    info: EngineInfo,
    tokenizer: Arc<Tokenizer>,
    stats: Arc<Mutex<EngineStats>>,
    kv_regions: Vec<KvRegion>,
    grammars: Arc<GrammarCompiler>,
}

fn physical_memory() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        })
        .map_or(8 << 30, |kb| kb * 1024)
}

impl EngineConfig {
    /// The SplitFuse budget: `max_batch_tokens`, or the default ([`default_max_batch_tokens`]).
    pub fn batch_tokens(&self) -> usize {
        self.max_batch_tokens
            .unwrap_or_else(|| default_max_batch_tokens(self.max_batch_seqs))
    }

    /// The least budget of a step in which nothing decodes (the scheduler takes the larger of
    /// this and [`Self::batch_tokens`]): `max_batch_tokens` when given (one budget, as set),
    /// else 32 tokens per compute thread, so that a lone prompt is not cut into the small
    /// chunks that keep a large model's decodes flowing.
    pub fn prefill_tokens(&self) -> usize {
        self.max_batch_tokens.unwrap_or_else(default_prefill_tokens)
    }

    /// The default cap on a sequence's length and the KV pool's size in blocks for a model of
    /// `mcfg` accepting `max_context` positions (the ranks of a tensor-parallel group size
    /// their pools with it before they start).
    pub fn kv_plan(
        &self,
        mcfg: &tandem_model::LlamaConfig,
        max_context: usize,
    ) -> Result<(usize, usize), EngineError> {
        let cfg = self;
        if cfg.block_size == 0 || cfg.max_batch_tokens == Some(0) || cfg.max_batch_seqs == 0 {
            return Err(EngineError::Config(
                "block_size, max_batch_tokens and max_batch_seqs must be positive".into(),
            ));
        }
        let max_length = cfg.max_length.unwrap_or(mcfg.seq_length).min(max_context);
        if max_length < 2 {
            return Err(EngineError::Config(format!(
                "max_length {max_length} leaves no room to generate"
            )));
        }
        let per_block = KvCache::bytes_per_token(mcfg, cfg.kv_dtype) * cfg.block_size;
        let num_blocks = match cfg.num_blocks {
            Some(n) => n,
            None => {
                if !(cfg.kv_memory_fraction > 0.0 && cfg.kv_memory_fraction < 1.0) {
                    return Err(EngineError::Config(
                        "kv_memory_fraction must be in (0, 1)".into(),
                    ));
                }
                // Enough for max_length per sequence at most max_batch_seqs times over.
                let budget =
                    (physical_memory() as f64 * cfg.kv_memory_fraction) as usize / per_block;
                budget.min(
                    cfg.max_batch_seqs
                        .saturating_mul(max_length.div_ceil(cfg.block_size)),
                )
            }
        };
        if num_blocks == 0 {
            return Err(EngineError::Config("the KV pool has no blocks".into()));
        }
        Ok((max_length, num_blocks))
    }
}

impl Engine {
    /// Starts an engine for `loaded`.
    pub fn start(loaded: LoadedModel, cfg: EngineConfig) -> Result<Engine, EngineError> {
        let model = loaded.model.with_precision(cfg.precision);
        let mcfg = model.config().clone();
        let (max_length, num_blocks) = cfg.kv_plan(&mcfg, model.max_context())?;
        let per_block = KvCache::bytes_per_token(&mcfg, cfg.kv_dtype) * cfg.block_size;
        let info = EngineInfo {
            num_blocks,
            block_size: cfg.block_size,
            kv_bytes: num_blocks * per_block,
            max_length,
            vocab_size: mcfg.vocab_size,
        };
        tracing::info!(
            blocks = num_blocks,
            block_size = cfg.block_size,
            kv_mib = info.kv_bytes >> 20,
            tokens = num_blocks * cfg.block_size,
            "KV pool allocated"
        );
        let tokenizer = Arc::new(loaded.tokenizer);
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let (tx, rx) = channel();
        let (tok, st) = (tokenizer.clone(), stats.clone());
        let (regions_tx, regions_rx) = channel();
        // The worker is built on its thread: the block pool it owns is single-threaded.
        let join = std::thread::Builder::new()
            .name("tandem-engine".into())
            .spawn(move || {
                let mut worker = Worker::new(model, tok, &cfg, num_blocks, rx, st);
                let _ = regions_tx.send(worker.kv_regions());
                worker.run()
            })
            .map_err(|e| EngineError::Config(format!("cannot start the engine thread: {e}")))?;
        let kv_regions = regions_rx.recv().map_err(|_| EngineError::Closed)?;
        let grammars = Arc::new(GrammarCompiler::new(tokenizer.clone(), info.vocab_size));
        Ok(Engine {
            tx,
            join: Some(join),
            info,
            tokenizer,
            stats,
            kv_regions,
            grammars,
        })
    }

    /// Whether the engine loop is still running (it stops on shutdown, or when its model can
    /// no longer run: a tensor-parallel rank died).
    pub fn is_running(&self) -> bool {
        self.join.as_ref().is_some_and(|j| !j.is_finished())
    }

    /// The KV pool's tensors (K0, V0, K1, V1, ...), each `num_blocks` contiguous blocks (the
    /// layout inside a block: `tandem_kernels::PagedLayout::head_offset`). They stay valid until the engine shuts down; register them
    /// with a transfer library and unregister before dropping the engine.
    pub fn kv_regions(&self) -> &[KvRegion] {
        &self.kv_regions
    }

    /// Validates and enqueues a request; its events arrive on the returned stream. Dropping the
    /// stream cancels the request and frees its KV at the next step.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: GenerateParams,
    ) -> Result<EventStream, EngineError> {
        let (req, rx) = self.request(prompt, params, None)?;
        self.tx
            .send(Command::Generate(req))
            .map_err(|_| EngineError::Closed)?;
        Ok(rx)
    }

    /// Prefill-only: computes the prompt's KV and its first token (the stream ends after it),
    /// then holds the KV blocks for a consumer; their ids arrive on the second receiver. Call
    /// [`release`](Self::release) when the consumer has them.
    pub fn submit_prefill(
        &self,
        prompt: Vec<u32>,
        mut params: GenerateParams,
    ) -> Result<(EventStream, tokio::sync::oneshot::Receiver<HeldKv>), EngineError> {
        params.max_new_tokens = Some(1);
        params.min_new_tokens = params.min_new_tokens.min(1);
        let (hold_tx, hold_rx) = tokio::sync::oneshot::channel();
        let (req, rx) = self.request(prompt, params, Some(hold_tx))?;
        self.tx
            .send(Command::Generate(req))
            .map_err(|_| EngineError::Closed)?;
        Ok((rx, hold_rx))
    }

    /// Frees KV held by a prefill-only request (unknown handles are ignored).
    pub fn release(&self, handle: u64) {
        let _ = self.tx.send(Command::Release(handle));
    }

    /// Sets aside free blocks for `tokens` tokens of imported KV.
    pub async fn reserve(&self, tokens: usize) -> Result<Reservation, EngineError> {
        let n = tokens.div_ceil(self.info.block_size);
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Command::Reserve { blocks: n, reply })
            .map_err(|_| EngineError::Closed)?;
        let (id, blocks) = rx.await.map_err(|_| EngineError::Closed)??;
        Ok(Reservation {
            id,
            blocks,
            tx: self.tx.clone(),
            consumed: false,
        })
    }

    /// Continues a request whose prompt KV was written into `reservation`'s blocks and whose
    /// first token was sampled elsewhere: the stream starts with `first_token`.
    pub fn submit_imported(
        &self,
        mut reservation: Reservation,
        prompt: Vec<u32>,
        first_token: u32,
        params: GenerateParams,
    ) -> Result<EventStream, EngineError> {
        if reservation.blocks.len() < prompt.len().div_ceil(self.info.block_size) {
            return Err(EngineError::Handoff(format!(
                "{} reserved blocks cannot hold a {}-token prompt",
                reservation.blocks.len(),
                prompt.len()
            )));
        }
        if first_token as usize >= self.info.vocab_size {
            return Err(EngineError::Handoff(format!(
                "first token {first_token} is outside the vocabulary"
            )));
        }
        let (req, rx) = self.request(prompt, params, None)?;
        reservation.consumed = true;
        self.tx
            .send(Command::Import {
                req,
                reservation: reservation.id,
                first_token,
            })
            .map_err(|_| EngineError::Closed)?;
        Ok(rx)
    }

    /// Validates a request and builds it with its event channel.
    fn request(
        &self,
        prompt: Vec<u32>,
        params: GenerateParams,
        hold: Option<tokio::sync::oneshot::Sender<HeldKv>>,
    ) -> Result<(Request, EventStream), EngineError> {
        let max_new = self.info.check(&prompt, &params)?;
        let constraint = params
            .grammar
            .as_ref()
            .map(|g| self.grammars.compile(g))
            .transpose()?;
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        let req = Request {
            prompt,
            params,
            max_new,
            events,
            hold,
            constraint,
        };
        Ok((req, rx))
    }

    /// Compiles grammars for this engine's tokenizer (to check a grammar before submitting).
    pub fn grammars(&self) -> &Arc<GrammarCompiler> {
        &self.grammars
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Fixed facts about the engine.
    pub fn info(&self) -> EngineInfo {
        self.info
    }

    /// Current counters.
    pub fn stats(&self) -> EngineStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the engine thread; open requests end with `abort`.
    pub fn shutdown(&mut self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}
