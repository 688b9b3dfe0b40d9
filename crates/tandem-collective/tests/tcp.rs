//! The TCP group with threads as ranks over loopback sockets: the same results as the
//! shared-memory group (bit for bit), refusals at joining, and a rank that leaves reported to
//! the others rather than waited for.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use proptest::prelude::*;
use tandem_collective::{Collective, CollectiveError, ShmGroup, TcpGroup, TcpRendezvous};

const TOKEN: &str = "group-secret";

/// Rank 0's group and the other ranks' groups, all joined.
fn groups(world: usize) -> (TcpGroup, Vec<TcpGroup>) {
    let rv = TcpRendezvous::bind("127.0.0.1:0", world, TOKEN).unwrap();
    let addr = rv.local_addr().unwrap();
    let joining: Vec<_> = (1..world)
        .map(|r| {
            std::thread::spawn(move || {
                TcpGroup::connect(addr, r, world, TOKEN, format!("rank {r}").as_bytes()).unwrap()
            })
        })
        .collect();
    let root = rv.accept(&|| false).unwrap();
    let others = joining.into_iter().map(|h| h.join().unwrap()).collect();
    (root, others)
}

/// Runs `f(rank, group)` on every rank of a fresh group, ranks 1.. on threads.
fn on_ranks<T: Send + 'static>(
    world: usize,
    f: impl Fn(usize, &dyn Collective) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let (root, others) = groups(world);
    let f = Arc::new(f);
    let handles: Vec<_> = others
        .into_iter()
        .map(|g| {
            let f = f.clone();
            std::thread::spawn(move || f(g.rank(), &g))
        })
        .collect();
    let mut out = vec![f(0, &root)];
    out.extend(handles.into_iter().map(|h| h.join().unwrap()));
    out
}

/// The same on a shared-memory group (the reference for the bits).
fn on_shm_ranks<T: Send + 'static>(
    world: usize,
    f: impl Fn(usize, &dyn Collective) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let root = ShmGroup::create(world, 256).unwrap();
    let path = root.path().to_path_buf();
    let f = Arc::new(f);
    let handles: Vec<_> = (1..world)
        .map(|r| {
            let (f, path) = (f.clone(), path.clone());
            std::thread::spawn(move || f(r, &ShmGroup::join(&path, r).unwrap()))
        })
        .collect();
    let mut out = vec![f(0, &root)];
    out.extend(handles.into_iter().map(|h| h.join().unwrap()));
    out
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn all_reduce_gives_the_shared_memory_groups_bits(world in 1usize..5, n in 0usize..3000, salt: u32) {
        let run = move |r: usize, g: &dyn Collective| {
            let mut x = values(r, n, salt);
            g.all_reduce_sum(&mut x).unwrap();
            let mut y = values(r, n / 3, salt ^ 1);
            g.all_reduce_sum(&mut y).unwrap();
            (bits(&x), bits(&y))
        };
        let tcp = on_ranks(world, run);
        let shm = on_shm_ranks(world, run);
        for t in &tcp {
            prop_assert_eq!(t, &shm[0]);
        }
    }

    #[test]
    fn all_reduce_parts_gives_one_processs_sum(held in proptest::collection::vec(0usize..4, 1..5), n in 0usize..3000) {
        let h2 = held.clone();
        let got = on_ranks(held.len(), move |r, g| parts_on(r, g, &h2, n));
        let want = parts_folded(&held, n);
        for g in &got {
            prop_assert_eq!(g, &want);
        }
    }

    #[test]
    fn gather_concatenates_uneven_parts(lens in proptest::collection::vec(0usize..2000, 1..5)) {
        let world = lens.len();
        let l2 = lens.clone();
        let got = on_ranks(world, move |r, g| gather_on(r, g, &l2));
        prop_assert!(gathered_right(&got, &lens));
    }

    #[test]
    fn broadcast_delivers_rank_zeros_message(world in 1usize..4, msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..70_000), 1..4)) {
        let m2 = msgs.clone();
        let got = on_ranks(world, move |r, g| broadcast_on(r, g, &m2));
        for g in got {
            prop_assert_eq!(&g, &msgs);
        }
    }
}

#[test]
fn rank_zero_reads_what_each_rank_said_when_joining() {
    let (root, others) = groups(3);
    assert_eq!(root.hello(1), b"rank 1");
    assert_eq!(root.hello(2), b"rank 2");
    assert!(root.peer_addr(2).unwrap().ip().is_loopback());
    assert_eq!(others[1].hello(0), b"");
}

#[test]
fn joining_with_a_wrong_token_size_or_rank_is_refused_and_waiting_goes_on() {
    let rv = TcpRendezvous::bind("127.0.0.1:0", 2, TOKEN).unwrap();
    let addr = rv.local_addr().unwrap();
    let root = std::thread::spawn(move || rv.accept(&|| false));
    let refused = |r, w, t: &str| match TcpGroup::connect(addr, r, w, t, b"") {
        Err(CollectiveError::Setup(m)) => m,
        Ok(_) => panic!("joined rank {r} of {w} with token {t:?}"),
        Err(e) => panic!("{e}"),
    };
    assert!(refused(1, 2, "guess").contains("wrong token"));
    assert!(refused(1, 3, TOKEN).contains("expects 3 ranks"));
    // A rank at or above the group size is refused before connecting.
    assert!(TcpGroup::connect(addr, 2, 2, TOKEN, b"").is_err());
    let one = TcpGroup::connect(addr, 1, 2, TOKEN, b"").unwrap();
    let root = root.join().unwrap().unwrap();
    let mut x = vec![1.5f32];
    let t = std::thread::spawn(move || {
        let mut y = vec![2.0f32];
        one.all_reduce_sum(&mut y).unwrap();
        y
    });
    root.all_reduce_sum(&mut x).unwrap();
    assert_eq!((x, t.join().unwrap()), (vec![3.5], vec![3.5]));
}

#[test]
fn a_waiting_rank_zero_can_give_up() {
    let rv = TcpRendezvous::bind("127.0.0.1:0", 2, TOKEN).unwrap();
    let t = Instant::now();
    let give_up = move || t.elapsed() > Duration::from_millis(200);
    assert!(matches!(rv.accept(&give_up), Err(CollectiveError::Aborted)));
}

#[test]
fn a_rank_that_leaves_is_reported_not_waited_for() {
    let (root, mut others) = groups(3);
    // Rank 2 goes (its process would close its socket the same way).
    drop(others.pop());
    let one = others.pop().unwrap();
    let waiting = std::thread::spawn(move || {
        let mut x = vec![1.0f32; 64];
        one.all_reduce_sum(&mut x)
    });
    let start = Instant::now();
    let err = root.all_reduce_sum(&mut [1.0f32; 64]).unwrap_err();
    assert!(
        matches!(err, CollectiveError::PeerLost { rank: 2, .. }),
        "{err}"
    );
    // Rank 1, waiting for the sum, is released too.
    assert!(waiting.join().unwrap().is_err());
    assert!(start.elapsed() < Duration::from_secs(5));
    // The group stays failed.
    assert!(matches!(
        root.broadcast(&mut vec![1]),
        Err(CollectiveError::Aborted)
    ));
}

#[test]
fn an_idle_rank_zero_notices_a_closed_peer_and_dropping_rank_zero_ends_the_group() {
    let (root, mut others) = groups(2);
    assert!(root.check().is_ok());
    drop(others.pop());
    let t = Instant::now();
    while root.check().is_ok() {
        assert!(t.elapsed() < Duration::from_secs(5), "never noticed");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(matches!(root.check(), Err(CollectiveError::Aborted)));

    let (root, mut others) = groups(2);
    let one = others.pop().unwrap();
    let waiter = std::thread::spawn(move || one.broadcast(&mut Vec::new()));
    std::thread::sleep(Duration::from_millis(50));
    drop(root);
    assert!(matches!(
        waiter.join().unwrap(),
        Err(CollectiveError::PeerLost { rank: 0, .. })
    ));
}
