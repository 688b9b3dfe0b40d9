//! SSE for both routes: every choice's events as chunks (interleaved as they come), the usage
//! chunk when asked for, then `[DONE]`. Chat chunks carry tool calls as `tool_calls` deltas
//! once each call is complete. Dropping the response (client gone) drops the engine streams,
//! which cancels the requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::response::sse::{Event as SseEvent, Sse};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use tandem_engine::{Event, FinishReason};
use tandem_model::Tokenizer;

use super::logprobs::{chat_entry, CompletionLogprobs};
use super::tools::{Delta, ToolStream, Tools};
use super::{finish_str, prompt_tokens, request_id, usage, Choice};
use crate::error::ApiError;
use crate::state::AppState;

/// Which route's chunks to write.
pub(crate) enum Kind {
    Completion {
        logprobs: bool,
    },
    Chat {
        logprobs: bool,
        tools: Option<Arc<Tools>>,
    },
}

/// One choice's streaming state.
struct ChoiceState {
    index: usize,
    tok: Arc<Tokenizer>,
    first: bool,
    echo: Option<String>,
    prompt: Vec<u32>,
    chat: bool,
    logprobs: bool,
    tools: Option<ToolStream>,
    lp: CompletionLogprobs,
}

impl ChoiceState {
    /// The choice objects for one engine event; a failure is an `{"error": ...}` object.
    fn chunks(&mut self, ev: Event) -> Vec<Value> {
        if let Some(e) = ev.finish.as_ref().and_then(ApiError::from_finish) {
            return vec![e.body()];
        }
        let first = std::mem::replace(&mut self.first, false);
        let finish = ev.finish.as_ref();
        if self.chat {
            self.chat_chunks(ev.token, ev.text, ev.logprobs, finish, first)
        } else {
            let mut text = ev.text;
            let lp = self.logprobs.then(|| {
                if first && self.echo.is_some() {
                    let lps = ev.prompt_logprobs.unwrap_or_default();
                    self.lp.push_prompt(&self.tok, &self.prompt, &lps);
                }
                if let (Some(t), Some(l)) = (ev.token, ev.logprobs.as_ref()) {
                    self.lp.push(&self.tok, t, Some(l));
                }
                self.lp.take()
            });
            if first {
                if let Some(e) = &self.echo {
                    text = format!("{e}{text}");
                }
            }
            vec![
                json!({"index": self.index, "text": text, "logprobs": lp, "finish_reason": finish.map(finish_str)}),
            ]
        }
    }

    fn chat_chunks(
        &mut self,
        token: Option<u32>,
        text: String,
        logprobs: Option<tandem_engine::TokenLogprobs>,
        finish: Option<&FinishReason>,
        first: bool,
    ) -> Vec<Value> {
        let mut deltas = match self.tools.as_mut() {
            Some(t) => t.push(&text),
            None => vec![Delta::Content(text)],
        };
        if finish.is_some() {
            if let Some(t) = self.tools.as_mut() {
                deltas.extend(t.finish());
            }
        }
        let lp = logprobs
            .filter(|_| self.logprobs)
            .zip(token)
            .map(|(l, t)| json!({"content": [chat_entry(&self.tok, t, &l)]}));
        let mut content = String::new();
        let mut out = Vec::new();
        let total_calls = self.tools.as_ref().map_or(0, |t| t.calls());
        let new_calls = deltas
            .iter()
            .filter(|d| matches!(d, Delta::Call(_)))
            .count();
        // The tool stream has counted this event's calls already.
        let mut k = total_calls - new_calls;
        for d in deltas {
            match d {
                Delta::Content(c) => content.push_str(&c),
                Delta::Call(c) => {
                    out.push(json!({"tool_calls": [c.json(Some(k))]}));
                    k += 1;
                }
            }
        }
        if !content.is_empty() || out.is_empty() {
            out.insert(0, json!({"content": content}));
        }
        if first {
            out[0]["role"] = json!("assistant");
        }
        let n = out.len();
        out.into_iter()
            .enumerate()
            .map(|(i, delta)| {
                let last = i + 1 == n;
                let reason = finish.filter(|_| last).map(|f| match f {
                    FinishReason::Stop if total_calls > 0 => "tool_calls",
                    f => finish_str(f),
                });
                json!({"index": self.index, "delta": delta, "logprobs": if i == 0 { lp.clone() } else { None },
                       "finish_reason": reason})
            })
            .collect()
    }
}

/// The SSE response for `choices`.
pub(crate) fn sse(
    state: AppState,
    id: String,
    kind: Kind,
    choices: Vec<Choice>,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let object = match kind {
        Kind::Completion { .. } => "text_completion",
        Kind::Chat { .. } => "chat.completion.chunk",
    };
    let prompt_tokens = prompt_tokens(&choices);
    let tok = state.replicas.tokenizer().clone();
    let (chat, logprobs, tools) = match kind {
        Kind::Completion { logprobs } => (false, logprobs, None),
        Kind::Chat { logprobs, tools } => (true, logprobs, tools),
    };
    let completion_tokens = Arc::new(AtomicUsize::new(0));
    let per_choice = choices.into_iter().map(|c| {
        let st = ChoiceState {
            index: c.index,
            tok: tok.clone(),
            first: true,
            echo: c.echo,
            prompt: c.prompt,
            chat,
            logprobs,
            tools: tools.as_ref().map(|t| t.stream()),
            lp: CompletionLogprobs::at(0),
        };
        let counter = completion_tokens.clone();
        stream::unfold((c.stream, st, false), move |(mut s, mut st, done)| {
            let counter = counter.clone();
            async move {
                if done {
                    return None;
                }
                let ev = s.recv().await?;
                if ev.token.is_some() {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                let finished = ev.finish.is_some();
                Some((st.chunks(ev), (s, st, finished)))
            }
        })
        .flat_map(stream::iter)
        .boxed()
    });
    let (model, created) = (state.model_name.clone(), state.created);
    let envelope_id = id.clone();
    let body = stream::select_all(per_choice).map(move |choice| {
        // A failed choice is an OpenAI error event, which the `openai` package raises.
        if choice.get("error").is_some() {
            return Ok(SseEvent::default().data(choice.to_string()));
        }
        let chunk = json!({"id": envelope_id, "object": object, "created": created, "model": model, "choices": [choice]});
        Ok(SseEvent::default().data(chunk.to_string()))
    });
    let (model, usage_id) = (state.model_name.clone(), request_id("usage"));
    let tail = stream::once(async move {
        let n = completion_tokens.load(Ordering::Relaxed);
        include_usage.then(|| {
            let chunk = json!({"id": usage_id, "object": object, "created": created, "model": model,
                "choices": [], "usage": usage(prompt_tokens, n)});
            Ok(SseEvent::default().data(chunk.to_string()))
        })
    })
    .filter_map(|x| async move { x })
    .chain(stream::once(async {
        Ok(SseEvent::default().data("[DONE]"))
    }));
    Sse::new(body.chain(tail))
}
