//! The shared-memory group with threads as ranks (one process), and with a real child process
//! standing for a rank that dies.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use proptest::prelude::*;
use tandem_collective::{Collective, CollectiveError, ShmGroup};

/// Runs `f(rank, group)` on `world` threads, each joined to one group; returns their results.
fn on_ranks<T: Send + 'static>(
    world: usize,
    slot_bytes: usize,
    f: impl Fn(usize, &ShmGroup) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let root = ShmGroup::create(world, slot_bytes).unwrap();
    let path = root.path().to_path_buf();
    let f = Arc::new(f);
    let others: Vec<_> = (1..world)
        .map(|r| {
            let (f, path) = (f.clone(), path.clone());
            std::thread::spawn(move || {
                let g = ShmGroup::join(&path, r).unwrap();
                // A rank that panics must not leave the others waiting.
                let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(r, &g)));
                out.unwrap_or_else(|p| {
                    g.abort();
                    std::panic::resume_unwind(p)
                })
            })
        })
        .collect();
    let mut out = vec![f(0, &root)];
    out.extend(others.into_iter().map(|h| h.join().unwrap()));
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn all_reduce_sums_in_rank_order(world in 1usize..5, n in 0usize..700, slot in 64usize..1024, salt: u32) {
        let got = on_ranks(world, slot, move |r, g| {
            let mut x = values(r, n, salt);
            g.all_reduce_sum(&mut x).unwrap();
            // A second call reuses the other slot set and then the first again.
            let mut y = values(r, n / 2, salt ^ 1);
            g.all_reduce_sum(&mut y).unwrap();
            (x, y)
        });
        let mut want = values(0, n, salt);
        for k in 1..world {
            for (a, b) in want.iter_mut().zip(values(k, n, salt)) {
                *a += b;
            }
        }
        for (x, _) in &got {
            prop_assert_eq!(x.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        }
        prop_assert!(got.iter().all(|g| g.1 == got[0].1));
    }

    /// However the parts are spread over ranks (none on some), every rank gets the bits of
    /// one process adding them all in order, also when they take several slot rounds.
    #[test]
    fn all_reduce_parts_gives_one_processs_sum(held in proptest::collection::vec(0usize..4, 1..5), n in 0usize..400, slot in 64usize..1024) {
        let most = held.iter().copied().max().unwrap_or(0).max(1);
        let slot = slot.max(4 * most);
        let h2 = held.clone();
        let got = on_ranks(held.len(), slot, move |r, g| parts_on(r, g, &h2, n));
        let want = parts_folded(&held, n);
        for g in &got {
            prop_assert_eq!(g, &want);
        }
    }

    #[test]
    fn gather_concatenates_uneven_parts(lens in proptest::collection::vec(0usize..300, 1..5), slot in 64usize..512) {
        let world = lens.len();
        let l2 = lens.clone();
        let got = on_ranks(world, slot, move |r, g| gather_on(r, g, &l2));
        prop_assert!(gathered_right(&got, &lens));
    }

    #[test]
    fn broadcast_delivers_rank_zeros_message(world in 1usize..4, msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 1..4)) {
        let m2 = msgs.clone();
        let got = on_ranks(world, 64, move |r, g| broadcast_on(r, g, &m2));
        for g in got {
            prop_assert_eq!(&g, &msgs);
        }
    }
}

#[test]
fn a_rank_that_exits_is_reported_not_waited_for() {
    let g = ShmGroup::create(2, 4096).unwrap();
    // A real process stands for rank 1; it exits without ever joining.
    let mut child = std::process::Command::new("sleep")
        .arg("0.2")
        .spawn()
        .unwrap();
    g.set_pid(1, child.id());
    let start = Instant::now();
    let mut x = vec![1.0f32; 10];
    let err = g.all_reduce_sum(&mut x).unwrap_err();
    // Noticed while the child is an unreaped zombie.
    assert!(
        matches!(err, CollectiveError::PeerLost { rank: 1, .. }),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    child.wait().unwrap();
    // The group stays failed.
    assert!(matches!(
        g.broadcast(&mut vec![1]),
        Err(CollectiveError::Aborted)
    ));
}

#[test]
fn abort_releases_waiting_ranks_and_dropping_rank_zero_ends_the_group() {
    let root = ShmGroup::create(3, 256).unwrap();
    let path = root.path().to_path_buf();
    let waiter = std::thread::spawn(move || {
        let g = ShmGroup::join(&path, 1).unwrap();
        let mut msg = Vec::new();
        g.broadcast(&mut msg)
    });
    std::thread::sleep(Duration::from_millis(50));
    drop(root);
    assert!(matches!(
        waiter.join().unwrap(),
        Err(CollectiveError::Aborted)
    ));
}

#[test]
fn joining_checks_the_segment() {
    let g = ShmGroup::create(2, 256).unwrap();
    assert!(ShmGroup::join(g.path(), 2).is_err());
    let not_a_group =
        std::env::temp_dir().join(format!("tandem-not-a-group-{}", std::process::id()));
    std::fs::write(&not_a_group, vec![0u8; 8192]).unwrap();
    assert!(ShmGroup::join(&not_a_group, 1).is_err());
    std::fs::remove_file(&not_a_group).unwrap();
    g.unlink();
    assert!(ShmGroup::join(g.path(), 1).is_err());
    assert!(matches!(
        ShmGroup::create(0, 64),
        Err(CollectiveError::Setup(_))
    ));
}
