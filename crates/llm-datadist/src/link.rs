//! Links to peers: the channels each side sends requests on, the sockets to close on unlink,
//! and the per-link transfer lock (transfers on one link are serialized; an unlink during a
//! transfer is `LLM_LINK_BUSY`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Instant;

use crate::cache::{total_len, Segment};
use crate::protocol::{Access, Request};
use crate::status::{LlmException, LlmStatusCode, Result};
use crate::transport::{Channel, Closer};

/// Transfers smaller than this use one stream even when the link has several.
const SPLIT_THRESHOLD: u64 = 4 << 20;

/// One link to a peer cluster.
pub(crate) struct Link {
    pub peer: u64,
    pub nonce: u64,
    outgoing: Mutex<Vec<Arc<Mutex<Channel>>>>,
    closers: Mutex<Vec<Closer>>,
    broken: Mutex<Option<String>>,
    closed: AtomicBool,
    transfer: Mutex<()>,
    pub shm: AtomicBool,
}

/// Direction of a transfer, seen from the requester.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    /// Peer memory -> local memory.
    Pull,
    /// Local memory -> peer memory.
    Push,
}

impl Link {
    pub fn new(peer: u64, nonce: u64) -> Arc<Self> {
        Arc::new(Self {
            peer,
            nonce,
            outgoing: Mutex::new(Vec::new()),
            closers: Mutex::new(Vec::new()),
            broken: Mutex::new(None),
            closed: AtomicBool::new(false),
            transfer: Mutex::new(()),
            shm: AtomicBool::new(false),
        })
    }

    /// Adds a channel this side sends requests on.
    pub fn add_outgoing(&self, ch: Channel) {
        self.add_closer(ch.closer());
        if ch.is_shm() {
            self.shm.store(true, Ordering::Relaxed);
        }
        self.outgoing
            .lock()
            .expect("link lock")
            .push(Arc::new(Mutex::new(ch)));
    }

    /// Remembers a socket to close when the link goes.
    pub fn add_closer(&self, c: Closer) {
        if self.closed.load(Ordering::Acquire) {
            c.close();
        }
        self.closers.lock().expect("link lock").push(c);
    }

    /// Marks the link unusable (peer died, protocol error, transfer timeout).
    pub fn mark_broken(&self, why: &str) {
        let mut b = self.broken.lock().expect("link lock");
        if b.is_none() {
            tracing::warn!(peer = self.peer, "link broken: {why}");
            *b = Some(why.to_string());
        }
    }

    /// Marks the link as going away (its handlers then end quietly on EOF) before the
    /// sockets close.
    pub fn begin_close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Closes every socket of the link.
    pub fn close(&self) {
        self.begin_close();
        for c in self.closers.lock().expect("link lock").iter() {
            c.close();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Takes the transfer lock without waiting (for unlink), or `LLM_LINK_BUSY`.
    pub fn try_quiesce(&self) -> Result<MutexGuard<'_, ()>> {
        match self.transfer.try_lock() {
            Ok(g) => Ok(g),
            Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(TryLockError::WouldBlock) => Err(LlmException::new(
                LlmStatusCode::LlmLinkBusy,
                format!("link to cluster {} has a transfer in flight", self.peer),
            )),
        }
    }

    fn usable(&self) -> Result<()> {
        if let Some(why) = self.broken.lock().expect("link lock").as_ref() {
            return Err(LlmException::new(
                LlmStatusCode::LlmLinkFailed,
                format!(
                    "link to cluster {} is unusable ({why}); unlink and link again",
                    self.peer
                ),
            ));
        }
        Ok(())
    }

    fn channels(&self) -> Vec<Arc<Mutex<Channel>>> {
        self.outgoing.lock().expect("link lock").clone()
    }

    /// Sends a control request (unlink, ping) on the first channel and waits for the reply.
    pub fn control(&self, req: &Request, deadline: Instant) -> Result<()> {
        let channels = self.channels();
        let ch = channels.first().ok_or_else(|| {
            LlmException::new(LlmStatusCode::LlmLinkFailed, "link has no channel")
        })?;
        let mut ch = ch.lock().expect("channel lock");
        ch.send_request(req, deadline)?;
        ch.recv_reply(deadline)?.into_result()
    }

    /// Runs one transfer: `local` are this side's segments (one equal share per tensor of
    /// `access.tensors`, or a single group for address targets). Large transfers over several
    /// streams are split by tensor. Timeouts and transport failures make the link unusable;
    /// errors the peer reports (missing key, bad range) leave it usable.
    pub fn transfer(
        &self,
        dir: Dir,
        access: Access,
        local: &[Segment],
        splittable: bool,
        deadline: Instant,
    ) -> Result<()> {
        self.usable()?;
        let _serial = self.transfer.lock().unwrap_or_else(|p| p.into_inner());
        self.usable()?;
        let channels = self.channels();
        if channels.is_empty() {
            return Err(LlmException::new(
                LlmStatusCode::LlmNotYetLink,
                format!("link to cluster {} is still being set up", self.peer),
            ));
        }
        let n_tensors = access.tensors.len();
        let streams = if splittable && n_tensors > 0 && total_len(local) >= SPLIT_THRESHOLD {
            channels.len().min(n_tensors).max(1)
        } else {
            1
        };
        let result = if streams <= 1 {
            run_one(&channels[0], dir, &access, local, deadline)
        } else {
            let per_tensor = local.len() / n_tensors;
            let chunk = n_tensors.div_ceil(streams);
            std::thread::scope(|s| {
                let handles: Vec<_> = access
                    .tensors
                    .chunks(chunk)
                    .zip(local.chunks(chunk * per_tensor))
                    .zip(&channels)
                    .map(|((tensors, segs), ch)| {
                        let sub = Access {
                            target: access.target.clone(),
                            tensors: tensors.to_vec(),
                            size: access.size,
                            total: access.total / n_tensors as u64 * tensors.len() as u64,
                        };
                        s.spawn(move || run_one(ch, dir, &sub, segs, deadline))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(Fail::Link(LlmException::new(
                                LlmStatusCode::LlmFailed,
                                "transfer thread panicked",
                            )))
                        })
                    })
                    .find(|r| r.is_err())
                    .unwrap_or(Ok(()))
            })
        };
        match result {
            Ok(()) => Ok(()),
            Err(Fail::Peer(e)) => Err(e),
            Err(Fail::Link(e)) => {
                self.mark_broken(&e.message);
                if self.is_closed() {
                    return Err(LlmException::new(
                        LlmStatusCode::LlmLinkFailed,
                        format!(
                            "link to cluster {} was closed during the transfer",
                            self.peer
                        ),
                    ));
                }
                Err(e)
            }
        }
    }
}

/// Why a transfer failed: the peer refused it (the link stays usable) or the link failed.
enum Fail {
    Peer(LlmException),
    Link(LlmException),
}

/// One request/response exchange with its payload on one channel.
fn run_one(
    ch: &Mutex<Channel>,
    dir: Dir,
    access: &Access,
    local: &[Segment],
    deadline: Instant,
) -> std::result::Result<(), Fail> {
    let mut ch = ch.lock().unwrap_or_else(|p| p.into_inner());
    let reply = |ch: &mut Channel| match ch.recv_reply(deadline) {
        Ok(r) => r.into_result().map_err(Fail::Peer),
        Err(e) => Err(Fail::Link(e)),
    };
    let request = match dir {
        Dir::Pull => Request::Read(access.clone()),
        Dir::Push => Request::Write(access.clone()),
    };
    ch.send_request(&request, deadline).map_err(Fail::Link)?;
    reply(&mut ch)?;
    match dir {
        Dir::Pull => ch.recv_payload(local, deadline).map_err(Fail::Link),
        Dir::Push => {
            ch.send_payload(local, deadline).map_err(Fail::Link)?;
            reply(&mut ch)
        }
    }
}
