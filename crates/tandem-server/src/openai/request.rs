//! The OpenAI request bodies and their translation into engine options: sampling (OpenAI's
//! defaults: temperature 1, top_p 1, temperature 0 is greedy), penalties, `logit_bias`, `n`,
//! structured output (`response_format` and vLLM's `guided_*`), and vLLM's and llama.cpp's
//! extensions (`ignore_eos`, `top_k`, `min_tokens`, `repetition_penalty`, `stop_token_ids`).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use tandem_engine::{GenerateParams, Grammar};

use crate::error::ApiError;
use crate::params::{PromptInput, StopInput};

/// Most choices one request may ask for.
pub(crate) const MAX_N: usize = 16;

/// Fields of [`Sampling`], accepted by both routes.
pub(crate) const SAMPLING_FIELDS: &[&str] = &[
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "ignore_eos",
    "top_k",
    "min_tokens",
    "repetition_penalty",
    "stop_token_ids",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `response_format`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaSpec },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonSchemaSpec {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    schema: Option<Value>,
    #[serde(default)]
    strict: Option<bool>,
}

/// `POST /v1/completions` body.
#[derive(Debug, Deserialize)]
pub(crate) struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: PromptInput,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub echo: bool,
    #[serde(default)]
    pub logprobs: Option<usize>,
    #[serde(flatten)]
    pub common: Sampling,
}

/// Fields of [`CompletionRequest`] besides the sampling ones.
pub(crate) const COMPLETION_FIELDS: &[&str] =
    &["model", "prompt", "max_tokens", "echo", "logprobs"];

/// A message's `content`: text, a list of content parts, or absent (an assistant message
/// that only calls tools).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One content part; only text parts exist for a text-only model.
#[derive(Debug, Deserialize)]
pub(crate) struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

impl Content {
    /// The text, parts joined; other part kinds are refused.
    pub fn text(self) -> Result<String, ApiError> {
        match self {
            Content::Text(t) => Ok(t),
            Content::Parts(parts) => parts
                .into_iter()
                .map(|p| match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => Ok(t),
                    ("text", None) => Err(ApiError::invalid(
                        "a text content part needs \"text\"",
                        Some("messages"),
                    )),
                    (other, _) => Err(ApiError::invalid(
                        format!("content parts of type {other:?} are not supported (this model reads text)"),
                        Some("messages"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.concat()),
        }
    }
}

/// A tool call in an assistant message of the history.
#[derive(Debug, Deserialize)]
pub(crate) struct ToolCallIn {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub function: FunctionCallIn,
}

#[derive(Debug, Deserialize)]
pub(crate) struct FunctionCallIn {
    pub name: String,
    pub arguments: String,
}

/// One chat message in a request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChatMessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCallIn>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// `POST /v1/chat/completions` body.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<ChatMessageIn>,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub logprobs: bool,
    #[serde(default)]
    pub top_logprobs: Option<usize>,
    #[serde(default)]
    pub tools: Option<Value>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    pub common: Sampling,
}

/// Fields of [`ChatRequest`] besides the sampling ones.
pub(crate) const CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
];

/// Options shared by both routes.
#[derive(Debug, Deserialize, Default)]
pub(crate) struct Sampling {
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub stop: Option<StopInput>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub logit_bias: Option<BTreeMap<String, f32>>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub min_tokens: usize,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub stop_token_ids: Option<Vec<u32>>,
    #[serde(default)]
    response_format: Option<ResponseFormat>,
    #[serde(default)]
    guided_json: Option<Value>,
    #[serde(default)]
    guided_regex: Option<String>,
    #[serde(default)]
    guided_choice: Option<Vec<String>>,
    #[serde(default)]
    guided_grammar: Option<String>,
}

impl Sampling {
    /// Whether SSE was asked for, and the usage chunk with it.
    pub fn streaming(&self) -> (bool, bool) {
        let usage = self
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        (self.stream, usage)
    }

    /// The grammar the output must match, from at most one of `response_format` and vLLM's
    /// `guided_*` options, with the field it came from.
    fn grammar(&mut self) -> Result<Option<(&'static str, Grammar)>, ApiError> {
        let mut found: Vec<(&'static str, Grammar)> = Vec::new();
        match self.response_format.take() {
            None | Some(ResponseFormat::Text) => {}
            Some(ResponseFormat::JsonObject) => {
                found.push(("response_format", Grammar::JsonObject))
            }
            Some(ResponseFormat::JsonSchema { json_schema }) => {
                let _ = (
                    json_schema.name,
                    json_schema.description,
                    json_schema.strict,
                );
                let schema = json_schema.schema.unwrap_or_else(|| serde_json::json!({}));
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(ApiError::invalid(
                        "response_format.json_schema.schema must be a JSON schema object",
                        Some("response_format"),
                    ));
                }
                found.push(("response_format", Grammar::JsonSchema(schema)));
            }
        }
        if let Some(s) = self.guided_json.take() {
            // vLLM takes the schema as an object or as its JSON text.
            let schema = match s {
                Value::String(text) => serde_json::from_str(&text).map_err(|e| {
                    ApiError::invalid(format!("guided_json is not JSON: {e}"), Some("guided_json"))
                })?,
                v => v,
            };
            found.push(("guided_json", Grammar::JsonSchema(schema)));
        }
        if let Some(rx) = self.guided_regex.take() {
            found.push(("guided_regex", Grammar::Regex(rx)));
        }
        if let Some(c) = self.guided_choice.take() {
            if c.is_empty() {
                return Err(ApiError::invalid(
                    "guided_choice must not be empty",
                    Some("guided_choice"),
                ));
            }
            found.push(("guided_choice", Grammar::Choice(c)));
        }
        if let Some(g) = self.guided_grammar.take() {
            found.push(("guided_grammar", Grammar::Lark(g)));
        }
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop()),
            _ => Err(ApiError::invalid(
                format!(
                    "give at most one of {}",
                    found.iter().map(|f| f.0).collect::<Vec<_>>().join(", ")
                ),
                Some(found[1].0),
            )),
        }
    }

    /// The engine options, the number of choices, and the field that set a grammar.
    pub fn params(
        mut self,
        max_tokens: Option<usize>,
        logprobs: Option<usize>,
    ) -> Result<Options, ApiError> {
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(ApiError::invalid(
                format!("n must be in [1, {MAX_N}]"),
                Some("n"),
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(temperature >= 0.0 && temperature.is_finite()) {
            return Err(ApiError::invalid(
                "temperature must be a number >= 0",
                Some("temperature"),
            ));
        }
        let logit_bias = self
            .logit_bias
            .take()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| {
                k.trim().parse::<u32>().map(|t| (t, v)).map_err(|_| {
                    ApiError::invalid(
                        format!("logit_bias keys are token ids, got {k:?}"),
                        Some("logit_bias"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (grammar_field, grammar) = match self.grammar()? {
            Some((field, g)) => (Some(field), Some(g)),
            None => (None, None),
        };
        let _ = self.user;
        Ok(Options {
            params: GenerateParams {
                max_length: None,
                max_new_tokens: max_tokens,
                min_new_tokens: self.min_tokens,
                ignore_eos: self.ignore_eos,
                top_p: self.top_p.unwrap_or(1.0),
                top_k: self.top_k,
                temperature: (temperature > 0.0).then_some(temperature),
                do_sample: temperature > 0.0,
                return_full_text: false,
                stop: self.stop.map(StopInput::into_vec).unwrap_or_default(),
                repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
                seed: self.seed,
                logprobs,
                presence_penalty: self.presence_penalty.unwrap_or(0.0),
                frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
                logit_bias,
                stop_token_ids: self.stop_token_ids.unwrap_or_default(),
                grammar,
                prompt_logprobs: None,
            },
            n,
            grammar_field,
        })
    }
}

/// A request's options for the engine.
pub(crate) struct Options {
    pub params: GenerateParams,
    /// Choices per prompt.
    pub n: usize,
    /// The request field a grammar came from (named in errors about it).
    pub grammar_field: Option<&'static str>,
}
