//! The paged KV cache: fixed-size blocks from a pool sized by a byte budget,
//! a block table per sequence, and the prefix cache.
//!
//! A block holds [`KV_BLOCK_TOKENS`] positions of keys and values for every
//! layer of the shard that owns the cache. Blocks are handed out when a
//! sequence grows and returned when it ends; running out is
//! [`KernelError::KvExhausted`], which the engine answers by queueing or
//! preempting, never by crashing. Storage pages are touched only when a block is
//! first written, so a large budget costs no memory until it is used.
//!
//! **Prefix cache.** A full block can be registered under a [`BlockHash`]
//! (the engine's hash chain over the token ids up to the block's end, salted
//! by model, layer range and tenant scope). A registered block outlives its
//! sequence: when no sequence holds it any more it waits, reference-counted
//! at zero, in a least-recently-used list, and a later sequence whose
//! prefix hashes the same maps it instead of computing it again
//! ([`KvCache::map_prefix`]). Blocks held by several sequences are never
//! written: a sequence only writes positions past the blocks it mapped.
//! A reservation takes free blocks first and evicts unheld cached blocks
//! (the least recently used first) only when there are none, so the cache
//! costs nothing under pressure before anything is preempted.

use std::collections::{BTreeMap, HashMap};

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use crate::error::{KernelError, Result};

/// Token positions per KV block.
pub const KV_BLOCK_TOKENS: usize = 16;

/// Identifies one sequence (one request) in the cache and the engine.
pub type SeqId = u64;

/// A full block's identity in the prefix cache.
pub type BlockHash = u64;

#[derive(Debug, Default, Clone)]
struct BlockTable {
    blocks: Vec<u32>,
    /// Positions written so far.
    len: usize,
    /// Leading blocks that are registered (or were mapped) in the prefix
    /// cache.
    hashed: usize,
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
    /// Blocks no sequence holds and the prefix cache does not keep.
    free: Vec<u32>,
    tables: HashMap<SeqId, BlockTable>,
    /// Per block: how many sequences hold it.
    refs: Vec<u32>,
    /// Per block: its hash, when the prefix cache keeps it.
    hash_of: Vec<Option<BlockHash>>,
    /// The prefix cache: hash → block.
    index: HashMap<BlockHash, u32>,
    /// Cached blocks no sequence holds, by last use (oldest first).
    idle: BTreeMap<u64, u32>,
    /// Per block: its key in `idle`.
    idle_at: Vec<u64>,
    tick: u64,
    evictions: u64,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("layers", &self.layers)
            .field("total_blocks", &self.total_blocks)
            .field("free_blocks", &self.free.len())
            .field("cached_blocks", &self.index.len())
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
            refs: vec![0; blocks],
            hash_of: vec![None; blocks],
            index: HashMap::new(),
            idle: BTreeMap::new(),
            idle_at: vec![0; blocks],
            tick: 0,
            evictions: 0,
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

    /// Blocks no sequence holds: free ones, and cached ones a reservation
    /// may evict.
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// Blocks the prefix cache keeps (held by sequences or not).
    pub fn cached_blocks(&self) -> usize {
        self.index.len()
    }

    /// Cached blocks evicted so far to make room.
    pub fn evictions(&self) -> u64 {
        self.evictions
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

    /// A block for a sequence to write: a free one, else the least recently
    /// used cached block no sequence holds (evicted from the cache).
    fn take_block(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.idle.pop_first()?;
                if let Some(h) = self.hash_of[b as usize].take() {
                    self.index.remove(&h);
                }
                self.evictions += 1;
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Makes room for positions `0..len` of `seq`, all or nothing.
    pub fn reserve(&mut self, seq: SeqId, len: usize) -> Result<()> {
        let needed = self.blocks_needed(seq, len);
        if needed > self.free_blocks() {
            return Err(KernelError::KvExhausted {
                needed,
                free: self.free_blocks(),
                total: self.total_blocks,
            });
        }
        let mut taken = Vec::with_capacity(needed);
        for _ in 0..needed {
            // cannot fail: checked above
            if let Some(b) = self.take_block() {
                taken.push(b);
            }
        }
        self.tables.entry(seq).or_default().blocks.extend(taken);
        Ok(())
    }

    /// Drops one hold on block `b`: with none left it waits in the prefix
    /// cache (if registered) or goes back to the pool.
    fn unhold(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        debug_assert!(*r > 0, "block {b} released more often than held");
        *r = r.saturating_sub(1);
        if *r > 0 {
            return;
        }
        if self.hash_of[b as usize].is_some() {
            self.tick += 1;
            self.idle.insert(self.tick, b);
            self.idle_at[b as usize] = self.tick;
        } else {
            self.free.push(b);
        }
    }

    /// Returns all blocks of `seq` to the pool; its registered blocks stay
    /// in the prefix cache, its last ones first to be evicted.
    pub fn release(&mut self, seq: SeqId) {
        if let Some(t) = self.tables.remove(&seq) {
            for &b in t.blocks.iter().rev() {
                self.unhold(b);
            }
        }
    }

    /// Maps the longest run of `hashes` (a sequence's block hashes from its
    /// first block) that the prefix cache holds as the first blocks of
    /// `seq`, a sequence with no blocks yet: positions up to the end of
    /// the last mapped block count as written. Maps at most `limit` blocks.
    /// Returns the blocks mapped.
    pub fn map_prefix(&mut self, seq: SeqId, hashes: &[BlockHash], limit: usize) -> usize {
        if self.tables.get(&seq).is_some_and(|t| !t.blocks.is_empty()) {
            return 0;
        }
        let mut blocks = Vec::new();
        for h in hashes.iter().take(limit) {
            let Some(&b) = self.index.get(h) else { break };
            if self.refs[b as usize] == 0 {
                self.idle.remove(&self.idle_at[b as usize]);
            }
            self.refs[b as usize] += 1;
            blocks.push(b);
        }
        let n = blocks.len();
        if n > 0 {
            self.tables.insert(
                seq,
                BlockTable {
                    blocks,
                    len: n * KV_BLOCK_TOKENS,
                    hashed: n,
                },
            );
        }
        n
    }

    /// The blocks `seq` would map from `hashes` now (see
    /// [`KvCache::map_prefix`]), mapping nothing.
    pub fn cached_prefix(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.index.contains_key(h))
            .count()
    }

    /// Keeps only the first `blocks` blocks of `seq` (mapped, not yet
    /// written past): for a chain whose later nodes hold less of a prefix.
    pub fn keep_mapped(&mut self, seq: SeqId, blocks: usize) {
        let Some(t) = self.tables.get_mut(&seq) else {
            return;
        };
        if blocks >= t.blocks.len() {
            return;
        }
        let dropped: Vec<u32> = t.blocks.drain(blocks..).collect();
        t.len = t.len.min(blocks * KV_BLOCK_TOKENS);
        t.hashed = t.hashed.min(blocks);
        if t.blocks.is_empty() {
            self.tables.remove(&seq);
        }
        for b in dropped.into_iter().rev() {
            self.unhold(b);
        }
    }

    /// Registers blocks `first..` of `seq` under `hashes` (one each, in
    /// order), those that are full: later sequences with the same prefix
    /// may map them. Blocks already registered are skipped; a block whose
    /// hash another block has (the same prefix computed twice at once)
    /// stays unregistered. Returns the sequence's registered blocks.
    pub fn register(&mut self, seq: SeqId, first: usize, hashes: &[BlockHash]) -> usize {
        let Some(t) = self.tables.get_mut(&seq) else {
            return 0;
        };
        let full = t.len / KV_BLOCK_TOKENS;
        let mut i = t.hashed.max(first);
        while i < full.min(t.blocks.len()) && i - first < hashes.len() {
            // only in order: block i's hash is the chain up to it
            if i != t.hashed {
                break;
            }
            let h = hashes[i - first];
            let b = t.blocks[i];
            if self.hash_of[b as usize].is_none() && !self.index.contains_key(&h) {
                self.index.insert(h, b);
                self.hash_of[b as usize] = Some(h);
            }
            t.hashed = i + 1;
            i += 1;
        }
        t.hashed
    }

    /// Leading blocks of `seq` registered in the prefix cache.
    pub fn registered(&self, seq: SeqId) -> usize {
        self.tables.get(&seq).map_or(0, |t| t.hashed)
    }

    /// How many sequences hold block `b`.
    pub fn holders(&self, b: u32) -> u32 {
        self.refs.get(b as usize).copied().unwrap_or(0)
    }

    /// Drops every cached block no sequence holds (they go back to the pool).
    pub fn clear_cache(&mut self) {
        while let Some((_, b)) = self.idle.pop_first() {
            if let Some(h) = self.hash_of[b as usize].take() {
                self.index.remove(&h);
            }
            self.free.push(b);
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
        let b = off / (KV_BLOCK_TOKENS * self.kv_dim.max(1));
        if self.refs[b] > 1 || self.hash_of[b].is_some() {
            // another sequence maps it, or a later one may: never rewritten
            return Err(KernelError::BadInput(format!(
                "position {pos} of sequence {seq} lies in a block the prefix cache shares"
            )));
        }
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

    /// Sequence 1 wrote 40 positions (3 blocks), registered its 2 full
    /// blocks under hashes 10 and 11, and ended.
    fn cached_two() -> KvCache {
        let mut kv = KvCache::with_blocks(1, 2, 4);
        kv.reserve(1, 40).unwrap();
        kv.set_len(1, 40);
        assert_eq!(kv.register(1, 0, &[10, 11]), 2);
        kv.release(1);
        kv
    }

    #[test]
    fn an_ended_sequences_registered_blocks_are_mapped_by_the_next_with_that_prefix() {
        let mut kv = cached_two();
        assert_eq!(kv.map_prefix(2, &[10, 11, 12], usize::MAX), 2);
        assert_eq!(kv.seq_len(2), 2 * KV_BLOCK_TOKENS);
        assert_eq!(kv.blocks(2).unwrap(), &[0, 1]);
    }

    #[test]
    fn mapping_stops_at_the_first_block_the_cache_lacks() {
        let mut kv = cached_two();
        assert_eq!(kv.map_prefix(2, &[10, 99, 11], usize::MAX), 1);
        assert_eq!(kv.map_prefix(3, &[99, 10], usize::MAX), 0);
        assert!(!kv.contains(3));
    }

    #[test]
    fn an_unfinished_block_is_never_registered() {
        let mut kv = KvCache::with_blocks(1, 2, 4);
        kv.reserve(1, 40).unwrap();
        kv.set_len(1, 40);
        assert_eq!(kv.register(1, 0, &[10, 11, 12]), 2, "block 2 holds 8 of 16");
        kv.release(1);
        assert_eq!(kv.cached_blocks(), 2);
    }

    #[test]
    fn cached_blocks_count_as_free_and_are_evicted_oldest_first_only_when_needed() {
        let mut kv = cached_two();
        assert_eq!(kv.free_blocks(), 4);
        kv.reserve(5, 32).unwrap(); // the 2 free blocks
        assert_eq!(kv.evictions(), 0);
        assert_eq!(kv.cached_blocks(), 2);
        kv.reserve(6, 16).unwrap(); // one cached block must go: the last one
        assert_eq!(kv.evictions(), 1);
        assert_eq!(kv.cached_prefix(&[10, 11]), 1);
    }

    #[test]
    fn a_block_two_sequences_hold_waits_for_both_to_end() {
        let mut kv = cached_two();
        kv.map_prefix(2, &[10, 11], usize::MAX);
        kv.map_prefix(3, &[10], usize::MAX);
        assert_eq!(kv.holders(0), 2);
        kv.release(2);
        assert_eq!(kv.holders(0), 1);
        assert_eq!(kv.free_blocks(), 3, "block 0 is still held");
        kv.release(3);
        assert_eq!(kv.free_blocks(), 4);
    }

    #[test]
    fn a_held_cached_block_is_never_evicted() {
        let mut kv = cached_two();
        kv.map_prefix(2, &[10, 11], usize::MAX);
        kv.reserve(5, 32).unwrap();
        let e = kv.reserve(6, 1).unwrap_err();
        assert!(matches!(e, KernelError::KvExhausted { free: 0, .. }), "{e}");
        assert_eq!(kv.cached_prefix(&[10, 11]), 2);
    }

    #[test]
    fn keeping_fewer_mapped_blocks_gives_the_rest_back_to_the_cache() {
        let mut kv = cached_two();
        kv.map_prefix(2, &[10, 11], usize::MAX);
        kv.keep_mapped(2, 1);
        assert_eq!(kv.seq_len(2), KV_BLOCK_TOKENS);
        assert_eq!(kv.holders(1), 0);
        assert_eq!(kv.cached_prefix(&[10, 11]), 2);
    }

    #[test]
    fn a_prefix_computed_twice_at_once_keeps_one_copy_cached() {
        let mut kv = KvCache::with_blocks(1, 2, 4);
        for seq in [1, 2] {
            kv.reserve(seq, 16).unwrap();
            kv.set_len(seq, 16);
            kv.register(seq, 0, &[10]);
        }
        kv.release(1);
        kv.release(2);
        assert_eq!(kv.cached_blocks(), 1);
        assert_eq!(kv.free_blocks(), 4);
    }

    #[test]
    fn mapping_respects_its_limit() {
        let mut kv = cached_two();
        assert_eq!(kv.map_prefix(2, &[10, 11], 1), 1);
    }
}
