//! Who a request is from and what it may use: API keys map to tenants;
//! each tenant has a concurrency limit and a tokens-per-minute window; the
//! node sheds by criticality under overload.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, StatusCode};
use weft_placement::{AdmissionPolicy, Criticality, NodeLoad};

use crate::config::{ApiConfig, Policy};
use crate::error::{forbidden, not_ready, too_many, ApiError};
use crate::served::Served;

/// Length of the tokens-per-minute window.
const TPM_WINDOW: Duration = Duration::from_secs(60);

/// The tenant of a request without an API key, where none are configured.
pub const ANONYMOUS: &str = "anonymous";

/// The tenant whose API key `headers` carry (every request is
/// [`ANONYMOUS`] when no keys are configured).
pub fn authenticate(cfg: &Policy, headers: &HeaderMap) -> Result<String, ApiError> {
    if cfg.api_keys.is_empty() && !cfg.require_keys {
        return Ok(ANONYMOUS.into());
    }
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match key.and_then(|k| cfg.api_keys.tenant(k)) {
        Some(t) => Ok(t.to_string()),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            if key.is_some() {
                "Incorrect API key provided."
            } else {
                "Missing API key: send Authorization: Bearer <key>."
            },
        )
        .code("invalid_api_key")),
    }
}

#[derive(Debug, Default)]
struct TenantUse {
    concurrent: usize,
    window: VecDeque<(Instant, u64)>,
    requests: VecDeque<Instant>,
}

/// Every tenant's requests in flight and tokens this minute.
#[derive(Debug, Default)]
pub struct Tenants {
    used: Mutex<HashMap<String, TenantUse>>,
}

/// What [`Tenants::admit`] checks a request against.
pub(crate) struct Admission<'a> {
    /// The model it asks for.
    pub model: &'a Arc<Served>,
    /// Its tenant.
    pub tenant: &'a str,
    /// Its criticality.
    pub criticality: Criticality,
    /// Its prompt's length in tokens.
    pub prompt_tokens: usize,
}

impl Tenants {
    /// Tenant limits and overload shedding; on success the caller holds a
    /// slot until the ticket drops.
    pub(crate) fn admit(
        self: &Arc<Self>,
        cfg: &ApiConfig,
        policy: &Policy,
        a: Admission<'_>,
    ) -> Result<Ticket, ApiError> {
        let limits = policy.limits(a.tenant);
        if let Some(allowed) = &limits.models {
            if !allowed.iter().any(|m| m == &a.model.model_id) {
                return Err(forbidden(format!(
                    "tenant {} may not use model {:?}",
                    a.tenant, a.model.model_id
                )));
            }
        }
        if let Some(allowed) = &limits.criticalities {
            let c = a.criticality.as_str();
            if !allowed.iter().any(|x| x == c) {
                return Err(forbidden(format!(
                    "tenant {} may not send {c} requests",
                    a.tenant
                )));
            }
        }
        let runner = &a.model.runner;
        if !runner.is_ready() {
            return Err(not_ready());
        }
        // requests handed to the worker but not yet seen running count as waiting
        let stats = runner.stats();
        let waiting = stats
            .waiting
            .max(runner.inflight().saturating_sub(stats.running));
        AdmissionPolicy {
            max_queue: cfg.max_queue,
        }
        .admit(a.criticality, NodeLoad { waiting })
        .map_err(|r| too_many(r.to_string()).refusal_for("overloaded"))?;
        let mut tenants = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let u = tenants.entry(a.tenant.to_string()).or_default();
        if let Some(rpm) = limits.requests_per_minute {
            let now = Instant::now();
            while u
                .requests
                .front()
                .is_some_and(|t| now.duration_since(*t) > TPM_WINDOW)
            {
                u.requests.pop_front();
            }
            if u.requests.len() as u64 >= rpm {
                return Err(too_many(format!(
                    "tenant {} sent {rpm} requests this minute, its limit",
                    a.tenant
                ))
                .refusal_for("tenant_limit"));
            }
        }
        if let Some(max) = limits.max_concurrent {
            if u.concurrent >= max {
                return Err(too_many(format!(
                    "tenant {} already has {max} requests in flight",
                    a.tenant
                ))
                .refusal_for("tenant_limit"));
            }
        }
        if let Some(tpm) = limits.tokens_per_minute {
            let now = Instant::now();
            while u
                .window
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > TPM_WINDOW)
            {
                u.window.pop_front();
            }
            let used: u64 = u.window.iter().map(|(_, n)| n).sum();
            if used + a.prompt_tokens as u64 > tpm {
                return Err(too_many(format!(
                    "tenant {} used {used} of {tpm} tokens this minute",
                    a.tenant
                ))
                .refusal_for("tenant_limit"));
            }
            u.window.push_back((now, a.prompt_tokens as u64));
        }
        u.concurrent += 1;
        if limits.requests_per_minute.is_some() {
            u.requests.push_back(Instant::now());
        }
        Ok(Ticket {
            tenants: self.clone(),
            model: a.model.clone(),
            tenant: a.tenant.to_string(),
            id: None,
            finished: false,
        })
    }

    /// Counts `n` generated tokens against `tenant`'s window.
    pub(crate) fn record_tokens(&self, tenant: &str, n: u64) {
        if n == 0 {
            return;
        }
        let mut t = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(u) = t.get_mut(tenant) {
            u.window.push_back((Instant::now(), n));
        }
    }
}

/// Holds a tenant's concurrency slot and cancels an unfinished request when
/// dropped (the client went away, or the handler ended early).
pub(crate) struct Ticket {
    tenants: Arc<Tenants>,
    model: Arc<Served>,
    tenant: String,
    /// The runner's id of the request, once submitted.
    pub id: Option<u64>,
    /// Set when the request ended on its own (nothing to cancel).
    pub finished: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let (Some(id), false) = (self.id, self.finished) {
            self.model.runner.cancel(id);
        }
        let mut t = self.tenants.used.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(u) = t.get_mut(&self.tenant) {
            u.concurrent = u.concurrent.saturating_sub(1);
        }
    }
}
