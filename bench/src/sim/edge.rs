//! Edge sites with gateways and one cloud region, agent demand mostly at the
//! edge, wide-area links between them. Three policies:
//!
//! - `cloud-only`: every model in the cloud; weft's router picks among cloud nodes.
//! - `nearest`: every edge site holds every model that fits (sharded when it
//!   must), plus the cloud; each request goes to the replica with the lowest
//!   round trip (the least loaded among equals).
//! - `weft`: `weft_placement::solve` places replicas from the demand, and
//!   `weft_placement::route` sends each request.

use std::collections::BTreeSet;

use anyhow::Result;
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use weft_placement::{
    route, solve, Candidate, Criticality, Demand, Intent, LinkDefaults, ModelId, ModelSpec, Node,
    NodeId, Placement, Replica, RouteRequest, RouterConfig, Shard, Site, SiteId, SiteKind,
    SolverConfig, Topology, WIRE_BYTES_PER_TOKEN,
};

use super::engine::{Job, Ms, Network, PoissonStreams, Policy, Sim, SimNode, View};
use super::{write_table, Common, Summary};

/// Gateways per edge site.
pub const GATEWAYS_PER_SITE: usize = 2;
/// Gateway memory for weights (bytes).
pub const GATEWAY_MEMORY: u64 = 8 << 30;
/// Gateway batch slots.
pub const GATEWAY_SLOTS: u32 = 8;
/// Cloud nodes in the region.
pub const CLOUD_NODES: usize = 8;
/// Cloud node memory for weights (bytes).
pub const CLOUD_MEMORY: u64 = 80 << 30;
/// Cloud node batch slots.
pub const CLOUD_SLOTS: u32 = 32;
/// Unit-compute tokens/s of one slot, edge and cloud alike: a cloud GPU is
/// faster, but it runs far larger batches, so the rate one sequence sees is
/// about the same; the cloud's advantage is its many more slots.
pub const SLOT_TOKENS_PER_S: f64 = 300.0;
/// Price per unit-compute token at the edge (owned hardware) and in the cloud.
pub const EDGE_COST_PER_TOKEN: f64 = 2e-8;
/// See `EDGE_COST_PER_TOKEN`.
pub const CLOUD_COST_PER_TOKEN: f64 = 1e-7;
/// Mean prompt tokens (agents send their context).
pub const PROMPT_TOKENS: f64 = 4000.0;
/// Cost of a prompt token relative to a decoded one.
pub const PREFILL_SHARE: f64 = 0.02;
/// Shares of critical, standard and sheddable requests.
pub const CLASS_MIX: [(Criticality, f64, f64); 3] = [
    (Criticality::Critical, 0.2, 5_000.0),
    (Criticality::Standard, 0.6, 8_000.0),
    (Criticality::Sheddable, 0.2, 15_000.0),
];
/// Demand weight of each edge site (site 0 is a hot spot).
pub const SITE_WEIGHTS: [f64; 8] = [3.0, 1.0, 1.0, 1.0, 0.8, 0.8, 0.6, 0.6];
/// Extra one-way delay on edge-core paths: exponential with this mean (ms).
pub const WAN_JITTER_MS: f64 = 20.0;
/// Same, on edge-edge paths.
pub const METRO_JITTER_MS: f64 = 2.0;
/// Load reports every this many ms.
pub const REPORT_MS: f64 = 100.0;
/// Seconds over which the solver amortises moving weights: a placement is
/// expected to hold for a day.
pub const AMORTIZE_S: f64 = 86_400.0;

/// Turns of one agent session (`sim edge`'s session workload).
pub const SESSION_TURNS: usize = 6;
/// Its first turn's context: system prompt and tool definitions (tokens).
pub const SESSION_CONTEXT_TOKENS: f64 = 1500.0;
/// What each later turn appends (a tool output, the answer): tokens.
pub const TURN_APPEND_TOKENS: f64 = 200.0;
/// Cost of a prompt token relative to a decoded one in the session
/// workload: edge gateways prefill on CPUs, where a prompt token costs
/// about a tenth of a decoded one (`bench/results/runtime.md`).
pub const SESSION_PREFILL_SHARE: f64 = 0.1;
/// Sessions a node's prefix cache keeps, per batch slot.
pub const CACHE_SESSIONS_PER_SLOT: usize = 2;

/// `sim edge` arguments.
#[derive(Parser, Debug, Clone)]
pub struct EdgeArgs {
    #[command(flatten)]
    pub common: Common,
    /// Simulated seconds.
    #[arg(long, default_value_t = 120.0)]
    pub seconds: f64,
}

/// A model served in the scenario, with its demand per unit of site weight.
struct Served {
    spec: ModelSpec,
    /// Requests/s per unit of site weight at the edge.
    edge_rate: f64,
    /// Requests/s from agents in the cloud region.
    cloud_rate: f64,
    output_tokens: f64,
}

fn models() -> Vec<Served> {
    // KV bytes per token: layers x 2 (K and V) x KV heads x head dim x 2 bytes,
    // as Gemma 3 270M / 4B / 12B / 27B have them (no sliding-window saving).
    let m = |name: &str, layers, mb_per_layer: u64, shared_mb: u64, c, kv| ModelSpec {
        name: name.into(),
        layers,
        bytes_per_layer: mb_per_layer << 20,
        shared_bytes: shared_mb << 20,
        compute_per_token: c,
        kv_bytes_per_token: kv,
        hidden_bytes_per_token: 0,
        min_replicas: 0,
        prefer: None,
        sites: Vec::new(),
    };
    vec![
        Served {
            spec: m("small (270M-class)", 18, 12, 40, 0.25, 18 * 2 * 256 * 2),
            edge_rate: 20.0,
            cloud_rate: 4.0,
            output_tokens: 32.0,
        },
        Served {
            spec: m("medium (4B-class)", 34, 70, 400, 1.0, 34 * 2 * 4 * 256 * 2),
            edge_rate: 5.0,
            cloud_rate: 2.0,
            output_tokens: 96.0,
        },
        Served {
            spec: m("large (12B-class)", 48, 150, 800, 3.0, 48 * 2 * 8 * 256 * 2),
            edge_rate: 0.5,
            cloud_rate: 1.0,
            output_tokens: 128.0,
        },
        Served {
            spec: m(
                "huge (27B-class)",
                62,
                250,
                1500,
                5.0,
                62 * 2 * 16 * 128 * 2,
            ),
            edge_rate: 0.2,
            cloud_rate: 0.5,
            output_tokens: 160.0,
        },
    ]
}

/// The scenario's topology: `SITE_WEIGHTS.len()` edge sites in two regions,
/// then one cloud site.
fn topology() -> Topology {
    let edges = SITE_WEIGHTS.len();
    let mut sites: Vec<Site> = (0..edges)
        .map(|i| Site {
            kind: SiteKind::Edge,
            region: (i * 2 / edges) as u32,
        })
        .collect();
    sites.push(Site {
        kind: SiteKind::Cloud,
        region: 0,
    });
    let mut nodes = Vec::new();
    for s in 0..edges {
        for _ in 0..GATEWAYS_PER_SITE {
            nodes.push(Node {
                site: SiteId(s as u32),
                memory_bytes: GATEWAY_MEMORY,
                tokens_per_s: SLOT_TOKENS_PER_S * GATEWAY_SLOTS as f64,
                slots: GATEWAY_SLOTS,
                accelerator: true,
                cost_per_token: EDGE_COST_PER_TOKEN,
            });
        }
    }
    for _ in 0..CLOUD_NODES {
        nodes.push(Node {
            site: SiteId(edges as u32),
            memory_bytes: CLOUD_MEMORY,
            tokens_per_s: SLOT_TOKENS_PER_S * CLOUD_SLOTS as f64,
            slots: CLOUD_SLOTS,
            accelerator: true,
            cost_per_token: CLOUD_COST_PER_TOKEN,
        });
    }
    Topology::new(sites, nodes, LinkDefaults::default()).expect("the scenario's topology is valid")
}

fn demand(models: &[Served], cloud: SiteId) -> Vec<Demand> {
    let mut v = Vec::new();
    let deadline = CLASS_MIX.iter().map(|c| c.1 * c.2).sum::<f64>();
    for (m, s) in models.iter().enumerate() {
        for (site, w) in SITE_WEIGHTS.iter().enumerate() {
            v.push(Demand {
                site: SiteId(site as u32),
                model: ModelId(m as u32),
                requests_per_s: s.edge_rate * w,
                prompt_tokens: PROMPT_TOKENS,
                output_tokens: s.output_tokens,
                deadline_ms: Some(deadline),
            });
        }
        v.push(Demand {
            site: cloud,
            model: ModelId(m as u32),
            requests_per_s: s.cloud_rate,
            prompt_tokens: PROMPT_TOKENS,
            output_tokens: s.output_tokens,
            deadline_ms: Some(deadline),
        });
    }
    v
}

/// Which policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgePolicy {
    /// Everything in the cloud.
    CloudOnly,
    /// Everything everywhere it fits; the nearest replica.
    Nearest,
    /// The solver's placement and the router.
    Weft,
}

impl EdgePolicy {
    /// All, in table order.
    pub const ALL: [EdgePolicy; 3] = [Self::CloudOnly, Self::Nearest, Self::Weft];

    /// The name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::CloudOnly => "cloud-only",
            Self::Nearest => "nearest",
            Self::Weft => "weft",
        }
    }
}

/// Every cloud node holds every model.
fn cloud_placement(t: &Topology, models: &[ModelSpec], cloud: SiteId) -> Placement {
    let mut replicas = Vec::new();
    for (m, spec) in models.iter().enumerate() {
        for &n in t.nodes_at(cloud) {
            replicas.push(Replica {
                model: ModelId(m as u32),
                site: cloud,
                shards: vec![Shard {
                    node: n,
                    layers: 0..spec.layers,
                }],
                reasons: Vec::new(),
            });
        }
    }
    Placement { replicas }
}

/// Every edge site holds every model that fits (weights and the solver's
/// default KV reserve), most requested first: whole on the gateway with the
/// most free memory, else split over the site's gateways by free memory;
/// plus the cloud placement.
fn naive_placement(t: &Topology, models: &[ModelSpec], cloud: SiteId) -> Placement {
    let mut p = cloud_placement(t, models, cloud);
    let mut free: Vec<u64> = t.nodes.iter().map(|n| n.memory_bytes).collect();
    for s in 0..t.sites.len() {
        let site = SiteId(s as u32);
        if t.site(site).kind != SiteKind::Edge {
            continue;
        }
        for (m, spec) in models.iter().enumerate() {
            let mut nodes: Vec<NodeId> = t.nodes_at(site).to_vec();
            nodes.sort_by(|a, b| free[b.0 as usize].cmp(&free[a.0 as usize]).then(a.cmp(b)));
            let kv = SolverConfig::default().kv_reserve_tokens;
            let shards = if free[nodes[0].0 as usize] >= spec.shard_memory(spec.layers, kv) {
                vec![Shard {
                    node: nodes[0],
                    layers: 0..spec.layers,
                }]
            } else {
                let mut shards = Vec::new();
                let mut next = 0;
                for &n in &nodes {
                    let f = free[n.0 as usize].saturating_sub(spec.shared_bytes)
                        / (spec.bytes_per_layer + spec.kv_bytes_per_layer(kv));
                    let take = (f as u32).min(spec.layers - next);
                    if take > 0 {
                        shards.push(Shard {
                            node: n,
                            layers: next..next + take,
                        });
                        next += take;
                    }
                }
                if next < spec.layers {
                    continue;
                }
                shards
            };
            for sh in &shards {
                free[sh.node.0 as usize] -= spec.shard_memory(sh.layers.end - sh.layers.start, kv);
            }
            p.replicas.push(Replica {
                model: ModelId(m as u32),
                site,
                shards,
                reasons: Vec::new(),
            });
        }
    }
    p
}

/// Heads of each model's replicas, and the per-token hop delay of chains.
struct Served2 {
    heads: Vec<Vec<usize>>,
    hop_ms: Vec<Vec<f64>>,
}

fn heads(t: &Topology, p: &Placement, n_models: usize) -> Served2 {
    let mut heads = vec![BTreeSet::new(); n_models];
    let mut hop_ms = vec![vec![0.0; n_models]; t.nodes.len()];
    for r in &p.replicas {
        let head = r.shards[0].node.0 as usize;
        heads[r.model.0 as usize].insert(head);
        let local = t.link(r.site, r.site).rtt_ms;
        hop_ms[head][r.model.0 as usize] = (r.shards.len() - 1) as f64 * local / 2.0;
    }
    Served2 {
        heads: heads.into_iter().map(|s| s.into_iter().collect()).collect(),
        hop_ms,
    }
}

/// Open-loop Poisson streams, one per (site, model, class).
struct Streams {
    /// (origin, model, class, deadline, rate per ms, output tokens)
    streams: Vec<(usize, usize, Criticality, f64, f64, f64)>,
    compute: Vec<f64>,
    rng: StdRng,
    /// Multi-turn agent sessions: each stream's current session and turn
    /// (`None`: independent requests).
    sessions: Option<Vec<(usize, usize)>>,
    /// Sessions begun so far.
    next_session: usize,
}

impl Streams {
    fn job(&mut self, stream: usize, at: Ms) -> (Ms, Job) {
        let (origin, model, class, deadline, _, out) = self.streams[stream];
        let tokens = (out * (0.5 + self.rng.random::<f64>())).round().max(1.0);
        let c = self.compute[model];
        if let Some(sessions) = self.sessions.as_mut() {
            // an agent's turn: its context, plus what the turns before added
            let (session, turn) = &mut sessions[stream];
            if *turn == SESSION_TURNS {
                self.next_session += 1;
                *session = self.next_session;
                *turn = 0;
            }
            let prompt = SESSION_CONTEXT_TOKENS + *turn as f64 * TURN_APPEND_TOKENS;
            let cached = if *turn == 0 {
                0.0
            } else {
                prompt - TURN_APPEND_TOKENS
            };
            *turn += 1;
            let job = Job {
                origin,
                agent: Some(stream),
                class,
                deadline_ms: Some(deadline),
                work: (tokens + prompt * SESSION_PREFILL_SHARE) * c,
                expected_work: (out + prompt * SESSION_PREFILL_SHARE) * c,
                bytes: (prompt + tokens) * WIRE_BYTES_PER_TOKEN,
                issued: at,
                model,
                tokens,
                session: Some(*session),
                prefix_work: cached * SESSION_PREFILL_SHARE * c,
                prefill_work: prompt * SESSION_PREFILL_SHARE * c,
            };
            return (at, job);
        }
        let prompt = PROMPT_TOKENS * (0.5 + self.rng.random::<f64>());
        (
            at,
            Job {
                origin,
                agent: Some(stream),
                class,
                deadline_ms: Some(deadline),
                work: (tokens + prompt * PREFILL_SHARE) * c,
                expected_work: (out + PROMPT_TOKENS * PREFILL_SHARE) * c,
                bytes: (prompt + tokens) * WIRE_BYTES_PER_TOKEN,
                issued: at,
                model,
                tokens,
                session: None,
                prefix_work: 0.0,
                prefill_work: prompt * PREFILL_SHARE * c,
            },
        )
    }
}

impl PoissonStreams for Streams {
    fn streams(&self) -> usize {
        self.streams.len()
    }

    fn rate_per_ms(&self, s: usize) -> f64 {
        self.streams[s].4
    }

    fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    fn job(&mut self, s: usize, at: Ms) -> (Ms, Job) {
        Streams::job(self, s, at)
    }
}

/// Routes with weft's router among the heads of the request's model.
struct Routed<'a> {
    t: &'a Topology,
    heads: &'a [Vec<usize>],
    compute: &'a [f64],
    outputs: &'a [f64],
    config: RouterConfig,
    /// Requests refused, with their reasons.
    refused: usize,
    nearest: bool,
    /// Give the router each node's cached share of the prompt (from the
    /// sessions its last report said it holds).
    prefix_aware: bool,
    candidates: Vec<Candidate>,
}

impl Policy for Routed<'_> {
    fn choose(&mut self, job: &Job, view: &View<'_>) -> Option<usize> {
        let heads = &self.heads[job.model];
        let origin = SiteId(job.origin as u32);
        if self.nearest {
            let mut best: Option<(f64, f64, usize)> = None;
            for &n in heads {
                let rtt = self.t.link(origin, self.t.nodes[n].site).rtt_ms;
                let load = view.node_state(n, true).load();
                if best.is_none_or(|b| (rtt, load) < (b.0, b.1)) {
                    best = Some((rtt, load, n));
                }
            }
            return best.map(|b| b.2);
        }
        self.candidates.clear();
        let c = self.compute[job.model];
        let share = self.config.prefill_share;
        let prompt = if job.session.is_some() {
            job.prefill_work / (share * c)
        } else {
            PROMPT_TOKENS
        };
        for &n in heads {
            let mut state = view.node_state(n, true);
            if self.prefix_aware && job.session.is_some_and(|s| view.cached[n].contains(&s)) {
                state.cached_prompt_tokens = job.prefix_work / (share * c);
            }
            self.candidates.push(Candidate {
                state,
                link: self.t.link_estimate(origin, self.t.nodes[n].site),
            });
        }
        let req = RouteRequest {
            model: ModelId(job.model as u32),
            intent: Intent {
                criticality: job.class,
                deadline_ms: job.deadline_ms.map(|d| d as u64),
                max_cost: None,
            },
            prompt_tokens: prompt as u32,
            output_tokens: self.outputs[job.model] as u32,
            compute_per_token: self.compute[job.model],
        };
        match route(&req, &self.candidates, &self.config).choice {
            Ok(n) => Some(n.0 as usize),
            Err(_) => {
                self.refused += 1;
                None
            }
        }
    }
}

/// One policy's results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EdgeRow {
    /// Policy name.
    pub policy: &'static str,
    /// Request bytes that crossed edge-core links.
    pub core_bytes: f64,
    /// Weight bytes the placement moved over edge-core links.
    pub weight_core_bytes: u64,
    /// p95 latency per class: critical, standard, sheddable (ms).
    pub p95_ms: [f64; 3],
    /// Total price: tokens plus bytes.
    pub cost: f64,
    /// Requests completed / refused.
    pub completed: usize,
    /// See `completed`.
    pub refused: usize,
    /// With sessions: the share of later turns that found their prefix
    /// cached where they ran.
    pub hit_rate: f64,
    /// With sessions: time to first token, p50 and p95 (ms).
    pub ttft_ms: [f64; 2],
}

/// Runs one policy on independent requests.
pub fn simulate(policy: EdgePolicy, seed: u64, seconds: f64) -> Result<EdgeRow> {
    simulate_with(policy, seed, seconds, None)
}

/// Runs one policy; with `sessions` (`Some(prefix_aware)`), on agents'
/// multi-turn sessions with a prefix cache on every node, the router given
/// each node's cached share of the prompt when `prefix_aware`.
pub fn simulate_with(
    policy: EdgePolicy,
    seed: u64,
    seconds: f64,
    sessions: Option<bool>,
) -> Result<EdgeRow> {
    let t = topology();
    let served = models();
    let specs: Vec<ModelSpec> = served.iter().map(|s| s.spec.clone()).collect();
    let cloud = SiteId(SITE_WEIGHTS.len() as u32);
    let demand = demand(&served, cloud);
    let (placement, weight_core_bytes) = match policy {
        EdgePolicy::CloudOnly => (cloud_placement(&t, &specs, cloud), 0),
        EdgePolicy::Nearest => {
            let p = naive_placement(&t, &specs, cloud);
            let moved: u64 = p
                .replicas
                .iter()
                .filter(|r| r.site != cloud)
                .flat_map(|r| r.shards.iter().map(move |s| (r.model, s)))
                .map(|(m, s)| specs[m.0 as usize].shard_bytes(s.layers.end - s.layers.start))
                .sum();
            (p, moved)
        }
        EdgePolicy::Weft => {
            let config = SolverConfig {
                amortize_s: AMORTIZE_S,
                prefill_share: PREFILL_SHARE,
                ..SolverConfig::default()
            };
            let plan = solve(&t, &specs, &demand, &Placement::default(), &config)?;
            if std::env::var_os("WEFT_SIM_DEBUG").is_some() {
                for r in &plan.placement.replicas {
                    eprintln!("{} {} {:?} {:?}", r.model, r.site, r.shards, r.reasons);
                }
                eprintln!("{:?}", plan.cost);
            }
            (plan.placement, plan.cost.moved_core_bytes)
        }
    };
    let h = heads(&t, &placement, specs.len());
    let sim_nodes: Vec<SimNode> = t
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| SimNode {
            site: n.site.0 as usize,
            slots: n.slots,
            tokens_per_s: n.tokens_per_s,
            priority: policy == EdgePolicy::Weft,
            cost_per_token: n.cost_per_token,
            energy_per_token_j: 0.0,
            hop_ms_per_token: h.hop_ms[i].clone(),
            cache_sessions: if sessions.is_some() {
                n.slots as usize * CACHE_SESSIONS_PER_SLOT
            } else {
                0
            },
        })
        .collect();
    let sites = t.sites.len();
    let jitter = |a: usize, b: usize| match t.link(SiteId(a as u32), SiteId(b as u32)).class {
        weft_placement::LinkClass::EdgeToCore => WAN_JITTER_MS,
        weft_placement::LinkClass::EdgeToEdge => METRO_JITTER_MS,
        _ => 0.0,
    };
    let link = |a: usize, b: usize| t.link(SiteId(a as u32), SiteId(b as u32));
    let network = Network {
        rtt: (0..sites)
            .map(|a| (0..sites).map(|b| link(a, b).rtt_ms).collect())
            .collect(),
        bandwidth: (0..sites)
            .map(|a| {
                (0..sites)
                    .map(|b| link(a, b).bandwidth_bytes_per_s)
                    .collect()
            })
            .collect(),
        ingress_capacity: vec![None; sites],
        jitter_ms: (0..sites)
            .map(|a| (0..sites).map(|b| jitter(a, b)).collect())
            .collect(),
    };
    let sim = Sim::new(sim_nodes, network, REPORT_MS, seed ^ 0x5eed);
    let mut streams = Vec::new();
    for d in &demand {
        for &(class, share, deadline) in &CLASS_MIX {
            streams.push((
                d.site.0 as usize,
                d.model.0 as usize,
                class,
                deadline,
                d.requests_per_s * share / 1000.0,
                d.output_tokens,
            ));
        }
    }
    let compute: Vec<f64> = specs.iter().map(|m| m.compute_per_token).collect();
    let outputs: Vec<f64> = served.iter().map(|s| s.output_tokens).collect();
    let n_streams = streams.len();
    let mut workload = Streams {
        streams,
        compute: compute.clone(),
        rng: StdRng::seed_from_u64(seed),
        sessions: sessions.map(|_| (0..n_streams).map(|s| (s, 0)).collect()),
        next_session: n_streams,
    };
    let mut router = Routed {
        t: &t,
        heads: &h.heads,
        compute: &compute,
        outputs: &outputs,
        config: RouterConfig {
            prefill_share: if sessions.is_some() {
                SESSION_PREFILL_SHARE
            } else {
                PREFILL_SHARE
            },
            ..RouterConfig::default()
        },
        refused: 0,
        nearest: policy == EdgePolicy::Nearest,
        prefix_aware: sessions == Some(true),
        candidates: Vec::new(),
    };
    let run_ms = seconds * 1000.0;
    let warmup = run_ms / 6.0;
    let done = sim.run(&mut workload, &mut router, run_ms);
    let mut lat: [Vec<f64>; 3] = Default::default();
    let (mut core_bytes, mut cost, mut completed, mut refused) = (0.0, 0.0, 0, 0);
    let (mut later, mut hits, mut ttft) = (0usize, 0usize, Vec::new());
    for c in done.iter().filter(|c| c.job.issued >= warmup) {
        let Some(node) = c.node else {
            refused += 1;
            continue;
        };
        let Some(l) = c.latency_ms else { continue };
        completed += 1;
        ttft.extend(c.ttft_ms);
        if c.job.prefix_work > 0.0 {
            later += 1;
            hits += usize::from(c.hit);
        }
        lat[2 - c.job.class.priority() as usize].push(l);
        let n = &t.nodes[node];
        let link = t.link(SiteId(c.job.origin as u32), n.site);
        if link.class.crosses_core() {
            core_bytes += c.job.bytes;
        }
        cost += c.job.work * n.cost_per_token + c.job.bytes * t.defaults.cost_per_byte(link.class);
    }
    let p95 = lat.map(|mut v| Summary::of(&mut v).p95);
    let t_sum = Summary::of(&mut ttft);
    Ok(EdgeRow {
        hit_rate: hits as f64 / later.max(1) as f64,
        ttft_ms: [t_sum.p50, t_sum.p95],
        policy: policy.name(),
        core_bytes,
        weight_core_bytes,
        p95_ms: p95,
        cost,
        completed,
        refused,
    })
}

/// Runs the scenario, writes `edge.csv`, `edge.md` and `edge.png`.
pub fn run(a: &EdgeArgs) -> Result<Vec<EdgeRow>> {
    let dir = a.common.out_dir()?;
    let mut rows = Vec::new();
    for p in EdgePolicy::ALL {
        let r = simulate(p, a.common.seed, a.seconds)?;
        eprintln!(
            "{:>10}: core {:.3e} B (weights {:.3e} B), p95 {:?} ms, cost {:.4}, done {} refused {}",
            r.policy,
            r.core_bytes,
            r.weight_core_bytes as f64,
            r.p95_ms,
            r.cost,
            r.completed,
            r.refused
        );
        rows.push(r);
    }
    let mut table = vec![[
        "policy",
        "core_bytes",
        "p95_ms_critical",
        "p95_ms_standard",
        "p95_ms_sheddable",
        "cost",
    ]
    .map(String::from)
    .to_vec()];
    for r in &rows {
        table.push(vec![
            r.policy.to_string(),
            format!("{:.0}", r.core_bytes),
            format!("{:.1}", r.p95_ms[0]),
            format!("{:.1}", r.p95_ms[1]),
            format!("{:.1}", r.p95_ms[2]),
            format!("{:.4}", r.cost),
        ]);
    }
    write_table(
        dir,
        "edge",
        "sim edge: edge sites and one cloud region",
        &notes(a),
        &table,
    )?;
    let mut more = String::from(
        "\n| policy | requests completed | refused | weight bytes moved over edge-core (one-time) |\n|---|---|---|---|\n",
    );
    for r in &rows {
        more += &format!(
            "| {} | {} | {} | {} |\n",
            r.policy, r.completed, r.refused, r.weight_core_bytes
        );
    }
    more += &format!(
        "\n### Agent sessions and the prefix cache\n\nThe same sites, models, placement (`weft`) and \
classes, but each stream is agents' sessions of {SESSION_TURNS} turns: a {SESSION_CONTEXT_TOKENS}-token \
context (system prompt, tool definitions) that each turn extends by {TURN_APPEND_TOKENS} tokens, \
a prompt token costing {SESSION_PREFILL_SHARE} of a decoded one (CPU gateways). Every \
node keeps the prefixes of its {CACHE_SESSIONS_PER_SLOT} most recent sessions per slot; a turn whose \
session it holds skips that prefill. The router sees which sessions each node held at its last \
load report (every {REPORT_MS} ms) when it is prefix-aware, and nothing of them otherwise. \
`hit rate` is over turns after a session's first.\n\n\
| router | hit rate | TTFT p50 (ms) | TTFT p95 (ms) | p95 critical (ms) | p95 standard (ms) | p95 sheddable (ms) |\n|---|---|---|---|---|---|---|\n"
    );
    for (name, aware) in [("without the prefix term", false), ("prefix-aware", true)] {
        let r = simulate_with(EdgePolicy::Weft, a.common.seed, a.seconds, Some(aware))?;
        eprintln!(
            "sessions, {name}: hit rate {:.3}, TTFT p50 {:.1} p95 {:.1} ms",
            r.hit_rate, r.ttft_ms[0], r.ttft_ms[1]
        );
        more += &format!(
            "| {name} | {:.3} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            r.hit_rate, r.ttft_ms[0], r.ttft_ms[1], r.p95_ms[0], r.p95_ms[1], r.p95_ms[2]
        );
    }
    let md = dir.join("edge.md");
    let text = std::fs::read_to_string(&md)? + &more;
    std::fs::write(md, text)?;
    let series: Vec<(String, Vec<f64>)> = rows
        .iter()
        .map(|r| {
            (
                format!("{} ({:.2e} edge-core bytes)", r.policy, r.core_bytes),
                r.p95_ms.to_vec(),
            )
        })
        .collect();
    super::plot::bars(
        &dir.join("edge.png"),
        "sim edge: p95 latency by class (bars stop at 3 s)",
        "p95 latency (ms)",
        &["critical", "standard", "sheddable"],
        &series,
        Some(3000.0),
    )?;
    Ok(rows)
}

fn notes(a: &EdgeArgs) -> String {
    format!(
        "Command: `cargo run --release -p weft-bench -- sim edge --seed {seed} --seconds {secs}`\n\n\
Assumptions: {edges} edge sites in two regions ({GATEWAYS_PER_SITE} gateways each, {gw} GiB for \
weights, {GATEWAY_SLOTS} slots) and one cloud region ({CLOUD_NODES} nodes, {cl} GiB, {CLOUD_SLOTS} \
slots); every slot decodes {SLOT_TOKENS_PER_S} unit-compute tokens/s at the edge and in the cloud \
alike; link classes, round trips, bandwidths and prices are `LinkDefaults::default()` (edge-core \
60 ms, 20 Mbit/s, 9e-11 per byte, i.e. $0.09/GB; edge-edge 10 ms; local 0.5 ms), plus exponential extra delay on \
wide-area paths (mean {WAN_JITTER_MS} ms one way edge-core, {METRO_JITTER_MS} ms edge-edge). Four \
models (270M-, 4B-, 12B- and 27B-class by size and compute); per unit of site weight the edge asks \
20, 5, 0.5 and 0.2 requests/s of them, site weights {SITE_WEIGHTS:?} (site 0 is a hot spot), and \
agents in the cloud ask 4, 2, 1 and 0.5; prompts average {PROMPT_TOKENS} tokens; 20% critical \
(deadline 5 s), 60% standard (8 s), 20% sheddable (15 s). Weights are amortised over \
{AMORTIZE_S} s. Load reports every {REPORT_MS} ms. The first sixth of the run is left out.\n\n\
`core_bytes` counts request and response bytes that crossed an edge-core link; weights moved \
once to place replicas are listed apart below, not in `core_bytes`. `cost` is tokens at each \
node's price plus bytes at each link class's price. A chain of shards is simulated on its head \
gateway (the other gateways' compute is not charged), with a hop delay per token.",
        seed = a.common.seed,
        secs = a.seconds,
        edges = SITE_WEIGHTS.len(),
        gw = GATEWAY_MEMORY >> 30,
        cl = CLOUD_MEMORY >> 30,
    )
}
