//! KV handoff between engines for prefill/decode disaggregation.
//!
//! Producer side: a prefill-only request keeps its prompt's blocks after its first token
//! ([`HeldKv`]) until the consumer confirms with [`Engine::release`](crate::Engine::release),
//! or a timeout frees them, so a consumer that dies never leaks KV.
//! Consumer side: a [`Reservation`] holds free blocks for the bytes to land in (a transfer
//! library writes them); [`Engine::submit_imported`](crate::Engine::submit_imported) turns it
//! into a running sequence whose prompt KV is already computed. Dropping an unused
//! reservation returns its blocks.

use std::sync::mpsc::Sender;

use crate::worker::Command;

/// Blocks a finished prefill-only request left held for a consumer to pull.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeldKv {
    /// Pass to `release` once the consumer has the bytes (or gave up).
    pub handle: u64,
    /// Block ids, in prompt order.
    pub blocks: Vec<u32>,
}

/// One raw region of the KV pool (a layer's K or V tensor), for registering with a transfer
/// library: tensors in the order K0, V0, K1, V1, ...
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvRegion {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub len: usize,
}

/// Free blocks set aside for imported KV; returned to the pool when dropped unused.
#[derive(Debug)]
pub struct Reservation {
    pub(crate) id: u64,
    pub(crate) blocks: Vec<u32>,
    pub(crate) tx: Sender<Command>,
    pub(crate) consumed: bool,
}

impl Reservation {
    /// The reserved block ids (where the imported blocks must be written, in order).
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.consumed {
            let _ = self.tx.send(Command::Unreserve(self.id));
        }
    }
}
