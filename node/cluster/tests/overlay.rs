//! The overlay on loopback: three credentialed nodes hear each other's load
//! reports (and measure round trips); a node from another cluster is heard
//! by nobody and its reports are counted as rejected; a node that stops
//! leaves every routing table within 2 s; one that stops cleanly says
//! goodbye. Each test starts its own nodes.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use weft_cluster::credentials::{ClusterCa, Revoked};
use weft_cluster::overlay::{self, LoadReport, Overlay, OverlaySettings};

async fn node(ca: &ClusterCa, name: &str, bootstrap: Vec<libp2p::Multiaddr>) -> Overlay {
    let id = ca.issue_identity(name).unwrap();
    overlay::start(
        OverlaySettings {
            listen: "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap(),
            bootstrap,
            mdns: false,
        },
        id,
        Revoked::default(),
        LoadReport {
            site: "edge-a".into(),
            tokens_per_s: 100.0,
            models: vec!["small[0..18)".into()],
            ..LoadReport::default()
        },
    )
    .await
    .unwrap()
}

async fn addr(o: &Overlay) -> libp2p::Multiaddr {
    let mut rx = o.listen_addrs.clone();
    let t = Instant::now();
    loop {
        if let Some(a) = rx.borrow().first() {
            return a.clone().with(libp2p::multiaddr::Protocol::P2p(o.peer_id));
        }
        assert!(t.elapsed() < Duration::from_secs(5), "no listen address");
        let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
    }
}

fn names(o: &Overlay) -> Vec<String> {
    o.table.read().unwrap().nodes.keys().cloned().collect()
}

async fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what} not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.elapsed()
}

/// Three credentialed nodes that hear each other.
struct Mesh {
    dir: tempfile::TempDir,
    a: Overlay,
    a_addr: libp2p::Multiaddr,
    b: Overlay,
    c: Overlay,
}

impl Mesh {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::init(&dir.path().join("a"), "a").unwrap();
        let a = node(&ca, "node-a", vec![]).await;
        let a_addr = addr(&a).await;
        let b = node(&ca, "node-b", vec![a_addr.clone()]).await;
        let c = node(&ca, "node-c", vec![a_addr.clone()]).await;
        let all = |o: &Overlay| names(o) == ["node-a", "node-b", "node-c"];
        let t = Instant::now();
        while !(all(&a) && all(&b) && all(&c)) {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "tables: a {:?} b {:?} c {:?}; peers a {}",
                names(&a),
                names(&b),
                names(&c),
                a.metrics.peers.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            dir,
            a,
            a_addr,
            b,
            c,
        }
    }

    async fn stop(self) {
        self.c.stop().await;
        self.b.stop().await;
        self.a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_hear_each_others_load_reports() {
    let m = Mesh::start().await;
    let r = m.a.table.read().unwrap().nodes["node-b"].report.clone();
    assert_eq!(r.site, "edge-a");
    assert_eq!(r.models, ["small[0..18)"]);
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_measures_its_round_trip_to_another() {
    let m = Mesh::start().await;
    wait_until("a round-trip sample", Duration::from_secs(5), || {
        m.a.table.read().unwrap().rtt_to("node-b").is_some()
    })
    .await;
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_carry_the_round_trips_their_sender_measured() {
    // nodes gossip what they measure, so a leader can estimate site links
    let m = Mesh::start().await;
    wait_until(
        "b's report carries its round trips",
        Duration::from_secs(5),
        || {
            m.a.table.read().unwrap().nodes["node-b"]
                .report
                .rtt_ms
                .get("node-a")
                .is_some_and(|ms| *ms > 0.0 && *ms < 1000.0)
        },
    )
    .await;
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_cluster_is_rejected_and_never_listed() {
    let m = Mesh::start().await;
    let other = ClusterCa::init(&m.dir.path().join("b"), "b").unwrap();
    let stranger = node(&other, "node-x", vec![m.a_addr.clone()]).await;
    wait_until(
        "the stranger's reports rejected",
        Duration::from_secs(10),
        || m.a.metrics.rejected.load(Ordering::Relaxed) > 0,
    )
    .await;
    assert!(!names(&m.a).contains(&"node-x".to_string()));
    assert!(!names(&m.b).contains(&"node-x".to_string()));
    stranger.stop().await;
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_announces_itself_on_the_membership_topic() {
    let m = Mesh::start().await;
    wait_until("joined events", Duration::from_secs(10), || {
        m.a.metrics.joined.load(Ordering::Relaxed) >= 2
    })
    .await;
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gone_silent_leaves_every_table_within_2_s() {
    // a crash: no goodbye
    let m = Mesh::start().await;
    m.c.abort().await;
    let gone = wait_until("c leaves the tables", Duration::from_secs(5), || {
        !names(&m.a).contains(&"node-c".to_string()) && !names(&m.b).contains(&"node-c".to_string())
    })
    .await;
    assert!(gone < Duration::from_secs(2), "c left after {gone:?}");
    assert_eq!(
        m.a.metrics.leaving.load(Ordering::Relaxed),
        0,
        "a crash is not a goodbye"
    );
    m.b.stop().await;
    m.a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_cleanly_says_goodbye_and_leaves_the_table() {
    let m = Mesh::start().await;
    m.b.stop().await;
    wait_until("b's goodbye heard", Duration::from_secs(5), || {
        m.a.metrics.leaving.load(Ordering::Relaxed) == 1
            && !names(&m.a).contains(&"node-b".to_string())
    })
    .await;
    m.c.stop().await;
    m.a.stop().await;
}
