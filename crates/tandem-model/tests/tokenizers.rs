//! Tokenizers built from GGUF metadata and from tokenizer.json, against the implementations
//! they mirror: sentencepiece itself (a BPE model trained by `sentencepiece`, written as a
//! tokenizer-only GGUF) and transformers (SmolLM2's tokenizer saved as tokenizer.json).

use std::path::PathBuf;

use tandem_model::gguf::GgufFile;
use tandem_model::{ChatMessage, Tokenizer};

fn data(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(p)
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn sentencepiece_vocab_from_gguf_matches_sentencepiece() {
    let g = GgufFile::open(data("spm/spm-tokenizer.gguf")).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data("spm/golden.json")).unwrap()).unwrap();
    for case in golden.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        assert_eq!(tok.encode(text, false).unwrap(), want, "tokens of {text:?}");
        assert_eq!(
            tok.decode(&want, true).unwrap(),
            text,
            "round trip of {text:?}"
        );
    }
    // SentencePiece vocabularies add BOS by default.
    assert_eq!(tok.encode("Hello world", true).unwrap()[0], 1);
}

#[test]
fn tokenizer_json_matches_transformers() {
    let dir = data("smollm2-tokenizer");
    let tok = Tokenizer::from_hf_dir(&dir, &[]).unwrap();
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    for case in golden["plain"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&case["ids"]),
            "tokens of {text:?}"
        );
    }
    let chat = tok
        .apply_chat_template(&[ChatMessage::new("user", "Hi there")], true)
        .unwrap();
    assert_eq!(chat, golden["chat_text"].as_str().unwrap());
    assert_eq!(tok.encode(&chat, false).unwrap(), ids(&golden["chat_ids"]));
    assert!(tok.eos_ids().contains(&2), "EOS from tokenizer_config.json");
}

#[test]
fn unfaithful_vocabularies_are_refused() {
    // A GGUF whose pre-tokenizer Tandem cannot reproduce must be refused, not approximated.
    let src = std::fs::read(data("spm/spm-tokenizer.gguf")).unwrap();
    let patched = String::from_utf8_lossy(&src).contains("tokenizer.ggml.model");
    assert!(patched);
    let dir = std::env::temp_dir().join(format!("tandem-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Same length as "llama" so offsets stay valid.
    let needle = b"llama";
    let pos = src.windows(5).rposition(|w| w == needle).unwrap();
    let mut bad = src.clone();
    bad[pos..pos + 5].copy_from_slice(b"bert_");
    let p = dir.join("bad.gguf");
    std::fs::write(&p, &bad).unwrap();
    let e = Tokenizer::from_gguf(&GgufFile::open(&p).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("bert_") && e.contains("bad.gguf"), "{e}");
}
