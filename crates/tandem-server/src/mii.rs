//! MII's REST route: `POST /mii/{deployment}` with `{"prompts": str | [str], <options>}`,
//! answering a JSON array of MII responses (or SSE with `"stream": true`).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tandem_engine::GenerateParams;

use crate::error::ApiError;
use crate::params::{parse_body, StopInput};
use crate::state::AppState;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompts {
    One(String),
    Many(Vec<String>),
}

/// MII's `GenerateParamsConfig` plus Tandem's extensions, with MII's defaults.
#[derive(Debug, Deserialize)]
struct MiiRequest {
    prompts: Prompts,
    #[serde(default)]
    stream: bool,
    max_length: Option<usize>,
    max_new_tokens: Option<usize>,
    #[serde(default)]
    min_new_tokens: usize,
    #[serde(default)]
    ignore_eos: bool,
    top_p: Option<f32>,
    top_k: Option<usize>,
    temperature: Option<f32>,
    do_sample: Option<bool>,
    #[serde(default)]
    return_full_text: bool,
    stop: Option<StopInput>,
    repetition_penalty: Option<f32>,
    seed: Option<u64>,
}

const FIELDS: &[&str] = &[
    "prompts",
    "stream",
    "max_length",
    "max_new_tokens",
    "min_new_tokens",
    "ignore_eos",
    "top_p",
    "top_k",
    "temperature",
    "do_sample",
    "return_full_text",
    "stop",
    "repetition_penalty",
    "seed",
];

/// A validated MII call: prompts, their token ids, and the options.
pub(crate) struct MiiCall {
    pub prompts: Vec<String>,
    pub ids: Vec<Vec<u32>>,
    pub params: GenerateParams,
}

/// Parses MII options given as a JSON object with `prompts` (the REST body, or gRPC's
/// `request` + `query_kwargs` converted to JSON).
pub(crate) fn parse_call(state: &AppState, body: serde_json::Value) -> Result<MiiCall, ApiError> {
    let bytes = serde_json::to_vec(&body).map_err(|e| ApiError::invalid(e.to_string(), None))?;
    prepare(state, parse_body(&bytes, &[FIELDS])?)
}

/// MII's defaults applied, prompts tokenized and validated against the engine's limits.
fn prepare(state: &AppState, req: MiiRequest) -> Result<MiiCall, ApiError> {
    let d = GenerateParams::default();
    let params = GenerateParams {
        max_length: req.max_length,
        max_new_tokens: req.max_new_tokens,
        min_new_tokens: req.min_new_tokens,
        ignore_eos: req.ignore_eos,
        top_p: req.top_p.unwrap_or(d.top_p),
        top_k: req.top_k,
        temperature: req.temperature,
        do_sample: req.do_sample.unwrap_or(d.do_sample),
        return_full_text: req.return_full_text,
        stop: req.stop.map(StopInput::into_vec).unwrap_or_default(),
        repetition_penalty: req.repetition_penalty.unwrap_or(1.0),
        seed: req.seed,
        logprobs: None,
    };
    let prompts = match req.prompts {
        Prompts::One(p) => vec![p],
        Prompts::Many(v) => v,
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid(
            "prompts is an empty list",
            Some("prompts"),
        ));
    }
    let tok = state.replicas.tokenizer();
    let max_length = state.replicas.info().max_length;
    let mut ids = Vec::with_capacity(prompts.len());
    for p in &prompts {
        let t = tok
            .encode(p, true)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("prompts")))?;
        params
            .validate(t.len(), max_length)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("prompts")))?;
        ids.push(t);
    }
    Ok(MiiCall {
        prompts,
        ids,
        params,
    })
}

/// `POST /mii/{deployment}`.
pub async fn generate(
    State(state): State<AppState>,
    Path(deployment): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    if deployment != state.deployment_name {
        return Err(ApiError::not_found(format!(
            "no deployment {deployment:?} here (this is {:?})",
            state.deployment_name
        )));
    }
    let req: MiiRequest = parse_body(&body, &[FIELDS])?;
    let stream = req.stream;
    let call = prepare(&state, req)?;
    if stream {
        let prompt_length = call.ids[0].len();
        let mut generated = 0usize;
        let events = stream_one(&state, call)?.map(move |ev| {
            generated += ev.token.is_some() as usize;
            let finish = ev.finish.as_ref().map_or("none", |f| f.as_str());
            let body = json!([{ "generated_text": ev.text, "prompt_length": prompt_length, "generated_length": generated, "finish_reason": finish }]);
            Ok::<_, std::convert::Infallible>(SseEvent::default().data(body.to_string()))
        });
        return Ok(Sse::new(events).into_response());
    }
    let out: Vec<_> = complete(&state, call)
        .await?
        .into_iter()
        .map(|f| json!({ "generated_text": f.text, "prompt_length": f.prompt_tokens, "generated_length": f.generated_tokens, "finish_reason": f.finish }))
        .collect();
    Ok(Json(out).into_response())
}

/// One prompt's finished generation, as MII reports it.
pub(crate) struct Finished {
    pub text: String,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub finish: &'static str,
}

/// Runs every prompt of `call` (batched by the engine) to completion, in prompt order.
pub(crate) async fn complete(state: &AppState, call: MiiCall) -> Result<Vec<Finished>, ApiError> {
    let MiiCall {
        prompts,
        ids,
        params,
    } = call;
    let streams = ids
        .iter()
        .map(|t| state.submit(t.clone(), params.clone()))
        .collect::<Result<Vec<_>, ApiError>>()?;
    let mut out = Vec::with_capacity(streams.len());
    for ((mut s, prompt), ids) in streams.into_iter().zip(prompts).zip(&ids) {
        let mut text = if params.return_full_text {
            prompt
        } else {
            String::new()
        };
        let (mut n, mut finish) = (0usize, "abort");
        while let Some(ev) = s.recv().await {
            text.push_str(&ev.text);
            n += ev.token.is_some() as usize;
            if let Some(f) = ev.finish {
                finish = f.as_str();
                break;
            }
        }
        out.push(Finished {
            text,
            prompt_tokens: ids.len(),
            generated_tokens: n,
            finish,
        });
    }
    Ok(out)
}

/// Streams the single prompt of `call` (MII streams exactly one prompt).
pub(crate) fn stream_one(
    state: &AppState,
    mut call: MiiCall,
) -> Result<impl futures_util::Stream<Item = tandem_engine::Event> + Send, ApiError> {
    if call.ids.len() != 1 {
        return Err(ApiError::invalid(
            "streaming takes exactly one prompt (as MII)",
            Some("prompts"),
        ));
    }
    let ids = call.ids.pop().expect("one prompt");
    Ok(state.submit(ids, call.params)?.into_stream())
}
