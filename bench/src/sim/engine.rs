//! The discrete-event core shared by every scenario: nodes with batch slots
//! and a queue (priority or FIFO), links with round-trip time, bandwidth and
//! congestion, periodic load reports, and a policy that picks a node for each
//! request from what it could know (the last report plus its own sends).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, VecDeque};

use rand::rngs::StdRng;
use rand::SeedableRng;
use weft_placement::{Criticality, NodeState};

/// Virtual time in milliseconds.
pub type Ms = f64;

/// One node as the simulator runs it.
#[derive(Debug, Clone)]
pub struct SimNode {
    /// The site (zone) it is at.
    pub site: usize,
    /// Batch slots.
    pub slots: u32,
    /// Aggregate tokens/s at full batch; each slot runs at `tokens_per_s / slots`.
    pub tokens_per_s: f64,
    /// Serve critical requests first (else one FIFO).
    pub priority: bool,
    /// Price per token.
    pub cost_per_token: f64,
    /// Joules per token.
    pub energy_per_token_j: f64,
    /// Extra milliseconds per output token for each model it serves as the
    /// head of a shard chain (hidden states hop between shards); empty or 0
    /// for whole replicas.
    pub hop_ms_per_token: Vec<f64>,
    /// Sessions whose prefix its KV cache keeps (least recently used
    /// dropped first); 0: no prefix cache.
    pub cache_sessions: usize,
}

/// One request.
#[derive(Debug, Clone)]
pub struct Job {
    /// Where it came from (site).
    pub origin: usize,
    /// The issuing agent (closed-loop workloads), if any.
    pub agent: Option<usize>,
    /// Its class.
    pub class: Criticality,
    /// Its deadline (ms), if any.
    pub deadline_ms: Option<f64>,
    /// Real work in tokens (unknown to policies).
    pub work: f64,
    /// Work a node or router could expect (from the request's fields).
    pub expected_work: f64,
    /// Bytes on the wire each way in total.
    pub bytes: f64,
    /// When it was issued.
    pub issued: Ms,
    /// The model (index), for scenarios with several.
    pub model: usize,
    /// Output tokens (for per-token hop delays).
    pub tokens: f64,
    /// The multi-turn session it belongs to, if any: a node whose cache
    /// holds the session's prefix skips `prefix_work` of its prefill.
    pub session: Option<usize>,
    /// Work of the prefill a cached prefix saves.
    pub prefix_work: f64,
    /// Work of its whole prefill (what comes before its first token).
    pub prefill_work: f64,
}

/// What happened to one request.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The request.
    pub job: Job,
    /// End-to-end latency (ms); `None` when refused.
    pub latency_ms: Option<f64>,
    /// Where it ran.
    pub node: Option<usize>,
    /// Whether its session's prefix was in that node's cache.
    pub hit: bool,
    /// Time to its first token (ms): to the node, waiting, the prefill it
    /// ran, and back.
    pub ttft_ms: Option<f64>,
}

/// The network between sites: round trip, bandwidth, and a congestion model
/// per destination site (queueing on its ingress link).
#[derive(Debug, Clone)]
pub struct Network {
    /// Round trip (ms) from site a to site b: `rtt[a][b]`.
    pub rtt: Vec<Vec<f64>>,
    /// Bytes/s from site a to site b.
    pub bandwidth: Vec<Vec<f64>>,
    /// Requests in flight from other sites each site's ingress link carries
    /// before its delay doubles (`None`: never congests).
    pub ingress_capacity: Vec<Option<f64>>,
    /// Mean of an exponential extra one-way delay (ms) from site a to site b:
    /// the tail of a wide-area path (empty: none).
    pub jitter_ms: Vec<Vec<f64>>,
}

impl Network {
    /// Multiplier on the round trip into `site` with `inflight` remote
    /// requests there: 1 / (1 - load), load capped at 0.95.
    pub fn congestion(&self, site: usize, inflight: u32) -> f64 {
        match self.ingress_capacity[site] {
            Some(cap) => 1.0 / (1.0 - (inflight as f64 / (2.0 * cap)).min(0.95)),
            None => 1.0,
        }
    }

    /// One-way delay (ms) of `bytes` from `a` to `b` at congestion `factor`.
    pub fn one_way(&self, a: usize, b: usize, bytes: f64, factor: f64) -> f64 {
        self.rtt[a][b] / 2.0 * factor + bytes / self.bandwidth[a][b].max(1.0) * 1000.0
    }
}

/// A node's state in the last report.
#[derive(Debug, Clone, Copy, Default)]
pub struct Report {
    /// Running requests.
    pub running: u32,
    /// Waiting requests.
    pub queued: u32,
    /// Expected remaining work of the running ones.
    pub running_tokens: f64,
    /// Expected work of the waiting ones.
    pub queued_tokens: f64,
    /// Of those, critical.
    pub queued_critical_tokens: f64,
}

/// What a scheduler at one site has sent each node since the last report.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sent {
    /// Requests.
    pub count: u32,
    /// Their expected work.
    pub tokens: f64,
    /// Of it, critical.
    pub critical_tokens: f64,
}

/// What a policy sees when it chooses.
pub struct View<'a> {
    /// The nodes.
    pub nodes: &'a [SimNode],
    /// Their last reports.
    pub reports: &'a [Report],
    /// Sends by this request's origin since those reports, by node.
    pub sent: &'a HashMap<usize, Sent>,
    /// Age of the reports (ms).
    pub report_age_ms: f64,
    /// The network.
    pub network: &'a Network,
    /// Remote requests in flight per site, as last reported.
    pub site_inflight: &'a [u32],
    /// Now.
    pub now: Ms,
    /// The sessions each node's cache held at the last report.
    pub cached: &'a [Vec<usize>],
}

impl View<'_> {
    /// The router's view of node `n`: its report plus this origin's sends.
    pub fn node_state(&self, n: usize, holds_model: bool) -> NodeState {
        let node = &self.nodes[n];
        let r = &self.reports[n];
        let s = &self.sent.get(&n).copied().unwrap_or_default();
        // Sends since the report fill free slots first, then the queue.
        let total = r.running + r.queued + s.count;
        let running = total.min(node.slots);
        let queued = total - running;
        let mean = if s.count > 0 {
            s.tokens / s.count as f64
        } else {
            0.0
        };
        let moved = running - r.running.min(running);
        NodeState {
            node: weft_placement::NodeId(n as u32),
            holds_model,
            running,
            queued,
            slots: node.slots,
            running_tokens: r.running_tokens + moved as f64 * mean,
            queued_tokens: r.queued_tokens + (s.tokens - moved as f64 * mean).max(0.0),
            queued_critical_tokens: r.queued_critical_tokens + s.critical_tokens,
            tokens_per_s: node.tokens_per_s,
            sequence_tokens_per_s: node.tokens_per_s / node.slots as f64,
            free_kv_tokens: u64::MAX,
            report_age_ms: self.report_age_ms,
            cost_per_token: node.cost_per_token,
            energy_per_token_j: node.energy_per_token_j,
            cached_prompt_tokens: 0.0,
        }
    }

    /// Congestion factor into site `s` as last reported.
    pub fn congestion(&self, s: usize) -> f64 {
        self.network.congestion(s, self.site_inflight[s])
    }
}

/// Chooses a node for a request, or refuses it.
pub trait Policy {
    /// The node for `job`, or `None` to refuse it.
    fn choose(&mut self, job: &Job, view: &View<'_>) -> Option<usize>;
    /// Told when a request it routed finished (for learners).
    fn observe(&mut self, _job: &Job, _node: usize, _latency_ms: f64) {}
}

/// Where new requests come from.
pub trait Workload {
    /// Requests to issue at the start, with their issue times.
    fn initial(&mut self) -> Vec<(Ms, Job)>;
    /// A request finished (or was refused) at `now`: the next one from the
    /// same source, if any (closed loop).
    fn next(&mut self, _done: &Job, _now: Ms) -> Option<(Ms, Job)> {
        None
    }
    /// A request was issued at `now`: the next one from the same source, if
    /// any (open loop).
    fn issued(&mut self, _job: &Job, _now: Ms) -> Option<(Ms, Job)> {
        None
    }
}

/// Open-loop sources: independent Poisson streams, each issuing its next
/// request when the previous one is issued (Poisson agents add up to one
/// Poisson stream, so a stream stands for many agents).
pub trait PoissonStreams {
    /// Number of streams.
    fn streams(&self) -> usize;
    /// Requests per ms of stream `s`.
    fn rate_per_ms(&self, s: usize) -> f64;
    /// The generator.
    fn rng(&mut self) -> &mut StdRng;
    /// A request of stream `s` issued at `at` (its `agent` is `Some(s)`).
    fn job(&mut self, s: usize, at: Ms) -> (Ms, Job);
}

impl<T: PoissonStreams> Workload for T {
    fn initial(&mut self) -> Vec<(Ms, Job)> {
        (0..self.streams())
            .map(|s| {
                let rate = self.rate_per_ms(s);
                let at = super::exp(self.rng(), 1.0 / rate);
                self.job(s, at)
            })
            .collect()
    }

    fn issued(&mut self, job: &Job, now: Ms) -> Option<(Ms, Job)> {
        let s = job.agent?;
        let rate = self.rate_per_ms(s);
        let at = now + super::exp(self.rng(), 1.0 / rate);
        Some(self.job(s, at))
    }
}

#[derive(Debug, Clone, Copy)]
enum Event {
    Issue(usize),
    Arrive(usize),
    Finish(usize),
    Respond(usize),
    Report,
}

struct Timed {
    at: Ms,
    seq: u64,
    event: Event,
}

impl PartialEq for Timed {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timed {
    fn cmp(&self, o: &Self) -> Ordering {
        // a min-heap on (time, sequence)
        o.at.total_cmp(&self.at).then(o.seq.cmp(&self.seq))
    }
}

struct NodeRun {
    running: u32,
    queues: [VecDeque<usize>; 3],
    running_jobs: Vec<(usize, Ms)>,
}

/// Runs `workload` through `policy` until `end`; returns every completion
/// of a request issued before `end`.
pub struct Sim {
    nodes: Vec<SimNode>,
    network: Network,
    report_every_ms: Ms,
    sites: usize,
    seed: u64,
}

struct JobRun {
    job: Job,
    node: usize,
    back_ms: Ms,
    started: Ms,
    hit: bool,
}

/// A node's prefix cache: sessions, most recently used last.
#[derive(Default, Clone)]
struct SessionCache(VecDeque<usize>);

impl SessionCache {
    /// Whether `s` is held; it becomes the most recent (the request that
    /// asked computes or maps it now), dropping the oldest past `cap`.
    fn touch(&mut self, s: usize, cap: usize) -> bool {
        let hit = match self.0.iter().position(|&x| x == s) {
            Some(i) => {
                self.0.remove(i);
                true
            }
            None => false,
        };
        self.0.push_back(s);
        while self.0.len() > cap {
            self.0.pop_front();
        }
        hit
    }
}

impl Sim {
    /// A simulator of `nodes` on `network`, with load reports every
    /// `report_every_ms`; `seed` drives the network's jitter.
    pub fn new(nodes: Vec<SimNode>, network: Network, report_every_ms: Ms, seed: u64) -> Self {
        let sites = network.rtt.len();
        Self {
            nodes,
            network,
            report_every_ms,
            sites,
            seed,
        }
    }

    /// The nodes.
    pub fn nodes(&self) -> &[SimNode] {
        &self.nodes
    }

    /// Runs until virtual time `end`.
    pub fn run(
        &self,
        workload: &mut dyn Workload,
        policy: &mut dyn Policy,
        end: Ms,
    ) -> Vec<Completion> {
        let n = self.nodes.len();
        let mut heap = BinaryHeap::new();
        let mut seq = 0u64;
        let mut push = |heap: &mut BinaryHeap<Timed>, at: Ms, event: Event| {
            seq += 1;
            heap.push(Timed { at, seq, event });
        };
        // a new request joins the job list and is issued at `at`
        let new_job = |jobs: &mut Vec<JobRun>, job: Job| {
            jobs.push(JobRun {
                job,
                node: usize::MAX,
                back_ms: 0.0,
                started: 0.0,
                hit: false,
            });
            Event::Issue(jobs.len() - 1)
        };
        let mut jobs: Vec<JobRun> = Vec::new();
        for (at, job) in workload.initial() {
            let e = new_job(&mut jobs, job);
            push(&mut heap, at, e);
        }
        push(&mut heap, 0.0, Event::Report);
        let mut runs: Vec<NodeRun> = (0..n)
            .map(|_| NodeRun {
                running: 0,
                queues: Default::default(),
                running_jobs: Vec::new(),
            })
            .collect();
        let mut reports = vec![Report::default(); n];
        let mut sent: Vec<HashMap<usize, Sent>> = vec![HashMap::new(); self.sites];
        let mut last_report = 0.0;
        let mut inflight_remote = vec![0u32; self.sites];
        let mut reported_inflight = vec![0u32; self.sites];
        let mut out = Vec::new();
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut caches = vec![SessionCache::default(); n];
        let mut cached_seen: Vec<Vec<usize>> = vec![Vec::new(); n];

        while let Some(Timed { at: now, event, .. }) = heap.pop() {
            if now > end {
                break;
            }
            match event {
                Event::Report => {
                    for (i, r) in runs.iter().enumerate() {
                        let mut rep = Report {
                            running: r.running,
                            queued: r.queues.iter().map(|q| q.len() as u32).sum(),
                            ..Report::default()
                        };
                        for &(j, started) in &r.running_jobs {
                            let rate = self.nodes[i].tokens_per_s / self.nodes[i].slots as f64;
                            let done = (now - started) / 1000.0 * rate;
                            rep.running_tokens += (jobs[j].job.expected_work - done).max(0.0);
                        }
                        for (p, q) in r.queues.iter().enumerate() {
                            let t: f64 = q.iter().map(|&j| jobs[j].job.expected_work).sum();
                            rep.queued_tokens += t;
                            if p == 2 {
                                rep.queued_critical_tokens += t;
                            }
                        }
                        reports[i] = rep;
                    }
                    for s in &mut sent {
                        s.clear();
                    }
                    reported_inflight.copy_from_slice(&inflight_remote);
                    for (seen, c) in cached_seen.iter_mut().zip(&caches) {
                        seen.clear();
                        seen.extend(c.0.iter().copied());
                    }
                    last_report = now;
                    push(&mut heap, now + self.report_every_ms, Event::Report);
                }
                Event::Issue(j) => {
                    if let Some((at, next)) = workload.issued(&jobs[j].job, now) {
                        let e = new_job(&mut jobs, next);
                        push(&mut heap, at, e);
                    }
                    let job = &jobs[j].job;
                    let view = View {
                        nodes: &self.nodes,
                        reports: &reports,
                        sent: &sent[job.origin],
                        report_age_ms: now - last_report,
                        network: &self.network,
                        site_inflight: &reported_inflight,
                        now,
                        cached: &cached_seen,
                    };
                    match policy.choose(job, &view) {
                        Some(node) => {
                            let site = self.nodes[node].site;
                            let s = sent[job.origin].entry(node).or_default();
                            s.count += 1;
                            s.tokens += job.expected_work;
                            if job.class == Criticality::Critical {
                                s.critical_tokens += job.expected_work;
                            }
                            let factor = self.network.congestion(site, inflight_remote[site]);
                            let remote = site != job.origin;
                            if remote {
                                inflight_remote[site] += 1;
                            }
                            let mut go =
                                self.network
                                    .one_way(job.origin, site, job.bytes / 2.0, factor);
                            if let Some(&mean) = self
                                .network
                                .jitter_ms
                                .get(job.origin)
                                .and_then(|r| r.get(site))
                            {
                                go += super::exp(&mut rng, mean);
                            }
                            jobs[j].node = node;
                            jobs[j].back_ms = go;
                            push(&mut heap, now + go, Event::Arrive(j));
                        }
                        None => {
                            let job = jobs[j].job.clone();
                            out.push(Completion {
                                job: job.clone(),
                                latency_ms: None,
                                node: None,
                                hit: false,
                                ttft_ms: None,
                            });
                            if let Some((at, next)) = workload.next(&job, now) {
                                let e = new_job(&mut jobs, next);
                                push(&mut heap, at, e);
                            }
                        }
                    }
                }
                Event::Arrive(j) => {
                    let node = jobs[j].node;
                    let r = &mut runs[node];
                    if r.running < self.nodes[node].slots {
                        r.running += 1;
                        r.running_jobs.push((j, now));
                        jobs[j].started = now;
                        jobs[j].hit = self.cache_hit(&mut caches[node], node, &jobs[j].job);
                        let t = self.service_ms(node, &jobs[j].job, jobs[j].hit);
                        push(&mut heap, now + t, Event::Finish(j));
                    } else {
                        let p = if self.nodes[node].priority {
                            jobs[j].job.class.priority() as usize
                        } else {
                            0
                        };
                        r.queues[p].push_back(j);
                    }
                }
                Event::Finish(j) => {
                    let node = jobs[j].node;
                    let r = &mut runs[node];
                    r.running -= 1;
                    r.running_jobs.retain(|&(x, _)| x != j);
                    if let Some(next) = r.queues.iter_mut().rev().find_map(|q| q.pop_front()) {
                        r.running += 1;
                        r.running_jobs.push((next, now));
                        jobs[next].started = now;
                        jobs[next].hit = self.cache_hit(&mut caches[node], node, &jobs[next].job);
                        let t = self.service_ms(node, &jobs[next].job, jobs[next].hit);
                        push(&mut heap, now + t, Event::Finish(next));
                    }
                    let site = self.nodes[node].site;
                    let job = &jobs[j].job;
                    if site != job.origin {
                        inflight_remote[site] -= 1;
                    }
                    // the response takes the path the request took
                    push(&mut heap, now + jobs[j].back_ms, Event::Respond(j));
                }
                Event::Respond(j) => {
                    let job = jobs[j].job.clone();
                    let node = jobs[j].node;
                    let latency = now - job.issued;
                    policy.observe(&job, node, latency);
                    let saved = if jobs[j].hit { job.prefix_work } else { 0.0 };
                    let n = &self.nodes[node];
                    let prefill_ms = (job.prefill_work - saved).max(0.0)
                        / (n.tokens_per_s / n.slots as f64)
                        * 1000.0;
                    out.push(Completion {
                        job: job.clone(),
                        latency_ms: Some(latency),
                        node: Some(node),
                        hit: jobs[j].hit,
                        ttft_ms: Some(jobs[j].started - job.issued + prefill_ms + jobs[j].back_ms),
                    });
                    if let Some((at, next)) = workload.next(&job, now) {
                        let e = new_job(&mut jobs, next);
                        push(&mut heap, at, e);
                    }
                }
            }
        }
        out
    }

    /// Whether `job`'s session prefix is in `node`'s cache (which then
    /// holds it, as the most recent).
    fn cache_hit(&self, cache: &mut SessionCache, node: usize, job: &Job) -> bool {
        let cap = self.nodes[node].cache_sessions;
        match job.session {
            Some(s) if cap > 0 => cache.touch(s, cap),
            _ => false,
        }
    }

    fn service_ms(&self, node: usize, job: &Job, hit: bool) -> Ms {
        let n = &self.nodes[node];
        let hop = n.hop_ms_per_token.get(job.model).copied().unwrap_or(0.0);
        let work = job.work - if hit { job.prefix_work } else { 0.0 };
        work.max(0.0) / (n.tokens_per_s / n.slots as f64) * 1000.0 + hop * job.tokens
    }
}
