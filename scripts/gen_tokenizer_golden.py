#!/usr/bin/env python3
"""Tokenizer fixtures checked against independent implementations.

1. A small SentencePiece BPE model trained with `sentencepiece` (Llama's settings: identity
   normalization, spaces kept, dummy prefix, split digits, byte fallback), written as a tokenizer-only
   GGUF (`tokenizer.ggml.model = llama`: tokens, scores, token types), with sentencepiece's own
   encodings of test strings -> crates/tandem-model/tests/data/spm/.
2. SmolLM2's tokenizer as HF `tokenizer.json` + `tokenizer_config.json` (saved by transformers
   from the GGUF) with transformers' encodings -> crates/tandem-model/tests/data/smollm2-tokenizer/.
Usage: python3 scripts/gen_tokenizer_golden.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf
(needs `pip install sentencepiece gguf transformers`).
"""
import json, pathlib, sys, tempfile
import sentencepiece as spm
import gguf
from transformers import AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent / "crates/tandem-model/tests/data"
TESTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "  two  spaces", "naïve café 東京 🙂",
         "numbers 12345 and symbols #@!", "line\nbreak", "unseenwordzzq"]

corpus = ("The quick brown fox jumps over the lazy dog. Hello world, hello there. "
          "Numbers like 12345 appear; symbols too. A naive cafe serves coffee and tea.\n") * 50
out = ROOT / "spm"
out.mkdir(parents=True, exist_ok=True)
with tempfile.TemporaryDirectory() as d:
    (pathlib.Path(d) / "corpus.txt").write_text(corpus)
    spm.SentencePieceTrainer.train(input=f"{d}/corpus.txt", model_prefix=f"{d}/m", vocab_size=400, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    sp = spm.SentencePieceProcessor(model_file=f"{d}/m.model")
tokens, scores, types = [], [], []
for i in range(sp.get_piece_size()):
    tokens.append(sp.id_to_piece(i))
    scores.append(sp.get_score(i))
    types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1)
w = gguf.GGUFWriter(str(out / "spm-tokenizer.gguf"), "llama")
w.add_tokenizer_model("llama")
w.add_token_list(tokens)
w.add_token_scores(scores)
w.add_token_types(types)
w.add_bos_token_id(1)
w.add_eos_token_id(2)
w.add_unk_token_id(0)
w.add_add_space_prefix(True)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
(out / "golden.json").write_text(json.dumps([{"text": t, "ids": sp.encode(t)} for t in TESTS], ensure_ascii=False, indent=1))

g = pathlib.Path(sys.argv[1]).resolve()
tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
hf = ROOT / "smollm2-tokenizer"
tok.save_pretrained(hf)
for extra in ["special_tokens_map.json", "chat_template.jinja"]:
    p = hf / extra
    if p.exists() and extra == "chat_template.jinja":
        cfg = json.loads((hf / "tokenizer_config.json").read_text())
        cfg["chat_template"] = p.read_text()
        (hf / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1, ensure_ascii=False))
    p.unlink(missing_ok=True)
chat = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True)
(hf / "golden.json").write_text(json.dumps({"plain": [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in TESTS],
                                            "chat_text": chat, "chat_ids": tok(chat, add_special_tokens=False)["input_ids"]},
                                           ensure_ascii=False, indent=1))
print("wrote", out, hf)
