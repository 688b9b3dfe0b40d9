//! OpenAI-compatible routes: `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions`, with SSE streaming ending in `data: [DONE]`.
//!
//! Sampling follows OpenAI's defaults (temperature 1, top_p 1; temperature 0 is greedy), with
//! the extensions vLLM and llama.cpp users rely on: `ignore_eos`, `top_k`, `min_tokens`,
//! `repetition_penalty`, and prompts as token id lists.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tandem_engine::{Event, FinishReason, GenerateParams};
use tandem_model::ChatMessage;

use crate::error::ApiError;
use crate::metrics::Metered;
use crate::params::{parse_body, tokenize, Prompt, PromptInput, StopInput};
use crate::state::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Fields of [`Sampling`], accepted by both routes.
const SAMPLING_FIELDS: &[&str] = &[
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "user",
    "ignore_eos",
    "top_k",
    "min_tokens",
    "repetition_penalty",
];

/// `POST /v1/completions` body.
#[derive(Debug, Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    model: Option<String>,
    prompt: PromptInput,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    echo: bool,
    #[serde(default)]
    logprobs: Option<usize>,
    #[serde(flatten)]
    common: Sampling,
}

/// One chat message in a request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatMessageIn {
    role: String,
    content: String,
    #[serde(default)]
    name: Option<String>,
}

/// `POST /v1/chat/completions` body.
#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<ChatMessageIn>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    logprobs: bool,
    #[serde(default)]
    top_logprobs: Option<usize>,
    #[serde(flatten)]
    common: Sampling,
}

/// Options shared by both routes.
#[derive(Debug, Deserialize, Default)]
struct Sampling {
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    n: Option<usize>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    stop: Option<StopInput>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    ignore_eos: bool,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    min_tokens: usize,
    #[serde(default)]
    repetition_penalty: Option<f32>,
}

impl Sampling {
    fn params(
        self,
        max_tokens: Option<usize>,
        logprobs: Option<usize>,
    ) -> Result<GenerateParams, ApiError> {
        if self.n.unwrap_or(1) != 1 {
            return Err(ApiError::invalid("only n = 1 is supported", Some("n")));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid(
                    format!("{name} is not supported (use repetition_penalty)"),
                    Some(name),
                ));
            }
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(temperature >= 0.0 && temperature.is_finite()) {
            return Err(ApiError::invalid(
                "temperature must be a number >= 0",
                Some("temperature"),
            ));
        }
        let _ = self.user;
        Ok(GenerateParams {
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
        })
    }
}

fn finish_str(f: &FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Abort | FinishReason::Error(_) => "abort",
    }
}

fn check_model(state: &AppState, model: &Option<String>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != &state.model_name && m != &state.deployment_name => {
            Err(ApiError::not_found(format!(
                "model {m:?} is not served here (this server has {:?})",
                state.model_name
            )))
        }
        _ => Ok(()),
    }
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand_id())
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ N.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
}

/// `GET /v1/models`.
pub async fn models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{ "id": state.model_name, "object": "model", "created": state.created, "owned_by": "tandem" }]
    }))
}

/// A submitted prompt's stream and what the response needs to know about it.
struct Submitted {
    stream: Metered,
    prompt_tokens: usize,
    echo: Option<String>,
}

fn submit_all(
    state: &AppState,
    prompts: Vec<Prompt>,
    params: &GenerateParams,
    echo: bool,
) -> Result<Vec<Submitted>, ApiError> {
    let max_length = state.replicas.info().max_length;
    for (ids, _) in &prompts {
        params
            .validate(ids.len(), max_length)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?;
    }
    prompts
        .into_iter()
        .map(|(ids, text)| {
            let echo = if echo {
                Some(match text {
                    Some(t) => t,
                    None => state
                        .replicas
                        .tokenizer()
                        .decode(&ids, false)
                        .unwrap_or_default(),
                })
            } else {
                None
            };
            let prompt_tokens = ids.len();
            let stream = state.submit(ids, params.clone())?;
            Ok(Submitted {
                stream,
                prompt_tokens,
                echo,
            })
        })
        .collect()
}

/// Everything a finished request produced.
struct Collected {
    text: String,
    tokens: usize,
    finish: FinishReason,
    logprobs: Vec<Value>,
}

async fn collect(mut s: Metered, tok: &tandem_model::Tokenizer) -> Collected {
    let mut c = Collected {
        text: String::new(),
        tokens: 0,
        finish: FinishReason::Abort,
        logprobs: vec![],
    };
    while let Some(ev) = s.recv().await {
        c.text.push_str(&ev.text);
        if let Some(t) = ev.token {
            c.tokens += 1;
            if let Some(lp) = ev.logprobs {
                c.logprobs.push(logprob_json(tok, t, &lp));
            }
        }
        if let Some(f) = ev.finish {
            c.finish = f;
            break;
        }
    }
    c
}

fn logprob_json(
    tok: &tandem_model::Tokenizer,
    token: u32,
    lp: &tandem_engine::TokenLogprobs,
) -> Value {
    let text = |id: u32| tok.decode(&[id], false).unwrap_or_default();
    json!({
        "token": text(token),
        "token_id": token,
        "logprob": lp.logprob,
        "top_logprobs": lp.top.iter().map(|(id, l)| json!({"token": text(*id), "token_id": id, "logprob": l})).collect::<Vec<_>>(),
    })
}

/// `POST /v1/completions`.
pub async fn completions(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(
        &body,
        &[
            &["model", "prompt", "max_tokens", "echo", "logprobs"],
            SAMPLING_FIELDS,
        ],
    )?;
    check_model(&state, &req.model)?;
    let stream = req.common.stream;
    let include_usage = req
        .common
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let params = req
        .common
        .params(Some(req.max_tokens.unwrap_or(16)), req.logprobs)?;
    let prompts = tokenize(&state, req.prompt)?;
    let subs = submit_all(&state, prompts, &params, req.echo)?;
    let id = request_id("cmpl");
    if stream {
        return Ok(sse(state, id, "text_completion", subs, include_usage, false).into_response());
    }
    let tok = state.replicas.tokenizer().clone();
    let (mut choices, mut prompt_tokens, mut completion_tokens) = (vec![], 0, 0);
    for (i, s) in subs.into_iter().enumerate() {
        let c = collect(s.stream, &tok).await;
        prompt_tokens += s.prompt_tokens;
        completion_tokens += c.tokens;
        let text = format!("{}{}", s.echo.unwrap_or_default(), c.text);
        let logprobs = params.logprobs.map(|_| json!({ "content": c.logprobs }));
        choices.push(json!({ "index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_str(&c.finish) }));
    }
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": state.created, "model": state.model_name,
        "choices": choices,
        "usage": { "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens }
    }))
    .into_response())
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_body(
        &body,
        &[
            &[
                "model",
                "messages",
                "max_tokens",
                "max_completion_tokens",
                "logprobs",
                "top_logprobs",
            ],
            SAMPLING_FIELDS,
        ],
    )?;
    check_model(&state, &req.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    let stream = req.common.stream;
    let include_usage = req
        .common
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let logprobs = if req.logprobs {
        Some(req.top_logprobs.unwrap_or(0))
    } else {
        None
    };
    let params = req
        .common
        .params(req.max_completion_tokens.or(req.max_tokens), logprobs)?;
    let tok = state.replicas.tokenizer().clone();
    let messages: Vec<ChatMessage> = req
        .messages
        .into_iter()
        .map(|m| {
            let _ = m.name;
            ChatMessage::new(m.role, m.content)
        })
        .collect();
    let text = tok
        .apply_chat_template(&messages, true)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    let ids = tok
        .encode(&text, false)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    let subs = submit_all(&state, vec![(ids, None)], &params, false)?;
    let id = request_id("chatcmpl");
    if stream {
        return Ok(sse(
            state,
            id,
            "chat.completion.chunk",
            subs,
            include_usage,
            true,
        )
        .into_response());
    }
    let s = subs.into_iter().next().expect("one prompt");
    let c = collect(s.stream, &tok).await;
    let logprobs = params.logprobs.map(|_| json!({ "content": c.logprobs }));
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": state.created, "model": state.model_name,
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": c.text }, "logprobs": logprobs, "finish_reason": finish_str(&c.finish) }],
        "usage": { "prompt_tokens": s.prompt_tokens, "completion_tokens": c.tokens, "total_tokens": s.prompt_tokens + c.tokens }
    }))
    .into_response())
}

/// Streams every prompt's events as SSE chunks (interleaved as they come), then the usage
/// chunk if asked for, then `[DONE]`. Dropping the response (client gone) drops the engine
/// streams, which cancels the requests.
fn sse(
    state: AppState,
    id: String,
    object: &'static str,
    subs: Vec<Submitted>,
    include_usage: bool,
    chat: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let prompt_tokens: usize = subs.iter().map(|s| s.prompt_tokens).sum();
    let (model, created) = (state.model_name.clone(), state.created);
    let chunk = move |index: usize, ev: Option<&Event>, first: bool| -> Value {
        let finish = ev.and_then(|e| e.finish.as_ref()).map(finish_str);
        let text = ev.map(|e| e.text.clone()).unwrap_or_default();
        let choice = if chat {
            let delta = if first {
                json!({"role": "assistant", "content": text})
            } else {
                json!({"content": text})
            };
            json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish})
        } else {
            json!({"index": index, "text": text, "logprobs": null, "finish_reason": finish})
        };
        json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
    };
    let per_prompt = subs.into_iter().enumerate().map(|(i, s)| {
        let echo = s.echo.clone();
        let mut first = true;
        s.stream.into_stream().boxed().map(move |ev| {
            let mut ev = ev;
            if first {
                if let Some(e) = &echo {
                    ev.text = format!("{e}{}", ev.text);
                }
            }
            let was_first = std::mem::replace(&mut first, false);
            (i, ev, was_first)
        })
    });
    let merged = stream::select_all(per_prompt);
    let completion_tokens = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = completion_tokens.clone();
    let body = merged.map(move |(i, ev, first)| {
        if ev.token.is_some() {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(SseEvent::default().data(chunk(i, Some(&ev), first).to_string()))
    });
    let (model, created, id2) = (state.model_name.clone(), state.created, request_id("usage"));
    let tail = stream::once(async move {
        let n = completion_tokens.load(std::sync::atomic::Ordering::Relaxed);
        include_usage.then(|| {
            let usage = json!({"id": id2, "object": object, "created": created, "model": model, "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}});
            Ok(SseEvent::default().data(usage.to_string()))
        })
    })
    .filter_map(|x| async move { x })
    .chain(stream::once(async { Ok(SseEvent::default().data("[DONE]")) }));
    Sse::new(body.chain(tail))
}
