//! What goes into the engine and what streams out of it.

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::params::GenerateParams;
use crate::sampler::TokenLogprobs;

/// Why a request ended.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// `max_length` / `max_new_tokens` reached.
    Length,
    /// Cancelled (its stream was dropped) or the engine shut down.
    Abort,
    /// The forward pass failed for this batch.
    Error(String),
}

impl FinishReason {
    /// MII's spelling (`stop`, `length`), plus `abort` / `error`.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
            FinishReason::Error(_) => "error",
        }
    }
}

/// One streamed step of a request.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    /// The generated token, if this step produced one that is part of the output.
    pub token: Option<u32>,
    /// Text completed by this step (never a partial UTF-8 character or a partial stop string).
    pub text: String,
    /// Log-probabilities of the token, if asked for.
    pub logprobs: Option<TokenLogprobs>,
    /// Set on the last event of the request.
    pub finish: Option<FinishReason>,
    /// Time to first token and other timing, filled on the last event.
    pub usage: Option<Usage>,
    /// With `prompt_logprobs`, on the first event: each prompt token's log-probability and
    /// alternatives (None for the first token, which has no context).
    #[serde(default)]
    pub prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
}

/// Token counts of a finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub generated_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// A request as the engine receives it (already tokenized and validated).
#[derive(Debug)]
pub struct Request {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Options.
    pub params: GenerateParams,
    /// Tokens it may generate (from validation).
    pub max_new: usize,
    /// Where its events go; dropping the receiver cancels the request.
    pub events: UnboundedSender<Event>,
    /// Prefill-only requests: keep the prompt's KV after finishing and say where it is.
    pub hold: Option<tokio::sync::oneshot::Sender<crate::handoff::HeldKv>>,
    /// The compiled grammar of `params.grammar`.
    pub constraint: Option<crate::grammar::Constraint>,
}

/// The receiving end of a request's events.
pub type EventStream = UnboundedReceiver<Event>;
