//! The placement solver: which node holds which model, whole or as a chain of
//! layer-range shards, within every node's memory and compute.
//!
//! The objective is the price of bytes crossing edge-core links, plus a
//! penalty per expected deadline miss and per unit of unserved demand, plus
//! the price of moving weights, amortised over [`SolverConfig::amortize_s`].
//! The solver is greedy and deterministic: it keeps what the current placement
//! already holds, serves each demand at its own site when that is worth the
//! weights it moves, and otherwise spills to the nearest site with room
//! (edge sites of the same region first, then the cloud). Every replica carries
//! the reasons it exists.

use std::collections::HashMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{PlacementError, Result};
use crate::model::{Demand, ModelId, ModelSpec, WIRE_BYTES_PER_TOKEN};
use crate::topology::{LinkClass, NodeId, SiteId, SiteKind, Topology};

/// Tunables of the objective.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SolverConfig {
    /// Share of each node's compute left free for bursts.
    pub headroom: f64,
    /// Cost of a prompt token relative to a decoded token.
    pub prefill_share: f64,
    /// Seconds over which moving weights is amortised against traffic.
    pub amortize_s: f64,
    /// Price of one expected deadline miss.
    pub miss_penalty: f64,
    /// Price of one request per second that no replica can take.
    pub unserved_penalty: f64,
    /// Sites a demand may spill to, nearest first.
    pub max_spill_sites: usize,
    /// Tokens of context each replica keeps KV-cache memory for (its
    /// concurrent sequences times their context), on top of its weights.
    pub kv_reserve_tokens: u64,
}

impl Default for SolverConfig {
    fn default() -> Self {
        Self {
            headroom: 0.2,
            prefill_share: 0.05,
            amortize_s: 3600.0,
            miss_penalty: 1e-3,
            unserved_penalty: 1e-2,
            max_spill_sites: 32,
            kv_reserve_tokens: 16_384,
        }
    }
}

/// One node's part of a replica.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shard {
    /// The node.
    pub node: NodeId,
    /// The layers it runs.
    pub layers: Range<u32>,
}

/// Why a replica is where it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum Reason {
    /// The current placement already held it; keeping it moves nothing.
    Kept,
    /// Demand at this site; serving it here keeps its bytes off the core.
    LocalDemand {
        /// Requests/s of the demand still unserved when it was placed.
        requests_per_s: f64,
        /// Edge-core bytes/s it saves against serving from the cloud.
        core_bytes_per_s_saved: f64,
        /// Weight bytes moved to place it.
        moved_bytes: u64,
    },
    /// Demand from another site that its own site had no room or reason to
    /// serve.
    Spill {
        /// Where the demand is.
        from: SiteId,
        /// The path it takes.
        class: LinkClass,
    },
    /// The model's `min_replicas` asks for more replicas than demand
    /// placed.
    MinReplicas {
        /// The floor.
        min_replicas: u32,
    },
    /// The whole model fits no single node, so it is split by free memory.
    Sharded {
        /// Memory the whole model needs (weights and KV reserve).
        model_bytes: u64,
        /// The most any node at the site had free.
        largest_free_bytes: u64,
    },
}

/// A whole model, served by one chain of shards at one site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replica {
    /// The model.
    pub model: ModelId,
    /// The site all its shards are at.
    pub site: SiteId,
    /// Its shards, first layers first; one shard is a whole replica.
    pub shards: Vec<Shard>,
    /// Why it is here.
    pub reasons: Vec<Reason>,
}

/// Where every model is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    /// Replicas in a stable order (model, then site, then first node).
    pub replicas: Vec<Replica>,
}

impl Placement {
    /// Whether `node` holds any layer of `model`.
    pub fn holds(&self, node: NodeId, model: ModelId) -> bool {
        self.replicas
            .iter()
            .any(|r| r.model == model && r.shards.iter().any(|s| s.node == node))
    }

    /// Memory each node gives to its shards (weights plus `kv_tokens` of
    /// KV cache per replica), indexed by node.
    pub fn memory_used(
        &self,
        topology: &Topology,
        models: &[ModelSpec],
        kv_tokens: u64,
    ) -> Vec<u64> {
        let mut used = vec![0u64; topology.nodes.len()];
        for r in &self.replicas {
            if let Some(m) = models.get(r.model.0 as usize) {
                for s in &r.shards {
                    if let Some(u) = used.get_mut(s.node.0 as usize) {
                        *u += m.shard_memory(s.layers.end - s.layers.start, kv_tokens);
                    }
                }
            }
        }
        used
    }
}

/// Why a replica of the current placement is not in the new one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "why", rename_all = "kebab-case")]
pub enum DropReason {
    /// No site asks for its model any more.
    NoDemand,
    /// A node it used is gone.
    NodeGone {
        /// The node.
        node: NodeId,
    },
    /// Its model is gone or its layers no longer cover the model.
    Invalid,
    /// It no longer fits the node's memory.
    OverMemory {
        /// The node.
        node: NodeId,
    },
}

/// Demand routed to a replica in the plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Allocation {
    /// Index into the demand list.
    pub demand: usize,
    /// Index into the plan's replicas.
    pub replica: usize,
    /// Requests/s sent there.
    pub requests_per_s: f64,
    /// Expected latency of one request there (ms).
    pub expected_ms: f64,
}

/// The objective's terms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PlanCost {
    /// Request bytes/s crossing edge-core links.
    pub core_bytes_per_s: f64,
    /// Requests/s expected to miss their deadline.
    pub misses_per_s: f64,
    /// Requests/s no replica can take.
    pub unserved_per_s: f64,
    /// Weight bytes moved from the current placement.
    pub moved_bytes: u64,
    /// Of those, bytes that cross edge-core links.
    pub moved_core_bytes: u64,
    /// The total price over the amortisation horizon.
    pub objective: f64,
}

/// A new placement, what was dropped from the old one, and how demand is spread.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The placement.
    pub placement: Placement,
    /// Replicas of the current placement that were removed, and why.
    pub dropped: Vec<(Replica, DropReason)>,
    /// Demand spread over replicas.
    pub allocations: Vec<Allocation>,
    /// The objective's terms.
    pub cost: PlanCost,
}

/// Rounds of re-solving from its own answer before the solver settles.
pub const MAX_ROUNDS: usize = 8;

/// Plans a placement for `demand` over `topology`, starting from `current`.
///
/// Greedy placement interleaves placing and allocating, so the replicas it
/// ends with can leave room it did not see while it worked. The solver
/// therefore re-solves from its own answer until nothing more moves (at
/// most [`MAX_ROUNDS`] rounds): the plan it returns is a fixed point, and
/// planning again for the same demand moves nothing.
pub fn solve(
    topology: &Topology,
    models: &[ModelSpec],
    demand: &[Demand],
    current: &Placement,
    config: &SolverConfig,
) -> Result<Plan> {
    validate(topology, models, demand)?;
    let shape = |r: &Replica| (r.model, r.site, r.shards.clone());
    let original: std::collections::HashSet<_> = current.replicas.iter().map(shape).collect();
    let mut reasons: HashMap<(ModelId, SiteId, Vec<Shard>), Vec<Reason>> = HashMap::new();
    let mut plan = solve_once(topology, models, demand, current, config);
    let (mut moved, mut moved_core) = (plan.cost.moved_bytes, plan.cost.moved_core_bytes);
    let mut dropped = std::mem::take(&mut plan.dropped);
    let settled = |p: &Plan| {
        p.placement
            .replicas
            .iter()
            .all(|r| r.reasons == [Reason::Kept])
    };
    let mut rounds = 1;
    loop {
        for r in &plan.placement.replicas {
            if r.reasons != [Reason::Kept] {
                reasons.entry(shape(r)).or_insert_with(|| r.reasons.clone());
            }
        }
        if settled(&plan) || rounds == MAX_ROUNDS {
            break;
        }
        let next = solve_once(topology, models, demand, &plan.placement, config);
        dropped.extend(next.dropped.iter().cloned());
        moved += next.cost.moved_bytes;
        moved_core += next.cost.moved_core_bytes;
        plan = next;
        rounds += 1;
    }
    for r in &mut plan.placement.replicas {
        if !original.contains(&shape(r)) {
            if let Some(why) = reasons.get(&shape(r)) {
                r.reasons = why.clone();
            }
        }
    }
    plan.dropped = dropped;
    let core_price = topology.defaults.cost_per_byte(LinkClass::EdgeToCore);
    plan.cost.objective += (moved_core as f64 - plan.cost.moved_core_bytes as f64) * core_price;
    plan.cost.moved_bytes = moved;
    plan.cost.moved_core_bytes = moved_core;
    Ok(plan)
}

fn solve_once(
    topology: &Topology,
    models: &[ModelSpec],
    demand: &[Demand],
    current: &Placement,
    config: &SolverConfig,
) -> Plan {
    let mut s = Solver::new(topology, models, demand, current, config);
    s.keep_current();
    let mut order: Vec<usize> = (0..demand.len()).collect();
    // Demand that puts the most bytes on the wire per unit of compute first:
    // its local replica keeps the most bytes off the core per node it uses.
    // Ties by site and model, so only the demand itself decides the order.
    order.sort_by(|&a, &b| {
        s.density(b)
            .total_cmp(&s.density(a))
            .then(demand[a].site.cmp(&demand[b].site))
            .then(demand[a].model.cmp(&demand[b].model))
            .then(a.cmp(&b))
    });
    // First every site serves its own demand, so a hot spot cannot take its
    // neighbours' room before their own agents are served; then what is
    // left spills, nearest site first.
    let mut left: Vec<f64> = order.iter().map(|&d| s.serve_local(d)).collect();
    for (i, &d) in order.iter().enumerate() {
        s.pool(d, left[i]);
    }
    for (i, &d) in order.iter().enumerate() {
        left[i] = s.spill(d, left[i]);
    }
    s.meet_floors();
    s.finish()
}

fn validate(topology: &Topology, models: &[ModelSpec], demand: &[Demand]) -> Result<()> {
    for (i, m) in models.iter().enumerate() {
        if m.layers == 0 || !(m.compute_per_token.is_finite() && m.compute_per_token > 0.0) {
            return Err(PlacementError::InvalidModel {
                model: ModelId(i as u32),
                why: "a model needs at least one layer and positive compute per token",
            });
        }
    }
    for d in demand {
        if d.site.0 as usize >= topology.sites.len() {
            return Err(PlacementError::UnknownSite { site: d.site });
        }
        if d.model.0 as usize >= models.len() {
            return Err(PlacementError::UnknownModel { model: d.model });
        }
    }
    Ok(())
}

struct Solver<'a> {
    topology: &'a Topology,
    models: &'a [ModelSpec],
    demand: &'a [Demand],
    current: &'a Placement,
    config: &'a SolverConfig,
    free_mem: Vec<u64>,
    free_work: Vec<f64>,
    replicas: Vec<Replica>,
    /// Replicas by (site, model), in creation order.
    at: HashMap<(SiteId, ModelId), Vec<usize>>,
    /// Layers each node held before, by (node, model).
    held: HashMap<(NodeId, ModelId), Range<u32>>,
    dropped: Vec<(Replica, DropReason)>,
    allocations: Vec<Allocation>,
    cost: PlanCost,
    /// Models with demand, or a replica floor: their current replicas may
    /// be kept.
    demanded: Vec<bool>,
    /// Models with demand of their own.
    asked: Vec<bool>,
    spill_sites: HashMap<SiteId, Vec<SiteId>>,
    /// Cloud sites with the single-sequence rate of their fastest node.
    clouds: Vec<(SiteId, f64)>,
    /// Request bytes/s per (region, model) that edge sites could not serve
    /// locally: what a replica shared by the region would keep off the core.
    pooled: HashMap<(u32, ModelId), f64>,
}

impl<'a> Solver<'a> {
    fn new(
        topology: &'a Topology,
        models: &'a [ModelSpec],
        demand: &'a [Demand],
        current: &'a Placement,
        config: &'a SolverConfig,
    ) -> Self {
        let mut asked = vec![false; models.len()];
        for d in demand {
            if d.requests_per_s > 0.0 {
                asked[d.model.0 as usize] = true;
            }
        }
        let demanded: Vec<bool> = models
            .iter()
            .zip(&asked)
            .map(|(m, a)| *a || m.min_replicas > 0)
            .collect();
        let mut held = HashMap::new();
        for r in &current.replicas {
            for s in &r.shards {
                held.insert((s.node, r.model), s.layers.clone());
            }
        }
        Self {
            topology,
            models,
            demand,
            current,
            config,
            free_mem: topology.nodes.iter().map(|n| n.memory_bytes).collect(),
            free_work: topology
                .nodes
                .iter()
                .map(|n| n.tokens_per_s * (1.0 - config.headroom))
                .collect(),
            replicas: Vec::new(),
            at: HashMap::new(),
            held,
            dropped: Vec::new(),
            allocations: Vec::new(),
            cost: PlanCost::default(),
            demanded,
            asked,
            spill_sites: HashMap::new(),
            pooled: HashMap::new(),
            clouds: topology
                .sites
                .iter()
                .enumerate()
                .filter(|(_, s)| s.kind == SiteKind::Cloud)
                .map(|(i, _)| {
                    let sid = SiteId(i as u32);
                    let fastest = topology
                        .nodes_at(sid)
                        .iter()
                        .map(|&n| topology.node(n).sequence_tokens_per_s())
                        .fold(0.0, f64::max);
                    (sid, fastest)
                })
                .filter(|&(_, f)| f > 0.0)
                .collect(),
        }
    }

    fn work(&self, d: usize) -> f64 {
        let d = &self.demand[d];
        d.work_tokens_per_s(&self.models[d.model.0 as usize], self.config.prefill_share)
    }

    fn keep_current(&mut self) {
        let mut kept_of = vec![0u32; self.models.len()];
        for r in &self.current.replicas {
            // a model only its floor keeps placed keeps no more than that
            let floor_only = self.models.get(r.model.0 as usize).is_some_and(|m| {
                !self.asked[r.model.0 as usize] && kept_of[r.model.0 as usize] >= m.min_replicas
            });
            let checked = if floor_only {
                Err(DropReason::NoDemand)
            } else {
                self.check_current(r)
            };
            match checked {
                Ok(()) => {
                    let m = &self.models[r.model.0 as usize];
                    for s in &r.shards {
                        self.free_mem[s.node.0 as usize] -= m.shard_memory(
                            s.layers.end - s.layers.start,
                            self.config.kv_reserve_tokens,
                        );
                    }
                    let mut kept = r.clone();
                    kept.reasons = vec![Reason::Kept];
                    kept_of[r.model.0 as usize] += 1;
                    self.push_replica(kept);
                }
                Err(why) => self.dropped.push((r.clone(), why)),
            }
        }
    }

    fn check_current(&self, r: &Replica) -> Result<(), DropReason> {
        let Some(m) = self.models.get(r.model.0 as usize) else {
            return Err(DropReason::Invalid);
        };
        if !self.demanded[r.model.0 as usize] {
            return Err(DropReason::NoDemand);
        }
        let mut next = 0;
        for s in &r.shards {
            let Some(node) = self.topology.nodes.get(s.node.0 as usize) else {
                return Err(DropReason::NodeGone { node: s.node });
            };
            if node.site != r.site || s.layers.start != next || s.layers.end <= s.layers.start {
                return Err(DropReason::Invalid);
            }
            next = s.layers.end;
            let need = m.shard_memory(s.layers.end - s.layers.start, self.config.kv_reserve_tokens);
            if need > self.free_mem[s.node.0 as usize] {
                return Err(DropReason::OverMemory { node: s.node });
            }
        }
        if next != m.layers {
            return Err(DropReason::Invalid);
        }
        Ok(())
    }

    fn push_replica(&mut self, r: Replica) -> usize {
        let i = self.replicas.len();
        self.at.entry((r.site, r.model)).or_default().push(i);
        self.replicas.push(r);
        i
    }

    /// Work tokens/s the replica can still take.
    fn spare(&self, r: usize) -> f64 {
        let r = &self.replicas[r];
        let layers = self.models[r.model.0 as usize].layers as f64;
        r.shards
            .iter()
            .map(|s| {
                let frac = (s.layers.end - s.layers.start) as f64 / layers;
                self.free_work[s.node.0 as usize].max(0.0) / frac
            })
            .fold(f64::INFINITY, f64::min)
    }

    fn take(&mut self, r: usize, work: f64) {
        let layers = self.models[self.replicas[r].model.0 as usize].layers as f64;
        for s in &self.replicas[r].shards {
            let frac = (s.layers.end - s.layers.start) as f64 / layers;
            self.free_work[s.node.0 as usize] -= work * frac;
        }
    }

    /// Expected latency (ms) of one request of demand `d` on replica `r`.
    fn expected_ms(&self, d: &Demand, r: usize) -> f64 {
        let r = &self.replicas[r];
        let m = &self.models[r.model.0 as usize];
        let link = self.topology.link(d.site, r.site);
        let local = self.topology.link(r.site, r.site);
        let bytes = (d.prompt_tokens + d.output_tokens) * WIRE_BYTES_PER_TOKEN;
        let mut per_token_s = 0.0;
        for s in &r.shards {
            let frac = (s.layers.end - s.layers.start) as f64 / m.layers as f64;
            per_token_s +=
                frac * m.compute_per_token / self.topology.node(s.node).sequence_tokens_per_s();
        }
        let hops = (r.shards.len() - 1) as f64 * local.rtt_ms;
        let tokens = d.output_tokens + d.prompt_tokens * self.config.prefill_share;
        link.rtt_ms
            + link.transfer_ms(bytes)
            + tokens * per_token_s * 1000.0
            + hops * d.output_tokens.max(1.0)
    }

    fn allocate(&mut self, di: usize, r: usize, work: f64, per_request_work: f64) {
        let d = &self.demand[di];
        self.take(r, work);
        let rps = work / per_request_work;
        let expected_ms = self.expected_ms(d, r);
        let class = self.topology.link(d.site, self.replicas[r].site).class;
        if class.crosses_core() {
            self.cost.core_bytes_per_s +=
                rps * (d.prompt_tokens + d.output_tokens) * WIRE_BYTES_PER_TOKEN;
        }
        if d.deadline_ms.is_some_and(|dl| expected_ms > dl) {
            self.cost.misses_per_s += rps;
        }
        self.allocations.push(Allocation {
            demand: di,
            replica: r,
            requests_per_s: rps,
            expected_ms,
        });
    }

    /// Request bytes per unit of compute.
    fn density(&self, d: usize) -> f64 {
        self.demand[d].wire_bytes_per_s() / self.work(d).max(1e-12)
    }

    /// Serves demand `di` at its own site; returns the work left over.
    fn serve_local(&mut self, di: usize) -> f64 {
        let d = &self.demand[di];
        if d.requests_per_s <= 0.0 {
            return 0.0;
        }
        let total = self.work(di);
        let per_request = total / d.requests_per_s;
        let (site, model) = (d.site, d.model);
        let mut left = self.use_existing(di, site, model, total, per_request);
        while left > per_request * 1e-6 {
            let Some(r) = self.place_local(di, left) else {
                break;
            };
            left = self.fill(di, r, left, per_request);
        }
        left
    }

    /// Spills `left` work of demand `di` to other sites, nearest first;
    /// what no site can take is unserved.
    fn spill(&mut self, di: usize, mut left: f64) -> f64 {
        let d = &self.demand[di];
        if left <= 0.0 || d.requests_per_s <= 0.0 {
            return 0.0;
        }
        let per_request = self.work(di) / d.requests_per_s;
        let (site, model) = (d.site, d.model);
        let start = left;
        // a neighbour's spill may have placed a replica here since
        left = self.use_existing(di, site, model, left, per_request);
        for s in self.spill_order(site) {
            if left <= per_request * 1e-6 {
                break;
            }
            left = self.use_existing(di, s, model, left, per_request);
            while left > per_request * 1e-6 && self.worth_placing(di, s, left) {
                let Some(r) = self.place_at(s, model) else {
                    break;
                };
                let class = self.topology.link(site, s).class;
                self.replicas[r]
                    .reasons
                    .push(Reason::Spill { from: site, class });
                left = self.fill(di, r, left, per_request);
            }
        }
        self.pool(di, -(start - left.max(0.0)));
        if left > per_request * 1e-6 {
            self.cost.unserved_per_s += left / per_request;
            return left;
        }
        0.0
    }

    /// Adds (or, negative, removes) `work` of edge demand `di` to its
    /// region's pool of traffic that no local replica serves.
    fn pool(&mut self, di: usize, work: f64) {
        let d = &self.demand[di];
        let site = self.topology.site(d.site);
        if site.kind != SiteKind::Edge || work == 0.0 {
            return;
        }
        let bytes = work * self.density(di);
        let e = self.pooled.entry((site.region, d.model)).or_insert(0.0);
        *e = (*e + bytes).max(0.0);
    }

    fn fill(&mut self, di: usize, r: usize, left: f64, per_request: f64) -> f64 {
        let w = self.spare(r).min(left);
        if w <= 0.0 {
            return left;
        }
        self.allocate(di, r, w, per_request);
        left - w
    }

    fn use_existing(
        &mut self,
        di: usize,
        site: SiteId,
        model: ModelId,
        mut left: f64,
        per_request: f64,
    ) -> f64 {
        let Some(list) = self.at.get(&(site, model)).cloned() else {
            return left;
        };
        for r in list {
            if left <= per_request * 1e-6 {
                break;
            }
            let w = self.spare(r).min(left);
            if w > 0.0 {
                self.allocate(di, r, w, per_request);
                left -= w;
            }
        }
        left
    }

    /// Whether some cloud node could hold a whole replica of `model`: the
    /// fallback an edge replica is weighed against.
    fn cloud_can_hold(&self, model: ModelId) -> bool {
        let m = &self.models[model.0 as usize];
        let need = m.shard_memory(m.layers, self.config.kv_reserve_tokens);
        self.topology
            .nodes
            .iter()
            .any(|n| self.topology.site(n.site).kind == SiteKind::Cloud && n.memory_bytes >= need)
    }

    /// Whether a new replica of demand `di`'s model at edge site `site`,
    /// taking `left` of its work, is worth the weights it moves: against
    /// serving that share from the cloud, it saves the share's bytes over
    /// the core and, when the cloud is too far for the deadline, its misses;
    /// with no cloud that could hold the model, the share would go
    /// unserved. Cloud sites are always worth it: they are the last resort.
    fn worth_placing(&self, di: usize, site: SiteId, left: f64) -> bool {
        let here = self.topology.site(site);
        if here.kind != SiteKind::Edge {
            return true;
        }
        let d = &self.demand[di];
        let m = &self.models[d.model.0 as usize];
        let share = left / self.work(di);
        let mut bytes = d.wire_bytes_per_s() * share;
        if site != d.site {
            // A replica at a neighbour serves the whole region's leftover
            // traffic for the model, as far as the node's compute reaches.
            let pooled = self
                .pooled
                .get(&(here.region, d.model))
                .copied()
                .unwrap_or(0.0);
            let reach = self
                .topology
                .nodes_at(site)
                .iter()
                .map(|n| self.free_work[n.0 as usize])
                .fold(0.0, f64::max)
                * self.density(di);
            bytes = bytes.max(pooled.min(reach));
        }
        let core_price = self.topology.defaults.cost_per_byte(LinkClass::EdgeToCore);
        let remote = bytes * self.config.amortize_s * core_price;
        let miss = match d.deadline_ms {
            Some(dl) if self.remote_floor_ms(d) > dl => {
                d.requests_per_s * share * self.config.amortize_s * self.config.miss_penalty
            }
            _ => 0.0,
        };
        let unserved = if self.cloud_can_hold(d.model) {
            0.0
        } else {
            d.requests_per_s * share * self.config.amortize_s * self.config.unserved_penalty
        };
        let move_cost = m.total_bytes() as f64 * self.weight_price(site, d.model);
        move_cost < remote + miss + unserved
    }

    /// Places a replica at the demand's own site if that is worth the move.
    fn place_local(&mut self, di: usize, left: f64) -> Option<usize> {
        let d = &self.demand[di];
        let (site, model) = (d.site, d.model);
        if !self.worth_placing(di, site, left) {
            return None;
        }
        let share = left / self.work(di);
        let rps = d.requests_per_s * share;
        let saved = if self.topology.site(site).kind == SiteKind::Edge {
            d.wire_bytes_per_s() * share
        } else {
            0.0
        };
        let r = self.place_at(site, model)?;
        let moved = self.moved_bytes(r);
        self.replicas[r].reasons.push(Reason::LocalDemand {
            requests_per_s: rps,
            core_bytes_per_s_saved: saved,
            moved_bytes: moved,
        });
        Some(r)
    }

    /// The least latency a request from `d.site` could see from the nearest
    /// cloud site: round trip plus its tokens on the fastest cloud node.
    fn remote_floor_ms(&self, d: &Demand) -> f64 {
        let m = &self.models[d.model.0 as usize];
        self.clouds
            .iter()
            .map(|&(sid, fastest)| {
                self.topology.link(d.site, sid).rtt_ms
                    + d.output_tokens * m.compute_per_token / fastest * 1000.0
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// Price per weight byte of bringing `model` to `site`: free if a node
    /// there holds it already, else over the core.
    fn weight_price(&self, site: SiteId, model: ModelId) -> f64 {
        self.topology
            .defaults
            .cost_per_byte(self.weight_source(site, model))
    }

    /// The path weights of `model` take to reach `site`: local if a node
    /// there holds (or held) it, else from the core.
    fn weight_source(&self, site: SiteId, model: ModelId) -> LinkClass {
        let here = self.at.get(&(site, model)).is_some_and(|v| !v.is_empty())
            || self
                .topology
                .nodes_at(site)
                .iter()
                .any(|&n| self.held.contains_key(&(n, model)));
        if here {
            LinkClass::Local
        } else if self.topology.site(site).kind == SiteKind::Edge {
            LinkClass::EdgeToCore
        } else {
            LinkClass::CoreToCore
        }
    }

    /// Weight bytes replica `r` needs that its nodes did not hold before.
    fn moved_bytes(&self, r: usize) -> u64 {
        let r = &self.replicas[r];
        let m = &self.models[r.model.0 as usize];
        let mut moved = 0;
        for s in &r.shards {
            match self.held.get(&(s.node, r.model)) {
                Some(had) => {
                    let overlap = s
                        .layers
                        .end
                        .min(had.end)
                        .saturating_sub(s.layers.start.max(had.start));
                    moved += m.bytes_per_layer * u64::from(s.layers.end - s.layers.start - overlap);
                }
                None => moved += m.shard_bytes(s.layers.end - s.layers.start),
            }
        }
        moved
    }

    /// Places a new replica of `model` at `site`: whole on the node with the
    /// most spare compute that fits it, else sharded over the nodes with the
    /// most free memory.
    fn place_at(&mut self, site: SiteId, model: ModelId) -> Option<usize> {
        let m = &self.models[model.0 as usize];
        let kv = self.config.kv_reserve_tokens;
        let need = m.shard_memory(m.layers, kv);
        let nodes = self.topology.nodes_at(site);
        let whole = nodes
            .iter()
            .copied()
            .filter(|n| self.free_mem[n.0 as usize] >= need && self.free_work[n.0 as usize] > 0.0)
            .max_by(|a, b| {
                self.free_work[a.0 as usize]
                    .total_cmp(&self.free_work[b.0 as usize])
                    .then(b.cmp(a))
            });
        let (shards, reasons) = match whole {
            Some(n) => (
                vec![Shard {
                    node: n,
                    layers: 0..m.layers,
                }],
                Vec::new(),
            ),
            None => {
                let shards = self.split(site, m)?;
                let largest = nodes
                    .iter()
                    .map(|n| self.free_mem[n.0 as usize])
                    .max()
                    .unwrap_or(0);
                (
                    shards,
                    vec![Reason::Sharded {
                        model_bytes: need,
                        largest_free_bytes: largest,
                    }],
                )
            }
        };
        for s in &shards {
            self.free_mem[s.node.0 as usize] -= m.shard_memory(s.layers.end - s.layers.start, kv);
        }
        let source = self.weight_source(site, model);
        let r = self.push_replica(Replica {
            model,
            site,
            shards,
            reasons,
        });
        let moved = self.moved_bytes(r);
        self.cost.moved_bytes += moved;
        if source.crosses_core() {
            self.cost.moved_core_bytes += moved;
        }
        Some(r)
    }

    /// Places replicas of every model with fewer than its `min_replicas`:
    /// only at its `sites` when it names some; at sites without one first
    /// (spread), its preferred kind of site first (edge when it has none),
    /// the site with the most free memory first; as many as fit.
    fn meet_floors(&mut self) {
        for mi in 0..self.models.len() {
            let model = ModelId(mi as u32);
            let floor = self.models[mi].min_replicas;
            let allowed = &self.models[mi].sites;
            let first = self.models[mi].prefer.unwrap_or(SiteKind::Edge);
            loop {
                let have = self.replicas.iter().filter(|r| r.model == model).count();
                if have >= floor as usize {
                    break;
                }
                let mut sites: Vec<SiteId> = (0..self.topology.sites.len())
                    .map(|i| SiteId(i as u32))
                    .filter(|s| allowed.is_empty() || allowed.contains(s))
                    .collect();
                sites.sort_by_key(|&site| {
                    let free: u64 = self
                        .topology
                        .nodes_at(site)
                        .iter()
                        .map(|n| self.free_mem[n.0 as usize])
                        .sum();
                    (
                        self.at.get(&(site, model)).map_or(0, Vec::len),
                        self.topology.sites[site.0 as usize].kind != first,
                        std::cmp::Reverse(free),
                        site,
                    )
                });
                let Some(r) = sites
                    .into_iter()
                    .find_map(|site| self.place_at(site, model))
                else {
                    break;
                };
                self.replicas[r].reasons.push(Reason::MinReplicas {
                    min_replicas: floor,
                });
            }
        }
    }

    /// Layer ranges over the site's nodes with the most free memory, each
    /// taking as many layers as fit; `None` if the site cannot hold the model.
    fn split(&self, site: SiteId, m: &ModelSpec) -> Option<Vec<Shard>> {
        let mut nodes: Vec<NodeId> = self
            .topology
            .nodes_at(site)
            .iter()
            .copied()
            .filter(|n| {
                self.free_work[n.0 as usize] > 0.0
                    && self.free_mem[n.0 as usize]
                        >= m.shard_memory(1, self.config.kv_reserve_tokens)
            })
            .collect();
        nodes.sort_by(|a, b| {
            self.free_mem[b.0 as usize]
                .cmp(&self.free_mem[a.0 as usize])
                .then(a.cmp(b))
        });
        // Take nodes until their room covers the model, then share the
        // layers in proportion to each one's room, so the chain's stages
        // are balanced rather than one full node and a sliver.
        let mut chosen: Vec<(NodeId, u32)> = Vec::new();
        let mut room = 0u32;
        for n in nodes {
            if room >= m.layers {
                break;
            }
            let per_layer = m.bytes_per_layer + m.kv_bytes_per_layer(self.config.kv_reserve_tokens);
            let fit = (self.free_mem[n.0 as usize] - m.shared_bytes) / per_layer.max(1);
            let fit = fit.min(u64::from(m.layers)) as u32;
            if fit > 0 {
                chosen.push((n, fit));
                room += fit;
            }
        }
        if room < m.layers {
            return None;
        }
        let mut take: Vec<u32> = chosen
            .iter()
            .map(|&(_, fit)| (u64::from(m.layers) * u64::from(fit) / u64::from(room)) as u32)
            .collect();
        let mut short = m.layers - take.iter().sum::<u32>();
        while short > 0 {
            // rounding left a few layers: give them to nodes with room left
            for (t, &(_, fit)) in take.iter_mut().zip(&chosen) {
                if short > 0 && *t < fit {
                    *t += 1;
                    short -= 1;
                }
            }
        }
        let mut shards = Vec::new();
        let mut next = 0;
        for (&(n, _), &t) in chosen.iter().zip(&take) {
            if t == 0 {
                continue;
            }
            shards.push(Shard {
                node: n,
                layers: next..next + t,
            });
            next += t;
        }
        (next == m.layers).then_some(shards)
    }

    /// Sites a demand at `site` may spill to: edge sites of its region, then
    /// cloud sites, each group nearest first, at most `max_spill_sites`.
    fn spill_order(&mut self, site: SiteId) -> Vec<SiteId> {
        if let Some(v) = self.spill_sites.get(&site) {
            return v.clone();
        }
        let here = self.topology.site(site);
        let mut edge = Vec::new();
        let mut cloud = Vec::new();
        for (i, s) in self.topology.sites.iter().enumerate() {
            let id = SiteId(i as u32);
            if id == site {
                continue;
            }
            let rtt = self.topology.link(site, id).rtt_ms;
            match s.kind {
                SiteKind::Edge if here.kind == SiteKind::Edge && s.region == here.region => {
                    edge.push((rtt, id))
                }
                SiteKind::Cloud => cloud.push((rtt, id)),
                _ => {}
            }
        }
        edge.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        cloud.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        // Keep room for the cloud: it is the spill of last resort.
        let n = self.config.max_spill_sites;
        let clouds = cloud.len().min(n / 2).max(cloud.len().min(1));
        edge.truncate(n.saturating_sub(clouds));
        cloud.truncate(n - edge.len().min(n));
        let v: Vec<SiteId> = edge.into_iter().chain(cloud).map(|(_, s)| s).collect();
        self.spill_sites.insert(site, v.clone());
        v
    }

    fn finish(mut self) -> Plan {
        // Stable order: model, site, first node; allocations follow the renumbering.
        let mut idx: Vec<usize> = (0..self.replicas.len()).collect();
        idx.sort_by_key(|&i| {
            let r = &self.replicas[i];
            (r.model, r.site, r.shards[0].node, r.shards[0].layers.start)
        });
        let mut new_of = vec![0; idx.len()];
        for (new, &old) in idx.iter().enumerate() {
            new_of[old] = new;
        }
        let replicas: Vec<Replica> = idx.iter().map(|&i| self.replicas[i].clone()).collect();
        for a in &mut self.allocations {
            a.replica = new_of[a.replica];
        }
        let core_price = self.topology.defaults.cost_per_byte(LinkClass::EdgeToCore);
        let c = &mut self.cost;
        c.objective = c.core_bytes_per_s * self.config.amortize_s * core_price
            + (c.misses_per_s * self.config.miss_penalty
                + c.unserved_per_s * self.config.unserved_penalty)
                * self.config.amortize_s
            + c.moved_core_bytes as f64 * core_price;
        Plan {
            placement: Placement { replicas },
            dropped: self.dropped,
            allocations: self.allocations,
            cost: self.cost,
        }
    }
}
