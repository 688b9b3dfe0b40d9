//! A group of ranks on one host sharing a memory segment: each collective is a sequence of
//! rounds in which every rank writes its slot, publishes the round number, waits until every
//! rank has published it and reads what it needs. Two sets of slots alternate, so a slot is
//! rewritten only after every rank has moved past the round that read it.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use memmap2::MmapMut;

use crate::{Collective, CollectiveError};

const MAGIC: u64 = 0x7461_6e64_656d_7470; // "tandemtp"
/// Ranks one segment can hold (the header has a cache line of round counter for each).
pub const MAX_RANKS: usize = 32;
const HEADER: usize = 4096;
const PIDS: usize = 64;
const SEQS: usize = 1024;

/// Busy-polls before yielding; the ranks of a forward pass are normally microseconds apart.
const SPINS: u32 = 2000;
/// How long a waiting rank yields its core before it starts sleeping.
const YIELD_FOR: Duration = Duration::from_millis(2);
/// How often a waiting rank checks that its peers still exist.
const LIVENESS_EVERY: Duration = Duration::from_millis(20);

/// One rank's handle on a shared-memory group.
pub struct ShmGroup {
    map: MmapMut,
    path: PathBuf,
    rank: usize,
    world: usize,
    slot_bytes: usize,
    /// The last round this rank took part in; the lock also keeps collectives of one rank
    /// from interleaving.
    round: Mutex<u64>,
    owner: bool,
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> CollectiveError + '_ {
    move |e| CollectiveError::Setup(format!("{what}: {e}"))
}

impl ShmGroup {
    /// Creates a group of `world` ranks with slots of `slot_bytes` (rounded up to 64) and
    /// joins it as rank 0. Other ranks join with [`ShmGroup::join`] on [`ShmGroup::path`];
    /// rank 0 names their process ids with [`ShmGroup::set_pid`] as it starts them, so that
    /// a rank that dies before joining is noticed too.
    pub fn create(world: usize, slot_bytes: usize) -> Result<ShmGroup, CollectiveError> {
        if world == 0 || world > MAX_RANKS {
            return Err(CollectiveError::Setup(format!(
                "{world} ranks (1 to {MAX_RANKS} per group)"
            )));
        }
        let slot_bytes = slot_bytes.max(64).next_multiple_of(64);
        let dir = Path::new("/dev/shm");
        let dir = if dir.is_dir() {
            dir.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = dir.join(format!(
            "tandem-tp-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(setup("cannot create the shared segment"))?;
        let len = HEADER + 2 * world * slot_bytes;
        file.set_len(len as u64)
            .map_err(setup("cannot size the shared segment"))?;
        let mut g = ShmGroup::map(file, path, 0, world, slot_bytes, true)?;
        g.map[8..16].copy_from_slice(&(world as u64).to_le_bytes());
        g.map[16..24].copy_from_slice(&(slot_bytes as u64).to_le_bytes());
        g.pid(0).store(std::process::id(), Ordering::Relaxed);
        g.map[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        Ok(g)
    }

    /// Joins the group at `path` as `rank`.
    pub fn join(path: &Path, rank: usize) -> Result<ShmGroup, CollectiveError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(setup("cannot open the shared segment"))?;
        let len = file
            .metadata()
            .map_err(setup("cannot stat the shared segment"))?
            .len() as usize;
        if len < HEADER {
            return Err(CollectiveError::Setup(
                "the shared segment is too short".into(),
            ));
        }
        // SAFETY: the segment is only accessed through the header's atomics and the slots,
        // under the round protocol.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(setup("cannot map the segment"))?;
        let word = |at: usize| u64::from_le_bytes(map[at..at + 8].try_into().expect("8 bytes"));
        let (magic, world, slot_bytes) = (word(0), word(8) as usize, word(16) as usize);
        if magic != MAGIC || world == 0 || world > MAX_RANKS || rank >= world {
            return Err(CollectiveError::Setup(format!(
                "{} is not a group this rank ({rank}) belongs to",
                path.display()
            )));
        }
        if len != HEADER + 2 * world * slot_bytes {
            return Err(CollectiveError::Setup(
                "the shared segment has the wrong size".into(),
            ));
        }
        drop(map);
        let g = ShmGroup::map(file, path.into(), rank, world, slot_bytes, false)?;
        g.pid(rank).store(std::process::id(), Ordering::Release);
        Ok(g)
    }

    fn map(
        file: File,
        path: PathBuf,
        rank: usize,
        world: usize,
        slot_bytes: usize,
        owner: bool,
    ) -> Result<ShmGroup, CollectiveError> {
        // SAFETY: as in `join`.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(setup("cannot map the segment"))?;
        Ok(ShmGroup {
            map,
            path,
            rank,
            world,
            slot_bytes,
            round: Mutex::new(0),
            owner,
        })
    }

    /// The segment's file (what other ranks join).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `rank`'s process id (rank 0, as it starts the others).
    pub fn set_pid(&self, rank: usize, pid: u32) {
        self.pid(rank).store(pid, Ordering::Release);
    }

    /// Removes the segment's name once every rank has it mapped (nothing is left behind in
    /// /dev/shm if the processes die later).
    pub fn unlink(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    fn atomic_u32(&self, at: usize) -> &AtomicU32 {
        debug_assert!(at.is_multiple_of(4) && at + 4 <= HEADER);
        // SAFETY: in-bounds, aligned (the mapping is page-aligned), and only ever accessed
        // atomically by every process.
        unsafe { &*(self.map.as_ptr().add(at) as *const AtomicU32) }
    }

    fn pid(&self, rank: usize) -> &AtomicU32 {
        self.atomic_u32(PIDS + 4 * rank)
    }

    fn aborted(&self) -> &AtomicU32 {
        self.atomic_u32(24)
    }

    fn seq(&self, rank: usize) -> &AtomicU64 {
        let at = SEQS + 64 * rank;
        // SAFETY: as in `atomic_u32`; 64-byte aligned.
        unsafe { &*(self.map.as_ptr().add(at) as *const AtomicU64) }
    }

    fn slot_ptr(&self, round: u64, rank: usize) -> *mut u8 {
        let i = (round % 2) as usize * self.world + rank;
        // SAFETY: in bounds by the segment's size, checked at create/join.
        unsafe { self.map.as_ptr().add(HEADER + i * self.slot_bytes) as *mut u8 }
    }

    /// One round: writes this rank's slot, publishes, and waits for every rank; returns the
    /// round, whose slots [`slot`](Self::slot) then reads.
    fn round(&self, round: &mut u64, write: &[u8]) -> Result<u64, CollectiveError> {
        debug_assert!(write.len() <= self.slot_bytes);
        *round += 1;
        let r = *round;
        // SAFETY: this rank's slot of parity r % 2 is read by nobody now: every rank has
        // published r - 1, so all are done with round r - 2.
        unsafe {
            std::ptr::copy_nonoverlapping(write.as_ptr(), self.slot_ptr(r, self.rank), write.len())
        };
        self.seq(self.rank).store(r, Ordering::Release);
        self.wait_all(r)?;
        Ok(r)
    }

    /// Rank `k`'s slot of round `r`, which every rank has published.
    fn slot(&self, r: u64, k: usize) -> &[u8] {
        // SAFETY: rank k wrote its slot before publishing r (acquired in `wait_all`) and will
        // not write it again before this rank publishes r + 1.
        unsafe { std::slice::from_raw_parts(self.slot_ptr(r, k), self.slot_bytes) }
    }

    fn wait_all(&self, r: u64) -> Result<(), CollectiveError> {
        let start = Instant::now();
        let mut checked = start;
        let mut spins = 0u32;
        loop {
            if (0..self.world).all(|k| self.seq(k).load(Ordering::Acquire) >= r) {
                return Ok(());
            }
            if self.aborted().load(Ordering::Acquire) != 0 {
                return Err(CollectiveError::Aborted);
            }
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let now = Instant::now();
            let waited = now - start;
            if waited < YIELD_FOR {
                std::thread::yield_now();
            } else {
                // Ranks other than 0 wait here between requests: sleep, checking more
                // rarely the longer it has been.
                std::thread::sleep(if waited < Duration::from_millis(100) {
                    Duration::from_micros(50)
                } else {
                    Duration::from_millis(1)
                });
            }
            if now - checked >= LIVENESS_EVERY {
                checked = now;
                self.check_peers(r)?;
            }
        }
    }

    /// Fails if a rank that has not reached round `r` no longer exists.
    fn check_peers(&self, r: u64) -> Result<(), CollectiveError> {
        for k in (0..self.world).filter(|&k| k != self.rank) {
            let pid = self.pid(k).load(Ordering::Acquire);
            if pid != 0 && self.seq(k).load(Ordering::Acquire) < r && !process_alive(pid) {
                self.abort();
                return Err(CollectiveError::PeerLost { rank: k, pid });
            }
        }
        Ok(())
    }

    fn floats_per_slot(&self) -> usize {
        self.slot_bytes / 4
    }

    /// Runs `op` under the round lock; a failure aborts the group (its rounds are out of step
    /// from then on).
    fn op(
        &self,
        op: impl FnOnce(&mut u64) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        let mut round = self.round.lock().unwrap_or_else(|p| p.into_inner());
        let result = op(&mut round);
        if result.is_err() {
            self.abort();
        }
        result
    }
}

fn as_bytes(x: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding or invalid bit patterns as bytes.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
}

fn as_floats(b: &[u8]) -> &[f32] {
    debug_assert!(b.len().is_multiple_of(4) && (b.as_ptr() as usize).is_multiple_of(4));
    // SAFETY: slots are 64-byte aligned and hold whole f32s written by `as_bytes`.
    unsafe { std::slice::from_raw_parts(b.as_ptr() as *const f32, b.len() / 4) }
}

/// Whether process `pid` exists and is not a zombie (a rank that exited but was not yet
/// reaped by the process that started it).
fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        if Path::new("/proc/self/stat").exists() {
            return false;
        }
        // No procfs: signal 0 checks existence (a zombie counts as alive there).
        // SAFETY: signal 0 delivers nothing.
        return unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X' | 'x') | None)
}

impl Collective for ShmGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        let per = self.floats_per_slot();
        self.op(|round| {
            for chunk in x.chunks_mut(per) {
                let n = chunk.len();
                let r = self.round(round, as_bytes(chunk))?;
                chunk.copy_from_slice(&as_floats(self.slot(r, 0))[..n]);
                for k in 1..self.world {
                    for (a, b) in chunk.iter_mut().zip(&as_floats(self.slot(r, k))[..n]) {
                        *a += b;
                    }
                }
            }
            Ok(())
        })
    }

    fn all_reduce_parts(
        &self,
        mine: &[f32],
        held: &[usize],
        out: &mut [f32],
    ) -> Result<(), CollectiveError> {
        let len = out.len();
        if let Err(e) = crate::check_parts(self.rank, self.world, mine, held, len) {
            self.abort();
            return Err(e);
        }
        if self.world == 1 {
            crate::fold_parts(mine.chunks_exact(len.max(1)), out);
            return Ok(());
        }
        // Each round carries the same columns of every part a rank holds.
        let most = held.iter().copied().max().unwrap_or(0).max(1);
        let per = self.floats_per_slot() / most;
        if per == 0 {
            self.abort();
            return Err(CollectiveError::Protocol(format!(
                "{most} parts do not fit a slot of {} bytes",
                self.slot_bytes
            )));
        }
        self.op(|round| {
            let mut piece = Vec::with_capacity(held[self.rank] * per);
            for start in (0..len).step_by(per) {
                let span = start..(start + per).min(len);
                piece.clear();
                for p in 0..held[self.rank] {
                    piece.extend_from_slice(&mine[p * len + span.start..p * len + span.end]);
                }
                let r = self.round(round, as_bytes(&piece))?;
                let n = span.len();
                let parts = (0..self.world).flat_map(|k| {
                    let slot = as_floats(self.slot(r, k));
                    (0..held[k]).map(move |p| &slot[p * n..(p + 1) * n])
                });
                crate::fold_parts(parts, &mut out[span]);
            }
            Ok(())
        })
    }

    fn gather(
        &self,
        part: &[f32],
        lens: &[usize],
        out: &mut Vec<f32>,
    ) -> Result<(), CollectiveError> {
        if let Err(e) = crate::check_gather(self.rank, self.world, part, lens) {
            self.abort();
            return Err(e);
        }
        out.clear();
        if self.rank == 0 {
            out.resize(lens.iter().sum(), 0.0);
        }
        if self.world == 1 {
            out.copy_from_slice(part);
            return Ok(());
        }
        let per = self.floats_per_slot();
        let rounds = lens.iter().max().copied().unwrap_or(0).div_ceil(per);
        let offsets: Vec<usize> = lens
            .iter()
            .scan(0, |acc, &l| {
                let at = *acc;
                *acc += l;
                Some(at)
            })
            .collect();
        self.op(|round| {
            for c in 0..rounds {
                let piece = |len: usize| (c * per).min(len)..((c + 1) * per).min(len);
                let r = self.round(round, as_bytes(&part[piece(part.len())]))?;
                if self.rank != 0 {
                    continue;
                }
                for (k, &len) in lens.iter().enumerate() {
                    let span = piece(len);
                    let at = offsets[k] + span.start;
                    out[at..at + span.len()]
                        .copy_from_slice(&as_floats(self.slot(r, k))[..span.len()]);
                }
            }
            Ok(())
        })
    }

    fn broadcast(&self, msg: &mut Vec<u8>) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        let per = self.slot_bytes;
        self.op(|round| {
            // The first round carries the length, then the message follows in slot-sized pieces.
            let header = if self.rank == 0 { msg.len() as u64 } else { 0 };
            let r = self.round(round, &header.to_le_bytes())?;
            let len = u64::from_le_bytes(self.slot(r, 0)[..8].try_into().expect("8 bytes"));
            let len = usize::try_from(len)
                .map_err(|_| CollectiveError::Protocol("broadcast length".into()))?;
            if self.rank != 0 {
                msg.clear();
                msg.reserve(len);
            }
            for c in 0..len.div_ceil(per) {
                let span = c * per..((c + 1) * per).min(len);
                let mine = if self.rank == 0 {
                    &msg[span.clone()]
                } else {
                    &[][..]
                };
                let r = self.round(round, mine)?;
                if self.rank != 0 {
                    msg.extend_from_slice(&self.slot(r, 0)[..span.len()]);
                }
            }
            Ok(())
        })
    }

    fn check(&self) -> Result<(), CollectiveError> {
        if self.aborted().load(Ordering::Acquire) != 0 {
            return Err(CollectiveError::Aborted);
        }
        self.check_peers(u64::MAX)
    }

    fn abort(&self) {
        self.aborted().store(1, Ordering::Release);
    }
}

impl Drop for ShmGroup {
    fn drop(&mut self) {
        if self.owner {
            // Rank 0 leaving ends the group: ranks waiting for its next step stop.
            self.abort();
            self.unlink();
        }
    }
}
