//! Reading the next loop's memory ahead on threads that would otherwise wait.

use std::sync::atomic::Ordering;

use super::range::share_of;
use super::{Shared, CURRENT, INDEX, IN_TASK};

/// Memory a parallel loop is about to read, as one item space over up to four regions (the
/// tiles of the matrices of one matmul call), split between threads as
/// [`for_each_range`](super::for_each_range) splits it.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Ahead {
    /// (address, bytes per item, items) of each region, in item order.
    regions: [(usize, usize, usize); 4],
    count: usize,
    /// The `grain` the loop will be given.
    grain: usize,
}

impl Ahead {
    /// Adds a region of `items` items of `item_bytes` bytes at `at` (a fifth and later ones
    /// are left out: nothing reads them ahead).
    pub(crate) fn push(&mut self, at: *const u8, item_bytes: usize, items: usize) {
        if self.count < self.regions.len() {
            self.regions[self.count] = (at as usize, item_bytes, items);
            self.count += 1;
        }
    }

    /// The claim size the loop will use, which decides how many shares it is cut into.
    pub(crate) fn with_grain(mut self, grain: usize) -> Ahead {
        self.grain = grain;
        self
    }

    fn items(&self) -> usize {
        self.regions[..self.count].iter().map(|r| r.2).sum()
    }

    /// The address of byte `offset` of item `item`, if it is in a region.
    fn address(&self, mut item: usize, offset: usize) -> Option<usize> {
        for &(at, bytes, items) in &self.regions[..self.count] {
            if item < items {
                return Some(at + item * bytes + offset);
            }
            item -= items;
        }
        None
    }

    /// The size of item `item` (0 past the regions).
    fn item_bytes(&self, item: usize) -> usize {
        let mut i = item;
        for &(_, bytes, items) in &self.regions[..self.count] {
            if i < items {
                return bytes;
            }
            i -= items;
        }
        0
    }
}

/// How much of its share of the next loop an idle thread reads ahead into its L2 (of 1-2 MiB
/// on the parts this targets; the hardware's and the kernels' own prefetching take over from
/// there).
const AHEAD_BYTES: usize = 512 << 10;

/// Cache lines read ahead between two looks at the pool's epoch (a new job waits at most
/// this long for an idle thread).
const AHEAD_LINES_PER_STEP: usize = 8;

/// A thread's progress through the latest [`Ahead`].
#[derive(Default)]
pub(super) struct AheadReader {
    generation: u64,
    ahead: Ahead,
    /// Item and byte within it of the next line to ask for, and bytes asked so far.
    item: usize,
    end: usize,
    offset: usize,
    done: usize,
}

impl AheadReader {
    /// Asks for a few more lines of this thread's share; false when there is nothing to do.
    pub(super) fn step(&mut self, s: &Shared) -> bool {
        let generation = s.ahead_gen.load(Ordering::Acquire);
        if generation != self.generation {
            let Ok(ahead) = s.ahead.try_lock() else {
                return false;
            };
            self.generation = generation;
            self.start(*ahead, s.threads, INDEX.with(|x| x.get()));
        }
        self.next_lines(AHEAD_LINES_PER_STEP, |a| {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a prefetch never faults, wherever it points (the memory may even have
            // been freed since the hint was posted).
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                    a as *const i8,
                )
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = a;
        }) > 0
    }

    /// Starts on thread `me`'s share of `ahead` in a pool of `threads`.
    fn start(&mut self, ahead: Ahead, threads: usize, me: usize) {
        let items = ahead.items();
        let slots = threads.min(items.div_ceil(ahead.grain.max(1)));
        let share = share_of(me, slots, items);
        self.ahead = ahead;
        (self.item, self.end, self.offset, self.done) = (share.start, share.end, 0, 0);
    }

    /// Hands the addresses of up to `lines` more cache lines to `visit`; how many it did.
    fn next_lines(&mut self, lines: usize, mut visit: impl FnMut(usize)) -> usize {
        let mut asked = 0;
        while asked < lines && self.item < self.end && self.done < AHEAD_BYTES {
            if let Some(a) = self.ahead.address(self.item, self.offset) {
                visit(a);
            }
            self.offset += 64;
            self.done += 64;
            if self.offset >= self.ahead.item_bytes(self.item) {
                self.item += 1;
                self.offset = 0;
            }
            asked += 1;
        }
        asked
    }
}

thread_local! {
    /// The calling thread's progress, read ahead while it waits for the workers at a job's end.
    pub(super) static CALLER_READER: std::cell::RefCell<AheadReader> =
        std::cell::RefCell::new(AheadReader::default());
}

/// Like [`read_ahead`], but from the start of the pool's next job on: said before a matmul
/// about the one after it, so that threads done with their part of the first read the second
/// meanwhile, and the serial work between them then finds it under way.
pub(crate) fn read_ahead_next(ahead: Ahead) {
    let pool = CURRENT.with(|c| c.get());
    if let Some(p) = pool.filter(|_| !IN_TASK.with(|t| t.get())) {
        // SAFETY: `install` keeps the pool alive while it is current on this thread.
        let s = &*unsafe { &*p }.shared;
        *s.ahead_next.lock().unwrap_or_else(|e| e.into_inner()) = Some(ahead);
        s.has_ahead_next.store(true, Ordering::Release);
    }
}

/// Called as a job starts: what [`read_ahead_next`] left becomes what threads read ahead.
pub(super) fn start_next(s: &Shared) {
    if s.has_ahead_next.swap(false, Ordering::AcqRel) {
        let next = s
            .ahead_next
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(next) = next {
            *s.ahead.lock().unwrap_or_else(|e| e.into_inner()) = next;
            s.ahead_gen.fetch_add(1, Ordering::Release);
        }
    }
}

/// Tells the installed pool's threads what the next parallel loop will read, so that those
/// idle until then (while the caller runs serial code, or waits for a slower thread) bring
/// the start of their shares into their caches: a decode step's matmuls stream the weights
/// from memory, and the serial work between them would leave the memory bus idle.
pub(crate) fn read_ahead(ahead: Ahead) {
    let pool = CURRENT.with(|c| c.get());
    if let Some(p) = pool.filter(|_| !IN_TASK.with(|t| t.get())) {
        // SAFETY: `install` keeps the pool alive while it is current on this thread.
        let s = &*unsafe { &*p }.shared;
        *s.ahead.lock().unwrap_or_else(|e| e.into_inner()) = ahead;
        s.ahead_gen.fetch_add(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two regions (three items of 128 bytes, then two of 256) split between two threads as
    /// the loop splits them: the second thread reads items 2..5 from their first line on.
    #[test]
    fn a_thread_reads_its_own_share_in_order() {
        let mut ahead = Ahead::default();
        ahead.push(0x10000 as *const u8, 128, 3);
        ahead.push(0x20000 as *const u8, 256, 2);
        let ahead = ahead.with_grain(1);
        let mut r = AheadReader::default();
        r.start(ahead, 2, 1);
        let mut seen = vec![];
        while r.next_lines(3, |a| seen.push(a)) > 0 {}
        let want: Vec<usize> = [0x10100, 0x10140]
            .into_iter()
            .chain((0..512).step_by(64).map(|o| 0x20000 + o))
            .collect();
        assert_eq!(seen, want);
        // The first thread: items 0..2; a thread past the shares: nothing.
        r.start(ahead, 2, 0);
        assert_eq!(r.next_lines(100, |_| {}), 4);
        r.start(ahead, 2, 2);
        assert_eq!(r.next_lines(100, |_| {}), 0);
    }

    #[test]
    fn reading_stops_at_the_budget() {
        let mut ahead = Ahead::default();
        ahead.push(std::ptr::null(), 4096, 1024);
        let mut r = AheadReader::default();
        r.start(ahead.with_grain(1), 1, 0);
        let mut n = 0;
        while r.next_lines(64, |_| n += 1) > 0 {}
        assert_eq!(n * 64, AHEAD_BYTES);
    }
}
