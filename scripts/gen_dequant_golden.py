#!/usr/bin/env python3
"""Golden dequantization vectors from gguf-py (ggml's own Python reference), for the kernel tests.

Writes crates/tandem-kernels/tests/data/dequant_golden.json: per format, random blocks (with
finite f16 scales) and the f32 values gguf-py dequantizes them to.
Usage: python3 scripts/gen_dequant_golden.py   (needs `pip install gguf numpy`)
"""
import json, pathlib
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

rng = np.random.default_rng(1234)
# (type, block bytes, offsets of f16 scale fields)
FORMATS = {"Q4_0": (T.Q4_0, 18, [0]), "Q4_1": (T.Q4_1, 20, [0, 2]), "Q8_0": (T.Q8_0, 34, [0]),
           "Q4_K": (T.Q4_K, 144, [0, 2]), "Q6_K": (T.Q6_K, 210, [208]),
           "Q5_0": (T.Q5_0, 22, [0]), "Q5_1": (T.Q5_1, 24, [0, 2]),
           "Q2_K": (T.Q2_K, 84, [80, 82]), "Q3_K": (T.Q3_K, 110, [108]),
           "Q5_K": (T.Q5_K, 176, [0, 2]),
           "IQ4_NL": (T.IQ4_NL, 18, [0]), "IQ4_XS": (T.IQ4_XS, 136, [0])}
out = {}
for name, (t, bb, scales) in FORMATS.items():
    nblocks = 4
    raw = rng.integers(0, 256, size=(nblocks, bb), dtype=np.uint8)
    for off in scales:
        vals = rng.uniform(-0.05, 0.05, size=nblocks).astype(np.float16).view(np.uint8).reshape(nblocks, 2)
        raw[:, off:off + 2] = vals
    data = raw.reshape(-1)
    vals = dequantize(data, t).reshape(-1).astype(np.float32)
    out[name] = {"bytes": data.tolist(), "values": [float(v) for v in vals]}
path = pathlib.Path(__file__).resolve().parent.parent / "crates/tandem-kernels/tests/data/dequant_golden.json"
path.write_text(json.dumps(out))
print("wrote", path)
