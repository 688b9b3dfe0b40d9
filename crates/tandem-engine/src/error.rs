//! The engine's errors.

/// A request's options or prompt are invalid.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamError {
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The prompt leaves no room to generate.
    #[error("the prompt has {prompt_len} tokens but max_length is {max_length}; max_length must exceed the prompt length")]
    PromptTooLong {
        prompt_len: usize,
        max_length: usize,
    },
    /// An option is out of range or of the wrong type.
    #[error("invalid {name}: {why}")]
    Invalid { name: &'static str, why: String },
    /// An option the API does not have.
    #[error("unknown option {0:?}")]
    Unknown(String),
}

impl ParamError {
    /// The option at fault, if one is.
    pub fn param(&self) -> Option<&str> {
        match self {
            ParamError::Invalid { name, .. } => Some(name),
            ParamError::Unknown(name) => Some(name),
            ParamError::EmptyPrompt | ParamError::PromptTooLong { .. } => None,
        }
    }
}

/// Errors from the engine and pipeline.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Invalid request.
    #[error(transparent)]
    Param(#[from] ParamError),
    /// The model failed to load or run.
    #[error(transparent)]
    Model(#[from] tandem_model::ModelError),
    /// The engine thread is gone (destroyed or crashed).
    #[error("the inference engine has been shut down")]
    Closed,
    /// The KV pool cannot hold even one request of this size.
    #[error("the KV pool ({blocks} blocks of {block_size} tokens) cannot hold a {tokens}-token sequence")]
    KvTooSmall {
        tokens: usize,
        blocks: usize,
        block_size: usize,
    },
    /// Not enough free KV blocks for a reservation right now.
    #[error("{wanted} KV blocks wanted, {free} free")]
    NoFreeBlocks { wanted: usize, free: usize },
    /// A KV handoff could not complete.
    #[error("KV handoff failed: {0}")]
    Handoff(String),
    /// The deployment cannot take requests right now (its workers are down); try again.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The caller cancelled the call; its requests were aborted.
    #[error("cancelled")]
    Cancelled,
    /// Engine configuration is invalid.
    #[error("invalid engine configuration: {0}")]
    Config(String),
}
