//! Incremental detokenization that never emits broken UTF-8: text is released only once the
//! tokens decoded so far end on a complete character.

use super::Tokenizer;
use crate::error::Result;

/// Turns a growing token sequence into text pieces, one call per token.
#[derive(Clone, Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// A decoder continuing after `context` (e.g. the prompt), whose text is not emitted.
    pub fn new(context: &[u32]) -> Self {
        // A few tokens of context let the decoder get leading spaces right.
        let keep = context.len().min(5);
        let ids = context[context.len() - keep..].to_vec();
        IncrementalDecoder {
            read_offset: ids.len(),
            prefix_offset: 0,
            ids,
        }
    }

    /// Adds `id` and returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], false)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], false)?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
            && full.starts_with(&prefix)
        {
            let out = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(out)
        } else {
            Ok(String::new())
        }
    }

    /// Text still held back (an incomplete character at the very end), released as is.
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], false)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], false)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}
