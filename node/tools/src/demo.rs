//! `weft demo`: a whole fabric on this machine, from one command.
//!
//! It starts 3 coordinator members and 6 nodes as `weft node` processes on
//! loopback: two edge sites (`edge-a`, `edge-b`, one region: edge-edge
//! links between them) with 2 nodes each and one cloud site with 2 nodes. It registers the model and gives the
//! coordinators the agents' demand at the edge sites. Then it runs a
//! synthetic agent workload (critical and sheddable, short and long
//! prompts) through the edge gateways' APIs twice:
//! 1. **weft**: the placement weft computes for that demand, and
//! 2. **cloud-only**: the same demand pinned to the cloud site, so every
//!    request crosses an edge-core link.
//!
//! The report gives the placement map, latency percentiles per class,
//! tokens/s and the bytes that crossed edge-core links in each run (read
//! from the nodes' `weft_dataplane_bytes_total` counters). Everything it
//! started is stopped at the end, cleanly (SIGTERM, then SIGKILL after a
//! grace period).
//!
//! The links here are loopback: no bandwidth limit or latency separates
//! the "sites" (the report says so). The edge-core figures are the bytes
//! that would cross those links.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use weft_api::headers::SERVED_BY_HEADER;
use weft_cluster::credentials::ClusterCa;

/// The name the demo registers its model under.
pub const MODEL: &str = "demo";

/// What `weft demo` runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Model source (`default`, a .gguf path, ...).
    pub model: String,
    /// A reduced workload.
    pub quick: bool,
    /// Where to write `demo.json`, if anywhere.
    pub out: Option<PathBuf>,
    /// Keep the fabric's directory (configs, logs, intent logs).
    pub keep: bool,
    /// The `weft` binary to start nodes with.
    pub exe: PathBuf,
    /// More lines for every node's `[serve]` section.
    pub serve_extra: String,
    /// The decode tokens/s each node offers the placement and the router.
    pub tokens_per_s: f64,
}

/// The workload's shape.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Workload {
    /// Requests per edge site.
    pub requests_per_site: usize,
    /// Agents sending at once, per site.
    pub agents_per_site: usize,
    /// Tokens each request asks for.
    pub max_tokens: u32,
    /// Lines of tool output in a long prompt.
    pub long_prompt_lines: usize,
}

impl Workload {
    fn for_mode(quick: bool) -> Self {
        if quick {
            Self {
                requests_per_site: 8,
                agents_per_site: 2,
                max_tokens: 8,
                long_prompt_lines: 6,
            }
        } else {
            Self {
                requests_per_site: 10,
                agents_per_site: 3,
                max_tokens: 24,
                long_prompt_lines: 12,
            }
        }
    }
}

/// The edge demand the operator forecasts, per edge site: agents with long
/// contexts (`PROMPT_TOKENS`) and short answers. The placement weighs the
/// edge-core bytes this traffic would cost over an hour against moving the
/// weights to the edge once.
const DEMAND_RPS: f64 = 4.0;
const DEMAND_PROMPT_TOKENS: f64 = 6000.0;
const DEMAND_OUTPUT_TOKENS: f64 = 32.0;

/// One node of the demo fabric.
#[derive(Debug, Clone)]
struct DemoNode {
    name: String,
    site: &'static str,
    api: SocketAddr,
}

/// A node of a fabric to start.
struct NodeSpec {
    name: String,
    site: &'static str,
    kind: &'static str,
    region: u32,
    /// Bytes it offers to the placement.
    memory: u64,
}

/// The processes of the fabric; dropping it stops them all.
struct Fabric {
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    exe: PathBuf,
    coordinators: Vec<(String, Child)>,
    nodes: Vec<(DemoNode, Child)>,
    /// `c1.toml`: the config the demo uses to talk to the cluster.
    admin: PathBuf,
}

/// One request's outcome.
#[derive(Debug, Clone)]
struct Outcome {
    class: &'static str,
    status: u16,
    latency_ms: f64,
    tokens: u64,
    served_by: String,
    error: Option<String>,
}

/// A run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Requests sent.
    pub requests: usize,
    /// Requests that failed (not 200, and not a sheddable request shed).
    pub errors: usize,
    /// Sheddable requests refused under load (429).
    pub shed: usize,
    /// Wall time of the workload (s).
    pub wall_s: f64,
    /// Completion tokens over wall time.
    pub tokens_per_s: f64,
    /// Latency by class: count, p50, p95 (ms) of the requests served.
    pub classes: BTreeMap<String, ClassFigures>,
    /// Bytes of requests and answers that crossed edge-core links.
    pub edge_core_bytes: u64,
    /// Requests served by each node.
    pub served_by: BTreeMap<String, usize>,
    /// The first few errors, as the API gave them.
    pub error_samples: Vec<String>,
    /// Which node holds the model.
    pub placement: BTreeMap<String, Vec<String>>,
}

/// Latency figures of one class.
#[derive(Debug, Clone, Serialize)]
pub struct ClassFigures {
    /// Requests served.
    pub served: usize,
    /// Median latency (ms).
    pub p50_ms: f64,
    /// 95th percentile latency (ms).
    pub p95_ms: f64,
}

/// The demo's report (`demo.json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Model source.
    pub model: String,
    /// `quick` or `full`.
    pub mode: &'static str,
    /// The workload.
    pub workload: Workload,
    /// Requests in both runs.
    pub requests: usize,
    /// Errors in both runs.
    pub errors: usize,
    /// The run on weft's placement.
    pub weft: RunReport,
    /// The run with the model only in the cloud.
    pub cloud_only: RunReport,
    /// `1 - weft / cloud_only` edge-core bytes.
    pub edge_core_reduction: f64,
    /// Weight bytes weft's placement brought into edge sites (once per
    /// placement, not per request; here they come from the local model
    /// store).
    pub weights_to_edge_bytes: u64,
    /// What the links were.
    pub links: &'static str,
    /// Seconds from start to the report.
    pub took_s: f64,
}

/// A free loopback port for a process of the fabric to bind later. It is
/// taken below the usual ephemeral range (32768 and up), so no socket that
/// a node binds to port 0 meanwhile (every node's QUIC client does) can
/// take it first; each is handed out once per run.
fn free_port(udp: bool) -> Result<SocketAddr> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..12_000 {
        let port = 20_000 + start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        let addr = SocketAddr::from(([127, 0, 0, 1], port as u16));
        let free = if udp {
            UdpSocket::bind(addr).is_ok()
        } else {
            TcpListener::bind(addr).is_ok()
        };
        if free {
            return Ok(addr);
        }
    }
    bail!("no free loopback port between 20000 and 32000")
}

fn free_udp() -> Result<SocketAddr> {
    free_port(true)
}

fn free_tcp() -> Result<SocketAddr> {
    free_port(false)
}

fn say(msg: impl AsRef<str>) {
    eprintln!("[demo] {}", msg.as_ref());
}

impl Fabric {
    fn weft(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.exe)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} {args:?}", self.exe.display()))?;
        if !out.status.success() {
            bail!(
                "weft {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn spawn(&self, name: &str, config: &Path) -> Result<Child> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        Command::new(&self.exe)
            .args(["node", "--config"])
            .arg(config)
            .env("WEFT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))
    }

    /// Writes the configs and starts 3 coordinators and the demo's 6 nodes.
    fn start(opts: &DemoOptions) -> Result<Self> {
        // every node the same: one worker thread (the machine has few cores)
        let mut nodes = Vec::new();
        for (site, kind, region, memory) in [
            ("edge-a", "edge", 1, 2u64 << 30),
            ("edge-b", "edge", 1, 2 << 30),
            ("cloud", "cloud", 0, 16 << 30),
        ] {
            for k in 1..=2 {
                nodes.push(NodeSpec {
                    name: format!("{site}-{k}"),
                    site,
                    kind,
                    region,
                    memory,
                });
            }
        }
        Self::start_nodes(opts, &nodes)
    }

    /// Writes the configs and starts 3 coordinators and `nodes`.
    fn start_nodes(opts: &DemoOptions, nodes: &[NodeSpec]) -> Result<Self> {
        let tmp = tempfile::Builder::new().prefix("weft-demo-").tempdir()?;
        let dir = tmp.path().to_path_buf();
        let tmp = if opts.keep {
            let _ = tmp.keep(); // nothing removes it
            None
        } else {
            Some(tmp)
        };
        let mut f = Fabric {
            _tmp: tmp,
            dir: dir.clone(),
            exe: opts.exe.clone(),
            coordinators: Vec::new(),
            nodes: Vec::new(),
            admin: dir.join("c1.toml"),
        };
        let d = |p: &str| dir.join(p).to_string_lossy().into_owned();
        f.weft(&[
            "cluster",
            "init",
            "--data-dir",
            &d("c1"),
            "--name",
            "coord-1",
        ])?;
        for i in [2, 3] {
            f.weft(&[
                "cluster",
                "issue",
                "--ca-dir",
                &d("c1/ca"),
                "--name",
                &format!("coord-{i}"),
                "--data-dir",
                &d(&format!("c{i}")),
            ])?;
        }
        let peers: Vec<(u64, String, SocketAddr)> = (1..=3)
            .map(|i| Ok((i, format!("coord-{i}"), free_udp()?)))
            .collect::<Result<_>>()?;
        let overlay: Vec<String> = (0..3)
            .map(|_| Ok(format!("/ip4/127.0.0.1/udp/{}/quic-v1", free_udp()?.port())))
            .collect::<Result<_>>()?;
        let peer_list = peers
            .iter()
            .map(|(id, name, addr)| {
                format!("{{ id = {id}, name = \"{name}\", addr = \"{addr}\" }}")
            })
            .collect::<Vec<_>>()
            .join(", ");
        for (i, (id, name, addr)) in peers.iter().enumerate() {
            let cfg = format!(
                "[node]\nname = \"{name}\"\ndata_dir = \"{}\"\nlisten = \"{addr}\"\nsite = \"cloud\"\nkind = \"cloud\"\nmemory_bytes = 1\ntokens_per_s = 1.0\n\n[coordinator]\nid = {id}\nca_dir = \"{}\"\npeers = [{peer_list}]\n\n[overlay]\nlisten = \"{}\"\nbootstrap = [\"{}\"]\nmdns = false\n",
                d(&format!("c{}", i + 1)),
                d("c1/ca"),
                overlay[i],
                overlay[0],
            );
            let path = dir.join(format!("c{}.toml", i + 1));
            std::fs::write(&path, cfg)?;
            f.coordinators.push((name.clone(), f.spawn(name, &path)?));
        }
        let ca = ClusterCa::load(&dir.join("c1/ca"))?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        for n in nodes {
            let (name, site, kind, region, memory) = (&n.name, n.site, n.kind, n.region, n.memory);
            let api = free_tcp()?;
            let cfg = format!(
                "[node]\nname = \"{name}\"\ndata_dir = \"{}\"\nlisten = \"{}\"\nsite = \"{site}\"\nkind = \"{kind}\"\nregion = {region}\nmemory_bytes = {memory}\ntokens_per_s = {tps:.1}\n\n[join]\ntoken = \"{}\"\ncoordinators = [{peer_list}]\n\n[overlay]\nlisten = \"/ip4/127.0.0.1/udp/0/quic-v1\"\nbootstrap = [\"{}\"]\nmdns = false\n\n[serve]\naddr = \"{api}\"\nsandbox = false\nthreads = 1\nkv_budget = 268435456\nmax_queue = 64\n{}",
                d(name),
                free_udp()?,
                ca.issue_token(now, 600, name, weft_cluster::credentials::Role::Node)?,
                overlay[0],
                opts.serve_extra,
                tps = opts.tokens_per_s,
            );
            let path = dir.join(format!("{name}.toml"));
            std::fs::write(&path, cfg)?;
            let child = f.spawn(name, &path)?;
            f.nodes.push((
                DemoNode {
                    name: name.clone(),
                    site,
                    api,
                },
                child,
            ));
        }
        Ok(f)
    }

    /// `weft cluster …` against the coordinators, retried while they elect
    /// a leader.
    async fn admin(&self, args: &[&str], within: Duration) -> Result<String> {
        let t = Instant::now();
        loop {
            let mut all = args.to_vec();
            all.extend(["--config", self.admin.to_str().unwrap_or_default()]);
            match self.weft(&all) {
                Ok(out) => return Ok(out),
                Err(e) if t.elapsed() > within => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    fn log_tail(&self, name: &str) -> String {
        let text =
            std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    /// Stops everything: SIGTERM, then SIGKILL after a grace period.
    fn stop(&mut self) {
        let mut all: Vec<(String, Child)> = self
            .nodes
            .drain(..)
            .map(|(n, c)| (n.name, c))
            .chain(self.coordinators.drain(..))
            .collect();
        for (_, c) in &all {
            terminate(c);
        }
        let t = Instant::now();
        for (name, c) in &mut all {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if t.elapsed() < Duration::from_secs(10) => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        say(format!("{name} did not stop in 10 s; killing it"));
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
    }
}

/// Asks a child to stop (SIGTERM): a node drains, says goodbye to the
/// overlay and syncs its logs.
#[allow(unsafe_code)]
fn terminate(c: &Child) {
    // SAFETY: kill(2) with a pid this process started and has not reaped
    unsafe {
        libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Which nodes hold which models now (their `/v1/models`; a node that
/// does not answer is missing).
async fn placement(http: &reqwest::Client, nodes: &[DemoNode]) -> BTreeMap<String, Vec<String>> {
    let mut map = BTreeMap::new();
    for n in nodes {
        let held = async {
            let v: Value = http
                .get(format!("http://{}/v1/models", n.api))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            Some(
                v["data"]
                    .as_array()?
                    .iter()
                    .filter_map(|m| m["id"].as_str().map(String::from))
                    .collect::<Vec<_>>(),
            )
        }
        .await;
        // a node that does not answer is left out
        if let Some(held) = held {
            map.insert(n.name.clone(), held);
        }
    }
    map
}

/// The sum over nodes of their edge-core data-plane bytes.
async fn edge_core_bytes(http: &reqwest::Client, nodes: &[DemoNode]) -> u64 {
    let mut total = 0;
    for n in nodes {
        let Ok(r) = http.get(format!("http://{}/metrics", n.api)).send().await else {
            continue;
        };
        let text = r.text().await.unwrap_or_default();
        total += text
            .lines()
            .find_map(|l| l.strip_prefix("weft_dataplane_bytes_total{link=\"edge-to-core\"} "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

/// Waits until `ready` holds for the placement, then until a request
/// through every edge node is served.
async fn wait_placed(
    f: &Fabric,
    http: &reqwest::Client,
    what: &str,
    ready: impl Fn(&BTreeMap<String, Vec<String>>, &[DemoNode]) -> bool,
    probe: bool,
    within: Duration,
) -> Result<BTreeMap<String, Vec<String>>> {
    let nodes: Vec<DemoNode> = f.nodes.iter().map(|(n, _)| n.clone()).collect();
    let t = Instant::now();
    let map = loop {
        let map = placement(http, &nodes).await;
        if ready(&map, &nodes) {
            break map;
        }
        if t.elapsed() > within {
            let tails: Vec<String> = nodes
                .iter()
                .map(|n| format!("--- {} ---\n{}", n.name, f.log_tail(&n.name)))
                .collect();
            bail!(
                "{what}: the placement was not served within {within:?} (holding now: {map:?})\n{}",
                tails.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    for n in nodes.iter().filter(|n| probe && n.site != "cloud") {
        loop {
            let r = http
                .post(format!("http://{}/v1/completions", n.api))
                .json(&json!({"model": MODEL, "prompt": "ping", "max_tokens": 1}))
                .send()
                .await;
            if matches!(&r, Ok(r) if r.status() == 200) {
                break;
            }
            if t.elapsed() > within {
                bail!(
                    "{what}: {} never served a request:\n{}",
                    n.name,
                    f.log_tail(&n.name)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    say(format!(
        "{what}: placement served after {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    Ok(map)
}

/// A prompt an agent might send: a short instruction, or a long one with
/// a tool's output pasted in.
fn prompt(site: &str, i: usize, lines: usize) -> String {
    let ask =
        format!("Agent {i} at {site}: in one sentence, what should happen next with job {i}?");
    if lines == 0 {
        return ask;
    }
    let mut s = String::from("Tool output follows.\n");
    for k in 0..lines {
        s += &format!(
            "[{k:02}] job {i} step {k}: read 128 records from sensor {} at {site}, 3 anomalies flagged, queue depth {}\n",
            (i * 7 + k) % 13,
            (i + k * 5) % 17
        );
    }
    s + &ask
}

/// Runs the workload through the edge nodes' APIs.
async fn run_workload(
    http: &reqwest::Client,
    nodes: &[DemoNode],
    w: Workload,
) -> (Vec<Outcome>, f64) {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for site in ["edge-a", "edge-b"] {
        let gateways: Vec<SocketAddr> = nodes
            .iter()
            .filter(|n| n.site == site)
            .map(|n| n.api)
            .collect();
        let gateway_names: Vec<String> = nodes
            .iter()
            .filter(|n| n.site == site)
            .map(|n| n.name.clone())
            .collect();
        let queue = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for agent in 0..w.agents_per_site {
            let (http, queue, api, gateway_names) = (
                http.clone(),
                queue.clone(),
                gateways[agent % gateways.len()],
                gateway_names.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = queue.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= w.requests_per_site {
                        return out;
                    }
                    let class = if i % 3 == 0 { "critical" } else { "sheddable" };
                    let body = json!({
                        "model": MODEL,
                        "prompt": prompt(site, i, if i % 2 == 1 { w.long_prompt_lines } else { 0 }),
                        "max_tokens": w.max_tokens,
                        "temperature": 0,
                        "weft": {"criticality": class},
                    });
                    let t = Instant::now();
                    let r = http
                        .post(format!("http://{api}/v1/completions"))
                        .json(&body)
                        .send()
                        .await;
                    let (status, served_by, v) = match r {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let by = r
                                .headers()
                                .get(SERVED_BY_HEADER)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or(gateway_names[agent % gateway_names.len()].as_str())
                                .to_string();
                            let v: Value = r.json().await.unwrap_or(Value::Null);
                            (status, by, v)
                        }
                        Err(e) => (
                            0,
                            String::new(),
                            json!({"error": {"message": e.to_string()}}),
                        ),
                    };
                    out.push(Outcome {
                        class,
                        status,
                        latency_ms: t.elapsed().as_secs_f64() * 1e3,
                        tokens: v["usage"]["completion_tokens"].as_u64().unwrap_or(0),
                        served_by,
                        error: (status != 200).then(|| {
                            format!(
                                "{status}: {}",
                                v["error"]["message"].as_str().unwrap_or("?")
                            )
                        }),
                    });
                }
            }));
        }
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    (all, start.elapsed().as_secs_f64())
}

/// Runs the workload on placement `map` and sums it up, with the
/// edge-core bytes it cost.
async fn measured_run(
    http: &reqwest::Client,
    nodes: &[DemoNode],
    w: Workload,
    map: BTreeMap<String, Vec<String>>,
) -> RunReport {
    let before = edge_core_bytes(http, nodes).await;
    let (out, wall) = run_workload(http, nodes, w).await;
    let bytes = edge_core_bytes(http, nodes).await - before;
    summarize(&out, wall, bytes, map)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summarize(
    outcomes: &[Outcome],
    wall_s: f64,
    bytes: u64,
    placement: BTreeMap<String, Vec<String>>,
) -> RunReport {
    let mut classes = BTreeMap::new();
    for class in ["critical", "sheddable"] {
        let mut l: Vec<f64> = outcomes
            .iter()
            .filter(|o| o.class == class && o.status == 200)
            .map(|o| o.latency_ms)
            .collect();
        l.sort_by(f64::total_cmp);
        classes.insert(
            class.to_string(),
            ClassFigures {
                served: l.len(),
                p50_ms: percentile(&l, 50.0),
                p95_ms: percentile(&l, 95.0),
            },
        );
    }
    let shed = outcomes
        .iter()
        .filter(|o| o.class == "sheddable" && o.status == 429)
        .count();
    let mut served_by = BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.status == 200) {
        *served_by.entry(o.served_by.clone()).or_default() += 1;
    }
    let tokens: u64 = outcomes.iter().map(|o| o.tokens).sum();
    RunReport {
        requests: outcomes.len(),
        errors: outcomes.iter().filter(|o| o.status != 200).count() - shed,
        shed,
        wall_s,
        tokens_per_s: tokens as f64 / wall_s.max(1e-9),
        classes,
        edge_core_bytes: bytes,
        served_by,
        error_samples: outcomes
            .iter()
            .filter_map(|o| o.error.clone())
            .take(3)
            .collect(),
        placement,
    }
}

fn holders<'a>(
    map: &'a BTreeMap<String, Vec<String>>,
    nodes: &'a [DemoNode],
    site: &'a str,
) -> impl Iterator<Item = &'a DemoNode> + 'a {
    nodes.iter().filter(move |n| {
        n.site == site
            && map
                .get(&n.name)
                .is_some_and(|m| m.iter().any(|x| x == MODEL))
    })
}

/// Starts the fabric and registers the model: the fabric, its nodes, and
/// an HTTP client whose requests time out after `timeout`.
async fn launch(
    opts: &DemoOptions,
    timeout: Duration,
) -> Result<(Fabric, Vec<DemoNode>, reqwest::Client)> {
    launch_nodes(opts, timeout, None).await
}

/// [`launch`] with these nodes instead of the demo's.
async fn launch_nodes(
    opts: &DemoOptions,
    timeout: Duration,
    nodes: Option<&[NodeSpec]>,
) -> Result<(Fabric, Vec<DemoNode>, reqwest::Client)> {
    let f = match nodes {
        Some(n) => Fabric::start_nodes(opts, n)?,
        None => Fabric::start(opts)?,
    };
    if opts.keep {
        say(format!("configs and logs in {}", f.dir.display()));
    }
    let nodes: Vec<DemoNode> = f.nodes.iter().map(|(n, _)| n.clone()).collect();
    let http = reqwest::Client::builder().timeout(timeout).build()?;
    say(format!("registering the model ({})", opts.model));
    f.admin(
        &[
            "cluster",
            "model-add",
            "--source",
            &opts.model,
            "--name",
            MODEL,
        ],
        Duration::from_secs(60),
    )
    .await
    .context("registering the model")?;
    Ok((f, nodes, http))
}

/// Runs the demo; the fabric is stopped before it returns.
pub async fn run(opts: &DemoOptions) -> Result<Report> {
    let started = Instant::now();
    let w = Workload::for_mode(opts.quick);
    let within = if opts.quick {
        Duration::from_secs(90)
    } else {
        Duration::from_secs(120)
    };
    say("starting 3 coordinators and 6 nodes (edge-a, edge-b, cloud) on loopback");
    let (mut f, nodes, http) = launch(opts, Duration::from_secs(120)).await?;
    let model_bytes = {
        let source = weft_store::ModelSource::parse(&opts.model)?;
        weft_store::ModelStore::default_location()
            .resolve(&source, &weft_store::PipFetcher::default())?
            .bytes
    };
    let demand = |site: &str, rps: f64| {
        format!("{site}:{MODEL}:{rps}:{DEMAND_PROMPT_TOKENS}:{DEMAND_OUTPUT_TOKENS}")
    };

    // 1. weft's placement for the agents' demand at the edge
    say(format!(
        "demand: {DEMAND_RPS} req/s per edge site, {DEMAND_PROMPT_TOKENS} prompt and {DEMAND_OUTPUT_TOKENS} output tokens each"
    ));
    f.admin(
        &[
            "cluster",
            "replan",
            "--demand",
            &demand("edge-a", DEMAND_RPS),
            "--demand",
            &demand("edge-b", DEMAND_RPS),
        ],
        Duration::from_secs(30),
    )
    .await?;
    let map = wait_placed(
        &f,
        &http,
        "weft",
        |m, n| holders(m, n, "edge-a").next().is_some() && holders(m, n, "edge-b").next().is_some(),
        true,
        within,
    )
    .await?;
    let weights_to_edge = ["edge-a", "edge-b"]
        .iter()
        .map(|s| holders(&map, &nodes, s).count() as u64)
        .sum::<u64>()
        * model_bytes;
    say(format!(
        "weft: {} requests from agents at 2 edge sites",
        2 * w.requests_per_site
    ));
    let weft = measured_run(&http, &nodes, w, map).await;

    // 2. the same demand, served from the cloud only. The placement keeps
    // replicas while their model has demand anywhere (it does not churn),
    // so the demand goes to zero first and every replica is dropped; the
    // edge sites stay pinned at zero, or the demand their nodes measured
    // in the first run would bring replicas back to the edge (as it should).
    say("cloud-only: dropping the placement, then the same demand pinned to the cloud site");
    let (zero_a, zero_b) = (demand("edge-a", 0.0), demand("edge-b", 0.0));
    f.admin(
        &[
            "cluster",
            "replan",
            "--demand",
            &zero_a,
            "--demand",
            &zero_b,
            "--demand",
            &demand("cloud", 0.0),
        ],
        Duration::from_secs(30),
    )
    .await?;
    wait_placed(
        &f,
        &http,
        "no demand",
        |m, n| m.len() == n.len() && m.values().all(|held| held.is_empty()),
        false,
        within,
    )
    .await?;
    f.admin(
        &[
            "cluster",
            "replan",
            "--demand",
            &zero_a,
            "--demand",
            &zero_b,
            "--demand",
            &demand("cloud", 2.0 * DEMAND_RPS),
        ],
        Duration::from_secs(30),
    )
    .await?;
    let map = wait_placed(
        &f,
        &http,
        "cloud-only",
        |m, n| {
            holders(m, n, "cloud").next().is_some()
                && holders(m, n, "edge-a").next().is_none()
                && holders(m, n, "edge-b").next().is_none()
        },
        true,
        within,
    )
    .await?;
    let cloud_only = measured_run(&http, &nodes, w, map).await;
    say("stopping the fabric");
    f.stop();
    let reduction = if cloud_only.edge_core_bytes > 0 {
        1.0 - weft.edge_core_bytes as f64 / cloud_only.edge_core_bytes as f64
    } else {
        0.0
    };
    Ok(Report {
        model: opts.model.clone(),
        mode: if opts.quick { "quick" } else { "full" },
        workload: w,
        requests: weft.requests + cloud_only.requests,
        errors: weft.errors + cloud_only.errors,
        weft,
        cloud_only,
        edge_core_reduction: reduction,
        weights_to_edge_bytes: weights_to_edge,
        links: "loopback (no bandwidth limit or added latency between sites)",
        took_s: started.elapsed().as_secs_f64(),
    })
}

/// The report as a table for people.
pub fn table(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "\nweft demo ({} workload, model {})", r.mode, r.model);
    for (name, run) in [("weft", &r.weft), ("cloud-only", &r.cloud_only)] {
        let _ = writeln!(s, "\n{name}: placement");
        for (node, models) in &run.placement {
            if !models.is_empty() {
                let _ = writeln!(s, "  {node:<10} {}", models.join(", "));
            }
        }
    }
    let _ = writeln!(
        s,
        "\n{:<11} {:>8} {:>6} {:>5} {:>9} {:>9} {:>9} {:>9} {:>8} {:>14}",
        "run",
        "requests",
        "errors",
        "shed",
        "crit p50",
        "crit p95",
        "shed p50",
        "shed p95",
        "tok/s",
        "edge-core B"
    );
    for (name, run) in [("weft", &r.weft), ("cloud-only", &r.cloud_only)] {
        let c = &run.classes["critical"];
        let d = &run.classes["sheddable"];
        let _ = writeln!(
            s,
            "{name:<11} {:>8} {:>6} {:>5} {:>7.0}ms {:>7.0}ms {:>7.0}ms {:>7.0}ms {:>8.1} {:>14}",
            run.requests,
            run.errors,
            run.shed,
            c.p50_ms,
            c.p95_ms,
            d.p50_ms,
            d.p95_ms,
            run.tokens_per_s,
            run.edge_core_bytes
        );
    }
    for (name, run) in [("weft", &r.weft), ("cloud-only", &r.cloud_only)] {
        for e in &run.error_samples {
            let _ = writeln!(s, "  {name} error: {e}");
        }
    }
    let _ = writeln!(
        s,
        "\nedge-core bytes: {:.1}% fewer with weft; served by: weft {:?}, cloud-only {:?}",
        r.edge_core_reduction * 100.0,
        r.weft.served_by,
        r.cloud_only.served_by
    );
    let _ = writeln!(
        s,
        "weights brought to the edge once: {} bytes; links: {}; took {:.0} s",
        r.weights_to_edge_bytes, r.links, r.took_s
    );
    s
}

/// What a failover measurement found: streams forwarded from an edge
/// gateway to two replicas, one of which is killed with SIGKILL.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    /// Streams started.
    pub streams: usize,
    /// The node killed.
    pub victim: String,
    /// Streams that were on it, unfinished, when it died.
    pub cut: usize,
    /// Streams that ended with `[DONE]` and no error.
    pub completed: usize,
    /// Streams whose text equals the single-node answer.
    pub exact: usize,
    /// Per cut stream: the kill until its next token (ms), sorted.
    pub gap_ms: Vec<f64>,
    /// Median gap (ms).
    pub p50_ms: f64,
    /// 99th percentile gap (ms).
    pub p99_ms: f64,
}

/// One stream as its client saw it.
#[derive(Debug, Default)]
struct Seen {
    text: String,
    served_by: String,
    /// When each piece of text arrived.
    arrivals: Vec<Instant>,
    done: bool,
    error: bool,
}

async fn watch_stream(
    http: reqwest::Client,
    api: SocketAddr,
    body: Value,
    started: tokio::sync::mpsc::UnboundedSender<String>,
) -> Seen {
    let mut seen = Seen::default();
    let Ok(mut r) = http
        .post(format!("http://{api}/v1/completions"))
        .json(&body)
        .send()
        .await
    else {
        seen.error = true;
        return seen;
    };
    seen.served_by = r
        .headers()
        .get(SERVED_BY_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let mut buf = String::new();
    while let Ok(Some(chunk)) = r.chunk().await {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim_end().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                seen.done = true;
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
            if v.get("error").is_some() {
                seen.error = true;
            }
            let piece = v["choices"][0]["text"].as_str().unwrap_or("");
            if !piece.is_empty() {
                if seen.arrivals.is_empty() {
                    let _ = started.send(seen.served_by.clone());
                }
                seen.arrivals.push(Instant::now());
                seen.text.push_str(piece);
            }
        }
    }
    seen
}

/// Measures the failover gap: `streams` streams from the edge-b gateways,
/// forwarded to the two replicas at edge-a; once they are under way, the
/// replica with the most streams is killed (SIGKILL). For each stream it
/// cut, the gap is the time from the kill to the stream's next token.
pub async fn failover(
    opts: &DemoOptions,
    streams: usize,
    max_tokens: u32,
) -> Result<FailoverReport> {
    let (mut f, nodes, http) = launch(opts, Duration::from_secs(300)).await?;
    // enough demand at edge-a for both of its nodes
    f.admin(
        &[
            "cluster",
            "replan",
            "--demand",
            &format!("edge-a:{MODEL}:60:1000:128"),
            "--demand",
            &format!("edge-b:{MODEL}:0"),
            "--demand",
            &format!("cloud:{MODEL}:0"),
        ],
        Duration::from_secs(30),
    )
    .await?;
    wait_placed(
        &f,
        &http,
        "failover",
        |m, n| holders(m, n, "edge-a").count() == 2 && holders(m, n, "edge-b").next().is_none(),
        true,
        Duration::from_secs(120),
    )
    .await?;
    let prompts = [
        "The agents at the edge gateway report",
        "Write a short status line for job 17:",
        "List three things a platform engineer checks first:",
    ];
    let body = |p: &str, stream: bool| json!({"model": MODEL, "prompt": p, "max_tokens": max_tokens, "temperature": 0, "stream": stream});
    let mut expected = Vec::new();
    let holder = nodes
        .iter()
        .find(|n| n.name == "edge-a-1")
        .context("edge-a-1")?;
    for p in prompts {
        let v: Value = http
            .post(format!("http://{}/v1/completions", holder.api))
            .json(&body(p, false))
            .send()
            .await?
            .json()
            .await?;
        expected.push(
            v["choices"][0]["text"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    let fronts: Vec<SocketAddr> = nodes
        .iter()
        .filter(|n| n.site == "edge-b")
        .map(|n| n.api)
        .collect();
    let (tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for i in 0..streams {
        let b = body(prompts[i % prompts.len()], true);
        tasks.push(tokio::spawn(watch_stream(
            http.clone(),
            fronts[i % fronts.len()],
            b,
            tx.clone(),
        )));
    }
    drop(tx);
    // kill once a quarter of the streams are under way on one replica
    let mut on = BTreeMap::<String, usize>::new();
    let victim = loop {
        let by = started.recv().await.context("no stream produced a token")?;
        let n = on.entry(by.clone()).or_default();
        *n += 1;
        if *n >= streams.div_ceil(4) {
            break by;
        }
    };
    let i = f
        .nodes
        .iter()
        .position(|(n, _)| n.name == victim)
        .with_context(|| format!("{victim} is not a demo node"))?;
    let (_, mut child) = f.nodes.remove(i);
    let killed = Instant::now();
    child.kill()?;
    let _ = child.wait();
    say(format!("killed {victim}"));
    let mut report = FailoverReport {
        streams,
        victim: victim.clone(),
        cut: 0,
        completed: 0,
        exact: 0,
        gap_ms: Vec::new(),
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
    };
    for (i, t) in tasks.into_iter().enumerate() {
        let s = t.await?;
        if s.done && !s.error {
            report.completed += 1;
        }
        if s.text == expected[i % prompts.len()] {
            report.exact += 1;
        }
        if s.served_by == victim {
            if let Some(next) = s.arrivals.iter().find(|a| **a > killed) {
                // a stream that ended before the kill was not cut
                if s.arrivals.first().is_some_and(|a| *a < killed) {
                    report.cut += 1;
                    report
                        .gap_ms
                        .push(next.duration_since(killed).as_secs_f64() * 1e3);
                }
            }
        }
    }
    report.gap_ms.sort_by(f64::total_cmp);
    report.p50_ms = percentile(&report.gap_ms, 50.0);
    report.p99_ms = percentile(&report.gap_ms, 99.0);
    f.stop();
    Ok(report)
}

/// What a chain measurement found: one node serving the whole model beside
/// a 2-node chain at another site, the same requests on each.
#[derive(Debug, Clone, Serialize)]
pub struct ChainReport {
    /// The chain: `node[a..b)` in layer order.
    pub chain: Vec<String>,
    /// Concurrent streams per measurement.
    pub streams: usize,
    /// Decode tokens/s of each round, whole model on one node.
    pub whole_tokens_per_s: Vec<f64>,
    /// Decode tokens/s of each round, on the chain.
    pub chain_tokens_per_s: Vec<f64>,
    /// Whether every chain answer equalled the whole model's.
    pub same_text: bool,
}

/// One round of `streams` identical greedy streams on `api`, served there
/// (not routed on): aggregate decode tokens/s (tokens after each stream's
/// first, over the time from the first first-token to the last token), and
/// the texts.
async fn decode_rate(
    http: &reqwest::Client,
    api: SocketAddr,
    prompt: &str,
    max_tokens: u32,
    streams: usize,
) -> Result<(f64, Vec<String>)> {
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let (http, body) = (http.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut r = http
                .post(format!("http://{api}/v1/completions"))
                .json(&body)
                .send()
                .await?;
            anyhow::ensure!(r.status() == 200, "status {}", r.status());
            let (mut first, mut last, mut tokens, mut text) = (None, None, 0u64, String::new());
            sse_events(&mut r, |v| {
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    tokens = n;
                }
                if let Some(t) = v["choices"][0]["text"].as_str().filter(|t| !t.is_empty()) {
                    first.get_or_insert_with(Instant::now);
                    last = Some(Instant::now());
                    text.push_str(t);
                }
            })
            .await?;
            Ok((first, last, tokens, text))
        }));
    }
    let mut firsts = Vec::new();
    let mut lasts = Vec::new();
    let mut tokens = 0u64;
    let mut texts = Vec::new();
    for t in tasks {
        let (f, l, n, text) = t.await??;
        firsts.extend(f);
        lasts.extend(l);
        tokens += n.saturating_sub(1);
        texts.push(text);
    }
    let (Some(f), Some(l)) = (firsts.iter().min(), lasts.iter().max()) else {
        bail!("no tokens came back from {api}");
    };
    Ok((
        tokens as f64 / l.duration_since(*f).as_secs_f64().max(1e-9),
        texts,
    ))
}

/// Reads the server-sent events of `r` to its end, handing each event's
/// JSON to `each`; an error event is an error.
async fn sse_events(r: &mut reqwest::Response, mut each: impl FnMut(&Value)) -> Result<()> {
    let mut buf = String::new();
    while let Some(chunk) = r.chunk().await? {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim_end().strip_prefix("data: ") else {
                continue;
            };
            let v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
            anyhow::ensure!(v.get("error").is_none(), "error event: {v}");
            each(&v);
        }
    }
    Ok(())
}

/// The one node of `nodes` that serves the model at `site`, once `f`'s
/// placement has put it there.
async fn served_at(
    f: &Fabric,
    http: &reqwest::Client,
    nodes: &[DemoNode],
    site: &str,
    what: &str,
) -> Result<DemoNode> {
    let map = wait_placed(
        f,
        http,
        what,
        |m, n| holders(m, n, site).count() == 1,
        false,
        Duration::from_secs(180),
    )
    .await?;
    let found = holders(&map, nodes, site).next().cloned();
    found.with_context(|| format!("{what}: nothing serves the model at {site}"))
}

/// Measures decode tokens/s of a 2-node chain against one node: a fabric
/// with two edge nodes that each have room for about half the model's
/// layers (so the placement splits it over both), and beside it a fabric
/// with one node that holds the model whole. Each round runs the same `streams` greedy streams of
/// `max_tokens` on the whole model and then on the chain; every node has
/// one worker thread.
pub async fn chain(
    opts: &DemoOptions,
    max_tokens: u32,
    streams: usize,
    rounds: usize,
) -> Result<ChainReport> {
    let model = opts.model.clone();
    let rec = tokio::task::spawn_blocking(move || weft_cluster::models::model_record(&model, None))
        .await??;
    let half = rec.spec.layers.div_ceil(2);
    let memory = rec.spec.shard_memory(
        half,
        weft_placement::SolverConfig::default().kv_reserve_tokens,
    );
    let node = |name: &str, site, kind, region, memory| NodeSpec {
        name: name.into(),
        site,
        kind,
        region,
        memory,
    };
    // two fabrics side by side: the placement would rather serve the
    // edge from a whole replica one short hop away than split the model,
    // so the whole replica lives in a fabric of its own
    let (mut f, nodes, http) = launch_nodes(
        opts,
        Duration::from_secs(600),
        Some(&[
            node("edge-a-1", "edge-a", "edge", 1, memory),
            node("edge-a-2", "edge-a", "edge", 1, memory),
        ]),
    )
    .await?;
    let (mut g, one, _) = launch_nodes(
        opts,
        Duration::from_secs(600),
        Some(&[node("cloud-1", "cloud", "cloud", 0, 16 << 30)]),
    )
    .await?;
    for (fabric, site) in [(&f, "edge-a"), (&g, "cloud")] {
        fabric
            .admin(
                &[
                    "cluster",
                    "replan",
                    "--demand",
                    &format!("{site}:{MODEL}:1:200:64"),
                ],
                Duration::from_secs(30),
            )
            .await?;
    }
    let head = served_at(&f, &http, &nodes, "edge-a", "chain").await?;
    let whole = served_at(&g, &http, &one, "cloud", "whole").await?;
    // listed once assigned; served once the workers (and, for the head,
    // the nodes after it) are up
    for n in [&head, &whole] {
        let t = Instant::now();
        while !http
            .get(format!("http://{}/readyz", n.api))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            if t.elapsed() > Duration::from_secs(180) {
                bail!("{} never became ready", n.name);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let status: Value = serde_json::from_str(
        &f.admin(&["status", "--json"], Duration::from_secs(30))
            .await?,
    )?;
    let mut chain = Vec::new();
    for n in nodes.iter().filter(|n| n.site == "edge-a") {
        for m in status["load"][&n.name]["report"]["models"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            chain.push(format!("{}: {}", n.name, m.trim_end_matches(" (loading)")));
        }
    }
    chain.sort();
    say(format!(
        "chain: {}; whole model on {}",
        chain.join(", "),
        whole.name
    ));
    let prompt = "Write a short status report for the edge gateway fleet:";
    // warm both (first requests fault in weights and allocate caches)
    for api in [whole.api, head.api] {
        decode_rate(&http, api, prompt, 8, 1).await?;
    }
    let mut report = ChainReport {
        chain,
        streams,
        whole_tokens_per_s: Vec::new(),
        chain_tokens_per_s: Vec::new(),
        same_text: true,
    };
    for round in 1..=rounds {
        let (w, wt) = decode_rate(&http, whole.api, prompt, max_tokens, streams).await?;
        let (c, ct) = decode_rate(&http, head.api, prompt, max_tokens, streams).await?;
        report.same_text &= wt == ct;
        say(format!(
            "round {round}: whole {w:.1} tokens/s, chain {c:.1} tokens/s ({:.2}x)",
            c / w
        ));
        report.whole_tokens_per_s.push(w);
        report.chain_tokens_per_s.push(c);
    }
    f.stop();
    g.stop();
    Ok(report)
}

// ------------------------------------------------ prefix-aware routing

/// One routing mode's figures on the multi-turn agent workload.
#[derive(Debug, Clone, Serialize)]
pub struct PrefixRun {
    /// The mode: `prefix-aware`, `no-prefix-term` or `round-robin`.
    pub mode: &'static str,
    /// Of the turns after each agent's first, the share that found the
    /// whole previous turn's prompt cached where they ran.
    pub hit_rate: f64,
    /// Time to first token, p50 and p95 (ms).
    pub ttft_ms: (f64, f64),
    /// Generated tokens per second over the run.
    pub tokens_per_s: f64,
    /// Turns each node served.
    pub served_by: BTreeMap<String, usize>,
}

/// A shared system prompt and tool definitions of about `tokens` tokens.
fn agent_context(tokens: usize) -> String {
    let mut s = String::from("You are a maintenance agent for a factory line. Tools:\n");
    let mut i = 0;
    while s.len() < tokens * 4 {
        s.push_str(&format!(
            "- tool_{i}(station: int, reading: str) -> report: checks sensor {i} at a station and reports.\n"
        ));
        i += 1;
    }
    s
}

/// A tool output of 100 to 300 tokens for `agent`'s `turn`.
fn agent_tool_output(agent: usize, turn: usize) -> String {
    let n = 100 + (agent * 37 + turn * 91) % 201;
    let mut s = format!("\nTool output (agent {agent}, turn {turn}):");
    let mut k = 0;
    while s.len() < n * 4 {
        s.push_str(&format!(
            " station {} reads {} C;",
            (k * 7 + agent) % 40,
            20 + (k * 13 + turn) % 60
        ));
        k += 1;
    }
    s
}

/// One streamed completion: time to its first token (ms), its text, its
/// usage, and the node that served it.
async fn streamed_turn(
    http: &reqwest::Client,
    api: SocketAddr,
    prompt: &str,
    max_tokens: u32,
) -> Result<(f64, String, Value, String)> {
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let t = Instant::now();
    let mut r = http
        .post(format!("http://{api}/v1/completions"))
        .json(&body)
        .send()
        .await?;
    anyhow::ensure!(r.status() == 200, "status {}", r.status());
    let by = r
        .headers()
        .get(SERVED_BY_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let (mut first, mut text, mut usage) = (None, String::new(), Value::Null);
    sse_events(&mut r, |v| {
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
        if let Some(tx) = v["choices"][0]["text"].as_str().filter(|t| !t.is_empty()) {
            first.get_or_insert_with(|| t.elapsed().as_secs_f64() * 1e3);
            text.push_str(tx);
        }
    })
    .await?;
    Ok((first.unwrap_or(f64::NAN), text, usage, by))
}

/// Runs `agents` agents of `turns` turns through a fabric of 3 gateways at
/// one site, all holding the model, once per routing mode (a fresh fabric
/// each): `prefix-aware` and `no-prefix-term` send every turn to the first
/// gateway, whose router chooses; `round-robin` sends each turn to the
/// next gateway in turn, which serves it.
pub async fn prefix_routing(
    opts: &DemoOptions,
    agents: usize,
    turns: usize,
    context_tokens: usize,
    max_tokens: u32,
) -> Result<Vec<PrefixRun>> {
    let context = agent_context(context_tokens);
    // room for one replica per gateway (the floor of 3 lands one on each)
    let model = opts.model.clone();
    let rec = tokio::task::spawn_blocking(move || weft_cluster::models::model_record(&model, None))
        .await??;
    let one = rec.spec.shard_memory(
        rec.spec.layers,
        weft_placement::SolverConfig::default().kv_reserve_tokens,
    );
    let memory = one + one / 3;
    let mut out = Vec::new();
    for mode in ["prefix-aware", "no-prefix-term", "round-robin"] {
        let mut o = opts.clone();
        // what one worker thread decodes of a small model: the router's
        // wait estimates are then what the gateways give
        o.tokens_per_s = 60.0;
        if mode != "prefix-aware" {
            o.serve_extra.push_str("prefix_routing = false\n");
        }
        let specs: Vec<NodeSpec> = (1..=3)
            .map(|k| NodeSpec {
                name: format!("gw-{k}"),
                site: "edge-a",
                kind: "edge",
                region: 1,
                memory,
            })
            .collect();
        let f = Fabric::start_nodes(&o, &specs)?;
        let nodes: Vec<DemoNode> = f.nodes.iter().map(|(n, _)| n.clone()).collect();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()?;
        f.admin(
            &[
                "cluster",
                "model-add",
                "--source",
                &o.model,
                "--name",
                MODEL,
                "--min-replicas",
                "3",
            ],
            Duration::from_secs(60),
        )
        .await?;
        f.admin(
            &[
                "cluster",
                "replan",
                "--demand",
                &format!("edge-a:{MODEL}:1:200:32"),
            ],
            Duration::from_secs(30),
        )
        .await?;
        for n in &nodes {
            let t = Instant::now();
            while !http
                .get(format!("http://{}/readyz", n.api))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                if t.elapsed() > Duration::from_secs(240) {
                    bail!(
                        "{} never served the model:\n{}",
                        n.name,
                        f.log_tail(&n.name)
                    );
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        // load reports carry what each node holds before the agents start
        tokio::time::sleep(Duration::from_secs(3)).await;
        say(format!(
            "{mode}: 3 gateways serve the model; {agents} agents, {turns} turns"
        ));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for a in 0..agents {
            let (http, context) = (http.clone(), context.clone());
            let apis: Vec<SocketAddr> = nodes.iter().map(|n| n.api).collect();
            tasks.push(tokio::spawn(async move {
                let mut history = context;
                let mut prev_prompt = 0u64;
                let mut rows = Vec::new();
                for t in 0..turns {
                    history.push_str(&agent_tool_output(a, t));
                    let api = if mode == "round-robin" {
                        apis[(a + t) % apis.len()]
                    } else {
                        apis[0]
                    };
                    let (ttft, text, usage, by) =
                        streamed_turn(&http, api, &history, max_tokens).await?;
                    let prompt = usage["prompt_tokens"].as_u64().unwrap_or(0);
                    let cached = usage["prompt_tokens_details"]["cached_tokens"]
                        .as_u64()
                        .unwrap_or(0);
                    let hit = (t > 0).then_some(cached + 16 >= prev_prompt);
                    let tokens = usage["completion_tokens"].as_u64().unwrap_or(0);
                    rows.push((ttft, hit, tokens, by));
                    history.push_str(&text);
                    prev_prompt = prompt;
                }
                anyhow::Ok(rows)
            }));
        }
        let mut ttft = Vec::new();
        let (mut hits, mut later, mut tokens) = (0usize, 0usize, 0u64);
        let mut served_by = BTreeMap::new();
        for t in tasks {
            for (tt, hit, n, by) in t.await?? {
                ttft.push(tt);
                if let Some(h) = hit {
                    later += 1;
                    hits += usize::from(h);
                }
                tokens += n;
                *served_by.entry(by).or_insert(0) += 1;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        ttft.sort_by(f64::total_cmp);
        let run = PrefixRun {
            mode,
            hit_rate: hits as f64 / later.max(1) as f64,
            ttft_ms: (percentile(&ttft, 50.0), percentile(&ttft, 95.0)),
            tokens_per_s: tokens as f64 / secs,
            served_by,
        };
        say(format!(
            "{mode}: hit rate {:.2}, TTFT p50 {:.0} ms p95 {:.0} ms, {:.1} tokens/s",
            run.hit_rate, run.ttft_ms.0, run.ttft_ms.1, run.tokens_per_s
        ));
        out.push(run);
        drop(f);
    }
    Ok(out)
}
