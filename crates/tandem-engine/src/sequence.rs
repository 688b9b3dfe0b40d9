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
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    sent_any: bool,
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
            sent_any: false,
        }
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

    /// Extends the prefix keys to the full blocks of `tokens`.
    pub fn update_keys(&mut self, block_size: usize) {
        let full = self.tokens.len() / block_size;
        if full > self.keys.len() {
            self.keys = block_keys(&self.tokens, block_size);
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
        self.sent_any = true;
        // A closed stream is noticed by `cancelled()` before the next step.
        let _ = self.req.events.send(ev);
    }

    /// Handles a sampled token: appends it, streams its text, and returns whether the request
    /// is now finished.
    pub fn accept(
        &mut self,
        tok: &Tokenizer,
        token: u32,
        logprobs: Option<TokenLogprobs>,
        eos: &[u32],
    ) -> bool {
        let p = &self.req.params;
        let is_eos = !p.ignore_eos && eos.contains(&token);
        if is_eos {
            let text = self.stop.flush();
            self.finish_with(FinishReason::Stop, text);
            return true;
        }
        self.tokens.push(token);
        let piece = self.decoder.push(tok, token).unwrap_or_default();
        let (text, stopped) = match self.stop.push(&piece) {
            StopCheck::Continue(t) => (t, false),
            StopCheck::Stopped(t) => (t, true),
        };
        let at_length = self.generated() >= self.req.max_new;
        if stopped || at_length {
            let mut text = text;
            if !stopped {
                text.push_str(&self.decoder.flush(tok).unwrap_or_default());
                text.push_str(&self.stop.flush());
            }
            let reason = if stopped {
                FinishReason::Stop
            } else {
                FinishReason::Length
            };
            let usage = Some(self.usage());
            self.send(Event {
                token: Some(token),
                text,
                logprobs,
                finish: Some(reason),
                usage,
            });
            return true;
        }
        self.send(Event {
            token: Some(token),
            text,
            logprobs,
            finish: None,
            usage: None,
        });
        false
    }

    /// Sends the final event without a token.
    pub fn finish_with(&mut self, reason: FinishReason, text: String) {
        let usage = Some(self.usage());
        self.send(Event {
            token: None,
            text,
            logprobs: None,
            finish: Some(reason),
            usage,
        });
    }
}
