#!/usr/bin/env python3
"""The Python layer's overhead, side by side with the Rust it wraps, in one run.

1. Pipeline: ``tandem.pipeline`` vs ``tandem bench pipeline`` (the Rust pipeline) on the same
   prompts, greedy, a fixed number of new tokens; alternating A B A B; generated tokens/s.
2. llm_datadist: ``pull_blocks`` called from Python vs ``tandem bench datadist`` (the Rust
   client), both pulling the reference model's KV shape (60 tensors of 6,144-byte blocks,
   128-block requests) from the same Rust serving process, over shared memory and TCP.

Run it with the package installed (``pip install .``): ``python scripts/bench_python.py``.
"""

import argparse
import json
import random
import statistics
import subprocess
import sys
import time

import numpy as np

import tandem
from llm_datadist import (
    BlocksCacheKey,
    CacheDesc,
    DataType,
    LLMClusterInfo,
    LLMConfig,
    LLMDataDist,
    LLMRole,
    LLMStatusCode,
)

PROMPTS = [
    "DeepSpeed is",
    "Seattle is",
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "The best thing about Rust is",
    "In 1492,",
    "Write a haiku about the sea:",
]
TANDEM = [sys.executable, "-m", "tandem"]


def rust_pipeline(max_new: int, repeats: int) -> float:
    args = ["bench", "pipeline", "--max-new-tokens", str(max_new), "--repeats", str(repeats)]
    for p in PROMPTS:
        args += ["--prompt", p]
    out = subprocess.run(TANDEM + args, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s_p50"]


def python_pipeline(pipe, max_new: int, repeats: int) -> float:
    rates = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        out = pipe(PROMPTS, max_new_tokens=max_new, ignore_eos=True, do_sample=False)
        secs = time.perf_counter() - t0
        if i > 0:
            rates.append(sum(r.generated_length for r in out) / secs)
    return statistics.median(rates)


def bench_pipeline(rounds: int, max_new: int, repeats: int) -> None:
    pipe = tandem.pipeline("SmolLM2-135M-Instruct")
    rust, py = [], []
    for i in range(rounds):
        if i % 2 == 0:
            rust.append(rust_pipeline(max_new, repeats))
            py.append(python_pipeline(pipe, max_new, repeats))
        else:
            py.append(python_pipeline(pipe, max_new, repeats))
            rust.append(rust_pipeline(max_new, repeats))
    pipe.destroy()
    r, p = statistics.median(rust), statistics.median(py)
    print(f"pipeline, {len(PROMPTS)} prompts x {max_new} new tokens, greedy ({rounds} rounds, medians)")
    print(f"  Rust pipeline    {r:8.1f} tok/s   {['%.1f' % x for x in rust]}")
    print(f"  Python pipeline  {p:8.1f} tok/s   {['%.1f' % x for x in py]}")
    print(f"  ratio Python / Rust: {p / r:.3f}")


# The reference model's KV shape, as `tandem bench datadist` has it by default.
LAYERS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 30, 3, 64, 16
POOL_BLOCKS, REQUEST_BLOCKS, REQUESTS = 1024, 128, 50
SERVER_ID, CLIENT_ID = 2, 1


def rust_datadist(transport: str) -> float:
    out = subprocess.run(
        TANDEM + ["bench", "datadist", "--transport", transport, "--requests", str(REQUESTS)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for line in out.splitlines():
        if line.startswith("pull_blocks"):
            return float(line.split()[1])
    raise RuntimeError(f"no pull_blocks line in:\n{out}")


def python_datadist(transport: str) -> float:
    server = subprocess.Popen(
        TANDEM + ["bench", "datadist", "--serve", "--transport", transport],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(server.stdout.readline().split()[1])
        dd = LLMDataDist(LLMRole.DECODER, CLIENT_ID)
        cfg = LLMConfig()
        cfg.device_id = 0
        cfg.enable_cache_manager = True
        cfg.sync_kv_timeout = 30000
        cfg.transport = transport
        dd.init(cfg.generate_options())
        try:
            cm = dd.cache_manager
            tensors = 2 * LAYERS
            shape = [POOL_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM]
            pool = [np.ones(shape, dtype=np.float16) for _ in range(tensors)]
            desc = CacheDesc(tensors, shape, DataType.DT_FLOAT16)
            local = cm.register_blocks_cache(desc, [t.ctypes.data for t in pool], BlocksCacheKey(CLIENT_ID, 0))
            ci = LLMClusterInfo()
            ci.remote_cluster_id = SERVER_ID
            ci.append_local_ip_info("127.0.0.1", 0)
            ci.append_remote_ip_info("127.0.0.1", port)
            ret, _ = dd.link_clusters([ci], 5000)
            assert ret == LLMStatusCode.LLM_SUCCESS, ret
            rng = random.Random(7)
            ids = list(range(POOL_BLOCKS))
            block_bytes = BLOCK_SIZE * KV_HEADS * HEAD_DIM * 2
            nbytes = tensors * REQUEST_BLOCKS * block_bytes
            times = []
            for i in range(REQUESTS + 2):
                rng.shuffle(ids)
                src = ids[:REQUEST_BLOCKS]
                rng.shuffle(ids)
                dst = ids[:REQUEST_BLOCKS]
                t0 = time.perf_counter()
                cm.pull_blocks(BlocksCacheKey(SERVER_ID, 0), local, src_blocks=src, dst_blocks=dst)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            dd.unlink_clusters([ci], 5000)
            return nbytes / statistics.median(times) / 1e9
        finally:
            dd.finalize()
    finally:
        server.stdin.close()
        server.wait()


def bench_datadist(rounds: int, transports) -> None:
    for transport in transports:
        rust, py = [], []
        for i in range(rounds):
            # A B B A: neither side always runs first.
            if i % 2 == 0:
                rust.append(rust_datadist(transport))
                py.append(python_datadist(transport))
            else:
                py.append(python_datadist(transport))
                rust.append(rust_datadist(transport))
        r, p = statistics.median(rust), statistics.median(py)
        print(f"pull_blocks over {transport}, {REQUEST_BLOCKS} blocks x {2 * LAYERS} tensors ({rounds} rounds, medians of p50)")
        print(f"  Rust client      {r:6.2f} GB/s   {['%.2f' % x for x in rust]}")
        print(f"  Python client    {p:6.2f} GB/s   {['%.2f' % x for x in py]}")
        print(f"  ratio Python / Rust: {p / r:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=["pipeline", "datadist"])
    ap.add_argument("--transport", choices=["shm", "tcp"], action="append", help="default: both")
    a = ap.parse_args()
    if a.only != "datadist":
        bench_pipeline(a.rounds, a.max_new_tokens, a.repeats)
    if a.only != "pipeline":
        bench_datadist(a.rounds, a.transport or ["shm", "tcp"])


if __name__ == "__main__":
    main()
