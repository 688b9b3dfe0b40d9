//! The model core's errors. Each names the file (when there is one) and the problem.

use std::path::PathBuf;

/// Errors from `LlamaConfig` construction and validation.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A size that must be positive is zero.
    #[error("config field `{0}` must be greater than zero")]
    Zero(&'static str),
    /// `hidden_size` is not a multiple of `num_heads`.
    #[error("hidden_size {hidden} is not divisible by num_heads {heads}")]
    HeadsDoNotDivideHidden { hidden: usize, heads: usize },
    /// `num_heads` is not a multiple of `n_kv_heads`.
    #[error("num_heads {heads} is not divisible by n_kv_heads {kv}")]
    KvHeadsDoNotDivideHeads { heads: usize, kv: usize },
    /// RoPE needs an even head dimension.
    #[error("head dimension {0} must be even for RoPE")]
    OddHeadDim(usize),
    /// A dtype string outside float16 / bfloat16 / float32.
    #[error("config field `{field}` has unsupported dtype {value:?} (expected \"float16\", \"bfloat16\" or \"float32\")")]
    BadDtype { field: &'static str, value: String },
    /// A value out of its valid range.
    #[error("config field `{field}` = {value}: {why}")]
    OutOfRange {
        field: &'static str,
        value: String,
        why: &'static str,
    },
    /// `extend_method` and `scaling_factor` do not fit together.
    #[error("extend_method {method}: {why}")]
    BadRopeScaling { method: String, why: String },
    /// A setting Tandem's Llama does not implement.
    #[error("unsupported model setting: {0}")]
    Unsupported(String),
    /// A required key is missing from a config source.
    #[error("missing config key `{0}`")]
    Missing(String),
    /// A key has the wrong type or an unparsable value.
    #[error("config key `{key}`: {why}")]
    BadValue { key: String, why: String },
    /// The document could not be parsed at all.
    #[error("cannot parse {format} config: {why}")]
    Parse { format: &'static str, why: String },
}

/// Errors from loading a model (files, formats, shapes) or running it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not a valid GGUF file.
    #[error("{path}: invalid GGUF: {why}")]
    Gguf { path: PathBuf, why: String },
    /// The file is not a valid safetensors file.
    #[error("{path}: invalid safetensors: {why}")]
    Safetensors { path: PathBuf, why: String },
    /// A tensor's storage type is not supported.
    #[error("{path}: tensor `{tensor}` has unsupported type {ty}")]
    UnsupportedTensorType {
        path: PathBuf,
        tensor: String,
        ty: String,
    },
    /// A tensor the architecture needs is absent.
    #[error("{path}: missing tensor `{tensor}`")]
    MissingTensor { path: PathBuf, tensor: String },
    /// A tensor has the wrong shape for the config.
    #[error("{path}: tensor `{tensor}` has shape {actual:?}, config implies {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    /// The model's config is invalid or inconsistent.
    /// (`error` is part of the message, not a `source`, so that error chains print it once.)
    #[error("{path}: {error}")]
    Config { path: PathBuf, error: ConfigError },
    /// The tokenizer could not be built or used.
    #[error("{path}: tokenizer: {why}")]
    Tokenizer { path: PathBuf, why: String },
    /// No model could be recognized at the path.
    #[error("{path}: not a model: {why}")]
    NotAModel { path: PathBuf, why: String },
    /// A forward call's inputs are inconsistent.
    #[error("invalid batch: {0}")]
    Batch(String),
    /// A sequence would exceed the model's context.
    #[error("sequence of {len} tokens exceeds the model's context of {max}")]
    ContextOverflow { len: usize, max: usize },
    /// The chat template failed to render.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// The tensor-parallel group failed (a rank died or the group was stopped); the model
    /// cannot run again.
    #[error(transparent)]
    Collective(#[from] tandem_collective::CollectiveError),
}

impl ModelError {
    /// Whether the model is unusable from now on (its tensor-parallel group is broken).
    pub fn is_fatal(&self) -> bool {
        matches!(self, ModelError::Collective(_))
    }
}

/// Shorthand for the model core's results.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
