//! What every group's tests run on each rank, and the values they expect: the same checks
//! for the shared-memory and the TCP group.

#![allow(dead_code)]

use tandem_collective::Collective;

/// Rank `rank`'s `n` test values (different per rank and salt).
pub fn values(rank: usize, n: usize, salt: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761) ^ salt ^ (rank as u32 * 7919)) as f32 / 3e9 - 0.7
        })
        .collect()
}

/// Rank `r`'s gather of its values of `lens[r]` (rank 0's result; empty on the others).
pub fn gather_on(r: usize, g: &dyn Collective, lens: &[usize]) -> Vec<f32> {
    let mut out = vec![1.0];
    g.gather(&values(r, lens[r], 5), lens, &mut out).unwrap();
    out
}

/// Whether the gather results of every rank are right: rank 0 holds all parts in rank order.
pub fn gathered_right(got: &[Vec<f32>], lens: &[usize]) -> bool {
    let want: Vec<f32> = (0..lens.len())
        .flat_map(|k| values(k, lens[k], 5))
        .collect();
    got[0] == want && got[1..].iter().all(|o| o.is_empty())
}

/// Rank `r`'s copies of rank 0's `msgs`, broadcast one after the other.
pub fn broadcast_on(r: usize, g: &dyn Collective, msgs: &[Vec<u8>]) -> Vec<Vec<u8>> {
    msgs.iter()
        .map(|m| {
            let mut msg = if r == 0 { m.clone() } else { vec![9; 3] };
            g.broadcast(&mut msg).unwrap();
            msg
        })
        .collect()
}

/// Rank `r`'s all-reduce of the parts it holds (`held[r]` parts of `n` values, parts numbered
/// across ranks in order): the bits every rank gets.
pub fn parts_on(r: usize, g: &dyn Collective, held: &[usize], n: usize) -> Vec<u32> {
    let first: usize = held[..r].iter().sum();
    let mine: Vec<f32> = (first..first + held[r])
        .flat_map(|p| values(p, n, 11))
        .collect();
    let mut out = vec![7.0; n];
    g.all_reduce_parts(&mine, held, &mut out).unwrap();
    out.iter().map(|v| v.to_bits()).collect()
}

/// The bits of the parts' sum as one process holding all of them adds it.
pub fn parts_folded(held: &[usize], n: usize) -> Vec<u32> {
    let all: Vec<Vec<f32>> = (0..held.iter().sum()).map(|p| values(p, n, 11)).collect();
    let mut out = vec![0.0; n];
    tandem_collective::fold_parts(all.iter().map(|p| &p[..]), &mut out);
    out.iter().map(|v| v.to_bits()).collect()
}
