//! Helpers for parallel loops that write disjoint parts of one output buffer.

/// A raw pointer that may be shared across rayon tasks which write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub *mut T);

// SAFETY: users only write disjoint index sets from different tasks (checked at each use).
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    #[inline(always)]
    pub fn ptr(self) -> *mut T {
        self.0
    }

    /// # Safety
    /// `i` must be in bounds of the original buffer and written by no other task concurrently.
    #[inline(always)]
    pub unsafe fn write(self, i: usize, v: T) {
        *self.0.add(i) = v;
    }

    /// # Safety
    /// `start..start+len` must be in bounds and touched by no other task concurrently.
    #[inline(always)]
    pub unsafe fn slice_mut<'a>(self, start: usize, len: usize) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// How many output rows each parallel task takes: enough tasks to balance the pool, each a
/// multiple of `align` rows.
pub(crate) fn chunk_rows(n: usize, align: usize) -> usize {
    let tasks = rayon::current_num_threads() * 4;
    let per = n.div_ceil(tasks.max(1)).max(align);
    per.div_ceil(align) * align
}
