//! Paged attention: K/V live in a pool of fixed-size blocks; a sequence's block table maps its
//! positions to blocks. Within a block each KV head's keys are stored transposed,
//! `[head_dim, block_size]`, and its values row by row, `[block_size, head_dim]` (see
//! [`PagedLayout::head_offset`]): the kernel reads one dimension of sixteen keys as one vector,
//! so scores need neither a transposition nor horizontal sums. Softmax is computed online block
//! by block (no score matrix), in f32.

use std::cell::Cell;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::ops::RopeStyle;
use crate::par::{for_each_range, SyncPtr};
#[cfg(target_arch = "x86_64")]
use crate::simd::SimdLevel;

mod split;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;

use split::{chunk_blocks, merge_chunks, merge_states, plan, Work};

/// Element type of the KV pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDType {
    /// Half precision (the default: half the memory and bandwidth).
    F16,
    /// Single precision (exact; used to check chunking invariance tightly).
    F32,
}

impl KvDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            KvDType::F16 => 2,
            KvDType::F32 => 4,
        }
    }
}

/// One layer's K or V tensor, read-only.
#[derive(Clone, Copy)]
pub enum KvRef<'a> {
    /// f16 elements.
    F16(&'a [f16]),
    /// f32 elements.
    F32(&'a [f32]),
}

/// One layer's K or V tensor, writable.
pub enum KvMut<'a> {
    /// f16 elements.
    F16(&'a mut [f16]),
    /// f32 elements.
    F32(&'a mut [f32]),
}

impl KvRef<'_> {
    fn len(&self) -> usize {
        match self {
            KvRef::F16(s) => s.len(),
            KvRef::F32(s) => s.len(),
        }
    }

    /// Copies `out.len()` consecutive elements from `start` as f32.
    #[inline]
    fn read(&self, start: usize, out: &mut [f32]) {
        match self {
            KvRef::F16(s) => s[start..start + out.len()].convert_to_f32_slice(out),
            KvRef::F32(s) => out.copy_from_slice(&s[start..start + out.len()]),
        }
    }
}

impl KvMut<'_> {
    /// The tensor as a pointer that row tasks writing disjoint slots share.
    fn ptr(&mut self) -> KvPtr {
        match self {
            KvMut::F16(s) => KvPtr::F16(SyncPtr(s.as_mut_ptr()), s.len()),
            KvMut::F32(s) => KvPtr::F32(SyncPtr(s.as_mut_ptr()), s.len()),
        }
    }
}

/// One layer's K or V tensor (its first element and length), written by row tasks.
#[derive(Clone, Copy)]
enum KvPtr {
    F16(SyncPtr<f16>, usize),
    F32(SyncPtr<f32>, usize),
}

impl KvPtr {
    /// Writes `src` to the elements from `start` on.
    ///
    /// # Safety
    /// No other task touches those elements meanwhile (they are checked to be in bounds).
    unsafe fn write(self, start: usize, src: &[f32]) {
        match self {
            KvPtr::F16(p, len) => {
                assert!(start + src.len() <= len, "KV write out of the pool");
                p.slice_mut(start, src.len()).convert_from_f32_slice(src)
            }
            KvPtr::F32(p, len) => {
                assert!(start + src.len() <= len, "KV write out of the pool");
                p.slice_mut(start, src.len()).copy_from_slice(src)
            }
        }
    }

    /// Writes `src` to elements `stride` apart from `start` (one key of a block). The f16
    /// conversion is done a vector at a time into a buffer first: element by element it was a
    /// call per value, and a reference-model layer's K and V writes for a 512-token prompt
    /// took 182 us instead of 99 (32 sequences' decode tokens: 11.4 us instead of 6.2).
    ///
    /// # Safety
    /// As for [`KvPtr::write`].
    unsafe fn write_strided(self, start: usize, stride: usize, src: &[f32]) {
        let Some(last) = src.len().checked_sub(1) else {
            return;
        };
        let span = last * stride + 1;
        match self {
            KvPtr::F16(p, len) => {
                assert!(start + span <= len, "KV write out of the pool");
                const CHUNK: usize = 64;
                let mut buf = [f16::ZERO; CHUNK];
                let dst = p.slice_mut(start, span);
                for (c, part) in src.chunks(CHUNK).enumerate() {
                    let half = &mut buf[..part.len()];
                    half.convert_from_f32_slice(part);
                    let at = c * CHUNK * stride;
                    for (d, &x) in half.iter().enumerate() {
                        dst[at + d * stride] = x;
                    }
                }
            }
            KvPtr::F32(p, len) => {
                assert!(start + span <= len, "KV write out of the pool");
                let dst = p.slice_mut(start, span);
                for (d, &x) in dst.iter_mut().step_by(stride).zip(src) {
                    *d = x;
                }
            }
        }
    }
}

/// Geometry of the block pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedLayout {
    /// Tokens per block.
    pub block_size: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
}

impl PagedLayout {
    /// Elements per token slot (all KV heads).
    pub fn token_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Elements of one block (all KV heads), in K and in V alike.
    pub fn block_width(&self) -> usize {
        self.block_size * self.token_width()
    }

    /// Element offset of KV head `g`'s part of pool block `block`, in K and in V: there its
    /// keys are `[head_dim, block_size]` (element `d` of the block's key `j` at
    /// `d * block_size + j`) and its values `[block_size, head_dim]` (at `j * head_dim + d`).
    /// A block stays one contiguous range, so moving KV is still moving block ids.
    #[inline]
    pub fn head_offset(&self, block: usize, g: usize) -> usize {
        block * self.block_width() + g * self.block_size * self.head_dim
    }
}

/// One sequence's part of a ragged batch, as attention sees it.
#[derive(Clone, Copy, Debug)]
pub struct AttnSeq<'a> {
    /// Index of its first new token in the batch's rows.
    pub row_start: usize,
    /// Number of new tokens.
    pub n_new: usize,
    /// Tokens already in the cache before these (the first new token's position).
    pub context_len: usize,
    /// Its blocks, covering `context_len + n_new` positions.
    pub block_table: &'a [u32],
}

/// Each new row's pool slot, `(block, position in the block)`, in batch order (`None` for a
/// row of no sequence), and whether no two rows share one (then their tasks may write in
/// parallel).
fn new_slots(
    layout: &PagedLayout,
    seqs: &[AttnSeq],
    rows: usize,
) -> (Vec<Option<(usize, usize)>>, bool) {
    let bs = layout.block_size;
    let mut slots = vec![None; rows];
    for s in seqs {
        for i in 0..s.n_new {
            let pos = s.context_len + i;
            slots[s.row_start + i] = Some((s.block_table[pos / bs] as usize, pos % bs));
        }
    }
    let mut taken: Vec<(usize, usize)> = slots.iter().flatten().copied().collect();
    taken.sort_unstable();
    let distinct = taken.windows(2).all(|w| w[0] != w[1]);
    (slots, distinct)
}

/// Writes one row's K and V (`k`, `v`: all KV heads) into pool slot `(block, j)`.
///
/// # Safety
/// No other task writes that slot meanwhile.
unsafe fn write_slot(
    layout: &PagedLayout,
    (block, j): (usize, usize),
    k: &[f32],
    v: &[f32],
    kp: KvPtr,
    vp: KvPtr,
) {
    let (bs, hd) = (layout.block_size, layout.head_dim);
    for g in 0..layout.n_kv_heads {
        let base = layout.head_offset(block, g);
        kp.write_strided(base + j, bs, &k[g * hd..(g + 1) * hd]);
        vp.write(base + j * hd, &v[g * hd..(g + 1) * hd]);
    }
}

/// Runs `f(row)` for the batch's rows, in parallel where no two rows share a pool slot (else
/// in order on this thread, so the last row's write wins as it would one by one).
fn for_each_new_row(rows: usize, distinct: bool, f: impl Fn(usize) + Sync) {
    if distinct {
        crate::ops::for_each_row(rows, f);
    } else {
        (0..rows).for_each(f);
    }
}

/// Writes the new tokens' K and V rows (`[rows, n_kv_heads * head_dim]`) into their slots,
/// rows in parallel. Callers validate block tables against the pool first.
pub fn write_kv(
    layout: &PagedLayout,
    seqs: &[AttnSeq],
    k_new: &[f32],
    v_new: &[f32],
    k: &mut KvMut,
    v: &mut KvMut,
) {
    let w = layout.token_width();
    assert_eq!(k_new.len(), v_new.len());
    let (slots, distinct) = new_slots(layout, seqs, k_new.len() / w.max(1));
    let (kp, vp) = (k.ptr(), v.ptr());
    for_each_new_row(slots.len(), distinct, |r| {
        if let Some(slot) = slots[r] {
            let row = r * w..(r + 1) * w;
            // SAFETY: rows in parallel have distinct slots.
            unsafe { write_slot(layout, slot, &k_new[row.clone()], &v_new[row], kp, vp) };
        }
    });
}

/// RoPE's angles for the new rows (row `r`'s at `cos[r * head_dim / 2..]` and
/// `sin[r * head_dim / 2..]`) and how heads pair their elements.
#[derive(Clone, Copy)]
pub struct Rotation<'a> {
    /// Cosines, `head_dim / 2` a row.
    pub cos: &'a [f32],
    /// Sines, `head_dim / 2` a row.
    pub sin: &'a [f32],
    /// The pairing.
    pub style: RopeStyle,
}

/// The new tokens' projections made ready for attention in one row-parallel pass: each one's
/// bias added (`bias`: q's, k's and v's, as Qwen2 has them), q's and k's heads rotated, and K
/// and V written to their slots as [`write_kv`] does. On the engine thread alone, the bias
/// adds and the KV writes took ~1.7% of a 32-row decode step while the other compute threads
/// waited, and the two rotations were a parallel loop each. Every element goes through the
/// same operations in the same order as bias adds, [`crate::ops::rope`] and [`write_kv`] one
/// after the other.
#[allow(clippy::too_many_arguments)]
pub fn prepare_new_rows(
    layout: &PagedLayout,
    seqs: &[AttnSeq],
    q: &mut [f32],
    k: &mut [f32],
    v: &mut [f32],
    bias: [Option<&[f32]>; 3],
    rot: Rotation,
    kv: (&mut KvMut, &mut KvMut),
) {
    let (hd, w) = (layout.head_dim, layout.token_width());
    let rows = k.len() / w.max(1);
    assert!(
        k.len() == rows * w && v.len() == k.len(),
        "k, v are not [{rows}, {w}]"
    );
    let qw = q.len() / rows.max(1);
    assert!(
        q.len() == rows * qw && qw.is_multiple_of(hd),
        "q is not [{rows}, heads * {hd}]"
    );
    let half = hd / 2;
    assert!(
        rot.cos.len() >= rows * half && rot.sin.len() >= rows * half,
        "angles for every row"
    );
    for (b, width) in bias.iter().zip([qw, w, w]) {
        assert!(
            b.is_none_or(|b| b.len() == width),
            "a bias per projection's row"
        );
    }
    let (slots, distinct) = new_slots(layout, seqs, rows);
    let (kp, vp) = (kv.0.ptr(), kv.1.ptr());
    let (qs, ks, vs) = (
        SyncPtr(q.as_mut_ptr()),
        SyncPtr(k.as_mut_ptr()),
        SyncPtr(v.as_mut_ptr()),
    );
    for_each_new_row(rows, distinct, |r| {
        // SAFETY: row r of q, k and v is touched by this task only.
        let (qr, kr, vr) = unsafe {
            (
                qs.slice_mut(r * qw, qw),
                ks.slice_mut(r * w, w),
                vs.slice_mut(r * w, w),
            )
        };
        let angles = r * half..(r + 1) * half;
        let (c, s) = (&rot.cos[angles.clone()], &rot.sin[angles]);
        for (x, b) in [&mut *qr, &mut *kr, &mut *vr].into_iter().zip(bias) {
            if let Some(b) = b {
                crate::ops::add_assign(x, b);
            }
        }
        crate::ops::rope_row(qr, hd, c, s, rot.style);
        crate::ops::rope_row(kr, hd, c, s, rot.style);
        if let Some(slot) = slots[r] {
            // SAFETY: rows in parallel have distinct slots.
            unsafe { write_slot(layout, slot, kr, vr, kp, vp) };
        }
    });
}

/// Causal attention of the new tokens' queries (`q`: `[rows, n_heads * head_dim]`) over each
/// sequence's cached positions `0..=own position` (with a sliding `window`, only the last
/// `window` of them: Mistral's and Qwen2's sliding-window attention), into `out` (same shape
/// as `q`). Query head `h` reads KV head `h / (n_heads / n_kv_heads)`.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    layout: &PagedLayout,
    seqs: &[AttnSeq],
    q: &[f32],
    n_heads: usize,
    scale: f32,
    window: Option<usize>,
    k: KvRef,
    v: KvRef,
    out: &mut [f32],
) {
    assert!(window != Some(0), "an attention window of 0 keys");
    let n_rep = n_heads / layout.n_kv_heads;
    assert_eq!(q.len(), out.len());
    assert_eq!(k.len(), v.len());
    assert!(
        matches!(
            (k, v),
            (KvRef::F16(_), KvRef::F16(_)) | (KvRef::F32(_), KvRef::F32(_))
        ),
        "K and V of one pool share an element type"
    );
    let (works, partial_len) = plan(layout, seqs, n_rep, crate::par::current_threads());
    let mut partial = vec![0f32; partial_len];
    let dst = SyncPtr(out.as_mut_ptr());
    let task = Task {
        layout,
        seqs,
        q,
        n_heads,
        n_rep,
        scale,
        window,
        k,
        v,
        dst,
        partial: SyncPtr(partial.as_mut_ptr()),
    };
    let level = crate::simd::active();
    #[cfg(target_arch = "x86_64")]
    let hd = layout.head_dim;
    let one = |t: usize| {
        let w = &works[t];
        // The work this thread most likely runs next (see below).
        #[cfg(target_arch = "x86_64")]
        if level >= SimdLevel::Avx2 {
            if let Some(next) = works.get(t + 1) {
                task.prefetch_start(next);
            }
        }
        #[cfg(target_arch = "x86_64")]
        if level >= SimdLevel::Avx512Vnni && hd.is_multiple_of(x86::LANES) {
            // SAFETY: AVX-512F/BW/VL and F16C were detected (SimdLevel::Avx512Vnni); the
            // head size was checked.
            unsafe { task.run_avx512(w) };
            return;
        } else if level >= SimdLevel::Avx2 && hd.is_multiple_of(x86_avx2::W) {
            // SAFETY: AVX2, FMA and F16C were detected (SimdLevel::Avx2 requires them); the
            // head size was checked.
            unsafe { task.run_avx2(w) };
            return;
        }
        let _ = level;
        task.run::<PORTABLE_STEP>(w);
    };
    // Each thread walks its own share of the works in order (so its next work is usually the
    // next one, whose first blocks it asks for), one claim on its own cache line per work:
    // against first-come claims from one counter, 16 / 32 sequences x 144 positions and 32 x
    // 512 (30 layers, pinned, alternating): -10%, -13% and -10% a step.
    for_each_range(works.len(), 1, |r| r.for_each(one));
    merge_chunks(&works, seqs, n_heads, n_rep, layout.head_dim, &partial, out);
}

/// `e^(old - new)`, the factor a row's running sums take when its maximum moves from `old` to
/// `new`: exactly 1 when it stays (as `exp(0)` is, so the bits are the same), without the libm
/// call. Past the first blocks a row's maximum rarely moves: one sequence at 512 positions,
/// 30 layers of the reference shape, 0.47-0.49 -> 0.44 ms.
#[inline(always)]
pub(crate) fn rescale(old: f32, new: f32) -> f32 {
    if old == new {
        1.0
    } else {
        (old - new).exp()
    }
}

/// The inner steps a task can run (a const parameter of [`Task::run`]).
const PORTABLE_STEP: u8 = 0;
#[cfg(target_arch = "x86_64")]
const AVX2_STEP: u8 = 1;
#[cfg(target_arch = "x86_64")]
const AVX512_STEP: u8 = 2;
#[cfg(target_arch = "x86_64")]
const _: () = assert!(
    x86::LANES == x86_avx2::LANES,
    "both steps take sixteen keys"
);

/// Queries per task: enough work per task, and enough tasks to balance the pool.
const Q_CHUNK: usize = 8;

/// Blocks of a head's keys asked for ahead of the one being read (each block is elsewhere in
/// the pool, where the stream prefetchers do not follow): 16 sequences x 144 positions on the
/// reference model's shape, 3.9-4.3 -> 3.6-3.9 ms per step's 30 layers going from 1 to 2.
#[cfg(target_arch = "x86_64")]
const PREFETCH_BLOCKS: usize = 2;

/// One attention work item's inputs: a (sequence, KV head, query chunk, key chunks) is one task.
struct Task<'a> {
    layout: &'a PagedLayout,
    seqs: &'a [AttnSeq<'a>],
    q: &'a [f32],
    n_heads: usize,
    n_rep: usize,
    scale: f32,
    /// Keys a query sees at most (its own included), if limited.
    window: Option<usize>,
    k: KvRef<'a>,
    v: KvRef<'a>,
    dst: SyncPtr<f32>,
    /// Chunk softmax states of queries that see several key chunks (see [`Work`]).
    partial: SyncPtr<f32>,
}

// SAFETY: tasks write disjoint output slices through `dst` (see `run`).
unsafe impl Sync for Task<'_> {}

/// A task's working memory, kept per thread from task to task (a decode step runs thousands
/// of tasks; allocating it per task showed in profiles as malloc and memset).
#[derive(Default)]
struct Scratch {
    /// Running maxima, denominators and weighted value sums per (query, head of the group).
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<f32>,
    /// A block's keys and values in f32, as stored (`[head_dim, block_size]`,
    /// `[block_size, head_dim]`) or staged for the wide step (16 keys).
    kt: Vec<f32>,
    vb: Vec<f32>,
    /// One query's scores against a block.
    scores: Vec<f32>,
    /// The key chunks' states of a task that merges them itself (per chunk, per row and
    /// head: max, sum, value sums).
    states: Vec<f32>,
}

impl Scratch {
    /// Sizes the buffers for `nq` query rows of `hd` against `block_size`-token blocks.
    fn reset(&mut self, nq: usize, hd: usize, block_size: usize, chunks: usize) {
        let keys = block_size.max(16);
        self.m.resize(nq, 0.0);
        self.l.resize(nq, 0.0);
        self.acc.resize(nq * hd, 0.0);
        self.kt.resize(keys * hd, 0.0);
        self.vb.resize(keys * hd, 0.0);
        self.scores.resize(keys, 0.0);
        self.states.resize(chunks * nq * (2 + hd), 0.0);
    }
}

thread_local! {
    static SCRATCH: Cell<Scratch> = Cell::new(Scratch::default());
}

impl Task<'_> {
    /// Asks for the first blocks `w` reads (its first key chunk's), so that a thread that
    /// goes on to `w` after its current work finds them on the way.
    #[cfg(target_arch = "x86_64")]
    fn prefetch_start(&self, w: &Work) {
        let layout = self.layout;
        let (bs, hd) = (layout.block_size, layout.head_dim);
        let s = &self.seqs[w.si];
        let end = s.context_len + ((w.c + 1) * Q_CHUNK).min(s.n_new);
        let first = w.chunks.start * chunk_blocks(bs);
        for b in first..(first + PREFETCH_BLOCKS).min(end.div_ceil(bs)) {
            let at = layout.head_offset(s.block_table[b] as usize, w.g);
            x86::prefetch(self.k, self.v, at, bs * hd);
        }
    }

    /// The task compiled for AVX2 + FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_avx2(&self, w: &Work) {
        self.run::<AVX2_STEP>(w)
    }

    /// The task with the AVX-512 block step (vectorized scores and softmax).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    unsafe fn run_avx512(&self, w: &Work) {
        self.run::<AVX512_STEP>(w)
    }

    /// `STEP`: each token's step for a KV head's query group is [`x86::update_group`]
    /// ([`AVX512_STEP`]) or [`x86_avx2::update_group`] ([`AVX2_STEP`]) on up to a block's
    /// sixteen keys at a time, reading the pool directly; only instantiated behind the level
    /// checks in `paged_attention`. [`PORTABLE_STEP`]: portable code.
    #[inline(always)]
    fn run<const STEP: u8>(&self, w: &Work) {
        let mut scratch = SCRATCH.take();
        self.run_in::<STEP>(w, &mut scratch);
        SCRATCH.set(scratch);
    }

    #[inline(always)]
    fn run_in<const STEP: u8>(&self, w: &Work, sc: &mut Scratch) {
        let (si, g, c) = (w.si, w.g, w.c);
        let (seqs, layout, q, k, v, dst) =
            (self.seqs, self.layout, self.q, self.k, self.v, self.dst);
        let (n_heads, n_rep, scale, hd) = (self.n_heads, self.n_rep, self.scale, layout.head_dim);
        let bs = layout.block_size;
        let s = &seqs[si];
        let queries = c * Q_CHUNK..((c + 1) * Q_CHUNK).min(s.n_new);
        let nq = queries.len() * n_rep;
        // Online-softmax state per (query token, head of the group), fresh for each key chunk.
        sc.reset(nq, hd, bs, w.chunks.len());
        let Scratch {
            m,
            l,
            acc,
            kt,
            vb,
            scores,
            states,
        } = sc;
        let end = s.context_len + queries.end;
        let end_blk = end.div_ceil(bs);
        // The first key query position `pos` sees.
        let first_key = |pos: usize| self.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        // Keys before the first query's window are seen by none of this task's queries.
        let seen_from = first_key(s.context_len + queries.start);
        let cb = chunk_blocks(bs);
        for (ci, chunk) in w.chunks.clone().enumerate() {
            m.fill(f32::NEG_INFINITY);
            l.fill(0.0);
            acc.fill(0.0);
            for blk in chunk * cb..((chunk + 1) * cb).min(end_blk) {
                let p0 = blk * bs;
                let nb = (end - p0).min(bs);
                if p0 + nb <= seen_from {
                    continue;
                }
                let base = layout.head_offset(s.block_table[blk] as usize, g);
                #[cfg(target_arch = "x86_64")]
                if STEP != PORTABLE_STEP {
                    const LANES: usize = x86::LANES;
                    // Ask for the blocks ahead (at a chunk's first block, all of them). The
                    // AVX2 step of a lone query, which reads the pool directly, asks for the
                    // farthest one itself, a few lines at a time (see `x86_avx2::Ahead`), where
                    // a block is one step of sixteen keys.
                    let ahead = blk + PREFETCH_BLOCKS;
                    let paced = STEP == AVX2_STEP && queries.len() == 1 && bs == LANES;
                    let from = if blk == chunk * cb { blk + 1 } else { ahead };
                    let mut pace = None;
                    for b in from..(ahead + 1).min(end_blk) {
                        let at = layout.head_offset(s.block_table[b] as usize, g);
                        if paced && b == ahead {
                            pace = Some(x86::Keys::in_pool(k, v, at, 0, bs, hd));
                        } else {
                            x86::prefetch(k, v, at, bs * hd);
                        }
                    }
                    for j0 in (0..nb).step_by(LANES) {
                        let n = (nb - j0).min(LANES);
                        let p0 = p0 + j0;
                        let mut src = x86::Keys::in_pool(k, v, base, j0, bs, hd);
                        // Several queries read these keys: convert them once. The AVX2 step
                        // reads sixteen keys whatever `n`: in the pool where sixteen fit in the
                        // block (the keys past `n` are masked out of the softmax and their
                        // values never read), staged where they do not.
                        // SAFETY: each STEP is only instantiated on the level its kernels
                        // need; the n keys are in the pool; `reset` sized kt and vb.
                        if STEP == AVX512_STEP && queries.len() > 1 {
                            src = unsafe { x86::stage(src, n, hd, kt, vb) };
                        } else if STEP == AVX2_STEP && (queries.len() > 1 || j0 + LANES > bs) {
                            src = unsafe { x86_avx2::stage(src, n, hd, kt, vb) };
                        }
                        for (qi, t) in queries.clone().enumerate() {
                            let pos = s.context_len + t;
                            if pos < p0 {
                                continue;
                            }
                            let valid = (pos + 1 - p0).min(n);
                            // Keys of this step before the query's window.
                            let skip = first_key(pos).saturating_sub(p0);
                            if skip >= valid {
                                continue;
                            }
                            let row = (s.row_start + t) * n_heads * hd;
                            // The group's query heads are adjacent in the row, as are their
                            // states.
                            let qg = &q[row + g * n_rep * hd..row + (g + 1) * n_rep * hd];
                            let st = qi * n_rep..(qi + 1) * n_rep;
                            let (m, l) = (&mut m[st.clone()], &mut l[st.clone()]);
                            let acc = &mut acc[st.start * hd..st.end * hd];
                            // SAFETY: as for `stage`; head_dim is a multiple of the step's
                            // vector (checked in `paged_attention`); keys below `valid` <= n are
                            // readable, and for the AVX2 step all sixteen (a whole step or
                            // staged).
                            unsafe {
                                if STEP == AVX512_STEP {
                                    x86::update_group(qg, src, skip..valid, scale, m, l, acc)
                                } else {
                                    x86_avx2::update_group(
                                        qg,
                                        src,
                                        skip..valid,
                                        scale,
                                        m,
                                        l,
                                        acc,
                                        pace,
                                    )
                                }
                            };
                        }
                    }
                    continue;
                }
                // The head's keys ([hd, bs]) and values ([bs, hd]) in f32, each in one run.
                k.read(base, &mut kt[..hd * bs]);
                v.read(base, &mut vb[..nb * hd]);
                for (qi, t) in queries.clone().enumerate() {
                    let pos = s.context_len + t;
                    if pos < p0 {
                        continue;
                    }
                    let valid = (pos + 1 - p0).min(nb);
                    // Keys of this block before the query's window.
                    let skip = first_key(pos).saturating_sub(p0);
                    if skip >= valid {
                        continue;
                    }
                    let row = (s.row_start + t) * n_heads * hd;
                    for r in 0..n_rep {
                        let h = g * n_rep + r;
                        let qv = &q[row + h * hd..row + (h + 1) * hd];
                        let st = qi * n_rep + r;
                        // Dimension by dimension, across the block's keys (a vector loop
                        // over keys; each score a sum in dimension order).
                        let sc = &mut scores[skip..valid];
                        sc.fill(0.0);
                        for (d, &qd) in qv.iter().enumerate() {
                            let kd = &kt[d * bs + skip..d * bs + valid];
                            for (x, &kv) in sc.iter_mut().zip(kd) {
                                *x += qd * kv;
                            }
                        }
                        let mut mx = m[st];
                        for x in sc.iter_mut() {
                            *x *= scale;
                            mx = mx.max(*x);
                        }
                        let corr = rescale(m[st], mx);
                        let a = &mut acc[st * hd..(st + 1) * hd];
                        let mut sum = l[st] * corr;
                        for x in a.iter_mut() {
                            *x *= corr;
                        }
                        for j in skip..valid {
                            let p = (scores[j] - mx).exp();
                            sum += p;
                            for (x, &vv) in a.iter_mut().zip(&vb[j * hd..(j + 1) * hd]) {
                                *x += p * vv;
                            }
                        }
                        m[st] = mx;
                        l[st] = sum;
                    }
                }
            }
            // Several chunks: keep each one's state for the merge, in the shared buffer when
            // other tasks have the rest, else here.
            let several = w.partial.is_some() || w.chunks.len() > 1;
            if several {
                let off = ci * nq * (2 + hd);
                for st in 0..nq {
                    let o = match w.partial {
                        // SAFETY: this task's chunk slots are its own (see `plan`).
                        Some(first) => unsafe {
                            self.partial.slice_mut(first + off + st * (2 + hd), 2 + hd)
                        },
                        None => &mut states[off + st * (2 + hd)..][..2 + hd],
                    };
                    o[0] = m[st];
                    o[1] = l[st];
                    o[2..].copy_from_slice(&acc[st * hd..(st + 1) * hd]);
                }
            }
        }
        if w.partial.is_some() {
            return;
        }
        let chunks = w.chunks.len();
        for (qi, t) in queries.clone().enumerate() {
            let row = (s.row_start + t) * n_heads * hd;
            for r in 0..n_rep {
                let h = g * n_rep + r;
                let st = qi * n_rep + r;
                // SAFETY: the (row, head) slice belongs to this task's (sequence, group, chunk).
                let o = unsafe { dst.slice_mut(row + h * hd, hd) };
                if chunks > 1 {
                    let at = st * (2 + hd);
                    let state = |k: usize| &states[k * nq * (2 + hd) + at..][..2 + hd];
                    merge_states(chunks, state, o);
                    continue;
                }
                let inv = 1.0 / l[st];
                for (o, &x) in o.iter_mut().zip(&acc[st * hd..(st + 1) * hd]) {
                    *o = x * inv;
                }
            }
        }
    }
}
