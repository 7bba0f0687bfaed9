//! A million agents over 10,000 nodes: the solver plans for the whole fabric
//! and every request goes through the router, to show both hold up at scale.
//!
//! Ten regions, each one cloud site of 100 nodes and 225 edge sites of four
//! gateways; 100 models in three size classes; agents spread evenly over the
//! edge sites, each calling one of its region's 20 favourite models (Zipf)
//! once per 100 s on average. Agents are Poisson sources, so each
//! (site, model) pair is simulated as one Poisson stream of their summed rate.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use weft_placement::{
    route, solve, Candidate, Criticality, Demand, Intent, LinkDefaults, ModelId, ModelSpec, Node,
    Placement, RouteRequest, RouterConfig, Site, SiteId, SiteKind, SolverConfig, Topology,
    WIRE_BYTES_PER_TOKEN,
};

use super::engine::{Job, Ms, Network, PoissonStreams, Policy, Sim, SimNode, View};
use super::{write_table, Common, Summary};

/// Regions.
pub const REGIONS: usize = 10;
/// Cloud nodes per region.
pub const CLOUD_NODES: usize = 100;
/// Edge sites per region.
pub const EDGE_SITES: usize = 225;
/// Gateways per edge site.
pub const GATEWAYS: usize = 4;
/// Models.
pub const MODELS: usize = 100;
/// Models each region's agents call.
pub const FAVOURITES: usize = 20;
/// Mean seconds between one agent's requests.
pub const AGENT_PERIOD_S: f64 = 100.0;
/// Mean prompt tokens.
pub const PROMPT_TOKENS: f64 = 1000.0;
/// Cost of a prompt token relative to a decoded one.
pub const PREFILL_SHARE: f64 = 0.02;
/// Most candidates the node offers the router per request.
pub const MAX_CANDIDATES: usize = 100;
/// Load reports every this many ms.
pub const REPORT_MS: f64 = 200.0;

/// `sim scale` arguments.
#[derive(Parser, Debug, Clone)]
pub struct ScaleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Agents.
    #[arg(long, default_value_t = 1_000_000)]
    pub agents: usize,
    /// Simulated seconds.
    #[arg(long, default_value_t = 30.0)]
    pub seconds: f64,
}

/// What the run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScaleReport {
    /// Nodes.
    pub nodes: usize,
    /// Models.
    pub models: usize,
    /// Agents.
    pub agents: usize,
    /// (site, model) demand entries given to the solver.
    pub demand_entries: usize,
    /// Seconds the solver took.
    pub solve_s: f64,
    /// Replicas it placed.
    pub replicas: usize,
    /// Of which sharded.
    pub sharded: usize,
    /// Requests/s the plan could not place.
    pub unserved_per_s: f64,
    /// Requests simulated.
    pub requests: usize,
    /// Completed.
    pub completed: usize,
    /// Refused by the router.
    pub refused: usize,
    /// Refusals by reason.
    pub refusals: std::collections::BTreeMap<String, usize>,
    /// Mean router decisions' wall time (µs), candidates included.
    pub route_us: f64,
    /// p95 latency per class: critical, standard, sheddable (ms).
    pub p95_ms: [f64; 3],
    /// Share of request bytes that crossed edge-core links.
    pub core_share: f64,
    /// Wall-clock seconds of the whole scenario.
    pub wall_s: f64,
}

fn models() -> Vec<(ModelSpec, f64)> {
    (0..MODELS)
        .map(|i| {
            // 60% small, 30% medium, 10% large
            let (layers, mb, shared, c, out, kv) = match i % 10 {
                0..=5 => (18, 12, 40, 0.25, 32.0, 18 * 2 * 256 * 2),
                6..=8 => (34, 70, 400, 1.0, 96.0, 34 * 2 * 4 * 256 * 2),
                _ => (48, 150, 800, 3.0, 128.0, 48 * 2 * 8 * 256 * 2),
            };
            (
                ModelSpec {
                    name: format!("m{i}"),
                    layers,
                    bytes_per_layer: mb << 20,
                    shared_bytes: shared << 20,
                    compute_per_token: c,
                    kv_bytes_per_token: kv,
                    hidden_bytes_per_token: 0,
                    min_replicas: 0,
                    prefer: None,
                    sites: Vec::new(),
                },
                out,
            )
        })
        .collect()
}

fn topology() -> Topology {
    let mut sites = Vec::new();
    let mut nodes = Vec::new();
    for r in 0..REGIONS {
        let cloud = SiteId(sites.len() as u32);
        sites.push(Site {
            kind: SiteKind::Cloud,
            region: r as u32,
        });
        for _ in 0..CLOUD_NODES {
            nodes.push(Node {
                site: cloud,
                memory_bytes: 80 << 30,
                tokens_per_s: 300.0 * 32.0,
                slots: 32,
                accelerator: true,
                cost_per_token: 1e-7,
            });
        }
        for _ in 0..EDGE_SITES {
            let s = SiteId(sites.len() as u32);
            sites.push(Site {
                kind: SiteKind::Edge,
                region: r as u32,
            });
            for _ in 0..GATEWAYS {
                nodes.push(Node {
                    site: s,
                    memory_bytes: 8 << 30,
                    tokens_per_s: 300.0 * 8.0,
                    slots: 8,
                    accelerator: true,
                    cost_per_token: 2e-8,
                });
            }
        }
    }
    Topology::new(sites, nodes, LinkDefaults::default()).expect("the scale topology is valid")
}

/// Per region, its favourite models with their shares (Zipf, s = 1).
fn favourites(rng: &mut StdRng) -> Vec<Vec<(usize, f64)>> {
    let h: f64 = (1..=FAVOURITES).map(|k| 1.0 / k as f64).sum();
    (0..REGIONS)
        .map(|_| {
            let mut ids: Vec<usize> = (0..MODELS).collect();
            ids.shuffle(rng);
            ids.truncate(FAVOURITES);
            ids.into_iter()
                .enumerate()
                .map(|(k, m)| (m, 1.0 / (k + 1) as f64 / h))
                .collect()
        })
        .collect()
}

struct Streams {
    streams: Vec<(usize, usize, f64)>,
    out: Vec<f64>,
    compute: Vec<f64>,
    rng: StdRng,
}

impl Streams {
    fn job(&mut self, s: usize, at: Ms) -> (Ms, Job) {
        let (origin, model, _) = self.streams[s];
        let u: f64 = self.rng.random();
        let class = if u < 0.2 {
            Criticality::Critical
        } else if u < 0.8 {
            Criticality::Standard
        } else {
            Criticality::Sheddable
        };
        let out = self.out[model];
        let tokens = (out * (0.5 + self.rng.random::<f64>())).round().max(1.0);
        let c = self.compute[model];
        (
            at,
            Job {
                origin,
                agent: Some(s),
                class,
                deadline_ms: Some(10_000.0),
                work: (tokens + PROMPT_TOKENS * PREFILL_SHARE) * c,
                expected_work: (out + PROMPT_TOKENS * PREFILL_SHARE) * c,
                bytes: (PROMPT_TOKENS + tokens) * WIRE_BYTES_PER_TOKEN,
                issued: at,
                model,
                tokens,
                session: None,
                prefix_work: 0.0,
                prefill_work: 0.0,
            },
        )
    }
}

impl PoissonStreams for Streams {
    fn streams(&self) -> usize {
        self.streams.len()
    }

    fn rate_per_ms(&self, s: usize) -> f64 {
        self.streams[s].2
    }

    fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    fn job(&mut self, s: usize, at: Ms) -> (Ms, Job) {
        Streams::job(self, s, at)
    }
}

/// Candidates per request: the model's heads at the origin site, then a
/// window of the region's other edge heads, then the region's cloud heads,
/// at most `MAX_CANDIDATES`: what a node learns from regional gossip.
struct ScaleRouter<'a> {
    t: &'a Topology,
    local: HashMap<(usize, usize), Vec<usize>>,
    region_edge: HashMap<(u32, usize), Vec<usize>>,
    region_cloud: HashMap<(u32, usize), Vec<usize>>,
    compute: Vec<f64>,
    out: Vec<f64>,
    config: RouterConfig,
    candidates: Vec<Candidate>,
    picked: Vec<usize>,
    refused: usize,
    refusals: std::collections::BTreeMap<String, usize>,
    decisions: usize,
    route_s: f64,
}

impl Policy for ScaleRouter<'_> {
    fn choose(&mut self, job: &Job, view: &View<'_>) -> Option<usize> {
        let t0 = Instant::now();
        let region = self.t.sites[job.origin].region;
        self.picked.clear();
        if let Some(v) = self.local.get(&(job.origin, job.model)) {
            self.picked.extend(v);
        }
        let half = MAX_CANDIDATES / 2;
        if let Some(v) = self.region_edge.get(&(region, job.model)) {
            let start = job.origin % v.len().max(1);
            let room = half.saturating_sub(self.picked.len());
            self.picked
                .extend(v.iter().cycle().skip(start).take(room.min(v.len())));
        }
        if let Some(v) = self.region_cloud.get(&(region, job.model)) {
            let room = MAX_CANDIDATES - self.picked.len();
            self.picked.extend(v.iter().take(room));
        }
        if self.picked.is_empty() {
            // the region has none: any cloud replica
            for r in 0..REGIONS as u32 {
                if let Some(v) = self.region_cloud.get(&(r, job.model)) {
                    self.picked.extend(v.iter().take(MAX_CANDIDATES));
                    break;
                }
            }
        }
        self.candidates.clear();
        let origin = SiteId(job.origin as u32);
        for &n in &self.picked {
            self.candidates.push(Candidate {
                state: view.node_state(n, true),
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
            prompt_tokens: PROMPT_TOKENS as u32,
            output_tokens: self.out[job.model] as u32,
            compute_per_token: self.compute[job.model],
        };
        let d = route(&req, &self.candidates, &self.config);
        self.decisions += 1;
        self.route_s += t0.elapsed().as_secs_f64();
        match d.choice {
            Ok(n) => Some(n.0 as usize),
            Err(r) => {
                self.refused += 1;
                let name = serde_json::to_value(&r)
                    .ok()
                    .and_then(|v| v.get("rejected").and_then(|s| s.as_str()).map(String::from))
                    .unwrap_or_default();
                *self
                    .refusals
                    .entry(format!("{}/{name}", job.class.as_str()))
                    .or_default() += 1;
                None
            }
        }
    }
}

/// The scenario's fabric and demand.
pub struct Fabric {
    /// Sites and nodes.
    pub topology: Topology,
    /// The models.
    pub models: Vec<ModelSpec>,
    /// Mean output tokens per model.
    pub outputs: Vec<f64>,
    /// Demand per (edge site, model).
    pub demand: Vec<Demand>,
}

/// Builds the fabric and the demand of `agents` agents (seeded).
pub fn fabric(seed: u64, agents: usize) -> Fabric {
    let mut rng = StdRng::seed_from_u64(seed);
    let t = topology();
    let ms = models();
    let favs = favourites(&mut rng);
    let edge_sites: Vec<usize> = (0..t.sites.len())
        .filter(|&s| t.sites[s].kind == SiteKind::Edge)
        .collect();
    let per_site = agents as f64 / edge_sites.len() as f64 / AGENT_PERIOD_S;
    let mut demand = Vec::new();
    for &s in &edge_sites {
        for &(m, share) in &favs[t.sites[s].region as usize] {
            demand.push(Demand {
                site: SiteId(s as u32),
                model: ModelId(m as u32),
                requests_per_s: per_site * share,
                prompt_tokens: PROMPT_TOKENS,
                output_tokens: ms[m].1,
                deadline_ms: Some(10_000.0),
            });
        }
    }
    Fabric {
        topology: t,
        outputs: ms.iter().map(|m| m.1).collect(),
        models: ms.into_iter().map(|m| m.0).collect(),
        demand,
    }
}

/// The solver's settings here: weights amortised over a day.
pub fn solver_config() -> SolverConfig {
    SolverConfig {
        amortize_s: 86_400.0,
        prefill_share: PREFILL_SHARE,
        ..SolverConfig::default()
    }
}

/// Runs the scenario and writes `scale.md`, `scale.csv` and `scale.json`.
pub fn run(a: &ScaleArgs) -> Result<ScaleReport> {
    let wall = Instant::now();
    let dir = a.common.out_dir()?;
    let Fabric {
        topology: t,
        models: specs,
        outputs,
        demand,
    } = fabric(a.common.seed, a.agents);
    let config = solver_config();
    let t0 = Instant::now();
    let plan = solve(&t, &specs, &demand, &Placement::default(), &config)?;
    let solve_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "solver: {} nodes x {} models, {} demand entries: {} replicas in {:.3} s",
        t.nodes.len(),
        specs.len(),
        demand.len(),
        plan.placement.replicas.len(),
        solve_s
    );

    let mut local: HashMap<(usize, usize), Vec<usize>> = HashMap::new();
    let mut region_edge: HashMap<(u32, usize), Vec<usize>> = HashMap::new();
    let mut region_cloud: HashMap<(u32, usize), Vec<usize>> = HashMap::new();
    let mut hop = vec![Vec::new(); t.nodes.len()];
    for r in &plan.placement.replicas {
        let head = r.shards[0].node.0 as usize;
        let m = r.model.0 as usize;
        local.entry((r.site.0 as usize, m)).or_default().push(head);
        let site = t.site(r.site);
        let list = match site.kind {
            SiteKind::Edge => region_edge.entry((site.region, m)).or_default(),
            SiteKind::Cloud => region_cloud.entry((site.region, m)).or_default(),
        };
        list.push(head);
        if r.shards.len() > 1 {
            let h: &mut Vec<f64> = &mut hop[head];
            h.resize(MODELS, 0.0);
            h[m] = (r.shards.len() - 1) as f64 * t.link(r.site, r.site).rtt_ms / 2.0;
        }
    }
    let sim_nodes: Vec<SimNode> = t
        .nodes
        .iter()
        .zip(hop)
        .map(|(n, hop)| SimNode {
            site: n.site.0 as usize,
            slots: n.slots,
            tokens_per_s: n.tokens_per_s,
            priority: true,
            cost_per_token: n.cost_per_token,
            energy_per_token_j: 0.0,
            hop_ms_per_token: hop,
            cache_sessions: 0,
        })
        .collect();
    let sites = t.sites.len();
    // Links follow from the site classes; the engine's matrices would be
    // sites x sites, so they are filled from the class defaults per pair.
    let rtt: Vec<Vec<f64>> = (0..sites)
        .map(|a| {
            (0..sites)
                .map(|b| t.link(SiteId(a as u32), SiteId(b as u32)).rtt_ms)
                .collect()
        })
        .collect();
    let bandwidth: Vec<Vec<f64>> = (0..sites)
        .map(|a| {
            (0..sites)
                .map(|b| {
                    t.link(SiteId(a as u32), SiteId(b as u32))
                        .bandwidth_bytes_per_s
                })
                .collect()
        })
        .collect();
    let network = Network {
        rtt,
        bandwidth,
        ingress_capacity: vec![None; sites],
        jitter_ms: Vec::new(),
    };
    let sim = Sim::new(sim_nodes, network, REPORT_MS, a.common.seed ^ 0x5ca1e);
    let streams: Vec<(usize, usize, f64)> = demand
        .iter()
        .map(|d| {
            (
                d.site.0 as usize,
                d.model.0 as usize,
                d.requests_per_s / 1000.0,
            )
        })
        .collect();
    let out = outputs;
    let compute: Vec<f64> = specs.iter().map(|m| m.compute_per_token).collect();
    let mut workload = Streams {
        streams,
        out: out.clone(),
        compute: compute.clone(),
        rng: StdRng::seed_from_u64(a.common.seed ^ 0xa6e),
    };
    let mut router = ScaleRouter {
        t: &t,
        local,
        region_edge,
        region_cloud,
        compute,
        out,
        config: RouterConfig {
            prefill_share: PREFILL_SHARE,
            ..RouterConfig::default()
        },
        candidates: Vec::with_capacity(MAX_CANDIDATES),
        picked: Vec::with_capacity(MAX_CANDIDATES),
        refused: 0,
        refusals: Default::default(),
        decisions: 0,
        route_s: 0.0,
    };
    let run_ms = a.seconds * 1000.0;
    let done = sim.run(&mut workload, &mut router, run_ms);
    let mut lat: [Vec<f64>; 3] = Default::default();
    let (mut core, mut bytes, mut completed) = (0.0, 0.0, 0);
    for c in &done {
        let (Some(node), Some(l)) = (c.node, c.latency_ms) else {
            continue;
        };
        completed += 1;
        lat[2 - c.job.class.priority() as usize].push(l);
        bytes += c.job.bytes;
        if t.link(SiteId(c.job.origin as u32), t.nodes[node].site)
            .class
            .crosses_core()
        {
            core += c.job.bytes;
        }
    }
    let report = ScaleReport {
        nodes: t.nodes.len(),
        models: specs.len(),
        agents: a.agents,
        demand_entries: demand.len(),
        solve_s,
        replicas: plan.placement.replicas.len(),
        sharded: plan
            .placement
            .replicas
            .iter()
            .filter(|r| r.shards.len() > 1)
            .count(),
        unserved_per_s: plan.cost.unserved_per_s,
        requests: done.len(),
        completed,
        refused: router.refused,
        refusals: router.refusals.clone(),
        route_us: router.route_s / router.decisions.max(1) as f64 * 1e6,
        p95_ms: lat.map(|mut v| Summary::of(&mut v).p95),
        core_share: core / bytes.max(1.0),
        wall_s: wall.elapsed().as_secs_f64(),
    };
    eprintln!("{}", serde_json::to_string_pretty(&report)?);
    std::fs::write(
        dir.join("scale.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let table = vec![
        vec!["metric".to_string(), "value".to_string()],
        vec!["nodes".into(), report.nodes.to_string()],
        vec!["models".into(), report.models.to_string()],
        vec!["agents".into(), report.agents.to_string()],
        vec!["demand_entries".into(), report.demand_entries.to_string()],
        vec!["solve_s".into(), format!("{:.3}", report.solve_s)],
        vec!["replicas".into(), report.replicas.to_string()],
        vec!["sharded_replicas".into(), report.sharded.to_string()],
        vec![
            "unserved_per_s".into(),
            format!("{:.2}", report.unserved_per_s),
        ],
        vec!["requests".into(), report.requests.to_string()],
        vec!["completed".into(), report.completed.to_string()],
        vec!["refused".into(), report.refused.to_string()],
        vec![
            "refused_by_reason".into(),
            report
                .refusals
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join("; "),
        ],
        vec!["route_us_mean".into(), format!("{:.2}", report.route_us)],
        vec!["p95_ms_critical".into(), format!("{:.1}", report.p95_ms[0])],
        vec!["p95_ms_standard".into(), format!("{:.1}", report.p95_ms[1])],
        vec![
            "p95_ms_sheddable".into(),
            format!("{:.1}", report.p95_ms[2]),
        ],
        vec![
            "core_byte_share".into(),
            format!("{:.4}", report.core_share),
        ],
        vec!["wall_s".into(), format!("{:.1}", report.wall_s)],
    ];
    write_table(
        dir,
        "scale",
        "sim scale: a million agents over 10,000 nodes",
        &format!(
            "Command: `cargo run --release -p weft-bench -- sim scale --seed {} --agents {} --seconds {}`\n\n\
{REGIONS} regions, each one cloud site of {CLOUD_NODES} nodes and {EDGE_SITES} edge sites of \
{GATEWAYS} gateways; {MODELS} models (60% small, 30% medium, 10% large); every agent calls one \
of its region's {FAVOURITES} favourite models (Zipf) once per {AGENT_PERIOD_S} s; 20% critical, \
60% standard, 20% sheddable. The solver plans from an empty placement; every request is routed \
by `weft_placement::route` over at most {MAX_CANDIDATES} candidates. `wall_s` covers building \
the fabric, solving and simulating.",
            a.common.seed, a.agents, a.seconds
        ),
        &table,
    )?;
    Ok(report)
}
