//! Request bodies shared by the routes: prompts given as text or token ids, and stop lists.

use serde::Deserialize;
use tandem_engine::EngineError;

use crate::error::ApiError;
use crate::state::AppState;

/// `prompt`: a string, a list of strings, a token id list, or a list of token id lists.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// One text prompt.
    Text(String),
    /// One prompt as token ids.
    Ids(Vec<u32>),
    /// Several prompts as token ids.
    IdLists(Vec<Vec<u32>>),
    /// Several text prompts.
    Texts(Vec<String>),
}

/// `stop`: one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    /// One stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

impl StopInput {
    /// The stop strings.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopInput::One(s) => vec![s],
            StopInput::Many(v) => v,
        }
    }
}

/// A prompt's token ids, and its text when it was given as text.
pub type Prompt = (Vec<u32>, Option<String>);

/// Prompts as (token ids, text if given as text).
pub fn tokenize(state: &AppState, prompt: PromptInput) -> Result<Vec<Prompt>, ApiError> {
    let tok = state.replicas.tokenizer();
    let texts = match prompt {
        PromptInput::Ids(ids) => return Ok(vec![(ids, None)]),
        PromptInput::IdLists(lists) => return Ok(lists.into_iter().map(|l| (l, None)).collect()),
        PromptInput::Text(t) => vec![t],
        PromptInput::Texts(ts) => ts,
    };
    if texts.is_empty() {
        return Err(ApiError::invalid("prompt is an empty list", Some("prompt")));
    }
    texts
        .into_iter()
        .map(|t| {
            let ids = tok
                .encode(&t, true)
                .map_err(|e| ApiError::from(EngineError::from(e)))?;
            Ok((ids, Some(t)))
        })
        .collect()
}

/// Parses a JSON object body into `T`; malformed JSON, a non-object, or a field outside
/// `allowed` is a 400 naming the problem.
pub fn parse_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    allowed: &[&[&str]],
) -> Result<T, ApiError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}"), None))?;
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::invalid("the request body must be a JSON object", None))?;
    if let Some(k) = obj
        .keys()
        .find(|k| !allowed.iter().any(|set| set.contains(&k.as_str())))
    {
        return Err(ApiError::invalid(format!("unknown option {k:?}"), Some(k)));
    }
    serde_json::from_value(v).map_err(|e| ApiError::invalid(format!("invalid request: {e}"), None))
}
