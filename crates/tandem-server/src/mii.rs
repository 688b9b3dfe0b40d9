//! MII's REST route: `POST /mii/{deployment}` with `{"prompts": str | [str], <options>}`,
//! answering a JSON array of MII responses (or SSE with `"stream": true`).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde_json::json;
use tandem_engine::{FinishReason, GenerateParams};

use crate::error::ApiError;
use crate::state::AppState;

/// A validated MII call: prompts, their token ids, and the options.
pub(crate) struct MiiCall {
    pub prompts: Vec<String>,
    pub ids: Vec<Vec<u32>>,
    pub params: GenerateParams,
}

/// A MII body split into its prompts, `stream`, and the generate options (parsed by the
/// engine's MII option parser, shared with the Python API).
struct MiiBody {
    prompts: Vec<String>,
    stream: bool,
    params: GenerateParams,
}

fn split_body(body: serde_json::Value) -> Result<MiiBody, ApiError> {
    let serde_json::Value::Object(mut obj) = body else {
        return Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
        ));
    };
    let prompts = match obj.remove("prompts") {
        Some(serde_json::Value::String(p)) => vec![p],
        Some(serde_json::Value::Array(items)) => items
            .into_iter()
            .map(|p| match p {
                serde_json::Value::String(s) => Ok(s),
                _ => Err(ApiError::invalid(
                    "prompts must be a string or a list of strings",
                    Some("prompts"),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "prompts must be a string or a list of strings",
                Some("prompts"),
            ))
        }
        None => return Err(ApiError::invalid("prompts is required", Some("prompts"))),
    };
    let stream = match obj.remove("stream") {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Bool(b)) => b,
        Some(_) => return Err(ApiError::invalid("stream must be a bool", Some("stream"))),
    };
    let params = GenerateParams::from_mii_options(&obj)
        .map_err(|e| ApiError::invalid(e.to_string(), e.param()))?;
    Ok(MiiBody {
        prompts,
        stream,
        params,
    })
}

/// Parses MII options given as a JSON object with `prompts` (the REST body, or gRPC's
/// `request` + `query_kwargs` converted to JSON).
pub(crate) fn parse_call(state: &AppState, body: serde_json::Value) -> Result<MiiCall, ApiError> {
    let b = split_body(body)?;
    prepare(state, b.prompts, b.params)
}

/// Prompts tokenized and validated against the engine's limits.
fn prepare(
    state: &AppState,
    prompts: Vec<String>,
    params: GenerateParams,
) -> Result<MiiCall, ApiError> {
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
            .map_err(|e| ApiError::invalid(e.to_string(), e.param().or(Some("prompts"))))?;
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
    let body: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}"), None))?;
    let MiiBody {
        prompts,
        stream,
        params,
    } = split_body(body)?;
    let call = prepare(&state, prompts, params)?;
    if stream {
        let prompt_length = call.ids[0].len();
        let mut generated = 0usize;
        let events = stream_one(&state, call)?.map(move |ev| {
            if let Some(e) = ev.finish.as_ref().and_then(ApiError::from_finish) {
                return Ok(SseEvent::default().data(e.body().to_string()));
            }
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
        let (mut n, mut finish) = (0usize, None);
        while let Some(ev) = s.recv().await {
            text.push_str(&ev.text);
            n += ev.token.is_some() as usize;
            if let Some(f) = ev.finish {
                finish = Some(f);
                break;
            }
        }
        let finish = finish.unwrap_or(FinishReason::Abort);
        if let Some(e) = ApiError::from_finish(&finish) {
            return Err(e);
        }
        let finish = finish.as_str();
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
