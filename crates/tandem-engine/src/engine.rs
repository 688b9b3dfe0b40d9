//! The engine handle: starts the engine loop on its own thread, validates and submits
//! requests, and reports stats. The loop owns the model, the KV pool and every sequence.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tandem_model::{KvCache, KvDType, LoadedModel, Precision, Tokenizer};

use crate::error::{EngineError, ParamError};
use crate::params::GenerateParams;
use crate::request::{EventStream, Request};
use crate::worker::{Command, Worker};

/// Engine settings (FastGen's state-manager knobs plus the KV pool size).
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Tokens per forward, the SplitFuse budget (FastGen's `max_ragged_batch_size`). FastGen's
    /// 768 suits GPUs, where a 768-token forward costs about as much as a 1-token one; on a CPU
    /// every token costs compute, so the default is 16: decodes keep flowing while long prompts
    /// prefill (measured in docs/perf-notes.md). Raise it for prompt throughput and TTFT.
    pub max_batch_tokens: usize,
    /// Sequences per forward (`max_ragged_sequence_count`).
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
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch_tokens: 16,
            max_batch_seqs: 512,
            block_size: 16,
            num_blocks: None,
            kv_memory_fraction: 0.1,
            kv_dtype: KvDType::F16,
            max_length: None,
            precision: Precision::Fast,
        }
    }
}

/// Fixed facts about a running engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// Live counters, updated by the engine loop after every step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
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
}

/// Handle on an engine thread. Dropping it shuts the engine down (open requests end with
/// `abort`).
pub struct Engine {
    tx: Sender<Command>,
    join: Option<JoinHandle<()>>,
    info: EngineInfo,
    tokenizer: Arc<Tokenizer>,
    stats: Arc<Mutex<EngineStats>>,
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

impl Engine {
    /// Starts an engine for `loaded`.
    pub fn start(loaded: LoadedModel, cfg: EngineConfig) -> Result<Engine, EngineError> {
        let model = loaded.model.with_precision(cfg.precision);
        let mcfg = model.config().clone();
        if cfg.block_size == 0 || cfg.max_batch_tokens == 0 || cfg.max_batch_seqs == 0 {
            return Err(EngineError::Config(
                "block_size, max_batch_tokens and max_batch_seqs must be positive".into(),
            ));
        }
        let max_length = cfg
            .max_length
            .unwrap_or(mcfg.seq_length)
            .min(model.max_context());
        if max_length < 2 {
            return Err(EngineError::Config(format!(
                "max_length {max_length} leaves no room to generate"
            )));
        }
        let per_block = KvCache::bytes_per_token(&mcfg, cfg.kv_dtype) * cfg.block_size;
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
                budget.min(cfg.max_batch_seqs * max_length.div_ceil(cfg.block_size))
            }
        };
        if num_blocks == 0 {
            return Err(EngineError::Config("the KV pool has no blocks".into()));
        }
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
        // The worker is built on its thread: the block pool it owns is single-threaded.
        let join = std::thread::Builder::new()
            .name("tandem-engine".into())
            .spawn(move || Worker::new(model, tok, &cfg, num_blocks, rx, st).run())
            .map_err(|e| EngineError::Config(format!("cannot start the engine thread: {e}")))?;
        Ok(Engine {
            tx,
            join: Some(join),
            info,
            tokenizer,
            stats,
        })
    }

    /// Validates and enqueues a request; its events arrive on the returned stream. Dropping the
    /// stream cancels the request and frees its KV at the next step.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: GenerateParams,
    ) -> Result<EventStream, EngineError> {
        let max_new = params.validate(prompt.len(), self.info.max_length)?;
        if let Some(&t) = prompt.iter().find(|&&t| t as usize >= self.info.vocab_size) {
            return Err(ParamError::Invalid {
                name: "prompt",
                why: format!(
                    "token id {t} is outside the vocabulary of {}",
                    self.info.vocab_size
                ),
            }
            .into());
        }
        let capacity = self.info.num_blocks * self.info.block_size;
        if prompt.len() + 1 > capacity {
            return Err(EngineError::KvTooSmall {
                tokens: prompt.len() + 1,
                blocks: self.info.num_blocks,
                block_size: self.info.block_size,
            });
        }
        // A sequence never outgrows the pool, so the oldest one can always finish.
        let max_new = max_new.min(capacity - prompt.len());
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        self.tx
            .send(Command::Generate(Request {
                prompt,
                params,
                max_new,
                events,
            }))
            .map_err(|_| EngineError::Closed)?;
        Ok(rx)
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
