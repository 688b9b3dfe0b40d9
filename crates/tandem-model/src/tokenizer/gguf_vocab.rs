//! Builds a `tokenizers` tokenizer equivalent to llama.cpp's from GGUF `tokenizer.ggml.*`
//! metadata: gpt2-style byte-level BPE with the pre-tokenizer named by `tokenizer.ggml.pre`,
//! or a SentencePiece-style (`llama`) vocabulary with byte fallback. Anything that cannot be
//! reproduced faithfully is refused with the reason.

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
    Tokenizer,
};

use crate::gguf::{GgufFile, GgufValue};

/// llama.cpp's token types.
const TYPE_NORMAL: u64 = 1;
const TYPE_CONTROL: u64 = 3;
const TYPE_USER_DEFINED: u64 = 4;

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn strings(g: &GgufFile, key: &str) -> Result<Vec<String>, String> {
    let arr = g
        .get(key)
        .and_then(GgufValue::as_array)
        .ok_or_else(|| format!("missing `{key}`"))?;
    arr.iter()
        .map(|v| {
            v.as_str()
                .map(String::from)
                .ok_or_else(|| format!("`{key}` holds a non-string"))
        })
        .collect()
}

fn numbers(g: &GgufFile, key: &str, n: usize) -> Result<Option<Vec<f64>>, String> {
    let Some(arr) = g.get(key).and_then(GgufValue::as_array) else {
        return Ok(None);
    };
    if arr.len() != n {
        return Err(format!("`{key}` has {} entries for {n} tokens", arr.len()));
    }
    arr.iter()
        .map(|v| {
            v.as_f64()
                .ok_or_else(|| format!("`{key}` holds a non-number"))
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

fn split(regex: &str) -> Result<PreTokenizerWrapper, String> {
    let s = Split::new(
        SplitPattern::Regex(regex.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| e.to_string())?;
    Ok(s.into())
}

/// The HF pre-tokenizer matching llama.cpp's `tokenizer.ggml.pre` name, and whether BPE must
/// skip merges for whole-word vocabulary hits (Llama 3 style).
fn pre_tokenizer(pre: &str) -> Result<(PreTokenizerWrapper, bool), String> {
    let byte_level =
        |regex: bool| -> PreTokenizerWrapper { ByteLevel::new(false, true, regex).into() };
    Ok(match pre {
        "default" | "gpt-2" | "gpt2" => (byte_level(true), false),
        "smollm" | "starcoder" | "refact" => {
            (PreSequence::new(vec![Digits::new(true).into(), byte_level(true)]).into(), false)
        }
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" => {
            (PreSequence::new(vec![split(LLAMA3_REGEX)?, byte_level(false)]).into(), true)
        }
        "qwen2" => (PreSequence::new(vec![split(QWEN2_REGEX)?, byte_level(false)]).into(), false),
        other => {
            return Err(format!(
                "pre-tokenizer {other:?} is not supported, so the tokenization could not be made faithful; \
                 load the model from a directory with its tokenizer.json instead"
            ))
        }
    })
}

fn added_tokens(tokens: &[String], types: Option<&[f64]>) -> Vec<AddedToken> {
    let Some(types) = types else { return vec![] };
    tokens
        .iter()
        .zip(types)
        .filter_map(|(t, &ty)| match ty as u64 {
            TYPE_CONTROL => Some(AddedToken::from(t.clone(), true).normalized(false)),
            TYPE_USER_DEFINED => Some(AddedToken::from(t.clone(), false).normalized(false)),
            _ => None,
        })
        .collect()
}

/// The vocabulary in the map type `tokenizers`' BPE builder takes.
fn bpe_vocab(vocab: &HashMap<String, u32>) -> tokenizers::models::bpe::Vocab {
    vocab.iter().map(|(k, v)| (k.clone(), *v)).collect()
}

/// Builds the tokenizer from the file's metadata.
pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer, String> {
    let model = g
        .get("tokenizer.ggml.model")
        .and_then(GgufValue::as_str)
        .ok_or("missing `tokenizer.ggml.model`")?;
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let types = numbers(g, "tokenizer.ggml.token_type", tokens.len())?;
    let vocab: HashMap<String, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    if vocab.len() != tokens.len() {
        return Err("`tokenizer.ggml.tokens` has duplicate entries".into());
    }
    let mut tk = match model {
        "gpt2" => {
            let pre = g
                .get("tokenizer.ggml.pre")
                .and_then(GgufValue::as_str)
                .unwrap_or("default");
            let (pre, ignore_merges) = pre_tokenizer(pre)?;
            let merges: Vec<(String, String)> = strings(g, "tokenizer.ggml.merges")?
                .into_iter()
                .map(|m| {
                    m.split_once(' ')
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .ok_or(format!("merge {m:?} is not two tokens"))
                })
                .collect::<Result<_, _>>()?;
            let bpe = BPE::builder()
                .vocab_and_merges(bpe_vocab(&vocab), merges)
                .ignore_merges(ignore_merges)
                .build()
                .map_err(|e| e.to_string())?;
            let mut tk = Tokenizer::new(bpe);
            tk.with_pre_tokenizer(Some(pre));
            tk.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
            tk
        }
        "llama" => {
            let scores = numbers(g, "tokenizer.ggml.scores", tokens.len())?
                .ok_or("missing `tokenizer.ggml.scores`")?;
            let unk = g
                .get("tokenizer.ggml.unknown_token_id")
                .and_then(GgufValue::as_u64)
                .unwrap_or(0) as usize;
            let unk_token = tokens
                .get(unk)
                .cloned()
                .ok_or("unknown_token_id out of range")?;
            let merges = spm_merges(&tokens, &scores, types.as_deref(), &vocab);
            let bpe = BPE::builder()
                .vocab_and_merges(bpe_vocab(&vocab), merges)
                .unk_token(unk_token)
                .fuse_unk(true)
                .byte_fallback(true)
                .build()
                .map_err(|e| e.to_string())?;
            let mut tk = Tokenizer::new(bpe);
            let space_prefix = g
                .get("tokenizer.ggml.add_space_prefix")
                .and_then(GgufValue::as_bool)
                .unwrap_or(true);
            let replace: NormalizerWrapper =
                Replace::new(" ", "▁").map_err(|e| e.to_string())?.into();
            let normalizer = if space_prefix {
                tokenizers::normalizers::Sequence::new(vec![
                    Prepend::new("▁".into()).into(),
                    replace,
                ])
                .into()
            } else {
                replace
            };
            tk.with_normalizer(Some(normalizer));
            let mut decoders: Vec<DecoderWrapper> = vec![
                tokenizers::decoders::DecoderWrapper::Replace(
                    Replace::new("▁", " ").map_err(|e| e.to_string())?,
                ),
                ByteFallback::default().into(),
                Fuse::default().into(),
            ];
            if space_prefix {
                decoders.push(Strip::new(' ', 1, 0).into());
            }
            tk.with_decoder(Some(DecoderSequence::new(decoders)));
            tk
        }
        other => {
            return Err(format!(
                "tokenizer model {other:?} is not supported (gpt2 and llama are)"
            ))
        }
    };
    tk.add_special_tokens(&added_tokens(&tokens, types.as_deref()));
    Ok(tk)
}

/// BPE merges equivalent to a SentencePiece BPE vocabulary: every split of a normal piece into
/// two pieces that are both in the vocabulary, ranked by the merged piece's score (as HF's
/// `SentencePieceExtractor` does).
fn spm_merges(
    tokens: &[String],
    scores: &[f64],
    types: Option<&[f64]>,
    vocab: &HashMap<String, u32>,
) -> Vec<(String, String)> {
    let mut merges: Vec<(f64, u32, u32, String, String)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        if types.is_some_and(|t| t[i] as u64 != TYPE_NORMAL) {
            continue;
        }
        for (idx, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(idx);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                merges.push((scores[i], li, ri, l.to_string(), r.to_string()));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges.into_iter().map(|(_, _, _, l, r)| (l, r)).collect()
}
