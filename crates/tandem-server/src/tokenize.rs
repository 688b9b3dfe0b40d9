//! `POST /tokenize` and `POST /detokenize`, in the shapes vLLM and llama.cpp clients send:
//! text as `prompt` (vLLM) or `content` (llama.cpp), or chat `messages` rendered through the
//! chat template; the answer has vLLM's `tokens`, `count` and `max_model_len` (llama.cpp reads
//! `tokens`), and detokenizing answers both `prompt` and `content`.

use axum::body::Bytes;
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tandem_model::ChatMessage;

use crate::error::ApiError;
use crate::params::parse_body;
use crate::state::AppState;

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(Deserialize)]
struct TokenizeRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    add_generation_prompt: Option<bool>,
    /// vLLM's name (default true).
    #[serde(default)]
    add_special_tokens: Option<bool>,
    /// llama.cpp's name (default false).
    #[serde(default)]
    add_special: Option<bool>,
    /// llama.cpp: answer `{id, piece}` pairs.
    #[serde(default)]
    with_pieces: bool,
}

/// `POST /tokenize`.
pub async fn tokenize(State(state): State<AppState>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req: TokenizeRequest = parse_body(
        &body,
        &[&[
            "model",
            "prompt",
            "content",
            "messages",
            "add_generation_prompt",
            "add_special_tokens",
            "add_special",
            "with_pieces",
        ]],
    )?;
    let _ = req.model;
    let tok = state.replicas.tokenizer();
    let ids = match (req.prompt.or(req.content), req.messages) {
        (Some(text), None) => {
            let special = req
                .add_special_tokens
                .or(req.add_special)
                .unwrap_or(req.add_special.is_none());
            tok.encode(&text, special)
        }
        (None, Some(messages)) => {
            let messages: Vec<ChatMessage> = messages
                .into_iter()
                .map(|m| ChatMessage::new(m.role, m.content))
                .collect();
            let text = tok
                .apply_chat_template(&messages, req.add_generation_prompt.unwrap_or(true))
                .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
            tok.encode(&text, false)
        }
        _ => {
            return Err(ApiError::invalid(
                "give one of prompt, content or messages",
                Some("prompt"),
            ))
        }
    }
    .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?;
    let tokens: Vec<Value> = if req.with_pieces {
        ids.iter()
            .map(|&id| json!({"id": id, "piece": tok.decode(&[id], false).unwrap_or_default()}))
            .collect()
    } else {
        ids.iter().map(|&id| json!(id)).collect()
    };
    Ok(Json(json!({
        "tokens": tokens,
        "count": ids.len(),
        "max_model_len": state.replicas.info().max_length,
    })))
}

#[derive(Deserialize)]
struct DetokenizeRequest {
    #[serde(default)]
    model: Option<String>,
    tokens: Vec<u32>,
}

/// `POST /detokenize`.
pub async fn detokenize(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: DetokenizeRequest = parse_body(&body, &[&["model", "tokens"]])?;
    let _ = req.model;
    let info = state.replicas.info();
    if let Some(t) = req.tokens.iter().find(|&&t| t as usize >= info.vocab_size) {
        return Err(ApiError::invalid(
            format!(
                "token id {t} is outside the vocabulary of {}",
                info.vocab_size
            ),
            Some("tokens"),
        ));
    }
    let text = state
        .replicas
        .tokenizer()
        .decode(&req.tokens, false)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("tokens")))?;
    Ok(Json(json!({ "prompt": text, "content": text })))
}
