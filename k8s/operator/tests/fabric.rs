//! The operator's admin path against a real coordinator (one raft member
//! on this machine), reached by a DNS name as a StatefulSet pod is: the
//! admin identity the operator issues itself registers and removes models
//! and reads the state; a node's identity may not command the cluster.

use std::sync::Arc;
use std::time::Duration;

use weft_cluster::credentials::{ClusterCa, Role};
use weft_cluster::member::{self, MemberSettings};
use weft_cluster::transport::Peer;
use weft_coordinator::ModelRecord;
use weft_operator::fabric::{ClusterAccess, Fabric, Quic};

fn record(name: &str) -> ModelRecord {
    ModelRecord {
        source: "default".into(),
        sha256: "c".repeat(64),
        spec: weft_placement::ModelSpec {
            name: name.into(),
            layers: 4,
            bytes_per_layer: 1 << 20,
            shared_bytes: 1 << 20,
            compute_per_token: 1.0,
            kv_bytes_per_token: 256,
            hidden_bytes_per_token: 512,
            min_replicas: 0,
            prefer: None,
            sites: Vec::new(),
        },
        chunk_bytes: 0,
        chunk_sha256: Vec::new(),
        sites: Vec::new(),
    }
}

/// One coordinator `coord-0` and the CA it trusts.
async fn coordinator(dir: &std::path::Path) -> (member::MemberHandle, ClusterCa) {
    let (cert, key) = ClusterCa::generate("test").unwrap();
    let ca = ClusterCa::from_pem(cert.clone(), &key).unwrap();
    let id = ca.issue_identity("coord-0", Role::Coordinator).unwrap();
    let me = Peer {
        id: 1,
        name: "coord-0".into(),
        addr: "127.0.0.1:0".into(),
    };
    let mut s = MemberSettings::new(
        1,
        "127.0.0.1:0".parse().unwrap(),
        dir.to_path_buf(),
        vec![me],
    );
    s.tick = Duration::from_millis(20);
    let h = member::start(s, id, Some(ClusterCa::from_pem(cert, &key).unwrap()))
        .await
        .unwrap();
    (h, ca)
}

fn access(h: &member::MemberHandle, ca: &ClusterCa, who: &str, role: Role) -> ClusterAccess {
    ClusterAccess {
        peers: vec![Peer {
            id: 1,
            name: "coord-0".into(),
            addr: format!("localhost:{}", h.local_addr.port()),
        }],
        identity: Arc::new(ca.issue_identity(who, role).unwrap()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_path_reads_the_leader_by_a_dns_name() {
    let dir = tempfile::tempdir().unwrap();
    let (h, ca) = coordinator(dir.path()).await;
    let a = access(&h, &ca, "op", Role::Admin);
    let s = Quic.status(&a).await.unwrap();
    assert_eq!(s.leader.as_deref(), Some("coord-0"));
    assert_eq!(s.voters, ["coord-0"]);
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_path_registers_and_removes_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let (h, ca) = coordinator(dir.path()).await;
    let a = access(&h, &ca, "op", Role::Admin);
    Quic.put_model(&a, record("m1")).await.unwrap();
    let mut r = record("m1");
    r.spec.min_replicas = 2;
    Quic.put_model(&a, r.clone()).await.unwrap();
    assert_eq!(Quic.status(&a).await.unwrap().models.get("m1"), Some(&r));
    Quic.remove_model(&a, "m1").await.unwrap();
    assert!(!Quic.status(&a).await.unwrap().models.contains_key("m1"));
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_identity_may_not_register_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let (h, ca) = coordinator(dir.path()).await;
    let a = access(&h, &ca, "gw-1", Role::Node);
    let e = Quic.put_model(&a, record("m2")).await.unwrap_err();
    assert!(format!("{e:#}").contains("refused"), "{e:#}");
    let admin = access(&h, &ca, "op", Role::Admin);
    assert!(!Quic.status(&admin).await.unwrap().models.contains_key("m2"));
    h.stop().await.unwrap();
}
