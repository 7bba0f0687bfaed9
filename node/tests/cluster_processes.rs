//! Three `weft node` coordinator processes on loopback: they form a cluster
//! from their configs; a stream of placement commits goes on while the
//! leader is killed with SIGKILL; a new leader is there within 3 s and every
//! acknowledged epoch survives; the killed member restarts from its disk and
//! catches up; a node without valid credentials is refused and counted.
//! A node with a `[serve]` section loads and serves what the placement
//! assigns it, reports its live load, and drops a model it loses.

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
            addr: free_udp(),
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
        let token = ca(c.dir.path()).issue_token(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            600,
        );
        let api = free_tcp();
        let cfg = c.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[node]\nname = \"{name}\"\ndata_dir = \"{}\"\nlisten = \"{}\"\nsite = \"edge-b\"\nmemory_bytes = {memory_bytes}\ntokens_per_s = 800.0\n\n[join]\ntoken = \"{token}\"\ncoordinators = [{{ id = 1, name = \"{}\", addr = \"{}\" }}]\n\n[overlay]\nlisten = \"/ip4/127.0.0.1/udp/0/quic-v1\"\nbootstrap = [\"{}\"]\nmdns = false\n\n[serve]\naddr = \"{api}\"\nsandbox = false\nthreads = 1\nkv_budget = 16777216\n",
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

    /// Waits until its API lists no model (it dropped what it held).
    async fn wait_holding_nothing(&self, within: Duration) {
        let http = reqwest::Client::new();
        let t = Instant::now();
        loop {
            let v: serde_json::Value = http
                .get(format!("http://{}/v1/models", self.api))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if v["data"].as_array().unwrap().is_empty() {
                return;
            }
            assert!(
                t.elapsed() < within,
                "{:?} still serves {v}:\n{}",
                self.log,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    weft(&[
        "cluster",
        "model-add",
        "--config",
        c.config(0).to_str().unwrap(),
        "--source",
        model.to_str().unwrap(),
        "--name",
        name,
    ]);
}

fn ca(dir: &Path) -> ClusterCa {
    ClusterCa::load(&dir.join("c1/ca")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_survive_a_killed_leader_and_refuse_strangers() {
    let mut c = setup();
    let admin = Arc::new(Caller::new(&ca(c.dir.path()).issue_identity("admin").unwrap()).unwrap());
    let peers = c.peers.clone();
    // the cluster forms from the configs: every coordinator registers itself
    let t = Instant::now();
    loop {
        let s = status(&admin, &peers).await;
        if s.state.members.len() == 3 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "members: {:?}",
            s.state.members.keys()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let model = ModelRecord {
        chunk_bytes: 0,
        chunk_sha256: Vec::new(),
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
        },
    };
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
    assert!(
        elected < Duration::from_secs(3),
        "a new leader after {elected:?}"
    );
    // commits go on under the new leader
    let n = acked.lock().unwrap().len();
    let t = Instant::now();
    while acked.lock().unwrap().len() < n + 3 {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "no commits after the failover"
        );
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
    for index in acked.lock().unwrap().iter() {
        assert!(
            history.contains(index),
            "acknowledged epoch at index {index} is gone: {history:?}"
        );
    }

    // the killed member restarts from its disk and catches up
    c.spawn(leader);
    let t = Instant::now();
    loop {
        // the leader may re-plan meanwhile (the killed member was down), so
        // compare with the epoch now, not the one before the restart
        let latest = status(&admin, &rest).await.state.epoch();
        if c.metric(leader, "weft_placement_epoch").await == Some(latest) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "restarted member stuck:\n{}",
            c.log(leader)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // strangers are refused and counted
    let other = tempfile::tempdir().unwrap();
    let stranger = Caller::new(
        &ClusterCa::init(other.path(), "x")
            .unwrap()
            .issue_identity("intruder")
            .unwrap(),
    )
    .unwrap();
    assert!(stranger
        .ask(&peers, &Request::Status, Duration::from_secs(3))
        .await
        .is_err());
    let t = Instant::now();
    loop {
        let mut rejected = 0;
        for i in 0..3 {
            rejected += c
                .metric(i, "weft_cluster_rejected_peers_total")
                .await
                .unwrap_or(0);
        }
        if rejected > 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the stranger was not counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // a node with a forged token cannot join: `weft node` exits with the reason
    let token = ca(c.dir.path()).issue_token(0, 1); // expired long ago
    let cfg = c.dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nname = \"gw-9\"\ndata_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nsite = \"edge-b\"\nmemory_bytes = 1000000000\ntokens_per_s = 100.0\n\n[join]\ntoken = \"{token}\"\ncoordinators = [{{ id = 1, name = \"{}\", addr = \"{}\" }}]\n",
            c.dir.path().join("gw").display(),
            rest[0].name,
            rest[0].addr
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
    // and `weft status` prints the table from a member's config
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["status", "--config"])
        .arg(c.config((leader + 1) % 3))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains("placement epoch") && table.contains("coord-1"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_routing_within_two_seconds_and_its_replicas_move() {
    let c = setup();
    let admin = Arc::new(Caller::new(&ca(c.dir.path()).issue_identity("admin").unwrap()).unwrap());
    let peers = c.peers.clone();
    // a gateway at its own site joins with a token and gossips
    let mut gw = Gateway::start(&c);
    // every coordinator hears all four nodes
    c.wait_metric_everywhere("weft_overlay_nodes", 4, Duration::from_secs(30))
        .await;
    // demand at the gateway's site puts a replica on it
    // a real (tiny) model file, so the gateway can load what it is assigned
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

    // kill it: it leaves every coordinator's routing table within 2 s...
    gw.child.kill().unwrap();
    gw.child.wait().unwrap();
    let left = c
        .wait_metric_everywhere("weft_overlay_nodes", 3, Duration::from_secs(10))
        .await;
    eprintln!("gw-1 left the routing tables {left:?} after the kill");
    assert!(left < Duration::from_secs(2), "gw-1 left after {left:?}");
    // ...and the leader moves its replica
    let t = Instant::now();
    loop {
        let s = status(&admin, &peers).await;
        if s.state.epoch() > before.state.epoch() && !on_gw(&s) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the placement still uses gw-1"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A gateway that joins with a token and serves: registered models are
/// placed on it, it starts their workers and answers the API for them,
/// gossips its live load (which `weft status` shows), and drains a model
/// the placement takes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_node_loads_what_it_is_assigned_and_drops_what_it_loses() {
    let c = setup();
    let gw = Gateway::start(&c);
    let api = gw.api;
    let gw_log = || gw.log();
    // serving nothing yet: not ready, and says so
    let http = reqwest::Client::new();
    let t = Instant::now();
    let ready = loop {
        if let Ok(r) = http.get(format!("http://{api}/readyz")).send().await {
            break r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no API:\n{}",
            gw_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.unwrap().contains("no model is held"));

    // register the model (its shape and sha256 read from the file) and
    // plan for demand at the gateway's site
    register_tiny(&c, "tiny");
    let c1 = c.config(0);
    let c1 = c1.to_str().unwrap();
    weft(&[
        "cluster",
        "replan",
        "--config",
        c1,
        "--demand",
        "edge-b:tiny:50:200:32",
    ]);

    // the gateway loads it and serves it
    let t = Instant::now();
    loop {
        let r = http
            .get(format!("http://{api}/readyz"))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "gw-1 never served the model:\n{}",
            gw_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = http
        .post(format!("http://{api}/v1/completions"))
        .json(&serde_json::json!({"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap() >= 1,
        "{v}"
    );
    assert_eq!(v["model"], "tiny");

    // its live load reaches `weft status`
    let t = Instant::now();
    loop {
        let out = Command::new(env!("CARGO_BIN_EXE_weft"))
            .args(["status", "--json", "--config", c1])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let models = &s["load"]["gw-1"]["report"]["models"];
        let free_kv = s["load"]["gw-1"]["report"]["free_kv_tokens"].as_u64();
        if models == &serde_json::json!(["tiny"]) && free_kv > Some(0) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "gw-1's load never showed the model: {}",
            s["load"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["status", "--config", c1])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with("gw-1"))
        .unwrap_or_default();
    assert!(
        row.contains("tiny[0..") && !row.contains("never"),
        "{table}"
    );

    // demand gone: the replica is dropped and the gateway stops serving it
    weft(&[
        "cluster",
        "replan",
        "--config",
        c1,
        "--demand",
        "edge-b:tiny:0",
    ]);
    gw.wait_holding_nothing(Duration::from_secs(10)).await;
    let r = http
        .post(format!("http://{api}/v1/completions"))
        .json(&serde_json::json!({"model": "tiny", "prompt": "hello", "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    drop(gw);
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
        &Caller::new(&ca(c.dir.path()).issue_identity("admin").unwrap()).unwrap(),
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

/// Edge autonomy: a gateway cut off from every coordinator keeps serving
/// what it holds and keeps its intent log; when the coordinators come back
/// (from their disks) it applies the epoch they committed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_node_cut_off_from_the_coordinators_keeps_serving_and_reconciles() {
    let mut c = setup();
    let gw = Gateway::start(&c);
    let api = gw.api;
    register_tiny(&c, "tiny");
    let c1 = c.config(0);
    let c1 = c1.to_str().unwrap().to_string();
    weft(&[
        "cluster",
        "replan",
        "--config",
        &c1,
        "--demand",
        "edge-b:tiny:50:200:32",
    ]);
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
    for _ in 0..5 {
        let r = complete().await.unwrap();
        assert_eq!(r.status(), 200, "cut off, the gateway stopped serving");
    }
    // its intent log kept every decision
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["audit", "verify"])
        .arg(c.dir.path().join("gw-1/intent"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    let n: u64 = said
        .split_whitespace()
        .nth(1)
        .and_then(|w| w.parse().ok())
        .unwrap();
    assert!(n >= 6, "{said}");

    // the coordinators come back from their disks; the operator drops the
    // demand; the gateway hears it and reconciles
    for i in 0..3 {
        c.spawn(i);
    }
    weft(&[
        "cluster",
        "replan",
        "--config",
        &c1,
        "--demand",
        "edge-b:tiny:0",
    ]);
    gw.wait_holding_nothing(Duration::from_secs(30)).await;
    assert!(gw.log().contains("coordinators reachable again"));
}

/// A request for a model the gateway does not hold goes over the data plane
/// to the peer that holds it: the same tokens as asking that peer, whole or
/// streamed; the hop limit stops loops; the decision is in the intent log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_forwarded_to_the_peer_that_holds_the_model() {
    let c = setup();
    let holder = Gateway::start_as(&c, "gw-1", 4 << 30);
    // too small to be given the model
    let front = Gateway::start_as(&c, "gw-2", 1);
    register_tiny(&c, "tiny");
    let c1 = c.config(0);
    weft(&[
        "cluster",
        "replan",
        "--config",
        c1.to_str().unwrap(),
        "--demand",
        "edge-b:tiny:50:200:32",
    ]);
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
    let (via, served_by) = loop {
        let Ok(r) = ask(front.api, body.clone()).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        if r.status() == 200 {
            let by = r
                .headers()
                .get("x-weft-served-by")
                .map(|v| v.to_str().unwrap().to_string());
            break (r.json::<serde_json::Value>().await.unwrap(), by);
        }
        assert_eq!(r.status(), 404, "{}", r.text().await.unwrap());
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never forwarded:\n{}",
            front.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(served_by.as_deref(), Some("gw-1"));
    assert_eq!(via["choices"][0]["text"], direct["choices"][0]["text"]);
    assert_eq!(via["usage"], direct["usage"]);
    // streamed through the front: the same text, to [DONE]
    let mut streamed = body.clone();
    streamed["stream"] = serde_json::json!(true);
    let sse = ask(front.api, streamed)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let text: String = sse
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
    assert_eq!(text, direct["choices"][0]["text"].as_str().unwrap());
    assert!(sse.trim_end().ends_with("data: [DONE]"));
    // a request that has been forwarded too often is refused, not looped
    let r = http
        .post(format!("http://{}/v1/completions", front.api))
        .header("x-weft-hops", "2")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 508);
    // revoking the front's certificate ends its open connection to the
    // holder: it can no longer forward (nor connect again)
    let front_id =
        weft_cluster::credentials::NodeIdentity::load(&c.dir.path().join("gw-2/identity")).unwrap();
    let admin = Caller::new(&ca(c.dir.path()).issue_identity("admin").unwrap()).unwrap();
    let r = admin
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
    let t = Instant::now();
    while ask(front.api, body.clone()).await.unwrap().status() == 200 {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "still forwarding 15 s after its revocation:\n{}",
            holder.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(holder.log().contains("closing its data-plane connection"));
    // the front's intent log holds the forwarding decisions, chained
    drop(front);
    let log_dir = c.dir.path().join("gw-2/intent");
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["audit", "verify"])
        .arg(&log_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all: String = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
        .collect();
    let records: Vec<serde_json::Value> = all
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["record"].clone())
        .collect();
    // each routing decision names every candidate with its terms
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
    assert!(records.iter().any(|r| r["decision"] == "refused"), "{all}");
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

/// kill -9 of the node serving streams forwarded from the front: every one
/// of 200 concurrent streams completes on the other replica with exactly
/// the text a single node gives (no lost, repeated or restarted token),
/// under its one stream id; the front's intent log records the resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_the_kill_of_their_serving_node() {
    let c = setup();
    let a = Gateway::start_as(&c, "gw-1", 4 << 30);
    let b = Gateway::start_as(&c, "gw-3", 4 << 30);
    let front = Gateway::start_as(&c, "gw-2", 1);
    register_tiny(&c, "tiny");
    // more demand than one node can serve: both get a replica
    weft(&[
        "cluster",
        "replan",
        "--config",
        c.config(0).to_str().unwrap(),
        "--demand",
        "edge-b:tiny:20000:200:64",
    ]);
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
    let t = Instant::now();
    for g in [&a, &b] {
        loop {
            let models: serde_json::Value =
                match http.get(format!("http://{}/v1/models", g.api)).send().await {
                    Ok(r) => r.json().await.unwrap(),
                    Err(_) => serde_json::json!({"data": []}), // not listening yet
                };
            if models["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["id"] == "tiny")
            {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "{:?} never held the model: {models}\n{}",
                g.log,
                g.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
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
    let mut on_victim = 0;
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let intent_log = || {
        std::fs::read_dir(c.dir.path().join("gw-2/intent"))
            .unwrap()
            .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
            .collect::<String>()
    };
    for (i, s) in results.into_iter().enumerate() {
        if !s.errors.is_empty() {
            let reroutes: Vec<&str> = intent_log()
                .lines()
                .filter(|l| l.contains("rerouted"))
                .take(3)
                .map(String::from)
                .collect::<Vec<_>>()
                .leak()
                .iter()
                .map(|s| s.as_str())
                .collect();
            panic!("stream {i}: {:?}\n{reroutes:#?}", s.errors);
        }
        assert!(s.done, "stream {i} did not end with [DONE]");
        assert_eq!(s.ids.len(), 1, "stream {i} changed its id: {:?}", s.ids);
        assert_eq!(
            s.text,
            expected[i % prompts.len()],
            "stream {i} (served by {})",
            s.served_by
        );
        if s.served_by == victim {
            on_victim += 1;
        }
    }
    assert!(on_victim >= 10, "only {on_victim} streams were on {victim}");
    // the front logged each resume, on the surviving replica
    drop(front);
    let all = intent_log();
    let resumed: Vec<serde_json::Value> = all
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["record"].clone())
        .filter(|r| r["decision"] == "resumed")
        .collect();
    assert!(!resumed.is_empty(), "no resume logged:\n{all}");
    for r in &resumed {
        assert_eq!(r["from"], victim.as_str(), "{r}");
        assert_ne!(r["to"], victim.as_str(), "{r}");
    }
    eprintln!(
        "{on_victim} streams on {victim}, {} resumed mid-stream; all done {:?} after the kill",
        resumed.len(),
        killed_at.elapsed()
    );
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

/// A node assigned a model it lacks fetches it from the peers that serve
/// it, in chunks checked against the cluster's record; a corrupt chunk from
/// one peer is detected and fetched again from the other. The model's
/// source is gone by then: the peers are the only way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_comes_from_peers_and_a_corrupt_chunk_is_fetched_again() {
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
    weft(&[
        "cluster",
        "replan",
        "--config",
        c.config(0).to_str().unwrap(),
        "--demand",
        "edge-b:tiny:20000:200:64",
    ]);
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
    let metric = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
            .trim()
            .parse()
            .unwrap()
    };
    let chunks = std::fs::metadata(model.with_extension("gone"))
        .unwrap()
        .len()
        .div_ceil(chunk);
    assert!(chunks >= 3, "{chunks} chunks");
    assert_eq!(
        metric("weft_model_chunks_fetched_total"),
        chunks,
        "{}",
        late.log()
    );
    assert!(
        metric("weft_model_chunks_corrupt_total") >= 1,
        "{}",
        late.log()
    );
    assert!(late.log().contains("failed its sha256 check"));
    // and it serves what the others serve (a forwarded request is served
    // where it lands)
    let ask = |api: SocketAddr| {
        let http = http.clone();
        async move {
            let v: serde_json::Value = http
                .post(format!("http://{api}/v1/completions"))
                .header("x-weft-hops", "1")
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
    assert_eq!(ask(late.api).await, ask(a.api).await);
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

/// `n` nodes at one site, none with room for the whole model and all of
/// them together with just enough: the placement splits the model's layers
/// over all `n`, the node with the first layers serves it, and the greedy
/// text through any of them (forwarded to the head, streamed or not, many
/// at once) is what one node gives. Then the last node is killed: a stream
/// running on the chain ends with an error event, never a hang.
async fn a_chain_of(n: usize) {
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
    let c1 = c.config(0);
    let c1 = c1.to_str().unwrap();
    weft(&[
        "cluster",
        "replan",
        "--config",
        c1,
        "--demand",
        "edge-b:tiny:1:200:32",
    ]);
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

    // the chain forms: one head serving the model, the others each
    // running a range, together every layer in order
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
                if m == "tiny" {
                    head = Some(i - 1);
                } else if let Some(r) = m.strip_prefix("tiny[").and_then(|r| r.strip_suffix(')')) {
                    let (a, b) = r.split_once("..").unwrap();
                    ranges.push((a.parse::<u32>().unwrap(), b.parse::<u32>().unwrap(), i - 1));
                }
            }
        }
        if let Some(h) = head.filter(|_| ranges.len() == n - 1) {
            break (h, ranges);
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
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
    let last = ranges.last().unwrap().2;
    assert_eq!(ranges.last().unwrap().1, layers, "{ranges:?}");

    let http = reqwest::Client::new();
    let body = |p: &str, stream: bool| serde_json::json!({"model": "tiny", "prompt": p, "max_tokens": max_tokens, "temperature": 0, "stream": stream});
    let complete = |api: SocketAddr, p: &str| {
        let (http, b) = (http.clone(), body(p, false));
        async move {
            let r = http
                .post(format!("http://{api}/v1/completions"))
                .json(&b)
                .send()
                .await
                .unwrap();
            let status = r.status();
            let v: serde_json::Value = r.json().await.unwrap();
            assert_eq!(status, 200, "{v}");
            v["choices"][0]["text"].as_str().unwrap().to_string()
        }
    };
    // every node answers with one node's text: the head itself, the others
    // by forwarding to it
    for (i, g) in nodes.iter().enumerate() {
        let got = complete(g.api, prompts[i % prompts.len()]).await;
        assert_eq!(
            got,
            expected[i % prompts.len()],
            "through gw-{} (the head is gw-{}):\n{}",
            i + 1,
            head + 1,
            nodes[head].log()
        );
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
    for (i, t) in tasks.into_iter().enumerate() {
        let s = t.await.unwrap();
        assert!(s.done && s.errors.is_empty(), "stream {i}: {:?}", s.errors);
        assert_eq!(s.text, expected[i % prompts.len()], "stream {i}");
    }

    // the last range's node dies mid-stream: the stream ends, with an error
    let long = serde_json::json!({"model": "tiny", "prompt": prompts[0], "max_tokens": 4000, "temperature": 0, "stream": true});
    let s = stream_and_kill(&http, nodes[head].api, &long, &mut nodes[last]).await;
    assert!(
        !s.errors.is_empty(),
        "no error event: {} chars of text",
        s.text.len()
    );
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_node_chain_gives_one_nodes_tokens() {
    a_chain_of(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_chain_gives_one_nodes_tokens() {
    a_chain_of(3).await;
}

/// Two chains of two nodes each: a stream on one of them, whose last node
/// is killed mid-stream, continues on the other chain with exactly the text
/// one node gives, under one stream id and with no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_a_chain_that_breaks_continues_on_another_chain() {
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
    weft(&[
        "cluster",
        "replan",
        "--config",
        c.config(0).to_str().unwrap(),
        "--demand",
        "edge-b:tiny:20000:200:64",
    ]);
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
    let body = serde_json::json!({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true});
    // both chains serve and agree with one node
    for &(h, _) in &chains {
        let r: serde_json::Value = http
            .post(format!("http://{}/v1/completions", nodes[h].api))
            .header("x-weft-hops", "1") // served there, not routed on
            .json(&serde_json::json!({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["choices"][0]["text"], expected.as_str(), "gw-{}", h + 1);
    }
    let s = stream_and_kill(&http, nodes[head].api, &body, &mut nodes[tail]).await;
    assert!(
        s.done && s.errors.is_empty(),
        "{:?}\n{}",
        s.errors,
        nodes[head].log()
    );
    assert_eq!(s.ids.len(), 1, "{:?}", s.ids);
    assert_eq!(s.text, expected);
    let log = std::fs::read_to_string(
        std::fs::read_dir(c.dir.path().join(format!("gw-{}/intent", head + 1)))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
    )
    .unwrap();
    assert!(
        log.contains("\"resumed\"") && log.contains("lost the request midway"),
        "{log}"
    );
    drop(nodes);
}
