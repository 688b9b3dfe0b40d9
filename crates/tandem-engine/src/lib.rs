//! Tandem's engine: paged KV blocks with prefix reuse, continuous batching with Dynamic
//! SplitFuse, sampling with MII's options, streaming, and the in-process pipeline API.
//!
//! The engine loop runs on its own thread and owns the model, the KV pool and every sequence;
//! callers talk to it through [`Engine`] (submit, stats) and per-request event streams.

pub mod block_pool;
mod engine;
mod error;
pub mod grammar;
mod handoff;
pub mod mii_options;
pub mod params;
mod pipeline;
mod request;
pub mod sampler;
pub mod scheduler;
mod sequence;
pub mod stop;
mod worker;

pub use engine::{default_max_batch_seqs, Engine, EngineConfig, EngineInfo, EngineStats};
pub use error::{EngineError, ParamError};
pub use grammar::{Constraint, Grammar, GrammarCompiler};
pub use handoff::{HeldKv, KvRegion, Reservation};
pub use params::GenerateParams;
pub use pipeline::{Pipeline, Response};
pub use request::{Event, EventStream, FinishReason, Usage};
pub use sampler::{argmax, TokenLogprobs};
