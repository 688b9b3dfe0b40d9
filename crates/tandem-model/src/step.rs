//! What rank 0 of a tensor-parallel group sends the other ranks before each forward pass: the
//! batch's tokens and per-sequence metadata (block tables included, since every rank's KV pool
//! uses the same block ids), or the order to stop. Little-endian u32 words.

use crate::model::{LogitsMode, SeqInput};

/// A decoded step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Run a forward pass over this batch.
    Forward {
        /// The batch's tokens.
        tokens: Vec<u32>,
        /// Each sequence's share.
        seqs: Vec<OwnedSeq>,
    },
    /// The group is shutting down.
    Stop,
}

/// A [`SeqInput`] that owns its block table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedSeq {
    /// Tokens of the batch that are this sequence's.
    pub n_tokens: usize,
    /// Positions already in the KV pool.
    pub context_len: usize,
    /// Its blocks.
    pub block_table: Vec<u32>,
    /// Which logits it wants.
    pub logits: LogitsMode,
}

impl OwnedSeq {
    /// The borrowed form the forward pass takes.
    pub fn as_input(&self) -> SeqInput<'_> {
        SeqInput {
            n_tokens: self.n_tokens,
            context_len: self.context_len,
            block_table: &self.block_table,
            logits: self.logits,
        }
    }
}

const FORWARD: u32 = 1;
const STOP: u32 = 2;

fn mode_word(m: LogitsMode) -> u32 {
    match m {
        LogitsMode::None => 0,
        LogitsMode::Last => 1,
        LogitsMode::All => 2,
    }
}

/// Encodes a forward step.
pub fn encode_forward(tokens: &[u32], seqs: &[SeqInput], out: &mut Vec<u8>) {
    out.clear();
    let mut push = |w: u32| out.extend_from_slice(&w.to_le_bytes());
    push(FORWARD);
    push(tokens.len() as u32);
    tokens.iter().for_each(|&t| push(t));
    push(seqs.len() as u32);
    for s in seqs {
        push(s.n_tokens as u32);
        push(s.context_len as u32);
        push(mode_word(s.logits));
        push(s.block_table.len() as u32);
        s.block_table.iter().for_each(|&b| push(b));
    }
}

/// Encodes the stop step.
pub fn encode_stop() -> Vec<u8> {
    STOP.to_le_bytes().to_vec()
}

/// Decodes a step; `None` if the bytes are not one (truncated, trailing bytes, bad tags).
pub fn decode(bytes: &[u8]) -> Option<Step> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut words = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")));
    let mut take = |n: usize| -> Option<Vec<u32>> {
        let v: Vec<u32> = words.by_ref().take(n).collect();
        (v.len() == n).then_some(v)
    };
    let step = match take(1)?[0] {
        STOP => Step::Stop,
        FORWARD => {
            let n = take(1)?[0] as usize;
            // Bounded by the message length before allocating.
            if n > bytes.len() / 4 {
                return None;
            }
            let tokens = take(n)?;
            let n_seqs = take(1)?[0] as usize;
            if n_seqs > bytes.len() / 16 {
                return None;
            }
            let mut seqs = Vec::with_capacity(n_seqs);
            for _ in 0..n_seqs {
                let h = take(4)?;
                let logits = match h[2] {
                    0 => LogitsMode::None,
                    1 => LogitsMode::Last,
                    2 => LogitsMode::All,
                    _ => return None,
                };
                if h[3] as usize > bytes.len() / 4 {
                    return None;
                }
                seqs.push(OwnedSeq {
                    n_tokens: h[0] as usize,
                    context_len: h[1] as usize,
                    logits,
                    block_table: take(h[3] as usize)?,
                });
            }
            Step::Forward { tokens, seqs }
        }
        _ => return None,
    };
    take(1).is_none().then_some(step)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn seq() -> impl Strategy<Value = OwnedSeq> {
        (
            1usize..50,
            0usize..5000,
            proptest::collection::vec(any::<u32>(), 0..20),
            0u8..3,
        )
            .prop_map(|(n_tokens, context_len, block_table, m)| OwnedSeq {
                n_tokens,
                context_len,
                block_table,
                logits: [LogitsMode::None, LogitsMode::Last, LogitsMode::All][m as usize],
            })
    }

    proptest! {
        #[test]
        fn forward_steps_round_trip(tokens in proptest::collection::vec(any::<u32>(), 0..100),
                                    seqs in proptest::collection::vec(seq(), 0..8)) {
            let inputs: Vec<SeqInput> = seqs.iter().map(|s| s.as_input()).collect();
            let mut bytes = Vec::new();
            encode_forward(&tokens, &inputs, &mut bytes);
            prop_assert_eq!(decode(&bytes), Some(Step::Forward { tokens, seqs }));
            // Any truncation is refused.
            for cut in [1, 4, bytes.len() / 2] {
                prop_assert!(cut >= bytes.len() || decode(&bytes[..bytes.len() - cut]).is_none());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn stop_round_trips_and_trailing_bytes_are_refused() {
        assert_eq!(decode(&encode_stop()), Some(Step::Stop));
        let mut b = encode_stop();
        b.extend_from_slice(&[0; 4]);
        assert_eq!(decode(&b), None);
    }
}
