//! The API's Prometheus metrics, rendered in the text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use weft_metrics::{label, Histogram};

/// Bucket bounds (seconds) for time-to-first-token.
const TTFT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Bucket bounds (seconds) for the gap between tokens.
const ITL_BUCKETS: &[f64] = &[0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0];

#[derive(Debug, Default)]
struct Inner {
    /// (model, status, criticality) → count
    requests: BTreeMap<(String, u16, String), u64>,
    /// model → requests that named it (served here or not)
    wanted: BTreeMap<String, u64>,
    generated_tokens: u64,
    ttft: Histogram,
    itl: Histogram,
}

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
}

/// Counters and histograms of one node.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Counts a finished (or refused) request.
    pub fn request(&self, model: &str, status: u16, criticality: &str) {
        self.with(|m| {
            *m.requests
                .entry((model.into(), status, criticality.into()))
                .or_default() += 1
        });
    }

    /// Records a time to first token.
    pub fn ttft(&self, secs: f64) {
        self.with(|m| m.ttft.observe(TTFT_BUCKETS, secs));
    }

    /// Records a gap between two tokens.
    pub fn inter_token(&self, secs: f64) {
        self.with(|m| m.itl.observe(ITL_BUCKETS, secs));
    }

    /// Counts generated tokens.
    pub fn tokens(&self, n: u64) {
        self.with(|m| m.generated_tokens += n);
    }

    /// Counts a request naming `model`, held here or not (demand).
    pub fn wanted(&self, model: &str) {
        self.with(|m| {
            // names come from clients: keep the map bounded
            if m.wanted.len() < MAX_WANTED || m.wanted.contains_key(model) {
                *m.wanted.entry(model.into()).or_default() += 1;
            }
        });
    }

    /// Requests that named each model so far, held here or not.
    pub fn wanted_by_model(&self) -> BTreeMap<String, u64> {
        self.with(|m| m.wanted.clone())
    }

    /// Tokens generated so far.
    pub fn generated_tokens(&self) -> u64 {
        self.with(|m| m.generated_tokens)
    }

    /// The exposition text.
    pub fn render(&self, g: Gauges) -> String {
        let mut out = String::new();
        self.with(|m| {
            out.push_str("# HELP weft_requests_total Requests by model, HTTP status and criticality.\n# TYPE weft_requests_total counter\n");
            for ((model, status, crit), n) in &m.requests {
                let _ = writeln!(out, "weft_requests_total{{model=\"{model}\",status=\"{status}\",criticality=\"{crit}\"}} {n}");
            }
            out.push_str("# HELP weft_generated_tokens_total Tokens generated.\n# TYPE weft_generated_tokens_total counter\n");
            let _ = writeln!(out, "weft_generated_tokens_total {}", m.generated_tokens);
            out.push_str("# HELP weft_time_to_first_token_seconds Time from request to first token.\n# TYPE weft_time_to_first_token_seconds histogram\n");
            m.ttft.render(&mut out, "weft_time_to_first_token_seconds", TTFT_BUCKETS);
            out.push_str("# HELP weft_inter_token_seconds Time between consecutive tokens of a stream.\n# TYPE weft_inter_token_seconds histogram\n");
            m.itl.render(&mut out, "weft_inter_token_seconds", ITL_BUCKETS);
        });
        let gauges = [
            (
                "weft_queue_depth",
                "Requests waiting for the engine.",
                g.queue_depth as f64,
            ),
            (
                "weft_inflight_requests",
                "Requests in flight at the node.",
                g.inflight as f64,
            ),
            (
                "weft_kv_blocks_used",
                "KV cache blocks in use.",
                g.kv_used as f64,
            ),
            (
                "weft_kv_blocks_total",
                "KV cache blocks in the pool.",
                g.kv_total as f64,
            ),
            (
                "weft_ready",
                "1 when the model worker serves.",
                if g.ready { 1.0 } else { 0.0 },
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP weft_worker_restarts_total Model worker restarts.\n# TYPE weft_worker_restarts_total counter\nweft_worker_restarts_total {}",
            g.worker_restarts
        );
        if !g.sandboxes.is_empty() {
            out.push_str("# HELP weft_sandbox_info A model worker's sandbox tier (1), and whether it is relaxed.\n# TYPE weft_sandbox_info gauge\n");
            for (model, tier, relaxed, _) in &g.sandboxes {
                let _ = writeln!(
                    out,
                    "weft_sandbox_info{{model=\"{}\",tier=\"{}\",relaxed=\"{relaxed}\"}} 1",
                    label(model),
                    label(tier)
                );
            }
            out.push_str("# HELP weft_sandbox_relaxed 1 when a model worker runs without a layer of its tier (sandbox = \"relaxed\").\n# TYPE weft_sandbox_relaxed gauge\n");
            let relaxed = g.sandboxes.iter().any(|s| !s.3.is_empty());
            let _ = writeln!(out, "weft_sandbox_relaxed {}", u8::from(relaxed));
            out.push_str("# HELP weft_sandbox_missing_layer A layer a relaxed model worker runs without.\n# TYPE weft_sandbox_missing_layer gauge\n");
            for (model, _, _, missing) in &g.sandboxes {
                for layer in missing {
                    let _ = writeln!(
                        out,
                        "weft_sandbox_missing_layer{{model=\"{}\",layer=\"{}\"}} 1",
                        label(model),
                        label(layer)
                    );
                }
            }
        }
        if !g.tenants.is_empty() {
            type Of = fn(&weft_kernels::TenantUsage) -> usize;
            let per_tenant: [(&str, &str, Of); 5] = [
                ("weft_tenant_running", "Sequences of a tenant running in the engine.", |t| t.running),
                ("weft_tenant_waiting", "Sequences of a tenant waiting for the engine.", |t| t.waiting),
                ("weft_tenant_kv_blocks", "KV cache blocks a tenant's sequences hold.", |t| t.kv_blocks),
                ("weft_tenant_kv_quota_blocks", "KV cache blocks a tenant may hold (its kv_share).", |t| t.kv_quota),
                ("weft_tenant_preemptions", "Preemptions of a tenant's sequences (always for its own blocks) while it has sequences.", |t| t.preemptions as usize),
            ];
            for (name, help, of) in per_tenant {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
                for (model, t) in &g.tenants {
                    let _ = writeln!(
                        out,
                        "{name}{{model=\"{}\",tenant=\"{}\"}} {}",
                        label(model),
                        label(&t.tenant),
                        of(t)
                    );
                }
            }
        }
        out
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

    fn rendered() -> String {
        let g = Gauges {
            tenants: vec![
                ("gemma".into(), usage("acme", 1, 7)),
                ("gemma".into(), usage("say \"hi\"", 0, 0)),
            ],
            ..Gauges::default()
        };
        Metrics::default().render(g)
    }

    #[test]
    fn each_tenant_gets_its_gauges() {
        let text = rendered();
        assert!(text.contains("weft_tenant_running{model=\"gemma\",tenant=\"acme\"} 1"));
        assert!(text.contains("weft_tenant_kv_blocks{model=\"gemma\",tenant=\"acme\"} 7"));
        assert!(text.contains("weft_tenant_kv_quota_blocks{model=\"gemma\",tenant=\"acme\"} 12"));
        assert!(text.contains("weft_tenant_preemptions{model=\"gemma\",tenant=\"acme\"} 3"));
        assert_eq!(text.matches("# TYPE weft_tenant_running gauge").count(), 1);
    }

    #[test]
    fn tenant_labels_are_escaped() {
        assert!(
            rendered().contains("weft_tenant_waiting{model=\"gemma\",tenant=\"say \\\"hi\\\"\"} 2")
        );
    }

    #[test]
    fn without_tenants_there_are_no_tenant_gauges() {
        assert!(!Metrics::default()
            .render(Gauges::default())
            .contains("weft_tenant_"));
    }
}
