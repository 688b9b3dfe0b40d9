//! Generation options: MII's `GenerateParamsConfig` with MII's defaults, plus what the
//! OpenAI API and vLLM add (`repetition_penalty`, `seed`, top-n `logprobs`, presence and
//! frequency penalties, `logit_bias`, `stop_token_ids`, constrained output, prompt
//! log-probabilities). Invalid values are typed errors.

use crate::error::ParamError;
use crate::grammar::Grammar;

/// Per-request generation options.
///
/// Where MII has a quirk this follows the documented intent and says so:
/// `min_new_tokens` counts generated tokens (MII compares the whole sequence length), and `stop`
/// strings are matched on text, may span several tokens, and add to EOS rather than replace it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenerateParams {
    /// Cap on prompt + generated tokens; `None` means the engine's `max_length`. Must exceed the
    /// prompt length.
    pub max_length: Option<usize>,
    /// Cap on generated tokens; `None` means `max_length - prompt_length`.
    pub max_new_tokens: Option<usize>,
    /// EOS is suppressed until this many tokens were generated.
    pub min_new_tokens: usize,
    /// Never stop on EOS.
    pub ignore_eos: bool,
    /// Nucleus mass kept, in (0, 1] (MII's default 0.9).
    pub top_p: f32,
    /// Keep only the k most likely tokens.
    pub top_k: Option<usize>,
    /// Divides the logits (applied after top-k/top-p, in MII's order).
    pub temperature: Option<f32>,
    /// Sample (true, MII's default) or take the most likely token.
    pub do_sample: bool,
    /// Prefix the prompt's text to `generated_text`.
    pub return_full_text: bool,
    /// Stop strings (any length); the text stops before the first match.
    pub stop: Vec<String>,
    /// CTRL-style penalty on tokens already in the sequence (1.0 = off).
    pub repetition_penalty: f32,
    /// Seed for reproducible sampling; `None` draws one.
    pub seed: Option<u64>,
    /// Also return the log-probabilities of this many most likely tokens per step (0..=20).
    pub logprobs: Option<usize>,
    /// OpenAI's presence penalty, in [-2, 2]: subtracted once from the logit of every token
    /// already generated.
    #[serde(default)]
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty, in [-2, 2]: subtracted from a token's logit once per time
    /// it was generated.
    #[serde(default)]
    pub frequency_penalty: f32,
    /// Added to these tokens' logits before sampling (OpenAI's `logit_bias`, in [-100, 100]).
    #[serde(default)]
    pub logit_bias: Vec<(u32, f32)>,
    /// Generation stops at any of these tokens, which are not part of the text (vLLM).
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    /// The output must match this grammar.
    #[serde(default)]
    pub grammar: Option<Grammar>,
    /// Also return each prompt token's log-probability and this many alternatives (the first
    /// token has none). With it, `max_new_tokens` may be 0: the prompt is only scored.
    #[serde(default)]
    pub prompt_logprobs: Option<usize>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_length: None,
            max_new_tokens: None,
            min_new_tokens: 0,
            ignore_eos: false,
            top_p: 0.9,
            top_k: None,
            temperature: None,
            do_sample: true,
            return_full_text: false,
            stop: Vec::new(),
            repetition_penalty: 1.0,
            seed: None,
            logprobs: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            stop_token_ids: Vec::new(),
            grammar: None,
            prompt_logprobs: None,
        }
    }
}

/// Most top-n log-probabilities a request may ask for.
pub const MAX_LOGPROBS: usize = 20;

impl GenerateParams {
    /// Greedy decoding with otherwise default options.
    pub fn greedy() -> Self {
        GenerateParams {
            do_sample: false,
            ..Default::default()
        }
    }

    /// Checks the options against a prompt and the engine's limits; returns how many tokens
    /// the request may generate.
    pub fn validate(
        &self,
        prompt_len: usize,
        engine_max_length: usize,
    ) -> Result<usize, ParamError> {
        if prompt_len == 0 {
            return Err(ParamError::EmptyPrompt);
        }
        let max_length = self.max_length.unwrap_or(engine_max_length);
        if max_length > engine_max_length {
            return Err(ParamError::Invalid {
                name: "max_length",
                why: format!("{max_length} exceeds the engine's max_length {engine_max_length}"),
            });
        }
        if prompt_len >= max_length {
            return Err(ParamError::PromptTooLong {
                prompt_len,
                max_length,
            });
        }
        if self.max_new_tokens == Some(0) && self.prompt_logprobs.is_none() {
            return Err(ParamError::Invalid {
                name: "max_new_tokens",
                why: "must be at least 1 (0 only when scoring the prompt)".into(),
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ParamError::Invalid {
                name: "top_p",
                why: format!("{} is outside (0, 1]", self.top_p),
            });
        }
        if self.top_k == Some(0) {
            return Err(ParamError::Invalid {
                name: "top_k",
                why: "must be at least 1".into(),
            });
        }
        if let Some(t) = self.temperature {
            if !(t > 0.0 && t.is_finite()) {
                return Err(ParamError::Invalid {
                    name: "temperature",
                    why: format!("{t} is not a number above 0"),
                });
            }
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(ParamError::Invalid {
                name: "repetition_penalty",
                why: format!("{} is not a number above 0", self.repetition_penalty),
            });
        }
        for (name, n) in [
            ("logprobs", self.logprobs),
            ("prompt_logprobs", self.prompt_logprobs),
        ] {
            if n.is_some_and(|n| n > MAX_LOGPROBS) {
                return Err(ParamError::Invalid {
                    name,
                    why: format!("at most {MAX_LOGPROBS}"),
                });
            }
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(ParamError::Invalid {
                    name,
                    why: format!("{v} is outside [-2, 2]"),
                });
            }
        }
        if let Some((t, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return Err(ParamError::Invalid {
                name: "logit_bias",
                why: format!("the bias {b} of token {t} is outside [-100, 100]"),
            });
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(ParamError::Invalid {
                name: "stop",
                why: "stop strings must not be empty".into(),
            });
        }
        let room = max_length - prompt_len;
        Ok(self.max_new_tokens.map_or(room, |n| n.min(room)))
    }
}
