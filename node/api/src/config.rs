//! The API's settings: what the node's config gives the HTTP surface.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Per-tenant limits.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantLimits {
    /// Most concurrent requests (none: unlimited).
    pub max_concurrent: Option<usize>,
    /// Most prompt + completion tokens per minute (none: unlimited).
    pub tokens_per_minute: Option<u64>,
    /// Share of the worker's KV cache (above 0, at most 1) its sequences
    /// may hold; at its share the tenant's sequences wait for its own
    /// blocks and never evict another tenant's (none: the whole cache).
    pub kv_share: Option<f64>,
}

/// What the API enforces and how its listener behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiConfig {
    /// API keys and the tenant each belongs to; empty: no authentication.
    pub api_keys: BTreeMap<String, String>,
    /// Limits per tenant name; `default` applies to tenants not listed.
    pub tenants: BTreeMap<String, TenantLimits>,
    /// Longest sequence (prompt + output).
    pub max_context: usize,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
    /// `max_tokens` when a request names none.
    pub default_max_tokens: usize,
    /// Waiting requests beyond which standard requests are refused
    /// (sheddable at half of it).
    pub max_queue: usize,
    /// Cap on open connections.
    pub max_connections: usize,
    /// Seconds to read a request's headers and body.
    pub read_timeout_s: u64,
    /// Seconds in-flight requests get to finish on shutdown.
    pub grace_s: u64,
}

impl ApiConfig {
    /// The limits of a tenant.
    pub fn limits(&self, tenant: &str) -> TenantLimits {
        self.tenants
            .get(tenant)
            .or_else(|| self.tenants.get("default"))
            .cloned()
            .unwrap_or_default()
    }
}
