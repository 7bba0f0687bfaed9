//! What the prefix cache keys blocks by: a hash chain over token ids.
//!
//! Block `i` of a sequence is named by the SHA-256 (its first 8 bytes) of
//! block `i - 1`'s name, a scope salt and the block's 16 token ids; block
//! 0 chains from a seed of the model's shape. Equal names therefore mean
//! equal token ids from position 0 to the block's end, in the same model
//! and scope. A KV cache only ever holds one model's layer range, so the
//! range needs no salt of its own; a chain's nodes register their blocks
//! under the head's names, so their caches answer for the same prefixes.
//!
//! **Scope.** A block is private to its tenant unless all its tokens lie
//! in the request's shared prefix (a prompt every tenant sends, marked
//! shared by the node's configuration): a private block's salt is its
//! tenant's, so one tenant can never map, and so never time, what another
//! sent. The shared salt is 0; a tenant's salt is never 0.

use sha2::{Digest, Sha256};

use crate::gguf::ModelConfig;
use crate::kv::{BlockHash, KV_BLOCK_TOKENS};
use crate::tokenizer::TokenId;

/// Who may map a sequence's cached blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheScope {
    /// Leading prompt tokens any tenant may share (0: none).
    pub shared_tokens: usize,
}

/// The chain's seed for a model of shape `cfg`.
pub fn model_seed(cfg: &ModelConfig) -> u64 {
    first_u64(&Sha256::digest(
        format!("weft-kv-prefix {cfg:?}").as_bytes(),
    ))
}

/// The salt of `tenant`'s private blocks (never 0, the shared salt).
pub fn tenant_salt(tenant: &str) -> u64 {
    first_u64(&Sha256::digest(
        format!("weft-kv-tenant {tenant}").as_bytes(),
    ))
    .max(1)
}

fn first_u64(d: &[u8]) -> u64 {
    u64::from_le_bytes(d[..8].try_into().expect("a digest has 8 bytes"))
}

/// Extends `hashes` (the names of a sequence's first blocks) to `blocks`
/// blocks of `tokens` (which must hold that many full blocks).
pub fn extend(
    hashes: &mut Vec<BlockHash>,
    seed: u64,
    tokens: &[TokenId],
    blocks: usize,
    shared_tokens: usize,
    tenant_salt: u64,
) {
    while hashes.len() < blocks {
        let i = hashes.len();
        let prev = hashes.last().copied().unwrap_or(seed);
        let salt = if (i + 1) * KV_BLOCK_TOKENS <= shared_tokens {
            0
        } else {
            tenant_salt
        };
        let mut h = Sha256::new();
        h.update(prev.to_le_bytes());
        h.update(salt.to_le_bytes());
        for t in &tokens[i * KV_BLOCK_TOKENS..(i + 1) * KV_BLOCK_TOKENS] {
            h.update(t.to_le_bytes());
        }
        hashes.push(first_u64(&h.finalize()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(tokens: &[u32], shared: usize, tenant: &str) -> Vec<BlockHash> {
        let mut h = Vec::new();
        extend(
            &mut h,
            7,
            tokens,
            tokens.len() / KV_BLOCK_TOKENS,
            shared,
            tenant_salt(tenant),
        );
        h
    }

    #[test]
    fn equal_prefixes_have_equal_names_and_a_changed_token_changes_every_later_one() {
        let a: Vec<u32> = (0..48).collect();
        let mut b = a.clone();
        b[20] = 999;
        let (ha, hb) = (names(&a, 0, "t"), names(&b, 0, "t"));
        assert_eq!(ha[0], hb[0]);
        assert_ne!(ha[1], hb[1]);
        assert_ne!(
            ha[2], hb[2],
            "block 2's tokens are equal but its prefix is not"
        );
    }

    #[test]
    fn another_tenants_private_blocks_have_other_names() {
        let a: Vec<u32> = (0..32).collect();
        assert_ne!(names(&a, 0, "alpha"), names(&a, 0, "beta"));
    }

    #[test]
    fn blocks_inside_the_shared_prefix_have_one_name_for_every_tenant() {
        let a: Vec<u32> = (0..48).collect();
        let (x, y) = (names(&a, 40, "alpha"), names(&a, 40, "beta"));
        assert_eq!(
            x[..2],
            y[..2],
            "blocks 0 and 1 lie within the 40 shared tokens"
        );
        assert_ne!(x[2], y[2], "block 2 goes past them");
    }
}
