//! A coordinator member over the network: a `weft-coordinator` core driven
//! by a tick timer, with raft messages and requests arriving over QUIC and
//! every write fsynced before it is acknowledged ([`DirDisk`]).
//!
//! One task owns the core (no locks around raft); connection tasks feed it
//! events, and one sender task per peer keeps a connection and ships raft
//! batches, reporting lost ones back so raft retries.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::{mpsc, oneshot, watch};
use weft_coordinator::{Applied, Command, Coordinator, CoordinatorConfig, DirDisk, Member};
use weft_placement::{Demand, SolverConfig};

use crate::authz;
use crate::credentials::{ClusterCa, NodeIdentity, PeerIdentity, Revoked};
use crate::transport::{self, read_frame, write_frame, Peer, Reply, Request, StatusReport};
use weft_metrics::{IntCounter, IntCounterVec, IntGauge};

/// How a coordinator member runs.
#[derive(Clone)]
pub struct MemberSettings {
    /// This member's raft id.
    pub id: u64,
    /// Where it listens (UDP).
    pub listen: SocketAddr,
    /// Where its log, hard state and snapshots live.
    pub data_dir: PathBuf,
    /// The founding coordinators, this one included.
    pub peers: Vec<Peer>,
    /// One raft tick.
    pub tick: Duration,
    /// Ticks between re-planning checks on the leader.
    pub replan_ticks: u64,
    /// Relative change of aggregate demand that triggers a new plan.
    pub replan_band: f64,
    /// The solver's settings.
    pub solver: SolverConfig,
    /// How long a proposal may wait to commit.
    pub propose_timeout: Duration,
    /// Found the group with `peers` as its first voters (every founder
    /// does); a member added at run time starts empty and is caught up by
    /// the leader once a coordinator adds it.
    pub bootstrap: bool,
    /// The overlay's routing table: members missing from it are down, and
    /// the leader moves their replicas. `None`: no failure detection.
    pub live: Option<Arc<std::sync::RwLock<crate::overlay::RoutingTable>>>,
    /// Where refused commands and joins are logged, with who was refused
    /// (an intent log; `None`: counted only).
    pub intent_log: Option<PathBuf>,
    /// The node's own intent log, when the same process serves the API:
    /// control-plane records go there, and the node signs and commits its
    /// checkpoints (`intent_log` is then unused).
    pub shared_log: Option<SharedLog>,
    /// How often the member signs a checkpoint of its own control log and
    /// commits it (not of a shared one: its node does).
    pub checkpoint_every: Duration,
    /// The registry its metrics go in (the node's one).
    pub registry: weft_metrics::Registry,
}

impl std::fmt::Debug for MemberSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberSettings")
            .field("id", &self.id)
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("peers", &self.peers)
            .field("intent_log", &self.intent_log)
            .field("shared_log", &self.shared_log.is_some())
            .finish_non_exhaustive()
    }
}

pub use crate::checkpoints::SharedLog;

/// How often a checkpoint is signed by default.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(60);

impl MemberSettings {
    /// Defaults for member `id` listening on `listen`.
    pub fn new(id: u64, listen: SocketAddr, data_dir: PathBuf, peers: Vec<Peer>) -> Self {
        Self {
            id,
            listen,
            peers,
            tick: Duration::from_millis(100),
            replan_ticks: 10,
            replan_band: 0.2,
            solver: SolverConfig::default(),
            propose_timeout: Duration::from_secs(5),
            bootstrap: true,
            live: None,
            intent_log: Some(data_dir.join("control-intent")),
            shared_log: None,
            checkpoint_every: CHECKPOINT_EVERY,
            data_dir,
            registry: weft_metrics::Registry::new(),
        }
    }
}

/// Bucket bounds (seconds) of the commit-latency histogram.
const COMMIT_BUCKETS: &[f64] = &[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0];

/// The control plane's metrics.
pub struct ControlMetrics {
    registry: weft_metrics::Registry,
    term: IntGauge,
    is_leader: IntGauge,
    leader_changes: IntCounter,
    commit_index: IntGauge,
    log_entries: IntGauge,
    epoch: IntGauge,
    members: IntGauge,
    rejected_peers: IntCounter,
    refused_requests: IntCounterVec,
    commit_latency: weft_metrics::Histogram,
    replans: IntCounterVec,
}

/// Every `cause` `weft_placement_replans_total` counts: the control
/// state's (see `ControlState::replan_cause`), a member not heard from
/// (`member_down`), one heard again that the last plan left out
/// (`member_up`), and an operator's `weft cluster replan` (`operator`).
pub const REPLAN_CAUSES: &[&str] = &[
    "first",
    "members",
    "models",
    "floors",
    "demand",
    "member_down",
    "member_up",
    "operator",
];

impl std::fmt::Debug for ControlMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlMetrics").finish_non_exhaustive()
    }
}

impl ControlMetrics {
    /// The control plane's metrics, registered in `registry`.
    pub fn new(registry: &weft_metrics::Registry) -> Self {
        use weft_metrics::{counter, counter_vec, gauge, histogram};
        let r = registry;
        let m = Self {
            registry: registry.clone(),
            term: gauge(r, "weft_raft_term", "current raft term"),
            is_leader: gauge(r, "weft_raft_is_leader", "1 if this member leads"),
            leader_changes: counter(r, "weft_raft_leader_changes_total", "leader changes seen"),
            commit_index: gauge(r, "weft_raft_commit_index", "last committed log index"),
            log_entries: gauge(
                r,
                "weft_raft_log_entries",
                "log entries after the last snapshot",
            ),
            epoch: gauge(
                r,
                "weft_placement_epoch",
                "latest committed placement epoch",
            ),
            members: gauge(r, "weft_cluster_members", "members in the control state"),
            rejected_peers: counter(
                r,
                "weft_cluster_rejected_peers_total",
                "connections or messages refused for lacking valid credentials",
            ),
            refused_requests: counter_vec(
                r,
                "weft_cluster_refused_requests_total",
                "requests from peers refused: not allowed for their role, or a bad join",
                &["request"],
            ),
            commit_latency: histogram(
                r,
                "weft_raft_commit_seconds",
                "proposal to commit on the leader",
                COMMIT_BUCKETS,
            ),
            replans: counter_vec(
                r,
                "weft_placement_replans_total",
                "placements this member proposed as leader, by what made it re-plan",
                &["cause"],
            ),
        };
        for c in REPLAN_CAUSES {
            m.replans.with_label_values(&[c]);
        }
        m
    }

    /// Counts a placement proposed for `cause` (one of [`REPLAN_CAUSES`]).
    fn replanned(&self, cause: &'static str) {
        debug_assert!(REPLAN_CAUSES.contains(&cause), "{cause}");
        self.replans.with_label_values(&[cause]).inc();
    }

    /// Placements proposed so far for `cause`.
    pub fn replans(&self, cause: &str) -> u64 {
        self.replans.with_label_values(&[cause]).get()
    }

    /// Prometheus text of the registry these metrics are in.
    pub fn render(&self) -> String {
        weft_metrics::encode(&self.registry)
    }

    /// Connections or messages refused so far.
    pub fn rejected(&self) -> u64 {
        self.rejected_peers.get()
    }

    fn reject(&self) {
        self.rejected_peers.inc();
    }

    /// Requests refused so far (by authorization or a bad join) of `kind`
    /// (as [`authz::request_kind`] names them).
    pub fn refused(&self, kind: &str) -> u64 {
        self.refused_requests.with_label_values(&[kind]).get()
    }

    fn refuse(&self, kind: &'static str) {
        self.refused_requests.with_label_values(&[kind]).inc();
    }
}

/// Most refusals written to the intent log per second; past it they are
/// only counted (a flood of bad joins must not fill the disk).
const REFUSALS_LOGGED_PER_S: u32 = 20;

/// Refused requests: counted by kind, and logged in the control plane's
/// intent log with the peer's identity; and the commands this member
/// applied.
#[derive(Clone)]
struct Refusals {
    metrics: Arc<ControlMetrics>,
    log: Option<SharedLog>,
    /// Whether the log is this member's own (it signs and commits its
    /// checkpoints) rather than its node's.
    own: bool,
    /// The second refusals are being counted in, and how many were logged.
    rate: Arc<Mutex<(u64, u32)>>,
}

impl Refusals {
    fn open(
        metrics: Arc<ControlMetrics>,
        dir: Option<&std::path::Path>,
        shared: Option<SharedLog>,
        identity: &NodeIdentity,
    ) -> Result<Self> {
        let (log, own) = match (shared, dir) {
            (Some(l), _) => (Some(l), false),
            (None, Some(d)) => {
                let mut log = weft_audit::IntentLog::open(d, weft_audit::DEFAULT_MAX_FILE_BYTES)
                    .with_context(|| {
                        format!("opening the control intent log in {}", d.display())
                    })?;
                log.set_signer(Arc::new(identity.clone()));
                (Some(Arc::new(Mutex::new(log))), true)
            }
            (None, None) => (None, false),
        };
        Ok(Self {
            metrics,
            log,
            own,
            rate: Arc::new(Mutex::new((0, 0))),
        })
    }

    /// Appends `record` to the log, forced to disk.
    fn write(&self, record: serde_json::Value) {
        let Some(log) = &self.log else { return };
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = log.append(record).and_then(|_| log.sync()) {
            tracing::error!("the control intent log: {e}");
        }
    }

    /// Signs a checkpoint of this member's own log (`None` for a shared
    /// one, or with nothing new).
    fn checkpoint(&self, why: &str) -> Option<weft_audit::Checkpoint> {
        let log = self.log.as_ref().filter(|_| self.own)?;
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        match log.checkpoint(why) {
            Ok(cp) => cp,
            Err(e) => {
                tracing::error!("checkpointing the control intent log: {e}");
                None
            }
        }
    }

    /// The latest checkpoint of this member's own log.
    fn latest(&self) -> Option<weft_audit::Checkpoint> {
        let log = self.log.as_ref().filter(|_| self.own)?;
        let log = log.lock().unwrap_or_else(|e| e.into_inner());
        log.latest_checkpoint().cloned()
    }

    /// Counts and logs that `req` from `who` (at `remote`) was refused.
    fn refuse(
        &self,
        who: Option<&PeerIdentity>,
        remote: SocketAddr,
        kind: &'static str,
        why: &str,
    ) {
        self.metrics.refuse(kind);
        tracing::warn!(
            peer = who.map_or("(no certificate)".to_string(), |w| w.to_string()),
            %remote,
            request = kind,
            "refused: {why}"
        );
        if self.log.is_none() {
            return;
        }
        {
            let mut g = self.rate.lock().unwrap_or_else(|e| e.into_inner());
            let (second, logged) = &mut *g;
            let now = now_unix();
            if *second != now {
                (*second, *logged) = (now, 0);
            }
            if *logged >= REFUSALS_LOGGED_PER_S {
                return;
            }
            *logged += 1;
        }
        self.write(serde_json::json!({
            "event": "control-refused",
            "request": kind,
            "reason": why,
            "peer": who.map(|w| w.name.clone()),
            "role": who.map(|w| w.role.as_str()),
            "fingerprint": who.map(|w| w.fingerprint.clone()),
            "remote": remote.to_string(),
        }));
    }

    /// Logs a command this member applied (placements, revocations,
    /// members and models; not descriptions a node refreshes, nor
    /// checkpoints, which would call for checkpoints of their own).
    fn applied(&self, index: u64, cmd: &Command, result: &Applied) {
        let what = match cmd {
            Command::CommitPlacement(p) => serde_json::json!({
                "op": "commit-placement",
                "epoch": p.epoch,
                "members": p.members,
                "models": p.models,
            }),
            Command::Revoke { fingerprint } => {
                serde_json::json!({"op": "revoke", "fingerprint": fingerprint})
            }
            Command::RemoveMember { id } => serde_json::json!({"op": "remove-member", "id": id}),
            Command::PutModel(m) => serde_json::json!({"op": "put-model", "model": m.spec.name}),
            Command::RemoveModel { name } => {
                serde_json::json!({"op": "remove-model", "model": name})
            }
            Command::Join { member, .. } => {
                serde_json::json!({"op": "join", "member": member.name, "id": member.id})
            }
            Command::PutMember(_) | Command::Checkpoint(_) => return,
        };
        let mut record = serde_json::json!({"event": "control-applied", "index": index});
        if let (Some(r), Some(w)) = (record.as_object_mut(), what.as_object()) {
            r.extend(w.clone());
        }
        if let Applied::Refused(why) = result {
            record["decision"] = "refused".into();
            record["reason"] = why.clone().into();
        }
        self.write(record);
    }
}

enum Event {
    Raft(Message),
    Request {
        req: Request,
        peer: Option<PeerIdentity>,
        remote: SocketAddr,
        reply: oneshot::Sender<Reply>,
    },
    Lost {
        peer: u64,
        snapshot: bool,
    },
    SnapshotSent {
        peer: u64,
    },
}

/// A running member.
pub struct MemberHandle {
    /// The address it listens on.
    pub local_addr: SocketAddr,
    /// Its metrics.
    pub metrics: Arc<ControlMetrics>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<()>>,
    endpoint: quinn::Endpoint,
}

impl MemberHandle {
    /// Stops the member and waits for it.
    pub async fn stop(self) -> Result<()> {
        let _ = self.shutdown.send(true);
        let r = self.task.await.context("coordinator task")?;
        self.endpoint.close(0u32.into(), b"shutting down");
        r
    }
}

/// Smoothed request rates below this are not planned for (noise).
pub const MIN_MEASURED_RPS: f64 = 0.5;
/// Prompt and output lengths assumed for measured demand.
const MEASURED_TOKENS: (f64, f64) = (1000.0, 128.0);

/// Demand the nodes measure (their load reports' request rates), summed
/// by (site, model), for the pairs the operator did not plan for with
/// `weft cluster replan` (an operator's figure is kept as given) and for
/// models the cluster knows.
pub fn measured_demand(
    table: &crate::overlay::RoutingTable,
    pinned: &[(String, String, Demand)],
    state: &weft_coordinator::ControlState,
) -> Vec<(String, String, Demand)> {
    let mut sums: BTreeMap<(String, String), f64> = BTreeMap::new();
    for e in table.nodes.values() {
        for (model, rps) in &e.report.demand {
            *sums
                .entry((e.report.site.clone(), model.clone()))
                .or_default() += rps;
        }
    }
    sums.into_iter()
        .filter(|((site, model), rps)| {
            *rps >= MIN_MEASURED_RPS
                && state.models.contains_key(model)
                && !pinned.iter().any(|p| &p.0 == site && &p.1 == model)
        })
        .map(|((site, model), rps)| {
            let d = Demand {
                site: weft_placement::SiteId(0),
                model: weft_placement::ModelId(0),
                requests_per_s: rps,
                prompt_tokens: MEASURED_TOKENS.0,
                output_tokens: MEASURED_TOKENS.1,
                deadline_ms: None,
            };
            (site, model, d)
        })
        .collect()
}

/// The answer to a membership change: proposed (it commits later), or why not.
fn proposed(r: weft_coordinator::Result<()>) -> Reply {
    match r {
        Ok(()) => Reply::Committed {
            index: 0,
            refused: None,
        },
        Err(e) => Reply::Error {
            message: e.to_string(),
        },
    }
}

/// Round trips between sites from the nodes' reports: for every pair of
/// different sites, the median of what their nodes measured to each other.
pub fn measured_links(table: &crate::overlay::RoutingTable) -> Vec<weft_coordinator::SiteLink> {
    let mut samples: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for e in table.nodes.values() {
        for (other, rtt) in &e.report.rtt_ms {
            let Some(o) = table.nodes.get(other) else {
                continue;
            };
            let (a, b) = (&e.report.site, &o.report.site);
            if a == b || !rtt.is_finite() {
                continue;
            }
            let key = if a < b {
                (a.clone(), b.clone())
            } else {
                (b.clone(), a.clone())
            };
            samples.entry(key).or_default().push(*rtt);
        }
    }
    samples
        .into_iter()
        .map(|((a, b), mut v)| {
            v.sort_by(f64::total_cmp);
            weft_coordinator::SiteLink {
                a,
                b,
                rtt_ms: v[v.len() / 2],
            }
        })
        .collect()
}

pub use crate::credentials::member_id;

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Starts coordinator member `settings.id`. `ca` (the cluster CA with its
/// key) lets it admit joiners; without it, joins are refused.
pub async fn start(
    settings: MemberSettings,
    identity: NodeIdentity,
    ca: Option<ClusterCa>,
) -> Result<MemberHandle> {
    let revoked = Revoked::default();
    let disk = DirDisk::open(&settings.data_dir.join("raft"))
        .with_context(|| format!("opening the raft log in {}", settings.data_dir.display()))?;
    let founders: Vec<u64> = if settings.bootstrap {
        settings.peers.iter().map(|p| p.id).collect()
    } else {
        Vec::new()
    };
    let seed = now_unix() ^ settings.id;
    let core = Coordinator::open(
        CoordinatorConfig::new(settings.id),
        Box::new(disk),
        &founders,
        seed,
    )?;
    let endpoint = transport::endpoint(&identity, &revoked, settings.listen, ca.is_some())?;
    let local_addr = endpoint.local_addr()?;
    let metrics = Arc::new(ControlMetrics::new(&settings.registry));
    let refusals = Refusals::open(
        metrics.clone(),
        settings.intent_log.as_deref(),
        settings.shared_log.clone(),
        &identity,
    )?;
    let (events_tx, events_rx) = mpsc::channel(4096);
    let (shutdown, shutdown_rx) = watch::channel(false);

    // coordinators: the configured ones, and any the log added at run time
    let mut peers = settings.peers.clone();
    for r in core.state().coordinators.values() {
        if !peers.iter().any(|p| p.id == r.id) {
            peers.push(Peer {
                id: r.id,
                name: r.name.clone(),
                addr: r.addr.clone(),
            });
        }
    }
    let names: Names = Arc::new(std::sync::RwLock::new(
        peers.iter().map(|p| (p.id, p.name.clone())).collect(),
    ));
    let (revocations, revocations_rx) = watch::channel(0u64);
    tokio::spawn(accept_loop(
        endpoint.clone(),
        events_tx.clone(),
        Gate {
            names: names.clone(),
            metrics: metrics.clone(),
            refusals: refusals.clone(),
            revoked: revoked.clone(),
            revocations: revocations_rx,
        },
        shutdown_rx.clone(),
    ));
    let logged_through = core.commit_index();
    let mut driver = Driver {
        core,
        peers,
        names,
        endpoint: endpoint.clone(),
        events: events_tx.clone(),
        senders: HashMap::new(),
        settings,
        ca,
        revoked,
        metrics: metrics.clone(),
        refusals,
        pending: HashMap::new(),
        caller: Arc::new(transport::Caller::new(&identity)?),
        logged_through,
        reads: Vec::new(),
        revocations,
        revoked_synced_at: 0,
        next_ctx: 0,
        demand: Vec::new(),
        ticks: 0,
        last_leader: None,
        started: Instant::now(),
        planned_without: Default::default(),
    };
    for p in driver.peers.clone() {
        driver.ensure_sender(&p);
    }
    let task = tokio::spawn(driver.run(events_rx, shutdown_rx));
    Ok(MemberHandle {
        local_addr,
        metrics,
        shutdown,
        task,
        endpoint,
    })
}

/// Coordinator names by raft id: only they may send raft messages.
type Names = Arc<std::sync::RwLock<HashMap<u64, String>>>;

/// What every connection is checked against.
#[derive(Clone)]
struct Gate {
    /// Coordinators by raft id.
    names: Names,
    metrics: Arc<ControlMetrics>,
    refusals: Refusals,
    revoked: Revoked,
    /// Bumped when the revocation list changes.
    revocations: watch::Receiver<u64>,
}

async fn accept_loop(
    ep: quinn::Endpoint,
    events: mpsc::Sender<Event>,
    gate: Gate,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let incoming = tokio::select! {
            i = ep.accept() => i,
            _ = shutdown.changed() => return,
        };
        let Some(incoming) = incoming else { return };
        let events = events.clone();
        let gate = gate.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    // failed handshakes: no or bad credentials
                    tracing::debug!("refused a connection: {e}");
                    gate.metrics.reject();
                    return;
                }
            };
            serve_connection(conn, events, gate).await;
        });
    }
}

async fn serve_connection(conn: quinn::Connection, events: mpsc::Sender<Event>, gate: Gate) {
    let Gate {
        names,
        metrics,
        refusals,
        revoked,
        mut revocations,
    } = gate;
    let peer = transport::peer_identity(&conn);
    let cert = transport::peer_cert(&conn);
    let remote = conn.remote_address();
    loop {
        tokio::select! {
            changed = revocations.changed() => {
                // a revocation committed: drop the connection if it is this peer's
                if changed.is_err() || cert.as_ref().is_some_and(|c| revoked.contains(c)) {
                    metrics.reject();
                    conn.close(2u32.into(), b"certificate revoked");
                    return;
                }
            }
            uni = conn.accept_uni() => {
                let Ok(mut recv) = uni else { return };
                // raft messages: only from a coordinator's certificate, checked
                // before a byte is read, and only in the name of the id they claim
                let coordinators: Vec<String> =
                    names.read().expect("names lock").values().cloned().collect();
                if !authz::may_send_raft(peer.as_ref(), &coordinators) {
                    refusals.refuse(peer.as_ref(), remote, "raft", "raft messages from a non-coordinator");
                    conn.close(1u32.into(), b"raft messages from a non-coordinator");
                    return;
                }
                let name = peer.as_ref().map(|p| p.name.clone());
                while let Ok(Some(body)) = read_frame(&mut recv, transport::MAX_FRAME).await {
                    let Ok(msg) = Message::parse_from_bytes(&body) else {
                        metrics.reject();
                        return;
                    };
                    let from = names.read().expect("names lock").get(&msg.from).cloned();
                    if from != name {
                        refusals.refuse(peer.as_ref(), remote, "raft", "a raft message in another coordinator's name");
                        conn.close(1u32.into(), b"raft messages from a non-coordinator");
                        return;
                    }
                    if events.send(Event::Raft(msg)).await.is_err() {
                        return;
                    }
                }
            }
            bi = conn.accept_bi() => {
                let Ok((mut send, mut recv)) = bi else { return };
                let events = events.clone();
                let peer = peer.clone();
                let metrics = metrics.clone();
                let refusals = refusals.clone();
                tokio::spawn(async move {
                    // nothing past a join request's size from a peer without credentials
                    let limit = if peer.is_some() { transport::MAX_FRAME } else { transport::UNAUTHENTICATED_FRAME };
                    let read = tokio::time::timeout(transport::REQUEST_READ_TIMEOUT, read_frame(&mut recv, limit));
                    let body = match read.await {
                        Ok(Ok(Some(b))) => b,
                        Ok(Ok(None)) => return,
                        // too long, or too slow to come
                        Ok(Err(_)) | Err(_) => {
                            metrics.reject();
                            return;
                        }
                    };
                    let reply = match serde_json::from_slice::<Request>(&body) {
                        Ok(req) => match authz::authorize(peer.as_ref(), &req) {
                            Err(message) => {
                                refusals.refuse(peer.as_ref(), remote, authz::request_kind(&req), &message);
                                Reply::Error { message }
                            }
                            Ok(()) => {
                                let (tx, rx) = oneshot::channel();
                                let ev = Event::Request { req, peer: peer.clone(), remote, reply: tx };
                                if events.send(ev).await.is_err() {
                                    return;
                                }
                                rx.await.unwrap_or(Reply::Error { message: "the coordinator stopped".into() })
                            }
                        },
                        Err(e) => {
                            metrics.reject();
                            Reply::Error { message: format!("bad request: {e}") }
                        }
                    };
                    let body = serde_json::to_vec(&reply).expect("replies serialize");
                    if write_frame(&mut send, &body).await.is_ok() {
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    }
                });
            }
        }
    }
}

async fn peer_sender(
    ep: quinn::Endpoint,
    peer: Peer,
    mut batches: mpsc::Receiver<Vec<Message>>,
    events: mpsc::Sender<Event>,
) {
    let mut conn: Option<quinn::Connection> = None;
    while let Some(batch) = batches.recv().await {
        let snapshot = batch
            .iter()
            .any(|m| m.get_msg_type() == MessageType::MsgSnapshot);
        let sent = send_batch(&ep, &peer, &mut conn, &batch).await;
        let event = match (sent, snapshot) {
            (true, true) => Some(Event::SnapshotSent { peer: peer.id }),
            (true, false) => None,
            (false, s) => Some(Event::Lost {
                peer: peer.id,
                snapshot: s,
            }),
        };
        if let Some(e) = event {
            if events.send(e).await.is_err() {
                return;
            }
        }
    }
}

async fn send_batch(
    ep: &quinn::Endpoint,
    peer: &Peer,
    conn: &mut Option<quinn::Connection>,
    batch: &[Message],
) -> bool {
    for attempt in 0..2 {
        if conn.as_ref().is_none_or(|c| c.close_reason().is_some()) {
            let Ok(addr) = crate::transport::resolve(&peer.addr).await else {
                return false;
            };
            let connecting = match ep.connect(addr, &crate::credentials::dns_name(&peer.name)) {
                Ok(c) => c,
                Err(_) => return false,
            };
            match tokio::time::timeout(Duration::from_secs(2), connecting).await {
                Ok(Ok(c)) => *conn = Some(c),
                _ => return false,
            }
        }
        let c = conn.as_ref().expect("connected above");
        let send = async {
            let mut s = c.open_uni().await.ok()?;
            for m in batch {
                let body = m.write_to_bytes().ok()?;
                write_frame(&mut s, &body).await.ok()?;
            }
            s.finish().ok()
        };
        // a peer that stops reading holds the batch no longer than this
        let ok = tokio::time::timeout(transport::REQUEST_READ_TIMEOUT, send)
            .await
            .ok()
            .flatten()
            .is_some();
        if ok {
            return true;
        }
        *conn = None;
        if attempt == 1 {
            break;
        }
    }
    false
}

struct Pending {
    reply: oneshot::Sender<Reply>,
    since: Instant,
    then: Then,
}

enum Then {
    /// Reply `Committed`.
    Committed,
    /// Reply `Joined` with this certificate; a refusal (the token was
    /// used meanwhile) is logged against the joiner.
    Joined {
        cert_pem: String,
        ca_pem: String,
        peer: Option<PeerIdentity>,
        remote: SocketAddr,
    },
    /// An operator's re-plan proposing epoch `epoch`: if another plan
    /// committed first (the re-planning loop's), plan again on top of it.
    Replan { epoch: u64, tries: u32 },
}

/// Times an operator's re-plan is planned again after losing a race.
const REPLAN_TRIES: u32 = 3;

/// A linearizable read in flight.
struct Read {
    ctx: Vec<u8>,
    /// The commit index raft confirmed for it (none yet).
    index: Option<u64>,
    since: Instant,
    reply: oneshot::Sender<Reply>,
}

/// How long a read waits for raft to confirm leadership. Shorter than a
/// caller's attempt, so the caller hears "retry" rather than silence: raft
/// drops read requests it cannot serve (a new leader that has not yet
/// committed in its term, a leader losing its quorum).
const READ_TIMEOUT: Duration = Duration::from_millis(700);

struct Driver {
    core: Coordinator,
    /// Entries up to this index were committed before this start: their
    /// records are in the log already.
    logged_through: u64,
    /// Sends this member's own checkpoints to the leader.
    caller: Arc<transport::Caller>,
    /// Every coordinator this member knows (configured and added).
    peers: Vec<Peer>,
    names: Names,
    endpoint: quinn::Endpoint,
    events: mpsc::Sender<Event>,
    settings: MemberSettings,
    ca: Option<ClusterCa>,
    revoked: Revoked,
    metrics: Arc<ControlMetrics>,
    refusals: Refusals,
    senders: HashMap<u64, mpsc::Sender<Vec<Message>>>,
    pending: HashMap<Vec<u8>, Pending>,
    /// Reads waiting for raft to confirm their index, then for that index
    /// to be applied.
    reads: Vec<Read>,
    /// Bumped when the revocation list changes, so connections re-check.
    revocations: watch::Sender<u64>,
    /// Applied index when the revocation list was last copied (0: never).
    revoked_synced_at: u64,
    next_ctx: u64,
    demand: Vec<(String, String, Demand)>,
    ticks: u64,
    last_leader: Option<u64>,
    started: Instant,
    /// The members the last placement this leader proposed was planned
    /// without (not heard from then): once one is heard again, it is planned
    /// again, or a node that joined just after a re-plan would wait forever.
    planned_without: std::collections::BTreeSet<u64>,
}

impl Driver {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<()> {
        let mut tick = tokio::time::interval(self.settings.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut checkpoint = tokio::time::interval(self.settings.checkpoint_every);
        checkpoint.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.core.tick();
                    self.ticks += 1;
                    self.expire();
                    if self.ticks.is_multiple_of(self.settings.replan_ticks) {
                        self.maybe_replan();
                    }
                }
                _ = checkpoint.tick() => {
                    self.refusals.checkpoint(weft_audit::reason::INTERVAL);
                    // the latest, until the replicated state holds it
                    // (a proposal may be lost to a leader change)
                    if let Some(cp) = self.refusals.latest() {
                        let held = self.core.state().checkpoints.get(&cp.node).map(|n| n.latest.seq);
                        if held.is_none_or(|h| h < cp.seq) {
                            self.commit_checkpoint(cp);
                        }
                    }
                }
                e = events.recv() => {
                    let Some(e) = e else { return Ok(()) };
                    self.event(e);
                    // take whatever else is queued before processing once
                    while let Ok(e) = events.try_recv() {
                        self.event(e);
                    }
                }
                _ = shutdown.changed() => {
                    // the log ends signed (the coordinators may be gone by now)
                    if let Some(cp) = self.refusals.checkpoint(weft_audit::reason::SHUTDOWN) {
                        self.commit_checkpoint(cp);
                        let _ = self.process().await;
                    }
                    return Ok(());
                }
            }
            self.process().await?;
        }
    }

    /// Commits a checkpoint of this member's own control log: proposed
    /// here on the leader, else sent to the coordinators as any member's
    /// (they check it is this member's own, signed with its certificate).
    fn commit_checkpoint(&mut self, cp: weft_audit::Checkpoint) {
        if self.core.is_leader() {
            if let Err(e) = self.core.propose(&Command::Checkpoint(cp)) {
                tracing::debug!("the control log's checkpoint was not proposed: {e}");
            }
            return;
        }
        let (caller, peers) = (self.caller.clone(), self.peers.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::checkpoints::commit(&caller, &peers, cp).await {
                tracing::debug!("the control log's checkpoint was not committed: {e:#}");
            }
        });
    }

    fn peer(&self, id: Option<u64>) -> Option<&Peer> {
        let id = id?;
        self.peers.iter().find(|p| p.id == id)
    }

    /// Starts a sender task for `p` unless there is one (or it is us).
    fn ensure_sender(&mut self, p: &Peer) {
        if p.id == self.settings.id || self.senders.contains_key(&p.id) {
            return;
        }
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(peer_sender(
            self.endpoint.clone(),
            p.clone(),
            rx,
            self.events.clone(),
        ));
        self.senders.insert(p.id, tx);
    }

    /// Follows a change of the voting coordinators: learns where added ones
    /// are, stops sending to removed ones.
    fn reconcile_coordinators(&mut self) {
        let records = self.core.state().coordinators.clone();
        for r in records.values() {
            if self.peers.iter().any(|p| p.id == r.id) {
                continue;
            }
            {
                let p = Peer {
                    id: r.id,
                    name: r.name.clone(),
                    addr: r.addr.clone(),
                };
                self.names
                    .write()
                    .expect("names lock")
                    .insert(p.id, p.name.clone());
                self.peers.push(p.clone());
                self.ensure_sender(&p);
            }
        }
        let voters = self.core.voters();
        self.senders.retain(|id, _| voters.contains(id));
        for p in self.peers.clone() {
            if voters.contains(&p.id) {
                self.ensure_sender(&p);
            }
        }
    }

    fn ctx(&mut self) -> Vec<u8> {
        self.next_ctx += 1;
        let mut c = self.settings.id.to_be_bytes().to_vec();
        c.extend_from_slice(&self.next_ctx.to_be_bytes());
        c
    }

    fn not_leader(&self) -> Reply {
        let p = self.peer(self.core.leader());
        Reply::NotLeader {
            leader: p.map(|p| p.addr.clone()),
            leader_name: p.map(|p| p.name.clone()),
        }
    }

    /// Plans for the operator's demand from the current state and proposes it.
    fn replan(&mut self, reply: oneshot::Sender<Reply>, tries: u32) {
        let links = self.measured_links();
        let next = self.core.state().plan_next_measured(
            &self.demand,
            &self.settings.solver,
            &Default::default(),
            &links,
        );
        let epoch = next.epoch;
        let proposed = self.propose(
            &Command::CommitPlacement(next),
            reply,
            Then::Replan { epoch, tries },
        );
        if proposed && tries == 1 {
            self.metrics.replanned("operator");
        }
    }

    /// Proposes `cmd`, answering `reply` once it commits; whether it was
    /// proposed.
    fn propose(&mut self, cmd: &Command, reply: oneshot::Sender<Reply>, then: Then) -> bool {
        if !self.core.is_leader() {
            let _ = reply.send(self.not_leader());
            return false;
        }
        let ctx = self.ctx();
        match self.core.propose_with(ctx.clone(), cmd) {
            Ok(()) => {
                self.pending.insert(
                    ctx,
                    Pending {
                        reply,
                        since: Instant::now(),
                        then,
                    },
                );
                true
            }
            Err(e) => {
                let _ = reply.send(Reply::Error {
                    message: e.to_string(),
                });
                false
            }
        }
    }

    fn event(&mut self, e: Event) {
        match e {
            Event::Raft(m) => {
                if let Err(e) = self.core.step(m) {
                    tracing::warn!("raft step: {e}");
                }
            }
            Event::Lost { peer, snapshot } => {
                if snapshot {
                    self.core.report_snapshot(peer, false);
                } else {
                    self.core.report_unreachable(peer);
                }
            }
            Event::SnapshotSent { peer } => self.core.report_snapshot(peer, true),
            Event::Request {
                req,
                peer,
                remote,
                reply,
            } => self.request(req, peer, remote, reply),
        }
    }

    fn request(
        &mut self,
        req: Request,
        peer: Option<PeerIdentity>,
        remote: SocketAddr,
        reply: oneshot::Sender<Reply>,
    ) {
        match req {
            Request::Propose { command } => {
                self.propose(&command, reply, Then::Committed);
            }
            Request::Replan { demand } => {
                if !self.core.is_leader() {
                    let _ = reply.send(self.not_leader());
                    return;
                }
                self.demand = demand;
                self.replan(reply, 1);
            }
            Request::AddCoordinator { peer } => {
                if !self.core.is_leader() {
                    let _ = reply.send(self.not_leader());
                    return;
                }
                let record = weft_coordinator::CoordinatorRecord {
                    id: peer.id,
                    name: peer.name.clone(),
                    addr: peer.addr.to_string(),
                };
                let r = self.core.change_voter_with(peer.id, true, Some(record));
                let _ = reply.send(proposed(r));
            }
            Request::RemoveCoordinator { id } => {
                if !self.core.is_leader() {
                    let _ = reply.send(self.not_leader());
                    return;
                }
                let r = self.core.change_voter(id, false);
                let _ = reply.send(proposed(r));
            }
            Request::Status => {
                if !self.core.is_leader() {
                    let _ = reply.send(self.not_leader());
                    return;
                }
                if !self.core.can_serve_reads() {
                    // a new leader: raft would drop the read until it has
                    // committed in its term, which takes one round trip
                    let _ = reply.send(Reply::Error {
                        message: "the new leader has not committed in its term yet; retry".into(),
                    });
                    return;
                }
                let ctx = self.ctx();
                self.core.read_index(ctx.clone());
                self.reads.push(Read {
                    ctx,
                    index: None,
                    since: Instant::now(),
                    reply,
                });
            }
            Request::Join {
                token,
                csr_pem,
                member,
            } => {
                let Some(ca) = &self.ca else {
                    let _ = reply.send(Reply::Error {
                        message: "this coordinator does not hold the cluster CA".into(),
                    });
                    return;
                };
                if !self.core.is_leader() {
                    let _ = reply.send(self.not_leader());
                    return;
                }
                let now = now_unix();
                let used = &self.core.state().tokens_used;
                let signed = check_join(ca, used, &token, &csr_pem, &member, now);
                match signed {
                    Ok((claims, cert_pem)) => {
                        let member = Member {
                            id: member_id(&claims.name),
                            name: claims.name,
                            ..member
                        };
                        let ca_pem = ca.cert_pem().to_string();
                        self.propose(
                            &Command::Join {
                                member,
                                nonce: claims.nonce,
                                expires: claims.expires,
                                now,
                            },
                            reply,
                            Then::Joined {
                                cert_pem,
                                ca_pem,
                                peer: peer.clone(),
                                remote,
                            },
                        );
                    }
                    Err(message) => {
                        self.refusals
                            .refuse(peer.as_ref(), remote, "join", &message);
                        let _ = reply.send(Reply::Error { message });
                    }
                }
            }
        }
    }

    fn maybe_replan(&mut self) {
        if !self.core.is_leader() {
            return;
        }
        let state = self.core.state();
        if self.demand.is_empty() {
            // a new leader starts from the demand the last epoch was planned for
            if let Some(p) = &state.placement {
                self.demand = p.demand.clone();
            }
        }
        // what the operator planned for, and what the nodes measure elsewhere
        let mut demand = self.demand.clone();
        let links = self.measured_links();
        if let Some(live) = &self.settings.live {
            let table = live.read().expect("routing table lock");
            demand.extend(measured_demand(&table, &self.demand, state));
        }
        let demand_rps: f64 = demand.iter().map(|d| d.2.requests_per_s).sum();
        let down = self.down_members();
        let back = self.planned_without.iter().any(|id| !down.contains(id));
        let cause = state
            .replan_cause(demand_rps, self.settings.replan_band)
            .or_else(|| state.placement_uses(&down).then_some("member_down"))
            .or_else(|| back.then_some("member_up"));
        if let Some(cause) = cause {
            if !down.is_empty() {
                tracing::info!(?down, "re-planning without members not heard from");
            }
            let next = state.plan_next_measured(&demand, &self.settings.solver, &down, &links);
            match self.core.propose(&Command::CommitPlacement(next)) {
                Ok(()) => {
                    self.metrics.replanned(cause);
                    self.planned_without = down;
                }
                Err(e) => tracing::debug!("re-plan not proposed: {e}"),
            }
        }
    }

    /// Round trips between sites the nodes measured (none without an
    /// overlay).
    fn measured_links(&self) -> Vec<weft_coordinator::SiteLink> {
        self.settings
            .live
            .as_ref()
            .map(|t| measured_links(&t.read().expect("routing table lock")))
            .unwrap_or_default()
    }

    /// Members the overlay has not heard from (none until the overlay has
    /// had time to hear everyone).
    fn down_members(&self) -> std::collections::BTreeSet<u64> {
        let Some(live) = &self.settings.live else {
            return Default::default();
        };
        if self.started.elapsed() < crate::overlay::NODE_TIMEOUT * 3 {
            return Default::default();
        }
        let table = live.read().expect("routing table lock");
        self.core
            .state()
            .members
            .values()
            .filter(|m| !table.nodes.contains_key(&m.name))
            .map(|m| m.id)
            .collect()
    }

    fn expire(&mut self) {
        let timeout = self.settings.propose_timeout;
        let late: Vec<Vec<u8>> = self
            .pending
            .iter()
            .filter(|(_, p)| p.since.elapsed() > timeout)
            .map(|(k, _)| k.clone())
            .collect();
        for k in late {
            if let Some(p) = self.pending.remove(&k) {
                let _ = p.reply.send(Reply::Error {
                    message: "not committed in time (leadership may have changed); retry".into(),
                });
            }
        }
        // reads whose leadership lapsed, or that raft never confirmed
        if !self.core.is_leader() {
            for r in std::mem::take(&mut self.reads) {
                let _ = r.reply.send(self.not_leader());
            }
        }
        let (late, waiting): (Vec<Read>, Vec<Read>) = std::mem::take(&mut self.reads)
            .into_iter()
            .partition(|r| r.index.is_none() && r.since.elapsed() > READ_TIMEOUT);
        self.reads = waiting;
        for r in late {
            let _ = r.reply.send(Reply::Error {
                message: "leadership not confirmed in time; retry".into(),
            });
        }
    }

    async fn process(&mut self) -> Result<()> {
        let out = self.core.process()?;
        let mut by_peer: BTreeMap<u64, Vec<Message>> = BTreeMap::new();
        for m in out.messages {
            by_peer.entry(m.to).or_default().push(m);
        }
        for (to, batch) in by_peer {
            match self.senders.get(&to) {
                Some(tx) => {
                    if tx.try_send(batch).is_err() {
                        self.core.report_unreachable(to);
                    }
                }
                None => self.core.report_unreachable(to),
            }
        }
        for a in &out.applied {
            // entries replayed after a restart were logged before it
            if let Some(c) = a.command.as_ref().filter(|_| a.index > self.logged_through) {
                self.refusals.applied(a.index, c, &a.result);
            }
            if let Some(p) = self.pending.remove(&a.context) {
                self.metrics
                    .commit_latency
                    .observe(p.since.elapsed().as_secs_f64());
                let refused = match &a.result {
                    Applied::Refused(why) => Some(why.clone()),
                    Applied::Done => None,
                };
                let reply = match (p.then, refused) {
                    (
                        Then::Joined {
                            cert_pem, ca_pem, ..
                        },
                        None,
                    ) => Reply::Joined { cert_pem, ca_pem },
                    (Then::Joined { peer, remote, .. }, Some(message)) => {
                        self.refusals
                            .refuse(peer.as_ref(), remote, "join", &message);
                        Reply::Error { message }
                    }
                    (Then::Replan { epoch, tries }, Some(_))
                        if tries < REPLAN_TRIES && self.core.state().epoch() >= epoch =>
                    {
                        // another plan took this epoch number first
                        self.replan(p.reply, tries + 1);
                        continue;
                    }
                    (_, refused) => Reply::Committed {
                        index: a.index,
                        refused,
                    },
                };
                let _ = p.reply.send(reply);
            }
        }
        for (ctx, index) in out.reads {
            if let Some(r) = self.reads.iter_mut().find(|r| r.ctx == ctx) {
                r.index = Some(index);
            }
        }
        let applied = self.core.state().applied_index;
        let (ready, waiting): (Vec<Read>, Vec<Read>) = std::mem::take(&mut self.reads)
            .into_iter()
            .partition(|r| r.index.is_some_and(|i| i <= applied));
        self.reads = waiting;
        for r in ready {
            let _ = r.reply.send(Reply::Status(Box::new(self.status())));
        }
        if out.applied.iter().any(|a| a.command.is_none()) || out.installed_snapshot.is_some() {
            self.reconcile_coordinators();
        }
        let revoked_now = out
            .applied
            .iter()
            .any(|a| matches!(a.command, Some(Command::Revoke { .. })))
            || out.installed_snapshot.is_some();
        if revoked_now || (self.revoked_synced_at == 0 && !out.applied.is_empty()) {
            self.revoked.set(self.core.state().revoked.iter().cloned());
            self.revocations.send_modify(|g| *g += 1);
            self.revoked_synced_at = self.core.state().applied_index;
        }
        self.update_metrics();
        Ok(())
    }

    fn status(&self) -> StatusReport {
        StatusReport {
            id: self.core.id(),
            leader: self.core.leader(),
            term: self.core.term(),
            commit: self.core.commit_index(),
            voters: self.core.voters(),
            state: self.core.state().clone(),
            load: self
                .settings
                .live
                .as_ref()
                .map(|t| {
                    let t = t.read().expect("routing table lock");
                    t.nodes
                        .iter()
                        .map(|(name, e)| {
                            let live = crate::transport::LiveLoad {
                                report: e.report.clone(),
                                age_ms: e.seen.elapsed().as_millis() as u64,
                                rtt_ms: t.rtt_to(name).map(|d| d.as_secs_f64() * 1e3),
                            };
                            (name.clone(), live)
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    fn update_metrics(&mut self) {
        let leader = self.core.leader();
        let m = &self.metrics;
        if leader != self.last_leader {
            if leader.is_some() {
                m.leader_changes.inc();
            }
            self.last_leader = leader;
        }
        m.term.set(self.core.term() as i64);
        m.is_leader.set(i64::from(self.core.is_leader()));
        m.commit_index.set(self.core.commit_index() as i64);
        m.log_entries.set(self.core.log_len() as i64);
        m.epoch.set(self.core.state().epoch() as i64);
        m.members.set(self.core.state().members.len() as i64);
    }
}

/// Checks a join request as the leader does before proposing it: the
/// token is this cluster's, unexpired, issued for the member's name and
/// not among those `used`; then signs the certificate request for the
/// token's name and role. Returns the token's claims and the certificate.
pub fn check_join(
    ca: &ClusterCa,
    used: &BTreeMap<String, u64>,
    token: &str,
    csr_pem: &str,
    member: &Member,
    now: u64,
) -> Result<(crate::credentials::TokenClaims, String), String> {
    let claims = ca.check_token(token, now).map_err(|e| e.to_string())?;
    if claims.name != member.name {
        return Err(format!(
            "this token is for node {:?}, not {:?}",
            claims.name, member.name
        ));
    }
    if used.contains_key(&claims.nonce) {
        return Err("this join token was already used".into());
    }
    let cert = ca
        .sign_request(csr_pem, &claims.name, claims.role)
        .map_err(|e| e.to_string())?;
    Ok((claims, cert))
}

/// How long a joining node keeps trying to reach a coordinator leader.
pub const JOIN_PATIENCE: Duration = Duration::from_secs(30);

/// Joins a cluster: sends `token` and a certificate request for `member`
/// to the coordinator at `addr` (named `coordinator`), following a redirect
/// to the leader once; returns the node's identity.
pub async fn join(
    addr: &str,
    coordinator: &str,
    token: &str,
    member: Member,
) -> Result<NodeIdentity> {
    let claims = crate::credentials::TokenClaims::peek(token)?;
    if claims.name != member.name {
        anyhow::bail!(
            "this join token is for node {:?}, but this node is named {:?}: give it the name the token was issued for",
            claims.name,
            member.name
        );
    }
    let (key_pem, csr_pem) = crate::credentials::new_request(&member.name)?;
    let name = member.name.clone();
    let req = Request::Join {
        token: token.to_string(),
        csr_pem,
        member,
    };
    let ep = quinn::Endpoint::client("0.0.0.0:0".parse().expect("valid address"))?;
    let config = transport::joiner_config(&claims.ca)?;
    let first = (addr.to_string(), coordinator.to_string());
    let mut target = first.clone();
    // coordinators may still be electing a leader when a node starts
    let deadline = Instant::now() + JOIN_PATIENCE;
    while Instant::now() < deadline {
        let sent = match transport::resolve(&target.0).await {
            Ok(sa) => transport::request(&ep, Some(config.clone()), sa, &target.1, &req).await,
            Err(e) => Err(e),
        };
        let reply = match sent {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("join attempt at {}: {e}", target.0);
                target = first.clone();
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        match reply {
            Reply::Joined { cert_pem, ca_pem } => {
                if crate::credentials::fingerprint(
                    &rustls::pki_types::pem::PemObject::from_pem_slice(ca_pem.as_bytes())
                        .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
                        .unwrap_or_default(),
                ) != claims.ca
                {
                    anyhow::bail!("the coordinator sent a CA that does not match the token");
                }
                return Ok(NodeIdentity::from_pem(&name, &cert_pem, &key_pem, &ca_pem)?);
            }
            Reply::NotLeader {
                leader: Some(l),
                leader_name: Some(n),
            } => target = (l, n),
            Reply::NotLeader { .. } => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Reply::Error { message } => anyhow::bail!("join refused: {message}"),
            other => anyhow::bail!("unexpected reply to a join: {other:?}"),
        }
    }
    anyhow::bail!("no coordinator leader answered the join")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::{Entry, LoadReport, RoutingTable};

    /// (node, site, round trips to others, demand by model)
    type Said<'a> = (&'a str, &'a str, &'a [(&'a str, f64)], &'a [(&'a str, f64)]);

    fn table(reports: &[Said]) -> RoutingTable {
        let mut t = RoutingTable::default();
        for (node, site, rtts, demand) in reports {
            let report = LoadReport {
                node: node.to_string(),
                site: site.to_string(),
                rtt_ms: rtts.iter().map(|(n, r)| (n.to_string(), *r)).collect(),
                demand: demand.iter().map(|(m, r)| (m.to_string(), *r)).collect(),
                ..Default::default()
            };
            t.nodes.insert(
                node.to_string(),
                Entry {
                    report,
                    seen: Instant::now(),
                    peer: libp2p::PeerId::random(),
                },
            );
        }
        t
    }

    #[test]
    fn site_round_trips_are_the_median_of_what_nodes_measured_across_sites() {
        let t = table(&[
            (
                "a1",
                "edge-a",
                &[("a2", 0.1), ("c1", 40.0), ("c2", 44.0)],
                &[],
            ),
            ("a2", "edge-a", &[("a1", 0.1), ("c1", 90.0)], &[]),
            ("c1", "cloud", &[("a1", 41.0), ("gone", 5.0)], &[]),
            ("c2", "cloud", &[], &[]),
        ]);
        let links = measured_links(&t);
        // same-site samples and nodes no longer in the table are left out
        assert_eq!(links.len(), 1, "{links:?}");
        assert_eq!(
            (links[0].a.as_str(), links[0].b.as_str()),
            ("cloud", "edge-a")
        );
        // samples 40, 44, 90, 41: the upper median
        assert_eq!(links[0].rtt_ms, 44.0);
    }

    /// What `measured_demand` makes of three nodes' reports at two sites
    /// (with noise and an unknown model) and a figure the operator pinned
    /// for `n` at edge-b: (site, model, requests/s).
    fn measured() -> Vec<(String, String, f64)> {
        let mut state = weft_coordinator::ControlState::default();
        for name in ["m", "n"] {
            state.models.insert(
                name.into(),
                weft_coordinator::ModelRecord {
                    chunk_bytes: 0,
                    chunk_sha256: Vec::new(),
                    sites: Vec::new(),
                    source: "default".into(),
                    sha256: String::new(),
                    spec: weft_placement::ModelSpec {
                        name: name.into(),
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
                },
            );
        }
        let t = table(&[
            (
                "a1",
                "edge-a",
                &[],
                &[("m", 2.0), ("n", 0.2), ("unknown", 9.0)],
            ),
            ("a2", "edge-a", &[], &[("m", 3.0)]),
            ("b1", "edge-b", &[], &[("m", 4.0), ("n", 7.0)]),
        ]);
        let pinned = vec![(
            "edge-b".to_string(),
            "n".to_string(),
            Demand {
                site: weft_placement::SiteId(0),
                model: weft_placement::ModelId(0),
                requests_per_s: 1.0,
                prompt_tokens: 1.0,
                output_tokens: 1.0,
                deadline_ms: None,
            },
        )];
        measured_demand(&t, &pinned, &state)
            .into_iter()
            .map(|(s, m, d)| (s, m, d.requests_per_s))
            .collect()
    }

    #[test]
    fn measured_demand_sums_what_the_nodes_of_a_site_saw() {
        let d = measured();
        let of = |site: &str| {
            d.iter()
                .find(|(s, m, _)| s == site && m == "m")
                .map(|x| x.2)
        };
        assert_eq!(of("edge-a"), Some(5.0), "{d:?}");
        assert_eq!(of("edge-b"), Some(4.0), "{d:?}");
    }

    #[test]
    fn a_demand_the_operator_pinned_is_not_replaced_by_a_measured_one() {
        let d = measured();
        assert!(
            !d.iter().any(|(s, m, _)| s == "edge-b" && m == "n"),
            "{d:?}"
        );
    }

    #[test]
    fn measured_demand_below_the_noise_floor_or_for_unknown_models_is_dropped() {
        let d = measured();
        assert!(
            !d.iter().any(|(s, m, _)| s == "edge-a" && m == "n"),
            "{d:?}"
        );
        assert!(!d.iter().any(|(_, m, _)| m == "unknown"), "{d:?}");
    }
}
