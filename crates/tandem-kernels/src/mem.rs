//! Memory placement for the weights: huge pages, and small matrices packed together.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, Weak};

/// Huge-page size on x86-64 Linux.
const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back `buf` with 2 MiB pages where it can (`MADV_HUGEPAGE`; systems
/// whose transparent huge pages are in `madvise` mode give them only on request). Call it before
/// the buffer is first written: pages already faulted in stay small. A decode step streams the
/// whole model, ~1 GB for a 1.5B model: with 4 KiB pages that is a TLB miss every 4 KiB of
/// weights. Advice only; nothing changes where the kernel refuses.
pub fn advise_huge_pages<T>(buf: &mut [T]) {
    advise(buf.as_mut_ptr() as *mut u8, std::mem::size_of_val(buf));
}

/// The wrapping sum of `words`, read as the packed kernels read weights: with a software
/// prefetch of every cache line [`crate::packed::PREFETCH`] bytes ahead where
/// [`crate::simd::prefetch_weights`] is on. A bandwidth probe reads this way beside a plain
/// read, so that a roofline holds the faster of the two.
pub fn sum_streamed(words: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::prefetch_weights() {
        const LINE: usize = 64 / std::mem::size_of::<u64>();
        let ahead = crate::packed::PREFETCH / std::mem::size_of::<u64>();
        let mut sum = 0u64;
        for (i, line) in words.chunks(LINE).enumerate() {
            let p = words.as_ptr().wrapping_add(i * LINE + ahead) as *const i8;
            // SAFETY: a prefetch never faults, wherever it points.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p) };
            sum = line.iter().fold(sum, |a, &v| a.wrapping_add(v));
        }
        return sum;
    }
    words.iter().fold(0u64, |a, &v| a.wrapping_add(v))
}

fn advise(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
        let end = (ptr as usize + len) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: the range lies inside the caller's buffer; the advice changes how pages
            // are backed, never their contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len, HUGE_PAGE);
}

/// A zero-initialized byte buffer for weights: aligned to a cache line (so every 64-byte
/// register load of a packed tile is one line) and backed by huge pages where the kernel gives
/// them. Buffers are carved one after the other, in the order a model loads its matrices, from
/// shared 2 MiB-aligned slabs: a matrix smaller than a huge page (every matrix of a small
/// model) would otherwise sit in 4 KiB pages, and so would the tail of a larger one. In 4 KiB
/// pages a decode step's weight stream runs slower: a 552 KB matrix (1536 x 576 Q4_1) read by
/// two threads gave 29-33 GB/s where the same in huge pages gave 37-41, and 36 MB matrices
/// 46-51 against 56-64 (AMD EPYC Zen 4, a phase whose probe read 56-64 GB/s).
pub struct WeightBytes {
    ptr: NonNull<u8>,
    len: usize,
    /// The slab the bytes were carved from, kept alive by them (only held, never read).
    #[allow(dead_code)]
    slab: Arc<Slab>,
}

// SAFETY: the buffer's bytes are uniquely owned, like a Vec<u8> (a slab hands out disjoint
// ranges and is only freed when the last of them goes).
unsafe impl Send for WeightBytes {}
unsafe impl Sync for WeightBytes {}

/// Bytes of a shared slab: 32 huge pages.
const SLAB_BYTES: usize = 64 << 20;

/// Buffers from this size up get a slab of their own (rounded up to whole huge pages), so a
/// shared slab's unused tail stays small next to what it holds.
const OWN_SLAB_FROM: usize = SLAB_BYTES / 4;

/// A huge-page-aligned allocation that weight buffers are carved from, freed when the last of
/// them is dropped. Only the carved ranges are ever written, so the kernel commits memory for
/// them (in huge pages) and not for the rest.
struct Slab {
    ptr: NonNull<u8>,
    bytes: usize,
}

impl Slab {
    fn layout(bytes: usize) -> Layout {
        Layout::from_size_align(bytes, HUGE_PAGE).expect("weight buffer too large")
    }

    /// A slab of `bytes` (a non-zero multiple of the huge-page size).
    fn new(bytes: usize) -> Slab {
        let layout = Self::layout(bytes);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            handle_alloc_error(layout)
        };
        advise(ptr.as_ptr(), bytes);
        Slab { ptr, bytes }
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.bytes)) };
    }
}

// SAFETY: a slab is raw memory whose ranges are owned by the `WeightBytes` carved from it.
unsafe impl Send for Slab {}
unsafe impl Sync for Slab {}

/// The shared slab being carved and the bytes carved from it so far. Held weakly: a slab
/// whose buffers were all dropped (a model unloaded) is freed, not kept for the next.
type SlabCursor = Mutex<(Weak<Slab>, usize)>;

/// The cursor [`WeightBytes::zeroed`] carves at.
static CURRENT_SLAB: SlabCursor = Mutex::new((Weak::new(), 0));

impl WeightBytes {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> WeightBytes {
        Self::zeroed_in(&CURRENT_SLAB, len)
    }

    /// `len` zero bytes, carved at `cursor`.
    fn zeroed_in(cursor: &SlabCursor, len: usize) -> WeightBytes {
        let (slab, at) = Self::carve(cursor, len.max(1).next_multiple_of(64));
        // SAFETY: `carve` returned a range of at least `len` bytes inside the slab.
        let ptr = unsafe { slab.ptr.add(at) };
        // SAFETY: `ptr` points to at least `len` bytes this buffer owns.
        unsafe { ptr.as_ptr().write_bytes(0, len) };
        WeightBytes { ptr, len, slab }
    }

    /// `bytes` (a multiple of 64) of the shared slab, of a new shared one when they do not
    /// fit, or of their own: the slab and the offset of the range.
    fn carve(cursor: &SlabCursor, bytes: usize) -> (Arc<Slab>, usize) {
        if bytes >= OWN_SLAB_FROM {
            return (Arc::new(Slab::new(bytes.next_multiple_of(HUGE_PAGE))), 0);
        }
        let mut current = cursor.lock().unwrap_or_else(|e| e.into_inner());
        let (weak, used) = &mut *current;
        if let Some(slab) = weak.upgrade().filter(|_| *used + bytes <= SLAB_BYTES) {
            let at = *used;
            *used += bytes;
            return (slab, at);
        }
        let slab = Arc::new(Slab::new(SLAB_BYTES));
        *weak = Arc::downgrade(&slab);
        *used = bytes;
        (slab, 0)
    }
}

impl Deref for WeightBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` initialized bytes live at `ptr` while `self` does.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for WeightBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Clone for WeightBytes {
    fn clone(&self) -> Self {
        let mut c = WeightBytes::zeroed(self.len);
        c.copy_from_slice(self);
        c
    }
}

impl std::fmt::Debug for WeightBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightBytes({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_bytes_are_zeroed_aligned_and_cloned() {
        for len in [0, 1, 100, 3 << 20, OWN_SLAB_FROM + 1] {
            let mut b = WeightBytes::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            let align = if len >= OWN_SLAB_FROM { HUGE_PAGE } else { 64 };
            assert_eq!(b.as_ptr() as usize % align, 0);
            if len > 0 {
                b[len - 1] = 7;
            }
            let c = b.clone();
            assert_eq!(&c[..], &b[..]);
        }
    }

    #[test]
    fn small_buffers_share_slabs_without_overlapping() {
        let cursor = SlabCursor::default();
        // Sizes up to 8 MiB: a slab fills after a few dozen and the rest go to new ones, one
        // of 20 MiB to its own; each buffer keeps its own bytes through later carving and
        // drops.
        let sizes = |i: usize| [1, 64, 65, 4096, 100_000, (8 << 20) - 4096, 20 << 20][i % 7] + i;
        let new = |i| WeightBytes::zeroed_in(&cursor, sizes(i));
        let mut bufs: Vec<WeightBytes> = (0..63).map(new).collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            assert_eq!((b.len(), b.as_ptr() as usize % 64), (sizes(i), 0));
            assert!(b.iter().all(|&x| x == 0));
            b.fill(i as u8);
        }
        let slab_of = |b: &WeightBytes| Arc::as_ptr(&b.slab) as usize;
        let slabs: std::collections::HashSet<usize> = bufs.iter().map(slab_of).collect();
        assert!(
            slabs.len() > 9 + 1,
            "9 buffers of 20 MiB in slabs of their own, 9 of 8 MiB in more than one"
        );
        // In a slab, one buffer after the other.
        assert_eq!(bufs[1].as_ptr() as usize, bufs[0].as_ptr() as usize + 64);
        let kept: Vec<(usize, WeightBytes)> = bufs
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .collect();
        let more: Vec<WeightBytes> = (0..14).map(new).collect();
        assert!(more.iter().all(|b| b.iter().all(|&x| x == 0)));
        for (i, b) in &kept {
            assert!(
                b.iter().all(|&x| x == *i as u8),
                "buffer {i} was overwritten"
            );
        }
    }

    #[test]
    fn a_slab_is_freed_with_its_last_buffer() {
        let cursor = SlabCursor::default();
        let (a, b) = (
            WeightBytes::zeroed_in(&cursor, 1000),
            WeightBytes::zeroed_in(&cursor, 1000),
        );
        let slab = Arc::downgrade(&a.slab);
        assert!(Arc::ptr_eq(&a.slab, &b.slab));
        drop(a);
        assert!(slab.upgrade().is_some(), "b still holds it");
        drop(b);
        assert!(slab.upgrade().is_none());
        let c = WeightBytes::zeroed_in(&cursor, 1000);
        assert!(c.iter().all(|&x| x == 0));
    }
}
