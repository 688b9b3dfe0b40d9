//! Local cache operations: pool allocation and deferred free, copy_cache, copy_blocks,
//! swap_blocks between host and device caches, key removal and registration limits.

mod common;

use common::*;
use llm_datadist::*;

fn bytes(addr: u64, len: usize) -> &'static mut [u8] {
    // SAFETY: tests pass addresses of live caches with at least `len` bytes.
    unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) }
}

#[test]
fn copy_swap_and_pool() {
    let _serial = serial();
    let mut dd = LlmDataDist::new(LlmRole::Mix, 5);
    dd.init(&options("auto", false, false, "", 1000)).unwrap();
    let cm = dd.cache_manager().unwrap();

    // copy_cache: slot 0 of a into slot 1 of b, from byte 100 on.
    let a = cm
        .allocate_cache(&slots_desc(), &[CacheKey::new(5, 1)])
        .unwrap();
    let mut b = cm.allocate_cache(&slots_desc(), &[]).unwrap();
    for (t, &addr) in a.tensor_addrs().iter().enumerate() {
        bytes(addr, SLOT_BYTES as usize)
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = pattern(9, t, i));
    }
    cm.copy_cache(&b, &a, 1, 0, 100, -1).unwrap();
    for (t, &addr) in b.tensor_addrs().iter().enumerate() {
        let slot1 = &bytes(addr, 2 * SLOT_BYTES as usize)[SLOT_BYTES as usize..];
        assert!(slot1[..100].iter().all(|&x| x == 0));
        let want: Vec<u8> = (100..SLOT_BYTES as usize)
            .map(|i| pattern(9, t, i))
            .collect();
        assert_eq!(&slot1[100..], want.as_slice());
    }
    assert!(cm.copy_cache(&b, &a, 2, 0, 0, -1).is_err());

    // copy_blocks inside one cache: block 1 -> 4 and 6.
    let blocks = cm
        .allocate_blocks_cache(&blocks_desc(), Some(BlocksCacheKey::new(5, 0)))
        .unwrap();
    let bb = BLOCK_BYTES as usize;
    for (t, &addr) in blocks.tensor_addrs().iter().enumerate() {
        bytes(addr, 2 * bb)[bb..]
            .iter_mut()
            .for_each(|x| *x = 10 + t as u8);
    }
    cm.copy_blocks(&blocks, &[(1, vec![4, 6])]).unwrap();
    for (t, &addr) in blocks.tensor_addrs().iter().enumerate() {
        let m = bytes(addr, 8 * bb);
        assert!(m[4 * bb..5 * bb]
            .iter()
            .chain(&m[6 * bb..7 * bb])
            .all(|&x| x == 10 + t as u8));
        assert!(m[5 * bb..6 * bb].iter().all(|&x| x == 0));
    }
    assert_eq!(
        cm.copy_blocks(&blocks, &[(1, vec![BLOCKS as u64])])
            .unwrap_err()
            .status_code,
        LlmStatusCode::LlmParamInvalid
    );

    // swap out to a host CPU cache and back in.
    let host_desc = blocks_desc().with_placement(Placement::Host);
    let mut host_mem = Tensors::new(TENSORS, (BLOCKS * BLOCK_BYTES) as usize);
    // SAFETY: host_mem outlives every use of the CPU cache.
    let host = unsafe { Cache::create_cpu_cache(host_desc, host_mem.addrs()).unwrap() };
    cm.swap_blocks(&blocks, &host, &[(4, 0)]).unwrap();
    assert!(host_mem.0[3][..bb].iter().all(|&x| x == 13));
    cm.swap_blocks(&host, &blocks, &[(0, 9)]).unwrap();
    assert!(bytes(blocks.tensor_addrs()[2], 10 * bb)[9 * bb..]
        .iter()
        .all(|&x| x == 12));
    assert_eq!(
        cm.swap_blocks(&blocks, &blocks, &[(0, 1)])
            .unwrap_err()
            .status_code,
        LlmStatusCode::LlmFeatureNotEnabled
    );
    assert!(cm
        .swap_blocks(&host, &blocks, &[(0, BLOCKS as u64)])
        .is_err());

    // Pools: host placement comes from the host pool; deallocating a contiguous cache waits
    // for its keys.
    let host_cache = cm.allocate_cache(&slots_desc().with_placement(Placement::Host), &[]);
    assert!(host_cache.is_ok());
    cm.deallocate_cache(&mut b).unwrap();
    assert!(b.tensor_addrs().is_empty());
    let mut a2 = a.clone();
    cm.deallocate_cache(&mut a2).unwrap();
    cm.remove_cache_key(&CacheKey::new(5, 1)).unwrap();
    cm.remove_cache_key(&CacheKey::new(5, 1)).unwrap(); // unknown key: no-op
    let mut blocks2 = blocks.clone();
    assert!(cm.deallocate_cache(&mut blocks2).is_err());
    cm.deallocate_blocks_cache(&mut blocks2).unwrap();
    assert!(cm.copy_blocks(&blocks, &[(1, vec![2])]).is_err());
    dd.finalize();

    // Registration limit: at most 240 addresses.
    let mut dd = LlmDataDist::new(LlmRole::Mix, 5);
    dd.init(&options("auto", false, false, "", 1000)).unwrap();
    let cm = dd.cache_manager().unwrap();
    let mut mem = Tensors::new(241, 64);
    let desc = CacheDesc::new(241, vec![1, 64], DataType::DtUint8).unwrap();
    // SAFETY: `mem` outlives the instance.
    let err = unsafe { cm.register_cache(&desc, &mem.addrs(), &[], None) }.unwrap_err();
    assert_eq!(err.status_code, LlmStatusCode::LlmParamInvalid);
    dd.finalize();
    drop(host_mem);
}
