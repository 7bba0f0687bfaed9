//! The data plane between nodes: a request that lands on a node that does
//! not hold its model goes over QUIC (mutual TLS, cluster certificates) to
//! a peer that does, which runs it through its own API; the answer streams
//! back token by token. A hop count travels with the request
//! ([`HOPS_HEADER`]) and a request forwarded [`MAX_HOPS`] times is refused,
//! so a stale routing table cannot loop it. Intent, deadline and tenant ride
//! in the request's own body and headers.
//!
//! On a stream: the request head (method, path, headers, hops) and the body
//! as two frames; then the response head (status, headers) and the body in
//! frames as it is produced, to the end of the stream.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use axum::response::Response;
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tower::ServiceExt;

use crate::chain::Hop;
use crate::cluster::credentials::{NodeIdentity, Revoked};
use crate::cluster::overlay::{RoutingTable, NODE_TIMEOUT};
use crate::cluster::transport::{self, read_frame, write_frame};
use crate::routing::{self, Target};
use weft_coordinator::ModelRecord;
use weft_placement::LinkClass;

/// The header counting how often a request was forwarded.
pub const HOPS_HEADER: &str = "x-weft-hops";
/// The header naming the node a forwarded request came from.
pub const FROM_HEADER: &str = "x-weft-forwarded-by";
/// The response header naming the node that served a forwarded request.
pub const SERVED_BY_HEADER: &str = "x-weft-served-by";
/// The request header asking for each streamed chunk's token ids (in
/// [`TOKEN_IDS_FIELD`]), so the forwarding node can resume the stream on
/// another replica.
pub const TOKEN_IDS_HEADER: &str = "x-weft-token-ids";
/// The header carrying the id the routing node gave a request, so the
/// records of every node it passes share it.
pub const REQUEST_ID_HEADER: &str = "x-weft-request-id";
/// The chunk field holding its token ids.
pub const TOKEN_IDS_FIELD: &str = "weft_tokens";
/// Most times a request is forwarded.
pub const MAX_HOPS: u32 = 2;
/// How often an open data-plane connection checks its peer's certificate
/// against the replicated revocation list.
const REVOCATION_CHECK: Duration = Duration::from_millis(250);
/// How long connecting to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Request headers that travel with a forwarded request.
const CARRIED: &[&str] = &[
    "authorization",
    "content-type",
    "x-weft-criticality",
    "x-weft-deadline-ms",
];

#[derive(Debug, Serialize, Deserialize)]
struct Head {
    method: String,
    uri: String,
    headers: Vec<(String, String)>,
    hops: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct ReplyHead {
    status: u16,
    headers: Vec<(String, String)>,
}

impl ReplyHead {
    /// The head of a response from the API.
    fn of(parts: &axum::http::response::Parts) -> Self {
        Self {
            status: parts.status.as_u16(),
            headers: parts
                .headers
                .iter()
                .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
                .collect(),
        }
    }
}

/// How often a request in `headers` was forwarded already.
pub fn hops(headers: &HeaderMap) -> u32 {
    headers
        .get(HOPS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Serves forwarded requests arriving on `ep` through `state`'s API, the
/// chain steps of the layer ranges it runs, and chunks of the model files
/// kept in `store`, until `stop`.
pub async fn serve(
    ep: quinn::Endpoint,
    state: Arc<crate::api::AppState>,
    store: std::path::PathBuf,
    revoked: Revoked,
    mut stop: watch::Receiver<bool>,
) {
    let app = crate::api::router(state.clone());
    loop {
        let incoming = tokio::select! {
            i = ep.accept() => match i { Some(i) => i, None => return },
            _ = stop.wait_for(|s| *s) => return,
        };
        let (app, store, revoked, state) =
            (app.clone(), store.clone(), revoked.clone(), state.clone());
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            let peer = transport::peer_name(&conn).unwrap_or_default();
            let cert = transport::peer_cert(&conn);
            let mut check = tokio::time::interval(REVOCATION_CHECK);
            loop {
                let (send, recv) = tokio::select! {
                    bi = conn.accept_bi() => match bi {
                        Ok(s) => s,
                        Err(_) => return,
                    },
                    // a revocation that lands while the connection is open
                    // ends it, with whatever runs on it
                    _ = check.tick() => {
                        if cert.as_ref().is_some_and(|c| revoked.contains(c)) {
                            tracing::warn!(%peer, "certificate revoked; closing its data-plane connection");
                            conn.close(2u32.into(), b"certificate revoked");
                            return;
                        }
                        continue;
                    }
                };
                let (app, peer, store, state) =
                    (app.clone(), peer.clone(), store.clone(), state.clone());
                tokio::spawn(async move {
                    if let Err(e) = answer(app, &state, &store, &peer, send, recv).await {
                        tracing::debug!(%peer, "forwarded request: {e}");
                    }
                });
            }
        });
    }
}

async fn answer(
    app: axum::Router,
    state: &Arc<crate::api::AppState>,
    store: &std::path::Path,
    peer: &str,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    let head: Head = serde_json::from_slice(
        &read_frame(&mut recv)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no request head"))?,
    )?;
    let body = read_frame(&mut recv).await?.unwrap_or_default();
    if let Some(what) = head.uri.strip_prefix(CHUNK_PATH) {
        return send_chunk(store, what, send).await;
    }
    if let Some(what) = head.uri.strip_prefix(SHARD_PATH) {
        return run_shard(state, what, &head, send, recv).await;
    }
    let mut req = Request::builder()
        .method(head.method.as_str())
        .uri(&head.uri);
    for (k, v) in &head.headers {
        req = req.header(k, v);
    }
    let req = req
        .header(HOPS_HEADER, head.hops.to_string())
        .header(FROM_HEADER, peer)
        .body(Body::from(body))?;
    let tracked = head.headers.iter().any(|(k, _)| k == TOKEN_IDS_HEADER);
    let resp = app.oneshot(req).await?;
    let (parts, mut body) = resp.into_parts();
    let reply = ReplyHead::of(&parts);
    write_frame(&mut send, &serde_json::to_vec(&reply)?).await?;
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            frame = body.frame() => {
                let Some(frame) = frame else { break };
                if let Ok(data) = frame?.into_data() {
                    if !data.is_empty() {
                        write_frame(&mut send, &data).await?;
                        beat.reset();
                    }
                }
            }
            // an empty frame: alive, nothing to say yet
            _ = beat.tick(), if tracked => write_frame(&mut send, &[]).await?,
        }
    }
    send.finish()?;
    Ok(())
}

/// Where a chain's previous node opens its stream of steps:
/// `/weft/shard/<model>/<first layer>/<end layer>`; the nodes after this one
/// ride in [`ROUTE_HEADER`].
const SHARD_PATH: &str = "/weft/shard/";
/// The header with the rest of a chain's route (JSON [`Hop`]s).
const ROUTE_HEADER: &str = "x-weft-chain-route";
/// Longest a chain step may take on the nodes after this one.
const CHAIN_STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Writes a reply head with `status` and no headers.
async fn write_reply_head(send: &mut quinn::SendStream, status: u16) -> anyhow::Result<()> {
    let head = ReplyHead {
        status,
        headers: Vec::new(),
    };
    write_frame(send, &serde_json::to_vec(&head)?).await?;
    Ok(())
}

/// Writes one chain message: its length, then frames of at most
/// [`CHUNK_FRAME`] bytes.
async fn write_blob(send: &mut quinn::SendStream, body: &[u8]) -> anyhow::Result<()> {
    write_frame(send, &(body.len() as u64).to_le_bytes()).await?;
    for part in body.chunks(CHUNK_FRAME) {
        write_frame(send, part).await?;
    }
    Ok(())
}

/// Reads one chain message (`None`: the stream ended between messages).
async fn read_blob(recv: &mut quinn::RecvStream) -> anyhow::Result<Option<Vec<u8>>> {
    let Some(len) = read_frame(recv).await? else {
        return Ok(None);
    };
    let len: [u8; 8] = len
        .as_slice()
        .try_into()
        .map_err(|_| anyhow::anyhow!("bad chain message length"))?;
    let len = u64::from_le_bytes(len) as usize;
    anyhow::ensure!(
        len <= crate::worker::protocol::MAX_CHAIN_FRAME_BYTES,
        "chain message of {len} bytes"
    );
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let part = read_frame(recv)
            .await?
            .ok_or_else(|| anyhow::anyhow!("chain message cut short"))?;
        out.extend_from_slice(&part);
    }
    anyhow::ensure!(out.len() == len, "chain message longer than announced");
    Ok(Some(out))
}

/// Runs a chain's steps on this node's shard worker for the range in
/// `what` (`<model>/<start>/<end>`), passing them on to the route's next
/// node, until the previous node closes the stream.
async fn run_shard(
    state: &Arc<crate::api::AppState>,
    what: &str,
    head: &Head,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    let refuse = |status: u16, why: String| ReplyHead {
        status,
        headers: vec![("x-weft-reason".into(), why)],
    };
    let route: Vec<Hop> = head
        .headers
        .iter()
        .find(|(k, _)| k == ROUTE_HEADER)
        .map(|(_, v)| serde_json::from_str(v))
        .transpose()?
        .unwrap_or_default();
    let worker = match state.shard(what) {
        Some(w) if w.is_ready() => Ok(w),
        Some(_) => Err(refuse(503, format!("{what} is still loading"))),
        None => Err(refuse(404, format!("this node does not run {what}"))),
    };
    let worker = match worker {
        Ok(w) => w,
        Err(r) => {
            write_frame(&mut send, &serde_json::to_vec(&r)?).await?;
            send.finish()?;
            return Ok(());
        }
    };
    write_reply_head(&mut send, 200).await?;
    let mut session = crate::chain::ShardSession::new(worker, route, state.forwarder());
    while let Some(body) = read_blob(&mut recv).await? {
        if let Some(reply) = session.handle(&body).await {
            write_blob(&mut send, &reply).await?;
        }
    }
    send.finish()?;
    Ok(())
}

/// A chain's stream to the node after this one, open for as long as the
/// chain runs.
pub struct ChainSession {
    to: String,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    bytes: Arc<[AtomicU64; 4]>,
    class: usize,
}

impl ChainSession {
    /// Sends a step down and waits for its reply.
    pub async fn call(&mut self, body: &[u8]) -> anyhow::Result<Vec<u8>> {
        self.send(body).await?;
        let reply = tokio::time::timeout(CHAIN_STEP_TIMEOUT, read_blob(&mut self.recv))
            .await
            .map_err(|_| {
                anyhow::anyhow!("{} did not answer within {CHAIN_STEP_TIMEOUT:?}", self.to)
            })??
            .ok_or_else(|| anyhow::anyhow!("{} closed the chain", self.to))?;
        self.bytes[self.class].fetch_add(reply.len() as u64, Ordering::Relaxed);
        Ok(reply)
    }

    /// Sends a message that has no reply.
    pub async fn send(&mut self, body: &[u8]) -> anyhow::Result<()> {
        self.bytes[self.class].fetch_add(body.len() as u64, Ordering::Relaxed);
        write_blob(&mut self.send, body).await
    }
}

/// Where a peer asks for a chunk of a model file:
/// `/weft/chunk/<sha256>/<index>/<chunk bytes>`.
const CHUNK_PATH: &str = "/weft/chunk/";
/// Frames a chunk is sent in.
const CHUNK_FRAME: usize = 1 << 20;

/// Sends a chunk of a kept model file (`<store>/<sha256>.gguf`), or a 404
/// head when this node does not keep it.
async fn send_chunk(
    store: &std::path::Path,
    what: &str,
    mut send: quinn::SendStream,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let parts: Vec<&str> = what.split('/').collect();
    let parsed = match parts.as_slice() {
        [sha, i, n] if sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()) => i
            .parse::<u64>()
            .ok()
            .zip(n.parse::<u64>().ok())
            .map(|(i, n)| (*sha, i, n)),
        _ => None,
    };
    let file = match parsed {
        Some((sha, _, n)) if n > 0 && n <= transport::MAX_FRAME as u64 * 4 => {
            tokio::fs::File::open(store.join(format!("{sha}.gguf")))
                .await
                .ok()
        }
        _ => None,
    };
    let (Some(mut file), Some((_, index, n))) = (file, parsed) else {
        write_reply_head(&mut send, 404).await?;
        send.finish()?;
        return Ok(());
    };
    file.seek(std::io::SeekFrom::Start(index * n)).await?;
    let mut left = n as usize;
    write_reply_head(&mut send, 200).await?;
    let mut buf = vec![0u8; CHUNK_FRAME];
    while left > 0 {
        let want = left.min(CHUNK_FRAME);
        let got = file.read(&mut buf[..want]).await?;
        if got == 0 {
            break; // the last chunk is shorter
        }
        write_frame(&mut send, &buf[..got]).await?;
        left -= got;
    }
    send.finish()?;
    Ok(())
}

/// Sends requests to the peers the router chooses, and keeps a forwarded
/// stream going when its peer dies: the stream resumes on another replica
/// from the tokens the client already has.
pub struct Forwarder {
    ep: quinn::Endpoint,
    table: Arc<RwLock<RoutingTable>>,
    me: String,
    conns: Mutex<HashMap<SocketAddr, quinn::Connection>>,
    /// This node's API, for a stream that fails over to this node.
    local: Mutex<Option<std::sync::Weak<crate::api::AppState>>>,
    /// Bytes sent and received to peers, by link class.
    bytes: Arc<[AtomicU64; 4]>,
    /// Model chunks fetched from peers, and those that failed their check.
    chunks: AtomicU64,
    corrupt_chunks: AtomicU64,
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

/// Chooses where a request goes next, given the nodes that failed it.
pub type Reroute = Box<dyn Fn(&[String]) -> Option<Target> + Send + Sync>;
/// Appends a record to the intent log.
pub type Record = Box<dyn Fn(serde_json::Value) + Send + Sync>;

/// How many replicas a request tries before it fails.
const MAX_TRIES: usize = 4;
/// A forwarded stream that sent tokens and then nothing for this long is
/// taken as stalled and resumed elsewhere. A dead peer is noticed sooner:
/// it leaves the gossip table ([`NODE_TIMEOUT`] after its last report),
/// or its connection times out ([`DATA_IDLE_TIMEOUT`]).
pub const STALL: Duration = Duration::from_secs(10);
/// A data-plane connection with no packet from the peer for this long is
/// dead; keep-alives go every [`DATA_KEEP_ALIVE`].
pub const DATA_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Keep-alive interval on data-plane connections.
pub const DATA_KEEP_ALIVE: Duration = Duration::from_millis(500);
/// How often a waiting stream checks that its peer is still in the table.
const LIVENESS_EVERY: Duration = Duration::from_millis(100);
/// A stream quiet this long (or 4 times its longest gap so far, if more)
/// whose peer's last report is older than [`SUSPECT_AGE`] (reports come
/// every 400 ms) is taken as cut: it resumes before the peer leaves the
/// table. A false alarm costs a resume, not a token, and a suspected peer
/// that still reports is tried again when no other replica is left.
const SUSPECT_QUIET: Duration = Duration::from_millis(500);
/// See [`SUSPECT_QUIET`].
const SUSPECT_AGE: Duration = Duration::from_millis(700);
/// A serving node sends an empty frame on a tracked stream (one whose
/// origin asked for token ids) when it has sent nothing for this long, so
/// the origin can tell a slow replica from a dead one without waiting for
/// the gossip to go stale.
const HEARTBEAT: Duration = Duration::from_millis(100);
/// A heartbeating stream silent this long, whose peer's last report is
/// older than [`BEAT_AGE`], is taken as cut.
const BEAT_QUIET: Duration = Duration::from_millis(300);
/// See [`BEAT_QUIET`].
const BEAT_AGE: Duration = Duration::from_millis(500);

type Chunks = mpsc::Receiver<Result<Bytes, std::io::Error>>;

impl Forwarder {
    /// A forwarder dialling with `identity`, choosing peers from `table`.
    pub fn new(identity: &NodeIdentity, table: Arc<RwLock<RoutingTable>>) -> anyhow::Result<Self> {
        let mut ep = quinn::Endpoint::client("0.0.0.0:0".parse().expect("an address"))?;
        let mut config =
            transport::client_config(identity, &crate::cluster::credentials::Revoked::default())?;
        let mut t = quinn::TransportConfig::default();
        t.max_idle_timeout(Some(
            DATA_IDLE_TIMEOUT.try_into().expect("idle timeout fits"),
        ));
        t.keep_alive_interval(Some(DATA_KEEP_ALIVE));
        config.transport_config(Arc::new(t));
        ep.set_default_client_config(config);
        Ok(Self {
            ep,
            table,
            me: identity.name.clone(),
            conns: Mutex::default(),
            local: Mutex::default(),
            bytes: Arc::default(),
            chunks: AtomicU64::new(0),
            corrupt_chunks: AtomicU64::new(0),
        })
    }

    /// Whether `t` is this node, or a peer that reported within `age`.
    fn reported_within(&self, t: &Target, age: Duration) -> bool {
        match t {
            Target::Local => true,
            Target::Peer { name, .. } => self.name_reported_within(name, age),
        }
    }

    /// Whether node `name` is this one or reported within `age`.
    fn name_reported_within(&self, name: &str, age: Duration) -> bool {
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
        std::array::from_fn(|i| self.bytes[i].load(Ordering::Relaxed))
    }

    /// The data plane's metrics, in Prometheus text.
    pub fn render_metrics(&self) -> String {
        let mut out = String::from(
            "# HELP weft_dataplane_bytes_total Bytes of forwarded requests and their answers, by link class.\n# TYPE weft_dataplane_bytes_total counter\n",
        );
        for (c, n) in LinkClass::ALL.iter().zip(self.bytes_by_class()) {
            let name = serde_json::to_value(c).ok();
            let name = name.as_ref().and_then(|v| v.as_str()).unwrap_or("?");
            out += &format!("weft_dataplane_bytes_total{{link=\"{name}\"}} {n}\n");
        }
        out += &format!(
            "# HELP weft_model_chunks_fetched_total Model-file chunks fetched from peers and checked.\n# TYPE weft_model_chunks_fetched_total counter\nweft_model_chunks_fetched_total {}\n# HELP weft_model_chunks_corrupt_total Chunks from peers that failed their sha256 (fetched again elsewhere).\n# TYPE weft_model_chunks_corrupt_total counter\nweft_model_chunks_corrupt_total {}\n",
            self.chunks.load(Ordering::Relaxed),
            self.corrupt_chunks.load(Ordering::Relaxed)
        );
        out
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
    ) -> anyhow::Result<(ReplyHead, quinn::RecvStream)> {
        let (mut send, reply, recv) = self.open_stream(name, addr, head, body).await?;
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
    ) -> anyhow::Result<(quinn::SendStream, ReplyHead, quinn::RecvStream)> {
        let conn = self.connection(name, addr).await?;
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
            &read_frame(&mut recv)
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
        let (send, reply, recv) = self.open_stream(&name, addr, &head, &[]).await?;
        if reply.status != 200 {
            let why = reply
                .headers
                .iter()
                .find(|(k, _)| k == "x-weft-reason")
                .map_or("", |(_, v)| v.as_str());
            anyhow::bail!("{name} refused the chain ({}): {why}", reply.status);
        }
        Ok(ChainSession {
            to: name,
            send,
            recv,
            bytes: self.bytes.clone(),
            class: class.index(),
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
        let (reply, mut recv) = self.exchange(name, *addr, &head, &[]).await?;
        anyhow::ensure!(
            reply.status == 200,
            "{name} does not keep the file ({})",
            reply.status
        );
        let mut out = Vec::with_capacity(rec.chunk_bytes as usize);
        while let Some(f) = read_frame(&mut recv).await? {
            out.extend_from_slice(&f);
            anyhow::ensure!(
                out.len() as u64 <= rec.chunk_bytes,
                "{name} sent more than a chunk"
            );
        }
        self.bytes[class.index()].fetch_add(out.len() as u64, Ordering::Relaxed);
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
                        self.chunks.fetch_add(1, Ordering::Relaxed);
                        if !used.contains(&name) {
                            used.push(name);
                        }
                        got = Some(bytes);
                        break;
                    }
                    Ok(_) => {
                        self.corrupt_chunks.fetch_add(1, Ordering::Relaxed);
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

    /// This node's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// Lets streams fail over to this node's own API.
    pub fn set_local(&self, app: &Arc<crate::api::AppState>) {
        *self.local.lock().expect("local app") = Some(Arc::downgrade(app));
    }

    /// Routes `ask` over the live table (see [`routing::route_request`]).
    pub fn route(
        &self,
        ask: &routing::Ask<'_>,
        local: Option<routing::LocalLoad>,
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
        let connecting = self
            .ep
            .connect(addr, &crate::cluster::credentials::dns_name(name))?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| anyhow::anyhow!("{addr} did not answer in {CONNECT_TIMEOUT:?}"))??;
        self.conns
            .lock()
            .expect("connections")
            .insert(addr, conn.clone());
        Ok(conn)
    }

    /// Sends `req` to `target`: its status, headers and body chunks.
    async fn open(
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
                let mut r = Request::builder().method("POST").uri(&req.uri);
                for (k, v) in &headers {
                    r = r.header(k, v);
                }
                let r = r
                    .header(HOPS_HEADER, (req.hops + 1).to_string())
                    .body(Body::from(body))?;
                let resp = crate::api::router(app).oneshot(r).await?;
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
                counter[class].fetch_add(body.len() as u64, Ordering::Relaxed);
                let head = Head {
                    method: "POST".into(),
                    uri: req.uri.clone(),
                    headers,
                    hops: req.hops + 1,
                };
                let (reply, mut recv) = self.exchange(name, *addr, &head, &body).await?;
                tokio::spawn(async move {
                    loop {
                        match read_frame(&mut recv).await {
                            Ok(Some(chunk)) => {
                                counter[class].fetch_add(chunk.len() as u64, Ordering::Relaxed);
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

    /// Sends `req` to `first`, then to what `reroute` offers while replicas
    /// fail; a stream that fails after its first tokens resumes on the next
    /// replica without the client seeing a gap, a repeat or a restart. The
    /// decisions go to `record`.
    pub async fn forward(
        self: &Arc<Self>,
        first: Target,
        req: Outgoing,
        reroute: Reroute,
        record: Record,
    ) -> Result<Response, String> {
        let mut failed: Vec<String> = Vec::new();
        let mut target = first;
        let mut why = String::new();
        for _ in 0..MAX_TRIES {
            let start = Instant::now();
            match self.open(&target, &req, req.body.clone()).await {
                Ok((head, rx)) => {
                    tracing::debug!(to = %target_name(&target, &self.me), took = ?start.elapsed(), status = head.status, "forwarded");
                    if !req.stream || head.status != 200 {
                        match whole(head, rx).await {
                            Ok(r) => return Ok(with_served_by(r, &target, &self.me)),
                            Err(e) => why = e.to_string(),
                        }
                    } else {
                        let (tx, out) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
                        let pump = Pump {
                            fwd: self.clone(),
                            req,
                            reroute,
                            record,
                            out: tx,
                            failed,
                            state: StreamState::default(),
                        };
                        tokio::spawn(pump.run(target.clone(), rx));
                        let mut resp = Response::new(Body::from_stream(
                            tokio_stream::wrappers::ReceiverStream::new(out),
                        ));
                        set_head(&mut resp, head);
                        return Ok(with_served_by(resp, &target, &self.me));
                    }
                }
                Err(e) => why = e.to_string(),
            }
            let name = target_name(&target, &self.me);
            record(serde_json::json!({"decision": "forward-failed", "to": name, "reason": why}));
            failed.push(name);
            match reroute(&failed) {
                Some(t) => target = t,
                None => break,
            }
        }
        Err(format!(
            "no replica answered (tried {}): {why}",
            failed.join(", ")
        ))
    }
}

fn target_name(t: &Target, me: &str) -> String {
    match t {
        Target::Local => me.to_string(),
        Target::Peer { name, .. } => name.clone(),
    }
}

fn set_head(resp: &mut Response, head: ReplyHead) {
    *resp.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    for (k, v) in head.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
            if k != axum::http::header::CONTENT_LENGTH {
                resp.headers_mut().insert(k, v);
            }
        }
    }
}

fn with_served_by(mut resp: Response, t: &Target, me: &str) -> Response {
    resp.headers_mut().insert(
        SERVED_BY_HEADER,
        HeaderValue::try_from(target_name(t, me)).unwrap_or(HeaderValue::from_static("?")),
    );
    resp
}

/// A whole (not streamed) answer, read to its end: a peer that dies before
/// the end is a failure to retry elsewhere, not half an answer.
async fn whole(head: ReplyHead, mut rx: Chunks) -> anyhow::Result<Response> {
    let mut body = Vec::new();
    while let Some(c) = rx.recv().await {
        body.extend_from_slice(&c?);
    }
    let mut resp = Response::new(Body::from(body));
    set_head(&mut resp, head);
    Ok(resp)
}

/// What the client of a forwarded stream has received so far.
#[derive(Debug, Default)]
struct StreamState {
    tokens: Vec<u32>,
    text_bytes: usize,
    id: Option<String>,
    created: Option<u64>,
    /// Bytes of an event not yet complete.
    buf: Vec<u8>,
    /// `[DONE]` or an error event was passed on: the stream is over.
    done: bool,
    /// The replica said it lost the stream midway (its worker or a node of
    /// its chain failed): why. The event is held back; another replica
    /// continues the stream.
    lost: Option<String>,
}

impl StreamState {
    /// Takes the complete events out of the buffer, noting their tokens and
    /// text and stripping the token ids: what to send to the client.
    fn take_events(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event[..end]).into_owned();
            let Some(data) = text.strip_prefix("data: ") else {
                out.extend_from_slice(&event); // a comment or keep-alive
                continue;
            };
            if data.trim() == "[DONE]" {
                self.done = true;
                out.extend_from_slice(&event);
                continue;
            }
            let Ok(mut v) = serde_json::from_str::<serde_json::Value>(data) else {
                out.extend_from_slice(&event);
                continue;
            };
            if let Some(e) = v.get("error") {
                let code = e["code"].as_str().unwrap_or_default();
                if code == "worker_lost" || code == "replica_lost" {
                    // the replica failed, not the request: go elsewhere
                    self.lost = Some(e["message"].as_str().unwrap_or(code).to_string());
                    self.buf.clear(); // its [DONE] follows; nothing more from it
                    break;
                }
                // the replica refused or failed the request itself: that is
                // the answer, not a reason to go elsewhere
                self.done = true;
            }
            if let Some(ids) = v.as_object_mut().and_then(|o| o.remove(TOKEN_IDS_FIELD)) {
                self.tokens.extend(
                    ids.as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|t| t.as_u64())
                        .map(|t| t as u32),
                );
            }
            let choice = &v["choices"][0];
            let delta = choice["delta"]["content"]
                .as_str()
                .or_else(|| choice["text"].as_str())
                .unwrap_or("");
            self.text_bytes += delta.len();
            if self.id.is_none() {
                self.id = v["id"].as_str().map(String::from);
                self.created = v["created"].as_u64();
            }
            out.extend_from_slice(format!("data: {v}\n\n").as_bytes());
        }
        out
    }
}

/// Carries a forwarded stream to its client, failing over to other
/// replicas as they die.
struct Pump {
    fwd: Arc<Forwarder>,
    req: Outgoing,
    reroute: Reroute,
    record: Record,
    out: mpsc::Sender<Result<Bytes, std::io::Error>>,
    failed: Vec<String>,
    state: StreamState,
}

impl Pump {
    async fn run(mut self, mut target: Target, mut rx: Chunks) {
        let mut last = Instant::now();
        // the longest gap between chunks seen on this stream: a busy
        // replica's steps are slow, and slow is not dead
        let mut longest = Duration::ZERO;
        // a replica that heartbeats is dead when its heartbeats stop
        let mut heard = Instant::now();
        let mut beating = false;
        let mut check = tokio::time::interval(LIVENESS_EVERY);
        loop {
            let next = tokio::select! {
                n = rx.recv() => n,
                _ = check.tick() => {
                    let suspect = if beating {
                        heard.elapsed() > BEAT_QUIET
                            && !self.fwd.reported_within(&target, BEAT_AGE)
                    } else {
                        last.elapsed() > SUSPECT_QUIET.max(longest * 4)
                            && !self.fwd.reported_within(&target, SUSPECT_AGE)
                    };
                    if suspect || !self.fwd.reported_within(&target, NODE_TIMEOUT) {
                        Some(Err(std::io::Error::other(format!(
                            "{} stopped reporting and its stream went quiet", target_name(&target, &self.fwd.me)
                        ))))
                    } else if !self.state.tokens.is_empty() && last.elapsed() > STALL {
                        Some(Err(std::io::Error::other(format!("no token for {STALL:?}"))))
                    } else {
                        continue;
                    }
                }
            };
            let why = match next {
                Some(Ok(bytes)) if bytes.is_empty() => {
                    heard = Instant::now();
                    beating = true;
                    continue;
                }
                Some(Ok(bytes)) => {
                    heard = Instant::now();
                    if !self.state.tokens.is_empty() {
                        longest = longest.max(last.elapsed());
                    }
                    last = Instant::now();
                    self.state.buf.extend_from_slice(&bytes);
                    let events = self.state.take_events();
                    if !events.is_empty() && self.out.send(Ok(Bytes::from(events))).await.is_err() {
                        return; // the client went away
                    }
                    match self.state.lost.take() {
                        Some(why) => why,
                        None if self.state.done => return,
                        None => continue,
                    }
                }
                Some(Err(e)) => e.to_string(),
                None => "the stream ended without [DONE]".to_string(),
            };
            last = Instant::now();
            longest = Duration::ZERO;
            heard = Instant::now();
            beating = false;
            let died = Instant::now();
            // half an event from the dead replica is dropped: its token was
            // never sent, so the next replica produces it
            self.state.buf.clear();
            self.failed.push(target_name(&target, &self.fwd.me));
            match self.resume(&why).await {
                Some((t, r)) => {
                    (self.record)(serde_json::json!({
                        "decision": "resumed",
                        "request_id": self.state.id,
                        "from": self.failed.last(),
                        "to": target_name(&t, &self.fwd.me),
                        "reason": why,
                        "tokens_sent": self.state.tokens.len(),
                        "took_ms": died.elapsed().as_millis() as u64,
                    }));
                    target = t;
                    rx = r;
                }
                None => {
                    let msg = format!(
                        "the stream failed after {} tokens and no replica could continue it ({why}; tried {})",
                        self.state.tokens.len(),
                        self.failed.join(", ")
                    );
                    (self.record)(serde_json::json!({
                        "decision": "stream-failed",
                        "request_id": self.state.id,
                        "reason": msg,
                    }));
                    let err = serde_json::json!({"error": {"message": msg, "type": "server_error", "param": null, "code": "no_replica"}});
                    let _ = self
                        .out
                        .send(Ok(Bytes::from(format!("data: {err}\n\ndata: [DONE]\n\n"))))
                        .await;
                    return;
                }
            }
        }
    }

    /// Opens the stream again on the next replica that takes it, from the
    /// tokens the client has.
    async fn resume(&mut self, why: &str) -> Option<(Target, Chunks)> {
        let mut body: serde_json::Value = serde_json::from_slice(&self.req.body).ok()?;
        // once the client has the stream's first chunk, the next replica
        // continues that stream (its id, no second opening chunk)
        if self.state.id.is_some() {
            if !body["weft"].is_object() {
                body["weft"] = serde_json::json!({});
            }
            body["weft"]["resume"] = serde_json::json!({
                "tokens": self.state.tokens,
                "text_bytes": self.state.text_bytes,
                "id": self.state.id,
                "created": self.state.created,
            });
        }
        let body = Bytes::from(body.to_string());
        for _ in 0..MAX_TRIES {
            // a replica suspected under load may still be alive: once every
            // other one failed, those still reporting are candidates again
            let t = match (self.reroute)(&self.failed) {
                Some(t) => t,
                None => {
                    let dead: Vec<String> = self
                        .failed
                        .iter()
                        .filter(|n| !self.fwd.name_reported_within(n, NODE_TIMEOUT))
                        .cloned()
                        .collect();
                    if dead.len() == self.failed.len() {
                        return None;
                    }
                    self.failed = dead;
                    (self.reroute)(&self.failed)?
                }
            };
            let name = target_name(&t, &self.fwd.me);
            match self.fwd.open(&t, &self.req, body.clone()).await {
                Ok((head, rx)) if head.status == 200 => return Some((t, rx)),
                Ok((head, _)) => {
                    tracing::warn!(to = %name, status = head.status, "a replica refused the resumed stream");
                }
                Err(e) => tracing::warn!(to = %name, "resuming the stream failed: {e}"),
            }
            tracing::debug!(%why, "trying the next replica");
            self.failed.push(name);
        }
        None
    }
}
