#!/usr/bin/env python3
"""Golden data for the reference model from HF transformers (an independent implementation).

transformers loads the GGUF itself (`from_pretrained(dir, gguf_file=...)`, dequantized to f32)
and builds its tokenizer from the GGUF metadata. For each prompt we record the prompt ids, the
greedy continuation, and at each step the top-k logits and the top-1/top-2 margin.

Usage: python3 scripts/gen_real_golden.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf
(needs `pip install torch transformers gguf accelerate`). Writes crates/tandem-model/tests/data/real_golden.json.
"""
import json, pathlib, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf = pathlib.Path(sys.argv[1]).resolve()
NEW_TOKENS, TOPK = 24, 8
PLAIN = [
    "The capital of France is",
    "def fibonacci(n):",
    "In 1969, 3 astronauts flew 384,400 km to the Moon; it took them 4 days.",
    "Once upon a time, in a small village by the sea,",
    "Les élèves ont étudié l'histoire — naïve café, 東京, emoji 🙂!",
    "  leading spaces\tand tabs\nand newlines\n\n",
]
CHAT = [
    "What is 2 + 2?",
    "Write a haiku about the ocean.",
]

tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
model.eval()

def run(text, ids):
    out = {"text": text, "prompt_ids": ids, "greedy_ids": [], "steps": []}
    seq = list(ids)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            top = torch.topk(logits, TOPK)
            nxt = int(top.indices[0])
            out["steps"].append({"top_ids": top.indices.tolist(), "top_logits": [float(v) for v in top.values],
                                 "margin": float(top.values[0] - top.values[1])})
            out["greedy_ids"].append(nxt)
            seq.append(nxt)
    return out

cases = []
for p in PLAIN:
    cases.append({"kind": "plain", **run(p, tok(p, add_special_tokens=False)["input_ids"])})
for p in CHAT:
    text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
    ids = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    cases.append({"kind": "chat", "user": p, **run(text, list(ids))})
dest = pathlib.Path(__file__).resolve().parent.parent / "crates/tandem-model/tests/data/real_golden.json"
dest.write_text(json.dumps({"model_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                            "transformers": __import__("transformers").__version__, "cases": cases}, indent=1))
print("wrote", dest)
