//! Sending requests to peers: a request that lands on a node that does not
//! hold its model goes over QUIC (mutual TLS, cluster certificates) to a
//! peer that does, which runs it through its own API; the answer streams
//! back token by token. The [`Forwarder`] also opens chains' streams and
//! fetches model files from peers in sha256-checked chunks. Failing a
//! stream over to another replica is [`crate::failover`]'s; deciding where
//! a request goes is [`crate::routing`]'s.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tower::ServiceExt;
use weft_api::headers::{
    Forwarded, CRITICALITY_HEADER, DEADLINE_HEADER, REQUEST_ID_HEADER, TOKEN_IDS_HEADER,
};
use weft_api::AppState;
use weft_cluster::credentials::{self, NodeIdentity, Revoked};
use weft_cluster::overlay::{RoutingTable, NODE_TIMEOUT};
use weft_cluster::transport::{self, read_frame, write_frame};
use weft_coordinator::ModelRecord;
use weft_metrics::{IntCounter, IntCounterVec, Registry};
use weft_placement::LinkClass;

use crate::hop::Hop;
use crate::routing::{self, Target};
use crate::wire::{
    read_blob, write_blob, Head, ReplyHead, BODY_LIMIT, CHAIN_STEP_TIMEOUT, CHAIN_VERSION,
    CHAIN_VERSION_HEADER, CHUNK_FRAME, CHUNK_PATH, HEAD_LIMIT, REASON_HEADER, ROUTE_HEADER,
    SHARD_PATH,
};

/// How long the data plane waits on a peer, at each point a peer controls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting (the QUIC and TLS handshakes).
    pub connect: Duration,
    /// Opening a stream, sending a request, and hearing its reply's head
    /// (a stream's head comes at once; a whole answer's once it is done:
    /// see `whole`).
    pub reply_head: Duration,
    /// A whole (not streamed) answer, from the request to its last byte.
    pub whole: Duration,
    /// A transfer with nothing from the peer for this long (model chunks,
    /// a forwarded stream's frames).
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(2),
            reply_head: Duration::from_secs(10),
            whole: Duration::from_secs(600),
            idle: Duration::from_secs(30),
        }
    }
}
/// Request headers that travel with a forwarded request.
const CARRIED: &[&str] = &[
    "authorization",
    "content-type",
    CRITICALITY_HEADER,
    DEADLINE_HEADER,
];
/// A data-plane connection with no packet from the peer for this long is
/// dead; keep-alives go every [`DATA_KEEP_ALIVE`].
pub const DATA_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Keep-alive interval on data-plane connections.
pub const DATA_KEEP_ALIVE: Duration = Duration::from_millis(500);

/// A peer's answer: its chunks as they arrive.
pub(crate) type Chunks = mpsc::Receiver<Result<Bytes, std::io::Error>>;

/// Sends requests to the peers the router chooses, and keeps a forwarded
/// stream going when its peer dies: the stream resumes on another replica
/// from the tokens the client already has.
pub struct Forwarder {
    ep: quinn::Endpoint,
    table: Arc<RwLock<RoutingTable>>,
    pub(crate) me: String,
    conns: Mutex<HashMap<SocketAddr, quinn::Connection>>,
    /// How long it waits on peers.
    pub(crate) timeouts: Timeouts,
    /// This node's API, for a stream that fails over to this node.
    local: Mutex<Option<std::sync::Weak<AppState>>>,
    /// Bytes sent and received to peers, by link class ([`LinkClass::ALL`]
    /// order): the handles of `bytes_family`'s labels.
    pub(crate) bytes: Arc<[IntCounter; 4]>,
    bytes_family: IntCounterVec,
    /// Whether the router counts the prefill a node's cached prefix saves.
    prefix_routing: std::sync::atomic::AtomicBool,
    /// Model chunks fetched from peers, and those that failed their check.
    chunks: IntCounter,
    corrupt_chunks: IntCounter,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").field("me", &self.me).finish()
    }
}

/// A request on its way to a peer.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The API path.
    pub uri: String,
    /// The headers that travel with it.
    pub headers: Vec<(String, String)>,
    /// The JSON body.
    pub body: Bytes,
    /// How often it was forwarded before.
    pub hops: u32,
    /// Whether it asks for a stream.
    pub stream: bool,
}

impl Outgoing {
    /// The request as it arrived: `uri`, the carried subset of `headers`.
    pub fn new(uri: &str, headers: &HeaderMap, body: Bytes, hops: u32, stream: bool) -> Self {
        Self {
            uri: uri.into(),
            headers: CARRIED
                .iter()
                .filter_map(|k| Some((k.to_string(), headers.get(*k)?.to_str().ok()?.to_string())))
                .collect(),
            body,
            hops,
            stream,
        }
    }
}

impl Forwarder {
    /// A forwarder dialling with `identity`, choosing peers from `table`.
    pub fn new(identity: &NodeIdentity, table: Arc<RwLock<RoutingTable>>) -> anyhow::Result<Self> {
        let mut ep = quinn::Endpoint::client("0.0.0.0:0".parse().expect("an address"))?;
        let mut config = transport::client_config(identity, &Revoked::default())?;
        let mut t = quinn::TransportConfig::default();
        t.max_idle_timeout(Some(
            DATA_IDLE_TIMEOUT.try_into().expect("idle timeout fits"),
        ));
        t.keep_alive_interval(Some(DATA_KEEP_ALIVE));
        config.transport_config(Arc::new(t));
        ep.set_default_client_config(config);
        let bytes_family = IntCounterVec::new(
            weft_metrics::Opts::new(
                "weft_dataplane_bytes_total",
                "Bytes of forwarded requests and their answers, by link class.",
            ),
            &["link"],
        )
        .expect("a valid name");
        Ok(Self {
            timeouts: Timeouts::default(),
            ep,
            table,
            me: identity.name.clone(),
            conns: Mutex::default(),
            local: Mutex::default(),
            bytes: Arc::new(std::array::from_fn(|i| {
                bytes_family.with_label_values(&[link_name(LinkClass::ALL[i])])
            })),
            bytes_family,
            prefix_routing: std::sync::atomic::AtomicBool::new(true),
            chunks: IntCounter::new(
                "weft_model_chunks_fetched_total",
                "Model-file chunks fetched from peers and checked.",
            )
            .expect("a valid name"),
            corrupt_chunks: IntCounter::new(
                "weft_model_chunks_corrupt_total",
                "Chunks from peers that failed their sha256 (fetched again elsewhere).",
            )
            .expect("a valid name"),
        })
    }

    /// The same forwarder waiting on peers for `timeouts` instead.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Whether `t` is this node, or a peer that reported within `age`.
    pub(crate) fn reported_within(&self, t: &Target, age: Duration) -> bool {
        match t {
            Target::Local => true,
            Target::Peer { name, .. } => self.name_reported_within(name, age),
        }
    }

    /// Whether node `name` is this one or reported within `age`.
    pub(crate) fn name_reported_within(&self, name: &str, age: Duration) -> bool {
        name == self.me
            || self
                .table
                .read()
                .expect("routing table lock")
                .nodes
                .get(name)
                .is_some_and(|e| e.seen.elapsed() < age)
    }

    /// Bytes this node's forwarded requests and their answers carried, by
    /// link class ([`LinkClass::ALL`] order).
    pub fn bytes_by_class(&self) -> [u64; 4] {
        std::array::from_fn(|i| self.bytes[i].get())
    }

    /// Puts the data plane's metrics in `registry` (the node's one).
    pub fn register_metrics(&self, registry: &Registry) {
        weft_metrics::register(registry, self.bytes_family.clone());
        weft_metrics::register(registry, self.chunks.clone());
        weft_metrics::register(registry, self.corrupt_chunks.clone());
    }

    /// Peers that serve `model` (so keep its file), nearest first: by link
    /// class, then round trip.
    fn holders(&self, model: &str) -> Vec<Target> {
        let serving: Vec<(String, Duration)> = {
            let t = self.table.read().expect("routing table lock");
            t.nodes
                .iter()
                .filter(|(name, e)| {
                    **name != self.me
                        && e.seen.elapsed() < NODE_TIMEOUT
                        && e.report.models.iter().any(|m| m == model)
                })
                .map(|(name, _)| (name.clone(), t.rtt_to(name).unwrap_or(Duration::MAX)))
                .collect()
        };
        let mut found: Vec<(usize, Duration, Target)> = serving
            .into_iter()
            .filter_map(|(name, rtt)| match self.target(&name)? {
                t @ Target::Peer { class, .. } => Some((class.index(), rtt, t)),
                Target::Local => None,
            })
            .collect();
        found.sort_by_key(|f| (f.0, f.1));
        found.into_iter().map(|f| f.2).collect()
    }

    /// Opens a stream to peer `name`, sends `head` and `body`, and reads
    /// the reply's head; the reply's body follows on the stream returned.
    async fn exchange(
        &self,
        name: &str,
        addr: SocketAddr,
        head: &Head,
        body: &[u8],
        within: Duration,
    ) -> anyhow::Result<(ReplyHead, quinn::RecvStream)> {
        let (mut send, reply, recv) = self.open_stream(name, addr, head, body, within).await?;
        send.finish()?;
        Ok((reply, recv))
    }

    /// Opens a stream to peer `name`, sends `head` and `body`, and reads
    /// the reply's head, leaving the stream open both ways.
    async fn open_stream(
        &self,
        name: &str,
        addr: SocketAddr,
        head: &Head,
        body: &[u8],
        within: Duration,
    ) -> anyhow::Result<(quinn::SendStream, ReplyHead, quinn::RecvStream)> {
        let conn = self.connection(name, addr).await?;
        tokio::time::timeout(within, self.send_and_hear(&conn, name, addr, head, body))
            .await
            .map_err(|_| anyhow::anyhow!("{name} did not answer within {within:?}"))?
    }

    /// Opens a stream on `conn`, sends `head` and `body`, and reads the
    /// reply's head.
    async fn send_and_hear(
        &self,
        conn: &quinn::Connection,
        name: &str,
        addr: SocketAddr,
        head: &Head,
        body: &[u8],
    ) -> anyhow::Result<(quinn::SendStream, ReplyHead, quinn::RecvStream)> {
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                self.conns.lock().expect("connections").remove(&addr);
                return Err(e.into());
            }
        };
        write_frame(&mut send, &serde_json::to_vec(head)?).await?;
        write_frame(&mut send, body).await?;
        let reply: ReplyHead = serde_json::from_slice(
            &read_frame(&mut recv, HEAD_LIMIT)
                .await?
                .ok_or_else(|| anyhow::anyhow!("{name} closed the stream"))?,
        )?;
        Ok((send, reply, recv))
    }

    /// Opens a chain's stream to the first node of `route`, which runs its
    /// range and passes each step on to the rest of `route`.
    pub async fn open_chain(&self, route: &[Hop]) -> anyhow::Result<ChainSession> {
        let first = route
            .first()
            .ok_or_else(|| anyhow::anyhow!("an empty chain"))?;
        let Some(Target::Peer { name, addr, class }) = self.target(&first.node) else {
            anyhow::bail!(
                "{} has no data-plane address in the gossip table",
                first.node
            );
        };
        let head = Head {
            method: "CHAIN".into(),
            uri: format!(
                "{SHARD_PATH}{}/{}/{}",
                first.model, first.layers.start, first.layers.end
            ),
            headers: vec![(ROUTE_HEADER.into(), serde_json::to_string(&route[1..])?)],
            hops: 0,
        };
        let (send, reply, recv) = self
            .open_stream(&name, addr, &head, &[], self.timeouts.reply_head)
            .await?;
        if reply.status != 200 {
            let why = reply
                .headers
                .iter()
                .find(|(k, _)| k == REASON_HEADER)
                .map_or("", |(_, v)| v.as_str());
            anyhow::bail!("{name} refused the chain ({}): {why}", reply.status);
        }
        let v2 = reply
            .headers
            .iter()
            .any(|(k, v)| k == CHAIN_VERSION_HEADER && v == CHAIN_VERSION);
        Ok(ChainSession {
            to: name,
            send,
            recv,
            bytes: self.bytes.clone(),
            class: class.index(),
            v2,
        })
    }

    /// Whether node `name` reported lately that it runs `holding` (as its
    /// load report lists it).
    pub fn reports_holding(&self, name: &str, holding: &str) -> bool {
        self.table
            .read()
            .expect("routing table lock")
            .nodes
            .get(name)
            .is_some_and(|e| {
                e.seen.elapsed() < NODE_TIMEOUT && e.report.models.iter().any(|m| m == holding)
            })
    }

    /// Peer `name` as a target: its data address and the link class to it.
    fn target(&self, name: &str) -> Option<Target> {
        let t = self.table.read().expect("routing table lock");
        let mine = t
            .nodes
            .get(&self.me)
            .map(|e| e.report.clone())
            .unwrap_or_default();
        let e = t.nodes.get(name)?;
        let addr = e.report.data_address.parse().ok()?;
        let class = LinkClass::between(
            &weft_placement::Site {
                kind: mine.kind,
                region: mine.region,
            },
            &weft_placement::Site {
                kind: e.report.kind,
                region: e.report.region,
            },
            e.report.site == mine.site,
        );
        Some(Target::Peer {
            name: name.to_string(),
            addr,
            class,
        })
    }

    /// Fetches chunk `index` of the file `rec` describes from `peer`.
    async fn fetch_chunk(
        &self,
        peer: &Target,
        rec: &ModelRecord,
        index: usize,
    ) -> anyhow::Result<Vec<u8>> {
        let Target::Peer { name, addr, class } = peer else {
            anyhow::bail!("not a peer");
        };
        let head = Head {
            method: "GET".into(),
            uri: format!("{CHUNK_PATH}{}/{index}/{}", rec.sha256, rec.chunk_bytes),
            headers: Vec::new(),
            hops: 0,
        };
        let (reply, mut recv) = self
            .exchange(name, *addr, &head, &[], self.timeouts.reply_head)
            .await?;
        anyhow::ensure!(
            reply.status == 200,
            "{name} does not keep the file ({})",
            reply.status
        );
        let mut out = Vec::with_capacity((rec.chunk_bytes as usize).min(CHUNK_FRAME));
        let idle = self.timeouts.idle;
        while let Some(f) = tokio::time::timeout(idle, read_frame(&mut recv, CHUNK_FRAME))
            .await
            .map_err(|_| anyhow::anyhow!("{name} sent nothing of the chunk for {idle:?}"))??
        {
            out.extend_from_slice(&f);
            anyhow::ensure!(
                out.len() as u64 <= rec.chunk_bytes,
                "{name} sent more than a chunk"
            );
        }
        self.bytes[class.index()].inc_by(out.len() as u64);
        Ok(out)
    }

    /// Fetches the file `rec` describes from the peers that serve `model`,
    /// nearest first, into `dest`: every chunk is checked against its
    /// sha256 in the cluster's record, and one that fails is fetched from
    /// the next peer. Returns the peers it came from.
    pub async fn fetch_model(
        &self,
        model: &str,
        rec: &ModelRecord,
        dest: &std::path::Path,
    ) -> anyhow::Result<Vec<String>> {
        use sha2::{Digest, Sha256};
        use tokio::io::AsyncWriteExt;
        let peers = self.holders(model);
        anyhow::ensure!(!peers.is_empty(), "no peer serves {model}");
        let part = dest.with_extension("gguf.part");
        let mut file = tokio::fs::File::create(&part).await?;
        let mut used = Vec::new();
        for (i, want) in rec.chunk_sha256.iter().enumerate() {
            let mut got = None;
            for p in &peers {
                let name = target_name(p, &self.me);
                match self.fetch_chunk(p, rec, i).await {
                    Ok(bytes) if hex::encode(Sha256::digest(&bytes)) == *want => {
                        self.chunks.inc();
                        if !used.contains(&name) {
                            used.push(name);
                        }
                        got = Some(bytes);
                        break;
                    }
                    Ok(_) => {
                        self.corrupt_chunks.inc();
                        tracing::warn!(peer = %name, chunk = i, "a model chunk failed its sha256 check; fetching it from another peer");
                    }
                    Err(e) => tracing::debug!(peer = %name, chunk = i, "chunk fetch failed: {e}"),
                }
            }
            let Some(bytes) = got else {
                drop(file);
                let _ = tokio::fs::remove_file(&part).await;
                anyhow::bail!("no peer had a good copy of chunk {i}");
            };
            file.write_all(&bytes).await?;
        }
        file.sync_all().await?;
        drop(file);
        tokio::fs::rename(&part, dest).await?;
        Ok(used)
    }

    /// Lets the router count the prefill a cached prefix saves, or not.
    pub fn set_prefix_routing(&self, on: bool) {
        self.prefix_routing
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the router counts the prefill a cached prefix saves.
    pub fn prefix_routing(&self) -> bool {
        self.prefix_routing
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// This node's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// Lets streams fail over to this node's own API.
    pub fn set_local(&self, app: &Arc<AppState>) {
        *self.local.lock().expect("local app") = Some(Arc::downgrade(app));
    }

    /// Routes `ask` over the live table (see [`routing::route_request`]).
    pub fn choose(
        &self,
        ask: &routing::Ask<'_>,
        local: Option<weft_api::LocalLoad>,
        exclude: &[String],
        config: &weft_placement::RouterConfig,
    ) -> routing::Routed {
        let t = self.table.read().expect("routing table lock");
        routing::route_request(
            &t,
            &self.me,
            ask,
            local,
            exclude,
            config,
            &weft_placement::LinkDefaults::default(),
        )
    }

    async fn connection(&self, name: &str, addr: SocketAddr) -> anyhow::Result<quinn::Connection> {
        if let Some(c) = self.conns.lock().expect("connections").get(&addr) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let connecting = self.ep.connect(addr, &credentials::dns_name(name))?;
        let within = self.timeouts.connect;
        let conn = tokio::time::timeout(within, connecting)
            .await
            .map_err(|_| anyhow::anyhow!("{addr} did not answer in {within:?}"))??;
        self.conns
            .lock()
            .expect("connections")
            .insert(addr, conn.clone());
        Ok(conn)
    }

    /// Sends `req` to `target`: its status, headers and body chunks.
    pub(crate) async fn open(
        &self,
        target: &Target,
        req: &Outgoing,
        body: Bytes,
    ) -> anyhow::Result<(ReplyHead, Chunks)> {
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
        let mut headers = req.headers.clone();
        if req.stream {
            headers.push((TOKEN_IDS_HEADER.into(), "1".into()));
        }
        match target {
            Target::Local => {
                let app = self
                    .local
                    .lock()
                    .expect("local app")
                    .as_ref()
                    .and_then(|w| w.upgrade())
                    .ok_or_else(|| anyhow::anyhow!("this node's API is gone"))?;
                let mut r = Request::builder()
                    .method("POST")
                    .uri(&req.uri)
                    .extension(Forwarded {
                        hops: req.hops + 1,
                        from: self.me.clone(),
                        token_ids: req.stream,
                        request_id: headers
                            .iter()
                            .find(|(k, _)| k == REQUEST_ID_HEADER)
                            .map(|(_, v)| v.clone()),
                        prediction: weft_api::Prediction::from_headers(|k| {
                            headers
                                .iter()
                                .find(|(h, _)| h == k)
                                .map(|(_, v)| v.as_str())
                        }),
                    });
                for (k, v) in &headers {
                    if !k.starts_with("x-weft-") || k == CRITICALITY_HEADER || k == DEADLINE_HEADER
                    {
                        r = r.header(k, v);
                    }
                }
                let r = r.body(Body::from(body))?;
                let resp = weft_api::router(app).oneshot(r).await?;
                let (parts, mut body) = resp.into_parts();
                let head = ReplyHead::of(&parts);
                tokio::spawn(async move {
                    while let Some(frame) = body.frame().await {
                        let item = match frame {
                            Ok(f) => match f.into_data() {
                                Ok(d) => Ok(d),
                                Err(_) => continue,
                            },
                            Err(e) => Err(std::io::Error::other(e.to_string())),
                        };
                        if tx.send(item).await.is_err() {
                            return;
                        }
                    }
                });
                Ok((head, rx))
            }
            Target::Peer { name, addr, class } => {
                let counter = self.bytes.clone();
                let class = class.index();
                counter[class].inc_by(body.len() as u64);
                let head = Head {
                    method: "POST".into(),
                    uri: req.uri.clone(),
                    headers,
                    hops: req.hops + 1,
                };
                // a stream's head comes at once; a whole answer's when it is done
                let within = if req.stream {
                    self.timeouts.reply_head
                } else {
                    self.timeouts.whole
                };
                let (reply, mut recv) = self.exchange(name, *addr, &head, &body, within).await?;
                let idle = self.timeouts.idle;
                let peer = name.clone();
                tokio::spawn(async move {
                    loop {
                        let next =
                            match tokio::time::timeout(idle, read_frame(&mut recv, BODY_LIMIT))
                                .await
                            {
                                Ok(n) => n,
                                Err(_) => {
                                    let why = format!("{peer} sent nothing for {idle:?}");
                                    let _ = tx.send(Err(std::io::Error::other(why))).await;
                                    return;
                                }
                            };
                        match next {
                            Ok(Some(chunk)) => {
                                counter[class].inc_by(chunk.len() as u64);
                                if tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                                    return; // the client went away: dropping recv stops the peer
                                }
                            }
                            Ok(None) => return,
                            Err(e) => {
                                let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                                return;
                            }
                        }
                    }
                });
                Ok((reply, rx))
            }
        }
    }
}

/// A link class as the `link` label writes it.
fn link_name(c: LinkClass) -> &'static str {
    match c {
        LinkClass::Local => "local",
        LinkClass::EdgeToEdge => "edge-to-edge",
        LinkClass::EdgeToCore => "edge-to-core",
        LinkClass::CoreToCore => "core-to-core",
    }
}

/// A chain's stream to the node after this one, open for as long as the
/// chain runs.
pub struct ChainSession {
    to: String,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    bytes: Arc<[IntCounter; 4]>,
    class: usize,
    /// Whether the next node speaks version 2 of the chain protocol.
    v2: bool,
}

impl ChainSession {
    /// Whether the next node takes trace notes and prefix maps and
    /// registrations (an older node would answer them out of turn).
    pub fn speaks_v2(&self) -> bool {
        self.v2
    }

    /// Sends a step down and waits for its reply (both within
    /// [`CHAIN_STEP_TIMEOUT`]).
    pub async fn call(&mut self, body: &[u8]) -> anyhow::Result<Vec<u8>> {
        self.send(body).await?;
        let reply = tokio::time::timeout(CHAIN_STEP_TIMEOUT, read_blob(&mut self.recv))
            .await
            .map_err(|_| {
                anyhow::anyhow!("{} did not answer within {CHAIN_STEP_TIMEOUT:?}", self.to)
            })??
            .ok_or_else(|| anyhow::anyhow!("{} closed the chain", self.to))?;
        self.bytes[self.class].inc_by(reply.len() as u64);
        Ok(reply)
    }

    /// Sends a message that has no reply (within [`CHAIN_STEP_TIMEOUT`]:
    /// a peer that stops reading holds it no longer).
    pub async fn send(&mut self, body: &[u8]) -> anyhow::Result<()> {
        self.bytes[self.class].inc_by(body.len() as u64);
        tokio::time::timeout(CHAIN_STEP_TIMEOUT, write_blob(&mut self.send, body))
            .await
            .map_err(|_| anyhow::anyhow!("{} took no step for {CHAIN_STEP_TIMEOUT:?}", self.to))?
    }
}

/// The name of `t`: this node's for [`Target::Local`].
pub(crate) fn target_name(t: &Target, me: &str) -> String {
    match t {
        Target::Local => me.to_string(),
        Target::Peer { name, .. } => name.clone(),
    }
}
