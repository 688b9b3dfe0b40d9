//! Engine flags shared by the commands that start an engine.

use clap::Args;
use tandem_engine::EngineConfig;
use tandem_model::{KvDType, Precision};

/// KV pool and scheduler limits.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Default cap on prompt + generated tokens (default: the model's context).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Tokens per forward pass (the Dynamic SplitFuse budget; lower keeps decodes smoother
    /// while long prompts prefill). Default: --max-batch-seqs plus 32 per compute thread. A
    /// value given applies to every step.
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
    /// Sequences per forward pass (default per compute thread: 16 where the matmuls run on
    /// AMX, 8 on AVX-512 VNNI, else 4; more lengthen every step, fewer leave the rest waiting
    /// for a slot).
    #[arg(long)]
    pub max_batch_seqs: Option<usize>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// KV blocks (default: sized from --kv-memory-fraction).
    #[arg(long)]
    pub num_blocks: Option<usize>,
    /// Fraction of RAM for the KV pool when --num-blocks is not given.
    #[arg(long, default_value_t = 0.1)]
    pub kv_memory_fraction: f64,
    /// KV element type: f16 or f32.
    #[arg(long, default_value = "f16", value_parser = ["f16", "f32"])]
    pub kv_dtype: String,
    /// Use the float reference path (weights dequantized to f32, no activation quantization).
    #[arg(long)]
    pub exact: bool,
}

impl EngineArgs {
    /// The same flags as command-line arguments (to start worker processes).
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            format!("--block-size={}", self.block_size),
            format!("--kv-memory-fraction={}", self.kv_memory_fraction),
            format!("--kv-dtype={}", self.kv_dtype),
        ];
        if let Some(n) = self.max_length {
            v.push(format!("--max-length={n}"));
        }
        if let Some(n) = self.max_batch_tokens {
            v.push(format!("--max-batch-tokens={n}"));
        }
        if let Some(n) = self.max_batch_seqs {
            v.push(format!("--max-batch-seqs={n}"));
        }
        if let Some(n) = self.num_blocks {
            v.push(format!("--num-blocks={n}"));
        }
        if self.exact {
            v.push("--exact".into());
        }
        v
    }

    /// The engine configuration these flags describe.
    pub fn config(&self) -> EngineConfig {
        EngineConfig {
            max_batch_tokens: self.max_batch_tokens,
            max_batch_seqs: self
                .max_batch_seqs
                .unwrap_or_else(tandem_engine::default_max_batch_seqs),
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            kv_memory_fraction: self.kv_memory_fraction,
            kv_dtype: if self.kv_dtype == "f32" {
                KvDType::F32
            } else {
                KvDType::F16
            },
            max_length: self.max_length,
            precision: if self.exact {
                Precision::Exact
            } else {
                Precision::Fast
            },
            ..EngineConfig::default()
        }
    }
}
