//! The paged KV cache: fixed-size blocks from a pool sized by a byte budget,
//! and a block table per sequence.
//!
//! A block holds [`KV_BLOCK_TOKENS`] positions of keys and values for every
//! layer of the shard that owns the cache. Blocks are handed out when a
//! sequence grows and returned when it ends; running out is
//! [`KernelError::KvExhausted`], which the engine answers by queueing or
//! preempting, never by crashing. Storage pages are touched only when a block is
//! first written, so a large budget costs no memory until it is used.

use std::collections::HashMap;

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use crate::error::{KernelError, Result};

/// Token positions per KV block.
pub const KV_BLOCK_TOKENS: usize = 16;

/// Identifies one sequence (one request) in the cache and the engine.
pub type SeqId = u64;

#[derive(Debug, Default, Clone)]
struct BlockTable {
    blocks: Vec<u32>,
    /// Positions written so far.
    len: usize,
}

/// Keys and values of many sequences, in blocks.
pub struct KvCache {
    layers: usize,
    kv_dim: usize,
    total_blocks: usize,
    /// Per layer: `[block][slot][kv_dim]` keys, f16 bits. Held as `u16` so the
    /// pool is allocated zeroed by the OS and costs memory only where written.
    k: Vec<Vec<u16>>,
    /// Per layer: `[block][slot][kv_dim]` values, f16 bits.
    v: Vec<Vec<u16>>,
    free: Vec<u32>,
    tables: HashMap<SeqId, BlockTable>,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("layers", &self.layers)
            .field("total_blocks", &self.total_blocks)
            .field("free_blocks", &self.free.len())
            .field("sequences", &self.tables.len())
            .finish()
    }
}

impl KvCache {
    /// Bytes one block takes for `layers` layers of width `kv_dim`.
    pub fn block_bytes(layers: usize, kv_dim: usize) -> usize {
        // keys and values, f16 (as llama.cpp keeps them)
        2 * layers * KV_BLOCK_TOKENS * kv_dim * std::mem::size_of::<f16>()
    }

    /// A pool of as many blocks as `budget_bytes` holds (at least one).
    pub fn with_budget(layers: usize, kv_dim: usize, budget_bytes: usize) -> Self {
        let per = Self::block_bytes(layers, kv_dim).max(1);
        Self::with_blocks(layers, kv_dim, (budget_bytes / per).max(1))
    }

    /// A pool of exactly `blocks` blocks.
    pub fn with_blocks(layers: usize, kv_dim: usize, blocks: usize) -> Self {
        let per_layer = blocks * KV_BLOCK_TOKENS * kv_dim;
        Self {
            layers,
            kv_dim,
            total_blocks: blocks,
            k: (0..layers).map(|_| vec![0u16; per_layer]).collect(),
            v: (0..layers).map(|_| vec![0u16; per_layer]).collect(),
            // hand out low block numbers first
            free: (0..blocks as u32).rev().collect(),
            tables: HashMap::new(),
        }
    }

    /// A pool of `blocks` blocks whose keys and values live elsewhere (on
    /// a device): only the block tables are kept here, and [`KvCache::write`]
    /// and [`KvCache::layer`] have nothing to give.
    pub fn tables_only(layers: usize, kv_dim: usize, blocks: usize) -> Self {
        Self {
            k: Vec::new(),
            v: Vec::new(),
            ..Self::with_blocks(0, kv_dim, blocks)
        }
        .with_layers(layers)
    }

    fn with_layers(mut self, layers: usize) -> Self {
        self.layers = layers;
        self
    }

    /// Whether the keys and values are held here (not on a device).
    pub fn holds_data(&self) -> bool {
        self.k.len() == self.layers
    }

    /// Blocks in the pool.
    pub fn total_blocks(&self) -> usize {
        self.total_blocks
    }

    /// Blocks not held by any sequence.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Bytes the whole pool may take.
    pub fn capacity_bytes(&self) -> usize {
        self.total_blocks * Self::block_bytes(self.layers, self.kv_dim)
    }

    /// Positions the pool can hold in all.
    pub fn capacity_tokens(&self) -> usize {
        self.total_blocks * KV_BLOCK_TOKENS
    }

    /// Positions written for `seq` (0 for an unknown sequence).
    pub fn seq_len(&self, seq: SeqId) -> usize {
        self.tables.get(&seq).map_or(0, |t| t.len)
    }

    /// Whether the cache holds blocks for `seq`.
    pub fn contains(&self, seq: SeqId) -> bool {
        self.tables.contains_key(&seq)
    }

    /// Sequences with blocks.
    pub fn sequences(&self) -> usize {
        self.tables.len()
    }

    /// Blocks `seq` still needs to hold `len` positions.
    pub fn blocks_needed(&self, seq: SeqId, len: usize) -> usize {
        let have = self.tables.get(&seq).map_or(0, |t| t.blocks.len());
        len.div_ceil(KV_BLOCK_TOKENS).saturating_sub(have)
    }

    /// Makes room for positions `0..len` of `seq`, all or nothing.
    pub fn reserve(&mut self, seq: SeqId, len: usize) -> Result<()> {
        let needed = self.blocks_needed(seq, len);
        if needed > self.free.len() {
            return Err(KernelError::KvExhausted {
                needed,
                free: self.free.len(),
                total: self.total_blocks,
            });
        }
        let table = self.tables.entry(seq).or_default();
        for _ in 0..needed {
            // cannot fail: checked above
            if let Some(b) = self.free.pop() {
                table.blocks.push(b);
            }
        }
        Ok(())
    }

    /// Returns all blocks of `seq` to the pool.
    pub fn release(&mut self, seq: SeqId) {
        if let Some(t) = self.tables.remove(&seq) {
            self.free.extend(t.blocks.into_iter().rev());
        }
    }

    /// Forgets positions from `len` on (keeps the blocks), for replays and rollbacks.
    pub fn truncate(&mut self, seq: SeqId, len: usize) {
        if let Some(t) = self.tables.get_mut(&seq) {
            t.len = t.len.min(len);
        }
    }

    fn slot(&self, seq: SeqId, pos: usize) -> Result<usize> {
        let t = self
            .tables
            .get(&seq)
            .ok_or(KernelError::UnknownSequence(seq))?;
        let b = t.blocks.get(pos / KV_BLOCK_TOKENS).ok_or_else(|| {
            KernelError::BadInput(format!("position {pos} of sequence {seq} has no block"))
        })?;
        Ok((*b as usize * KV_BLOCK_TOKENS + pos % KV_BLOCK_TOKENS) * self.kv_dim)
    }

    /// Stores the key and value of `seq` at `pos` for local layer `layer`.
    pub fn write(
        &mut self,
        layer: usize,
        seq: SeqId,
        pos: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let off = self.slot(seq, pos)?;
        if !self.holds_data() {
            return Err(KernelError::BadInput(
                "this KV cache keeps its data on a device".into(),
            ));
        }
        let d = self.kv_dim;
        self.k[layer][off..off + d]
            .reinterpret_cast_mut::<f16>()
            .convert_from_f32_slice(k);
        self.v[layer][off..off + d]
            .reinterpret_cast_mut::<f16>()
            .convert_from_f32_slice(v);
        Ok(())
    }

    /// Marks positions `0..len` of `seq` as written.
    pub fn set_len(&mut self, seq: SeqId, len: usize) {
        if let Some(t) = self.tables.get_mut(&seq) {
            t.len = t.len.max(len);
        }
    }

    /// The cache slot (block × block size + offset) of position `pos` of
    /// `seq`: where a device cache keeps its key and value.
    pub fn slot_of(&self, seq: SeqId, pos: usize) -> Result<usize> {
        Ok(self.slot(seq, pos)? / self.kv_dim.max(1))
    }

    /// The block table of `seq`.
    pub fn blocks(&self, seq: SeqId) -> Result<&[u32]> {
        self.tables
            .get(&seq)
            .map(|t| t.blocks.as_slice())
            .ok_or(KernelError::UnknownSequence(seq))
    }

    /// Keys and values of local layer `layer`, `[block][slot][kv_dim]`.
    pub fn layer(&self, layer: usize) -> (&[f16], &[f16]) {
        (
            self.k[layer].reinterpret_cast::<f16>(),
            self.v[layer].reinterpret_cast::<f16>(),
        )
    }

    /// Width of one position's keys.
    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// Layers held.
    pub fn layers(&self) -> usize {
        self.layers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool of 4 blocks, all taken: sequence 1 holds 20 positions (2
    /// blocks) and sequence 2 holds 32 (2 blocks).
    fn full_pool() -> KvCache {
        let mut kv = KvCache::with_blocks(2, 8, 4);
        kv.reserve(1, 20).unwrap();
        kv.reserve(2, 32).unwrap();
        kv
    }

    #[test]
    fn reserving_takes_whole_blocks() {
        let mut kv = KvCache::with_blocks(2, 8, 4);
        kv.reserve(1, 20).unwrap(); // 2 blocks
        assert_eq!(kv.free_blocks(), 2);
        kv.reserve(2, 32).unwrap(); // 2 blocks
        assert_eq!(kv.free_blocks(), 0);
    }

    #[test]
    fn reserving_from_an_exhausted_pool_is_a_kv_exhausted_error() {
        let mut kv = full_pool();
        let err = kv.reserve(3, 1).unwrap_err();
        assert!(matches!(
            err,
            KernelError::KvExhausted {
                needed: 1,
                free: 0,
                total: 4
            }
        ));
    }

    #[test]
    fn a_failed_reservation_takes_nothing() {
        let mut kv = full_pool();
        kv.reserve(3, 1).unwrap_err();
        assert!(!kv.contains(3));
    }

    #[test]
    fn released_blocks_can_be_reserved_again() {
        let mut kv = full_pool();
        kv.release(1);
        assert_eq!(kv.free_blocks(), 2);
        kv.reserve(3, 17).unwrap();
        assert_eq!(kv.free_blocks(), 0);
        assert_eq!(kv.blocks(3).unwrap().len(), 2);
    }

    /// A pool of 3 blocks of one layer, all held by sequence 7 (40 positions).
    fn one_sequence() -> KvCache {
        let mut kv = KvCache::with_blocks(1, 2, 3);
        kv.reserve(7, 40).unwrap();
        kv
    }

    #[test]
    fn writes_land_in_the_sequence_blocks() {
        let mut kv = one_sequence();
        kv.write(0, 7, 33, &[1.0, 2.0], &[3.0, 4.0]).unwrap();
        let b = kv.blocks(7).unwrap()[2] as usize;
        let off = (b * KV_BLOCK_TOKENS + 1) * 2;
        let f = |v: &[f16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        assert_eq!(f(&kv.layer(0).0[off..off + 2]), [1.0, 2.0]);
        assert_eq!(f(&kv.layer(0).1[off..off + 2]), [3.0, 4.0]);
    }

    #[test]
    fn a_write_past_the_sequences_blocks_is_refused() {
        let mut kv = one_sequence();
        assert!(kv.write(0, 7, 48, &[0.0; 2], &[0.0; 2]).is_err());
    }

    #[test]
    fn a_write_to_an_unknown_sequence_is_refused() {
        let mut kv = one_sequence();
        assert!(kv.write(0, 8, 0, &[0.0; 2], &[0.0; 2]).is_err());
    }
}
