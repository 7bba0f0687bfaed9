//! Three coordinator members over QUIC on loopback, in one process: they
//! elect a leader, commit placement epochs, survive losing the leader, catch
//! a restarted member up from disk, admit a node with a join token, and
//! refuse a node without credentials.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use weft_coordinator::{Command, Member, ModelRecord};
use weft_node::cluster::credentials::{ClusterCa, NodeIdentity, Revoked};
use weft_node::cluster::member::{self, MemberHandle, MemberSettings, Peer};
use weft_node::cluster::transport::{self, Reply, Request, StatusReport};
use weft_placement::{Demand, ModelId, ModelSpec, SiteId, SiteKind};

fn free_udp() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn fabric_member(name: &str, site: &str, gib: u64) -> Member {
    Member {
        id: member::member_id(name),
        name: name.into(),
        site: site.into(),
        kind: if site == "cloud" {
            SiteKind::Cloud
        } else {
            SiteKind::Edge
        },
        region: 0,
        memory_bytes: gib << 30,
        tokens_per_s: 2000.0,
        slots: 8,
        accelerator: false,
        cost_per_token: 1e-8,
        address: "127.0.0.1:0".into(),
    }
}

struct Client {
    ep: quinn::Endpoint,
}

impl Client {
    fn new(id: &NodeIdentity) -> Self {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(transport::client_config(id, &Revoked::default()).unwrap());
        Self { ep }
    }

    /// Sends `req` to any member, following redirects to the leader, until
    /// `deadline`.
    async fn ask(&self, peers: &[Peer], req: &Request, deadline: Duration) -> Reply {
        let start = Instant::now();
        let mut i = 0;
        loop {
            let p = &peers[i % peers.len()];
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                transport::request(&self.ep, None, p.addr, &p.name, req),
            )
            .await;
            match r {
                Ok(Ok(Reply::NotLeader {
                    leader: Some(l), ..
                })) => {
                    if let Some(j) = peers.iter().position(|q| q.addr == l) {
                        i = j;
                        continue;
                    }
                }
                Ok(Ok(Reply::Error { message })) if message.contains("retry") => {}
                Ok(Ok(reply)) if !matches!(reply, Reply::NotLeader { .. }) => return reply,
                _ => {}
            }
            assert!(
                start.elapsed() < deadline,
                "no answer to {req:?} within {deadline:?}"
            );
            i += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn status(&self, peers: &[Peer]) -> StatusReport {
        match self
            .ask(peers, &Request::Status, Duration::from_secs(10))
            .await
        {
            Reply::Status(s) => *s,
            other => panic!("status: {other:?}"),
        }
    }
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

async fn start(
    i: usize,
    peers: &[Peer],
    ids: &[NodeIdentity],
    dirs: &[tempfile::TempDir],
    ca_dir: &std::path::Path,
) -> MemberHandle {
    let p = &peers[i];
    let mut s = MemberSettings::new(p.id, p.addr, dirs[i].path().to_path_buf(), peers.to_vec());
    s.tick = Duration::from_millis(50);
    member::start(s, ids[i].clone(), Some(ClusterCa::load(ca_dir).unwrap()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_commit_survive_the_leader_and_admit_only_credentialed_nodes() {
    let ca_dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::init(ca_dir.path(), "test").unwrap();
    let names = ["coord-1", "coord-2", "coord-3"];
    let ids: Vec<NodeIdentity> = names
        .iter()
        .map(|n| ca.issue_identity(n).unwrap())
        .collect();
    let peers: Vec<Peer> = names
        .iter()
        .enumerate()
        .map(|(i, n)| Peer {
            id: i as u64 + 1,
            name: n.to_string(),
            addr: free_udp(),
        })
        .collect();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut handles = Vec::new();
    for i in 0..3 {
        handles.push(Some(start(i, &peers, &ids, &dirs, ca_dir.path()).await));
    }
    let admin = Client::new(&ca.issue_identity("admin").unwrap());

    // the fabric: two members and a model, then placement epochs
    for cmd in [
        Command::PutMember(fabric_member("gw-1", "edge-a", 8)),
        Command::PutMember(fabric_member("cloud-1", "cloud", 80)),
        Command::PutModel(ModelRecord {
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
        }),
    ] {
        let r = admin
            .ask(
                &peers,
                &Request::Propose { command: cmd },
                Duration::from_secs(15),
            )
            .await;
        assert!(matches!(r, Reply::Committed { refused: None, .. }), "{r:?}");
    }
    let mut acknowledged = Vec::new();
    for rps in [10.0, 40.0, 90.0] {
        match admin
            .ask(
                &peers,
                &Request::Replan {
                    demand: demand(rps),
                },
                Duration::from_secs(10),
            )
            .await
        {
            Reply::Committed {
                index,
                refused: None,
            } => acknowledged.push(index),
            other => panic!("replan: {other:?}"),
        }
    }
    let before = admin.status(&peers).await;
    assert!(before.state.epoch() >= 3, "{:?}", before.state.placement);
    let placed = &before.state.placement.as_ref().unwrap().placement;
    assert!(
        !placed.replicas.is_empty(),
        "demand at edge-a placed nothing"
    );

    // lose the leader: a new one within 3 s, with every acknowledged epoch
    let leader = before.leader.unwrap();
    let t = Instant::now();
    handles[leader as usize - 1]
        .take()
        .unwrap()
        .stop()
        .await
        .unwrap();
    let rest: Vec<Peer> = peers.iter().filter(|p| p.id != leader).cloned().collect();
    let after = loop {
        let s = admin.status(&rest).await;
        if s.leader.is_some_and(|l| l != leader) {
            break s;
        }
    };
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "new leader after {:?}",
        t.elapsed()
    );
    assert!(after.state.epoch() >= before.state.epoch());
    assert_eq!(
        after.state.placement.as_ref().unwrap().epoch,
        before.state.placement.as_ref().unwrap().epoch
    );
    // it goes on committing
    let r = admin
        .ask(
            &rest,
            &Request::Replan {
                demand: demand(300.0),
            },
            Duration::from_secs(10),
        )
        .await;
    assert!(matches!(r, Reply::Committed { refused: None, .. }), "{r:?}");

    // the old leader comes back from its disk and catches up
    let i = leader as usize - 1;
    handles[i] = Some(start(i, &peers, &ids, &dirs, ca_dir.path()).await);
    let latest = admin.status(&rest).await.state.epoch();
    let t = Instant::now();
    loop {
        let m = handles[i].as_ref().unwrap().metrics.render();
        if m.contains(&format!("weft_placement_epoch {latest}\n")) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "restarted member did not catch up:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // a node joins with a token and gets a certificate that works
    let token = ca.issue_token(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        600,
    );
    let joined = member::join(
        peers[0].addr,
        &peers[0].name,
        &token,
        fabric_member("gw-2", "edge-a", 8),
    )
    .await
    .unwrap();
    assert_eq!(joined.name, "gw-2");
    let status = Client::new(&joined).status(&peers).await;
    assert!(status.state.members.values().any(|m| m.name == "gw-2"));
    // a forged token is refused
    let last = if token.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &token[..token.len() - 1]);
    let e = member::join(
        peers[0].addr,
        &peers[0].name,
        &forged,
        fabric_member("gw-3", "edge-a", 8),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("join refused"), "{e}");

    // a stranger (another CA) is refused at the handshake and counted
    let other_dir = tempfile::tempdir().unwrap();
    let stranger = ClusterCa::init(other_dir.path(), "other")
        .unwrap()
        .issue_identity("intruder")
        .unwrap();
    let sc = Client::new(&stranger);
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        transport::request(
            &sc.ep,
            None,
            peers[1].addr,
            &peers[1].name,
            &Request::Status,
        ),
    )
    .await
    .unwrap();
    assert!(r.is_err(), "a stranger got an answer: {r:?}");
    // the forged join and the stranger's handshake are counted (the server
    // may finish failing the handshake just after the client gave up)
    let t = Instant::now();
    loop {
        let rejected: u64 = handles.iter().flatten().map(|h| h.metrics.rejected()).sum();
        if rejected >= 2 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "rejections were not counted: {rejected}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // revoking the joined node's certificate shuts it out
    let r = admin
        .ask(
            &peers,
            &Request::Propose {
                command: Command::Revoke {
                    fingerprint: joined.fingerprint(),
                },
            },
            Duration::from_secs(10),
        )
        .await;
    assert!(matches!(r, Reply::Committed { .. }), "{r:?}");
    let jc = Client::new(&joined);
    let t = Instant::now();
    loop {
        let r = tokio::time::timeout(
            Duration::from_secs(3),
            transport::request(
                &jc.ep,
                None,
                peers[1].addr,
                &peers[1].name,
                &Request::Status,
            ),
        )
        .await;
        if !matches!(r, Ok(Ok(_))) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "a revoked node is still answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // a fourth coordinator is added at run time and catches up; then one is removed
    let p4 = Peer {
        id: 4,
        name: "coord-4".into(),
        addr: free_udp(),
    };
    let mut all = peers.clone();
    all.push(p4.clone());
    let dir4 = tempfile::tempdir().unwrap();
    let mut s4 = MemberSettings::new(4, p4.addr, dir4.path().to_path_buf(), all.clone());
    s4.tick = Duration::from_millis(50);
    s4.bootstrap = false;
    let h4 = member::start(s4, ca.issue_identity("coord-4").unwrap(), None)
        .await
        .unwrap();
    let r = admin
        .ask(
            &peers,
            &Request::AddCoordinator { peer: p4.clone() },
            Duration::from_secs(10),
        )
        .await;
    assert!(matches!(r, Reply::Committed { .. }), "{r:?}");
    let t = Instant::now();
    loop {
        let s = admin.status(&peers).await;
        let latest = s.state.epoch();
        let m = h4.metrics.render();
        if s.voters.contains(&4) && m.contains(&format!("weft_placement_epoch {latest}\n")) {
            break;
        }
        if t.elapsed() > Duration::from_secs(10) {
            let brief = |m: &str| -> String {
                m.lines()
                    .filter(|l| {
                        !l.starts_with('#') && !l.contains("bucket") && !l.contains("seconds")
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            for h in handles.iter().flatten() {
                eprintln!("member: {}", brief(&h.metrics.render()));
            }
            panic!(
                "coord-4 not in: {:?} (latest {latest})\n{}",
                s.voters,
                brief(&m)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leader = admin.status(&all).await.leader.unwrap();
    let gone = [3, 2].into_iter().find(|&i| i != leader).unwrap();
    let r = admin
        .ask(
            &all,
            &Request::RemoveCoordinator { id: gone },
            Duration::from_secs(10),
        )
        .await;
    assert!(
        matches!(r, Reply::Committed { .. }),
        "removing {gone} (leader {leader}): {r:?}"
    );
    let t = Instant::now();
    while admin.status(&all).await.voters.contains(&gone) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "coordinator {gone} was not removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = admin
        .ask(
            &all,
            &Request::Replan {
                demand: demand(5.0),
            },
            Duration::from_secs(10),
        )
        .await;
    assert!(matches!(r, Reply::Committed { refused: None, .. }), "{r:?}");
    h4.stop().await.unwrap();
    for h in handles.into_iter().flatten() {
        h.stop().await.unwrap();
    }
}
