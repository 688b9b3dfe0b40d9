//! The KV block pool: O(1) allocate and free, reference counts, and automatic prefix reuse.
//!
//! A full block of prompt tokens is keyed by a chained hash of its tokens and its parent's key.
//! Freed blocks keep their key and stay findable until they are reused for something else:
//! the free list is an intrusive LRU list (blocks without a key at the front, keyed blocks
//! appended at the back as they are freed), so allocation evicts the least recently freed
//! cached block last.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Index of a block in the KV pool.
pub type BlockId = u32;

const NIL: u32 = u32::MAX;

/// Seed of the prefix hash: fixed, so keys are stable across processes (for KV transfer).
pub const PREFIX_HASH_SEED: u64 = 0x7461_6e64_656d_4b56;

/// Key of a full block: xxh3 over the parent block's key and this block's token ids.
pub fn block_key(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut bytes = Vec::with_capacity(8 + 4 * tokens.len());
    bytes.extend_from_slice(&parent.unwrap_or(0).to_le_bytes());
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, PREFIX_HASH_SEED)
}

/// Keys of every full block of `tokens`.
pub fn block_keys(tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut keys = Vec::with_capacity(tokens.len() / block_size);
    let mut parent = None;
    for chunk in tokens.chunks_exact(block_size) {
        let k = block_key(parent, chunk);
        keys.push(k);
        parent = Some(k);
    }
    keys
}

/// Usage and prefix-cache counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Blocks in the pool.
    pub total: usize,
    /// Blocks referenced by at least one sequence.
    pub in_use: usize,
    /// Free blocks that still hold a reusable prefix.
    pub cached_free: usize,
    /// Prefix lookups made.
    pub lookups: u64,
    /// Lookups that found a block.
    pub hits: u64,
}

/// The block allocator. Use it through [`KvBlocks`], whose tables free blocks on drop.
#[derive(Debug)]
pub struct BlockPool {
    refs: Vec<u32>,
    key: Vec<Option<u64>>,
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    free: usize,
    cached_free: usize,
    index: HashMap<u64, BlockId>,
    lookups: u64,
    hits: u64,
}

impl BlockPool {
    /// A pool of `n` free blocks.
    pub fn new(n: usize) -> BlockPool {
        assert!(n < NIL as usize, "pool too large");
        let mut p = BlockPool {
            refs: vec![0; n],
            key: vec![None; n],
            prev: vec![NIL; n],
            next: vec![NIL; n],
            head: NIL,
            tail: NIL,
            free: 0,
            cached_free: 0,
            index: HashMap::new(),
            lookups: 0,
            hits: 0,
        };
        for b in 0..n as u32 {
            p.push_back(b);
        }
        p
    }

    fn unlink(&mut self, b: u32) {
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        if p == NIL {
            self.head = n
        } else {
            self.next[p as usize] = n
        }
        if n == NIL {
            self.tail = p
        } else {
            self.prev[n as usize] = p
        }
        self.prev[b as usize] = NIL;
        self.next[b as usize] = NIL;
        self.free -= 1;
        if self.key[b as usize].is_some() {
            self.cached_free -= 1;
        }
    }

    fn push_back(&mut self, b: u32) {
        self.prev[b as usize] = self.tail;
        self.next[b as usize] = NIL;
        if self.tail == NIL {
            self.head = b
        } else {
            self.next[self.tail as usize] = b
        }
        self.tail = b;
        self.free += 1;
        if self.key[b as usize].is_some() {
            self.cached_free += 1;
        }
    }

    fn push_front(&mut self, b: u32) {
        self.next[b as usize] = self.head;
        self.prev[b as usize] = NIL;
        if self.head == NIL {
            self.tail = b
        } else {
            self.prev[self.head as usize] = b
        }
        self.head = b;
        self.free += 1;
        if self.key[b as usize].is_some() {
            self.cached_free += 1;
        }
    }

    /// Blocks that can be allocated now (cached free blocks included).
    pub fn num_free(&self) -> usize {
        self.free
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Takes a free block (evicting the least recently freed cached prefix if need be).
    fn allocate(&mut self) -> Option<BlockId> {
        let b = self.head;
        if b == NIL {
            return None;
        }
        self.unlink(b);
        if let Some(k) = self.key[b as usize].take() {
            self.index.remove(&k);
        }
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// The block holding prefix `key`, referenced once more, if cached.
    fn lookup(&mut self, key: u64) -> Option<BlockId> {
        self.lookups += 1;
        let b = *self.index.get(&key)?;
        self.hits += 1;
        if self.refs[b as usize] == 0 {
            self.unlink(b);
        }
        self.refs[b as usize] += 1;
        Some(b)
    }

    /// Whether `key` is cached, and whether using it would take a block off the free list.
    pub fn peek(&self, key: u64) -> Option<bool> {
        self.index.get(&key).map(|&b| self.refs[b as usize] == 0)
    }

    /// Records that `b` (in use, full) holds the prefix `key`.
    fn register(&mut self, b: BlockId, key: u64) {
        if self.key[b as usize].is_none() && !self.index.contains_key(&key) {
            self.key[b as usize] = Some(key);
            self.index.insert(key, b);
        }
    }

    fn release(&mut self, b: BlockId) {
        let r = &mut self.refs[b as usize];
        assert!(*r > 0, "block {b} released more often than taken");
        *r -= 1;
        if *r == 0 {
            if self.key[b as usize].is_some() {
                self.push_back(b);
            } else {
                self.push_front(b);
            }
        }
    }

    /// Counters.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            total: self.refs.len(),
            in_use: self.refs.len() - self.free,
            cached_free: self.cached_free,
            lookups: self.lookups,
            hits: self.hits,
        }
    }

    /// Drops every cached prefix (blocks stay allocated or free as they are).
    pub fn clear_prefix_cache(&mut self) {
        for b in 0..self.refs.len() {
            if self.key[b].take().is_some() && self.refs[b] == 0 {
                self.cached_free -= 1;
            }
        }
        self.index.clear();
    }
}

/// A cheap, cloneable handle on the engine's pool (single-threaded: the engine loop owns it).
#[derive(Clone, Debug)]
pub struct KvBlocks(Rc<RefCell<BlockPool>>);

impl KvBlocks {
    /// A pool of `n` blocks.
    pub fn new(n: usize) -> KvBlocks {
        KvBlocks(Rc::new(RefCell::new(BlockPool::new(n))))
    }

    /// Read access to the pool (counts, peeks).
    pub fn pool(&self) -> std::cell::Ref<'_, BlockPool> {
        self.0.borrow()
    }

    /// An empty block table on this pool.
    pub fn table(&self) -> BlockTable {
        BlockTable {
            pool: self.clone(),
            blocks: Vec::new(),
            keyed: 0,
        }
    }

    /// Counters.
    pub fn stats(&self) -> PoolStats {
        self.0.borrow().stats()
    }
}

/// One sequence's blocks. Dropping it releases them (cached prefixes stay findable).
#[derive(Debug)]
pub struct BlockTable {
    pool: KvBlocks,
    blocks: Vec<BlockId>,
    /// Leading blocks already registered (or found) under their prefix keys.
    keyed: usize,
}

impl BlockTable {
    /// The block ids, in position order.
    pub fn ids(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Number of blocks held.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether no block is held.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Adopts cached blocks for the longest run of `keys` found; returns how many.
    /// Only valid on an empty table.
    pub fn match_prefix(&mut self, keys: &[u64]) -> usize {
        assert!(
            self.blocks.is_empty(),
            "prefix matching starts from an empty table"
        );
        let mut pool = self.pool.0.borrow_mut();
        for &k in keys {
            match pool.lookup(k) {
                Some(b) => self.blocks.push(b),
                None => break,
            }
        }
        self.keyed = self.blocks.len();
        self.keyed
    }

    /// Grows the table to `n` blocks; false (and unchanged) if the pool has too few free.
    pub fn grow_to(&mut self, n: usize) -> bool {
        let mut pool = self.pool.0.borrow_mut();
        let need = n.saturating_sub(self.blocks.len());
        if pool.num_free() < need {
            return false;
        }
        for _ in 0..need {
            self.blocks
                .push(pool.allocate().expect("free count checked"));
        }
        true
    }

    /// Registers the prefix keys of blocks now full of prompt tokens (`keys[i]` is block `i`'s).
    pub fn register_full(&mut self, keys: &[u64]) {
        let mut pool = self.pool.0.borrow_mut();
        while self.keyed < keys.len().min(self.blocks.len()) {
            pool.register(self.blocks[self.keyed], keys[self.keyed]);
            self.keyed += 1;
        }
    }
}

impl Drop for BlockTable {
    fn drop(&mut self) {
        let mut pool = self.pool.0.borrow_mut();
        for &b in &self.blocks {
            pool.release(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefix_blocks_survive_free_until_evicted() {
        let kv = KvBlocks::new(4);
        let keys = block_keys(&[1, 2, 3, 4, 5, 6, 7, 8], 4);
        let first_ids = {
            let mut t = kv.table();
            assert_eq!(t.match_prefix(&keys), 0);
            assert!(t.grow_to(2));
            t.register_full(&keys);
            t.ids().to_vec()
        };
        assert_eq!(kv.stats().cached_free, 2);
        let mut t = kv.table();
        assert_eq!(t.match_prefix(&keys), 2);
        assert_eq!(t.ids(), &first_ids[..]);
        assert_eq!(kv.stats().hits, 2);
        drop(t);
        // Allocating all four blocks evicts the cached ones last, then forgets them.
        let mut all = kv.table();
        assert!(all.grow_to(4));
        assert_eq!(kv.pool().peek(keys[0]), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Open(Vec<u32>),
        Grow(usize, usize),
        Close(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            proptest::collection::vec(0u32..3, 0..12).prop_map(Op::Open),
            (any::<usize>(), 0usize..6).prop_map(|(i, n)| Op::Grow(i, n)),
            any::<usize>().prop_map(Op::Close),
        ]
    }

    proptest! {
        /// Blocks are conserved: in use + free = total, no block is in two tables unless shared
        /// through a prefix key, and dropping every table frees every block.
        #[test]
        fn accounting_is_conserved(ops in proptest::collection::vec(op(), 1..60)) {
            let kv = KvBlocks::new(8);
            let mut tables: Vec<(BlockTable, Vec<u64>)> = vec![];
            for o in ops {
                match o {
                    Op::Open(tokens) => {
                        let keys = block_keys(&tokens, 2);
                        let mut t = kv.table();
                        let hit = t.match_prefix(&keys);
                        if t.grow_to(keys.len().max(hit)) { t.register_full(&keys); }
                        tables.push((t, keys));
                    }
                    Op::Grow(i, n) if !tables.is_empty() => { let k = i % tables.len(); tables[k].0.grow_to(n); }
                    Op::Close(i) if !tables.is_empty() => { let k = i % tables.len(); tables.swap_remove(k); }
                    _ => {}
                }
                let s = kv.stats();
                let mut distinct: Vec<u32> = tables.iter().flat_map(|t| t.0.ids().to_vec()).collect();
                distinct.sort_unstable();
                distinct.dedup();
                prop_assert_eq!(s.in_use, distinct.len());
                prop_assert_eq!(s.in_use + kv.pool().num_free(), s.total);
                prop_assert!(s.cached_free <= kv.pool().num_free());
            }
            tables.clear();
            prop_assert_eq!(kv.stats().in_use, 0);
        }
    }
}
