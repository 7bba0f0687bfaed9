//! What a node holds: it watches the committed placement epochs and loads
//! what it is assigned, and stops what it no longer is. A whole replica is
//! served through the node's OpenAI API by its own worker. Of a model split
//! over several nodes, the node with the first layers serves it the same
//! way, with a head worker that sends each step down the chain; every other
//! range runs in a shard worker that takes the chain's steps from the data
//! plane (see [`crate::chain`]). The node says how a worker is started
//! ([`StartWorker`]): its settings are the node's config, not this crate's.
//!
//! Cut off from the coordinators, a node keeps what it holds (edge
//! autonomy) and applies the latest epoch when it hears one again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use weft_coordinator::{ControlState, Holding, ModelRecord};

use weft_api::{AppState, Served};
use weft_cluster::overlay::LoadReport;
use weft_store::{ModelSource, ModelStore, PipFetcher, StoredModel};
use weft_worker::{ChainLink, Runner, Supervisor};

use crate::chain::ChainRoute;
use crate::forwarder::Forwarder;
use crate::hop::{route_text, Hop};
use crate::shards::Shards;

/// How often a node asks for the latest epoch.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);
/// How long a dropped model's running requests get to finish.
pub const DRAIN: Duration = Duration::from_secs(30);

/// Starts a worker for a model file: `layers` of it (`None`: all of it),
/// the head of a chain when `chain` says where its steps go, else a shard
/// that runs its layers for the data plane.
pub type StartWorker = Arc<
    dyn Fn(
            std::path::PathBuf,
            Option<std::ops::Range<u32>>,
            Option<Arc<dyn ChainLink>>,
        ) -> Supervisor
        + Send
        + Sync,
>;

/// A model served through the API, its worker, and the nodes that run the
/// rest of its layers (a chain's head).
struct Serving {
    served: Arc<Served>,
    worker: Supervisor,
    hops: Vec<Hop>,
}

/// The models a node holds and serves.
pub struct Holder {
    app: Arc<AppState>,
    fwd: Option<Arc<Forwarder>>,
    shards: Shards,
    start: StartWorker,
    me: u64,
    store: ModelStore,
    /// Models served through the API (whole, or as a chain's head).
    served: BTreeMap<String, Serving>,
    /// Shard workers of the later ranges of chains, by
    /// `<model>/<first layer>/<end layer>`.
    ranges: BTreeMap<String, (Holding, Supervisor)>,
    /// Models that failed to load, with why (tried again on the next epoch).
    failed: BTreeMap<String, String>,
    epoch: u64,
    /// Tokens generated, when last sampled, for the load report's rate.
    tokens_at: (u64, Instant),
    /// Requests by model when last sampled, and the smoothed rates.
    requests_at: BTreeMap<String, u64>,
    demand: BTreeMap<String, f64>,
}

/// Time constant of the smoothed request rates a node reports.
pub const DEMAND_SMOOTHING: Duration = Duration::from_secs(5);

/// Folds the requests counted over `dt` into the smoothed rates: an
/// exponential average with time constant [`DEMAND_SMOOTHING`]. A model
/// with no new requests decays toward zero.
pub fn smooth_demand(
    rates: &mut BTreeMap<String, f64>,
    then: &BTreeMap<String, u64>,
    now: &BTreeMap<String, u64>,
    dt: Duration,
) {
    if dt.is_zero() {
        return;
    }
    let a = 1.0 - (-dt.as_secs_f64() / DEMAND_SMOOTHING.as_secs_f64()).exp();
    let models: BTreeSet<&String> = rates.keys().chain(now.keys()).collect();
    let mut next = BTreeMap::new();
    for m in models {
        let n = now.get(m).copied().unwrap_or(0);
        let inst = n.saturating_sub(then.get(m).copied().unwrap_or(0)) as f64 / dt.as_secs_f64();
        let r = rates.get(m).copied().unwrap_or(0.0);
        let v = r + a * (inst - r);
        if v > 1e-3 {
            next.insert(m.clone(), v);
        }
    }
    *rates = next;
}

impl Holder {
    /// A holder for member `me`, serving through `app`, its chains' ranges
    /// through `shards`, fetching from peers and heading chains through
    /// `fwd` (when the node has a data plane), starting workers with
    /// `start`.
    pub fn new(
        app: Arc<AppState>,
        fwd: Option<Arc<Forwarder>>,
        shards: Shards,
        start: StartWorker,
        me: u64,
        store: ModelStore,
    ) -> Self {
        Self {
            app,
            fwd,
            shards,
            start,
            me,
            store,
            served: BTreeMap::new(),
            ranges: BTreeMap::new(),
            failed: BTreeMap::new(),
            epoch: 0,
            tokens_at: (0, Instant::now()),
            requests_at: BTreeMap::new(),
            demand: BTreeMap::new(),
        }
    }

    /// The epoch last applied (0: none).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// What it holds now, as the load report lists it: a served model (a
    /// chain's head included) by name, a later layer range as
    /// `name[a..b)`; either with ` (loading)` until its worker is ready,
    /// and a head until every node after it reports its range ready.
    pub fn holdings(&self) -> Vec<String> {
        let loading = |s: &Supervisor| if s.is_ready() { "" } else { " (loading)" };
        let fwd = &self.fwd;
        let chain_ready = |hops: &[Hop]| {
            hops.iter().all(|h| {
                fwd.as_ref().is_some_and(|f| {
                    f.reports_holding(
                        &h.node,
                        &format!("{}[{}..{})", h.model, h.layers.start, h.layers.end),
                    )
                })
            })
        };
        let mut out: Vec<String> = self
            .served
            .iter()
            .map(|(name, s)| {
                if chain_ready(&s.hops) {
                    format!("{name}{}", loading(&s.worker))
                } else {
                    format!("{name} (loading)")
                }
            })
            .collect();
        out.extend(
            self.ranges
                .values()
                .map(|(h, w)| format!("{h}{}", loading(w))),
        );
        out
    }

    /// Loads what `state`'s latest epoch assigns to this node and stops
    /// what it no longer assigns. A model that cannot be loaded is logged
    /// and skipped; the others still load.
    pub async fn apply(&mut self, state: &ControlState) {
        let Some(epoch) = &state.placement else {
            return;
        };
        if epoch.epoch == self.epoch {
            return;
        }
        let want = epoch.held_by(self.me);
        tracing::info!(
            epoch = epoch.epoch,
            assigned = ?want.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "applying placement epoch"
        );
        // served here: whole replicas, and chains this node heads (with
        // who runs the rest); a whole replica wins over a head of the same
        // model
        let mut to_serve: BTreeMap<&str, (&Holding, Vec<Hop>)> = BTreeMap::new();
        let mut to_run: BTreeMap<String, &Holding> = BTreeMap::new();
        for h in &want {
            if h.whole {
                to_serve.insert(&h.model, (h, Vec::new()));
            } else if h.layers.start == 0 {
                let hops: Option<Vec<Hop>> = epoch.chain_after(self.me, &h.model).and_then(|r| {
                    r.into_iter()
                        .map(|(id, layers)| {
                            Some(Hop {
                                node: state.members.get(&id)?.name.clone(),
                                model: h.model.clone(),
                                layers,
                            })
                        })
                        .collect()
                });
                match hops {
                    Some(hops) if !to_serve.get(h.model.as_str()).is_some_and(|(w, _)| w.whole) => {
                        to_serve.insert(&h.model, (h, hops));
                    }
                    Some(_) => {}
                    None => {
                        tracing::warn!(holding = %h, "heads a chain whose other nodes are unknown")
                    }
                }
            } else {
                to_run.insert(shard_key(h), h);
            }
        }
        // stop what is no longer assigned (or whose chain changed): no new
        // requests, running ones drain
        let gone: Vec<String> = self
            .served
            .iter()
            .filter(|(m, s)| {
                to_serve
                    .get(m.as_str())
                    .is_none_or(|(_, want)| *want != s.hops)
            })
            .map(|(m, _)| m.clone())
            .collect();
        for m in gone {
            if let Some(s) = self.served.remove(&m) {
                self.app.drop_model(&m);
                tracing::info!(model = %m, "no longer assigned: draining and stopping");
                tokio::spawn(drain_and_stop(m, s.worker));
            }
        }
        let gone: Vec<String> = self
            .ranges
            .keys()
            .filter(|k| !to_run.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some((h, worker)) = self.ranges.remove(&k) {
                self.shards.set(&k, None);
                worker.shutdown();
                tracing::info!(holding = %h, "layer range no longer assigned: stopped");
            }
        }
        self.failed.clear();
        for (model, (h, hops)) in to_serve {
            if self.served.contains_key(model) {
                continue;
            }
            let Some(rec) = state.models.get(model) else {
                tracing::warn!(%model, "assigned a model the cluster has no record of");
                continue;
            };
            match self.serve(h, rec, hops).await {
                Ok(s) => {
                    self.app.hold(s.served.clone());
                    self.served.insert(model.to_string(), s);
                }
                Err(e) => {
                    tracing::error!(%model, "cannot load: {e:#}");
                    self.failed.insert(model.to_string(), format!("{e:#}"));
                }
            }
        }
        for (key, h) in to_run {
            if self.ranges.contains_key(&key) {
                continue;
            }
            let Some(rec) = state.models.get(&h.model) else {
                tracing::warn!(model = %h.model, "assigned a model the cluster has no record of");
                continue;
            };
            match self.obtain(&h.model, rec).await {
                Ok(stored) => {
                    let worker = (self.start)(stored.path, Some(h.layers.clone()), None);
                    tracing::info!(holding = %h, "shard worker started for the data plane");
                    self.shards.set(&key, Some(worker.clone()));
                    self.ranges.insert(key, (h.clone(), worker));
                }
                Err(e) => {
                    tracing::error!(holding = %h, "cannot load: {e:#}");
                    self.failed.insert(h.to_string(), format!("{e:#}"));
                }
            }
        }
        self.epoch = epoch.epoch;
    }

    /// Fetches and verifies `h`'s model and starts the worker that serves
    /// it: of the whole model, or of a chain's head sending its steps down
    /// `hops`.
    async fn serve(&self, h: &Holding, rec: &ModelRecord, hops: Vec<Hop>) -> Result<Serving> {
        let stored = self.obtain(&h.model, rec).await?;
        let path = stored.path.clone();
        let tokenizer = tokio::task::spawn_blocking(move || -> Result<_> {
            let gguf = weft_kernels::GgufFile::open(&path)?;
            Ok(weft_kernels::Tokenizer::from_gguf(&gguf)?)
        })
        .await
        .context("tokenizer task")??;
        let worker = if hops.is_empty() {
            (self.start)(stored.path, None, None)
        } else {
            let fwd = self
                .fwd
                .clone()
                .context("heading a chain needs the data plane ([serve] data_addr)")?;
            tracing::info!(holding = %h, chain = %route_text(&hops), "heading a chain");
            let link: Arc<dyn ChainLink> = Arc::new(ChainRoute {
                fwd,
                hops: hops.clone(),
            });
            (self.start)(stored.path, Some(h.layers.clone()), Some(link))
        };
        tracing::info!(model = %h.model, "worker started");
        Ok(Serving {
            served: Arc::new(Served::new(
                h.model.clone(),
                Arc::new(tokenizer),
                Arc::new(worker.clone()),
            )),
            worker,
            hops,
        })
    }

    /// This node's load report now: queue, running, free KV, tokens/s since
    /// the last report, what it holds. Others' fields are kept from `base`.
    pub fn report(&mut self, base: &LoadReport) -> LoadReport {
        let g = self.app.gauges();
        let tokens = self.app.metrics.generated_tokens();
        let (then, at) = self.tokens_at;
        let secs = at.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            tokens.saturating_sub(then) as f64 / secs
        } else {
            0.0
        };
        self.tokens_at = (tokens, Instant::now());
        let requests = self.app.metrics.wanted_by_model();
        smooth_demand(
            &mut self.demand,
            &self.requests_at,
            &requests,
            at.elapsed().max(Duration::from_millis(1)),
        );
        self.requests_at = requests;
        LoadReport {
            queue_depth: g.queue_depth as u32,
            running: g.inflight.saturating_sub(g.queue_depth) as u32,
            tokens_per_s: rate,
            free_kv_tokens: (g.kv_total.saturating_sub(g.kv_used) * weft_kernels::KV_BLOCK_TOKENS)
                as u64,
            models: self.holdings(),
            demand: self.demand.clone(),
            prefixes: self.app.prefix_summary(),
            ..base.clone()
        }
    }

    /// Stops every worker (the node is shutting down).
    pub fn shutdown(&mut self) {
        for (m, s) in std::mem::take(&mut self.served) {
            self.app.drop_model(&m);
            s.worker.shutdown();
        }
        for (k, (_, w)) in std::mem::take(&mut self.ranges) {
            self.shards.set(&k, None);
            w.shutdown();
        }
    }
}

impl Holder {
    /// The verified file of `rec` in this node's store, as
    /// `<store>/<sha256>.gguf` (where peers fetch it from): kept from
    /// before, else fetched in sha256-checked chunks from the nearest peers
    /// that hold `model`, else from its source.
    async fn obtain(&self, model: &str, rec: &ModelRecord) -> Result<StoredModel> {
        let keep = self.store.dir().join(format!("{}.gguf", rec.sha256));
        if keep.exists() {
            let (store, path, sha) = (self.store.clone(), keep.clone(), rec.sha256.clone());
            match tokio::task::spawn_blocking(move || store.verify(&path, &sha)).await? {
                Ok(s) => return Ok(s),
                Err(e) => {
                    tracing::warn!(path = %keep.display(), "kept model file is damaged; fetching it again: {e}");
                    let _ = std::fs::remove_file(&keep);
                }
            }
        }
        std::fs::create_dir_all(self.store.dir())
            .with_context(|| format!("creating {}", self.store.dir().display()))?;
        if let Some(fwd) = &self.fwd {
            if !rec.chunk_sha256.is_empty() {
                match fwd.fetch_model(model, rec, &keep).await {
                    Ok(from) => {
                        tracing::info!(%model, peers = ?from, "model fetched from peers, every chunk checked");
                        let (store, path, sha) =
                            (self.store.clone(), keep.clone(), rec.sha256.clone());
                        return Ok(
                            tokio::task::spawn_blocking(move || store.verify(&path, &sha))
                                .await??,
                        );
                    }
                    Err(e) => {
                        tracing::info!(%model, "not from peers ({e:#}); fetching it from its source")
                    }
                }
            }
        }
        let stored = fetch_verified(&self.store, rec).await?;
        // a copy peers can fetch: a hard link where the file system allows
        if std::fs::hard_link(&stored.path, &keep).is_err() {
            let part = keep.with_extension("gguf.part");
            std::fs::copy(&stored.path, &part)
                .and_then(|_| std::fs::rename(&part, &keep))
                .with_context(|| format!("keeping a copy at {}", keep.display()))?;
        }
        Ok(StoredModel {
            path: keep,
            ..stored
        })
    }
}

/// How the data plane names a layer range: `<model>/<first>/<end>`.
fn shard_key(h: &Holding) -> String {
    format!("{}/{}/{}", h.model, h.layers.start, h.layers.end)
}

/// Resolves `rec`'s source through the store and checks it is the file the
/// cluster registered.
async fn fetch_verified(store: &ModelStore, rec: &ModelRecord) -> Result<StoredModel> {
    let source = ModelSource::parse(&rec.source)?;
    let store = store.clone();
    let stored =
        tokio::task::spawn_blocking(move || store.resolve(&source, &PipFetcher::default()))
            .await
            .context("fetch task")??;
    if stored.sha256 != rec.sha256 {
        bail!(
            "{} has sha256 {}, but the cluster registered {}: not serving it",
            rec.source,
            stored.sha256,
            rec.sha256
        );
    }
    Ok(stored)
}

/// Waits for a dropped model's running requests (at most [`DRAIN`]), then
/// stops its worker.
async fn drain_and_stop(model: String, worker: Supervisor) {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while worker.inflight() > 0 && start.elapsed() < DRAIN {
        tick.tick().await;
    }
    worker.shutdown();
    tracing::info!(%model, "worker stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Smoothed rates after 10 requests/s for 30 s (in 400 ms reports),
    /// and the count so far.
    fn after_a_steady_rate() -> (BTreeMap<String, f64>, u64) {
        let mut rates = BTreeMap::new();
        let mut count = 0u64;
        for _ in 0..75 {
            let then = BTreeMap::from([("m".to_string(), count)]);
            count += 4;
            let now = BTreeMap::from([("m".to_string(), count)]);
            smooth_demand(&mut rates, &then, &now, Duration::from_millis(400));
        }
        (rates, count)
    }

    #[test]
    fn smoothed_demand_follows_a_steady_rate() {
        let (rates, _) = after_a_steady_rate();
        assert!((rates["m"] - 10.0).abs() < 0.2, "{rates:?}");
    }

    #[test]
    fn smoothed_demand_decays_out_when_requests_stop() {
        // then nothing for 60 s: it drops out
        let (mut rates, count) = after_a_steady_rate();
        let same = BTreeMap::from([("m".to_string(), count)]);
        for _ in 0..150 {
            smooth_demand(&mut rates, &same, &same, Duration::from_millis(400));
        }
        assert!(!rates.contains_key("m"), "{rates:?}");
    }
}
