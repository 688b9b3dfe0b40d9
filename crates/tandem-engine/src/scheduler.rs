//! Continuous batching with Dynamic SplitFuse, as a pure function of (running sequences,
//! waiting queue, free KV blocks, limits).
//!
//! Each step fills a token budget (a larger one when nothing is decoding): decodes first (one
//! token each, oldest first), then prompt chunks in arrival order, the prompt that overflows
//! the budget split so the budget is met exactly. A prompt is admitted only if KV for all of
//! it can be reserved, so admitted work always progresses. When a running sequence needs a
//! block and none is free, the youngest sequence (by arrival) is preempted and recomputed
//! later, never everything; the oldest sequence therefore always progresses and every request
//! finishes.

/// Batch limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Tokens per forward (FastGen's `max_ragged_batch_size`).
    pub max_batch_tokens: usize,
    /// Tokens per forward when no sequence is decoding, if more (a step that only prefills
    /// slows no token stream down, and fewer, larger prompt chunks reach the first token
    /// sooner).
    pub prefill_tokens: usize,
    /// Sequences per forward (`max_ragged_sequence_count`).
    pub max_batch_seqs: usize,
    /// Tokens per KV block.
    pub block_size: usize,
}

/// A sequence holding KV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Running {
    /// Request id; lower ids arrived earlier and have priority.
    pub id: u64,
    /// Tokens known (prompt and generated).
    pub total: usize,
    /// Tokens whose KV is computed.
    pub computed: usize,
    /// Blocks held.
    pub blocks: usize,
}

/// A request waiting for admission (new, or preempted and to be recomputed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiting {
    /// Request id.
    pub id: u64,
    /// Tokens to compute (prompt, plus what it generated before a preemption).
    pub total: usize,
    /// Leading blocks found in the prefix cache.
    pub cached_blocks: usize,
    /// How many of those are currently free (using them takes them off the free list).
    pub cached_free: usize,
}

/// What to do this step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Running sequences to preempt (free their KV; recompute later).
    pub preempt: Vec<u64>,
    /// Waiting requests to admit: match their cached prefix, reserve KV for all their tokens.
    pub admit: Vec<u64>,
    /// `(id, tokens to run)` in batch order.
    pub chunks: Vec<(u64, usize)>,
}

/// Blocks needed to hold `tokens` positions.
pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

/// Plans one forward.
pub fn schedule(
    running: &[Running],
    waiting: &[Waiting],
    free_blocks: usize,
    limits: &Limits,
) -> Plan {
    let bs = limits.block_size;
    let mut plan = Plan::default();
    let decoding = running.iter().any(|r| r.total - r.computed == 1);
    let mut budget = if decoding {
        limits.max_batch_tokens
    } else {
        limits.max_batch_tokens.max(limits.prefill_tokens)
    };
    let mut seqs_left = limits.max_batch_seqs;
    let mut free = free_blocks;
    let mut order: Vec<&Running> = running.iter().collect();
    order.sort_by_key(|r| r.id);
    let mut preempted = vec![false; order.len()];
    for i in 0..order.len() {
        if preempted[i] {
            continue;
        }
        if budget == 0 || seqs_left == 0 {
            break;
        }
        let r = order[i];
        let n = (r.total - r.computed).min(budget);
        if n == 0 {
            continue;
        }
        let need = blocks_for(r.computed + n, bs).saturating_sub(r.blocks);
        // Free blocks by preempting the youngest not yet scheduled (possibly r itself).
        while need > free {
            let victim = (i..order.len())
                .rev()
                .find(|&j| !preempted[j])
                .expect("r itself qualifies");
            preempted[victim] = true;
            plan.preempt.push(order[victim].id);
            if victim == i {
                break;
            }
            free += order[victim].blocks;
        }
        if preempted[i] {
            continue;
        }
        free -= need;
        budget -= n;
        seqs_left -= 1;
        plan.chunks.push((r.id, n));
    }
    // New prompts only when nothing had to be preempted (else they would be thrown out again).
    if plan.preempt.is_empty() {
        for w in waiting {
            if budget == 0 || seqs_left == 0 {
                break;
            }
            let cached = w.cached_blocks.min((w.total - 1) / bs);
            let need = blocks_for(w.total, bs) - cached + w.cached_free.min(cached);
            if need > free {
                break; // FIFO: no overtaking the head of the queue.
            }
            let n = (w.total - cached * bs).min(budget);
            free -= need;
            budget -= n;
            seqs_left -= 1;
            plan.admit.push(w.id);
            plan.chunks.push((w.id, n));
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const L: Limits = Limits {
        max_batch_tokens: 64,
        prefill_tokens: 64,
        max_batch_seqs: 4,
        block_size: 8,
    };

    #[test]
    fn decodes_first_then_prompts_split_to_fill_the_budget() {
        let running = [Running {
            id: 1,
            total: 11,
            computed: 10,
            blocks: 2,
        }];
        let waiting = [Waiting {
            id: 2,
            total: 100,
            cached_blocks: 0,
            cached_free: 0,
        }];
        let p = schedule(&running, &waiting, 100, &L);
        assert_eq!(p.chunks, vec![(1, 1), (2, 63)]);
        assert_eq!(p.admit, vec![2]);
    }

    #[test]
    fn a_step_without_decodes_takes_the_prefill_budget() {
        let lim = Limits {
            max_batch_tokens: 24,
            prefill_tokens: 64,
            ..L
        };
        let prompt = |id| Waiting {
            id,
            total: 100,
            cached_blocks: 0,
            cached_free: 0,
        };
        assert_eq!(schedule(&[], &[prompt(2)], 100, &lim).chunks, vec![(2, 64)]);
        let decoding = [Running {
            id: 1,
            total: 11,
            computed: 10,
            blocks: 2,
        }];
        let p = schedule(&decoding, &[prompt(2)], 100, &lim);
        assert_eq!(p.chunks, vec![(1, 1), (2, 23)]);
    }

    #[test]
    fn youngest_is_preempted_when_blocks_run_out() {
        let running = [
            Running {
                id: 1,
                total: 17,
                computed: 16,
                blocks: 2,
            },
            Running {
                id: 2,
                total: 17,
                computed: 16,
                blocks: 2,
            },
        ];
        let p = schedule(&running, &[], 0, &L);
        assert_eq!(p.preempt, vec![2]);
        assert_eq!(p.chunks, vec![(1, 1)]);
    }

    /// A simulated engine: KV accounting as the engine does it, with recompute on preemption.
    #[derive(Debug, Clone)]
    struct Req {
        id: u64,
        prompt: usize,
        gen: usize,
        generated: usize,
        computed: usize,
        blocks: usize,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Budget and limits are respected, blocks are conserved, and every request finishes
        /// (no deadlock, no starvation) in a bounded number of steps.
        #[test]
        fn every_request_finishes(reqs in proptest::collection::vec((1usize..60, 1usize..40), 1..12),
                                  pool in 12usize..40, budget in 1usize..80, prefill in 1usize..120, max_seqs in 1usize..6) {
            let lim = Limits { max_batch_tokens: budget, prefill_tokens: prefill, max_batch_seqs: max_seqs, block_size: 8 };
            // Requests larger than the pool are rejected at submission, as the engine does.
            let mut waiting: Vec<Req> = reqs.iter().enumerate()
                .map(|(i, &(p, g))| Req { id: i as u64, prompt: p, gen: g, generated: 0, computed: 0, blocks: 0 })
                .filter(|r| blocks_for(r.prompt + r.gen, 8) <= pool)
                .collect();
            let n_reqs = waiting.len();
            let mut running: Vec<Req> = vec![];
            let mut free = pool;
            let mut done = 0;
            for _step in 0..20_000 {
                if running.is_empty() && waiting.is_empty() { break; }
                let rv: Vec<Running> = running.iter().map(|r| Running { id: r.id, total: r.prompt + r.generated, computed: r.computed, blocks: r.blocks }).collect();
                let wv: Vec<Waiting> = waiting.iter().map(|r| Waiting { id: r.id, total: r.prompt + r.generated, cached_blocks: 0, cached_free: 0 }).collect();
                let plan = schedule(&rv, &wv, free, &lim);
                let tokens: usize = plan.chunks.iter().map(|c| c.1).sum();
                let decoding = rv.iter().any(|r| r.total - r.computed == 1);
                let cap = if decoding { budget } else { budget.max(prefill) };
                prop_assert!(tokens <= cap && plan.chunks.len() <= max_seqs);
                prop_assert!(!plan.chunks.is_empty() || !plan.preempt.is_empty(), "no progress: {:?} {:?} free {}", rv, wv, free);
                for id in &plan.preempt {
                    let k = running.iter().position(|r| r.id == *id).unwrap();
                    let mut r = running.remove(k);
                    free += r.blocks;
                    r.blocks = 0;
                    r.computed = 0;
                    let at = waiting.iter().position(|w| w.id > r.id).unwrap_or(waiting.len());
                    waiting.insert(at, r);
                }
                for id in &plan.admit {
                    let k = waiting.iter().position(|w| w.id == *id).unwrap();
                    let mut r = waiting.remove(k);
                    r.blocks = blocks_for(r.prompt + r.generated, 8);
                    prop_assert!(r.blocks <= free);
                    free -= r.blocks;
                    running.push(r);
                }
                for (id, n) in &plan.chunks {
                    let r = running.iter_mut().find(|r| r.id == *id).unwrap();
                    let need = blocks_for(r.computed + n, 8).saturating_sub(r.blocks);
                    prop_assert!(need <= free);
                    free -= need;
                    r.blocks += need;
                    r.computed += n;
                    if r.computed == r.prompt + r.generated {
                        r.generated += 1;
                    }
                }
                let before = running.len();
                running.retain(|r| {
                    let fin = r.generated >= r.gen;
                    if fin { free += r.blocks; }
                    !fin
                });
                done += before - running.len();
                let held: usize = running.iter().map(|r| r.blocks).sum();
                prop_assert_eq!(held + free, pool);
            }
            prop_assert_eq!(done, n_reqs, "not every request finished");
        }
    }
}
