//! Memory placement for the weights.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

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
/// register load of a packed tile is one line) and, from 2 MiB up, to a huge page and advised
/// as such before its first write.
pub struct WeightBytes {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is uniquely owned, like a Vec<u8>.
unsafe impl Send for WeightBytes {}
unsafe impl Sync for WeightBytes {}

impl WeightBytes {
    /// Huge-page alignment only for buffers that can hold a huge page; smaller ones (biases'
    /// matrices, test models) would leave up to 2 MiB of padding each in the heap.
    fn layout(len: usize) -> Layout {
        let align = if len >= HUGE_PAGE { HUGE_PAGE } else { 64 };
        Layout::from_size_align(len.max(1), align).expect("weight buffer too large")
    }

    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> WeightBytes {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            handle_alloc_error(layout)
        };
        advise(ptr.as_ptr(), layout.size());
        // SAFETY: `ptr` points to `layout.size()` bytes this buffer owns.
        unsafe { ptr.as_ptr().write_bytes(0, layout.size()) };
        WeightBytes { ptr, len }
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

impl Drop for WeightBytes {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.len)) };
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
        for len in [0, 1, 100, 3 << 20] {
            let mut b = WeightBytes::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            let align = if len >= HUGE_PAGE { HUGE_PAGE } else { 64 };
            assert_eq!(b.as_ptr() as usize % align, 0);
            if len > 0 {
                b[len - 1] = 7;
            }
            let c = b.clone();
            assert_eq!(&c[..], &b[..]);
        }
    }
}
