//! The seed paper's experiment ("Cloud-Native AI Agent Architecture and
//! Deployment", section 5), rebuilt in this simulator.
//!
//! The paper gives the shape, not the parameters: 50 nodes, 20% critical and
//! 80% batch tasks, 100 to 5,000 concurrent agents, round-robin against an
//! intent-aware scheduler that serves critical tasks first and picks nodes by
//! a composite score of current load and network congestion. Its figures:
//! both about 38 ms mean at 100 agents, round-robin above 180 ms from about
//! 2,000 agents, intent-aware about 115 ms at 5,000. Every parameter below is
//! our assumption, chosen so those two policies land near those figures; they
//! are written out in the markdown table with the results.

use anyhow::Result;
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use weft_placement::{
    route, Candidate, Context, Criticality, Intent, Learner, LinkClass, LinkEstimate, ModelId,
    Outcome, RouteRequest, RouterConfig,
};

use super::engine::{Job, Ms, Network, Policy, SimNode, View, Workload};
use super::{exp, write_table, Common, Summary};

/// Zones the nodes and agents are spread over.
pub const ZONES: usize = 5;
/// Node speeds, repeating over node indices: the cluster is heterogeneous
/// (20% slow, 40% standard, 40% fast).
pub const SPEEDS: [f64; 5] = [0.25, 1.0, 2.0, 1.0, 2.0];
/// Batch slots per node.
pub const SLOTS: u32 = 4;
/// Tokens/s of one slot at speed 1: one token of work is 1 ms.
pub const SLOT_TOKENS_PER_S: f64 = 1000.0;
/// Mean work of a critical task (tokens; exponential).
pub const CRITICAL_WORK: f64 = 11.0;
/// Mean work of a batch task (tokens; exponential).
pub const BATCH_WORK: f64 = 19.5;
/// Share of critical tasks.
pub const CRITICAL_SHARE: f64 = 0.2;
/// Deadline of a critical task (ms).
pub const CRITICAL_DEADLINE_MS: u64 = 250;
/// Mean think time of an agent between tasks (ms; exponential).
pub const THINK_MS: f64 = 540.0;
/// Round trip within a zone and between zones (ms).
pub const RTT_LOCAL_MS: f64 = 2.0;
/// Round trip between zones (ms), plus `RTT_PER_HOP_MS` per zone of distance.
pub const RTT_REMOTE_MS: f64 = 10.0;
/// See `RTT_REMOTE_MS`.
pub const RTT_PER_HOP_MS: f64 = 4.0;
/// Remote requests in flight into each zone at which its ingress delay doubles.
pub const INGRESS_CAPACITY: [f64; ZONES] = [24.5, 49.0, 73.5, 98.0, 147.0];
/// Bytes of one task on the wire (request plus response).
pub const TASK_BYTES: f64 = 2_000.0;
/// Load reports every this many ms.
pub const REPORT_MS: f64 = 50.0;
/// Simulated time per run (ms) and the warm-up left out of the figures.
pub const RUN_MS: f64 = 60_000.0;
/// See `RUN_MS`.
pub const WARMUP_MS: f64 = 10_000.0;

/// `sim paper` arguments.
#[derive(Parser, Debug, Clone)]
pub struct PaperArgs {
    #[command(flatten)]
    pub common: Common,
    /// Agent counts to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "100,500,1000,2000,3000,4000,5000"
    )]
    pub agents: Vec<usize>,
    /// Nodes.
    #[arg(long, default_value_t = 50)]
    pub nodes: usize,
    /// Simulated seconds per run.
    #[arg(long, default_value_t = RUN_MS / 1000.0)]
    pub seconds: f64,
}

/// The three policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// Each scheduler cycles through the nodes; nodes serve FIFO.
    RoundRobin,
    /// Critical first; the node with the least `0.5 load + 0.5 congestion`.
    PaperIntentAware,
    /// weft's router (expected latency and utility), critical first.
    Weft,
}

impl PolicyKind {
    /// All, in table order.
    pub const ALL: [PolicyKind; 3] = [Self::RoundRobin, Self::PaperIntentAware, Self::Weft];

    /// The name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::RoundRobin => "round-robin",
            Self::PaperIntentAware => "paper-intent-aware",
            Self::Weft => "weft",
        }
    }
}

/// One row of results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// Policy name.
    pub policy: &'static str,
    /// Agents.
    pub agents: usize,
    /// `critical`, `batch` or `all`.
    pub class: &'static str,
    /// Latency figures (ms).
    pub summary: Summary,
}

fn zone_of_node(n: usize) -> usize {
    n % ZONES
}

fn nodes(count: usize, priority: bool) -> Vec<SimNode> {
    (0..count)
        .map(|i| SimNode {
            site: zone_of_node(i),
            slots: SLOTS,
            // speeds cycle over blocks of ZONES so every zone gets every speed
            tokens_per_s: SPEEDS[(i / ZONES) % SPEEDS.len()] * SLOT_TOKENS_PER_S * SLOTS as f64,
            priority,
            cost_per_token: 0.0,
            energy_per_token_j: 0.0,
            hop_ms_per_token: Vec::new(),
            cache_sessions: 0,
        })
        .collect()
}

fn network() -> Network {
    let rtt = (0..ZONES)
        .map(|a| {
            (0..ZONES)
                .map(|b| {
                    if a == b {
                        RTT_LOCAL_MS
                    } else {
                        RTT_REMOTE_MS + RTT_PER_HOP_MS * a.abs_diff(b) as f64
                    }
                })
                .collect()
        })
        .collect();
    Network {
        rtt,
        bandwidth: vec![vec![1.25e8; ZONES]; ZONES],
        ingress_capacity: INGRESS_CAPACITY.iter().map(|&c| Some(c)).collect(),
        jitter_ms: Vec::new(),
    }
}

/// Closed-loop agents: each issues a task, waits for it, thinks, repeats.
struct Agents {
    count: usize,
    rng: StdRng,
}

impl Agents {
    fn task(&mut self, agent: usize, at: Ms) -> Job {
        let critical = self.rng.random::<f64>() < CRITICAL_SHARE;
        let (class, mean, deadline) = if critical {
            (
                Criticality::Critical,
                CRITICAL_WORK,
                Some(CRITICAL_DEADLINE_MS as f64),
            )
        } else {
            (Criticality::Standard, BATCH_WORK, None)
        };
        Job {
            origin: agent % ZONES,
            agent: Some(agent),
            class,
            deadline_ms: deadline,
            work: exp(&mut self.rng, mean).max(0.5),
            expected_work: mean,
            bytes: TASK_BYTES,
            issued: at,
            model: 0,
            tokens: 0.0,
            session: None,
            prefix_work: 0.0,
            prefill_work: 0.0,
        }
    }
}

impl Workload for Agents {
    fn initial(&mut self) -> Vec<(Ms, Job)> {
        (0..self.count)
            .map(|a| {
                let at = self.rng.random::<f64>() * THINK_MS;
                (at, self.task(a, at))
            })
            .collect()
    }

    fn next(&mut self, done: &Job, now: Ms) -> Option<(Ms, Job)> {
        let agent = done.agent?;
        let at = now + exp(&mut self.rng, THINK_MS);
        Some((at, self.task(agent, at)))
    }
}

struct RoundRobin {
    next: Vec<usize>,
}

impl Policy for RoundRobin {
    fn choose(&mut self, job: &Job, view: &View<'_>) -> Option<usize> {
        let n = &mut self.next[job.origin];
        let pick = *n % view.nodes.len();
        *n += 1;
        Some(pick)
    }
}

/// The paper's scheduler as it describes it: normalised load and normalised
/// network congestion, weighted equally; the lowest score wins, ties broken
/// at random. It sees what weft's router sees (last report plus own sends).
struct PaperIntentAware {
    rng: StdRng,
}

impl Policy for PaperIntentAware {
    fn choose(&mut self, job: &Job, view: &View<'_>) -> Option<usize> {
        let n = view.nodes.len();
        let loads: Vec<f64> = (0..n).map(|i| view.node_state(i, true).load()).collect();
        let congestion: Vec<f64> = (0..ZONES).map(|z| view.congestion(z) - 1.0).collect();
        let max_load = loads.iter().copied().fold(0.0, f64::max).max(1e-9);
        let max_cong = congestion.iter().copied().fold(0.0, f64::max).max(1e-9);
        let _ = job;
        let mut best = f64::INFINITY;
        let mut ties = Vec::new();
        for i in 0..n {
            let s = 0.5 * loads[i] / max_load + 0.5 * congestion[view.nodes[i].site] / max_cong;
            if s < best - 1e-12 {
                best = s;
                ties.clear();
                ties.push(i);
            } else if (s - best).abs() <= 1e-12 {
                ties.push(i);
            }
        }
        Some(ties[self.rng.random_range(0..ties.len())])
    }
}

/// weft: every node is a candidate; the router does the rest.
pub struct WeftPolicy {
    /// Router profiles the learner picks from (one: no learning).
    pub profiles: Vec<RouterConfig>,
    /// The learner, when there are several profiles.
    pub learner: Option<Learner>,
    pending: std::collections::HashMap<(u64, usize), (Context, usize)>,
    /// Utility observed per request, in completion order.
    pub utilities: Vec<(Ms, f64)>,
    candidates: Vec<Candidate>,
}

impl WeftPolicy {
    /// A policy over `profiles`; learning when there are several.
    pub fn new(profiles: Vec<RouterConfig>) -> Self {
        let learner = (profiles.len() > 1).then(|| Learner::new(profiles.len(), 0.3));
        Self {
            profiles,
            learner,
            pending: Default::default(),
            utilities: Vec::new(),
            candidates: Vec::new(),
        }
    }
}

fn job_key(job: &Job) -> (u64, usize) {
    (job.issued.to_bits(), job.agent.unwrap_or(usize::MAX))
}

impl Policy for WeftPolicy {
    fn choose(&mut self, job: &Job, view: &View<'_>) -> Option<usize> {
        self.candidates.clear();
        let mut least = f64::INFINITY;
        for i in 0..view.nodes.len() {
            let state = view.node_state(i, true);
            least = least.min(state.load());
            let site = view.nodes[i].site;
            self.candidates.push(Candidate {
                state,
                link: LinkEstimate {
                    rtt_ms: view.network.rtt[job.origin][site] * view.congestion(site),
                    bandwidth_bytes_per_s: view.network.bandwidth[job.origin][site],
                    class: if site == job.origin {
                        LinkClass::Local
                    } else {
                        LinkClass::EdgeToEdge
                    },
                    cost_per_byte: 0.0,
                },
            });
        }
        let ctx = Context {
            criticality: job.class,
            load: Context::load_bucket(least),
        };
        let arm = self.learner.as_ref().map_or(0, |l| l.choose(ctx));
        let req = RouteRequest {
            model: ModelId(0),
            intent: Intent {
                criticality: job.class,
                deadline_ms: job.deadline_ms.map(|d| d as u64),
                max_cost: None,
            },
            prompt_tokens: 0,
            output_tokens: job.expected_work.round() as u32,
            compute_per_token: 1.0,
        };
        let d = route(&req, &self.candidates, &self.profiles[arm]);
        let node = d.choice.ok()?.0 as usize;
        if self.learner.is_some() {
            self.pending.insert(job_key(job), (ctx, arm));
        }
        Some(node)
    }

    fn observe(&mut self, job: &Job, _node: usize, latency_ms: f64) {
        let weights = self.profiles[0].utility;
        let u = weights.utility(
            Outcome {
                latency_ms,
                cost: 0.0,
                energy_j: 0.0,
            },
            job.deadline_ms,
            None,
        );
        self.utilities.push((job.issued, u));
        if let (Some(l), Some((ctx, arm))) =
            (self.learner.as_mut(), self.pending.remove(&job_key(job)))
        {
            l.observe(ctx, arm, u);
        }
    }
}

/// weft's router configuration for this scenario: latency matters, cost is
/// zero here; nobody is refused (batch tasks are standard, not sheddable).
pub fn weft_router() -> RouterConfig {
    RouterConfig {
        admission: weft_placement::AdmissionPolicy { max_queue: 1 << 20 },
        ..RouterConfig::default()
    }
}

/// Router profiles the learner chooses from: the default, and variations of
/// how much the queue estimate and the report age count.
pub fn learner_profiles() -> Vec<(String, RouterConfig)> {
    let base = weft_router();
    [
        (1.0, 0.05),
        (0.25, 0.0),
        (1.0, 0.5),
        (3.0, 0.05),
        (0.5, 0.2),
    ]
    .into_iter()
    .map(|(wait_scale, staleness_weight)| {
        (
            format!("wait x{wait_scale}, staleness {staleness_weight}"),
            RouterConfig {
                wait_scale,
                staleness_weight,
                ..base
            },
        )
    })
    .collect()
}

/// Mean utility per window of `window_ms`, by issue time, after warm-up.
fn windows(utilities: &[(Ms, f64)], window_ms: Ms, run_ms: Ms) -> Vec<(f64, f64)> {
    let n = (run_ms / window_ms).ceil() as usize;
    let mut sums = vec![(0.0, 0usize); n];
    for &(t, u) in utilities {
        let w = ((t / window_ms) as usize).min(n - 1);
        sums[w].0 += u;
        sums[w].1 += 1;
    }
    sums.iter()
        .enumerate()
        .filter(|(_, s)| s.1 > 0)
        .map(|(i, s)| ((i as f64 + 0.5) * window_ms / 1000.0, s.0 / s.1 as f64))
        .collect()
}

/// The learning curve at `agents`: mean utility per window for each fixed
/// profile and for the learner choosing among them.
pub fn learning(
    agents: usize,
    node_count: usize,
    seed: u64,
    run_ms: Ms,
) -> Vec<(String, Vec<(f64, f64)>)> {
    let profiles = learner_profiles();
    let mut out = Vec::new();
    let mut runs: Vec<(String, Vec<RouterConfig>)> = profiles
        .iter()
        .map(|(name, p)| (format!("fixed: {name}"), vec![*p]))
        .collect();
    runs.push((
        "learner (UCB1 over the profiles)".to_string(),
        profiles.iter().map(|(_, p)| *p).collect(),
    ));
    for (name, ps) in runs {
        let sim = super::engine::Sim::new(nodes(node_count, true), network(), REPORT_MS, seed);
        let mut workload = Agents {
            count: agents,
            rng: StdRng::seed_from_u64(seed),
        };
        let mut policy = WeftPolicy::new(ps);
        sim.run(&mut workload, &mut policy, run_ms);
        out.push((name, windows(&policy.utilities, run_ms / 30.0, run_ms)));
    }
    out
}

/// Runs one policy at one agent count; returns per-class summaries and the
/// completions' (issue time, latency) for the learning curve.
pub fn simulate(
    kind: PolicyKind,
    agents: usize,
    node_count: usize,
    seed: u64,
    run_ms: Ms,
) -> Vec<Row> {
    let sim = super::engine::Sim::new(
        nodes(node_count, kind != PolicyKind::RoundRobin),
        network(),
        REPORT_MS,
        seed,
    );
    let mut workload = Agents {
        count: agents,
        rng: StdRng::seed_from_u64(seed),
    };
    let mut rr;
    let mut ia;
    let mut weft;
    let policy: &mut dyn Policy = match kind {
        PolicyKind::RoundRobin => {
            rr = RoundRobin {
                // each zone's scheduler starts at its own offset
                next: (0..ZONES).map(|z| z * node_count / ZONES).collect(),
            };
            &mut rr
        }
        PolicyKind::PaperIntentAware => {
            ia = PaperIntentAware {
                rng: StdRng::seed_from_u64(seed ^ 0x9e37),
            };
            &mut ia
        }
        PolicyKind::Weft => {
            weft = WeftPolicy::new(vec![weft_router()]);
            &mut weft
        }
    };
    let done = sim.run(&mut workload, policy, run_ms);
    summarise(kind.name(), agents, &done, WARMUP_MS.min(run_ms / 4.0))
}

fn summarise(
    policy: &'static str,
    agents: usize,
    done: &[super::engine::Completion],
    warmup: Ms,
) -> Vec<Row> {
    let mut crit = Vec::new();
    let mut batch = Vec::new();
    for c in done.iter().filter(|c| c.job.issued >= warmup) {
        if let Some(l) = c.latency_ms {
            if c.job.class == Criticality::Critical {
                crit.push(l);
            } else {
                batch.push(l);
            }
        }
    }
    let mut all: Vec<f64> = crit.iter().chain(&batch).copied().collect();
    vec![
        Row {
            policy,
            agents,
            class: "critical",
            summary: Summary::of(&mut crit),
        },
        Row {
            policy,
            agents,
            class: "batch",
            summary: Summary::of(&mut batch),
        },
        Row {
            policy,
            agents,
            class: "all",
            summary: Summary::of(&mut all),
        },
    ]
}

/// Runs the scenario, writes `paper.csv`, `paper.md` and `paper.png`.
pub fn run(a: &PaperArgs) -> Result<Vec<Row>> {
    let dir = a.common.out_dir()?;
    let mut rows = Vec::new();
    for &agents in &a.agents {
        for kind in PolicyKind::ALL {
            let t = std::time::Instant::now();
            let r = simulate(kind, agents, a.nodes, a.common.seed, a.seconds * 1000.0);
            eprintln!(
                "{:>18} {:>5} agents: mean {:7.1} ms (critical p99 {:7.1}) [{:.1} s]",
                kind.name(),
                agents,
                r[2].summary.mean,
                r[0].summary.p99,
                t.elapsed().as_secs_f64()
            );
            rows.extend(r);
        }
    }
    let mut table = vec![[
        "policy", "agents", "class", "mean_ms", "p50_ms", "p95_ms", "p99_ms",
    ]
    .map(String::from)
    .to_vec()];
    for r in &rows {
        let s = &r.summary;
        table.push(vec![
            r.policy.to_string(),
            r.agents.to_string(),
            r.class.to_string(),
            format!("{:.1}", s.mean),
            format!("{:.1}", s.p50),
            format!("{:.1}", s.p95),
            format!("{:.1}", s.p99),
        ]);
    }
    write_table(
        dir,
        "paper",
        "sim paper: the seed paper's experiment",
        &notes(a),
        &table,
    )?;
    let series: Vec<(String, Vec<(f64, f64)>)> = PolicyKind::ALL
        .iter()
        .map(|k| {
            (
                k.name().to_string(),
                rows.iter()
                    .filter(|r| r.policy == k.name() && r.class == "all")
                    .map(|r| (r.agents as f64, r.summary.mean))
                    .collect(),
            )
        })
        .collect();
    let top = a.agents.iter().copied().max().unwrap_or(0);
    let curve = learning(top, a.nodes, a.common.seed, a.seconds * 1000.0);
    let mut lt = vec![vec![
        "series".to_string(),
        "t_s".into(),
        "mean_utility".into(),
    ]];
    for (name, pts) in &curve {
        for &(t, u) in pts {
            lt.push(vec![
                format!("\"{name}\""),
                format!("{t:.1}"),
                format!("{u:.4}"),
            ]);
        }
        let tail: Vec<f64> = pts.iter().skip(pts.len() * 2 / 3).map(|p| p.1).collect();
        eprintln!(
            "learning: {name:>44}: utility over the last third {:.4}",
            tail.iter().sum::<f64>() / tail.len().max(1) as f64
        );
    }
    write_table(
        dir,
        "learning",
        "sim paper: the online learner's utility over time",
        &format!(
            "weft at {top} agents; mean realised utility per window of issue time, for each fixed \
router profile and for the UCB1 learner choosing a profile per (class, load) context. Same seed \
and workload for every series."
        ),
        &lt,
    )?;
    super::plot::lines(
        &dir.join("learning.png"),
        &format!("Realised utility per window, weft at {top} agents"),
        "simulated time (s)",
        "mean utility",
        &curve,
        None,
        super::plot::SeriesLabelPosition::LowerRight,
    )?;
    super::plot::lines(
        &dir.join("paper.png"),
        "Mean task latency vs concurrent agents (50 nodes, 20% critical)",
        "concurrent agents",
        "mean latency (ms, axis stops at 400)",
        &series,
        Some(400.0),
        super::plot::SeriesLabelPosition::UpperLeft,
    )?;
    Ok(rows)
}

fn notes(a: &PaperArgs) -> String {
    format!(
        "Command: `cargo run --release -p weft-bench -- sim paper --seed {seed} --nodes {nodes} --agents {agents}`\n\n\
Assumptions (the paper gives none of these): {nodes} nodes in {ZONES} zones; node speeds cycle \
{SPEEDS:?} (x {SLOT_TOKENS_PER_S} tokens/s per slot, {SLOTS} slots); task work exponential, mean \
{CRITICAL_WORK} tokens (critical, {CRITICAL_SHARE} of tasks, deadline {CRITICAL_DEADLINE_MS} ms) or \
{BATCH_WORK} (batch, no deadline); closed-loop agents with exponential think time, mean {THINK_MS} ms, \
spread evenly over the zones; round trip {RTT_LOCAL_MS} ms in a zone, {RTT_REMOTE_MS} ms + \
{RTT_PER_HOP_MS} ms per zone of distance between zones; each zone's ingress delay grows as \
1/(1-load) with remote requests in flight (capacities {INGRESS_CAPACITY:?}); load reports every \
{REPORT_MS} ms, and each zone's scheduler adds its own sends since the last report. \
{secs} s simulated per point, the first {warm} s left out.\n\n\
round-robin: every zone's scheduler cycles through all nodes; nodes run FIFO. \
paper-intent-aware: nodes run critical tasks first; the scheduler picks the least \
0.5 x load/max load + 0.5 x congestion/max congestion, ties at random. \
weft: nodes run critical tasks first; `weft_placement::route` ranks every node by expected \
latency (network incl. congestion, queue wait by class, compute at the node's speed, report age).",
        seed = a.common.seed,
        nodes = a.nodes,
        agents = a.agents.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","),
        secs = a.seconds,
        warm = WARMUP_MS.min(a.seconds * 250.0) / 1000.0,
    )
}
