"""``llm_datadist`` across two Python processes, in the style of the vendor's samples: a PROMPT
process (``datadist_peer.py``) and this process as the DECODER."""

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator, Optional

import numpy as np
import pytest

import llm_datadist
from datadist_peer import BLOCK_BYTES, BLOCKS, SLOT_BYTES, TENSORS, cluster, pattern, view
from llm_datadist import (
    BlocksCacheKey,
    Cache,
    CacheDesc,
    CacheKey,
    CacheKeyByIdAndIndex,
    DataType,
    LLMClusterInfo,
    LLMConfig,
    LLMDataDist,
    LLMException,
    LLMRole,
    LLMStatusCode,
    Placement,
    RegisterMemStatus,
)

PEER = os.path.join(os.path.dirname(__file__), "datadist_peer.py")
PROMPT_ID, DECODER_ID = 100, 200


def wait_stopped(pid: int) -> None:
    """Waits until every thread of ``pid`` is stopped (SIGSTOP is delivered asynchronously)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        states = []
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if all(s in ("T", "t") for s in states):
            return
        time.sleep(0.001)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Peer:
    """The prompt process: started, commanded over stdin, and always stopped."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, PEER, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = self.proc.stdout.readline().split()
        assert line and line[0] == "READY", f"peer did not start: {line}"
        self.slots_cache_id = int(line[1])

    def ask(self, cmd: str) -> str:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def prompt() -> Iterator[tuple]:
    port = free_port()
    peer = Peer("listen", str(PROMPT_ID), str(port))
    yield peer, port
    peer.stop()


class Decoder:
    """This process's instance; finalized after each test (one per process at a time)."""

    def __init__(self, **props) -> None:
        self.dd = LLMDataDist(LLMRole.DECODER, DECODER_ID)
        cfg = LLMConfig()
        cfg.device_id = 0
        cfg.enable_cache_manager = True
        cfg.sync_kv_timeout = 5000
        for k, v in props.items():
            setattr(cfg, k, v)
        self.dd.init(cfg.generate_options())
        self.cm = self.dd.cache_manager
        self.tensors = [np.zeros((BLOCKS, BLOCK_BYTES), dtype=np.uint8) for _ in range(TENSORS)]

    def blocks_cache(self) -> Cache:
        desc = CacheDesc(num_tensors=TENSORS, shape=[BLOCKS, BLOCK_BYTES], data_type=DataType.DT_UINT8)
        return self.cm.register_blocks_cache(desc, [t.ctypes.data for t in self.tensors], BlocksCacheKey(DECODER_ID, 0))


@pytest.fixture
def decoder_factory() -> Iterator:
    made = []

    def make(**props) -> Decoder:
        d = Decoder(**props)
        made.append(d)
        return d

    yield make
    for d in made:
        d.dd.finalize()


def code_of(excinfo) -> LLMStatusCode:
    return excinfo.value.status_code


def test_pull_blocks_from_prompt(prompt, decoder_factory):
    peer, port = prompt
    d = decoder_factory()
    cache = d.blocks_cache()
    ret, rets = d.dd.link_clusters([cluster(PROMPT_ID, port)], timeout=5000)
    assert (ret, rets) == (LLMStatusCode.LLM_SUCCESS, [LLMStatusCode.LLM_SUCCESS])
    d.cm.pull_blocks(BlocksCacheKey(PROMPT_ID, 0), cache, src_blocks=[1, 3, 5], dst_blocks=[0, 1, 2])
    for t in range(TENSORS):
        expect = pattern(1, t, (BLOCKS, BLOCK_BYTES))
        assert np.array_equal(d.tensors[t][:3], expect[[1, 3, 5]])
    # Layer ranges: peer layer 0 (tensors 0, 1) into local layer 1 (tensors 2, 3).
    d.cm.pull_blocks(
        BlocksCacheKey(PROMPT_ID, 0), cache, [7], [9], src_layer_range=range(0, 1), dst_layer_range=range(1, 2)
    )
    assert np.array_equal(d.tensors[2][9], pattern(1, 0, (BLOCKS, BLOCK_BYTES))[7])
    assert not d.tensors[0][9].any()
    # Already linked.
    ret, rets = d.dd.link_clusters([cluster(PROMPT_ID, port)], timeout=5000)
    assert rets == [LLMStatusCode.LLM_ALREADY_LINK]
    ret, rets = d.dd.unlink_clusters([cluster(PROMPT_ID, port)], timeout=5000)
    assert rets == [LLMStatusCode.LLM_SUCCESS]
    with pytest.raises(LLMException) as e:
        d.cm.pull_blocks(BlocksCacheKey(PROMPT_ID, 0), cache, [1], [1])
    assert code_of(e) == LLMStatusCode.LLM_NOT_YET_LINK


def test_push_blocks_into_prompt(prompt, decoder_factory):
    peer, port = prompt
    d = decoder_factory(enable_remote_cache_accessible=True)
    cache = d.blocks_cache()
    for t in range(TENSORS):
        d.tensors[t][2] = pattern(9, t, (BLOCK_BYTES,))
    assert d.dd.link_clusters([cluster(PROMPT_ID, port)])[0] == LLMStatusCode.LLM_SUCCESS
    d.cm.push_blocks(BlocksCacheKey(PROMPT_ID, 0), cache, src_blocks=[2], dst_blocks=[11])
    for t in range(TENSORS):
        assert peer.ask(f"digest {t} 11") == hashlib.sha256(d.tensors[t][2].tobytes()).hexdigest()
    d.dd.unlink_clusters([cluster(PROMPT_ID, port)])


def test_pull_cache_by_request_key(prompt, decoder_factory):
    peer, port = prompt
    d = decoder_factory(mem_pool_cfg='{"memory_size": 4194304, "page_shift": 12}')
    local = d.cm.allocate_cache(CacheDesc(2, [2, SLOT_BYTES], DataType.DT_UINT8))
    assert d.dd.link_clusters([cluster(PROMPT_ID, port)])[0] == LLMStatusCode.LLM_SUCCESS
    d.cm.pull_cache(CacheKey(PROMPT_ID, 8), local, batch_index=1)
    for t, addr in enumerate(local.tensor_addrs):
        got = view(addr, 2 * SLOT_BYTES)
        assert np.array_equal(got[SLOT_BYTES:], pattern(2, t, (2 * SLOT_BYTES,))[SLOT_BYTES:])
        assert not got[:SLOT_BYTES].any()
    # A request key of an allocated cache is consumed by the pull.
    with pytest.raises(LLMException) as e:
        d.cm.pull_cache(CacheKey(PROMPT_ID, 8), local, batch_index=0)
    assert code_of(e) == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
    # By cache id and slot (the peer printed its cache id).
    d.cm.pull_cache(CacheKeyByIdAndIndex(PROMPT_ID, peer.slots_cache_id, 0), local, batch_index=0)
    assert np.array_equal(view(local.tensor_addrs[0], SLOT_BYTES), pattern(2, 0, (2 * SLOT_BYTES,))[:SLOT_BYTES])
    d.cm.deallocate_cache(local)
    assert local.tensor_addrs == []
    d.dd.unlink_clusters([cluster(PROMPT_ID, port)])


def test_switch_role_there_and_back(prompt, decoder_factory):
    peer, port = prompt
    d = decoder_factory(enable_switch_role=True)
    d.blocks_cache()
    assert d.dd.link_clusters([cluster(PROMPT_ID, port)])[0] == LLMStatusCode.LLM_SUCCESS
    with pytest.raises(LLMException) as e:
        d.dd.switch_role(LLMRole.PROMPT, {"llm.listenIpInfo": "127.0.0.1:1"})
    assert code_of(e) == LLMStatusCode.LLM_EXIST_LINK
    d.dd.unlink_clusters([cluster(PROMPT_ID, port)])
    with pytest.raises(LLMException) as e:
        d.dd.switch_role(LLMRole.PROMPT)
    assert code_of(e) == LLMStatusCode.LLM_PARAM_INVALID
    mine = free_port()
    d.dd.switch_role(LLMRole.PROMPT, {"llm.listenIpInfo": f"127.0.0.1:{mine}"})
    assert d.dd.role == LLMRole.PROMPT
    with pytest.raises(LLMException) as e:
        d.dd.switch_role(LLMRole.PROMPT, {"llm.listenIpInfo": f"127.0.0.1:{mine}"})
    assert code_of(e) == LLMStatusCode.LLM_PARAM_INVALID
    # Now a server: the former prompt links to it.
    assert peer.ask(f"link {mine} {DECODER_ID}") == "LLM_SUCCESS"
    assert peer.ask(f"unlink {mine} {DECODER_ID}") == "LLM_SUCCESS"
    d.dd.switch_role(LLMRole.DECODER)
    assert d.dd.role == LLMRole.DECODER
    assert peer.ask(f"link {mine} {DECODER_ID}") == "LLM_LINK_FAILED"


def test_switch_role_needs_the_flag(decoder_factory):
    d = decoder_factory()
    with pytest.raises(LLMException) as e:
        d.dd.switch_role(LLMRole.PROMPT, {"llm.listenIpInfo": "127.0.0.1:1"})
    assert code_of(e) == LLMStatusCode.LLM_FEATURE_NOT_ENABLED


def test_copy_and_swap_blocks(decoder_factory):
    d = decoder_factory(mem_pool_cfg='{"memory_size": 4194304, "page_shift": 12}')
    cache = d.blocks_cache()
    for t in range(TENSORS):
        d.tensors[t][:] = pattern(5, t, (BLOCKS, BLOCK_BYTES))
    d.cm.copy_blocks(cache, {0: [2, 3], 1: [4]})
    for t in range(TENSORS):
        assert np.array_equal(d.tensors[t][2], d.tensors[t][0])
        assert np.array_equal(d.tensors[t][3], d.tensors[t][0])
        assert np.array_equal(d.tensors[t][4], d.tensors[t][1])
    host = [np.zeros((4, BLOCK_BYTES), dtype=np.uint8) for _ in range(TENSORS)]
    host_desc = CacheDesc(TENSORS, [4, BLOCK_BYTES], DataType.DT_UINT8, Placement.HOST)
    cpu = Cache.create_cpu_cache(host_desc, [h.ctypes.data for h in host])
    assert cpu.cache_id == -1 and cpu.is_blocks_cache
    d.cm.swap_blocks(cache, cpu, {5: 0, 6: 3})  # swap out
    for t in range(TENSORS):
        assert np.array_equal(host[t][0], d.tensors[t][5])
        assert np.array_equal(host[t][3], d.tensors[t][6])
        host[t][1] = 77
    d.cm.swap_blocks(cpu, cache, {1: 15})  # swap in
    assert all((d.tensors[t][15] == 77).all() for t in range(TENSORS))
    # copy_cache between two allocated contiguous caches.
    desc = CacheDesc(2, [2, SLOT_BYTES], DataType.DT_UINT8)
    a, b = d.cm.allocate_cache(desc), d.cm.allocate_cache(desc)
    view(a.tensor_addrs[1], 2 * SLOT_BYTES)[:] = 9
    d.cm.copy_cache(b, a, dst_batch_index=0, src_batch_index=1)
    assert (view(b.tensor_addrs[1], SLOT_BYTES) == 9).all()
    with pytest.raises(LLMException) as e:
        d.cm.copy_cache(b, a, size=0)
    assert code_of(e) == LLMStatusCode.LLM_PARAM_INVALID


def test_rank_table_link(decoder_factory):
    p_port, d_port = free_port(), free_port()
    table = (
        '{"version": "1.0", "server_count": "2", "status": "completed", "server_list": ['
        f'{{"server_id": "p", "device": [{{"device_id": "0", "device_ip": "127.0.0.1", "device_port": "{p_port}", "rank_id": "0"}}]}},'
        f'{{"server_id": "d", "device": [{{"device_id": "0", "device_ip": "127.0.0.1", "device_port": "{d_port}", "rank_id": "1"}}]}}]}}'
    )
    d = decoder_factory(link_total_time=30)
    cache = d.blocks_cache()
    holder = {}

    def start_peer():
        holder["peer"] = Peer("rank", str(PROMPT_ID), str(DECODER_ID), table)

    import threading

    t = threading.Thread(target=start_peer)
    t.start()
    comm_id = d.dd.link("tandem-test", {PROMPT_ID: 0, DECODER_ID: 1}, table)
    assert comm_id >= 1
    deadline = time.monotonic() + 30
    while d.dd.query_register_mem_status(comm_id) != RegisterMemStatus.OK:
        assert d.dd.query_register_mem_status(comm_id) != RegisterMemStatus.FAILED
        assert time.monotonic() < deadline
        time.sleep(0.01)
    t.join()
    peer = holder["peer"]
    try:
        d.cm.pull_blocks(BlocksCacheKey(PROMPT_ID, 0), cache, [4], [4])
        assert np.array_equal(d.tensors[1][4], pattern(1, 1, (BLOCKS, BLOCK_BYTES))[4])
        d.dd.unlink(comm_id)
        with pytest.raises(LLMException) as e:
            d.dd.query_register_mem_status(comm_id)
        assert code_of(e) == LLMStatusCode.LLM_PARAM_INVALID
    finally:
        peer.stop()
    # Bad domains.
    for members in ({PROMPT_ID: 0}, {PROMPT_ID: 1, DECODER_ID: 0}, {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}):
        with pytest.raises(LLMException) as e:
            d.dd.link("x", members, table)
        assert code_of(e) == LLMStatusCode.LLM_PARAM_INVALID
    with pytest.raises(LLMException):
        d.dd.link("", {PROMPT_ID: 0, DECODER_ID: 1}, table)


def test_status_codes_and_argument_checks(prompt, decoder_factory):
    peer, port = prompt
    fresh = LLMDataDist(LLMRole.DECODER, DECODER_ID)
    with pytest.raises(RuntimeError, match="not initialized"):
        fresh.cache_manager
    with pytest.raises(TypeError):
        LLMDataDist("decoder", 1)
    d = decoder_factory(sync_kv_timeout=300)
    cache = d.blocks_cache()
    # One initialized instance per process.
    cfg = LLMConfig()
    cfg.device_id = 0
    cfg.enable_cache_manager = True
    with pytest.raises(LLMException) as e:
        fresh.init(cfg.generate_options())
    assert code_of(e) == LLMStatusCode.LLM_FAILED
    # Not linked.
    with pytest.raises(LLMException) as e:
        d.cm.pull_blocks(BlocksCacheKey(PROMPT_ID, 0), cache, [1], [1])
    assert code_of(e) == LLMStatusCode.LLM_NOT_YET_LINK
    # Nobody listening there.
    ret, rets = d.dd.link_clusters([cluster(PROMPT_ID, free_port())], timeout=1000)
    assert ret == rets[0] == LLMStatusCode.LLM_LINK_FAILED
    # Bad parameters.
    ci = LLMClusterInfo()
    ci.remote_cluster_id = PROMPT_ID
    ci.append_remote_ip_info("127.0.0.1", port)
    with pytest.raises(LLMException) as e:
        d.dd.link_clusters([ci])
    assert code_of(e) == LLMStatusCode.LLM_PARAM_INVALID
    with pytest.raises(LLMException) as e:
        d.dd.link_clusters([cluster(PROMPT_ID, port)], timeout=0)
    assert code_of(e) == LLMStatusCode.LLM_PARAM_INVALID
    with pytest.raises(TypeError):
        d.dd.link_clusters(cluster(PROMPT_ID, port))
    with pytest.raises(LLMException) as e:
        CacheKey(1, 2, color=3)
    assert code_of(e) == LLMStatusCode.LLM_PARAM_INVALID
    with pytest.raises(RuntimeError):
        LLMClusterInfo().append_remote_ip_info("not-an-ip", 1)
    assert d.dd.link_clusters([cluster(PROMPT_ID, port)])[0] == LLMStatusCode.LLM_SUCCESS
    with pytest.raises(LLMException) as e:
        d.cm.pull_blocks(BlocksCacheKey(PROMPT_ID, 0), cache, [1, 2], [1])
    assert code_of(e) == LLMStatusCode.LLM_PARAM_INVALID
    with pytest.raises(LLMException) as e:
        d.cm.pull_blocks(BlocksCacheKey(PROMPT_ID, 0), cache, [BLOCKS + 5], [1])
    assert code_of(e) == LLMStatusCode.LLM_PARAM_INVALID
    with pytest.raises(LLMException) as e:
        d.cm.pull_blocks(BlocksCacheKey(PROMPT_ID, 3), cache, [1], [1])
    assert code_of(e) == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
    # Timeout: the peer stops answering; the link is then unusable until relinked.
    os.kill(peer.proc.pid, signal.SIGSTOP)
    wait_stopped(peer.proc.pid)
    try:
        with pytest.raises(LLMException) as e:
            d.cm.pull_blocks(BlocksCacheKey(PROMPT_ID, 0), cache, [1], [1])
        assert code_of(e) == LLMStatusCode.LLM_TIMEOUT
    finally:
        os.kill(peer.proc.pid, signal.SIGCONT)
    d.dd.unlink_clusters([cluster(PROMPT_ID, port)], force=True)
    # Finalized: the manager refuses.
    d.dd.finalize()
    with pytest.raises(LLMException) as e:
        d.cm.pull_blocks(BlocksCacheKey(PROMPT_ID, 0), cache, [1], [1])
    assert code_of(e) == LLMStatusCode.LLM_ENGINE_FINALIZED


def test_config_and_enums():
    cfg = LLMConfig()
    cfg.device_id = 3
    cfg.sync_kv_timeout = "2000"
    cfg.listen_ip_info = "127.0.0.1:26000"
    cfg.enable_cache_manager = True
    opts = cfg.generate_options()
    assert opts["ge.exec.deviceId"] == "3" and opts["llm.SyncKvCacheWaitTime"] == "2000"
    assert opts["llm.listenIpInfo"] == "127.0.0.1:26000" and opts["llm.EnableCacheManager"] == "1"
    with pytest.raises(TypeError):
        cfg.device_id = "3"
    with pytest.raises(TypeError):
        cfg.mem_utilization = 1
    assert str(LLMRole.PROMPT) == "LLMRole.PROMPT" and LLMRole.PROMPT == 1
    assert LLMStatusCode.LLM_KV_CACHE_NOT_EXIST == 0x5010B002
    assert LLMStatusCode(0xFFFFFFFF) == LLMStatusCode.LLM_FAILED
    ci = LLMClusterInfo()
    ci.append_local_ip_info("1.2.3.4", 0)
    assert ci.local_ip_info_list == [(1 | 2 << 8 | 3 << 16 | 4 << 24, 0)]
    desc = CacheDesc(2, (4, 16, 2, 8), DataType.DT_FLOAT16)
    assert desc.size == 4 * 16 * 2 * 8 * 2 and desc.batch_size == 4 and desc.placement == Placement.DEVICE
    assert CacheKey(prompt_cluster_id=1, req_id=2).cluster_id == 1
    assert BlocksCacheKey(5, model_id=1) == BlocksCacheKey(5, 1)
    assert llm_datadist.LlmConfig is LLMConfig
    from tandem.llm_datadist import LLMDataDist as Same

    assert Same is LLMDataDist
