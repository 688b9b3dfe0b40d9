//! Prefill/decode disaggregation: worker processes that each own an engine and a registered
//! KV pool, and the router in front of them.
//!
//! A request goes to a prefill worker (role Prompt), which computes the prompt's KV and first
//! token and holds the blocks; then to a decode worker (role Decoder), which reserves blocks,
//! pulls the prompt's blocks with llm-datadist's `pull_blocks` (block ids only in the request),
//! and decodes and streams. The router releases the producer's blocks once the consumer has
//! them, or when the request is aborted. Short prompts may prefill on the decode worker
//! (conditional disaggregation). Workers may live on other hosts, registered in etcd
//! ([`discovery`]).

pub mod discovery;
pub mod rank_kv;
pub mod router;
pub mod wire;
pub mod worker;
