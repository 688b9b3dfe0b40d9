//! Parallel loops over an item space where each thread walks its own contiguous share and
//! then helps the others: the matmuls' loop over weight tiles.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{current_threads, for_each_task, INDEX, IN_TASK};

/// A range's bounds packed in one word, so that its owner and a helper claim from either end
/// with one compare-and-swap; on its own cache line (two lines: the adjacent-line prefetcher),
/// so that an owner's claims stay on its core until someone helps.
#[repr(align(128))]
struct Share(AtomicU64, AtomicBool);

impl Share {
    fn new(r: std::ops::Range<usize>) -> Share {
        Share(AtomicU64::new(pack(r.start, r.end)), AtomicBool::new(false))
    }

    /// Claims the share's first walk (each share has one, by whichever thread comes first).
    fn start(&self) -> bool {
        !self.1.load(Ordering::Relaxed) && !self.1.swap(true, Ordering::AcqRel)
    }

    /// Takes up to `grain` items from the front (the owner's end).
    fn take_front(&self, grain: usize) -> Option<std::ops::Range<usize>> {
        self.take(|lo, hi| {
            let end = hi.min(lo + grain);
            (lo..end, end..hi)
        })
    }

    /// Takes half of what is left (at least `grain` items, or all) from the back.
    fn take_back(&self, grain: usize) -> Option<std::ops::Range<usize>> {
        self.take(|lo, hi| {
            let start = hi - (hi - lo).div_ceil(2).max(grain).min(hi - lo);
            (start..hi, lo..start)
        })
    }

    /// Takes what `cut(lo, hi)` picks of a non-empty remainder `lo..hi` (it returns the part
    /// taken and the part left), with one compare-and-swap, retried if another thread took
    /// first.
    fn take(
        &self,
        cut: impl Fn(usize, usize) -> (std::ops::Range<usize>, std::ops::Range<usize>),
    ) -> Option<std::ops::Range<usize>> {
        let mut v = self.0.load(Ordering::Acquire);
        loop {
            let (lo, hi) = unpack(v);
            if lo >= hi {
                return None;
            }
            let (taken, left) = cut(lo, hi);
            let new = pack(left.start, left.end);
            match self
                .0
                .compare_exchange_weak(v, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(taken),
                Err(now) => v = now,
            }
        }
    }

    fn left(&self) -> usize {
        let (lo, hi) = unpack(self.0.load(Ordering::Relaxed));
        hi.saturating_sub(lo)
    }
}

fn pack(lo: usize, hi: usize) -> u64 {
    ((hi as u64) << 32) | lo as u64
}

fn unpack(v: u64) -> (usize, usize) {
    ((v & 0xffff_ffff) as usize, (v >> 32) as usize)
}

/// Runs `f` over `0..items` in disjoint ranges that together cover it once: each thread
/// starts on its own contiguous share and walks it front to back, `grain` items per claim,
/// then helps the slowest by taking half of what it has left from the back. A thread's claims
/// stay on its core's cache line, and its reads stay one sequential stream until the end
/// (first-come claims from one shared counter moved a line between the cores per claim; big
/// claims left one thread idle for the last one). Which thread runs which range depends on
/// timing, so `f`'s result for an item must not depend on the range it comes in.
pub(crate) fn for_each_range(
    items: usize,
    grain: usize,
    f: impl Fn(std::ops::Range<usize>) + Sync,
) {
    let grain = grain.max(1);
    let slots = current_threads().min(items.div_ceil(grain));
    if slots <= 1 || items > u32::MAX as usize || IN_TASK.with(|t| t.get()) {
        if items > 0 {
            f(0..items);
        }
        return;
    }
    let shares: Vec<Share> = (0..slots)
        .map(|s| Share::new(share_of(s, slots, items)))
        .collect();
    for_each_task(slots, |_| {
        // This thread's own share when it is still untouched (the one it read ahead, see
        // `read_ahead`), else the first untouched one: one per task, as many as shares.
        let me = INDEX.with(|x| x.get());
        let Some(s) = (me < slots && shares[me].start())
            .then_some(me)
            .or_else(|| (0..slots).find(|&v| shares[v].start()))
        else {
            return;
        };
        steal_loop(&shares, s, grain, &f)
    });
}

/// Walks share `s` front to back, then takes from the others' backs (see [`for_each_range`]).
fn steal_loop(
    shares: &[Share],
    s: usize,
    grain: usize,
    f: &(impl Fn(std::ops::Range<usize>) + Sync),
) {
    let slots = shares.len();
    loop {
        while let Some(r) = shares[s].take_front(grain) {
            f(r);
        }
        let victim = (0..slots)
            .map(|v| (shares[v].left(), v))
            .max()
            .filter(|&(left, _)| left > 0);
        let Some((_, v)) = victim else { break };
        // What is taken becomes this slot's share, which others may take from in turn.
        if let Some(r) = shares[v].take_back(grain) {
            shares[s].0.store(pack(r.start, r.end), Ordering::Release);
        }
    }
}

/// Items of slot `slot` of `slots` equal shares of `0..items`.
pub(super) fn share_of(slot: usize, slots: usize, items: usize) -> std::ops::Range<usize> {
    if slot >= slots {
        return 0..0;
    }
    slot * items / slots..(slot + 1) * items / slots
}

#[cfg(test)]
mod tests {
    use super::super::ThreadPool;
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    #[test]
    fn ranges_cover_every_item_once() {
        let pool = ThreadPool::new(3).unwrap();
        for (items, grain) in [(0, 1), (1, 1), (5, 2), (7, 100), (1000, 3), (4097, 16)] {
            let hits: Vec<AtomicU32> = (0..items).map(|_| AtomicU32::new(0)).collect();
            pool.install(|| {
                for_each_range(items, grain, |r| {
                    assert!(!r.is_empty() && r.end <= items);
                    for i in r {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    }
                })
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
        // A slow first share: the others take from it, and from each other's takings.
        let hits: Vec<AtomicU32> = (0..300).map(|_| AtomicU32::new(0)).collect();
        pool.install(|| {
            for_each_range(300, 2, |r| {
                for i in r {
                    if i < 100 {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    hits[i].fetch_add(1, Ordering::Relaxed);
                }
            })
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Any size, claim size and pool, with some items slow enough that the others take
        /// from their share: every item runs exactly once.
        #[test]
        fn every_item_runs_once(
            items in 0usize..3000,
            grain in 1usize..80,
            threads in 1usize..5,
            slow in proptest::collection::vec(0usize..3000, 0..6),
        ) {
            let pool = ThreadPool::new(threads).unwrap();
            let hits: Vec<AtomicU32> = (0..items).map(|_| AtomicU32::new(0)).collect();
            pool.install(|| {
                for_each_range(items, grain, |r| {
                    for i in r {
                        if slow.contains(&i) {
                            std::thread::sleep(Duration::from_micros(300));
                        }
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    }
                })
            });
            proptest::prop_assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }
}
