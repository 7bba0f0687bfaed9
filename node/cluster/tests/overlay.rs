//! The overlay on loopback: three credentialed nodes hear each other's load
//! reports (and measure round trips); a node from another cluster is heard
//! by nobody and its reports are counted as rejected; a node that stops
//! leaves every routing table within 2 s; one that stops cleanly says
//! goodbye. Each test starts its own nodes. Replayed and stale messages
//! are fed to an [`Inbox`] directly, as a relay could send them.

use std::time::{Duration, Instant};

use std::sync::RwLock;
use weft_cluster::credentials::{ClusterCa, Revoked};

use weft_cluster::credentials::NodeIdentity;
use weft_cluster::overlay::{
    self, Dropped, Inbox, LoadReport, MemberEvent, MemberEventKind, Overlay, OverlayMetrics,
    OverlaySettings, RoutingTable, Topic,
};

async fn node(ca: &ClusterCa, name: &str, bootstrap: Vec<libp2p::Multiaddr>) -> Overlay {
    let id = ca
        .issue_identity(name, weft_cluster::credentials::Role::Node)
        .unwrap();
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
                a.metrics.peers.get()
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
        || m.a.metrics.rejected.get() > 0,
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
        m.a.metrics.joined.get() >= 2
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
    assert_eq!(m.a.metrics.leaving.get(), 0, "a crash is not a goodbye");
    m.b.stop().await;
    m.a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_cleanly_says_goodbye_and_leaves_the_table() {
    let m = Mesh::start().await;
    m.b.stop().await;
    wait_until("b's goodbye heard", Duration::from_secs(5), || {
        m.a.metrics.leaving.get() == 1 && !names(&m.a).contains(&"node-b".to_string())
    })
    .await;
    m.c.stop().await;
    m.a.stop().await;
}

/// An inbox at node-a, and node-b's identity to sign with.
struct Heard {
    _dir: tempfile::TempDir,
    b: NodeIdentity,
    inbox: Inbox,
    table: RwLock<RoutingTable>,
    metrics: OverlayMetrics,
}

const NOW_MS: u64 = 1_900_000_000_000;

impl Heard {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::init(dir.path(), "a").unwrap();
        let role = weft_cluster::credentials::Role::Node;
        let a = ca.issue_identity("node-a", role).unwrap();
        Self {
            b: ca.issue_identity("node-b", role).unwrap(),
            _dir: dir,
            inbox: Inbox::new(a, Revoked::default()),
            table: RwLock::default(),
            metrics: OverlayMetrics::default(),
        }
    }

    /// node-b's report made at `at`, saying `tokens_per_s`, signed.
    fn report(&self, at: u64, tokens_per_s: f64) -> Vec<u8> {
        overlay::sign(
            &self.b,
            &LoadReport {
                node: "node-b".into(),
                at_unix_ms: at,
                tokens_per_s,
                ..LoadReport::default()
            },
        )
        .unwrap()
    }

    fn event(&self, at: u64, kind: MemberEventKind) -> Vec<u8> {
        overlay::sign(
            &self.b,
            &MemberEvent {
                node: "node-b".into(),
                kind,
                at_unix_ms: at,
            },
        )
        .unwrap()
    }

    fn receive(&mut self, topic: Topic, data: &[u8]) -> Result<(), Dropped> {
        let source = Some(libp2p::PeerId::random());
        self.inbox
            .receive(topic, data, source, NOW_MS, &self.table, &self.metrics)
    }

    fn tokens_per_s(&self) -> Option<f64> {
        let t = self.table.read().unwrap();
        t.nodes.get("node-b").map(|e| e.report.tokens_per_s)
    }
}

#[test]
fn a_replayed_report_changes_nothing() {
    let mut h = Heard::new();
    let old = h.report(NOW_MS - 1000, 100.0);
    h.receive(Topic::Load, &old).unwrap();
    h.receive(Topic::Load, &h.report(NOW_MS - 500, 200.0))
        .unwrap();
    assert_eq!(h.receive(Topic::Load, &old), Err(Dropped::Replayed));
    assert_eq!(h.tokens_per_s(), Some(200.0));
    assert_eq!(h.metrics.replayed.get(), 1);
}

#[test]
fn a_report_from_outside_the_replay_window_is_dropped_as_stale() {
    let mut h = Heard::new();
    let window = overlay::REPLAY_WINDOW.as_millis() as u64;
    for at in [NOW_MS - window - 1, NOW_MS + window + 1] {
        assert_eq!(
            h.receive(Topic::Load, &h.report(at, 1.0)),
            Err(Dropped::Stale)
        );
    }
    assert_eq!(h.tokens_per_s(), None);
    assert_eq!(h.metrics.stale.get(), 2);
}

#[test]
fn a_replayed_goodbye_does_not_drop_a_node_that_came_back() {
    let mut h = Heard::new();
    let goodbye = h.event(NOW_MS - 3000, MemberEventKind::Leaving);
    h.receive(Topic::Members, &goodbye).unwrap();
    h.receive(
        Topic::Members,
        &h.event(NOW_MS - 2000, MemberEventKind::Joined),
    )
    .unwrap();
    h.receive(Topic::Load, &h.report(NOW_MS - 1000, 50.0))
        .unwrap();
    assert_eq!(h.receive(Topic::Members, &goodbye), Err(Dropped::Replayed));
    assert_eq!(
        h.tokens_per_s(),
        Some(50.0),
        "the replayed goodbye dropped node-b"
    );
}

#[test]
fn a_report_signed_by_another_node_is_rejected() {
    let mut h = Heard::new();
    let forged = overlay::sign(
        &h.b,
        &LoadReport {
            node: "node-c".into(),
            at_unix_ms: NOW_MS,
            ..LoadReport::default()
        },
    )
    .unwrap();
    assert!(matches!(
        h.receive(Topic::Load, &forged),
        Err(Dropped::Rejected(_))
    ));
    assert_eq!(h.metrics.rejected.get(), 1);
}
