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
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use axum::response::Response;
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tower::ServiceExt;

use crate::cluster::credentials::NodeIdentity;
use crate::cluster::overlay::{RoutingTable, NODE_TIMEOUT};
use crate::cluster::transport::{self, read_frame, write_frame};

/// The header counting how often a request was forwarded.
pub const HOPS_HEADER: &str = "x-weft-hops";
/// The header naming the node a forwarded request came from.
pub const FROM_HEADER: &str = "x-weft-forwarded-by";
/// The response header naming the node that served a forwarded request.
pub const SERVED_BY_HEADER: &str = "x-weft-served-by";
/// Most times a request is forwarded.
pub const MAX_HOPS: u32 = 2;
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

/// How often a request in `headers` was forwarded already.
pub fn hops(headers: &HeaderMap) -> u32 {
    headers
        .get(HOPS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Serves forwarded requests arriving on `ep` through `app` until `stop`.
pub async fn serve(ep: quinn::Endpoint, app: axum::Router, mut stop: watch::Receiver<bool>) {
    loop {
        let incoming = tokio::select! {
            i = ep.accept() => match i { Some(i) => i, None => return },
            _ = stop.wait_for(|s| *s) => return,
        };
        let app = app.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            let peer = transport::peer_name(&conn).unwrap_or_default();
            while let Ok((send, recv)) = conn.accept_bi().await {
                let (app, peer) = (app.clone(), peer.clone());
                tokio::spawn(async move {
                    if let Err(e) = answer(app, &peer, send, recv).await {
                        tracing::debug!(%peer, "forwarded request: {e}");
                    }
                });
            }
        });
    }
}

async fn answer(
    app: axum::Router,
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
    let resp = app.oneshot(req).await?;
    let (parts, mut body) = resp.into_parts();
    let reply = ReplyHead {
        status: parts.status.as_u16(),
        headers: parts
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
            .collect(),
    };
    write_frame(&mut send, &serde_json::to_vec(&reply)?).await?;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if !data.is_empty() {
                write_frame(&mut send, &data).await?;
            }
        }
    }
    send.finish()?;
    Ok(())
}

/// Forwards requests for models this node does not hold to peers that
/// hold them, as the overlay's routing table says.
pub struct Forwarder {
    ep: quinn::Endpoint,
    table: Arc<RwLock<RoutingTable>>,
    me: String,
    conns: Mutex<HashMap<SocketAddr, quinn::Connection>>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").field("me", &self.me).finish()
    }
}

/// A peer a request can go to.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    /// Its node name.
    pub name: String,
    /// Its data-plane address.
    pub addr: SocketAddr,
}

impl Forwarder {
    /// A forwarder dialling with `identity`, choosing peers from `table`.
    pub fn new(identity: &NodeIdentity, table: Arc<RwLock<RoutingTable>>) -> anyhow::Result<Self> {
        let mut ep = quinn::Endpoint::client("0.0.0.0:0".parse().expect("an address"))?;
        ep.set_default_client_config(transport::client_config(
            identity,
            &crate::cluster::credentials::Revoked::default(),
        )?);
        Ok(Self {
            ep,
            table,
            me: identity.name.clone(),
            conns: Mutex::default(),
        })
    }

    /// The peer to send a request for `model` to: a fresh node other than
    /// this one that serves the model (loaded and ready) and has a data-plane
    /// address; the shortest queue first, then the shortest round trip.
    pub fn pick(&self, model: &str) -> Option<Peer> {
        let t = self.table.read().expect("routing table lock");
        t.nodes
            .iter()
            .filter(|(name, e)| {
                **name != self.me
                    && e.seen.elapsed() < NODE_TIMEOUT
                    && e.report.models.iter().any(|m| m == model)
            })
            .filter_map(|(name, e)| {
                let addr = e.report.data_address.parse().ok()?;
                let rtt = t.rtt_to(name).unwrap_or(Duration::MAX);
                Some((e.report.queue_depth, rtt, name.clone(), addr))
            })
            .min_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)))
            .map(|(_, _, name, addr)| Peer { name, addr })
    }

    async fn connection(&self, peer: &Peer) -> anyhow::Result<quinn::Connection> {
        if let Some(c) = self.conns.lock().expect("connections").get(&peer.addr) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let connecting = self.ep.connect(
            peer.addr,
            &crate::cluster::credentials::dns_name(&peer.name),
        )?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| {
                anyhow::anyhow!("{} did not answer in {CONNECT_TIMEOUT:?}", peer.addr)
            })??;
        self.conns
            .lock()
            .expect("connections")
            .insert(peer.addr, conn.clone());
        Ok(conn)
    }

    /// Sends a request (`uri`, `headers`, `body`, already forwarded `hops`
    /// times) to `peer`; its answer streams back as the response.
    pub async fn forward(
        &self,
        peer: &Peer,
        uri: &str,
        headers: &HeaderMap,
        body: Bytes,
        hops: u32,
    ) -> anyhow::Result<Response> {
        let start = Instant::now();
        let conn = self.connection(peer).await?;
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                self.conns.lock().expect("connections").remove(&peer.addr);
                return Err(e.into());
            }
        };
        let head = Head {
            method: "POST".into(),
            uri: uri.into(),
            headers: CARRIED
                .iter()
                .filter_map(|k| Some((k.to_string(), headers.get(*k)?.to_str().ok()?.to_string())))
                .collect(),
            hops: hops + 1,
        };
        write_frame(&mut send, &serde_json::to_vec(&head)?).await?;
        write_frame(&mut send, &body).await?;
        send.finish()?;
        let reply: ReplyHead = serde_json::from_slice(
            &read_frame(&mut recv)
                .await?
                .ok_or_else(|| anyhow::anyhow!("{} closed the stream", peer.name))?,
        )?;
        tracing::debug!(peer = %peer.name, took = ?start.elapsed(), status = reply.status, "forwarded");
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
        tokio::spawn(async move {
            loop {
                match read_frame(&mut recv).await {
                    Ok(Some(chunk)) => {
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
        let mut resp = Response::new(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ));
        *resp.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY);
        for (k, v) in reply.headers {
            if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
                if k != axum::http::header::CONTENT_LENGTH {
                    resp.headers_mut().insert(k, v);
                }
            }
        }
        resp.headers_mut().insert(
            SERVED_BY_HEADER,
            HeaderValue::try_from(peer.name.as_str()).unwrap_or(HeaderValue::from_static("?")),
        );
        Ok(resp)
    }
}
