//! What the handlers share: the API's settings, the models this node
//! serves now (a cluster node adds and drops them as placement epochs
//! change), metrics, tenants' use, the intent log and, on a cluster node,
//! the data plane.

use std::sync::{Arc, Mutex, RwLock};

use serde_json::Value;
use weft_audit::IntentLog;
use weft_kernels::Tokenizer;
use weft_metrics::Registry;
use weft_worker::Runner;

use crate::config::ApiConfig;
use crate::metrics::{Gauges, Metrics};
use crate::remote::{LocalLoad, LocalNode, Remote};
use crate::served::Served;
use crate::tenants::Tenants;

/// What the API serves.
pub struct AppState {
    /// The API's settings.
    pub cfg: ApiConfig,
    /// Metrics.
    pub metrics: Metrics,
    /// Held models, the first one answering for `default`.
    models: RwLock<Vec<Arc<Served>>>,
    /// Tenants' requests in flight and tokens this minute.
    pub(crate) tenants: Arc<Tenants>,
    /// Where admission decisions are recorded, if anywhere (shared with
    /// the sandbox service and, on a node that runs one, the coordinator).
    intent: RwLock<Option<Arc<Mutex<IntentLog>>>>,
    /// What this node alone predicts of serving a request (a node with no
    /// data plane).
    predictor: RwLock<Option<Arc<dyn crate::remote::Predict>>>,
    /// Routes requests across the cluster (cluster nodes).
    remote: RwLock<Option<Arc<dyn Remote>>>,
    /// API keys and tenant limits as they are now (they start as `cfg`'s
    /// and change with [`AppState::set_policy`]).
    policy: RwLock<Arc<crate::config::Policy>>,
    /// Each model's tokens of the shared prefixes, as a completion and as
    /// a chat's system message renders them (made at first use).
    shared: Mutex<std::collections::HashMap<String, Arc<Vec<Vec<u32>>>>>,
    /// The prefixes this node served lately, for its load report.
    affinity: Mutex<crate::affinity::PrefixSummary>,
}

impl AppState {
    /// The API keys and tenant limits in force.
    pub fn policy(&self) -> Arc<crate::config::Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts new API keys and tenant limits in force: requests from now on
    /// are authenticated and admitted by them (requests in flight keep
    /// their slot).
    pub fn set_policy(&self, p: crate::config::Policy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(p);
    }

    /// Shared state for the router, serving one model.
    pub fn new(
        cfg: ApiConfig,
        model_id: String,
        tokenizer: Arc<Tokenizer>,
        runner: Arc<dyn Runner>,
    ) -> Arc<Self> {
        let s = Self::empty(cfg);
        s.hold(Served::new(model_id, tokenizer, runner));
        s
    }

    /// Shared state for the router, serving nothing yet, with a registry
    /// of its own.
    pub fn empty(cfg: ApiConfig) -> Arc<Self> {
        Self::empty_in(cfg, &Registry::new())
    }

    /// Shared state for the router, serving nothing yet, its metrics in
    /// `registry` (the node's one).
    pub fn empty_in(cfg: ApiConfig, registry: &Registry) -> Arc<Self> {
        let s = Arc::new(Self {
            policy: RwLock::new(Arc::new(cfg.policy())),
            cfg,
            metrics: Metrics::new(registry),
            models: RwLock::default(),
            tenants: Arc::default(),
            intent: RwLock::default(),
            predictor: RwLock::default(),
            remote: RwLock::default(),
            shared: Mutex::default(),
            affinity: Mutex::default(),
        });
        let weak = Arc::downgrade(&s);
        weft_metrics::OnScrape::register(registry, s.metrics.scrape.collectors(), move || {
            if let Some(s) = weak.upgrade() {
                let g = s.gauges();
                s.metrics.restarts_seen(g.worker_restarts);
                s.metrics.cache_seen(&g.cache);
                s.metrics.scrape.set(&g);
            }
        });
        s
    }

    /// The registry every metric of this node is in.
    pub fn registry(&self) -> &Registry {
        self.metrics.registry()
    }

    /// Counts a finished or refused request that named `model`: under the
    /// model's id when this node serves it, else under
    /// [`weft_metrics::OTHER`] (a client's string is no label).
    pub fn count_request(&self, model: &str, status: u16, criticality: &str) {
        match self.find(model) {
            Some(m) => self.metrics.request(&m.model_id, status, criticality),
            None => self
                .metrics
                .request(weft_metrics::OTHER, status, criticality),
        }
    }

    /// How many leading tokens of `prompt` (for `model`) lie in one of the
    /// configured shared prefixes: their cached blocks any tenant may map.
    pub(crate) fn shared_tokens(&self, model: &Served, prompt: &[u32]) -> usize {
        if self.cfg.shared_prefixes.is_empty() {
            return 0;
        }
        let forms = {
            let mut m = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            m.entry(model.model_id.clone())
                .or_insert_with(|| {
                    let t = &model.tokenizer;
                    Arc::new(
                        self.cfg
                            .shared_prefixes
                            .iter()
                            .flat_map(|text| {
                                let system = weft_kernels::ChatMessage::new("system", text);
                                // a model without a chat template has only the plain form
                                [
                                    Some(t.encode(text, true, false)),
                                    t.encode_chat(&[system], None).ok(),
                                ]
                            })
                            .flatten()
                            .collect(),
                    )
                })
                .clone()
        };
        forms
            .iter()
            .map(|f| f.iter().zip(prompt).take_while(|(a, b)| a == b).count())
            .max()
            .unwrap_or(0)
    }

    /// Notes that this node serves `tenant`'s request `body` (its prefix
    /// is in this node's cache now).
    pub(crate) fn note_prefix(&self, tenant: &str, body: &[u8]) {
        let fps = crate::affinity::fingerprints(tenant, body);
        self.affinity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .note(&fps);
    }

    /// The names of the prefixes this node served lately (see
    /// [`crate::affinity`]), for its load report.
    pub fn prefix_summary(&self) -> Vec<u64> {
        self.affinity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .names()
    }

    /// The data plane, on a cluster node.
    pub fn remote(&self) -> Option<Arc<dyn Remote>> {
        self.remote
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Routes requests across the cluster through `r` from now on.
    pub fn set_remote(&self, r: Arc<dyn Remote>) {
        *self.remote.write().unwrap_or_else(|e| e.into_inner()) = Some(r);
    }

    /// Records every admission decision from now on in `log`; returns it
    /// shared, for the other writers of this node (its sandbox service,
    /// its coordinator) and its checkpoints.
    pub fn set_intent_log(&self, log: IntentLog) -> Arc<Mutex<IntentLog>> {
        let log = Arc::new(Mutex::new(log));
        self.share_intent_log(log.clone());
        log
    }

    /// Records every admission decision from now on in `log`, which other
    /// writers of this node share.
    pub fn share_intent_log(&self, log: Arc<Mutex<IntentLog>>) {
        *self.intent.write().unwrap_or_else(|e| e.into_inner()) = Some(log);
    }

    /// The intent log, if there is one.
    pub fn intent_log(&self) -> Option<Arc<Mutex<IntentLog>>> {
        self.intent
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Predicts what serving a request here costs with `p` from now on
    /// (a node with no data plane; a cluster node's router predicts).
    pub fn set_predictor(&self, p: Arc<dyn crate::remote::Predict>) {
        *self.predictor.write().unwrap_or_else(|e| e.into_inner()) = Some(p);
    }

    pub(crate) fn predictor(&self) -> Option<Arc<dyn crate::remote::Predict>> {
        self.predictor
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Appends a decision to the intent log, if there is one. A log that
    /// cannot be written is reported, and serving goes on.
    pub fn record(&self, record: Value) {
        let Some(log) = self.intent_log() else { return };
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = log.append(record) {
            tracing::error!("intent log: {e}");
        }
    }

    /// Forces the intent log to disk (on shutdown).
    pub fn sync_intent_log(&self) {
        let Some(log) = self.intent_log() else { return };
        let log = log.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = log.sync() {
            tracing::error!("intent log: {e}");
        }
    }

    /// Serves `m` too (replacing a model of the same id).
    pub fn hold(&self, m: impl Into<Arc<Served>>) {
        let m = m.into();
        let mut models = self.models.write().unwrap_or_else(|e| e.into_inner());
        models.retain(|h| h.model_id != m.model_id);
        models.push(m);
    }

    /// Stops serving `model_id`; requests already running finish. Returns
    /// what was dropped.
    pub fn drop_model(&self, model_id: &str) -> Option<Arc<Served>> {
        let mut models = self.models.write().unwrap_or_else(|e| e.into_inner());
        let i = models.iter().position(|h| h.model_id == model_id)?;
        Some(models.remove(i))
    }

    /// The models served now.
    pub fn held(&self) -> Vec<Arc<Served>> {
        self.models
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The model a request names (`default`: the first one held).
    pub(crate) fn find(&self, name: &str) -> Option<Arc<Served>> {
        let models = self.models.read().unwrap_or_else(|e| e.into_inner());
        if name == "default" {
            return models.first().cloned();
        }
        models.iter().find(|m| m.model_id == name).cloned()
    }

    /// The metrics label of a request that never reached a model.
    pub(crate) fn any_model_id(&self) -> String {
        self.find("default")
            .map_or_else(|| "none".to_string(), |m| m.model_id.clone())
    }

    /// Load of all held models together.
    pub fn gauges(&self) -> Gauges {
        let held = self.held();
        let mut g = Gauges {
            ready: !held.is_empty(),
            ..Default::default()
        };
        for m in &held {
            let s = m.runner.stats();
            g.queue_depth += s.waiting;
            g.inflight += m.runner.inflight();
            g.kv_used += s.kv_used;
            g.kv_total += s.kv_total;
            g.worker_restarts += m.runner.restarts();
            g.cache.push((m.model_id.clone(), s.cache));
            g.tenants.extend(
                m.runner
                    .tenants()
                    .into_iter()
                    .map(|t| (m.model_id.clone(), t)),
            );
            g.ready &= m.runner.is_ready();
            if let Some((c, _)) = m.runner.confinement() {
                g.sandboxes.push((
                    m.model_id.clone(),
                    c.tier.to_string(),
                    c.relaxed,
                    c.missing
                        .iter()
                        .map(|l| {
                            serde_json::to_value(l)
                                .ok()
                                .and_then(|v| v.as_str().map(String::from))
                                .unwrap_or_default()
                        })
                        .collect(),
                ));
            }
        }
        g
    }
}

impl LocalNode for AppState {
    /// This node's live load for `model`, if it serves it.
    fn load(&self, model: &str) -> Option<LocalLoad> {
        let m = self.find(model)?;
        if !m.runner.is_ready() {
            return None;
        }
        let st = m.runner.stats();
        Some(LocalLoad {
            queued: st
                .waiting
                .max(m.runner.inflight().saturating_sub(st.running)) as u32,
            running: st.running as u32,
            free_kv_tokens: (st.kv_total.saturating_sub(st.kv_used) * weft_kernels::KV_BLOCK_TOKENS)
                as u64,
        })
    }

    fn record(&self, record: Value) {
        AppState::record(self, record);
    }

    fn routed(&self, target: &'static str, criticality: &str, utility: Option<f64>) {
        self.metrics.routed(target, criticality, utility);
    }
}
