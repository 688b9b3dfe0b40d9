//! Tandem's model core: `LlamaConfig` (MindFormers' surface), weights from GGUF and HF
//! safetensors kept in their stored formats, the tokenizer and chat template, and the Llama
//! forward over ragged batches with paged KV.

pub mod config;
pub mod error;
pub mod fetch;
pub mod gguf;
pub mod kv_cache;
pub mod loader;
pub mod model;
pub mod safetensors_files;
pub mod shard;
pub mod step;
pub mod tokenizer;
pub mod weights;

pub use config::LlamaConfig;
pub use error::{ConfigError, ModelError};
pub use kv_cache::KvCache;
pub use loader::{load, load_shard, LoadedModel};
pub use model::{LlamaModel, Logits, LogitsMode, SeqInput};
pub use tandem_kernels::ops::argmax;
pub use tandem_kernels::simd::active as simd_level;
pub use tandem_kernels::{default_threads, KvDType, Precision, SimdLevel};
pub use tokenizer::{ChatMessage, IncrementalDecoder, Tokenizer};
