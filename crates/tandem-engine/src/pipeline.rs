//! MII's non-persistent pipeline: load a model, generate for a list of prompts (all batched
//! together by the engine), stream one prompt, tear down.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use tandem_model::LoadedModel;

use crate::engine::{Engine, EngineConfig};
use crate::error::EngineError;
use crate::params::GenerateParams;
use crate::request::{Event, EventStream, FinishReason, Usage};
use crate::sampler::TokenLogprobs;

/// One prompt's result, with MII's fields plus the token ids.
#[derive(Clone, Debug, PartialEq)]
pub struct Response {
    /// The generated text (prefixed by the prompt with `return_full_text`).
    pub generated_text: String,
    /// Prompt tokens.
    pub prompt_length: usize,
    /// Generated tokens (EOS and stop strings excluded).
    pub generated_length: usize,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Prompt token ids.
    pub prompt_token_ids: Vec<u32>,
    /// Generated token ids.
    pub token_ids: Vec<u32>,
    /// Per-token log-probabilities, when asked for.
    pub logprobs: Option<Vec<TokenLogprobs>>,
    /// Token counts.
    pub usage: Option<Usage>,
}

/// An in-process pipeline over one engine.
pub struct Pipeline {
    engine: Option<Engine>,
}

impl Pipeline {
    /// Loads the model at `path` and starts an engine.
    pub fn new(path: &Path, cfg: EngineConfig) -> Result<Pipeline, EngineError> {
        Self::from_loaded(tandem_model::load(path)?, cfg)
    }

    /// Starts an engine on an already loaded model.
    pub fn from_loaded(loaded: LoadedModel, cfg: EngineConfig) -> Result<Pipeline, EngineError> {
        Ok(Pipeline {
            engine: Some(Engine::start(loaded, cfg)?),
        })
    }

    /// A pipeline over an engine already started (e.g. a tensor-parallel one).
    pub fn from_engine(engine: Engine) -> Pipeline {
        Pipeline {
            engine: Some(engine),
        }
    }

    /// The engine (for stats, tokenizer, lower-level submission).
    pub fn engine(&self) -> Result<&Engine, EngineError> {
        self.engine.as_ref().ok_or(EngineError::Closed)
    }

    /// Tokenizes a prompt as `generate` does (with BOS when the model wants one).
    pub fn tokenize(&self, prompt: &str) -> Result<Vec<u32>, EngineError> {
        Ok(self.engine()?.tokenizer().encode(prompt, true)?)
    }

    /// Generates for every prompt (batched together); results in prompt order. Any invalid
    /// prompt fails the whole call before anything runs.
    pub fn generate<S: AsRef<str>>(
        &self,
        prompts: &[S],
        params: &GenerateParams,
    ) -> Result<Vec<Response>, EngineError> {
        self.generate_cancellable(prompts, params, &AtomicBool::new(false))
    }

    /// Like [`generate`](Self::generate), and once `cancel` is set (from another thread) the
    /// requests are aborted at the next engine step, their KV freed, and the call returns
    /// [`EngineError::Cancelled`].
    pub fn generate_cancellable<S: AsRef<str>>(
        &self,
        prompts: &[S],
        params: &GenerateParams,
        cancel: &AtomicBool,
    ) -> Result<Vec<Response>, EngineError> {
        let ids = prompts
            .iter()
            .map(|p| self.tokenize(p.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let texts: Vec<&str> = prompts.iter().map(|p| p.as_ref()).collect();
        self.generate_ids(ids, Some(&texts), params, cancel)
    }

    /// Like [`generate`](Self::generate), for prompts given as token ids.
    pub fn generate_tokens(
        &self,
        prompts: Vec<Vec<u32>>,
        params: &GenerateParams,
    ) -> Result<Vec<Response>, EngineError> {
        self.generate_ids(prompts, None, params, &AtomicBool::new(false))
    }

    fn generate_ids(
        &self,
        prompts: Vec<Vec<u32>>,
        texts: Option<&[&str]>,
        params: &GenerateParams,
        cancel: &AtomicBool,
    ) -> Result<Vec<Response>, EngineError> {
        let engine = self.engine()?;
        for p in &prompts {
            params.validate(p.len(), engine.info().max_length)?;
        }
        let streams = prompts
            .iter()
            .map(|p| engine.submit(p.clone(), params.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::with_capacity(prompts.len());
        // Dropping the streams left (when one fails or the call is cancelled) aborts them.
        for (i, (p, s)) in prompts.into_iter().zip(streams).enumerate() {
            let prefix = match (params.return_full_text, texts) {
                (true, Some(t)) => t[i].to_string(),
                (true, None) => engine.tokenizer().decode(&p, true)?,
                _ => String::new(),
            };
            out.push(collect(p, s, prefix, params.logprobs.is_some(), cancel)?);
        }
        Ok(out)
    }

    /// Streams one prompt's events (text pieces as they complete; the last carries the finish
    /// reason). Dropping the stream cancels the request.
    pub fn stream(
        &self,
        prompt: &str,
        params: &GenerateParams,
    ) -> Result<EventStream, EngineError> {
        let ids = self.tokenize(prompt)?;
        self.engine()?.submit(ids, params.clone())
    }

    /// Shuts the engine down; later calls fail with [`EngineError::Closed`].
    pub fn destroy(&mut self) {
        self.engine = None;
    }
}

/// Drains a stream into a response (blocking), checking `cancel` at every event.
fn collect(
    prompt: Vec<u32>,
    mut s: EventStream,
    prefix: String,
    want_logprobs: bool,
    cancel: &AtomicBool,
) -> Result<Response, EngineError> {
    let mut text = prefix;
    let mut ids = Vec::new();
    let mut lps = Vec::new();
    let mut finish = FinishReason::Abort;
    let mut usage = None;
    while let Some(Event {
        token,
        text: piece,
        logprobs,
        finish: f,
        usage: u,
        ..
    }) = s.blocking_recv()
    {
        if cancel.load(Ordering::Acquire) {
            return Err(EngineError::Cancelled);
        }
        text.push_str(&piece);
        ids.extend(token);
        lps.extend(logprobs);
        if let Some(f) = f {
            finish = f;
            usage = u;
            break;
        }
    }
    Ok(Response {
        generated_text: text,
        prompt_length: prompt.len(),
        generated_length: ids.len(),
        finish_reason: finish,
        prompt_token_ids: prompt,
        token_ids: ids,
        logprobs: want_logprobs.then_some(lps),
        usage,
    })
}
