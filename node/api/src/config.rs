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

    /// These keys and `more`'s (a key in both takes `more`'s tenant).
    pub fn with(&self, more: &KeyMap) -> Self {
        let mut digests = self.digests.clone();
        for (k, t) in &more.0 {
            let d: [u8; 32] = Sha256::digest(k.as_bytes()).into();
            digests.retain(|(x, _)| x != &d);
            digests.push((d, t.clone()));
        }
        Self { digests }
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
    /// Most requests per minute (none: unlimited).
    pub requests_per_minute: Option<u64>,
    /// The models it may ask for (none: every model).
    pub models: Option<Vec<String>>,
    /// The criticalities it may ask for (`critical`, `standard`,
    /// `sheddable`; none: every one).
    pub criticalities: Option<Vec<String>>,
}

/// Who may call and what each tenant may use: the part of the API's
/// settings that can change while the node runs (a tenants file).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// API keys and the tenant each belongs to; empty: no authentication
    /// (unless `require_keys`).
    pub api_keys: ApiKeys,
    /// Limits per tenant name; `default` applies to tenants not listed.
    pub tenants: BTreeMap<String, TenantLimits>,
    /// Whether every request needs a key even while there are none (a
    /// node whose keys come from a tenants file refuses everyone until the
    /// file gives some, rather than serving without authentication).
    pub require_keys: bool,
}

impl Policy {
    /// The limits of a tenant.
    pub fn limits(&self, tenant: &str) -> TenantLimits {
        self.tenants
            .get(tenant)
            .or_else(|| self.tenants.get("default"))
            .cloned()
            .unwrap_or_default()
    }
}

/// A tenants file (`tenants_file` of a node's config, written by the
/// Kubernetes operator from AgentPolicies): `[api_keys]` and `[tenants.*]`
/// as in the node's config.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantsFile {
    /// API keys and their tenants.
    #[serde(default)]
    pub api_keys: KeyMap,
    /// Limits per tenant.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantLimits>,
}

impl TenantsFile {
    /// Parses and checks one.
    pub fn parse(text: &str) -> Result<Self, String> {
        let f: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        for (key, tenant) in &f.api_keys.0 {
            if key.len() < 8 || tenant.is_empty() {
                return Err("api_keys: keys need at least 8 characters and a tenant name".into());
            }
        }
        for (name, l) in &f.tenants {
            if let Some(v) = l.kv_share.filter(|v| !(*v > 0.0 && *v <= 1.0)) {
                return Err(format!(
                    "tenant {name:?} has kv_share {v}; a share is above 0 and at most 1"
                ));
            }
            for c in l.criticalities.iter().flatten() {
                if !matches!(c.as_str(), "critical" | "standard" | "sheddable") {
                    return Err(format!(
                        "tenant {name:?}: {c:?} is not critical, standard or sheddable"
                    ));
                }
            }
        }
        Ok(f)
    }

    /// The policy it gives.
    pub fn policy(&self) -> Policy {
        Policy {
            api_keys: ApiKeys::new(&self.api_keys),
            tenants: self.tenants.clone(),
            require_keys: true,
        }
    }
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
    /// Prompt prefixes (texts, such as a system prompt every tenant sends)
    /// whose cached KV blocks every tenant may share; any other cached
    /// block serves only the tenant that computed it.
    pub shared_prefixes: Vec<String>,
    /// This node's name, as answers (`x-weft-served-by`) and its intent
    /// log name it.
    pub node_name: String,
}

impl ApiConfig {
    /// The limits of a tenant.
    pub fn limits(&self, tenant: &str) -> TenantLimits {
        self.policy().limits(tenant)
    }

    /// The keys and limits it starts with.
    pub fn policy(&self) -> Policy {
        Policy {
            api_keys: self.api_keys.clone(),
            tenants: self.tenants.clone(),
            require_keys: false,
        }
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
