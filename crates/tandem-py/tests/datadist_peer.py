"""The other process of the llm_datadist tests, written as the vendor's sample scripts are
(``pull_blocks_sample.py``): a PROMPT instance that registers a blocks cache and allocates a
contiguous cache with request keys, filled with a known pattern, then serves its peer.

    python datadist_peer.py listen CLUSTER_ID PORT      # one-sided: listens on 127.0.0.1:PORT
    python datadist_peer.py rank CLUSTER_ID PEER_ID RANK_TABLE_JSON   # two-sided link, rank 0

It prints ``READY <contiguous cache id>`` once serving, then answers commands on stdin:
``digest T B`` (sha256 of tensor T, block B of its blocks cache), ``link PORT CLUSTER``,
``unlink PORT CLUSTER``, ``quit``.
"""

import ctypes
import hashlib
import sys
import time

import numpy as np

from llm_datadist import (
    BlocksCacheKey,
    CacheDesc,
    CacheKey,
    DataType,
    LLMClusterInfo,
    LLMConfig,
    LLMDataDist,
    LLMRole,
    RegisterMemStatus,
)

TENSORS = 4
BLOCKS = 16
BLOCK_BYTES = 4096
SLOT_BYTES = 1024


def pattern(seed: int, tensor: int, shape) -> np.ndarray:
    """The bytes the peer stores in tensor ``tensor`` of cache ``seed``."""
    n = int(np.prod(shape))
    x = (np.arange(n, dtype=np.uint64) * 2654435761 + seed * 97 + tensor * 131) % 251
    return x.astype(np.uint8).reshape(shape)


def view(addr: int, nbytes: int) -> np.ndarray:
    """Memory at ``addr`` as a byte array (no copy)."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(addr))


def config(listen: str = "") -> LLMConfig:
    cfg = LLMConfig()
    cfg.device_id = 0
    cfg.enable_cache_manager = True
    cfg.enable_remote_cache_accessible = True
    cfg.enable_switch_role = True
    cfg.sync_kv_timeout = 5000
    cfg.mem_pool_cfg = '{"memory_size": 16777216, "page_shift": 12}'
    if listen:
        cfg.listen_ip_info = listen
    return cfg


def cluster(cluster_id: int, port: int) -> LLMClusterInfo:
    ci = LLMClusterInfo()
    ci.remote_cluster_id = cluster_id
    ci.append_local_ip_info("127.0.0.1", 0)
    ci.append_remote_ip_info("127.0.0.1", port)
    return ci


def main() -> None:
    mode, cluster_id = sys.argv[1], int(sys.argv[2])
    dd = LLMDataDist(LLMRole.PROMPT, cluster_id)
    listen = f"127.0.0.1:{sys.argv[3]}" if mode == "listen" else ""
    dd.init(config(listen).generate_options())
    cm = dd.cache_manager

    # The KV pool: blocks of every tensor, registered as a blocks cache.
    tensors = [pattern(1, t, (BLOCKS, BLOCK_BYTES)) for t in range(TENSORS)]
    desc = CacheDesc(num_tensors=TENSORS, shape=[BLOCKS, BLOCK_BYTES], data_type=DataType.DT_UINT8)
    cm.register_blocks_cache(desc, [t.ctypes.data for t in tensors], BlocksCacheKey(cluster_id, 0))

    # A contiguous cache from the pool: batch slot i is request 7 + i.
    slots = cm.allocate_cache(
        CacheDesc(2, [2, SLOT_BYTES], DataType.DT_UINT8), [CacheKey(cluster_id, 7), CacheKey(cluster_id, 8)]
    )
    for t, addr in enumerate(slots.tensor_addrs):
        view(addr, 2 * SLOT_BYTES)[:] = pattern(2, t, (2 * SLOT_BYTES,))

    comm_id = None
    if mode == "rank":
        comm_id = dd.link("tandem-test", {cluster_id: 0, int(sys.argv[3]): 1}, sys.argv[4])
        while dd.query_register_mem_status(comm_id) != RegisterMemStatus.OK:
            time.sleep(0.01)

    print(f"READY {slots.cache_id}", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "digest":
            t, b = int(cmd[1]), int(cmd[2])
            print(hashlib.sha256(tensors[t][b].tobytes()).hexdigest(), flush=True)
        elif cmd[0] == "link":
            ret, rets = dd.link_clusters([cluster(int(cmd[2]), int(cmd[1]))], 3000)
            print(rets[0].name, flush=True)
        elif cmd[0] == "unlink":
            ret, rets = dd.unlink_clusters([cluster(int(cmd[2]), int(cmd[1]))], 3000)
            print(rets[0].name, flush=True)
        elif cmd[0] == "quit":
            break
    if comm_id is not None:
        dd.unlink(comm_id)
    dd.finalize()


if __name__ == "__main__":
    main()
