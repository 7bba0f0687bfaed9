//! The API's settings: what the node's config gives the HTTP surface.

use std::collections::BTreeMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// API keys and the tenant each belongs to, as a config file lists them.
/// Its `Debug` never shows a key.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct KeyMap(pub BTreeMap<String, String>);

impl std::fmt::Debug for KeyMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyMap({} keys, redacted)", self.0.len())
    }
}

/// API keys, kept as their SHA-256 digests: a presented key is compared
/// with every one in constant time, and no key can be printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ApiKeys {
    digests: Vec<([u8; 32], String)>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys, redacted)", self.digests.len())
    }
}

impl ApiKeys {
    /// The keys of `map`.
    pub fn new(map: &KeyMap) -> Self {
        Self {
            digests: map
                .0
                .iter()
                .map(|(k, t)| (Sha256::digest(k.as_bytes()).into(), t.clone()))
                .collect(),
        }
    }

    /// Whether there are none (no authentication).
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// The tenant of `presented`, if it is a key: every key is compared,
    /// each in constant time, whatever matches.
    pub fn tenant(&self, presented: &str) -> Option<&str> {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for (k, tenant) in &self.digests {
            if bool::from(k.ct_eq(&d)) {
                found = Some(tenant.as_str());
            }
        }
        found
    }
}

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
    /// Most agent sandboxes it may have at once (none: unlimited).
    pub max_sandboxes: Option<usize>,
    /// Most memory (MiB) its sandboxes may have together (none:
    /// unlimited).
    pub sandbox_memory_mb: Option<u64>,
}

/// What the API enforces and how its listener behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiConfig {
    /// API keys and the tenant each belongs to; empty: no authentication.
    pub api_keys: ApiKeys,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> KeyMap {
        KeyMap(BTreeMap::from([
            ("sk-alpha-0001".to_string(), "alpha".to_string()),
            ("sk-beta-00002".to_string(), "beta".to_string()),
        ]))
    }

    #[test]
    fn a_key_finds_its_tenant() {
        let k = ApiKeys::new(&keys());
        assert_eq!(k.tenant("sk-alpha-0001"), Some("alpha"));
        assert_eq!(k.tenant("sk-beta-00002"), Some("beta"));
    }

    #[test]
    fn a_wrong_key_or_a_prefix_of_one_finds_no_tenant() {
        let k = ApiKeys::new(&keys());
        for wrong in ["sk-alpha-0002", "sk-alpha-000", "sk-alpha-00011", ""] {
            assert_eq!(k.tenant(wrong), None, "{wrong:?}");
        }
    }

    #[test]
    fn no_key_shows_in_debug_output() {
        let printed = format!("{:?} {:?}", keys(), ApiKeys::new(&keys()));
        assert!(
            !printed.contains("sk-alpha") && !printed.contains("sk-beta"),
            "{printed}"
        );
    }
}
