#!/usr/bin/env python3
"""Tiny random-weight Llama models and their golden logits from HF transformers.

For each variant (MHA, GQA, tied embeddings, qkv bias, RoPE scaling llama3 / linear / yarn) this
saves `config.json` + `model.safetensors` (f32) under crates/tandem-model/tests/data/tiny/<name>/
and `golden.json` with: the prompt ids, logits for every prompt position (whole-prompt prefill),
and for each of several greedy decode steps the chosen token and the next logits.
Usage: python3 scripts/gen_tiny_golden.py   (needs `pip install torch transformers safetensors`)
"""
import json, pathlib
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent / "crates/tandem-model/tests/data/tiny"
BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, torch_dtype="float32")
VARIANTS = {
    "mha": {},
    "gqa": {"num_key_value_heads": 2},
    "tied": {"num_key_value_heads": 1, "tie_word_embeddings": True},
    "qkv_bias": {"num_key_value_heads": 2, "attention_bias": True},
    "rope_llama3": {"num_key_value_heads": 2, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "rope_linear": {"num_key_value_heads": 2, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "rope_yarn": {"num_key_value_heads": 2, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
}
PROMPT = [1, 17, 5, 42, 9, 33, 60, 7, 21, 11, 3, 50]
STEPS = 4

for name, over in VARIANTS.items():
    torch.manual_seed(hash(name) % 1000)
    cfg = LlamaConfig(**{**BASE, **over})
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init, so errors show
            p.normal_(0.0, 0.2)
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    out = ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    seq = list(PROMPT)
    with torch.no_grad():
        prefill = model(torch.tensor([seq])).logits[0]
        steps = []
        nxt = int(prefill[-1].argmax())
        for _ in range(STEPS):
            seq.append(nxt)
            logits = model(torch.tensor([seq])).logits[0, -1]
            steps.append({"token": nxt, "logits": [float(v) for v in logits]})
            nxt = int(logits.argmax())
    (out / "golden.json").write_text(json.dumps({"prompt": PROMPT, "prefill_logits": [[float(v) for v in r] for r in prefill],
                                                 "steps": steps}))
    print("wrote", out)
