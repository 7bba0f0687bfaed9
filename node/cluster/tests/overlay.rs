//! The overlay on loopback: three credentialed nodes hear each other's load
//! reports (and measure round trips); a node from another cluster is heard
//! by nobody and its reports are counted as rejected; a node that stops
//! leaves every routing table within 2 s.

use std::time::{Duration, Instant};

use weft_node::cluster::credentials::{ClusterCa, Revoked};
use weft_node::cluster::overlay::{self, LoadReport, Overlay, OverlaySettings};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_hear_each_other_strangers_are_rejected_the_silent_leave_and_goodbyes_are_heard() {
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
            a.metrics.peers.load(std::sync::atomic::Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = a.table.read().unwrap().nodes["node-b"].report.clone();
    assert_eq!(r.site, "edge-a");
    assert_eq!(r.models, ["small[0..18)"]);
    wait_until("a round-trip sample", Duration::from_secs(5), || {
        a.table.read().unwrap().rtt_to("node-b").is_some()
    })
    .await;
    // nodes gossip what they measure, so a leader can estimate site links
    wait_until(
        "b's report carries its round trips",
        Duration::from_secs(5),
        || {
            a.table.read().unwrap().nodes["node-b"]
                .report
                .rtt_ms
                .get("node-a")
                .is_some_and(|ms| *ms > 0.0 && *ms < 1000.0)
        },
    )
    .await;

    // a node of another cluster connects and gossips, and is never listed
    let other = ClusterCa::init(&dir.path().join("b"), "b").unwrap();
    let stranger = node(&other, "node-x", vec![a_addr.clone()]).await;
    wait_until(
        "the stranger's reports rejected",
        Duration::from_secs(10),
        || {
            a.metrics
                .rejected
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        },
    )
    .await;
    assert!(!names(&a).contains(&"node-x".to_string()));
    assert!(!names(&b).contains(&"node-x".to_string()));

    // every node announced itself on the membership topic
    wait_until("joined events", Duration::from_secs(10), || {
        a.metrics.joined.load(std::sync::atomic::Ordering::Relaxed) >= 2
    })
    .await;

    // c goes silent (a crash: no goodbye): it leaves a's and b's tables within 2 s
    c.abort().await;
    let gone = wait_until("c leaves the tables", Duration::from_secs(5), || {
        !names(&a).contains(&"node-c".to_string()) && !names(&b).contains(&"node-c".to_string())
    })
    .await;
    assert!(gone < Duration::from_secs(2), "c left after {gone:?}");
    assert_eq!(
        a.metrics.leaving.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "a crash is not a goodbye"
    );
    stranger.stop().await;

    // b stops cleanly: its goodbye takes it out of a's table
    b.stop().await;
    wait_until("b's goodbye heard", Duration::from_secs(5), || {
        a.metrics.leaving.load(std::sync::atomic::Ordering::Relaxed) == 1
            && !names(&a).contains(&"node-b".to_string())
    })
    .await;
    a.stop().await;
}
