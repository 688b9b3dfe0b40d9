//! The optional memory pools behind `allocate_cache` (`mem_pool_cfg`, `host_mem_pool_cfg`):
//! one page-aligned region, first-fit with coalescing, allocations freed by `Drop`.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use crate::status::{param_invalid, LlmException, LlmStatusCode, Result};

/// `{"memory_size": bytes, "page_shift": n}` as in the reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct PoolConfig {
    /// Pool size in bytes (> 0).
    pub memory_size: u64,
    /// Allocation granularity is `1 << page_shift` (10..=30).
    #[serde(default = "default_page_shift")]
    pub page_shift: u32,
}

fn default_page_shift() -> u32 {
    16
}

impl PoolConfig {
    /// Parses and checks a pool config string.
    pub fn parse(json: &str) -> Result<Self> {
        let cfg: PoolConfig = serde_json::from_str(json)
            .map_err(|e| LlmException::param(format!("bad memory pool config {json:?}: {e}")))?;
        if cfg.memory_size == 0 {
            param_invalid!("memory pool memory_size must be > 0");
        }
        if !(10..=30).contains(&cfg.page_shift) {
            param_invalid!(
                "memory pool page_shift must be in [10, 30], got {}",
                cfg.page_shift
            );
        }
        Ok(cfg)
    }
}

struct Region {
    base: *mut u8,
    layout: Layout,
}

// SAFETY: the region is plain memory owned by the pool; all access goes through allocations.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: allocated in `MemoryPool::new` with this layout.
        unsafe { dealloc(self.base, self.layout) }
    }
}

struct PoolState {
    /// Free ranges: offset -> length, never adjacent (coalesced).
    free: BTreeMap<u64, u64>,
    used: u64,
}

struct PoolInner {
    region: Region,
    page: u64,
    size: u64,
    state: Mutex<PoolState>,
}

/// A fixed-size memory pool.
#[derive(Clone)]
pub struct MemoryPool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for MemoryPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryPool")
            .field("size", &self.inner.size)
            .field("used", &self.used())
            .finish()
    }
}

impl MemoryPool {
    /// Reserves `cfg.memory_size` bytes (rounded up to whole pages), zeroed.
    pub fn new(cfg: PoolConfig) -> Result<Self> {
        let page = 1u64 << cfg.page_shift;
        let size = cfg.memory_size.div_ceil(page) * page;
        let layout = Layout::from_size_align(size as usize, page.min(1 << 21) as usize)
            .map_err(|e| LlmException::param(format!("memory pool layout: {e}")))?;
        // SAFETY: non-zero size checked by PoolConfig::parse.
        let base = unsafe { alloc_zeroed(layout) };
        if base.is_null() {
            return Err(LlmException::new(
                LlmStatusCode::LlmOutOfMemory,
                format!("cannot reserve a memory pool of {size} bytes"),
            ));
        }
        let state = PoolState {
            free: BTreeMap::from([(0, size)]),
            used: 0,
        };
        Ok(Self {
            inner: Arc::new(PoolInner {
                region: Region { base, layout },
                page,
                size,
                state: Mutex::new(state),
            }),
        })
    }

    /// Bytes in use.
    pub fn used(&self) -> u64 {
        self.inner.state.lock().expect("pool lock").used
    }

    /// Total bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// Allocates `len` bytes (rounded up to pages), first fit.
    pub fn allocate(&self, len: u64) -> Result<PoolBuffer> {
        let len = len.max(1).div_ceil(self.inner.page) * self.inner.page;
        let mut st = self.inner.state.lock().expect("pool lock");
        let found = st
            .free
            .iter()
            .find(|(_, &l)| l >= len)
            .map(|(&o, &l)| (o, l));
        let Some((offset, free_len)) = found else {
            return Err(LlmException::new(
                LlmStatusCode::LlmOutOfMemory,
                format!(
                    "memory pool exhausted: {len} bytes requested, {} of {} in use",
                    st.used, self.inner.size
                ),
            ));
        };
        st.free.remove(&offset);
        if free_len > len {
            st.free.insert(offset + len, free_len - len);
        }
        st.used += len;
        Ok(PoolBuffer {
            pool: self.inner.clone(),
            offset,
            len,
        })
    }
}

/// One allocation; returned to its pool on drop.
pub struct PoolBuffer {
    pool: Arc<PoolInner>,
    offset: u64,
    len: u64,
}

impl PoolBuffer {
    /// Start address.
    pub fn addr(&self) -> u64 {
        self.pool.region.base as u64 + self.offset
    }

    /// Length in bytes (whole pages).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the buffer is empty (never: allocations are at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for PoolBuffer {
    fn drop(&mut self) {
        let mut st = self.pool.state.lock().expect("pool lock");
        st.used -= self.len;
        let (mut offset, mut len) = (self.offset, self.len);
        if let Some((&prev, &plen)) = st.free.range(..offset).next_back() {
            if prev + plen == offset {
                st.free.remove(&prev);
                offset = prev;
                len += plen;
            }
        }
        if let Some(&nlen) = st.free.get(&(offset + len)) {
            st.free.remove(&(offset + len));
            len += nlen;
        }
        st.free.insert(offset, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn config_checks() {
        assert_eq!(
            PoolConfig::parse(r#"{"memory_size": 1024}"#)
                .unwrap()
                .page_shift,
            16
        );
        assert!(PoolConfig::parse(r#"{"memory_size": 0}"#).is_err());
        assert!(PoolConfig::parse(r#"{"memory_size": 10, "page_shift": 40}"#).is_err());
        assert!(PoolConfig::parse("[]").is_err());
    }

    proptest! {
        /// Random allocate/free sequences never overlap, never exceed the pool, and always
        /// coalesce back to one free range.
        #[test]
        fn allocations_are_disjoint(ops in proptest::collection::vec((0u64..5000, any::<bool>()), 1..80)) {
            let pool = MemoryPool::new(PoolConfig { memory_size: 64 * 1024, page_shift: 10 }).unwrap();
            let mut live: Vec<PoolBuffer> = Vec::new();
            for (len, free) in ops {
                if free && !live.is_empty() {
                    live.remove(len as usize % live.len());
                } else if let Ok(b) = pool.allocate(len) {
                    live.push(b);
                }
                let mut spans: Vec<(u64, u64)> = live.iter().map(|b| (b.addr(), b.addr() + b.len())).collect();
                spans.sort();
                for w in spans.windows(2) {
                    prop_assert!(w[0].1 <= w[1].0);
                }
                prop_assert_eq!(pool.used(), live.iter().map(|b| b.len()).sum::<u64>());
            }
            drop(live);
            prop_assert_eq!(pool.used(), 0);
            prop_assert_eq!(pool.inner.state.lock().unwrap().free.len(), 1);
        }
    }
}
