//! Shared-memory rings for peers on the same host: one sealed memfd per connection holding two
//! single-producer/single-consumer rings (one per direction). The creator seals the file
//! against shrinking, so a peer cannot make the mapping fault; all counters read from the
//! peer are range-checked before use.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use memmap2::MmapRaw;

use crate::cache::Segment;
use crate::protocol::ShmOffer;
use crate::status::{LlmException, LlmStatusCode, Result};

const MAGIC: u64 = u64::from_le_bytes(*b"TDDSHM01");
const HEADER: usize = 4096;
const CTRL: usize = 4096;
const WRITE_SEQ: usize = 0;
const READ_SEQ: usize = 128;
const LENS: usize = 256;
/// Slot payload size: small enough that a ring stays in L2, large enough to amortize handoffs.
pub const SLOT_SIZE: usize = 256 << 10;
/// Slots per ring.
pub const NSLOTS: usize = 8;
const RING_BYTES: usize = CTRL + NSLOTS * SLOT_SIZE;
/// Size of the shared file.
pub const FILE_SIZE: usize = HEADER + 2 * RING_BYTES;

fn shm_err(msg: impl Into<String>) -> LlmException {
    LlmException::new(LlmStatusCode::LlmLinkFailed, msg.into())
}

fn os_err(what: &str) -> LlmException {
    shm_err(format!("{what}: {}", std::io::Error::last_os_error()))
}

/// A mapped ring pair.
pub(crate) struct ShmRings {
    map: MmapRaw,
    /// Keeps the memfd open (the peer opens it through /proc while the handshake runs).
    file: File,
    /// Ring this side produces into (0 for the creator, 1 for the opener).
    tx: usize,
    send_seq: u64,
    recv_seq: u64,
}

impl ShmRings {
    /// Creates and seals a new ring file.
    pub fn create() -> Result<Self> {
        let name = c"llm-datadist-ring";
        // SAFETY: plain syscalls on a fresh descriptor we own.
        let file = unsafe {
            let fd = libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING);
            if fd < 0 {
                return Err(os_err("memfd_create"));
            }
            let file = File::from_raw_fd(fd);
            if libc::ftruncate(fd, FILE_SIZE as libc::off_t) != 0 {
                return Err(os_err("ftruncate"));
            }
            let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
            if libc::fcntl(fd, libc::F_ADD_SEALS, seals) != 0 {
                return Err(os_err("sealing the ring file"));
            }
            file
        };
        let map = MmapRaw::map_raw(&file).map_err(|e| shm_err(format!("mmap ring: {e}")))?;
        let rings = Self {
            map,
            file,
            tx: 0,
            send_seq: 0,
            recv_seq: 0,
        };
        rings.word(0).store(MAGIC, Ordering::Relaxed);
        rings.word(8).store(SLOT_SIZE as u64, Ordering::Relaxed);
        rings.word(16).store(NSLOTS as u64, Ordering::Release);
        Ok(rings)
    }

    /// The offer a peer needs to open this file.
    pub fn offer(&self) -> ShmOffer {
        ShmOffer {
            pid: std::process::id(),
            fd: self.file.as_raw_fd(),
            size: FILE_SIZE as u64,
        }
    }

    /// Opens a peer's ring file, checking seals, size and header.
    pub fn open(offer: &ShmOffer) -> Result<Self> {
        if offer.size != FILE_SIZE as u64 {
            return Err(shm_err(format!(
                "ring size {} does not match {FILE_SIZE}",
                offer.size
            )));
        }
        let path = format!("/proc/{}/fd/{}", offer.pid, offer.fd);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| shm_err(format!("open {path}: {e}")))?;
        // SAFETY: fcntl on a descriptor we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        let need = libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        if seals < 0 || seals & need != need {
            return Err(shm_err(format!("{path} is not a sealed ring file")));
        }
        let len = file
            .metadata()
            .map_err(|e| shm_err(format!("stat {path}: {e}")))?
            .len();
        if len != FILE_SIZE as u64 {
            return Err(shm_err(format!(
                "{path} has {len} bytes, expected {FILE_SIZE}"
            )));
        }
        let map = MmapRaw::map_raw(&file).map_err(|e| shm_err(format!("mmap {path}: {e}")))?;
        let rings = Self {
            map,
            file,
            tx: 1,
            send_seq: 0,
            recv_seq: 0,
        };
        let header_ok = rings.word(0).load(Ordering::Acquire) == MAGIC
            && rings.word(8).load(Ordering::Relaxed) == SLOT_SIZE as u64
            && rings.word(16).load(Ordering::Relaxed) == NSLOTS as u64;
        if !header_ok {
            return Err(shm_err(format!("{path} has a foreign header")));
        }
        Ok(rings)
    }

    fn word(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset.is_multiple_of(8) && offset + 8 <= FILE_SIZE);
        // SAFETY: in bounds of the mapping (which lives as long as self), 8-aligned (page
        // aligned base); shared words are only accessed atomically.
        unsafe { &*(self.map.as_mut_ptr().add(offset) as *const AtomicU64) }
    }

    fn ring_base(&self, ring: usize) -> usize {
        HEADER + ring * RING_BYTES
    }

    fn slot_ptr(&self, ring: usize, slot: usize) -> *mut u8 {
        // SAFETY: slot < NSLOTS, so the slot lies inside the mapping.
        unsafe {
            self.map
                .as_mut_ptr()
                .add(self.ring_base(ring) + CTRL + slot * SLOT_SIZE)
        }
    }

    /// Streams `segs` (local memory) through this side's ring.
    pub fn send(&mut self, segs: &[Segment], deadline: Instant) -> Result<()> {
        let ring = self.tx;
        let base = self.ring_base(ring);
        let mut segs = SegCursor::new(segs);
        while !segs.done() {
            let w = self.send_seq;
            wait(deadline, || {
                let r = self.word(base + READ_SEQ).load(Ordering::Acquire);
                match w.wrapping_sub(r) {
                    d if d < NSLOTS as u64 => Ok(true),
                    d if d == NSLOTS as u64 => Ok(false),
                    _ => Err(shm_err("peer corrupted the ring read counter")),
                }
            })?;
            let slot = (w % NSLOTS as u64) as usize;
            let dst = self.slot_ptr(ring, slot);
            let mut filled = 0;
            while filled < SLOT_SIZE && !segs.done() {
                let (addr, n) = segs.next_chunk(SLOT_SIZE - filled);
                // SAFETY: the source is registered cache memory (caller's contract) and the
                // destination is within this slot.
                unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, dst.add(filled), n) };
                filled += n;
            }
            self.word(base + LENS + slot * 8)
                .store(filled as u64, Ordering::Relaxed);
            self.send_seq = w + 1;
            self.word(base + WRITE_SEQ)
                .store(self.send_seq, Ordering::Release);
        }
        Ok(())
    }

    /// Receives exactly the bytes of `segs` from the peer's ring into local memory.
    pub fn recv(&mut self, segs: &[Segment], deadline: Instant) -> Result<()> {
        let ring = 1 - self.tx;
        let base = self.ring_base(ring);
        let mut segs = SegCursor::new(segs);
        while !segs.done() {
            let r = self.recv_seq;
            wait(deadline, || {
                let w = self.word(base + WRITE_SEQ).load(Ordering::Acquire);
                match w.wrapping_sub(r) {
                    0 => Ok(false),
                    d if d <= NSLOTS as u64 => Ok(true),
                    _ => Err(shm_err("peer corrupted the ring write counter")),
                }
            })?;
            let slot = (r % NSLOTS as u64) as usize;
            let len = self.word(base + LENS + slot * 8).load(Ordering::Relaxed) as usize;
            if len == 0 || len > SLOT_SIZE || len as u64 > segs.remaining() {
                return Err(shm_err(format!(
                    "peer sent a ring chunk of {len} bytes with {} expected",
                    segs.remaining()
                )));
            }
            let src = self.slot_ptr(ring, slot);
            let mut taken = 0;
            while taken < len {
                let (addr, n) = segs.next_chunk(len - taken);
                // SAFETY: source within the slot (len <= SLOT_SIZE); destination is registered
                // cache memory the transfer was validated against.
                unsafe { std::ptr::copy_nonoverlapping(src.add(taken), addr as *mut u8, n) };
                taken += n;
            }
            self.recv_seq = r + 1;
            self.word(base + READ_SEQ)
                .store(self.recv_seq, Ordering::Release);
        }
        Ok(())
    }
}

/// Spins, then yields, until `ready` says so or the deadline passes.
fn wait(deadline: Instant, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
    let mut spins = 0u32;
    loop {
        if ready()? {
            return Ok(());
        }
        spins += 1;
        if spins < 256 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
            if spins.is_multiple_of(64) && Instant::now() >= deadline {
                return Err(LlmException::new(
                    LlmStatusCode::LlmTimeout,
                    "shared-memory transfer timed out",
                ));
            }
        }
    }
}

/// Walks a segment list in chunks.
pub(crate) struct SegCursor<'a> {
    segs: &'a [Segment],
    i: usize,
    off: u64,
    left: u64,
}

impl<'a> SegCursor<'a> {
    pub fn new(segs: &'a [Segment]) -> Self {
        Self {
            segs,
            i: 0,
            off: 0,
            left: crate::cache::total_len(segs),
        }
    }

    pub fn done(&self) -> bool {
        self.left == 0
    }

    pub fn remaining(&self) -> u64 {
        self.left
    }

    /// The next `(addr, len)` of at most `max` bytes.
    pub fn next_chunk(&mut self, max: usize) -> (u64, usize) {
        while self.segs[self.i].len == self.off {
            self.i += 1;
            self.off = 0;
        }
        let s = self.segs[self.i];
        let n = ((s.len - self.off) as usize).min(max);
        let addr = s.addr + self.off;
        self.off += n as u64;
        self.left -= n as u64;
        (addr, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ring_moves_bytes_between_mappings() {
        let mut a = ShmRings::create().unwrap();
        let mut b = ShmRings::open(&a.offer()).unwrap();
        let src: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut dst = vec![0u8; src.len()];
        let deadline = Instant::now() + Duration::from_secs(10);
        // Uneven segments exercise packing across slot boundaries.
        let cuts = [0, 5, 70_000, 1_000_001, 2_999_999, src.len()];
        let seg = |base: u64| -> Vec<Segment> {
            cuts.windows(2)
                .map(|w| Segment {
                    addr: base + w[0] as u64,
                    len: (w[1] - w[0]) as u64,
                })
                .collect()
        };
        let (ssegs, dsegs) = (seg(src.as_ptr() as u64), seg(dst.as_mut_ptr() as u64));
        std::thread::scope(|s| {
            s.spawn(|| a.send(&ssegs, deadline).unwrap());
            b.recv(&dsegs, deadline).unwrap();
        });
        assert_eq!(src, dst);
        // Nothing sent: the receiver times out instead of hanging.
        let err = b
            .recv(&dsegs[..1], Instant::now() + Duration::from_millis(50))
            .unwrap_err();
        assert_eq!(err.status_code, LlmStatusCode::LlmTimeout);
    }

    #[test]
    fn corrupted_counters_are_rejected() {
        let a = ShmRings::create().unwrap();
        let mut b = ShmRings::open(&a.offer()).unwrap();
        a.word(HEADER + WRITE_SEQ).store(1_000, Ordering::Release);
        let mut dst = [0u8; 16];
        let segs = [Segment {
            addr: dst.as_mut_ptr() as u64,
            len: 16,
        }];
        let err = b
            .recv(&segs, Instant::now() + Duration::from_secs(1))
            .unwrap_err();
        assert_eq!(err.status_code, LlmStatusCode::LlmLinkFailed);
        assert_eq!(dst, [0; 16]);
    }
}
