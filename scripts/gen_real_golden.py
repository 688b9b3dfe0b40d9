#!/usr/bin/env python3
"""Golden data for a real model from HF transformers (an independent implementation).

transformers loads the GGUF itself (`from_pretrained(dir, gguf_file=...)`, dequantized to f32)
and builds its tokenizer from the GGUF metadata. For each prompt we record the prompt ids, the
greedy continuation, and at each step the top-k logits and the top-1/top-2 margin.

Usage: python3 scripts/gen_real_golden.py PATH/TO/MODEL.gguf [OUT.json] [--varied]
(needs `pip install torch transformers gguf accelerate`). Writes OUT (default
crates/tandem-model/tests/data/real_golden.json). `--varied` adds the tokenization set of the
model-reach issue (code with tabs, CJK, emoji, Arabic, URLs, digits, special-token text in plain
text) and chats with a system prompt, several turns and tools.
"""
import json, pathlib, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

args = [a for a in sys.argv[1:] if not a.startswith("--")]
gguf = pathlib.Path(args[0]).resolve()
dest = pathlib.Path(args[1]) if len(args) > 1 else pathlib.Path(__file__).resolve().parent.parent / "crates/tandem-model/tests/data/real_golden.json"
varied = "--varied" in sys.argv
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

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
if varied:
    PLAIN += [
        "def add(a, b):\n\treturn a + b\n\nclass Foo:\n    def bar(self):\n        pass\n",
        "中文分词测试：我们今天去北京。日本語のテキスト。한국어 문장.",
        "Emoji 🙂🚀👩‍💻 and flags 🇫🇷🇯🇵 in a row!!!",
        "مرحبا بالعالم، هذه جملة عربية.",
        "See https://example.com/path?q=1&lang=en#frag or mailto:someone@example.org",
        "Digits 1234567890 3.14159 1,000,000 and 2026-12-03T09:00:00Z",
        "Text mentioning <|im_start|> and <|endoftext|> inside plain text.",
    ]
CHATS = [[{"role": "user", "content": p}] for p in CHAT]
if varied:
    CHATS += [
        [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three prime numbers."}],
        [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "Tell me a joke about cats."}],
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
for msgs in CHATS:
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    extra = {"user": msgs[-1]["content"]} if len(msgs) == 1 else {"messages": msgs}
    cases.append({"kind": "chat", **extra, **run(text, list(ids))})
if varied:
    # Tools through the model's own template: rendering and tokens only (no generation).
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    text = tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    cases.append({"kind": "tools", "messages": msgs, "tools": TOOLS, "text": text, "prompt_ids": ids})
sha = __import__("hashlib").sha256(gguf.read_bytes()).hexdigest()
dest.write_text(json.dumps({"model_sha256": sha, "transformers": __import__("transformers").__version__,
                            "cases": cases}, indent=1))
print("wrote", dest)
