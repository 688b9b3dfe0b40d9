//! The engine loop: intake, cancellation, scheduling, one ragged forward, sampling, streaming.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};

use tandem_model::{KvCache, LlamaModel, LogitsMode, SeqInput, Tokenizer};

use crate::block_pool::KvBlocks;
use crate::engine::{EngineConfig, EngineStats};
use crate::request::{FinishReason, Request};
use crate::sampler::sample;
use crate::scheduler::{blocks_for, schedule, Limits, Running, Waiting};
use crate::sequence::Sequence;

/// Messages to the engine loop.
pub(crate) enum Command {
    Generate(Request),
    Shutdown,
}

pub(crate) struct Worker {
    model: LlamaModel,
    tok: Arc<Tokenizer>,
    kv: KvCache,
    blocks: KvBlocks,
    limits: Limits,
    eos: Vec<u32>,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    rx: Receiver<Command>,
    next_id: u64,
    stats: Arc<Mutex<EngineStats>>,
    counters: EngineStats,
}

impl Worker {
    pub(crate) fn new(
        model: LlamaModel,
        tok: Arc<Tokenizer>,
        cfg: &EngineConfig,
        num_blocks: usize,
        rx: Receiver<Command>,
        stats: Arc<Mutex<EngineStats>>,
    ) -> Worker {
        let kv = KvCache::new(model.config(), num_blocks, cfg.block_size, cfg.kv_dtype);
        let mut eos = tok.eos_ids().to_vec();
        for e in model.config().eos_ids() {
            if !eos.contains(&e) {
                eos.push(e);
            }
        }
        Worker {
            model,
            tok,
            kv,
            blocks: KvBlocks::new(num_blocks),
            limits: Limits {
                max_batch_tokens: cfg.max_batch_tokens,
                max_batch_seqs: cfg.max_batch_seqs,
                block_size: cfg.block_size,
            },
            eos,
            waiting: VecDeque::new(),
            running: Vec::new(),
            rx,
            next_id: 0,
            stats,
            counters: EngineStats::default(),
        }
    }

    pub(crate) fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match self.rx.recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            self.abort_all();
                            return;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.abort_all();
                        return;
                    }
                }
            }
            self.reap_cancelled();
            if !self.running.is_empty() || !self.waiting.is_empty() {
                self.step();
            }
            self.publish();
        }
        self.abort_all();
    }

    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Generate(req) => {
                let seq = Sequence::new(self.next_id, req, self.limits.block_size);
                self.next_id += 1;
                self.waiting.push_back(seq);
                true
            }
            Command::Shutdown => false,
        }
    }

    fn abort_all(&mut self) {
        let all: Vec<Sequence> = self
            .running
            .drain(..)
            .chain(self.waiting.drain(..))
            .collect();
        self.publish();
        for s in all {
            s.finish_with(FinishReason::Abort);
        }
    }

    /// Requests whose stream was dropped: their blocks go back to the pool now.
    fn reap_cancelled(&mut self) {
        self.running.retain(|s| !s.cancelled());
        self.waiting.retain(|s| !s.cancelled());
    }

    fn publish(&mut self) {
        let p = self.blocks.stats();
        self.counters.running = self.running.len();
        self.counters.waiting = self.waiting.len();
        self.counters.blocks_in_use = p.in_use;
        self.counters.blocks_cached = p.cached_free;
        self.counters.prefix_lookups = p.lookups;
        self.counters.prefix_hits = p.hits;
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = self.counters;
    }

    fn step(&mut self) {
        let bs = self.limits.block_size;
        let running: Vec<Running> = self
            .running
            .iter()
            .map(|s| Running {
                id: s.id,
                total: s.tokens.len(),
                computed: s.computed,
                blocks: s.blocks.as_ref().map_or(0, |b| b.len()),
            })
            .collect();
        let waiting: Vec<Waiting> = {
            let pool = self.blocks.pool();
            self.waiting
                .iter()
                .take(self.limits.max_batch_seqs)
                .map(|s| {
                    let usable = (s.tokens.len() - 1) / bs;
                    let mut cached_free = 0;
                    let cached = s.keys[..usable.min(s.keys.len())]
                        .iter()
                        .take_while(|k| match pool.peek(**k) {
                            Some(free) => {
                                cached_free += free as usize;
                                true
                            }
                            None => false,
                        })
                        .count();
                    Waiting {
                        id: s.id,
                        total: s.tokens.len(),
                        cached_blocks: cached,
                        cached_free,
                    }
                })
                .collect()
        };
        let plan = schedule(
            &running,
            &waiting,
            self.blocks.pool().num_free(),
            &self.limits,
        );

        for id in &plan.preempt {
            let k = self
                .running
                .iter()
                .position(|s| s.id == *id)
                .expect("planned id is running");
            let mut s = self.running.remove(k);
            s.preempt();
            self.counters.preemptions += 1;
            let at = self
                .waiting
                .iter()
                .position(|w| w.id > s.id)
                .unwrap_or(self.waiting.len());
            self.waiting.insert(at, s);
        }
        // Admission in two phases: first every admitted request claims its cached prefix
        // (taking those blocks off the free list), then each allocates the rest; so one
        // admission's allocation cannot evict a prefix another was planned to reuse.
        let mut admitted = Vec::with_capacity(plan.admit.len());
        for id in &plan.admit {
            let k = self
                .waiting
                .iter()
                .position(|s| s.id == *id)
                .expect("planned id is waiting");
            let mut s = self.waiting.remove(k).expect("index valid");
            let mut table = self.blocks.table();
            let usable = ((s.tokens.len() - 1) / bs).min(s.keys.len());
            let hit = table.match_prefix(&s.keys[..usable]);
            s.computed = hit * bs;
            if s.generated() == 0 && s.cached_tokens == 0 {
                s.cached_tokens = s.computed;
            }
            s.blocks = Some(table);
            admitted.push(s);
        }
        for mut s in admitted {
            let whole = blocks_for(s.tokens.len(), bs);
            if s.blocks.as_mut().expect("just set").grow_to(whole) {
                self.running.push(s);
            } else {
                // Cannot happen with the scheduler's accounting; if it does, wait, never fail.
                tracing::warn!(
                    id = s.id,
                    "admission found fewer free blocks than planned; requeued"
                );
                s.preempt();
                let at = self
                    .waiting
                    .iter()
                    .position(|w| w.id > s.id)
                    .unwrap_or(self.waiting.len());
                self.waiting.insert(at, s);
            }
        }

        // Assemble the ragged batch.
        let mut tokens = Vec::new();
        let mut order = Vec::with_capacity(plan.chunks.len());
        for &(id, n) in &plan.chunks {
            let Some(k) = self.running.iter().position(|s| s.id == id) else {
                continue; // requeued at admission
            };
            let s = &mut self.running[k];
            let n = n.min(s.tokens.len() - s.computed);
            let table = s.blocks.as_mut().expect("running sequences hold blocks");
            if n == 0 || !table.grow_to(blocks_for(s.computed + n, bs)) {
                tracing::warn!(id, "no KV block for a planned chunk; it runs next step");
                continue;
            }
            tokens.extend_from_slice(&s.tokens[s.computed..s.computed + n]);
            order.push((k, n));
        }
        if order.is_empty() {
            return;
        }
        let inputs: Vec<SeqInput> = order
            .iter()
            .map(|&(k, n)| {
                let s = &self.running[k];
                SeqInput {
                    n_tokens: n,
                    context_len: s.computed,
                    block_table: s.blocks.as_ref().expect("held").ids(),
                    logits: if s.computed + n == s.tokens.len() {
                        LogitsMode::Last
                    } else {
                        LogitsMode::None
                    },
                }
            })
            .collect();
        let result = self.model.forward(&tokens, &inputs, &mut self.kv);
        drop(inputs);
        self.counters.steps += 1;
        self.counters.tokens_computed += tokens.len() as u64;
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("forward failed: {e}");
                let mut failed: Vec<usize> = order.iter().map(|o| o.0).collect();
                failed.sort_unstable_by(|a, b| b.cmp(a));
                for k in failed {
                    self.running
                        .remove(k)
                        .finish_with(FinishReason::Error(e.to_string()));
                }
                return;
            }
        };
        let mut finished = Vec::new();
        let mut row = 0;
        for &(k, n) in &order {
            let s = &mut self.running[k];
            s.computed += n;
            s.register_computed_blocks(bs);
            if s.computed < s.tokens.len() {
                continue;
            }
            let mut l = logits.row(row).to_vec();
            row += 1;
            let suppress: &[u32] = if s.generated() < s.req.params.min_new_tokens {
                &self.eos
            } else {
                &[]
            };
            let params = s.req.params.clone();
            let (token, lp) = sample(&mut l, &params, &s.tokens, suppress, &mut s.rng);
            if let Some(ev) = s.accept(&self.tok, token, lp, &self.eos) {
                finished.push((k, ev));
            }
        }
        // Free finished sequences and publish the counters before telling their clients.
        finished.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        let mut finals = Vec::with_capacity(finished.len());
        for (k, ev) in finished {
            let s = self.running.remove(k);
            finals.push((s.req.events.clone(), ev));
        }
        self.publish();
        for (tx, ev) in finals {
            let _ = tx.send(ev);
        }
    }
}
