//! `weft-bench overlay`: gossip convergence and failure detection with many
//! overlay nodes in this process (libp2p QUIC on loopback, signed reports):
//! the time from start until every node's routing table lists every node,
//! and the time from stopping one node until no table lists it.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use serde::Serialize;
use weft_node::cluster::credentials::{ClusterCa, Revoked};
use weft_node::cluster::overlay::{self, LoadReport, Overlay, OverlaySettings};

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
    failure_detection_ms: f64,
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
            ca.issue_identity(&format!("node-{i}"))?,
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
    let victim = nodes.pop().expect("nodes");
    let t = Instant::now();
    victim.stop().await;
    let detection = loop {
        if nodes.iter().all(|o| listed(o) == a.nodes - 1) {
            break t.elapsed();
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the stopped node stayed listed");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    for o in nodes {
        o.stop().await;
    }
    println!(
        "{}",
        serde_json::to_string(&OverlayReport {
            nodes: a.nodes,
            convergence_ms: convergence.as_secs_f64() * 1000.0,
            failure_detection_ms: detection.as_secs_f64() * 1000.0,
        })?
    );
    Ok(())
}
