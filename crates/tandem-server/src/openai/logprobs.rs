//! Log-probabilities in each route's own shape: chat's `{"content": [{token, logprob, bytes,
//! top_logprobs: [...]}]}`, and completions' `{tokens, token_logprobs, top_logprobs: [{token:
//! logprob}], text_offset}` (the shape the `openai` package types and evaluation harnesses
//! read; with `echo`, the prompt's tokens come first, the very first with `null`s).

use serde_json::{json, Map, Value};
use tandem_engine::TokenLogprobs;
use tandem_model::Tokenizer;

fn piece(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

/// One chat `content` entry.
pub(crate) fn chat_entry(tok: &Tokenizer, token: u32, lp: &TokenLogprobs) -> Value {
    let text = piece(tok, token);
    json!({
        "token": text,
        "logprob": lp.logprob,
        "bytes": text.as_bytes(),
        "top_logprobs": lp.top.iter().map(|(id, l)| {
            let t = piece(tok, *id);
            json!({"token": t, "logprob": l, "bytes": t.as_bytes()})
        }).collect::<Vec<_>>(),
    })
}

/// Completions' logprobs, built token by token with each token's offset in the text.
#[derive(Default)]
pub(crate) struct CompletionLogprobs {
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<Value>,
    /// Characters of text so far (the offset of the next token).
    offset: usize,
}

impl CompletionLogprobs {
    /// Starts at character `offset` of the returned text.
    pub fn at(offset: usize) -> Self {
        CompletionLogprobs {
            offset,
            ..Default::default()
        }
    }

    /// Adds `token` (None: the prompt's first token, which has no log-probability).
    pub fn push(&mut self, tok: &Tokenizer, token: u32, lp: Option<&TokenLogprobs>) {
        let text = piece(tok, token);
        self.text_offset.push(json!(self.offset));
        self.offset += text.chars().count();
        self.tokens.push(json!(text));
        match lp {
            Some(lp) => {
                self.token_logprobs.push(json!(lp.logprob));
                let top: Map<String, Value> = lp
                    .top
                    .iter()
                    .map(|(id, l)| (piece(tok, *id), json!(l)))
                    .collect();
                self.top_logprobs.push(Value::Object(top));
            }
            None => {
                self.token_logprobs.push(Value::Null);
                self.top_logprobs.push(Value::Null);
            }
        }
    }

    /// The prompt's tokens with their scores (`lps[i]` for token `i`, the first None).
    pub fn push_prompt(&mut self, tok: &Tokenizer, prompt: &[u32], lps: &[Option<TokenLogprobs>]) {
        for (i, &t) in prompt.iter().enumerate() {
            self.push(tok, t, lps.get(i).and_then(Option::as_ref));
        }
    }

    /// The JSON object, leaving this builder empty (for stream chunks) at the same offset.
    pub fn take(&mut self) -> Value {
        json!({
            "tokens": std::mem::take(&mut self.tokens),
            "token_logprobs": std::mem::take(&mut self.token_logprobs),
            "top_logprobs": std::mem::take(&mut self.top_logprobs),
            "text_offset": std::mem::take(&mut self.text_offset),
        })
    }
}
