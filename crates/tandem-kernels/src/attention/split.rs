//! Task planning for paged attention, and flash-decoding: a lone decode has one task per KV
//! head (3 tasks on 2 threads here), so its keys are split into parts whose online-softmax
//! states are merged after the parallel loop (decode after 1,024 tokens: +12%).

use super::{AttnSeq, PagedLayout, Q_CHUNK};

/// One task: query chunk `c` of sequence `si` against KV head `g` over `blocks`; a sequence
/// whose keys are split over several tasks writes unnormalized state at `partial`.
pub(super) struct Work {
    pub si: usize,
    pub g: usize,
    pub c: usize,
    pub blocks: std::ops::Range<usize>,
    pub partial: Option<usize>,
}

impl Work {
    /// Floats of partial state: per row of the chunk, its max, its sum and `head_dim` values.
    pub fn partial_len(&self, seqs: &[AttnSeq], n_rep: usize, hd: usize) -> usize {
        let s = &seqs[self.si];
        let rows = ((self.c + 1) * Q_CHUNK).min(s.n_new) - self.c * Q_CHUNK;
        rows * n_rep * (2 + hd)
    }
}

/// Blocks a key range must have before it is split (flash-decoding).
const SPLIT_BLOCKS: usize = 8;
/// Most parts one sequence's keys are split into.
const MAX_PARTS: usize = 4;

/// The tasks of a batch: one per (sequence, KV head, query chunk). When that leaves too few
/// tasks for the pool (a lone decode: one task per KV head), the keys of short-query
/// sequences are split into parts whose softmax states are merged afterwards.
pub(super) fn plan(
    layout: &PagedLayout,
    seqs: &[AttnSeq],
    n_rep: usize,
    threads: usize,
) -> Vec<Work> {
    let base: usize = seqs
        .iter()
        .map(|s| layout.n_kv_heads * s.n_new.div_ceil(Q_CHUNK))
        .sum();
    let split = base < 2 * threads;
    let mut works = Vec::new();
    let mut offset = 0;
    for (si, s) in seqs.iter().enumerate() {
        let blocks = (s.context_len + s.n_new).div_ceil(layout.block_size);
        let parts = if split && s.n_new <= Q_CHUNK {
            (blocks / SPLIT_BLOCKS).clamp(1, MAX_PARTS)
        } else {
            1
        };
        for g in 0..layout.n_kv_heads {
            for c in 0..s.n_new.div_ceil(Q_CHUNK) {
                for p in 0..parts {
                    let range = blocks * p / parts..blocks * (p + 1) / parts;
                    let mut w = Work {
                        si,
                        g,
                        c,
                        blocks: range,
                        partial: None,
                    };
                    if parts > 1 {
                        w.partial = Some(offset);
                        offset += w.partial_len(seqs, n_rep, layout.head_dim);
                    }
                    works.push(w);
                }
            }
        }
    }
    works
}

/// Combines split tasks' softmax states: with `M` the largest part maximum,
/// `out = Σ e^(m_p - M) acc_p / Σ e^(m_p - M) l_p`.
pub(super) fn merge_parts(
    works: &[Work],
    seqs: &[AttnSeq],
    n_heads: usize,
    n_rep: usize,
    hd: usize,
    partial: &[f32],
    out: &mut [f32],
) {
    let mut i = 0;
    while i < works.len() {
        let w = &works[i];
        let Some(first) = w.partial else {
            i += 1;
            continue;
        };
        let parts = works[i..]
            .iter()
            .take_while(|x| (x.si, x.g, x.c) == (w.si, w.g, w.c) && x.partial.is_some())
            .count();
        let len = w.partial_len(seqs, n_rep, hd);
        let s = &seqs[w.si];
        let queries = w.c * Q_CHUNK..((w.c + 1) * Q_CHUNK).min(s.n_new);
        for (qi, t) in queries.enumerate() {
            let row = (s.row_start + t) * n_heads * hd;
            for r in 0..n_rep {
                let st = (qi * n_rep + r) * (2 + hd);
                let state = |p: usize| &partial[first + p * len + st..][..2 + hd];
                let mx = (0..parts)
                    .map(|p| state(p)[0])
                    .fold(f32::NEG_INFINITY, f32::max);
                let h = w.g * n_rep + r;
                let o = &mut out[row + h * hd..row + (h + 1) * hd];
                o.fill(0.0);
                let mut sum = 0f32;
                for p in 0..parts {
                    let st = state(p);
                    if st[0] == f32::NEG_INFINITY {
                        continue;
                    }
                    let f = (st[0] - mx).exp();
                    sum += f * st[1];
                    for (o, &a) in o.iter_mut().zip(&st[2..]) {
                        *o += f * a;
                    }
                }
                let inv = 1.0 / sum;
                o.iter_mut().for_each(|x| *x *= inv);
            }
        }
        i += parts;
    }
}
