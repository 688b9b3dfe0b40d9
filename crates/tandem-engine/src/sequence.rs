//! A request's state inside the engine.

use rand::rngs::StdRng;
use rand::SeedableRng;
use tandem_model::{IncrementalDecoder, Tokenizer};

use crate::block_pool::{block_keys, BlockTable};
use crate::request::{Event, FinishReason, Request, Usage};
use crate::sampler::TokenLogprobs;
use crate::stop::{StopCheck, StopMatcher};

/// A request being served: its tokens, KV blocks, and output state.
pub struct Sequence {
    /// Arrival order; lower is older and has priority.
    pub id: u64,
    /// The request.
    pub req: Request,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    /// Tokens whose KV is in `blocks`.
    pub computed: usize,
    /// KV blocks (`None` while waiting).
    pub blocks: Option<BlockTable>,
    /// Prefix keys of full blocks of `tokens`.
    pub keys: Vec<u64>,
    /// Prompt tokens served from the prefix cache at first admission.
    pub cached_tokens: usize,
    /// The sampling RNG (seeded from `seed` when given).
    pub rng: StdRng,
    /// Prompt tokens' log-probabilities so far (with `prompt_logprobs`), sent on the first
    /// event.
    pub prompt_lps: Vec<Option<TokenLogprobs>>,
    prompt_lps_sent: bool,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
}

impl Sequence {
    /// A new waiting sequence.
    pub fn new(id: u64, req: Request, block_size: usize) -> Sequence {
        let seed = req.params.seed.unwrap_or_else(rand::random);
        let tokens = req.prompt.clone();
        Sequence {
            id,
            keys: block_keys(&tokens, block_size),
            decoder: IncrementalDecoder::new(&tokens),
            stop: StopMatcher::new(&req.params.stop),
            rng: StdRng::seed_from_u64(seed),
            tokens,
            req,
            computed: 0,
            blocks: None,
            cached_tokens: 0,
            prompt_lps: Vec::new(),
            prompt_lps_sent: false,
        }
    }

    /// Whether the prompt's own log-probabilities are wanted (its KV is then computed, never
    /// taken from the prefix cache).
    pub fn scores_prompt(&self) -> bool {
        self.req.params.prompt_logprobs.is_some()
    }

    /// The prompt log-probabilities, once, for the first event.
    fn first_extras(&mut self) -> Option<Vec<Option<TokenLogprobs>>> {
        if !self.scores_prompt() || self.prompt_lps_sent {
            return None;
        }
        self.prompt_lps_sent = true;
        Some(std::mem::take(&mut self.prompt_lps))
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.req.prompt.len()
    }

    /// Whether its client has gone away.
    pub fn cancelled(&self) -> bool {
        self.req.events.is_closed()
    }

    /// Drops the KV (recompute on readmission).
    pub fn preempt(&mut self) {
        self.blocks = None;
        self.computed = 0;
    }

    /// Makes every block now full of computed tokens findable by its prefix key.
    pub fn register_computed_blocks(&mut self, block_size: usize) {
        if self.tokens.len() / block_size > self.keys.len() {
            self.keys = block_keys(&self.tokens, block_size);
        }
        let full = (self.computed / block_size).min(self.keys.len());
        if let Some(table) = self.blocks.as_mut() {
            table.register_full(&self.keys[..full]);
        }
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.req.prompt.len(),
            generated_tokens: self.generated(),
            cached_tokens: self.cached_tokens,
        }
    }

    fn send(&mut self, ev: Event) {
        // A closed stream is noticed by `cancelled()` before the next step.
        let _ = self.req.events.send(ev);
    }

    /// Handles a sampled token: appends it and streams its text. When the request is finished,
    /// returns its final event unsent: the engine frees the sequence first, so a client that
    /// sees the end of its stream never sees its KV still held.
    pub fn accept(
        &mut self,
        tok: &Tokenizer,
        token: u32,
        logprobs: Option<TokenLogprobs>,
        eos: &[u32],
    ) -> Option<Event> {
        let p = &self.req.params;
        if (!p.ignore_eos && eos.contains(&token)) || p.stop_token_ids.contains(&token) {
            return Some(self.final_event(FinishReason::Stop));
        }
        let mut grammar_done = false;
        if let Some(c) = self.req.constraint.as_mut() {
            if let Err(why) = c.consume(token) {
                return Some(self.final_event(FinishReason::Error(format!(
                    "the grammar refused token {token}: {why}"
                ))));
            }
            grammar_done = c.is_finished();
        }
        self.tokens.push(token);
        let piece = self.decoder.push(tok, token).unwrap_or_default();
        let (mut text, stopped) = match self.stop.push(&piece) {
            StopCheck::Continue(t) => (t, false),
            StopCheck::Stopped(t) => (t, true),
        };
        let prompt_logprobs = self.first_extras();
        if stopped {
            let usage = Some(self.usage());
            return Some(Event {
                token: Some(token),
                text,
                logprobs,
                finish: Some(FinishReason::Stop),
                usage,
                prompt_logprobs,
            });
        }
        if grammar_done || self.generated() >= self.req.max_new {
            // Release what the decoder and the stop matcher held back.
            let rest = self.decoder.flush(tok).unwrap_or_default();
            let done = if grammar_done {
                FinishReason::Stop
            } else {
                FinishReason::Length
            };
            let (more, reason) = match self.stop.push(&rest) {
                StopCheck::Continue(t) => (t + &self.stop.flush(), done),
                StopCheck::Stopped(t) => (t, FinishReason::Stop),
            };
            text.push_str(&more);
            let usage = Some(self.usage());
            return Some(Event {
                token: Some(token),
                text,
                logprobs,
                finish: Some(reason),
                usage,
                prompt_logprobs,
            });
        }
        self.send(Event {
            token: Some(token),
            text,
            logprobs,
            finish: None,
            usage: None,
            prompt_logprobs,
        });
        None
    }

    /// The final event for `reason`, unsent (see [`accept`](Self::accept)).
    pub fn final_event(&mut self, reason: FinishReason) -> Event {
        let text = self.stop.flush();
        Event {
            token: None,
            text,
            logprobs: None,
            finish: Some(reason),
            usage: Some(self.usage()),
            prompt_logprobs: self.first_extras(),
        }
    }

    /// Ends the request now with `reason`: frees its KV, then sends the final event.
    pub fn finish_with(mut self, reason: FinishReason) {
        let ev = self.final_event(reason);
        self.blocks = None;
        self.send(ev);
    }
}
