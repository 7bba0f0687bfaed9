//! Three coordinator members over QUIC on loopback, in one process: they
//! elect a leader, commit placement epochs, survive losing the leader, catch
//! a restarted member up from disk, admit a node with a join token, refuse
//! a node without credentials, and add and remove coordinators. A joined
//! gateway's certificate tries every coordinator command and is refused;
//! join tokens work once, for their name. Each test starts its own three
//! members.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The system allocator, counting the bytes live and their peak, so a test
/// can tell what reading a peer's frame cost.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call goes to the system allocator unchanged; the counters
// are atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

use weft_cluster::credentials::{self, ClusterCa, NodeIdentity, Revoked, Role};
use weft_cluster::member::{self, MemberHandle, MemberSettings};
use weft_cluster::transport::Peer;
use weft_cluster::transport::{self, Reply, Request, StatusReport};
use weft_coordinator::{Command, Member, ModelRecord};
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

    /// A joiner: no certificate, the CA pinned by its fingerprint.
    fn joiner(ca: &ClusterCa) -> Self {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(transport::joiner_config(&ca.fingerprint()).unwrap());
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
                transport::request(&self.ep, None, p.addr.parse().unwrap(), &p.name, req),
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
    checkpoint_every: Duration,
) -> MemberHandle {
    let p = &peers[i];
    let mut s = MemberSettings::new(
        p.id,
        p.addr.parse().unwrap(),
        dirs[i].path().to_path_buf(),
        peers.to_vec(),
    );
    s.tick = Duration::from_millis(50);
    s.checkpoint_every = checkpoint_every;
    member::start(s, ids[i].clone(), Some(ClusterCa::load(ca_dir).unwrap()))
        .await
        .unwrap()
}

/// Three coordinators under one CA, and an admin identity to command them.
struct Cluster {
    ca: ClusterCa,
    ca_dir: tempfile::TempDir,
    ids: Vec<NodeIdentity>,
    peers: Vec<Peer>,
    dirs: Vec<tempfile::TempDir>,
    handles: Vec<Option<MemberHandle>>,
    admin: Client,
}

impl Cluster {
    /// Three members, started.
    async fn start() -> Self {
        Self::start_checkpointing(member::CHECKPOINT_EVERY).await
    }

    /// Three members that sign their control logs' checkpoints `every`.
    async fn start_checkpointing(every: Duration) -> Self {
        let ca_dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::init(ca_dir.path(), "test").unwrap();
        let names = ["coord-1", "coord-2", "coord-3"];
        let ids: Vec<NodeIdentity> = names
            .iter()
            .map(|n| ca.issue_identity(n, Role::Coordinator).unwrap())
            .collect();
        let peers: Vec<Peer> = names
            .iter()
            .enumerate()
            .map(|(i, n)| Peer {
                id: i as u64 + 1,
                name: n.to_string(),
                addr: free_udp().to_string(),
            })
            .collect();
        let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut handles = Vec::new();
        for i in 0..3 {
            handles.push(Some(
                start(i, &peers, &ids, &dirs, ca_dir.path(), every).await,
            ));
        }
        let admin = Client::new(&ca.issue_identity("admin", Role::Admin).unwrap());
        Self {
            ca,
            ca_dir,
            ids,
            peers,
            dirs,
            handles,
            admin,
        }
    }

    /// Three members that hold two fabric members and a model.
    async fn with_fabric() -> Self {
        let c = Self::start().await;
        for cmd in [
            Command::PutMember(fabric_member("gw-1", "edge-a", 8)),
            Command::PutMember(fabric_member("cloud-1", "cloud", 80)),
            Command::PutModel(ModelRecord {
                chunk_bytes: 0,
                chunk_sha256: Vec::new(),
                sites: Vec::new(),
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
                    min_replicas: 0,
                    prefer: None,
                    sites: Vec::new(),
                },
            }),
        ] {
            let r = c.propose(&c.peers, cmd).await;
            assert!(matches!(r, Reply::Committed { refused: None, .. }), "{r:?}");
        }
        c
    }

    async fn propose(&self, peers: &[Peer], command: Command) -> Reply {
        self.admin
            .ask(
                peers,
                &Request::Propose { command },
                Duration::from_secs(15),
            )
            .await
    }

    async fn replan(&self, peers: &[Peer], rps: f64) -> Reply {
        self.admin
            .ask(
                peers,
                &Request::Replan {
                    demand: demand(rps),
                },
                Duration::from_secs(10),
            )
            .await
    }

    /// Stops the leader; returns its id.
    async fn stop_leader(&mut self) -> u64 {
        let leader = self.admin.status(&self.peers).await.leader.unwrap();
        self.handles[leader as usize - 1]
            .take()
            .unwrap()
            .stop()
            .await
            .unwrap();
        leader
    }

    /// The members other than `id`.
    fn without(&self, id: u64) -> Vec<Peer> {
        self.peers.iter().filter(|p| p.id != id).cloned().collect()
    }

    /// The sum of every running member's refused peers.
    fn rejected(&self) -> u64 {
        self.handles
            .iter()
            .flatten()
            .map(|h| h.metrics.rejected())
            .sum()
    }

    /// Waits until the members counted `n` refused peers (the server may
    /// finish failing a handshake just after the client gave up).
    async fn wait_rejected(&self, n: u64) {
        let t = Instant::now();
        loop {
            let rejected = self.rejected();
            if rejected >= n {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "rejections were not counted: {rejected}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The status once the leader has re-planned for every member (a join
    /// starts a new epoch on a later tick).
    async fn placed_everyone(&self) -> StatusReport {
        let t = Instant::now();
        loop {
            let s = self.admin.status(&self.peers).await;
            let members: Vec<u64> = s.state.members.keys().copied().collect();
            if s.state.placement.as_ref().map(|p| &p.members) == Some(&members) {
                return s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "no epoch placed every member: {members:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A token for node `name` valid for 10 minutes from now.
    fn token(&self, name: &str) -> String {
        self.ca
            .issue_token(now_unix(), 600, name, Role::Node)
            .unwrap()
    }

    /// A node joined with a fresh token under `name`.
    async fn join(&self, name: &str) -> NodeIdentity {
        member::join(
            &self.peers[0].addr,
            &self.peers[0].name,
            &self.token(name),
            fabric_member(name, "edge-a", 8),
        )
        .await
        .unwrap()
    }

    /// A join request sent as an attacker could: `token` with a request
    /// for `name`, whatever the token says.
    async fn raw_join(&self, token: &str, name: &str) -> Reply {
        let (_key, csr_pem) = credentials::new_request(name).unwrap();
        Client::joiner(&self.ca)
            .ask(
                &self.peers,
                &Request::Join {
                    token: token.to_string(),
                    csr_pem,
                    member: fabric_member(name, "edge-a", 8),
                },
                Duration::from_secs(10),
            )
            .await
    }

    /// Requests of `kind` every running member refused.
    fn refused(&self, kind: &str) -> u64 {
        self.handles
            .iter()
            .flatten()
            .map(|h| h.metrics.refused(kind))
            .sum()
    }

    /// The refusals in every member's control intent log.
    fn logged_refusals(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for d in &self.dirs {
            let dir = d.path().join("control-intent");
            for f in weft_audit::files(&dir).unwrap_or_default() {
                for line in std::fs::read_to_string(f).unwrap().lines() {
                    let v: serde_json::Value = serde_json::from_str(line).unwrap();
                    out.push(v["record"].clone());
                }
            }
        }
        out
    }

    async fn stop(self) {
        for h in self.handles.into_iter().flatten() {
            h.stop().await.unwrap();
        }
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The control state as JSON, without the applied index (which any commit
/// moves).
fn state_of(s: &StatusReport) -> serde_json::Value {
    let mut v = serde_json::to_value(&s.state).unwrap();
    v["applied_index"] = 0.into();
    serde_json::json!({"state": v, "voters": s.voters})
}

/// Whether `who` gets an answer to a status request from `peer` within 3 s.
async fn answered(who: &Client, peer: &Peer) -> bool {
    let r = tokio::time::timeout(
        Duration::from_secs(3),
        transport::request(
            &who.ep,
            None,
            peer.addr.parse().unwrap(),
            &peer.name,
            &Request::Status,
        ),
    )
    .await;
    matches!(r, Ok(Ok(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_commit_placement_epochs_for_the_demand() {
    let c = Cluster::with_fabric().await;
    for rps in [10.0, 40.0, 90.0] {
        let r = c.replan(&c.peers, rps).await;
        assert!(
            matches!(r, Reply::Committed { refused: None, .. }),
            "replan: {r:?}"
        );
    }
    let s = c.admin.status(&c.peers).await;
    assert!(s.state.epoch() >= 3, "{:?}", s.state.placement);
    let placed = &s.state.placement.as_ref().unwrap().placement;
    assert!(
        !placed.replicas.is_empty(),
        "demand at edge-a placed nothing"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_leader_elects_another_within_3_s_with_every_acknowledged_epoch() {
    let mut c = Cluster::with_fabric().await;
    for rps in [10.0, 40.0, 90.0] {
        let r = c.replan(&c.peers, rps).await;
        assert!(
            matches!(r, Reply::Committed { refused: None, .. }),
            "replan: {r:?}"
        );
    }
    let before = c.admin.status(&c.peers).await;
    let t = Instant::now();
    let leader = c.stop_leader().await;
    let rest = c.without(leader);
    let after = loop {
        let s = c.admin.status(&rest).await;
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
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_survivors_of_a_lost_leader_go_on_committing() {
    let mut c = Cluster::with_fabric().await;
    let leader = c.stop_leader().await;
    let rest = c.without(leader);
    let r = c.replan(&rest, 300.0).await;
    assert!(matches!(r, Reply::Committed { refused: None, .. }), "{r:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_catches_up_from_its_disk() {
    let mut c = Cluster::with_fabric().await;
    let r = c.replan(&c.peers, 10.0).await;
    assert!(matches!(r, Reply::Committed { refused: None, .. }), "{r:?}");
    let leader = c.stop_leader().await;
    let rest = c.without(leader);
    let r = c.replan(&rest, 300.0).await;
    assert!(matches!(r, Reply::Committed { refused: None, .. }), "{r:?}");
    let i = leader as usize - 1;
    c.handles[i] = Some(
        start(
            i,
            &c.peers,
            &c.ids,
            &c.dirs,
            c.ca_dir.path(),
            member::CHECKPOINT_EVERY,
        )
        .await,
    );
    let latest = c.admin.status(&rest).await.state.epoch();
    let t = Instant::now();
    loop {
        let m = c.handles[i].as_ref().unwrap().metrics.render();
        if m.contains(&format!("weft_placement_epoch {latest}\n")) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "restarted member did not catch up:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_with_a_token_and_its_certificate_works() {
    let c = Cluster::start().await;
    let joined = c.join("gw-2").await;
    assert_eq!(joined.name, "gw-2");
    let status = Client::new(&joined).status(&c.peers).await;
    assert!(status.state.members.values().any(|m| m.name == "gw-2"));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_token_is_refused_and_counted() {
    let c = Cluster::start().await;
    let token = c.token("gw-3");
    let last = if token.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &token[..token.len() - 1]);
    let e = member::join(
        &c.peers[0].addr,
        &c.peers[0].name,
        &forged,
        fabric_member("gw-3", "edge-a", 8),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("join refused"), "{e}");
    assert_eq!(c.refused("join"), 1);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_from_another_ca_is_refused_at_the_handshake_and_counted() {
    let c = Cluster::start().await;
    let other_dir = tempfile::tempdir().unwrap();
    let stranger = ClusterCa::init(other_dir.path(), "other")
        .unwrap()
        .issue_identity("intruder", Role::Coordinator)
        .unwrap();
    let sc = Client::new(&stranger);
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        transport::request(
            &sc.ep,
            None,
            c.peers[1].addr.parse().unwrap(),
            &c.peers[1].name,
            &Request::Status,
        ),
    )
    .await
    .unwrap();
    assert!(r.is_err(), "a stranger got an answer: {r:?}");
    c.wait_rejected(1).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_shut_out() {
    let c = Cluster::start().await;
    let joined = c.join("gw-2").await;
    let jc = Client::new(&joined);
    assert!(
        answered(&jc, &c.peers[1]).await,
        "a joined node is not answered"
    );
    let r = c
        .propose(
            &c.peers,
            Command::Revoke {
                fingerprint: joined.fingerprint(),
            },
        )
        .await;
    assert!(matches!(r, Reply::Committed { .. }), "{r:?}");
    let t = Instant::now();
    while answered(&jc, &c.peers[1]).await {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "a revoked node is still answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.stop().await;
}

/// A fourth coordinator, started empty and added to `c` at run time; waits
/// until it is a voter caught up with the latest epoch.
async fn add_fourth(c: &Cluster) -> (MemberHandle, Vec<Peer>, tempfile::TempDir) {
    let p4 = Peer {
        id: 4,
        name: "coord-4".into(),
        addr: free_udp().to_string(),
    };
    let mut all = c.peers.clone();
    all.push(p4.clone());
    let dir4 = tempfile::tempdir().unwrap();
    let mut s4 = MemberSettings::new(
        4,
        p4.addr.parse().unwrap(),
        dir4.path().to_path_buf(),
        all.clone(),
    );
    s4.tick = Duration::from_millis(50);
    s4.bootstrap = false;
    let h4 = member::start(
        s4,
        c.ca.issue_identity("coord-4", Role::Coordinator).unwrap(),
        None,
    )
    .await
    .unwrap();
    let r = c
        .admin
        .ask(
            &c.peers,
            &Request::AddCoordinator { peer: p4.clone() },
            Duration::from_secs(10),
        )
        .await;
    assert!(matches!(r, Reply::Committed { .. }), "{r:?}");
    let t = Instant::now();
    loop {
        let s = c.admin.status(&c.peers).await;
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
            for h in c.handles.iter().flatten() {
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
    (h4, all, dir4)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_added_at_run_time_becomes_a_voter_and_catches_up() {
    let c = Cluster::with_fabric().await;
    let r = c.replan(&c.peers, 10.0).await;
    assert!(matches!(r, Reply::Committed { refused: None, .. }), "{r:?}");
    let (h4, _, _dir4) = add_fourth(&c).await;
    h4.stop().await.unwrap();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_coordinator_leaves_the_voters_and_the_rest_go_on_committing() {
    let c = Cluster::with_fabric().await;
    let (h4, all, _dir4) = add_fourth(&c).await;
    let leader = c.admin.status(&all).await.leader.unwrap();
    let gone = [3, 2].into_iter().find(|&i| i != leader).unwrap();
    let r = c
        .admin
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
    while c.admin.status(&all).await.voters.contains(&gone) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "coordinator {gone} was not removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = c.replan(&all, 5.0).await;
    assert!(matches!(r, Reply::Committed { refused: None, .. }), "{r:?}");
    h4.stop().await.unwrap();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60_mib_frame_from_a_peer_without_credentials_costs_no_more_than_the_join_limit() {
    let c = Cluster::start().await;
    // a joiner's connection: no client certificate, the CA pinned
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(transport::joiner_config(&c.ca.fingerprint()).unwrap());
    let conn = ep
        .connect(
            c.peers[0].addr.parse().unwrap(),
            &weft_cluster::credentials::dns_name(&c.peers[0].name),
        )
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    // announce 60 MiB, send a little of it, and wait for the answer
    send.write_all(&(60u32 << 20).to_be_bytes()).await.unwrap();
    let _ = send.write_all(&[b'{'; 4096]).await;
    let mut buf = [0u8; 16];
    let _ = tokio::time::timeout(Duration::from_secs(5), recv.read(&mut buf)).await;
    let grew = PEAK.load(Ordering::Relaxed).saturating_sub(before);
    assert!(
        grew < 512 << 10,
        "reading the frame cost {} KiB",
        grew >> 10
    );
    c.wait_rejected(1).await;
    c.stop().await;
}

/// Every command a gateway must not send, each one that the control state
/// would take from a coordinator; `next` is a valid next epoch.
fn commands_a_gateway_may_not_send(
    c: &Cluster,
    joined: &NodeIdentity,
    next: weft_coordinator::PlacementEpoch,
) -> Vec<Request> {
    let coordinator = Peer {
        id: 9,
        name: "coord-9".into(),
        addr: free_udp().to_string(),
    };
    let propose = |command| Request::Propose { command };
    vec![
        propose(Command::RemoveMember {
            id: member::member_id("cloud-1"),
        }),
        propose(Command::PutMember(fabric_member("cloud-1", "cloud", 1))),
        propose(Command::PutModel(ModelRecord {
            chunk_bytes: 0,
            chunk_sha256: Vec::new(),
            sites: Vec::new(),
            source: "default".into(),
            sha256: String::new(),
            spec: ModelSpec {
                name: "evil".into(),
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
        })),
        propose(Command::RemoveModel {
            name: "small".into(),
        }),
        propose(Command::CommitPlacement(next)),
        propose(Command::Revoke {
            fingerprint: c.ids[0].fingerprint(),
        }),
        propose(Command::Join {
            member: fabric_member(&joined.name, "edge-a", 8),
            nonce: "n".into(),
            expires: u64::MAX,
            now: 0,
        }),
        Request::AddCoordinator { peer: coordinator },
        Request::RemoveCoordinator { id: 3 },
        Request::Replan {
            demand: demand(5.0),
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_certificate_is_refused_every_coordinator_command_and_the_state_is_unchanged() {
    let c = Cluster::with_fabric().await;
    let r = c.replan(&c.peers, 5.0).await;
    assert!(matches!(r, Reply::Committed { refused: None, .. }), "{r:?}");
    let joined = c.join("gw-2").await;
    let gw = Client::new(&joined);
    let status = c.placed_everyone().await;
    let mut next = status.state.placement.clone().unwrap();
    next.epoch += 1;
    let before = state_of(&status);
    for req in commands_a_gateway_may_not_send(&c, &joined, next) {
        let r = gw.ask(&c.peers, &req, Duration::from_secs(10)).await;
        assert!(
            matches!(&r, Reply::Error { message } if message.contains("gw-2 (node)")),
            "{req:?} from a gateway: {r:?}"
        );
    }
    let after = state_of(&c.admin.status(&c.peers).await);
    assert_eq!(before, after, "a gateway changed the control state");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_may_describe_itself() {
    let c = Cluster::start().await;
    let joined = c.join("gw-2").await;
    let mut me = fabric_member("gw-2", "edge-a", 16);
    me.slots = 3;
    let r = Client::new(&joined)
        .ask(
            &c.peers,
            &Request::Propose {
                command: Command::PutMember(me.clone()),
            },
            Duration::from_secs(10),
        )
        .await;
    assert!(matches!(r, Reply::Committed { refused: None, .. }), "{r:?}");
    let s = c.admin.status(&c.peers).await;
    assert_eq!(s.state.members.get(&me.id), Some(&me));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_command_is_counted_and_logged_with_the_peers_identity() {
    let c = Cluster::start().await;
    let joined = c.join("gw-2").await;
    let r = Client::new(&joined)
        .ask(
            &c.peers,
            &Request::Propose {
                command: Command::Revoke {
                    fingerprint: c.ids[0].fingerprint(),
                },
            },
            Duration::from_secs(10),
        )
        .await;
    assert!(matches!(r, Reply::Error { .. }), "{r:?}");
    assert_eq!(c.refused("propose revoke"), 1);
    let logged = c.logged_refusals();
    let hit = logged
        .iter()
        .find(|r| r["request"] == "propose revoke")
        .unwrap_or_else(|| panic!("no refusal logged: {logged:?}"));
    assert_eq!(hit["peer"], "gw-2");
    assert_eq!(hit["role"], "node");
    assert_eq!(hit["fingerprint"], joined.fingerprint());
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinators_control_log_records_what_it_applied_and_verifies_against_its_committed_checkpoints(
) {
    let c = Cluster::start_checkpointing(Duration::from_millis(300)).await;
    let gone =
        c.ca.issue_identity("gw-9", weft_cluster::credentials::Role::Node)
            .unwrap();
    let r = c
        .admin
        .ask(
            &c.peers,
            &Request::Propose {
                command: Command::Revoke {
                    fingerprint: gone.fingerprint(),
                },
            },
            Duration::from_secs(10),
        )
        .await;
    assert!(matches!(r, Reply::Committed { refused: None, .. }), "{r:?}");
    let dir = c.dirs[0].path().join("control-intent");
    let name = c.ids[0].name.clone();
    let t = std::time::Instant::now();
    let report = loop {
        let s = c.admin.status(&c.peers).await;
        let anchors: Vec<weft_audit::Checkpoint> = s
            .state
            .checkpoints
            .get(&name)
            .map(|n| n.all())
            .unwrap_or_default();
        let trust = weft_cluster::credentials::ClusterTrust::new(
            c.ca.cert_pem(),
            s.state.revoked.iter().cloned(),
        )
        .unwrap();
        let r = weft_audit::check(
            std::slice::from_ref(&dir),
            &weft_audit::Options {
                trust: Some(&trust),
                anchors: &anchors,
                node: Some(&name),
            },
        )
        .unwrap();
        if r.anchors_checked > 0 && r.checkpoints > 0 {
            break r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no checkpoint committed: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let records: Vec<serde_json::Value> = weft_audit::query::read(&[dir])
        .unwrap()
        .into_iter()
        .map(|f| f.line.record)
        .collect();
    assert!(
        records.iter().any(|r| r["event"] == "control-applied"
            && r["op"] == "revoke"
            && r["fingerprint"] == gone.fingerprint()),
        "{records:?}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_works_only_once() {
    let c = Cluster::start().await;
    let token = c.token("gw-2");
    let first = c.raw_join(&token, "gw-2").await;
    assert!(matches!(first, Reply::Joined { .. }), "{first:?}");
    let again = c.raw_join(&token, "gw-2").await;
    assert!(
        matches!(&again, Reply::Error { message } if message.contains("already used")),
        "{again:?}"
    );
    assert_eq!(c.refused("join"), 1);
    assert!(c
        .logged_refusals()
        .iter()
        .any(|r| r["request"] == "join" && r["reason"].as_str().unwrap().contains("already used")));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_redeemed_under_another_name_is_refused() {
    let c = Cluster::start().await;
    let token = c.token("gw-2");
    let r = c.raw_join(&token, "coord-1").await;
    assert!(
        matches!(&r, Reply::Error { message } if message.contains("for node \"gw-2\"")),
        "{r:?}"
    );
    let s = c.admin.status(&c.peers).await;
    assert!(!s.state.members.values().any(|m| m.name == "coord-1"));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_join_token_is_refused() {
    let c = Cluster::start().await;
    let token =
        c.ca.issue_token(now_unix() - 600, 60, "gw-2", Role::Node)
            .unwrap();
    let r = c.raw_join(&token, "gw-2").await;
    assert!(
        matches!(&r, Reply::Error { message } if message.contains("expired")),
        "{r:?}"
    );
    assert_eq!(c.refused("join"), 1);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_node_gets_the_role_its_token_names() {
    let c = Cluster::start().await;
    let joined = c.join("gw-2").await;
    let who = credentials::cert_identity(joined.cert_der()).unwrap();
    assert_eq!((who.name.as_str(), who.role), ("gw-2", Role::Node));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_under_a_coordinators_name_cannot_send_raft_messages() {
    let c = Cluster::start().await;
    // the operator slipped: a node token under a coordinator's name
    let token =
        c.ca.issue_token(now_unix(), 600, "coord-2", Role::Node)
            .unwrap();
    let imposter = member::join(
        &c.peers[0].addr,
        &c.peers[0].name,
        &token,
        fabric_member("coord-2", "edge-a", 8),
    )
    .await
    .unwrap();
    let client = Client::new(&imposter);
    let conn = client
        .ep
        .connect(
            c.peers[0].addr.parse().unwrap(),
            &credentials::dns_name(&c.peers[0].name),
        )
        .unwrap()
        .await
        .unwrap();
    let mut uni = conn.open_uni().await.unwrap();
    let _ = uni.write_all(&[0, 0, 0, 4, 1, 2, 3, 4]).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    assert!(closed.is_ok(), "the connection stayed open");
    assert_eq!(c.refused("raft"), 1);
    c.stop().await;
}

/// A coordinator that is alive but stuck: it completes the handshake,
/// takes every stream, and never answers.
fn stuck_coordinator(id: &NodeIdentity) -> SocketAddr {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_a_stuck_coordinator_fails_within_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::init(dir.path(), "t").unwrap();
    let addr = stuck_coordinator(&ca.issue_identity("coord-1", Role::Coordinator).unwrap());
    let me = Client::new(&ca.issue_identity("admin", Role::Admin).unwrap());
    let t = Instant::now();
    let e = transport::request(&me.ep, None, addr, "coord-1", &Request::Status)
        .await
        .unwrap_err();
    let took = t.elapsed();
    assert!(
        took < transport::REQUEST_TIMEOUT + Duration::from_secs(2),
        "after {took:?}"
    );
    assert!(e.to_string().contains("sent no reply within"), "{e}");
}
