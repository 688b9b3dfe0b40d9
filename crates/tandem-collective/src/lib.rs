//! Collectives for tensor-parallel ranks: the few operations a sharded forward needs (a sum
//! over ranks, a gather to rank 0, a broadcast from rank 0), with a fixed reduction order so
//! every rank gets bit-identical results whatever the timing: over shared memory between the
//! processes of one host ([`ShmGroup`]), over TCP between hosts ([`TcpGroup`]). Knows nothing
//! of models.

mod shm;
mod tcp;

pub use shm::ShmGroup;
pub use tcp::{TcpGroup, TcpRendezvous};

/// Why a collective could not complete.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A rank of the group exited.
    #[error("tensor-parallel rank {rank} (pid {pid}) is gone")]
    PeerLost {
        /// The rank that exited.
        rank: usize,
        /// Its process id.
        pid: u32,
    },
    /// The group was shut down (a rank saw a failure and stopped everyone).
    #[error("the tensor-parallel group was aborted")]
    Aborted,
    /// Creating or joining the group failed.
    #[error("tensor-parallel group: {0}")]
    Setup(String),
    /// Ranks disagreed on a message's shape (a bug, or a corrupted segment).
    #[error("tensor-parallel group: {0}")]
    Protocol(String),
}

/// The operations ranks of one tensor-parallel group run together. Every rank must call the
/// same operations in the same order (the forward pass guarantees it).
pub trait Collective: Send + Sync {
    /// This process's rank (0 drives).
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world(&self) -> usize;
    /// Replaces `x` on every rank with the elementwise sum of all ranks' `x`, added in rank
    /// order (rank 0 + rank 1 + ...), so all ranks hold the same bits.
    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<(), CollectiveError>;
    /// Every rank gets in `out` the sum of the parts of a sum that ranks hold in turn (rank
    /// `r` the next `held[r]` parts, `mine` holding this rank's one after another, each
    /// `out.len()` long), added in part order by [`fold_parts`]: the sum a process holding
    /// every part makes, so the result does not depend on how the parts are spread.
    fn all_reduce_parts(
        &self,
        mine: &[f32],
        held: &[usize],
        out: &mut [f32],
    ) -> Result<(), CollectiveError>;
    /// Rank 0 receives every rank's `part` (rank `r`'s has `lens[r]` values) concatenated in
    /// rank order in `out`; other ranks' `out` is left empty.
    fn gather(
        &self,
        part: &[f32],
        lens: &[usize],
        out: &mut Vec<f32>,
    ) -> Result<(), CollectiveError>;
    /// Rank 0's `msg` is copied to every rank's `msg`. Ranks other than 0 may wait here for a
    /// long time (between requests), sleeping rather than spinning.
    fn broadcast(&self, msg: &mut Vec<u8>) -> Result<(), CollectiveError>;
    /// Returns once every rank has called it (ranks wait here for each other to load).
    fn barrier(&self) -> Result<(), CollectiveError> {
        self.all_reduce_sum(&mut [0.0])
    }
    /// Fails if the group was aborted or a rank no longer exists (for a rank 0 with nothing
    /// to run, which would otherwise notice only at its next collective).
    fn check(&self) -> Result<(), CollectiveError> {
        Ok(())
    }
    /// Stops the group: every rank waiting in, or later entering, a collective gets
    /// [`CollectiveError::Aborted`].
    fn abort(&self);
}

/// Checks a gather's arguments on `rank` of `world`: one length per rank, and this rank's part
/// of its length (a mismatch is a bug in the caller, which then aborts the group).
fn check_gather(
    rank: usize,
    world: usize,
    part: &[f32],
    lens: &[usize],
) -> Result<(), CollectiveError> {
    if lens.len() == world && lens.get(rank) == Some(&part.len()) {
        return Ok(());
    }
    Err(CollectiveError::Protocol(format!(
        "gather of {} values where rank {rank} of {lens:?} should give {:?}",
        part.len(),
        lens.get(rank)
    )))
}

/// `out` = the sum of `parts` (each `out.len()` long) added one after another in their order,
/// the first copied (zeros for none): the one order in which a whole model and every group
/// of ranks add a sum cut into parts, so that they get the same bits.
pub fn fold_parts<'a>(parts: impl IntoIterator<Item = &'a [f32]>, out: &mut [f32]) {
    let mut parts = parts.into_iter();
    match parts.next() {
        Some(first) => out.copy_from_slice(first),
        None => out.fill(0.0),
    }
    for p in parts {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
}

/// Checks an all-reduce of parts on `rank` of `world`: a count per rank, and this rank's
/// values for its count (a mismatch is a bug in the caller, which then aborts the group).
fn check_parts(
    rank: usize,
    world: usize,
    mine: &[f32],
    held: &[usize],
    len: usize,
) -> Result<(), CollectiveError> {
    if held.len() == world && held.get(rank).map(|h| h * len) == Some(mine.len()) {
        return Ok(());
    }
    Err(CollectiveError::Protocol(format!(
        "all-reduce of {} values in parts of {len} where rank {rank} of {held:?} should hold {:?}",
        mine.len(),
        held.get(rank)
    )))
}
