//! Two processes on 127.0.0.1: link, pull and push of caches and blocks (byte-exact), layer
//! ranges, layer-wise async transfer, unlink and relink, over TCP and shared memory.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use llm_datadist::*;

#[test]
fn peer_main() {
    if std::env::var("LLM_DD_PEER").is_ok() {
        run_peer();
    }
}

fn local_blocks(cm: &CacheManager, mem: &mut Tensors) -> Cache {
    // SAFETY: `mem` outlives the instance in each test (finalized before drop).
    unsafe {
        cm.register_blocks_cache(
            &blocks_desc(),
            &mem.addrs(),
            Some(BlocksCacheKey::new(1, 0)),
            None,
        )
        .unwrap()
    }
}

fn block_bytes(mem: &Tensors, t: usize, b: usize) -> &[u8] {
    let bb = BLOCK_BYTES as usize;
    &mem.0[t][b * bb..(b + 1) * bb]
}

fn peer_block(t: usize, b: usize) -> Vec<u8> {
    let bb = BLOCK_BYTES as usize;
    (b * bb..(b + 1) * bb).map(|i| pattern(1, t, i)).collect()
}

fn transfers_over(transport: &str) {
    let _serial = serial();
    let mut peer = Peer::spawn(transport, true, "", false);
    let mut dd = LlmDataDist::new(LlmRole::Decoder, 1);
    dd.init(&options(transport, true, false, "", 5000)).unwrap();
    let cm = dd.cache_manager().unwrap();
    let mut mem = Tensors::new(TENSORS, (BLOCKS * BLOCK_BYTES) as usize);
    let local = local_blocks(&cm, &mut mem);
    let (ret, rets) = dd.link_clusters(&[peer.info()], 5000).unwrap();
    assert_eq!(
        (ret, rets),
        (LlmStatusCode::LlmSuccess, vec![LlmStatusCode::LlmSuccess])
    );
    assert_eq!(dd.link_uses_shm(PEER_ID), Some(transport != "tcp"));
    assert_eq!(peer.ask("links"), "1");

    // Blocks -> blocks, byte-exact, remapped ids.
    cm.pull_blocks(
        BlocksCacheKey::new(PEER_ID, 0),
        &local,
        &[3, 7, 1],
        &[0, 5, 2],
        &LayerRanges::all(),
    )
    .unwrap();
    for t in 0..TENSORS as usize {
        for (s, d) in [(3, 0), (7, 5), (1, 2)] {
            assert_eq!(
                block_bytes(&mem, t, d),
                peer_block(t, s),
                "tensor {t} block {d}"
            );
        }
        assert!(
            block_bytes(&mem, t, 1).iter().all(|&b| b == 0),
            "untouched block written"
        );
    }

    // Layer ranges: remote layer 1 (tensors 2, 3) into local layer 0 (tensors 0, 1).
    cm.pull_blocks(
        BlocksCacheKey::new(PEER_ID, 0),
        &local,
        &[9],
        &[9],
        &LayerRanges::new(1..2, 0..1),
    )
    .unwrap();
    assert_eq!(block_bytes(&mem, 0, 9), peer_block(2, 9));
    assert_eq!(block_bytes(&mem, 1, 9), peer_block(3, 9));
    assert!(block_bytes(&mem, 2, 9).iter().all(|&b| b == 0));

    // Contiguous slot -> contiguous slot by id, and slot -> blocks.
    let contig = cm.allocate_cache(&slots_desc(), &[]).unwrap();
    cm.pull_cache(
        CacheKeyByIdAndIndex::new(PEER_ID, peer.contig_id, 1),
        &contig,
        0,
        -1,
        &LayerRanges::all(),
    )
    .unwrap();
    for (t, &a) in contig.tensor_addrs().iter().enumerate() {
        // SAFETY: pool memory of this cache.
        let got = unsafe { std::slice::from_raw_parts(a as *const u8, SLOT_BYTES as usize) };
        let want: Vec<u8> = (0..SLOT_BYTES as usize)
            .map(|i| pattern(2, t, SLOT_BYTES as usize + i))
            .collect();
        assert_eq!(got, want.as_slice());
    }
    cm.pull_blocks(
        CacheKeyByIdAndIndex::new(PEER_ID, peer.contig_id, 0),
        &local,
        &[],
        &[12, 20],
        &LayerRanges::all(),
    )
    .unwrap();
    for t in 0..TENSORS as usize {
        let want: Vec<u8> = (0..SLOT_BYTES as usize).map(|i| pattern(2, t, i)).collect();
        assert_eq!(block_bytes(&mem, t, 12), &want[..BLOCK_BYTES as usize]);
        assert_eq!(block_bytes(&mem, t, 20), &want[BLOCK_BYTES as usize..]);
    }

    // Push random blocks, pull them back elsewhere.
    for t in 0..TENSORS as usize {
        for (i, b) in mem.0[t][25 * BLOCK_BYTES as usize..27 * BLOCK_BYTES as usize]
            .iter_mut()
            .enumerate()
        {
            *b = (i * 31 + t * 7 + 3) as u8;
        }
    }
    cm.push_blocks(
        BlocksCacheKey::new(PEER_ID, 0),
        &local,
        &[25, 26],
        &[30, 31],
        &LayerRanges::all(),
    )
    .unwrap();
    cm.pull_blocks(
        BlocksCacheKey::new(PEER_ID, 0),
        &local,
        &[30, 31],
        &[28, 29],
        &LayerRanges::all(),
    )
    .unwrap();
    for t in 0..TENSORS as usize {
        assert_eq!(block_bytes(&mem, t, 28), block_bytes(&mem, t, 25));
        assert_eq!(block_bytes(&mem, t, 29), block_bytes(&mem, t, 26));
    }

    // Push a contiguous slot, pull it back.
    let contig2 = cm.allocate_cache(&slots_desc(), &[]).unwrap();
    for &a in contig.tensor_addrs() {
        // SAFETY: pool memory of this cache.
        let s = unsafe { std::slice::from_raw_parts_mut(a as *mut u8, SLOT_BYTES as usize) };
        s.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i % 251) as u8);
    }
    cm.push_cache(
        CacheKeyByIdAndIndex::new(PEER_ID, peer.contig_id, 0),
        &contig,
        0,
        &LayerRanges::all(),
        -1,
    )
    .unwrap();
    cm.pull_cache(
        CacheKeyByIdAndIndex::new(PEER_ID, peer.contig_id, 0),
        &contig2,
        1,
        -1,
        &LayerRanges::all(),
    )
    .unwrap();
    for (&a, &b) in contig.tensor_addrs().iter().zip(contig2.tensor_addrs()) {
        // SAFETY: pool memory of these caches.
        let (x, y) = unsafe {
            (
                std::slice::from_raw_parts(a as *const u8, SLOT_BYTES as usize),
                std::slice::from_raw_parts(
                    (b + SLOT_BYTES as u64) as *const u8,
                    SLOT_BYTES as usize,
                ),
            )
        };
        assert_eq!(x, y);
    }

    // Layer-wise async push: layers go out in order as the synchronizer releases them.
    struct Recorder(Mutex<Vec<usize>>);
    impl LayerSynchronizer for Recorder {
        fn synchronize_layer(&self, layer: usize, _timeout: Option<u64>) -> bool {
            self.0.lock().unwrap().push(layer);
            true
        }
    }
    for t in 0..TENSORS as usize {
        mem.0[t][..BLOCK_BYTES as usize]
            .iter_mut()
            .for_each(|b| *b = 0xC0 + t as u8);
    }
    let sync = Arc::new(Recorder(Mutex::new(Vec::new())));
    let cfg = TransferWithCacheKeyConfig {
        cache_key: TransferKey::Blocks(BlocksCacheKey::new(PEER_ID, 0)),
        src_layer_range: 0..2,
        dst_layer_range: 0..2,
        src_batch_index: 0,
    };
    let task = cm
        .transfer_cache_async(
            &local,
            sync.clone(),
            vec![TransferTarget::Key(cfg)],
            Some(vec![0]),
            Some(vec![15]),
        )
        .unwrap();
    assert_eq!(task.synchronize(Some(10_000)), LlmStatusCode::LlmSuccess);
    assert_eq!(
        task.get_results(None),
        vec![Some(LlmStatusCode::LlmSuccess)]
    );
    assert_eq!(*sync.0.lock().unwrap(), vec![0, 1]);
    cm.pull_blocks(
        BlocksCacheKey::new(PEER_ID, 0),
        &local,
        &[15],
        &[14],
        &LayerRanges::all(),
    )
    .unwrap();
    for t in 0..TENSORS as usize {
        assert!(block_bytes(&mem, t, 14)
            .iter()
            .all(|&b| b == 0xC0 + t as u8));
    }

    // Layer-wise async push by raw addresses (TransferConfig): local slot 0 of layer 1 into
    // slot 1 of the peer's contiguous cache, then pulled back.
    let slot = SLOT_BYTES as u64;
    let cfg = TransferConfig {
        dst_cluster_id: PEER_ID,
        dst_addrs: vec![peer.contig_addrs[2] + slot, peer.contig_addrs[3] + slot],
        src_layer_range: Some(1..2),
        src_batch_index: 0,
    };
    for &a in &contig.tensor_addrs()[2..] {
        // SAFETY: pool memory of this cache.
        let s = unsafe { std::slice::from_raw_parts_mut(a as *mut u8, SLOT_BYTES as usize) };
        s.iter_mut().for_each(|b| *b = 0x5A);
    }
    let task = cm
        .transfer_cache_async(
            &contig,
            sync.clone(),
            vec![TransferTarget::Addresses(cfg)],
            None,
            None,
        )
        .unwrap();
    assert_eq!(task.synchronize(Some(10_000)), LlmStatusCode::LlmSuccess);
    cm.pull_cache(
        CacheKeyByIdAndIndex::new(PEER_ID, peer.contig_id, 1),
        &contig2,
        0,
        -1,
        &LayerRanges::all(),
    )
    .unwrap();
    for (t, &a) in contig2.tensor_addrs().iter().enumerate() {
        // SAFETY: pool memory of this cache.
        let got = unsafe { std::slice::from_raw_parts(a as *const u8, SLOT_BYTES as usize) };
        if t >= 2 {
            assert!(got.iter().all(|&b| b == 0x5A), "tensor {t}");
        } else {
            let want: Vec<u8> = (0..SLOT_BYTES as usize)
                .map(|i| pattern(2, t, SLOT_BYTES as usize + i))
                .collect();
            assert_eq!(got, want.as_slice(), "tensor {t}");
        }
    }
    // An address outside the peer's registered memory is refused, and the link survives.
    let bad = TransferConfig {
        dst_cluster_id: PEER_ID,
        dst_addrs: vec![8, 16],
        src_layer_range: Some(0..1),
        src_batch_index: 0,
    };
    let task = cm
        .transfer_cache_async(
            &contig,
            sync.clone(),
            vec![TransferTarget::Addresses(bad)],
            None,
            None,
        )
        .unwrap();
    assert_eq!(
        task.synchronize(Some(10_000)),
        LlmStatusCode::LlmParamInvalid
    );

    // Unlink: both ends drop the link; transfers then need a new link.
    let (ret, _) = dd.unlink_clusters(&[peer.info()], 5000, false).unwrap();
    assert_eq!(ret, LlmStatusCode::LlmSuccess);
    let err = cm
        .pull_blocks(
            BlocksCacheKey::new(PEER_ID, 0),
            &local,
            &[1],
            &[1],
            &LayerRanges::all(),
        )
        .unwrap_err();
    assert_eq!(err.status_code, LlmStatusCode::LlmNotYetLink);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(peer.ask("links"), "0");
    let (ret, _) = dd.link_clusters(&[peer.info()], 5000).unwrap();
    assert_eq!(ret, LlmStatusCode::LlmSuccess);
    cm.pull_blocks(
        BlocksCacheKey::new(PEER_ID, 0),
        &local,
        &[4],
        &[4],
        &LayerRanges::all(),
    )
    .unwrap();
    assert_eq!(block_bytes(&mem, 3, 4), peer_block(3, 4));
    dd.finalize();
}

#[test]
fn transfers_over_tcp() {
    transfers_over("tcp");
}

#[test]
fn transfers_over_shared_memory() {
    transfers_over("shm");
}

#[test]
fn auto_transport_picks_shared_memory_on_one_host() {
    let _serial = serial();
    let peer = Peer::spawn("auto", true, "", false);
    let mut dd = LlmDataDist::new(LlmRole::Decoder, 1);
    dd.init(&options("auto", true, false, "", 5000)).unwrap();
    assert_eq!(
        dd.link_clusters(&[peer.info()], 5000).unwrap().0,
        LlmStatusCode::LlmSuccess
    );
    assert_eq!(dd.link_uses_shm(PEER_ID), Some(true));
    dd.finalize();
}
