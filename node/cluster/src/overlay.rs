//! The overlay (libp2p over QUIC): every node gossips a load report about
//! every [`REPORT_EVERY`], and keeps a routing table of the reports it
//! heard. A node silent for [`NODE_TIMEOUT`] leaves the table. Ping samples
//! give round-trip times for the router's link estimates; peers are found by
//! mDNS on a LAN and by static bootstrap addresses.
//!
//! Nodes also announce themselves on a membership topic when they join and
//! when they stop cleanly; a leaving node is dropped at once.
//!
//! Only credentialed nodes take part: every message is signed with the
//! sender's cluster key and carries its certificate; a report whose
//! certificate is not from the cluster CA, is revoked, names another node,
//! or whose signature fails is rejected (gossipsub stops relaying it and
//! scores the peer down) and counted.
//!
//! Replays: every message carries its sender's time. One older than
//! [`REPLAY_WINDOW`] (or that far in the future), or not newer than the
//! last one accepted from that node on that topic, is dropped and counted
//! ([`Inbox`]): a recorded report or goodbye cannot be played again.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageAuthenticity, ValidationMode};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, mdns, ping};
pub use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::credentials::{verify_signature, NodeIdentity, Revoked};
use weft_metrics::{IntCounter, IntGauge};

/// How often a node gossips its load.
pub const REPORT_EVERY: Duration = Duration::from_millis(400);
/// A node not heard from for this long leaves the routing table.
pub const NODE_TIMEOUT: Duration = Duration::from_millis(1200);
/// The gossip topic of load reports.
pub const LOAD_TOPIC: &str = "weft/load/1";
/// The gossip topic of membership events.
pub const MEMBER_TOPIC: &str = "weft/members/1";
/// How long a stopping node keeps its swarm running so its goodbye leaves.
const GOODBYE: Duration = Duration::from_millis(300);
/// Largest gossip message accepted.
pub const MAX_MESSAGE: usize = 64 << 10;
/// How far a message's time may be from this node's clock (either way)
/// before it is dropped as stale: nodes' clocks must agree this well.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(30);

/// What a node says about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Its node name.
    pub node: String,
    /// Its site.
    pub site: String,
    /// Its cluster address.
    pub address: String,
    /// Where its data plane takes forwarded requests (empty: it does not).
    #[serde(default)]
    pub data_address: String,
    /// Unix time of the report (ms), by the sender's clock.
    pub at_unix_ms: u64,
    /// Requests waiting.
    pub queue_depth: u32,
    /// Sequences decoding.
    pub running: u32,
    /// Aggregate decode tokens/s now.
    pub tokens_per_s: f64,
    /// KV-cache tokens free.
    pub free_kv_tokens: u64,
    /// Models (and layer ranges) loaded, e.g. `gemma[0..18)`.
    pub models: Vec<String>,
    /// Requests per second arriving at this node, by model (smoothed).
    #[serde(default)]
    pub demand: BTreeMap<String, f64>,
    /// Round trips (ms) this node measured to other nodes, by name.
    #[serde(default)]
    pub rtt_ms: BTreeMap<String, f64>,
    /// Its site's kind and region, for the class of the link to it.
    #[serde(default)]
    pub kind: weft_placement::SiteKind,
    /// Its site's region.
    #[serde(default)]
    pub region: u32,
    /// Sequences it batches.
    #[serde(default)]
    pub slots: u32,
    /// Aggregate decode tokens/s at full batch (its configured capacity).
    #[serde(default)]
    pub capacity_tokens_per_s: f64,
    /// Price per token.
    #[serde(default)]
    pub cost_per_token: f64,
    /// Names of the prompt prefixes it served lately (its KV cache likely
    /// holds them): see `weft_api::affinity`. At most a few hundred.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<u64>,
}

/// A change of membership a node announces about itself, signed like a
/// load report: it joined the overlay, or it is leaving (stopping cleanly),
/// so others drop it at once instead of waiting for [`NODE_TIMEOUT`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberEvent {
    /// The node.
    pub node: String,
    /// What happened.
    pub kind: MemberEventKind,
    /// Unix time (ms), by the sender's clock.
    pub at_unix_ms: u64,
}

/// What a [`MemberEvent`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemberEventKind {
    /// It joined the overlay.
    Joined,
    /// It is stopping.
    Leaving,
}

/// Signed payloads on the overlay's topics.
trait Signed: serde::de::DeserializeOwned {
    /// The node it is about (must be the signer).
    fn node(&self) -> &str;
    /// When the sender made it (unix ms, its clock).
    fn at(&self) -> u64;
}

impl Signed for LoadReport {
    fn node(&self) -> &str {
        &self.node
    }
    fn at(&self) -> u64 {
        self.at_unix_ms
    }
}

impl Signed for MemberEvent {
    fn node(&self) -> &str {
        &self.node
    }
    fn at(&self) -> u64 {
        self.at_unix_ms
    }
}

#[derive(Serialize, Deserialize)]
struct SignedReport {
    /// The report, as signed.
    report: Vec<u8>,
    /// The sender's certificate (DER).
    cert: Vec<u8>,
    /// ECDSA P-256 over `report`.
    sig: Vec<u8>,
}

/// One node as the routing table knows it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its latest report.
    pub report: LoadReport,
    /// When that report arrived here.
    pub seen: Instant,
    /// Its overlay peer id.
    pub peer: PeerId,
}

/// Live nodes and measured round trips.
#[derive(Debug, Default)]
pub struct RoutingTable {
    /// Nodes by name.
    pub nodes: BTreeMap<String, Entry>,
    /// Round trips by peer.
    pub rtt: HashMap<PeerId, Duration>,
}

impl RoutingTable {
    /// Round trip to `node`, if measured.
    pub fn rtt_to(&self, node: &str) -> Option<Duration> {
        self.rtt.get(&self.nodes.get(node)?.peer).copied()
    }
}

/// The overlay's counters (registered in the node's registry by
/// [`OverlayMetrics::register`]).
#[derive(Debug, Clone)]
pub struct OverlayMetrics {
    /// Reports accepted.
    pub accepted: IntCounter,
    /// Messages rejected (bad or missing credentials, bad signature).
    pub rejected: IntCounter,
    /// Connected peers.
    pub peers: IntGauge,
    /// Nodes in the routing table.
    pub nodes: IntGauge,
    /// Membership events accepted: joined.
    pub joined: IntCounter,
    /// Membership events accepted: leaving.
    pub leaving: IntCounter,
    /// Messages dropped for a time outside [`REPLAY_WINDOW`].
    pub stale: IntCounter,
    /// Messages dropped for not being newer than the last from their node.
    pub replayed: IntCounter,
}

impl Default for OverlayMetrics {
    fn default() -> Self {
        let c = |name, help| IntCounter::new(name, help).expect("a valid name");
        let g = |name, help| IntGauge::new(name, help).expect("a valid name");
        Self {
            accepted: c("weft_overlay_reports_total", "load reports accepted"),
            rejected: c(
                "weft_overlay_rejected_total",
                "overlay messages rejected for bad or missing credentials",
            ),
            peers: g("weft_overlay_peers", "connected overlay peers"),
            nodes: g(
                "weft_overlay_nodes",
                "nodes in the routing table (this one included)",
            ),
            joined: c(
                "weft_overlay_joined_total",
                "membership events heard: a node joined",
            ),
            leaving: c(
                "weft_overlay_leaving_total",
                "membership events heard: a node left cleanly",
            ),
            stale: c(
                "weft_overlay_stale_total",
                "overlay messages dropped for a time outside the replay window",
            ),
            replayed: c(
                "weft_overlay_replayed_total",
                "overlay messages dropped for not being newer than the last from their node",
            ),
        }
    }
}

impl OverlayMetrics {
    /// Puts these metrics in `registry` (the node's one).
    pub fn register(&self, registry: &weft_metrics::Registry) {
        for c in [
            &self.accepted,
            &self.rejected,
            &self.joined,
            &self.leaving,
            &self.stale,
            &self.replayed,
        ] {
            weft_metrics::register(registry, c.clone());
        }
        weft_metrics::register(registry, self.peers.clone());
        weft_metrics::register(registry, self.nodes.clone());
    }
}

/// Which topic a message came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// [`LOAD_TOPIC`].
    Load,
    /// [`MEMBER_TOPIC`].
    Members,
}

/// Why a message was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dropped {
    /// Bad credentials, signature or payload.
    Rejected(String),
    /// Its time is outside the replay window.
    Stale,
    /// Not newer than the last accepted from its node.
    Replayed,
}

/// Checks gossiped messages and applies the ones that pass to the routing
/// table: credentials, signature, then freshness.
pub struct Inbox {
    identity: NodeIdentity,
    revoked: Revoked,
    /// The newest time accepted, by topic and node.
    last: HashMap<(Topic, String), u64>,
}

impl Inbox {
    /// An inbox checking against `identity`'s CA and `revoked`.
    pub fn new(identity: NodeIdentity, revoked: Revoked) -> Self {
        Self {
            identity,
            revoked,
            last: HashMap::new(),
        }
    }

    fn fresh(&mut self, topic: Topic, node: &str, at: u64, now_ms: u64) -> Result<(), Dropped> {
        let window = REPLAY_WINDOW.as_millis() as u64;
        if at.abs_diff(now_ms) > window {
            return Err(Dropped::Stale);
        }
        let last = self.last.entry((topic, node.to_string())).or_insert(0);
        if at <= *last {
            return Err(Dropped::Replayed);
        }
        *last = at;
        Ok(())
    }

    /// Takes message `data` from `topic` (relayed by overlay peer
    /// `source`) at `now_ms`: into `table` if it passes, counted in
    /// `metrics` either way.
    pub fn receive(
        &mut self,
        topic: Topic,
        data: &[u8],
        source: Option<PeerId>,
        now_ms: u64,
        table: &RwLock<RoutingTable>,
        metrics: &OverlayMetrics,
    ) -> Result<(), Dropped> {
        let r = self.admit(topic, data, source, now_ms, table, metrics);
        match &r {
            Ok(()) => {}
            Err(Dropped::Rejected(_)) => {
                metrics.rejected.inc();
            }
            Err(Dropped::Stale) => {
                metrics.stale.inc();
            }
            Err(Dropped::Replayed) => {
                metrics.replayed.inc();
            }
        }
        r
    }

    fn admit(
        &mut self,
        topic: Topic,
        data: &[u8],
        source: Option<PeerId>,
        now_ms: u64,
        table: &RwLock<RoutingTable>,
        metrics: &OverlayMetrics,
    ) -> Result<(), Dropped> {
        match topic {
            Topic::Members => {
                let e: MemberEvent =
                    check(data, &self.identity, &self.revoked).map_err(Dropped::Rejected)?;
                self.fresh(topic, e.node(), e.at(), now_ms)?;
                let mut t = table.write().expect("routing table lock");
                match e.kind {
                    MemberEventKind::Joined => {
                        tracing::info!(node = %e.node, "joined the overlay");
                        metrics.joined.inc();
                    }
                    MemberEventKind::Leaving => {
                        tracing::info!(node = %e.node, "left the overlay");
                        t.nodes.remove(&e.node);
                        metrics.leaving.inc();
                    }
                }
            }
            Topic::Load => {
                let r: LoadReport =
                    check(data, &self.identity, &self.revoked).map_err(Dropped::Rejected)?;
                self.fresh(topic, r.node(), r.at(), now_ms)?;
                if let Some(source) = source {
                    let mut t = table.write().expect("routing table lock");
                    t.nodes.insert(
                        r.node.clone(),
                        Entry {
                            report: r,
                            seen: Instant::now(),
                            peer: source,
                        },
                    );
                }
                metrics.accepted.inc();
            }
        }
        Ok(())
    }
}

/// How the overlay runs.
#[derive(Debug, Clone)]
pub struct OverlaySettings {
    /// Listen address, e.g. `/ip4/0.0.0.0/udp/7300/quic-v1`.
    pub listen: Multiaddr,
    /// Peers to dial at start (and again while disconnected).
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the LAN with mDNS.
    pub mdns: bool,
}

/// A running overlay.
pub struct Overlay {
    /// The routing table, updated as reports arrive and expire.
    pub table: Arc<RwLock<RoutingTable>>,
    /// Counters.
    pub metrics: Arc<OverlayMetrics>,
    /// This node's overlay peer id.
    pub peer_id: PeerId,
    /// Where it listens (once bound).
    pub listen_addrs: watch::Receiver<Vec<Multiaddr>>,
    report: watch::Sender<LoadReport>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Overlay {
    /// Replaces the report this node gossips.
    pub fn set_report(&self, r: LoadReport) {
        let _ = self.report.send(r);
    }

    /// Stops the overlay, telling the others this node is leaving.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Stops the overlay without a word, as a crash would.
    pub async fn abort(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    gossipsub: gossipsub::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Starts the overlay for `identity`, gossiping `report` (its `node` is
/// forced to the identity's name).
pub async fn start(
    settings: OverlaySettings,
    identity: NodeIdentity,
    revoked: Revoked,
    report: LoadReport,
) -> Result<Overlay> {
    let key = libp2p::identity::Keypair::generate_ed25519();
    let peer_id = key.public().to_peer_id();
    let mdns_on = settings.mdns;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_quic()
        .with_behaviour(|key| {
            let config = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(250))
                .validation_mode(ValidationMode::Strict)
                .validate_messages()
                .max_transmit_size(MAX_MESSAGE)
                .build()
                .map_err(|e| anyhow::anyhow!("gossipsub config: {e}"))?;
            let gossipsub =
                gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), config)
                    .map_err(|e| anyhow::anyhow!("gossipsub: {e}"))?;
            let identify =
                identify::Behaviour::new(identify::Config::new("/weft/1.0.0".into(), key.public()));
            let ping =
                ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(1)));
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config::default(),
                    key.public().to_peer_id(),
                )?)
            } else {
                None
            };
            Ok(Behaviour {
                gossipsub,
                identify,
                ping,
                mdns: mdns.into(),
            })
        })
        .map_err(|e| anyhow::anyhow!("overlay: {e}"))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
        .build();
    let topic = IdentTopic::new(LOAD_TOPIC);
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&topic)
        .context("subscribing to load reports")?;
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&IdentTopic::new(MEMBER_TOPIC))
        .context("subscribing to membership events")?;
    listen(&mut swarm, &settings.listen)?;
    for a in &settings.bootstrap {
        let _ = swarm.dial(a.clone());
    }
    let table = Arc::new(RwLock::new(RoutingTable::default()));
    let metrics = Arc::new(OverlayMetrics::default());
    let (report_tx, report_rx) = watch::channel(LoadReport {
        node: identity.name.clone(),
        ..report
    });
    let (stop, stop_rx) = watch::channel(false);
    let (addrs_tx, listen_addrs) = watch::channel(Vec::new());
    let task = tokio::spawn(run(
        swarm,
        topic,
        settings,
        identity,
        revoked,
        table.clone(),
        metrics.clone(),
        report_rx,
        stop_rx,
        addrs_tx,
    ));
    Ok(Overlay {
        table,
        metrics,
        peer_id,
        listen_addrs,
        report: report_tx,
        stop,
        task,
    })
}

/// Listens on `addr`. An unspecified address (`0.0.0.0`) makes libp2p
/// watch the host's interfaces through netlink multicast groups, which
/// some sandboxes refuse (gVisor: `bind` of a netlink socket to groups is
/// EACCES); there it listens on each of the interfaces' IPv4 addresses
/// instead, as they are at start (loopback only when there is nothing
/// else). An IPv6 unspecified address gets no such fallback.
fn listen<B: libp2p::swarm::NetworkBehaviour>(
    swarm: &mut libp2p::Swarm<B>,
    addr: &Multiaddr,
) -> Result<()> {
    use libp2p::multiaddr::Protocol;
    let mut parts = addr.iter();
    let unspecified = parts.next() == Some(Protocol::Ip4(std::net::Ipv4Addr::UNSPECIFIED));
    let why = if unspecified {
        interfaces_unwatchable()
    } else {
        None
    };
    let Some(why) = why else {
        swarm
            .listen_on(addr.clone())
            .with_context(|| format!("listening on {addr}"))?;
        return Ok(());
    };
    let rest: Vec<Protocol<'_>> = parts.collect();
    let all: Vec<std::net::Ipv4Addr> = if_addrs::get_if_addrs()
        .with_context(|| format!("listening on {addr}: listing the interfaces"))?
        .into_iter()
        .filter_map(|i| match i.ip() {
            std::net::IpAddr::V4(ip) => Some(ip),
            std::net::IpAddr::V6(_) => None,
        })
        .collect();
    // libp2p dials from a listener's socket: one bound to loopback (or a
    // link-local address) cannot reach a peer elsewhere
    let ips = routable_or_all(all);
    anyhow::ensure!(
        !ips.is_empty(),
        "listening on {addr}: interfaces cannot be watched ({why}) and none has an IPv4 address"
    );
    tracing::warn!(
        "the overlay cannot watch interfaces ({why}): for {addr} it listens on {ips:?}, the addresses they have now"
    );
    for ip in &ips {
        let mut each = Multiaddr::empty().with(Protocol::Ip4(*ip));
        for p in &rest {
            each = each.with(p.clone());
        }
        swarm
            .listen_on(each.clone())
            .with_context(|| format!("listening on {each} (for {addr})"))?;
    }
    Ok(())
}

/// The addresses of `all` a peer elsewhere can be reached from (not
/// loopback, not link-local); all of them when there are none such.
fn routable_or_all(all: Vec<std::net::Ipv4Addr>) -> Vec<std::net::Ipv4Addr> {
    let routable: Vec<std::net::Ipv4Addr> = all
        .iter()
        .copied()
        .filter(|ip| !ip.is_loopback() && !ip.is_link_local())
        .collect();
    if routable.is_empty() {
        all
    } else {
        routable
    }
}

/// Why this host's interfaces cannot be watched the way libp2p watches
/// them (a netlink socket bound to the address groups), if they cannot.
#[cfg(target_os = "linux")]
fn interfaces_unwatchable() -> Option<String> {
    use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
    /// RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
    const ADDRESS_GROUPS: u32 = 0x10 | 0x100;
    let mut s = match Socket::new(NETLINK_ROUTE) {
        Ok(s) => s,
        Err(e) => return Some(format!("a netlink socket: {e}")),
    };
    s.bind(&SocketAddr::new(0, ADDRESS_GROUPS))
        .err()
        .map(|e| format!("joining netlink's address groups: {e}"))
}

#[cfg(not(target_os = "linux"))]
fn interfaces_unwatchable() -> Option<String> {
    None
}

#[allow(clippy::too_many_arguments)]
async fn run(
    mut swarm: libp2p::Swarm<Behaviour>,
    topic: IdentTopic,
    settings: OverlaySettings,
    identity: NodeIdentity,
    revoked: Revoked,
    table: Arc<RwLock<RoutingTable>>,
    metrics: Arc<OverlayMetrics>,
    report: watch::Receiver<LoadReport>,
    mut stop: watch::Receiver<bool>,
    addrs: watch::Sender<Vec<Multiaddr>>,
) {
    let mut publish = tokio::time::interval(REPORT_EVERY);
    let mut expire = tokio::time::interval(Duration::from_millis(100));
    let mut redial = tokio::time::interval(Duration::from_secs(2));
    let members = IdentTopic::new(MEMBER_TOPIC);
    let mut announced = false;
    let mut inbox = Inbox::new(identity.clone(), revoked.clone());
    loop {
        tokio::select! {
            _ = stop.changed() => {
                // say goodbye, and let it leave before the swarm goes
                if let Some(bytes) = sign(&identity, &member_event(&identity, MemberEventKind::Leaving)) {
                    if swarm.behaviour_mut().gossipsub.publish(members.clone(), bytes).is_ok() {
                        let until = tokio::time::sleep(GOODBYE);
                        tokio::pin!(until);
                        loop {
                            tokio::select! {
                                _ = &mut until => break,
                                _ = swarm.select_next_some() => {}
                            }
                        }
                    }
                }
                return;
            }
            _ = publish.tick() => {
                let mut r = report.borrow().clone();
                r.node = identity.name.clone();
                r.at_unix_ms = now_ms();
                r.rtt_ms = {
                    let t = table.read().expect("routing table lock");
                    t.nodes
                        .iter()
                        .filter(|(n, _)| **n != r.node)
                        .filter_map(|(n, e)| t.rtt.get(&e.peer).map(|d| (n.clone(), d.as_secs_f64() * 1e3)))
                        .collect()
                };
                // this node is in its own table too: it is a routing candidate
                table.write().expect("routing table lock").nodes.insert(
                    r.node.clone(),
                    Entry { report: r.clone(), seen: Instant::now(), peer: *swarm.local_peer_id() },
                );
                let Some(bytes) = sign(&identity, &r) else { continue };
                // no peers yet is normal at start
                let _ = swarm.behaviour_mut().gossipsub.publish(topic.clone(), bytes);
                if !announced {
                    if let Some(bytes) = sign(&identity, &member_event(&identity, MemberEventKind::Joined)) {
                        announced = swarm.behaviour_mut().gossipsub.publish(members.clone(), bytes).is_ok();
                    }
                }
            }
            _ = expire.tick() => {
                let mut t = table.write().expect("routing table lock");
                t.nodes.retain(|_, e| e.seen.elapsed() < NODE_TIMEOUT);
                metrics.nodes.set(t.nodes.len() as i64);
            }
            _ = redial.tick() => {
                if swarm.connected_peers().next().is_none() {
                    for a in &settings.bootstrap {
                        let _ = swarm.dial(a.clone());
                    }
                }
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::NewListenAddr { .. } => {
                    let _ = addrs.send(swarm.listeners().cloned().collect());
                }
                SwarmEvent::ConnectionEstablished { .. } | SwarmEvent::ConnectionClosed { .. } => {
                    metrics.peers.set(swarm.connected_peers().count() as i64);
                }
                SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                    propagation_source,
                    message_id,
                    message,
                })) => {
                    let on = if message.topic == members.hash() { Topic::Members } else { Topic::Load };
                    let verdict = inbox.receive(on, &message.data, message.source, now_ms(), &table, &metrics);
                    let acceptance = match verdict {
                        Ok(()) => MessageAcceptance::Accept,
                        Err(Dropped::Rejected(why)) => {
                            tracing::debug!(peer = %propagation_source, "rejected an overlay message: {why}");
                            MessageAcceptance::Reject
                        }
                        // a replay may be an honest relay's late copy: not
                        // passed on, but not held against the relay
                        Err(Dropped::Stale | Dropped::Replayed) => MessageAcceptance::Ignore,
                    };
                    swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(&message_id, &propagation_source, acceptance);
                }
                SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, result: Ok(rtt), .. })) => {
                    table.write().expect("routing table lock").rtt.insert(peer, rtt);
                }
                SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                    for (peer, addr) in found {
                        if !swarm.is_connected(&peer) {
                            let _ = swarm.dial(addr);
                        }
                    }
                }
                _ => {}
            },
        }
    }
}

fn member_event(identity: &NodeIdentity, kind: MemberEventKind) -> MemberEvent {
    MemberEvent {
        node: identity.name.clone(),
        kind,
        at_unix_ms: now_ms(),
    }
}

/// `payload`, signed with this node's cluster key, with its certificate:
/// the bytes gossiped.
pub fn sign(identity: &NodeIdentity, payload: &impl Serialize) -> Option<Vec<u8>> {
    let body = serde_json::to_vec(payload).expect("overlay payloads serialize");
    let sig = identity.sign(&body).ok()?;
    let msg = SignedReport {
        report: body,
        cert: identity.cert_der().to_vec(),
        sig,
    };
    Some(serde_json::to_vec(&msg).expect("signed payloads serialize"))
}

/// Checks a gossiped message: a cluster certificate, not revoked, naming
/// the node the payload is about, and a good signature.
fn check<T: Signed>(data: &[u8], identity: &NodeIdentity, revoked: &Revoked) -> Result<T, String> {
    let m: SignedReport =
        serde_json::from_slice(data).map_err(|e| format!("not a signed message: {e}"))?;
    let name = identity
        .check_peer_cert(&m.cert, revoked)
        .map_err(|e| e.to_string())?
        .name;
    verify_signature(&m.cert, &m.report, &m.sig).map_err(|e| e.to_string())?;
    let r: T = serde_json::from_slice(&m.report).map_err(|e| format!("bad payload: {e}"))?;
    if r.node() != name {
        return Err(format!("a message about {:?} signed by {name:?}", r.node()));
    }
    Ok(r)
}

#[cfg(test)]
mod listen_tests {
    use super::routable_or_all;
    use std::net::Ipv4Addr;

    #[test]
    fn the_fallback_listens_on_no_loopback_address_when_another_is_there() {
        let pod = Ipv4Addr::new(10, 1, 2, 3);
        let got = routable_or_all(vec![
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::new(169, 254, 1, 1),
            pod,
        ]);
        assert_eq!(got, vec![pod]);
    }

    #[test]
    fn the_fallback_listens_on_loopback_when_nothing_else_is_there() {
        assert_eq!(
            routable_or_all(vec![Ipv4Addr::LOCALHOST]),
            vec![Ipv4Addr::LOCALHOST]
        );
    }
}
