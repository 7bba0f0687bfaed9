//! A peer that is alive but stuck: it completes the handshake, takes
//! every stream, and never answers. Every kind of data-plane wait on it
//! ends in a clear error within its bound; and the serving side drops a
//! peer that opens a stream and never sends its request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_api::{LocalLoad, LocalNode, Remote, RouteAsk, Routing};
use weft_cluster::credentials::{ClusterCa, NodeIdentity, Revoked, Role};
use weft_cluster::overlay::{Entry, LoadReport, RoutingTable};
use weft_cluster::transport;
use weft_coordinator::ModelRecord;
use weft_fabric::forwarder::Timeouts;
use weft_fabric::hop::Hop;
use weft_fabric::Forwarder;
use weft_placement::{Criticality, Intent, ModelSpec};

const TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_millis(1000),
    reply_head: Duration::from_millis(400),
    whole: Duration::from_millis(600),
    idle: Duration::from_millis(400),
};
/// What a bound may be overrun by (scheduling on a loaded machine).
const SLACK: Duration = Duration::from_millis(1500);

struct Cluster {
    _dir: tempfile::TempDir,
    ca: ClusterCa,
}

fn cluster() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::init(dir.path(), "t").unwrap();
    Cluster { _dir: dir, ca }
}

/// A peer that takes connections and streams and says nothing.
fn stuck_peer(id: &NodeIdentity) -> SocketAddr {
    let ep = transport::endpoint(
        id,
        &Revoked::default(),
        "127.0.0.1:0".parse().unwrap(),
        false,
    )
    .unwrap();
    let addr = ep.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(i) = ep.accept().await {
            let Ok(conn) = i.await else { continue };
            held.push(conn.clone());
            tokio::spawn(async move {
                let mut streams = Vec::new();
                while let Ok(s) = conn.accept_bi().await {
                    streams.push(s);
                }
            });
        }
    });
    addr
}

/// Node `a`'s forwarder, whose table has the stuck peer `b` holding `m`.
fn forwarder(c: &Cluster, stuck: SocketAddr) -> Arc<Forwarder> {
    let mut table = RoutingTable::default();
    for (name, models, addr) in [
        ("a", vec![], "127.0.0.1:9".to_string()),
        ("b", vec!["m".to_string()], stuck.to_string()),
    ] {
        table.nodes.insert(
            name.into(),
            Entry {
                report: LoadReport {
                    node: name.into(),
                    site: "edge-a".into(),
                    data_address: addr,
                    models,
                    slots: 4,
                    tokens_per_s: 100.0,
                    ..LoadReport::default()
                },
                seen: Instant::now(),
                peer: libp2p::PeerId::random(),
            },
        );
    }
    let id = c.ca.issue_identity("a", Role::Node).unwrap();
    Arc::new(
        Forwarder::new(&id, Arc::new(RwLock::new(table)))
            .unwrap()
            .with_timeouts(TIMEOUTS),
    )
}

struct Here;

impl LocalNode for Here {
    fn load(&self, _model: &str) -> Option<LocalLoad> {
        None
    }
    fn record(&self, _record: Value) {}
    fn routed(&self, _target: &'static str, _criticality: &str, _utility: Option<f64>) {}
}

fn ask(stream: bool) -> RouteAsk {
    RouteAsk {
        uri: "/v1/completions",
        headers: Default::default(),
        body: axum::body::Bytes::from_static(b"{\"model\":\"m\",\"prompt\":\"x\"}"),
        model: "m".into(),
        stream,
        hops: 0,
        tenant: "t".into(),
        intent: Intent {
            criticality: Criticality::Standard,
            deadline_ms: None,
            max_cost: None,
        },
        output_tokens: 8,
        request_id: "req-1".into(),
        max_queue: 16,
        trace: weft_api::trace::Trace::root(),
        constrained: None,
    }
}

/// Routes `ask` to the stuck peer: how long until it failed, and why.
async fn routed(stream: bool) -> (Duration, String) {
    let c = cluster();
    let stuck = stuck_peer(&c.ca.issue_identity("b", Role::Node).unwrap());
    let f = forwarder(&c, stuck);
    let t = Instant::now();
    match f.route(ask(stream), Arc::new(Here)).await {
        Routing::Failed(why) => (t.elapsed(), why),
        _ => panic!("a stuck peer answered"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_request_to_a_stuck_peer_fails_within_its_bound() {
    let (took, why) = routed(false).await;
    assert!(took < TIMEOUTS.whole + SLACK, "after {took:?}");
    assert!(why.contains("did not answer within"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_to_a_stuck_peer_fails_within_its_bound() {
    let (took, why) = routed(true).await;
    assert!(took < TIMEOUTS.reply_head + SLACK, "after {took:?}");
    assert!(why.contains("did not answer within"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_fetch_from_a_stuck_peer_fails_within_its_bound() {
    let c = cluster();
    let stuck = stuck_peer(&c.ca.issue_identity("b", Role::Node).unwrap());
    let f = forwarder(&c, stuck);
    let rec = ModelRecord {
        chunk_bytes: 1 << 20,
        chunk_sha256: vec!["00".repeat(32)],
        sites: Vec::new(),
        source: "default".into(),
        sha256: "00".repeat(32),
        spec: ModelSpec {
            name: "m".into(),
            layers: 1,
            bytes_per_layer: 1,
            shared_bytes: 0,
            compute_per_token: 1.0,
            kv_bytes_per_token: 0,
            hidden_bytes_per_token: 0,
            min_replicas: 0,
            prefer: None,
            sites: Vec::new(),
        },
    };
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let r = f.fetch_model("m", &rec, &dir.path().join("m.gguf")).await;
    assert!(r.is_err(), "a stuck peer gave a model");
    assert!(
        t.elapsed() < TIMEOUTS.reply_head + SLACK,
        "after {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_a_chain_to_a_stuck_peer_fails_within_its_bound() {
    let c = cluster();
    let stuck = stuck_peer(&c.ca.issue_identity("b", Role::Node).unwrap());
    let f = forwarder(&c, stuck);
    let route = [Hop {
        node: "b".into(),
        model: "m".into(),
        layers: 2..4,
    }];
    let t = Instant::now();
    let e = f
        .open_chain(&route)
        .await
        .err()
        .expect("a stuck peer took a chain");
    assert!(
        t.elapsed() < TIMEOUTS.reply_head + SLACK,
        "after {:?}",
        t.elapsed()
    );
    assert!(e.to_string().contains("did not answer within"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_plane_drops_a_peer_that_sends_no_request() {
    let c = cluster();
    let id = c.ca.issue_identity("a", Role::Node).unwrap();
    let ep = transport::endpoint(
        &id,
        &Revoked::default(),
        "127.0.0.1:0".parse().unwrap(),
        false,
    )
    .unwrap();
    let addr = ep.local_addr().unwrap();
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let app = weft_api::AppState::empty(weft_api::ApiConfig {
        api_keys: Default::default(),
        tenants: BTreeMap::new(),
        max_context: 64,
        max_body_bytes: 1 << 20,
        max_tokens_limit: 16,
        default_max_tokens: 8,
        max_queue: 4,
        max_connections: 4,
        read_timeout_s: 1,
        grace_s: 1,
        shared_prefixes: Vec::new(),
        node_name: "local".into(),
    });
    tokio::spawn(weft_fabric::serve(
        ep,
        weft_fabric::ServedHere {
            app,
            shards: Default::default(),
            forwarder: None,
        },
        std::env::temp_dir(),
        Revoked::default(),
        stop,
    ));
    // a peer with credentials opens a stream and sends one byte of its
    // request's head, then nothing (a stream with no bytes is never seen)
    let peer = c.ca.issue_identity("p", Role::Node).unwrap();
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(transport::client_config(&peer, &Revoked::default()).unwrap());
    let conn = client
        .connect(addr, &weft_cluster::credentials::dns_name("a"))
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0]).await.unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 16];
    // the server gives up on the stream: it ends, with nothing sent
    let end = tokio::time::timeout(Duration::from_secs(30), recv.read(&mut buf)).await;
    assert!(end.is_ok(), "the server still waits for the request");
    assert!(
        t.elapsed() < Duration::from_secs(10) + SLACK,
        "after {:?}",
        t.elapsed()
    );
}
