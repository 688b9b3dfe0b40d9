//! Tokenization: HF `tokenizer.json` or a GGUF's embedded vocabulary, BOS/EOS handling,
//! chat templates and incremental detokenization.

mod chat;
mod detok;
mod gguf_vocab;

use std::path::Path;

pub use chat::{ChatMessage, ChatTemplate};
pub use detok::IncrementalDecoder;

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, GgufValue};

/// A model's tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    /// Whether `encode(.., true)` prepends BOS itself (GGUF); HF tokenizers use their post-processor.
    manual_bos: bool,
    chat_template: Option<ChatTemplate>,
    path: std::path::PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tokenizer({}, bos {:?}, eos {:?})",
            self.path.display(),
            self.bos_id,
            self.eos_ids
        )
    }
}

fn token_content(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

/// Token texts llama.cpp treats as end of generation wherever a vocabulary has them.
const END_OF_GENERATION_TEXTS: [&str; 8] = [
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
];

impl Tokenizer {
    /// Loads `dir/tokenizer.json`, with `tokenizer_config.json` (chat template, BOS/EOS) when present.
    pub fn from_hf_dir(dir: &Path, eos_from_config: &[u32]) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        let err = |why: String| ModelError::Tokenizer {
            path: path.clone(),
            why,
        };
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| err(e.to_string()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| ModelError::Tokenizer {
                path: cfg_path.clone(),
                why: e.to_string(),
            })?,
            Err(_) => serde_json::Value::Null,
        };
        let bos = cfg.get("bos_token").and_then(token_content);
        let eos = cfg.get("eos_token").and_then(token_content);
        let bos_id = bos.as_deref().and_then(|t| inner.token_to_id(t));
        let mut eos_ids = eos_from_config.to_vec();
        if let Some(e) = eos.as_deref().and_then(|t| inner.token_to_id(t)) {
            if !eos_ids.contains(&e) {
                eos_ids.push(e);
            }
        }
        let chat_template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: use "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template").and_then(|s| s.as_str()).map(String::from)),
            _ => None,
        };
        let chat_template = chat_template
            .map(|s| {
                ChatTemplate::new(
                    &s,
                    bos.as_deref().unwrap_or(""),
                    eos.as_deref().unwrap_or(""),
                )
            })
            .transpose()
            .map_err(|e| ModelError::Tokenizer {
                path: cfg_path,
                why: format!("chat template: {e}"),
            })?;
        Ok(Tokenizer {
            inner,
            bos_id,
            eos_ids,
            manual_bos: false,
            chat_template,
            path,
        })
    }

    /// Builds the tokenizer embedded in a GGUF file's metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer> {
        let err = |why: String| ModelError::Tokenizer {
            path: g.path.clone(),
            why,
        };
        let inner = gguf_vocab::from_gguf(g).map_err(err)?;
        let id = |k: &str| g.get(k).and_then(GgufValue::as_u64).map(|v| v as u32);
        let bos_id = id("tokenizer.ggml.bos_token_id");
        let mut eos_ids: Vec<u32> = id("tokenizer.ggml.eos_token_id")
            .into_iter()
            .chain(id("tokenizer.ggml.eot_token_id"))
            .chain(id("tokenizer.ggml.eom_token_id"))
            .collect();
        // Like llama.cpp, every end-of-turn marker the vocabulary has ends generation (Qwen2.5
        // declares `<|im_end|>` but also ends base-style output with `<|endoftext|>`).
        for t in END_OF_GENERATION_TEXTS {
            if let Some(i) = inner.token_to_id(t) {
                if !eos_ids.contains(&i) {
                    eos_ids.push(i);
                }
            }
        }
        let add_bos = g
            .get("tokenizer.ggml.add_bos_token")
            .and_then(GgufValue::as_bool)
            .unwrap_or(g.get("tokenizer.ggml.model").and_then(GgufValue::as_str) == Some("llama"));
        let text_of = |i: Option<u32>| i.and_then(|i| inner.id_to_token(i)).unwrap_or_default();
        let chat_template = g
            .get("tokenizer.chat_template")
            .and_then(GgufValue::as_str)
            .map(|s| ChatTemplate::new(s, &text_of(bos_id), &text_of(eos_ids.first().copied())))
            .transpose()
            .map_err(|e| err(format!("chat template: {e}")))?;
        Ok(Tokenizer {
            inner,
            bos_id: if add_bos { bos_id } else { None },
            eos_ids,
            manual_bos: add_bos,
            chat_template,
            path: g.path.clone(),
        })
    }

    fn err(&self, why: impl ToString) -> ModelError {
        ModelError::Tokenizer {
            path: self.path.clone(),
            why: why.to_string(),
        }
    }

    /// Token ids of `text`; with `add_special`, BOS (or whatever the tokenizer's post-processor
    /// adds) is included. Special tokens written in the text are recognized.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special && !self.manual_bos)
            .map_err(|e| self.err(e))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special && self.manual_bos {
            if let Some(b) = self.bos_id {
                if ids.first() != Some(&b) {
                    ids.insert(0, b);
                }
            }
        }
        Ok(ids)
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| self.err(e))
    }

    /// Renders a conversation with the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let t = self.chat_template.as_ref().ok_or_else(|| {
            ModelError::ChatTemplate(format!("{} has no chat template", self.path.display()))
        })?;
        t.render(messages, None, add_generation_prompt)
            .map_err(ModelError::ChatTemplate)
    }

    /// Like [`apply_chat_template`](Self::apply_chat_template), with OpenAI's `tools` given to
    /// the template (templates with tool support render them in the model's own format).
    pub fn apply_chat_template_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &serde_json::Value,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let t = self.chat_template.as_ref().ok_or_else(|| {
            ModelError::ChatTemplate(format!("{} has no chat template", self.path.display()))
        })?;
        t.render(messages, Some(tools), add_generation_prompt)
            .map_err(ModelError::ChatTemplate)
    }

    /// The chat template's source, if the model has one.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.chat_template.as_ref().map(|t| t.source())
    }

    /// Whether the model has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// The ids that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The BOS id prepended by `encode(.., true)`, if any.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Number of tokens, added ones included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
