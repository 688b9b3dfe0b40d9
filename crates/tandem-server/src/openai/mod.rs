//! OpenAI-compatible routes: `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions`, with SSE streaming ending in `data: [DONE]`; structured output,
//! tool calling, `n` choices, penalties and `logit_bias` (see [`request`] and [`tools`]);
//! log-probabilities in each route's own shape ([`logprobs`]).

mod logprobs;
mod request;
mod stream;
mod tools;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tandem_engine::{Event, FinishReason, GenerateParams, TokenLogprobs};
use tandem_model::ChatMessage;

use crate::error::ApiError;
use crate::metrics::Metered;
use crate::params::{parse_body, tokenize, Prompt};
use crate::state::AppState;
use logprobs::{chat_entry, CompletionLogprobs};
use request::{
    ChatMessageIn, ChatRequest, CompletionRequest, CHAT_FIELDS, COMPLETION_FIELDS, SAMPLING_FIELDS,
};
use tools::Tools;

/// OpenAI's finish reason (failures never reach a response: they are errors).
fn finish_str(f: &FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Abort | FinishReason::Error(_) => "length",
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

pub(crate) fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = t ^ N.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    // splitmix64: consecutive ids look unrelated.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// `GET /v1/models`.
pub async fn models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{ "id": state.model_name, "object": "model", "created": state.created, "owned_by": "tandem" }]
    }))
}

/// One choice being generated.
pub(crate) struct Choice {
    pub index: usize,
    pub stream: Metered,
    /// Which prompt it answers (prompts are counted once in `usage`).
    pub prompt_index: usize,
    pub prompt: Vec<u32>,
    /// The prompt's text, prefixed to the output with `echo`.
    pub echo: Option<String>,
}

/// Names the request field behind a grammar error (the engine knows only "grammar").
fn grammar_param(mut e: ApiError, field: Option<&'static str>) -> ApiError {
    if e.param.as_deref() == Some("grammar") {
        e.param = Some(field.unwrap_or("response_format").to_string());
    }
    e
}

/// Submits `n` choices of one prompt. The first goes alone; once its prompt is computed the
/// others follow to the same replica, where they find the prompt's KV in the prefix cache, so
/// the prompt is prefilled once. With a seed, choice `i` samples with `seed + i`.
async fn submit_choices(
    state: &AppState,
    (ids, text): Prompt,
    prompt_index: usize,
    echo: bool,
    params: &GenerateParams,
    n: usize,
) -> Result<Vec<Choice>, ApiError> {
    params
        .validate(ids.len(), state.replicas.info().max_length)
        .map_err(|e| ApiError::invalid(e.to_string(), e.param().or(Some("prompt"))))?;
    let echo = echo.then(|| match text {
        Some(t) => t,
        None => state
            .replicas
            .tokenizer()
            .decode(&ids, false)
            .unwrap_or_default(),
    });
    let mut out = Vec::with_capacity(n);
    let mut replica = None;
    for i in 0..n {
        let mut p = params.clone();
        p.seed = params.seed.map(|s| s.wrapping_add(i as u64));
        let (mut stream, r) = state.submit_preferring(ids.clone(), p, replica)?;
        if i == 0 && n > 1 {
            stream.wait_started().await;
        }
        replica = Some(r);
        out.push(Choice {
            index: prompt_index * n + i,
            stream,
            prompt_index,
            prompt: ids.clone(),
            echo: echo.clone(),
        });
    }
    Ok(out)
}

/// Everything a finished choice produced.
struct Collected {
    text: String,
    tokens: usize,
    finish: FinishReason,
    logprobs: Vec<(u32, TokenLogprobs)>,
    prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
}

async fn collect(s: &mut Metered) -> Collected {
    let mut c = Collected {
        text: String::new(),
        tokens: 0,
        finish: FinishReason::Abort,
        logprobs: vec![],
        prompt_logprobs: None,
    };
    while let Some(ev) = s.recv().await {
        let Event {
            token,
            text,
            logprobs,
            finish,
            prompt_logprobs,
            ..
        } = ev;
        c.text.push_str(&text);
        if prompt_logprobs.is_some() {
            c.prompt_logprobs = prompt_logprobs;
        }
        if let Some(t) = token {
            c.tokens += 1;
            if let Some(lp) = logprobs {
                c.logprobs.push((t, lp));
            }
        }
        if let Some(f) = finish {
            c.finish = f;
            break;
        }
    }
    c
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens})
}

/// Prompt tokens of the distinct prompts among `choices`.
fn prompt_tokens(choices: &[Choice]) -> usize {
    let mut seen = std::collections::BTreeMap::new();
    for c in choices {
        seen.insert(c.prompt_index, c.prompt.len());
    }
    seen.values().sum()
}

/// `POST /v1/completions`.
pub async fn completions(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(&body, &[COMPLETION_FIELDS, SAMPLING_FIELDS])?;
    check_model(&state, &req.model)?;
    let (stream, include_usage) = req.common.streaming();
    let max_tokens = req.max_tokens.unwrap_or(16);
    if max_tokens == 0 && !req.echo {
        return Err(ApiError::invalid(
            "max_tokens 0 only scores the prompt: it needs echo",
            Some("max_tokens"),
        ));
    }
    let opts = req.common.params(Some(max_tokens), req.logprobs)?;
    let (mut params, n) = (opts.params, opts.n);
    if req.echo && (req.logprobs.is_some() || max_tokens == 0) {
        params.prompt_logprobs = Some(req.logprobs.unwrap_or(0));
    }
    let prompts = tokenize(&state, req.prompt)?;
    let mut choices = Vec::new();
    for (i, p) in prompts.into_iter().enumerate() {
        let submitted = submit_choices(&state, p, i, req.echo, &params, n).await;
        choices.extend(submitted.map_err(|e| grammar_param(e, opts.grammar_field))?);
    }
    let id = request_id("cmpl");
    if stream {
        let kind = stream::Kind::Completion {
            logprobs: req.logprobs.is_some(),
        };
        return Ok(stream::sse(state, id, kind, choices, include_usage).into_response());
    }
    let tok = state.replicas.tokenizer().clone();
    let prompt_tokens = prompt_tokens(&choices);
    let (mut out, mut completion_tokens) = (vec![], 0);
    for mut c in choices {
        let got = collect(&mut c.stream).await;
        if let Some(e) = ApiError::from_finish(&got.finish) {
            return Err(e);
        }
        completion_tokens += got.tokens;
        let echo = c.echo.unwrap_or_default();
        let logprobs = req.logprobs.map(|_| {
            let mut lp = CompletionLogprobs::at(0);
            if !echo.is_empty() {
                lp.push_prompt(
                    &tok,
                    &c.prompt,
                    got.prompt_logprobs.as_deref().unwrap_or(&[]),
                );
            }
            for (t, l) in &got.logprobs {
                lp.push(&tok, *t, Some(l));
            }
            lp.take()
        });
        out.push(json!({ "index": c.index, "text": format!("{echo}{}", got.text), "logprobs": logprobs, "finish_reason": finish_str(&got.finish) }));
    }
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": state.created, "model": state.model_name,
        "choices": out, "usage": usage(prompt_tokens, completion_tokens),
    }))
    .into_response())
}

/// The request's messages as the chat template sees them.
fn chat_messages(messages: Vec<ChatMessageIn>) -> Result<Vec<ChatMessage>, ApiError> {
    messages
        .into_iter()
        .map(|m| {
            let role = match m.role.as_str() {
                "developer" => "system".to_string(),
                "system" | "user" | "assistant" | "tool" => m.role,
                other => {
                    return Err(ApiError::invalid(
                        format!("unknown message role {other:?}"),
                        Some("messages"),
                    ))
                }
            };
            let content = match m.content {
                Some(c) => c.text()?,
                None if role == "assistant" && m.tool_calls.is_some() => String::new(),
                None => {
                    return Err(ApiError::invalid(
                        format!("a {role} message needs content"),
                        Some("messages"),
                    ))
                }
            };
            if role == "tool" && m.tool_call_id.is_none() {
                return Err(ApiError::invalid(
                    "a tool message needs tool_call_id",
                    Some("messages"),
                ));
            }
            let tool_calls = m
                .tool_calls
                .map(|calls| {
                    calls
                        .into_iter()
                        .map(|c| {
                            if c.kind.as_deref().is_some_and(|k| k != "function") {
                                return Err(ApiError::invalid(
                                    "tool_calls entries must be of type \"function\"",
                                    Some("messages"),
                                ));
                            }
                            Ok(json!({"id": c.id, "type": "function",
                                "function": {"name": c.function.name, "arguments": c.function.arguments}}))
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?
                .map(Value::Array);
            Ok(ChatMessage {
                tool_calls,
                tool_call_id: m.tool_call_id,
                name: m.name,
                ..ChatMessage::new(role, content)
            })
        })
        .collect()
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_body(&body, &[CHAT_FIELDS, SAMPLING_FIELDS])?;
    check_model(&state, &req.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    let (stream, include_usage) = req.common.streaming();
    let logprobs = req.logprobs.then(|| req.top_logprobs.unwrap_or(0));
    let tok = state.replicas.tokenizer().clone();
    let tools = Tools::from_request(req.tools, req.tool_choice, tok.chat_template_source())?;
    let _ = req.parallel_tool_calls;
    let opts = req
        .common
        .params(req.max_completion_tokens.or(req.max_tokens), logprobs)?;
    let (mut params, n, mut grammar_field) = (opts.params, opts.n, opts.grammar_field);
    if let Some(g) = tools.as_ref().and_then(Tools::grammar) {
        grammar_field = Some("tools");
        if params.grammar.is_some() {
            return Err(ApiError::invalid(
                "tool_choice required or a named function constrains the output already; drop response_format",
                Some("response_format"),
            ));
        }
        params.grammar = Some(g);
    }
    let mut messages = chat_messages(req.messages)?;
    if let Some(t) = &tools {
        messages = t.prepare(messages);
    }
    let rendered = match tools.as_ref().and_then(Tools::template_tools) {
        Some(list) => tok.apply_chat_template_with_tools(&messages, list, true),
        None => tok.apply_chat_template(&messages, true),
    };
    let text = rendered.map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    let ids = tok
        .encode(&text, false)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    let choices = submit_choices(&state, (ids, None), 0, false, &params, n)
        .await
        .map_err(|e| grammar_param(e, grammar_field))?;
    let id = request_id("chatcmpl");
    let tools = tools.filter(Tools::active).map(std::sync::Arc::new);
    if stream {
        let kind = stream::Kind::Chat {
            logprobs: logprobs.is_some(),
            tools,
        };
        return Ok(stream::sse(state, id, kind, choices, include_usage).into_response());
    }
    let prompt_tokens = prompt_tokens(&choices);
    let (mut out, mut completion_tokens) = (vec![], 0);
    for mut c in choices {
        let got = collect(&mut c.stream).await;
        if let Some(e) = ApiError::from_finish(&got.finish) {
            return Err(e);
        }
        completion_tokens += got.tokens;
        let (content, calls) = match &tools {
            Some(t) => t.parse(&got.text),
            None => (Some(got.text.clone()), vec![]),
        };
        let mut message = json!({"role": "assistant", "content": content});
        let mut finish = finish_str(&got.finish);
        if !calls.is_empty() {
            message["tool_calls"] = calls.iter().map(|c| c.json(None)).collect();
            if finish == "stop" {
                finish = "tool_calls";
            }
        }
        let lp = logprobs.map(|_| {
            json!({"content": got.logprobs.iter().map(|(t, l)| chat_entry(&tok, *t, l)).collect::<Vec<_>>()})
        });
        out.push(json!({ "index": c.index, "message": message, "logprobs": lp, "finish_reason": finish }));
    }
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": state.created, "model": state.model_name,
        "choices": out, "usage": usage(prompt_tokens, completion_tokens),
    }))
    .into_response())
}
