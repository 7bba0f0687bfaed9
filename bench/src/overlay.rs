//! `weft-bench overlay`: gossip convergence and failure detection with many
//! overlay nodes in this process (libp2p QUIC on loopback, signed reports):
//! the time from start until every node's routing table lists every node;
//! the time from crashing one node (no goodbye) until each table drops it,
//! the median table and the last; and the time from one node's clean stop
//! (its goodbye on the membership topic) until no table lists it.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use serde::Serialize;
use weft_cluster::credentials::{ClusterCa, Revoked};
use weft_cluster::overlay::{self, LoadReport, Overlay, OverlaySettings};

/// `weft-bench overlay` arguments.
#[derive(Parser, Debug)]
pub struct OverlayArgs {
    /// Overlay nodes.
    #[arg(long, default_value_t = 24)]
    nodes: usize,
}

#[derive(Serialize)]
struct OverlayReport {
    nodes: usize,
    convergence_ms: f64,
    /// Crash until the median table dropped it.
    failure_detection_p50_ms: f64,
    /// Crash until the last table dropped it.
    failure_detection_ms: f64,
    /// Clean stop until the last table dropped it.
    goodbye_ms: f64,
}

/// Waits until no table in `nodes` lists `name`; returns when each table
/// first did not, sorted.
async fn dropped(nodes: &[Overlay], name: &str, since: Instant) -> Result<Vec<Duration>> {
    let mut when: Vec<Option<Duration>> = vec![None; nodes.len()];
    loop {
        for (i, o) in nodes.iter().enumerate() {
            if when[i].is_none()
                && !o
                    .table
                    .read()
                    .expect("routing table")
                    .nodes
                    .contains_key(name)
            {
                when[i] = Some(since.elapsed());
            }
        }
        if when.iter().all(Option::is_some) {
            let mut v: Vec<Duration> = when.into_iter().flatten().collect();
            v.sort();
            return Ok(v);
        }
        if since.elapsed() > Duration::from_secs(30) {
            bail!("{name} stayed listed");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs the benchmark and prints one JSON object.
pub fn run(a: OverlayArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(a))
}

fn listed(o: &Overlay) -> usize {
    o.table.read().expect("routing table").nodes.len()
}

async fn run_async(a: OverlayArgs) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = ClusterCa::init(dir.path(), "bench")?;
    let start = Instant::now();
    let mut nodes: Vec<Overlay> = Vec::new();
    let mut seed: Option<libp2p::Multiaddr> = None;
    for i in 0..a.nodes {
        let o = overlay::start(
            OverlaySettings {
                listen: "/ip4/127.0.0.1/udp/0/quic-v1".parse()?,
                bootstrap: seed.iter().cloned().collect(),
                mdns: false,
            },
            ca.issue_identity(&format!("node-{i}"), weft_cluster::credentials::Role::Node)?,
            Revoked::default(),
            LoadReport::default(),
        )
        .await?;
        if seed.is_none() {
            let mut rx = o.listen_addrs.clone();
            while rx.borrow().is_empty() {
                rx.changed().await?;
            }
            seed = rx.borrow().first().cloned();
        }
        nodes.push(o);
    }
    let convergence = loop {
        if nodes.iter().all(|o| listed(o) == a.nodes) {
            break start.elapsed();
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("no convergence in 120 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // a crash: no goodbye, the others notice its silence
    let victim = nodes.pop().expect("nodes");
    let t = Instant::now();
    victim.abort().await;
    let crash = dropped(&nodes, &format!("node-{}", a.nodes - 1), t).await?;
    // a clean stop: its goodbye drops it at once
    let leaver = nodes.pop().expect("nodes");
    let t = Instant::now();
    leaver.stop().await;
    let goodbye = dropped(&nodes, &format!("node-{}", a.nodes - 2), t).await?;
    for o in nodes {
        o.stop().await;
    }
    println!(
        "{}",
        serde_json::to_string(&OverlayReport {
            nodes: a.nodes,
            convergence_ms: convergence.as_secs_f64() * 1000.0,
            failure_detection_p50_ms: crash[crash.len() / 2].as_secs_f64() * 1000.0,
            failure_detection_ms: crash[crash.len() - 1].as_secs_f64() * 1000.0,
            goodbye_ms: goodbye[goodbye.len() - 1].as_secs_f64() * 1000.0,
        })?
    );
    Ok(())
}
