//! The API's Prometheus metrics, in the node's one registry.
//!
//! The `model` label only ever names a model this node serves: a client's
//! `model` string is its own, so any other name counts under
//! [`weft_metrics::OTHER`] and cannot grow the label set.

use std::collections::BTreeMap;
use std::sync::Mutex;

use weft_metrics::{
    counter, counter_vec, histogram, unregistered_gauge, unregistered_gauge_vec, Histogram,
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry,
};

/// Bucket bounds (seconds) for time-to-first-token.
const TTFT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Bucket bounds (seconds) for the gap between tokens.
const ITL_BUCKETS: &[f64] = &[0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0];

/// Bucket bounds for the router's utility of a routed request (1 is a
/// free, instant answer; below 0, a deadline or budget the router expects
/// to miss).
const UTILITY_BUCKETS: &[f64] = &[-2.0, -1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 0.9, 1.0, 1.2];

/// Where a routed request went, as `weft_route_decisions_total`'s
/// `target` label writes it.
pub const ROUTE_TARGETS: &[&str] = &["local", "edge_peer", "cloud"];

/// Every `reason` `weft_route_refusals_total` counts: the router's
/// refusals, then this node's own (admission, tenants' policy, loops,
/// replicas that all failed).
pub const REFUSAL_REASONS: &[&str] = &[
    "no_replica",
    "no_fresh_replica",
    "deadline_infeasible",
    "would_miss_deadline",
    "over_budget",
    "overloaded",
    "no_kv_room",
    "not_ready",
    "tenant_limit",
    "not_allowed",
    "looped",
    "replicas_failed",
];

/// The criticalities, as the `criticality` label writes them.
const CRITICALITIES: &[&str] = &["critical", "standard", "sheddable"];

/// Most distinct model names counted as demand.
const MAX_WANTED: usize = 256;

/// Gauges read at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Requests waiting for the engine.
    pub queue_depth: usize,
    /// Requests in flight at the node.
    pub inflight: usize,
    /// KV blocks in use.
    pub kv_used: usize,
    /// KV blocks in all.
    pub kv_total: usize,
    /// Worker restarts.
    pub worker_restarts: u64,
    /// 1 when ready.
    pub ready: bool,
    /// Each model's tenants with sequences in its engine.
    pub tenants: Vec<(String, weft_kernels::TenantUsage)>,
    /// Each model's worker's sandbox tier, whether it is relaxed, and the
    /// layers it runs without.
    pub sandboxes: Vec<(String, String, bool, Vec<String>)>,
    /// Each model's prefix-cache counters (since its worker started).
    pub cache: Vec<(String, weft_worker::CacheStats)>,
}

/// The gauges [`Gauges`] sets at each scrape, and the restart counter it
/// raises.
#[derive(Clone)]
pub(crate) struct ScrapeGauges {
    restarts: IntCounter,
    queue_depth: IntGauge,
    inflight: IntGauge,
    kv_used: IntGauge,
    kv_total: IntGauge,
    ready: IntGauge,
    sandbox_info: IntGaugeVec,
    sandbox_relaxed: IntGauge,
    sandbox_missing: IntGaugeVec,
    cpu_kernels: IntGaugeVec,
    tenant: [IntGaugeVec; 5],
}

impl ScrapeGauges {
    fn new() -> Self {
        let t = |name, help| unregistered_gauge_vec(name, help, &["model", "tenant"]);
        Self {
            // gathered with the gauges, after they are refreshed
            restarts: IntCounter::new("weft_worker_restarts_total", "Model worker restarts.")
                .expect("a valid name"),
            queue_depth: unregistered_gauge("weft_queue_depth", "Requests waiting for the engine."),
            inflight: unregistered_gauge(
                "weft_inflight_requests",
                "Requests in flight at the node.",
            ),
            kv_used: unregistered_gauge("weft_kv_blocks_used", "KV cache blocks in use."),
            kv_total: unregistered_gauge("weft_kv_blocks_capacity", "KV cache blocks in the pool."),
            ready: unregistered_gauge("weft_ready", "1 when the model worker serves."),
            cpu_kernels: unregistered_gauge_vec(
                "weft_cpu_kernels_info",
                "The instruction path (1) the CPU kernels run on, chosen at start from what the CPU reports (or WEFT_CPU_PATH).",
                &["path"],
            ),
            sandbox_info: unregistered_gauge_vec(
                "weft_sandbox_info",
                "A model worker's sandbox tier (1), and whether it is relaxed.",
                &["model", "tier", "relaxed"],
            ),
            sandbox_relaxed: unregistered_gauge(
                "weft_sandbox_relaxed",
                "1 when a model worker runs without a layer of its tier (sandbox = \"relaxed\").",
            ),
            sandbox_missing: unregistered_gauge_vec(
                "weft_sandbox_missing_layer",
                "A layer a relaxed model worker runs without.",
                &["model", "layer"],
            ),
            tenant: [
                t("weft_tenant_running", "Sequences of a tenant running in the engine."),
                t("weft_tenant_waiting", "Sequences of a tenant waiting for the engine."),
                t("weft_tenant_kv_blocks", "KV cache blocks a tenant's sequences hold."),
                t(
                    "weft_tenant_kv_quota_blocks",
                    "KV cache blocks a tenant may hold (its kv_share).",
                ),
                t(
                    "weft_tenant_preemptions",
                    "Preemptions of a tenant's sequences (always for its own blocks) while it has sequences.",
                ),
            ],
        }
    }

    pub(crate) fn collectors(&self) -> Vec<Box<dyn weft_metrics::Collector>> {
        let mut v: Vec<Box<dyn weft_metrics::Collector>> = vec![
            Box::new(self.restarts.clone()),
            Box::new(self.queue_depth.clone()),
            Box::new(self.inflight.clone()),
            Box::new(self.kv_used.clone()),
            Box::new(self.kv_total.clone()),
            Box::new(self.ready.clone()),
            Box::new(self.sandbox_info.clone()),
            Box::new(self.sandbox_relaxed.clone()),
            Box::new(self.sandbox_missing.clone()),
            Box::new(self.cpu_kernels.clone()),
        ];
        v.extend(
            self.tenant
                .iter()
                .map(|t| Box::new(t.clone()) as Box<dyn weft_metrics::Collector>),
        );
        v
    }

    /// Sets every gauge from `g`; label sets that went away go with it.
    pub(crate) fn set(&self, g: &Gauges) {
        self.queue_depth.set(g.queue_depth as i64);
        self.inflight.set(g.inflight as i64);
        self.kv_used.set(g.kv_used as i64);
        self.kv_total.set(g.kv_total as i64);
        self.ready.set(i64::from(g.ready));
        self.cpu_kernels.reset();
        self.cpu_kernels
            .with_label_values(&[weft_kernels::quant::cpu_path().name()])
            .set(1);
        self.sandbox_info.reset();
        self.sandbox_missing.reset();
        for (model, tier, relaxed, missing) in &g.sandboxes {
            self.sandbox_info
                .with_label_values(&[
                    model.as_str(),
                    tier.as_str(),
                    if *relaxed { "true" } else { "false" },
                ])
                .set(1);
            for layer in missing {
                self.sandbox_missing
                    .with_label_values(&[model.as_str(), layer.as_str()])
                    .set(1);
            }
        }
        self.sandbox_relaxed
            .set(i64::from(g.sandboxes.iter().any(|s| !s.3.is_empty())));
        type Of = fn(&weft_kernels::TenantUsage) -> usize;
        let of: [Of; 5] = [
            |t| t.running,
            |t| t.waiting,
            |t| t.kv_blocks,
            |t| t.kv_quota,
            |t| t.preemptions as usize,
        ];
        for (gauge, of) in self.tenant.iter().zip(of) {
            gauge.reset();
            for (model, t) in &g.tenants {
                gauge
                    .with_label_values(&[model.as_str(), t.tenant.as_str()])
                    .set(of(t) as i64);
            }
        }
    }
}

/// The prefix cache's counters, raised from the workers' own figures.
struct CacheCounters {
    hits: IntCounterVec,
    prompt: IntCounterVec,
    evictions: IntCounterVec,
    blocks: IntGaugeVec,
    /// Each model's figures at the last scrape.
    last: Mutex<BTreeMap<String, weft_worker::CacheStats>>,
}

impl CacheCounters {
    fn new(r: &Registry) -> Self {
        Self {
            hits: counter_vec(
                r,
                "weft_prefix_cache_hits_total",
                "Requests admitted with a cached prefix mapped, by model.",
                &["model"],
            ),
            prompt: counter_vec(
                r,
                "weft_prompt_tokens_total",
                "Prompt tokens, by model and whether they were mapped from the prefix cache (cached) or computed.",
                &["model", "source"],
            ),
            evictions: counter_vec(
                r,
                "weft_prefix_cache_evictions_total",
                "Cached KV blocks evicted to make room, by model.",
                &["model"],
            ),
            blocks: weft_metrics::gauge_vec(
                r,
                "weft_prefix_cache_blocks",
                "KV blocks the prefix cache keeps, by model.",
                &["model"],
            ),
            last: Mutex::default(),
        }
    }

    fn seen(&self, figures: &[(String, weft_worker::CacheStats)]) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        for (model, now) in figures {
            let before = last.get(model).copied().unwrap_or_default();
            // a figure below the last one: the worker restarted from 0
            let delta = |now: u64, before: u64| if now >= before { now - before } else { now };
            self.hits
                .with_label_values(&[model])
                .inc_by(delta(now.hits, before.hits));
            self.prompt
                .with_label_values(&[model.as_str(), "cached"])
                .inc_by(delta(now.cached_tokens, before.cached_tokens));
            self.prompt
                .with_label_values(&[model.as_str(), "computed"])
                .inc_by(delta(now.computed_tokens, before.computed_tokens));
            self.evictions
                .with_label_values(&[model])
                .inc_by(delta(now.evictions, before.evictions));
            self.blocks
                .with_label_values(&[model])
                .set(now.blocks as i64);
            last.insert(model.clone(), *now);
        }
    }
}

/// Counters and histograms of one node's API.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    generated: IntCounter,
    ttft: Histogram,
    itl: Histogram,
    route_decisions: IntCounterVec,
    route_refusals: IntCounterVec,
    route_utility: Histogram,
    deadline_misses: IntCounterVec,
    cache: CacheCounters,
    pub(crate) scrape: ScrapeGauges,
    /// model → requests that named it (served here or not): demand, not a
    /// metric
    wanted: Mutex<BTreeMap<String, u64>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// The API's metrics, registered in `registry` (the gauges read at
    /// scrape time are registered by the state that can read them).
    pub fn new(registry: &Registry) -> Self {
        let m = Self {
            registry: registry.clone(),
            requests: counter_vec(
                registry,
                "weft_requests_total",
                "Requests by model (one this node serves, or \"other\"), HTTP status and criticality.",
                &["model", "status", "criticality"],
            ),
            generated: counter(registry, "weft_generated_tokens_total", "Tokens generated."),
            ttft: histogram(
                registry,
                "weft_time_to_first_token_seconds",
                "Time from request to first token.",
                TTFT_BUCKETS,
            ),
            itl: histogram(
                registry,
                "weft_inter_token_seconds",
                "Time between consecutive tokens of a stream.",
                ITL_BUCKETS,
            ),
            route_decisions: counter_vec(
                registry,
                "weft_route_decisions_total",
                "Requests this node routed (the routing decision, made before admission), by where they went (local, edge_peer, cloud) and criticality.",
                &["target", "criticality"],
            ),
            route_refusals: counter_vec(
                registry,
                "weft_route_refusals_total",
                "Requests refused, by reason and criticality.",
                &["reason", "criticality"],
            ),
            route_utility: histogram(
                registry,
                "weft_route_utility",
                "The router's expected utility of each request it routed (1: instant and free).",
                UTILITY_BUCKETS,
            ),
            deadline_misses: counter_vec(
                registry,
                "weft_deadline_misses_total",
                "Requests cancelled at their deadline before they finished, by criticality.",
                &["criticality"],
            ),
            cache: CacheCounters::new(registry),
            scrape: ScrapeGauges::new(),
            wanted: Mutex::default(),
        };
        // every series of the bounded label sets from the start, at 0: a
        // rate over them reads 0 rather than nothing
        for c in CRITICALITIES {
            for t in ROUTE_TARGETS {
                m.route_decisions.with_label_values(&[t, c]);
            }
            for r in REFUSAL_REASONS {
                m.route_refusals.with_label_values(&[r, c]);
            }
            m.deadline_misses.with_label_values(&[c]);
        }
        m
    }

    /// Counts a request routed to `target` (one of [`ROUTE_TARGETS`]),
    /// with the router's expected `utility` where a router chose.
    pub fn routed(&self, target: &'static str, criticality: &str, utility: Option<f64>) {
        debug_assert!(ROUTE_TARGETS.contains(&target), "{target}");
        self.route_decisions
            .with_label_values(&[target, criticality])
            .inc();
        if let Some(u) = utility.filter(|u| u.is_finite()) {
            self.route_utility.observe(u);
        }
    }

    /// Counts a request refused for `reason` (one of
    /// [`REFUSAL_REASONS`]).
    pub fn refused(&self, reason: &'static str, criticality: &str) {
        debug_assert!(REFUSAL_REASONS.contains(&reason), "{reason}");
        self.route_refusals
            .with_label_values(&[reason, criticality])
            .inc();
    }

    /// Brings the prefix-cache counters up to each model's worker's figures
    /// (a worker's own count restarts with it; these never fall).
    pub(crate) fn cache_seen(&self, figures: &[(String, weft_worker::CacheStats)]) {
        self.cache.seen(figures);
    }

    /// Counts a request cancelled at its deadline.
    pub(crate) fn deadline_missed(&self, criticality: &str) {
        self.deadline_misses.with_label_values(&[criticality]).inc();
    }

    /// The registry these metrics are in (the node's one).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts a finished (or refused) request for `model`, which must be
    /// a model this node serves or [`weft_metrics::OTHER`].
    pub(crate) fn request(&self, model: &str, status: u16, criticality: &str) {
        self.requests
            .with_label_values(&[model, &status.to_string(), criticality])
            .inc();
    }

    /// Records a time to first token.
    pub fn ttft(&self, secs: f64) {
        self.ttft.observe(secs);
    }

    /// Records a gap between two tokens.
    pub fn inter_token(&self, secs: f64) {
        self.itl.observe(secs);
    }

    /// Counts generated tokens.
    pub fn tokens(&self, n: u64) {
        self.generated.inc_by(n);
    }

    /// Raises the restart counter to `total` (restarts only grow; a model
    /// dropped takes its count with it, which the counter keeps).
    pub(crate) fn restarts_seen(&self, total: u64) {
        let now = self.scrape.restarts.get();
        if total > now {
            self.scrape.restarts.inc_by(total - now);
        }
    }

    /// Counts a request naming `model`, held here or not (demand).
    pub fn wanted(&self, model: &str) {
        let mut m = self.wanted.lock().unwrap_or_else(|e| e.into_inner());
        // names come from clients: keep the map bounded
        if m.len() < MAX_WANTED || m.contains_key(model) {
            *m.entry(model.into()).or_default() += 1;
        }
    }

    /// Requests that named each model so far, held here or not.
    pub fn wanted_by_model(&self) -> BTreeMap<String, u64> {
        self.wanted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Tokens generated so far.
    pub fn generated_tokens(&self) -> u64 {
        self.generated.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(tenant: &str, running: usize, kv_blocks: usize) -> weft_kernels::TenantUsage {
        weft_kernels::TenantUsage {
            tenant: tenant.into(),
            running,
            waiting: 2,
            kv_blocks,
            kv_quota: 12,
            served_tokens: 40,
            preemptions: 3,
        }
    }

    fn rendered(g: Gauges) -> String {
        let r = Registry::new();
        let m = Metrics::new(&r);
        let scrape = m.scrape.clone();
        weft_metrics::OnScrape::register(&r, m.scrape.collectors(), move || scrape.set(&g));
        weft_metrics::encode(&r)
    }

    fn with_tenants() -> String {
        rendered(Gauges {
            tenants: vec![
                ("gemma".into(), usage("acme", 1, 7)),
                ("gemma".into(), usage("say \"hi\"", 0, 0)),
            ],
            ..Gauges::default()
        })
    }

    #[test]
    fn each_tenant_gets_its_gauges() {
        let text = with_tenants();
        assert!(text.contains("weft_tenant_running{model=\"gemma\",tenant=\"acme\"} 1"));
        assert!(text.contains("weft_tenant_kv_blocks{model=\"gemma\",tenant=\"acme\"} 7"));
        assert!(text.contains("weft_tenant_kv_quota_blocks{model=\"gemma\",tenant=\"acme\"} 12"));
        assert!(text.contains("weft_tenant_preemptions{model=\"gemma\",tenant=\"acme\"} 3"));
        assert_eq!(text.matches("# TYPE weft_tenant_running gauge").count(), 1);
    }

    #[test]
    fn tenant_labels_are_escaped() {
        assert!(with_tenants()
            .contains("weft_tenant_waiting{model=\"gemma\",tenant=\"say \\\"hi\\\"\"} 2"));
    }

    #[test]
    fn without_tenants_there_are_no_tenant_samples() {
        assert!(!rendered(Gauges::default()).contains("weft_tenant_running{"));
    }

    #[test]
    fn the_restart_counter_follows_the_workers_total_and_never_falls() {
        let m = Metrics::new(&Registry::new());
        m.restarts_seen(3);
        m.restarts_seen(1);
        assert_eq!(m.scrape.restarts.get(), 3);
    }
}
