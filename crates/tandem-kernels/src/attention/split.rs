//! Task planning for paged attention, with numerics that do not depend on the batch or the
//! thread count. A sequence's keys are cut into fixed chunks of [`CHUNK_KEYS`] positions (whole
//! blocks); each chunk's online-softmax state starts fresh, and a query's output is its chunks'
//! states merged in chunk order. Which task computes which chunks (one task all of them, or
//! several in parallel: flash-decoding, for a lone decode whose one task per KV head would
//! leave threads idle) changes the speed, never the numbers. So a request's tokens are the same
//! alone, in any batch, and on any number of threads.

use std::ops::Range;

use super::{AttnSeq, PagedLayout, Q_CHUNK};
use crate::par::{for_each_task, SyncPtr};

/// Keys per chunk (rounded to whole blocks).
pub(super) const CHUNK_KEYS: usize = 128;
/// Most tasks one (sequence, KV head, query chunk) is spread over.
const MAX_PARTS: usize = 4;

/// Blocks per key chunk for `block_size`-token blocks.
pub(super) fn chunk_blocks(block_size: usize) -> usize {
    (CHUNK_KEYS / block_size).max(1)
}

/// One task: query chunk `c` of sequence `si` against KV head `g` over key `chunks`. When the
/// queries' chunks are spread over several tasks, each chunk's unnormalized state is written to
/// `partial` (consecutive chunks at consecutive places) and merged after the parallel loop; a
/// task that has all of them merges them itself (the same arithmetic, see [`merge_states`]).
pub(super) struct Work {
    pub si: usize,
    pub g: usize,
    pub c: usize,
    pub chunks: Range<usize>,
    pub partial: Option<usize>,
}

impl Work {
    /// Query rows of the task.
    fn rows(&self, seqs: &[AttnSeq]) -> usize {
        let s = &seqs[self.si];
        ((self.c + 1) * Q_CHUNK).min(s.n_new) - self.c * Q_CHUNK
    }

    /// Floats of one chunk's state: per row and head of the group, its max, its sum and
    /// `head_dim` values.
    pub fn chunk_len(&self, seqs: &[AttnSeq], n_rep: usize, hd: usize) -> usize {
        self.rows(seqs) * n_rep * (2 + hd)
    }
}

/// Key chunks that query chunk `c` of `s` can see.
fn visible_chunks(layout: &PagedLayout, s: &AttnSeq, c: usize) -> usize {
    let end = s.context_len + ((c + 1) * Q_CHUNK).min(s.n_new);
    end.div_ceil(layout.block_size)
        .div_ceil(chunk_blocks(layout.block_size))
}

/// The tasks of a batch: one per (sequence, KV head, query chunk); when that leaves too few
/// tasks for the pool, the key chunks of short-query sequences are spread over several tasks.
/// Returns the tasks and the floats of partial state they need.
pub(super) fn plan(
    layout: &PagedLayout,
    seqs: &[AttnSeq],
    n_rep: usize,
    threads: usize,
) -> (Vec<Work>, usize) {
    let base: usize = seqs
        .iter()
        .map(|s| layout.n_kv_heads * s.n_new.div_ceil(Q_CHUNK))
        .sum();
    let spread = base < 2 * threads;
    let mut works = Vec::new();
    let mut offset = 0;
    for (si, s) in seqs.iter().enumerate() {
        for g in 0..layout.n_kv_heads {
            for c in 0..s.n_new.div_ceil(Q_CHUNK) {
                let n_ch = visible_chunks(layout, s, c);
                let parts = if spread && s.n_new <= Q_CHUNK {
                    n_ch.clamp(1, MAX_PARTS)
                } else {
                    1
                };
                for p in 0..parts {
                    let mut w = Work {
                        si,
                        g,
                        c,
                        chunks: n_ch * p / parts..n_ch * (p + 1) / parts,
                        partial: None,
                    };
                    if parts > 1 {
                        w.partial = Some(offset);
                        offset += w.chunk_len(seqs, n_rep, layout.head_dim) * w.chunks.len();
                    }
                    works.push(w);
                }
            }
        }
    }
    (works, offset)
}

/// Combines the chunk states of queries that see several chunks, in chunk order: with `M` the
/// largest chunk maximum, `out = Σ e^(m_k - M) acc_k / Σ e^(m_k - M) l_k`. The groups of works
/// (one query chunk of one KV head) write disjoint outputs and are merged in parallel when
/// there are enough of them.
pub(super) fn merge_chunks(
    works: &[Work],
    seqs: &[AttnSeq],
    n_heads: usize,
    n_rep: usize,
    hd: usize,
    partial: &[f32],
    out: &mut [f32],
) {
    // (first work, works, first partial state) of each group with partial states.
    let mut groups = Vec::new();
    let mut i = 0;
    while i < works.len() {
        let w = &works[i];
        let parts = works[i..]
            .iter()
            .take_while(|x| (x.si, x.g, x.c) == (w.si, w.g, w.c))
            .count();
        if let Some(first) = w.partial {
            groups.push((i, parts, first));
        }
        i += parts;
    }
    let dst = SyncPtr(out.as_mut_ptr());
    let merge = |gi: usize| {
        let (i, parts, first) = groups[gi];
        let w = &works[i];
        let chunks: usize = works[i..i + parts].iter().map(|x| x.chunks.len()).sum();
        let len = w.chunk_len(seqs, n_rep, hd);
        let s = &seqs[w.si];
        let queries = w.c * Q_CHUNK..((w.c + 1) * Q_CHUNK).min(s.n_new);
        for (qi, t) in queries.enumerate() {
            let row = (s.row_start + t) * n_heads * hd;
            for r in 0..n_rep {
                let st = (qi * n_rep + r) * (2 + hd);
                let h = w.g * n_rep + r;
                // SAFETY: query t's head h belongs to this group only.
                let o = unsafe { dst.slice_mut(row + h * hd, hd) };
                merge_states(chunks, |k| &partial[first + k * len + st..][..2 + hd], o);
            }
        }
    };
    // A lone decode's few groups are less work than waking the pool.
    if groups.len() >= 8 {
        for_each_task(groups.len(), merge);
    } else {
        (0..groups.len()).for_each(merge);
    }
}

/// One (query, head)'s output from its `chunks` key-chunk states (`state(k)`: max, sum, then
/// `head_dim` weighted value sums), in chunk order: with `M` the largest chunk maximum,
/// `out = Σ e^(m_k - M) acc_k / Σ e^(m_k - M) l_k`. Every merge of chunk states goes through
/// here, in a task or after the parallel loop, so where the chunks were computed never
/// changes the bits.
pub(super) fn merge_states<'a>(chunks: usize, state: impl Fn(usize) -> &'a [f32], out: &mut [f32]) {
    let mx = (0..chunks)
        .map(|k| state(k)[0])
        .fold(f32::NEG_INFINITY, f32::max);
    out.fill(0.0);
    let mut sum = 0f32;
    for k in 0..chunks {
        let st = state(k);
        if st[0] == f32::NEG_INFINITY {
            continue;
        }
        let f = (st[0] - mx).exp();
        sum += f * st[1];
        for (o, &a) in out.iter_mut().zip(&st[2..]) {
            *o += f * a;
        }
    }
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|x| *x *= inv);
}
