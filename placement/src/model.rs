//! What is served and what is asked for: models (their size per layer, compute
//! and KV per token) and demand (requests per second per site and model).

use serde::{Deserialize, Serialize};

pub use crate::id::ModelId;
use crate::id::SiteId;

/// Bytes of text per token on the wire (prompt in, completion out).
pub const WIRE_BYTES_PER_TOKEN: f64 = 4.0;

/// A model as placement sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Its name (for records).
    pub name: String,
    /// Transformer layers.
    pub layers: u32,
    /// Weight bytes of one layer.
    pub bytes_per_layer: u64,
    /// Bytes every shard holds besides its layers (embeddings, output head).
    pub shared_bytes: u64,
    /// Compute of one token relative to a node's `tokens_per_s`.
    pub compute_per_token: f64,
    /// KV-cache bytes of one token of context.
    pub kv_bytes_per_token: u64,
    /// Activation bytes passed between shards per token.
    pub hidden_bytes_per_token: u64,
    /// Replicas kept placed whatever the demand (0: as demand asks). Set
    /// from a WeftModel's replicas (its scale subresource: KEDA or an HPA
    /// moves it); demand may add more.
    #[serde(default)]
    pub min_replicas: u32,
    /// The kind of site its floor replicas go to first (none: edge first).
    #[serde(default)]
    pub prefer: Option<crate::topology::SiteKind>,
    /// The only sites its floor replicas may go to (empty: any).
    #[serde(default)]
    pub sites: Vec<SiteId>,
}

impl ModelSpec {
    /// Bytes a node needs to hold `layers` layers.
    pub fn shard_bytes(&self, layers: u32) -> u64 {
        self.shared_bytes + self.bytes_per_layer * layers as u64
    }

    /// Bytes of a whole replica.
    pub fn total_bytes(&self) -> u64 {
        self.shard_bytes(self.layers)
    }

    /// KV-cache bytes one layer needs for `kv_tokens` tokens of context.
    pub fn kv_bytes_per_layer(&self, kv_tokens: u64) -> u64 {
        self.kv_bytes_per_token * kv_tokens / u64::from(self.layers.max(1))
    }

    /// Memory a node needs to run `layers` layers with room for `kv_tokens`
    /// tokens of context: weights plus those layers' share of the KV cache.
    pub fn shard_memory(&self, layers: u32, kv_tokens: u64) -> u64 {
        self.shard_bytes(layers) + self.kv_bytes_per_layer(kv_tokens) * u64::from(layers)
    }
}

/// Steady demand for one model from agents at one site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Demand {
    /// Where the agents are.
    pub site: SiteId,
    /// What they call.
    pub model: ModelId,
    /// Requests per second.
    pub requests_per_s: f64,
    /// Mean prompt tokens.
    pub prompt_tokens: f64,
    /// Mean completion tokens.
    pub output_tokens: f64,
    /// Deadline of a typical request (ms), if any.
    pub deadline_ms: Option<f64>,
}

impl Demand {
    /// Bytes per second this demand puts on the wire when served elsewhere.
    pub fn wire_bytes_per_s(&self) -> f64 {
        self.requests_per_s * (self.prompt_tokens + self.output_tokens) * WIRE_BYTES_PER_TOKEN
    }

    /// Tokens per second of unit compute it needs; prompt tokens cost
    /// `prefill_share` of a decoded token (prefill runs as one batch).
    pub fn work_tokens_per_s(&self, model: &ModelSpec, prefill_share: f64) -> f64 {
        self.requests_per_s
            * (self.output_tokens + self.prompt_tokens * prefill_share)
            * model.compute_per_token
    }
}
