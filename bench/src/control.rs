//! `weft-bench control`: the control plane on loopback. Three coordinator
//! members (the real QUIC transport, mutual TLS, fsync'd logs) in this
//! process; one client commits proposals one after another (latency), then
//! many clients at once (throughput); then the leader is stopped and the
//! time until a survivor leads is taken (failure detection and election).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use serde::Serialize;
use weft_cluster::credentials::ClusterCa;
use weft_cluster::member::{self, MemberSettings};
use weft_cluster::transport::Peer;
use weft_cluster::transport::{Caller, Reply, Request};
use weft_coordinator::Command;

/// `weft-bench control` arguments.
#[derive(Parser, Debug)]
pub struct ControlArgs {
    /// Sequential proposals for the latency figures.
    #[arg(long, default_value_t = 500)]
    proposals: usize,
    /// Concurrent clients for the throughput figure.
    #[arg(long, default_value_t = 128)]
    clients: usize,
    /// Seconds of the throughput run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Where the members keep their logs (a real disk: every write is fsync'd).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Serialize)]
struct ControlReport {
    members: usize,
    proposals: usize,
    commit_p50_ms: f64,
    commit_p99_ms: f64,
    commit_mean_ms: f64,
    clients: usize,
    commits_per_s: f64,
    failover_ms: f64,
}

fn pct(v: &[f64], p: f64) -> f64 {
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn free_udp() -> std::net::SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("bound")
}

/// Runs the benchmark and prints one JSON object.
pub fn run(a: ControlArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(a))
}

async fn run_async(a: ControlArgs) -> Result<()> {
    let base = match &a.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir_in(std::env::current_dir()?)?,
    };
    let ca = ClusterCa::init(&base.path().join("ca"), "bench")?;
    let peers: Vec<Peer> = (1..=3)
        .map(|i| Peer {
            id: i,
            name: format!("coord-{i}"),
            addr: free_udp().to_string(),
        })
        .collect();
    let mut handles = Vec::new();
    for p in &peers {
        let s = MemberSettings::new(
            p.id,
            p.addr.parse().expect("an IP address"),
            base.path().join(&p.name),
            peers.clone(),
        );
        handles.push(Some(
            member::start(
                s,
                ca.issue_identity(&p.name, weft_cluster::credentials::Role::Coordinator)?,
                None,
            )
            .await?,
        ));
    }
    let admin = Arc::new(Caller::new(
        &ca.issue_identity("admin", weft_cluster::credentials::Role::Admin)?,
    )?);
    let propose = |n: u64| Request::Propose {
        command: Command::PutMember(bench_member(n % 16, n)),
    };
    // warm up: a leader, connections
    for n in 0..10 {
        commit(&admin, &peers, &propose(n)).await?;
    }
    let mut lat = Vec::with_capacity(a.proposals);
    for n in 0..a.proposals as u64 {
        let t = Instant::now();
        commit(&admin, &peers, &propose(1_000 + n)).await?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mean = lat.iter().sum::<f64>() / lat.len() as f64;
    lat.sort_by(f64::total_cmp);

    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs_f64(a.seconds);
    let mut tasks = Vec::new();
    for c in 0..a.clients as u64 {
        let (admin, peers, done) = (admin.clone(), peers.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                let req = Request::Propose {
                    command: Command::PutMember(bench_member(c, n)),
                };
                if commit(&admin, &peers, &req).await.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
        }));
    }
    let t = Instant::now();
    for task in tasks {
        task.await?;
    }
    let rate = done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64();

    // stop the leader; time until a survivor leads
    let leader = match admin
        .ask(&peers, &Request::Status, Duration::from_secs(10))
        .await?
    {
        Reply::Status(s) => s.leader.unwrap_or(1),
        other => bail!("status: {other:?}"),
    };
    let old = handles[leader as usize - 1]
        .take()
        .expect("the leader runs");
    let term_before = leader_term(&handles);
    let t = Instant::now();
    old.stop().await?;
    let failover = loop {
        if handles.iter().flatten().any(|h| {
            let m = h.metrics.render();
            m.contains("weft_raft_is_leader 1\n") && term_of(&m) > term_before
        }) {
            break t.elapsed();
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("no new leader in 30 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    for h in handles.into_iter().flatten() {
        h.stop().await?;
    }
    let report = ControlReport {
        members: 3,
        proposals: a.proposals,
        commit_p50_ms: pct(&lat, 0.50),
        commit_p99_ms: pct(&lat, 0.99),
        commit_mean_ms: mean,
        clients: a.clients,
        commits_per_s: rate,
        failover_ms: failover.as_secs_f64() * 1000.0,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// A member record that one client keeps updating (a small, typical command).
fn bench_member(client: u64, n: u64) -> weft_coordinator::Member {
    weft_coordinator::Member {
        id: 1_000 + client,
        name: format!("bench-{client}"),
        site: "edge-a".into(),
        kind: weft_placement::SiteKind::Edge,
        region: 0,
        memory_bytes: 8 << 30,
        tokens_per_s: 1_000.0 + n as f64,
        slots: 8,
        accelerator: false,
        cost_per_token: 0.0,
        address: "127.0.0.1:7000".into(),
    }
}

fn term_of(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("weft_raft_term "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn leader_term(handles: &[Option<member::MemberHandle>]) -> u64 {
    handles
        .iter()
        .flatten()
        .map(|h| term_of(&h.metrics.render()))
        .max()
        .unwrap_or(0)
}

async fn commit(admin: &Caller, peers: &[Peer], req: &Request) -> Result<()> {
    match admin.ask(peers, req, Duration::from_secs(10)).await? {
        Reply::Committed { .. } => Ok(()),
        other => bail!("not committed: {other:?}"),
    }
}
