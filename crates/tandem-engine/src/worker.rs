//! The engine loop: intake, cancellation, scheduling, one ragged forward, sampling, streaming.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_model::{KvCache, LlamaModel, LogitsMode, SeqInput, Tokenizer};

use crate::block_pool::{BlockTable, KvBlocks};
use crate::engine::{EngineConfig, EngineStats};
use crate::error::EngineError;
use crate::handoff::{HeldKv, KvRegion};
use crate::request::{FinishReason, Request};
use crate::sampler::{logprobs_of, sample, SampleContext};
use crate::scheduler::{blocks_for, schedule, Limits, Running, Waiting};
use crate::sequence::Sequence;

/// Messages to the engine loop.
pub(crate) enum Command {
    Generate(Request),
    /// Free KV held for a consumer.
    Release(u64),
    /// Set aside free blocks for imported KV.
    Reserve {
        blocks: usize,
        reply: tokio::sync::oneshot::Sender<Result<(u64, Vec<u32>), EngineError>>,
    },
    /// Return an unused reservation.
    Unreserve(u64),
    /// Start a sequence on reserved blocks that already hold its prompt's KV.
    Import {
        req: Request,
        reservation: u64,
        first_token: u32,
    },
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
    /// KV kept for consumers of prefill-only requests, by handle, with when it was held.
    held: HashMap<u64, (BlockTable, Instant)>,
    /// Blocks set aside for imported KV, by reservation id.
    reserved: HashMap<u64, BlockTable>,
    next_handle: u64,
    hold_timeout: Duration,
    /// Why the model cannot run any more (a tensor-parallel rank died): the engine stops.
    broken: Option<String>,
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
        let kv = model.new_kv_cache(num_blocks, cfg.block_size, cfg.kv_dtype);
        let max_batch_tokens = cfg.batch_tokens();
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
                max_batch_tokens,
                prefill_tokens: cfg.prefill_tokens(),
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
            held: HashMap::new(),
            reserved: HashMap::new(),
            next_handle: 1,
            hold_timeout: cfg.kv_hold_timeout,
            broken: None,
        }
    }

    /// The KV pool's tensors as raw regions, K0, V0, K1, V1, ...
    pub(crate) fn kv_regions(&mut self) -> Vec<KvRegion> {
        let mut out = Vec::with_capacity(2 * self.kv.num_layers());
        for l in 0..self.kv.num_layers() {
            let (k, v) = self.kv.layer_bytes_mut(l);
            for t in [k, v] {
                out.push(KvRegion {
                    addr: t.as_mut_ptr() as u64,
                    len: t.len(),
                });
            }
        }
        out
    }

    pub(crate) fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                // Idle: wake up now and then while KV is held, to expire it, and while other
                // tensor-parallel ranks run, to notice one that died.
                let sharded = self.model.rank().1 > 1;
                let cmd = if self.held.is_empty() && !sharded {
                    self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
                } else {
                    self.rx
                        .recv_timeout(Duration::from_millis(if sharded { 200 } else { 500 }))
                };
                if let Err(e) = self.model.check_group() {
                    self.broken = Some(format!("the engine stopped: {e}"));
                }
                match cmd {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            break;
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
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
            self.expire_held();
            if !self.running.is_empty() || !self.waiting.is_empty() {
                self.step();
            }
            self.publish();
            if let Some(why) = self.broken.take() {
                // Everything still queued fails the same way; the engine is gone.
                self.finish_all(FinishReason::Error(why));
                return;
            }
        }
        self.abort_all();
    }

    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Generate(req) => {
                let seq = Sequence::new(self.next_id, req, self.limits.block_size);
                self.next_id += 1;
                self.waiting.push_back(seq);
            }
            Command::Release(handle) => {
                self.held.remove(&handle);
            }
            Command::Reserve { blocks, reply } => {
                let mut table = self.blocks.table();
                let free = self.blocks.pool().num_free();
                let result = if table.grow_to(blocks) {
                    let id = self.next_handle;
                    self.next_handle += 1;
                    let ids = table.ids().to_vec();
                    self.reserved.insert(id, table);
                    Ok((id, ids))
                } else {
                    Err(EngineError::NoFreeBlocks {
                        wanted: blocks,
                        free,
                    })
                };
                if let Err(Ok((id, _))) = reply.send(result) {
                    self.reserved.remove(&id); // the caller is gone
                }
            }
            Command::Unreserve(id) => {
                self.reserved.remove(&id);
            }
            Command::Import {
                req,
                reservation,
                first_token,
            } => self.import(req, reservation, first_token),
            Command::Shutdown => return false,
        }
        self.publish();
        true
    }

    /// Starts a sequence whose prompt KV sits in reserved blocks: it resumes as if it had
    /// just sampled `first_token`.
    fn import(&mut self, req: Request, reservation: u64, first_token: u32) {
        let mut s = Sequence::new(self.next_id, req, self.limits.block_size);
        self.next_id += 1;
        let Some(table) = self.reserved.remove(&reservation) else {
            s.finish_with(FinishReason::Error(format!(
                "no KV reservation {reservation}"
            )));
            return;
        };
        s.computed = s.tokens.len();
        s.blocks = Some(table);
        s.register_computed_blocks(self.limits.block_size);
        match s.accept(&self.tok, first_token, None, &self.eos) {
            Some(ev) => {
                let tx = s.req.events.clone();
                drop(s);
                self.publish();
                let _ = tx.send(ev);
            }
            None => self.running.push(s),
        }
    }

    /// Frees KV whose consumer never confirmed.
    fn expire_held(&mut self) {
        let timeout = self.hold_timeout;
        let before = self.held.len();
        self.held.retain(|_, (_, since)| since.elapsed() < timeout);
        if self.held.len() < before {
            tracing::warn!(
                expired = before - self.held.len(),
                "held KV expired before its consumer released it"
            );
        }
    }

    fn abort_all(&mut self) {
        self.finish_all(FinishReason::Abort);
    }

    /// Ends every running and waiting sequence with `reason`.
    fn finish_all(&mut self, reason: FinishReason) {
        let all: Vec<Sequence> = self
            .running
            .drain(..)
            .chain(self.waiting.drain(..))
            .collect();
        self.publish();
        for s in all {
            s.finish_with(reason.clone());
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
        self.counters.blocks_held = self.held.values().map(|(t, _)| t.len()).sum();
        self.counters.blocks_reserved = self.reserved.values().map(|t| t.len()).sum();
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
                    let usable = if s.scores_prompt() {
                        0
                    } else {
                        (s.tokens.len() - 1) / bs
                    };
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
            let usable = if s.scores_prompt() {
                0
            } else {
                ((s.tokens.len() - 1) / bs).min(s.keys.len())
            };
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
                    logits: logits_mode(s, n),
                }
            })
            .collect();
        let result = self.model.forward(&tokens, &inputs, &mut self.kv);
        drop(inputs);
        self.counters.steps += 1;
        self.counters.tokens_computed += tokens.len() as u64;
        let mut logits = match result {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("forward failed: {e}");
                if e.is_fatal() {
                    self.broken = Some(format!("the engine stopped: {e}"));
                }
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
        // The greedy rows' argmax, on the compute threads (see `SampleContext::argmax`).
        let greedy: Vec<usize> = (0..logits.rows.len())
            .filter(|&i| !self.running[order[logits.rows[i].0].0].req.params.do_sample)
            .collect();
        let mut known = vec![None; logits.rows.len()];
        for (&i, t) in greedy.iter().zip(self.model.argmax_rows(&logits, &greedy)) {
            known[i] = Some(t);
        }
        let mut finished = Vec::new();
        let mut row = 0;
        for &(k, n) in &order {
            let s = &mut self.running[k];
            let mode = logits_mode(s, n);
            if mode == LogitsMode::All {
                score_prompt(s, n, |j| logits.row(row + j));
                row += n - 1;
            }
            s.computed += n;
            s.register_computed_blocks(bs);
            if s.computed < s.tokens.len() {
                if mode == LogitsMode::All {
                    row += 1;
                }
                continue;
            }
            // Sampled in place: this row is not read again.
            let argmax = known[row];
            let l = logits.row_mut(row);
            row += 1;
            if s.generated() == 0 && s.req.max_new == 0 {
                // Scoring only: the prompt's log-probabilities are the result.
                finished.push((k, s.final_event(FinishReason::Length)));
                continue;
            }
            let mask = match s.req.constraint.as_mut().map(|c| c.mask()) {
                Some(Err(why)) => {
                    let ev = s.final_event(FinishReason::Error(format!("grammar: {why}")));
                    finished.push((k, ev));
                    continue;
                }
                Some(Ok(m)) => Some(m),
                None => None,
            };
            let suppress: &[u32] = if s.generated() < s.req.params.min_new_tokens {
                &self.eos
            } else {
                &[]
            };
            let params = s.req.params.clone();
            let ctx = SampleContext {
                history: &s.tokens,
                prompt_len: s.req.prompt.len(),
                suppress,
                allowed: mask.as_ref(),
                argmax,
            };
            let (token, lp) = sample(l, &params, &ctx, &mut s.rng);
            match s.accept(&self.tok, token, lp, &self.eos) {
                Some(ev) => finished.push((k, ev)),
                // The next mask is computed while the next forward pass runs.
                None => {
                    if let Some(c) = s.req.constraint.as_mut() {
                        c.prefetch_mask();
                    }
                }
            }
        }
        self.model.recycle(logits);
        // Free finished sequences and publish the counters before telling their clients.
        finished.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        let mut finals = Vec::with_capacity(finished.len());
        for (k, ev) in finished {
            let mut s = self.running.remove(k);
            if let (Some(hold), Some(table)) = (s.req.hold.take(), s.blocks.take()) {
                let handle = self.next_handle;
                self.next_handle += 1;
                let blocks = table.ids().to_vec();
                self.held.insert(handle, (table, Instant::now()));
                if hold.send(HeldKv { handle, blocks }).is_err() {
                    self.held.remove(&handle); // nobody will pull it
                }
            }
            finals.push((s.req.events.clone(), ev));
        }
        self.publish();
        for (tx, ev) in finals {
            let _ = tx.send(ev);
        }
    }
}

/// Which logits a chunk of `n` tokens of `s` needs: every position while scoring the prompt,
/// the last one when the chunk completes the sequence, else none.
fn logits_mode(s: &Sequence, n: usize) -> LogitsMode {
    if s.scores_prompt() && s.computed < s.req.prompt.len() {
        LogitsMode::All
    } else if s.computed + n == s.tokens.len() {
        LogitsMode::Last
    } else {
        LogitsMode::None
    }
}

/// Records the log-probabilities of the prompt tokens that the chunk's logits predict: row
/// `j` (the chunk's `j`-th position) scores the token after it.
fn score_prompt<'a>(s: &mut Sequence, n: usize, row: impl Fn(usize) -> &'a [f32]) {
    let top = s.req.params.prompt_logprobs.unwrap_or(0);
    let prompt_len = s.req.prompt.len();
    if s.computed == 0 && s.prompt_lps.is_empty() {
        s.prompt_lps.push(None);
    }
    for j in 0..n {
        let next = s.computed + j + 1;
        // Positions recomputed after a preemption are already scored.
        if next < prompt_len && next == s.prompt_lps.len() {
            let lp = logprobs_of(row(j), s.req.prompt[next], top);
            s.prompt_lps.push(Some(lp));
        }
    }
}
