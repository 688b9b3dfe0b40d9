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
use crate::metrics::Metered;
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
    let tok = state.engine.tokenizer().clone();
    let max_length = state.engine.info().max_length;
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
    if req.stream {
        if ids.len() != 1 {
            return Err(ApiError::invalid(
                "streaming takes exactly one prompt (as MII)",
                Some("prompts"),
            ));
        }
        let prompt_length = ids[0].len();
        let s = Metered::new(
            state.engine.submit(ids.pop().expect("one"), params)?,
            state.metrics.clone(),
            prompt_length,
        );
        let mut generated = 0usize;
        let events = s.into_stream().map(move |ev| {
            generated += ev.token.is_some() as usize;
            let finish = ev.finish.as_ref().map_or("none", |f| f.as_str());
            let body = json!([{ "generated_text": ev.text, "prompt_length": prompt_length, "generated_length": generated, "finish_reason": finish }]);
            Ok::<_, std::convert::Infallible>(SseEvent::default().data(body.to_string()))
        });
        return Ok(Sse::new(events).into_response());
    }
    let streams = ids
        .iter()
        .map(|t| state.engine.submit(t.clone(), params.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::with_capacity(streams.len());
    for ((mut s, prompt), ids) in streams.into_iter().zip(&prompts).zip(&ids) {
        let mut text = if params.return_full_text {
            prompt.clone()
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
        out.push(json!({ "generated_text": text, "prompt_length": ids.len(), "generated_length": n, "finish_reason": finish }));
    }
    Ok(Json(out).into_response())
}
