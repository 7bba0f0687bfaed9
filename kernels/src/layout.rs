//! Where the rows of one engine step live: what a device forward uploads
//! beside the activations (see `cuda::CudaModel`). Built and checked on the
//! host, so the device kernels only follow indices.

use crate::error::{KernelError, Result};
use crate::kv::{KvCache, KV_BLOCK_TOKENS};
use crate::model::{Chunk, ChunkInput};

/// One step's rows: every position of every chunk, in chunk order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StepLayout {
    /// Each row's token (a first shard's input).
    pub tokens: Vec<u32>,
    /// Each row's position in its sequence.
    pub positions: Vec<i32>,
    /// Each row's cache slot (block × [`KV_BLOCK_TOKENS`] + offset), where
    /// its key and value are stored.
    pub slots: Vec<i32>,
    /// Each row's chunk.
    pub row_chunk: Vec<i32>,
    /// Each chunk's block table, `max_blocks` entries per chunk (unused
    /// entries are -1).
    pub tables: Vec<i32>,
    /// Entries per block table.
    pub max_blocks: usize,
    /// The rows whose logits are wanted: each chunk's last row, for the
    /// chunks that want logits, in chunk order.
    pub logit_rows: Vec<i32>,
}

impl StepLayout {
    /// The layout of `chunks` (token input) over the block tables of `kv`,
    /// whose blocks must already be reserved for every position written.
    pub fn new(chunks: &[Chunk], kv: &KvCache, vocab: usize) -> Result<Self> {
        let mut l = StepLayout::default();
        for c in chunks {
            let blocks = kv.blocks(c.seq)?;
            l.max_blocks = l.max_blocks.max(blocks.len());
        }
        for (ci, c) in chunks.iter().enumerate() {
            let ChunkInput::Tokens(toks) = &c.input else {
                return Err(KernelError::BadInput(
                    "a device step takes tokens, not hidden states".into(),
                ));
            };
            if toks.is_empty() {
                return Err(KernelError::BadInput(format!(
                    "chunk of sequence {} is empty",
                    c.seq
                )));
            }
            let have = kv.seq_len(c.seq);
            if c.pos > have {
                return Err(KernelError::BadInput(format!(
                    "sequence {} jumps from {have} to position {}",
                    c.seq, c.pos
                )));
            }
            let blocks = kv.blocks(c.seq)?;
            let end = c.pos + toks.len();
            if end > blocks.len() * KV_BLOCK_TOKENS {
                return Err(KernelError::BadInput(format!(
                    "sequence {} has no KV room for positions up to {end}",
                    c.seq
                )));
            }
            for (i, &tok) in toks.iter().enumerate() {
                if tok as usize >= vocab {
                    return Err(KernelError::BadInput(format!(
                        "token {tok} outside vocabulary of {vocab}"
                    )));
                }
                let pos = c.pos + i;
                l.tokens.push(tok);
                l.positions.push(pos as i32);
                l.slots.push(kv.slot_of(c.seq, pos)? as i32);
                l.row_chunk.push(ci as i32);
            }
            if c.want_logits {
                l.logit_rows.push(l.tokens.len() as i32 - 1);
            }
            l.tables.extend(blocks.iter().map(|&b| b as i32));
            l.tables
                .extend(std::iter::repeat_n(-1, l.max_blocks - blocks.len()));
        }
        Ok(l)
    }

    /// Rows in the step.
    pub fn rows(&self) -> usize {
        self.tokens.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seq: u64, pos: usize, toks: &[u32], want: bool) -> Chunk {
        Chunk {
            seq,
            pos,
            input: ChunkInput::Tokens(toks.to_vec()),
            want_logits: want,
        }
    }

    /// Two sequences' tables, grown in turns so their blocks interleave:
    /// sequence 1 holds 30 positions in 3 blocks, sequence 2 is reserved 20.
    fn interleaved_tables() -> KvCache {
        let mut kv = KvCache::tables_only(2, 8, 10);
        kv.reserve(1, 10).unwrap();
        kv.reserve(2, 20).unwrap();
        kv.reserve(1, 40).unwrap();
        kv.set_len(1, 30);
        kv
    }

    /// One decode row for sequence 1 and an 18-token prefill for sequence 2.
    fn decode_and_prefill() -> [Chunk; 2] {
        [
            chunk(1, 30, &[5], true),
            chunk(
                2,
                0,
                &[
                    7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24,
                ],
                true,
            ),
        ]
    }

    #[test]
    fn rows_find_their_slots_through_interleaved_block_tables() {
        let kv = interleaved_tables();
        let l = StepLayout::new(&decode_and_prefill(), &kv, 100).unwrap();
        assert_eq!(l.rows(), 19);
        assert_eq!(l.max_blocks, 3);
        let t1 = kv.blocks(1).unwrap().to_vec();
        let t2 = kv.blocks(2).unwrap().to_vec();
        assert_eq!(t1.len(), 3);
        // sequence 1's position 30 is in its second block, slot 14
        assert_eq!(l.slots[0] as usize, t1[1] as usize * KV_BLOCK_TOKENS + 14);
        // sequence 2's position 17 is in its second block, slot 1
        assert_eq!(l.slots[18] as usize, t2[1] as usize * KV_BLOCK_TOKENS + 1);
        assert_eq!(l.positions[18], 17);
        assert_eq!(l.row_chunk[18], 1);
        assert_eq!(
            &l.tables[..3],
            &t1.iter().map(|&b| b as i32).collect::<Vec<_>>()[..]
        );
        assert_eq!(&l.tables[3..], &[t2[0] as i32, t2[1] as i32, -1]);
        assert_eq!(l.logit_rows, vec![0, 18]);
    }

    #[test]
    fn no_two_rows_of_a_step_write_one_slot() {
        let kv = interleaved_tables();
        let l = StepLayout::new(&decode_and_prefill(), &kv, 100).unwrap();
        let mut s = l.slots.clone();
        s.sort_unstable();
        s.dedup();
        assert_eq!(s.len(), l.rows());
    }

    #[test]
    fn a_tables_only_cache_holds_no_data() {
        assert!(!interleaved_tables().holds_data());
    }

    #[test]
    fn a_tables_only_cache_refuses_host_writes() {
        let mut kv = interleaved_tables();
        assert!(kv.write(0, 1, 0, &[0.0; 8], &[0.0; 8]).is_err());
    }

    /// Why a one-chunk step is refused, over a cache where sequence 1 holds
    /// one block and nothing is written yet; the vocabulary is 50 tokens.
    fn refusal(c: Chunk) -> String {
        let mut kv = KvCache::tables_only(1, 4, 4);
        kv.reserve(1, 16).unwrap();
        StepLayout::new(&[c], &kv, 50).unwrap_err().to_string()
    }

    #[test]
    fn a_chunk_that_jumps_past_its_sequences_end_is_refused() {
        assert!(refusal(chunk(1, 3, &[1], true)).contains("jumps"));
    }

    #[test]
    fn a_chunk_beyond_its_sequences_reserved_blocks_is_refused() {
        assert!(refusal(chunk(1, 0, &[1; 17], true)).contains("room"));
    }

    #[test]
    fn a_token_outside_the_vocabulary_is_refused() {
        assert!(refusal(chunk(1, 0, &[60], true)).contains("vocabulary"));
    }

    #[test]
    fn a_chunk_of_an_unknown_sequence_is_refused() {
        assert!(refusal(chunk(9, 0, &[1], true)).contains("unknown sequence"));
    }
}
