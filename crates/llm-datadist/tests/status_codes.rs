//! Every status-code path the reference names, across two processes on 127.0.0.1: not linked,
//! missing and consumed keys, own cluster id, already linked, bad token, timeouts (peer
//! stopped), peer death, relink after a forced failure, busy link, switch_role rules, and a
//! hostile peer sending garbage frames.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use llm_datadist::*;

#[test]
fn peer_main() {
    if std::env::var("LLM_DD_PEER").is_ok() {
        run_peer();
    }
}

fn init(remote: bool, timeout_ms: i32, token: &str) -> LlmDataDist {
    let mut dd = LlmDataDist::new(LlmRole::Decoder, 1);
    dd.init(&options("tcp", remote, false, token, timeout_ms))
        .unwrap();
    dd
}

fn code<T: std::fmt::Debug>(r: Result<T>) -> LlmStatusCode {
    r.unwrap_err().status_code
}

#[test]
fn key_and_link_codes() {
    let _serial = serial();
    let peer = Peer::spawn("tcp", false, "", false);
    let mut dd = init(false, 2000, "");
    let cm = dd.cache_manager().unwrap();
    let contig = cm.allocate_cache(&slots_desc(), &[]).unwrap();
    let all = LayerRanges::all();

    // Not linked yet.
    assert_eq!(
        code(cm.pull_cache(CacheKey::new(PEER_ID, 100), &contig, 0, -1, &all)),
        LlmStatusCode::LlmNotYetLink
    );
    // Own cluster id.
    assert_eq!(
        code(cm.pull_cache(CacheKey::new(1, 100), &contig, 0, -1, &all)),
        LlmStatusCode::LlmParamInvalid
    );
    // Link to the wrong cluster id, to a closed port, and twice.
    let mut wrong = peer.info();
    wrong.remote_cluster_id = 999;
    assert_eq!(
        dd.link_clusters(&[wrong], 2000).unwrap().0,
        LlmStatusCode::LlmLinkFailed
    );
    let mut closed = LlmClusterInfo::new(PEER_ID);
    closed.append_remote_ip_info("127.0.0.1", 1).unwrap();
    assert_eq!(
        dd.link_clusters(&[closed], 2000).unwrap().0,
        LlmStatusCode::LlmLinkFailed
    );
    assert_eq!(
        dd.link_clusters(&[], 2000).unwrap().0,
        LlmStatusCode::LlmParamInvalid
    );
    assert_eq!(
        code(dd.link_clusters(&[peer.info()], 0)),
        LlmStatusCode::LlmParamInvalid
    );
    assert_eq!(
        dd.link_clusters(&[peer.info()], 2000).unwrap().0,
        LlmStatusCode::LlmSuccess
    );
    let (ret, rets) = dd.link_clusters(&[peer.info()], 2000).unwrap();
    assert_eq!(
        (ret, rets),
        (
            LlmStatusCode::LlmAlreadyLink,
            vec![LlmStatusCode::LlmAlreadyLink]
        )
    );

    // Request keys of an allocated cache are consumed by the pull.
    cm.pull_cache(CacheKey::new(PEER_ID, 100), &contig, 0, -1, &all)
        .unwrap();
    assert_eq!(
        code(cm.pull_cache(CacheKey::new(PEER_ID, 100), &contig, 0, -1, &all)),
        LlmStatusCode::LlmKvCacheNotExist
    );
    // Unknown keys, cache ids, batch slots and model ids.
    assert_eq!(
        code(cm.pull_cache(CacheKey::new(PEER_ID, 555), &contig, 0, -1, &all)),
        LlmStatusCode::LlmKvCacheNotExist
    );
    assert_eq!(
        code(cm.pull_cache(
            CacheKeyByIdAndIndex::new(PEER_ID, 77, 0),
            &contig,
            0,
            -1,
            &all
        )),
        LlmStatusCode::LlmKvCacheNotExist
    );
    assert_eq!(
        code(cm.pull_cache(
            CacheKeyByIdAndIndex::new(PEER_ID, peer.contig_id, 9),
            &contig,
            0,
            -1,
            &all
        )),
        LlmStatusCode::LlmKvCacheNotExist
    );
    let mut mem = Tensors::new(TENSORS, (BLOCKS * BLOCK_BYTES) as usize);
    // SAFETY: `mem` outlives the instance (finalized below).
    let blocks = unsafe {
        cm.register_blocks_cache(&blocks_desc(), &mem.addrs(), None, None)
            .unwrap()
    };
    assert_eq!(
        code(cm.pull_blocks(BlocksCacheKey::new(PEER_ID, 5), &blocks, &[0], &[0], &all)),
        LlmStatusCode::LlmKvCacheNotExist
    );
    // Out-of-range remote block ids and mismatched lists are refused; the link stays usable.
    assert_eq!(
        code(cm.pull_blocks(
            BlocksCacheKey::new(PEER_ID, 0),
            &blocks,
            &[BLOCKS as u64],
            &[0],
            &all
        )),
        LlmStatusCode::LlmParamInvalid
    );
    assert_eq!(
        code(cm.pull_blocks(
            BlocksCacheKey::new(PEER_ID, 0),
            &blocks,
            &[0, 1],
            &[0],
            &all
        )),
        LlmStatusCode::LlmParamInvalid
    );
    assert_eq!(
        code(cm.pull_blocks(
            BlocksCacheKey::new(PEER_ID, 0),
            &blocks,
            &[0],
            &[BLOCKS as u64],
            &all
        )),
        LlmStatusCode::LlmParamInvalid
    );
    // Push needs remote cache access.
    assert_eq!(
        code(cm.push_blocks(BlocksCacheKey::new(PEER_ID, 0), &blocks, &[0], &[0], &all)),
        LlmStatusCode::LlmFeatureNotEnabled
    );
    cm.pull_blocks(BlocksCacheKey::new(PEER_ID, 0), &blocks, &[2], &[2], &all)
        .unwrap();
    assert_eq!(
        mem.0[1][2 * BLOCK_BYTES as usize],
        pattern(1, 1, 2 * BLOCK_BYTES as usize)
    );

    // switch_role: links remain, then same role, then to Prompt without a listen address.
    assert_eq!(
        code(dd.switch_role(LlmRole::Prompt, None)),
        LlmStatusCode::LlmExistLink
    );
    assert_eq!(
        dd.unlink_clusters(&[peer.info()], 2000, false).unwrap().0,
        LlmStatusCode::LlmSuccess
    );
    assert_eq!(
        code(dd.switch_role(LlmRole::Decoder, None)),
        LlmStatusCode::LlmParamInvalid
    );
    assert_eq!(
        code(dd.switch_role(LlmRole::Prompt, None)),
        LlmStatusCode::LlmParamInvalid
    );
    let listen: Options = [("llm.listenIpInfo", "127.0.0.1:0")].into_iter().collect();
    dd.switch_role(LlmRole::Prompt, Some(&listen)).unwrap();
    assert_eq!(dd.role(), LlmRole::Prompt);
    assert!(dd.listen_addr().is_some());
    dd.switch_role(LlmRole::Decoder, None).unwrap();
    assert!(dd.listen_addr().is_none());
    dd.finalize();

    // Without enable_switch_role.
    let mut cfg = LlmConfig::new();
    cfg.set_device_id(0).unwrap();
    cfg.set_enable_cache_manager(true);
    let mut plain = LlmDataDist::new(LlmRole::Decoder, 1);
    plain.init(&cfg.generate_options()).unwrap();
    assert_eq!(
        code(plain.switch_role(LlmRole::Prompt, Some(&listen))),
        LlmStatusCode::LlmFeatureNotEnabled
    );
    // One initialized instance per process.
    let mut second = LlmDataDist::new(LlmRole::Prompt, 2);
    assert_eq!(
        code(second.init(&cfg.generate_options())),
        LlmStatusCode::LlmFailed
    );
    plain.finalize();
    drop(mem);
}

#[test]
fn timeouts_peer_death_and_relink() {
    let _serial = serial();
    let mut peer = Peer::spawn("tcp", true, "", false);
    let mut dd = init(true, 300, "");
    let cm = dd.cache_manager().unwrap();
    let mut mem = Tensors::new(TENSORS, (BLOCKS * BLOCK_BYTES) as usize);
    // SAFETY: `mem` outlives the instance.
    let blocks = unsafe {
        cm.register_blocks_cache(&blocks_desc(), &mem.addrs(), None, None)
            .unwrap()
    };
    let all = LayerRanges::all();
    let pull = |b: u64| cm.pull_blocks(BlocksCacheKey::new(PEER_ID, 0), &blocks, &[b], &[b], &all);
    assert_eq!(
        dd.link_clusters(&[peer.info()], 2000).unwrap().0,
        LlmStatusCode::LlmSuccess
    );
    pull(1).unwrap();

    // A stopped peer: the transfer times out after sync_kv_timeout and the link is unusable.
    peer.signal("-STOP");
    let t0 = Instant::now();
    assert_eq!(code(pull(2)), LlmStatusCode::LlmTimeout);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert_eq!(code(pull(2)), LlmStatusCode::LlmLinkFailed);
    peer.signal("-CONT");
    // Relinking needs an unlink first; force drops the local end, then a new link works.
    assert_eq!(
        dd.link_clusters(&[peer.info()], 2000).unwrap().0,
        LlmStatusCode::LlmAlreadyLink
    );
    assert_eq!(
        dd.unlink_clusters(&[peer.info()], 2000, true).unwrap().0,
        LlmStatusCode::LlmSuccess
    );
    assert_eq!(
        dd.link_clusters(&[peer.info()], 2000).unwrap().0,
        LlmStatusCode::LlmSuccess
    );
    pull(3).unwrap();
    assert_eq!(
        mem.0[0][3 * BLOCK_BYTES as usize],
        pattern(1, 0, 3 * BLOCK_BYTES as usize)
    );

    // A dead peer: transfers fail with LINK_FAILED; a normal unlink cannot notify it.
    peer.kill();
    assert_eq!(code(pull(4)), LlmStatusCode::LlmLinkFailed);
    assert_eq!(
        dd.unlink_clusters(&[peer.info()], 500, false).unwrap().0,
        LlmStatusCode::LlmUnlinkFailed
    );
    assert!(dd.linked_clusters().is_empty());
    dd.finalize();
    drop(mem);
}

#[test]
fn unlink_during_a_transfer_is_busy() {
    let _serial = serial();
    let peer = Peer::spawn("tcp", true, "", true);
    let mut dd = init(true, 20_000, "");
    let cm = dd.cache_manager().unwrap();
    let desc = CacheDesc::new(
        BIG_TENSORS,
        vec![BIG_BLOCKS, BIG_BLOCK_BYTES],
        DataType::DtUint8,
    )
    .unwrap();
    let mut mem = Tensors::new(BIG_TENSORS, (BIG_BLOCKS * BIG_BLOCK_BYTES) as usize);
    // SAFETY: `mem` outlives the instance.
    let big = unsafe {
        cm.register_blocks_cache(&desc, &mem.addrs(), None, None)
            .unwrap()
    };
    assert_eq!(
        dd.link_clusters(&[peer.info()], 2000).unwrap().0,
        LlmStatusCode::LlmSuccess
    );
    let ids: Vec<u64> = (0..BIG_BLOCKS as u64).collect();
    let unlink_code = std::thread::scope(|s| {
        let pulling = s.spawn(|| {
            // Several pulls back to back keep the link busy for a while.
            for _ in 0..8 {
                cm.pull_blocks(
                    BlocksCacheKey::new(PEER_ID, 1),
                    &big,
                    &ids,
                    &ids,
                    &LayerRanges::all(),
                )
                .unwrap();
            }
        });
        std::thread::sleep(Duration::from_millis(30));
        let c = dd.unlink_clusters(&[peer.info()], 2000, false).unwrap().0;
        pulling.join().unwrap();
        c
    });
    assert_eq!(unlink_code, LlmStatusCode::LlmLinkBusy);
    assert_eq!(
        dd.unlink_clusters(&[peer.info()], 2000, false).unwrap().0,
        LlmStatusCode::LlmSuccess
    );
    dd.finalize();
    drop(mem);
}

#[test]
fn token_mismatch_and_hostile_frames() {
    let _serial = serial();
    let peer = Peer::spawn("tcp", true, "s3cret", false);
    let mut dd = init(true, 2000, "wrong");
    assert_eq!(
        dd.link_clusters(&[peer.info()], 2000).unwrap().0,
        LlmStatusCode::LlmLinkFailed
    );
    dd.finalize();

    // Garbage and half-valid handshakes and frames: the peer drops those connections and
    // keeps serving.
    let garbage: Vec<Vec<u8>> = vec![
        vec![0xFF; 64],
        b"\x10\x00\x00\x00TDDH\x01\x00".to_vec(),
        {
            let mut v = 5000u32.to_le_bytes().to_vec();
            v.extend(std::iter::repeat_n(7u8, 5000));
            v
        },
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
    ];
    for g in &garbage {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", peer.port)) {
            let _ = s.write_all(g);
        }
    }
    let mut dd = init(true, 2000, "s3cret");
    let cm = dd.cache_manager().unwrap();
    let mut mem = Tensors::new(TENSORS, (BLOCKS * BLOCK_BYTES) as usize);
    // SAFETY: `mem` outlives the instance.
    let blocks = unsafe {
        cm.register_blocks_cache(&blocks_desc(), &mem.addrs(), None, None)
            .unwrap()
    };
    assert_eq!(
        dd.link_clusters(&[peer.info()], 2000).unwrap().0,
        LlmStatusCode::LlmSuccess
    );
    cm.pull_blocks(
        BlocksCacheKey::new(PEER_ID, 0),
        &blocks,
        &[6],
        &[6],
        &LayerRanges::all(),
    )
    .unwrap();
    assert_eq!(
        mem.0[2][6 * BLOCK_BYTES as usize + 5],
        pattern(1, 2, 6 * BLOCK_BYTES as usize + 5)
    );
    dd.finalize();
    drop(mem);
}
