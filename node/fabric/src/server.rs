//! The serving side of the data plane: forwarded requests arriving from
//! peers run through this node's own API; a chain's previous node opens a
//! stream of steps for a layer range this node runs; peers fetch chunks of
//! the model files kept here. A connection whose peer's certificate is
//! revoked meanwhile is closed.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use tokio::sync::watch;
use tower::ServiceExt;
use weft_api::headers::{Forwarded, REQUEST_ID_HEADER, TOKEN_IDS_HEADER};
use weft_api::AppState;
use weft_cluster::credentials::Revoked;
use weft_cluster::transport::{self, read_frame, write_frame};
use weft_worker::Runner;

use crate::chain::ShardSession;
use crate::forwarder::Forwarder;
use crate::hop::Hop;
use crate::shards::Shards;
use crate::wire::{
    read_blob, write_blob, write_reply_head, Head, ReplyHead, BODY_LIMIT, CHAIN_VERSION,
    CHAIN_VERSION_HEADER, CHUNK_FRAME, CHUNK_PATH, HEAD_LIMIT, HEARTBEAT, REASON_HEADER,
    REQUEST_TIMEOUT, ROUTE_HEADER, SHARD_PATH,
};

/// How often an open data-plane connection checks its peer's certificate
/// against the replicated revocation list.
const REVOCATION_CHECK: Duration = Duration::from_millis(250);

/// What this node serves to peers: its API, the layer ranges it runs, and
/// its forwarder (for passing a chain's steps on).
#[derive(Clone)]
pub struct ServedHere {
    /// The node's API.
    pub app: Arc<AppState>,
    /// Its shard workers.
    pub shards: Shards,
    /// Its forwarder, if it has one.
    pub forwarder: Option<Arc<Forwarder>>,
}

/// Serves forwarded requests arriving on `ep` through `node`'s API, the
/// chain steps of the layer ranges it runs, and chunks of the model files
/// kept in `store`, until `stop`.
pub async fn serve(
    ep: quinn::Endpoint,
    node: ServedHere,
    store: std::path::PathBuf,
    revoked: Revoked,
    mut stop: watch::Receiver<bool>,
) {
    let app = weft_api::router(node.app.clone());
    loop {
        let incoming = tokio::select! {
            i = ep.accept() => match i { Some(i) => i, None => return },
            _ = stop.wait_for(|s| *s) => return,
        };
        let (app, store, revoked, node) =
            (app.clone(), store.clone(), revoked.clone(), node.clone());
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
                let (app, peer, store, node) =
                    (app.clone(), peer.clone(), store.clone(), node.clone());
                tokio::spawn(async move {
                    if let Err(e) = answer(app, &node, &store, &peer, send, recv).await {
                        tracing::debug!(%peer, "forwarded request: {e}");
                    }
                });
            }
        });
    }
}

async fn answer(
    app: axum::Router,
    node: &ServedHere,
    store: &std::path::Path,
    peer: &str,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    let read = async {
        let head = read_frame(&mut recv, HEAD_LIMIT)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no request head"))?;
        let body = read_frame(&mut recv, BODY_LIMIT).await?.unwrap_or_default();
        anyhow::Ok((head, body))
    };
    let (head, body) = tokio::time::timeout(REQUEST_TIMEOUT, read)
        .await
        .map_err(|_| anyhow::anyhow!("{peer} sent no request within {REQUEST_TIMEOUT:?}"))??;
    let (req, tracked) = match parse_request(head, body, peer)? {
        Asked::Chunk(c) => return send_chunk(store, c, send).await,
        Asked::Shard { what, route } => return run_shard(node, &what, route, send, recv).await,
        Asked::Api { request, tracked } => (request, tracked),
    };
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

/// Runs a chain's steps on this node's shard worker for the range in
/// `what` (`<model>/<start>/<end>`), passing them on to the route's next
/// node, until the previous node closes the stream.
async fn run_shard(
    node: &ServedHere,
    what: &str,
    route: Vec<Hop>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    let refuse = |status: u16, why: String| ReplyHead {
        status,
        headers: vec![(REASON_HEADER.into(), why)],
    };
    let worker = match node.shards.get(what) {
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
    let head = ReplyHead {
        status: 200,
        headers: vec![(CHAIN_VERSION_HEADER.into(), CHAIN_VERSION.into())],
    };
    write_frame(&mut send, &serde_json::to_vec(&head)?).await?;
    let mut session = ShardSession::new(worker, route, node.forwarder.clone());
    while let Some(body) = read_blob(&mut recv).await? {
        if let Some(reply) = session.handle(&body).await {
            write_blob(&mut send, &reply).await?;
        }
    }
    send.finish()?;
    Ok(())
}

/// Sends a chunk of a kept model file (`<store>/<sha256>.gguf`), or a 404
/// head when the request is malformed or this node does not keep it.
async fn send_chunk(
    store: &std::path::Path,
    chunk: Option<ChunkAsk>,
    mut send: quinn::SendStream,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let file = match &chunk {
        Some(c) => tokio::fs::File::open(store.join(format!("{}.gguf", c.sha256)))
            .await
            .ok(),
        None => None,
    };
    let (
        Some(mut file),
        Some(ChunkAsk {
            offset, bytes: n, ..
        }),
    ) = (file, chunk)
    else {
        write_reply_head(&mut send, 404).await?;
        send.finish()?;
        return Ok(());
    };
    file.seek(std::io::SeekFrom::Start(offset)).await?;
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

/// Most nodes a chain's route may name after this one.
pub const MAX_CHAIN_ROUTE: usize = 16;

/// A peer's ask for a chunk of a model file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkAsk {
    /// The file's sha256 (hex).
    pub sha256: String,
    /// Where the chunk starts.
    pub offset: u64,
    /// Its size (the last one may be shorter).
    pub bytes: u64,
}

/// What a peer's request asks for.
#[derive(Debug)]
pub enum Asked {
    /// A chunk of a model file (`None`: malformed, answered 404).
    Chunk(Option<ChunkAsk>),
    /// A chain's steps for a layer range (`<model>/<start>/<end>`), with
    /// the rest of the route.
    Shard {
        /// The range.
        what: String,
        /// The nodes after this one.
        route: Vec<Hop>,
    },
    /// A request for this node's API.
    Api {
        /// The request, with the data plane's own fields in its
        /// [`Forwarded`] extension.
        request: Request<Body>,
        /// Whether the origin asked for token ids (so heartbeats).
        tracked: bool,
    },
}

/// Turns a request's head and body, as `peer` sent them, into what it asks
/// for: every byte of it is the peer's, checked here.
pub fn parse_request(head: Vec<u8>, body: Vec<u8>, peer: &str) -> anyhow::Result<Asked> {
    anyhow::ensure!(
        head.len() <= HEAD_LIMIT,
        "a request head of {} bytes",
        head.len()
    );
    anyhow::ensure!(
        body.len() <= BODY_LIMIT,
        "a request body of {} bytes",
        body.len()
    );
    let head: Head = serde_json::from_slice(&head)?;
    if let Some(what) = head.uri.strip_prefix(CHUNK_PATH) {
        return Ok(Asked::Chunk(chunk_ask(what)));
    }
    if let Some(what) = head.uri.strip_prefix(SHARD_PATH) {
        let route: Vec<Hop> = head
            .headers
            .iter()
            .find(|(k, _)| k == ROUTE_HEADER)
            .map(|(_, v)| serde_json::from_str(v))
            .transpose()?
            .unwrap_or_default();
        anyhow::ensure!(
            route.len() <= MAX_CHAIN_ROUTE,
            "a chain route of {} nodes",
            route.len()
        );
        return Ok(Asked::Shard {
            what: what.to_string(),
            route,
        });
    }
    let tracked = head.headers.iter().any(|(k, _)| k == TOKEN_IDS_HEADER);
    let mut req = Request::builder()
        .method(head.method.as_str())
        .uri(&head.uri)
        .extension(Forwarded {
            hops: head.hops,
            from: peer.to_string(),
            token_ids: tracked,
            request_id: head
                .headers
                .iter()
                .find(|(k, _)| k == REQUEST_ID_HEADER)
                .map(|(_, v)| v.clone()),
            prediction: weft_api::Prediction::from_headers(|k| {
                head.headers
                    .iter()
                    .find(|(h, _)| h == k)
                    .map(|(_, v)| v.as_str())
            }),
        });
    // the client's own headers; the data plane's own ride in the extension
    for (k, v) in &head.headers {
        if !k.starts_with("x-weft-") || k == "x-weft-criticality" || k == "x-weft-deadline-ms" {
            req = req.header(k, v);
        }
    }
    Ok(Asked::Api {
        request: req.body(Body::from(body))?,
        tracked,
    })
}

/// `<sha256>/<index>/<chunk bytes>`, checked: a hex digest, a chunk size
/// within the frame limits, an offset that fits.
fn chunk_ask(what: &str) -> Option<ChunkAsk> {
    let parts: Vec<&str> = what.split('/').collect();
    let [sha, i, n] = parts.as_slice() else {
        return None;
    };
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let (index, bytes) = (i.parse::<u64>().ok()?, n.parse::<u64>().ok()?);
    if bytes == 0 || bytes > transport::MAX_FRAME as u64 * 4 {
        return None;
    }
    Some(ChunkAsk {
        sha256: sha.to_ascii_lowercase(),
        offset: index.checked_mul(bytes)?,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(uri: &str, headers: &[(&str, &str)]) -> Vec<u8> {
        serde_json::to_vec(&Head {
            method: "POST".into(),
            uri: uri.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            hops: 1,
        })
        .unwrap()
    }

    #[test]
    fn a_chunk_whose_offset_overflows_is_refused() {
        let uri = format!("{CHUNK_PATH}{}/{}/1024", "a".repeat(64), u64::MAX / 2);
        let asked = parse_request(head(&uri, &[]), vec![], "p").unwrap();
        assert!(matches!(asked, Asked::Chunk(None)), "{asked:?}");
    }

    #[test]
    fn a_chunk_ask_is_read_as_its_offset_and_size() {
        let uri = format!("{CHUNK_PATH}{}/3/1024", "a".repeat(64));
        let Asked::Chunk(Some(c)) = parse_request(head(&uri, &[]), vec![], "p").unwrap() else {
            panic!("not a chunk")
        };
        assert_eq!((c.offset, c.bytes), (3072, 1024));
    }

    #[test]
    fn a_chain_route_longer_than_the_hop_limit_is_refused() {
        let hop = r#"{"node":"n","model":"m","layers":{"start":0,"end":1}}"#;
        let route = format!("[{}]", vec![hop; MAX_CHAIN_ROUTE + 1].join(","));
        let h = head(&format!("{SHARD_PATH}m/0/1"), &[(ROUTE_HEADER, &route)]);
        assert!(parse_request(h, vec![], "p").is_err());
    }

    #[test]
    fn a_peers_data_plane_headers_ride_in_the_extension_not_the_request() {
        let h = head(
            "/v1/completions",
            &[("x-weft-hops", "0"), ("x-weft-from", "evil")],
        );
        let Asked::Api { request, .. } = parse_request(h, vec![], "peer-a").unwrap() else {
            panic!("not an API request")
        };
        assert!(request.headers().get("x-weft-hops").is_none());
        let f = request.extensions().get::<Forwarded>().unwrap();
        assert_eq!((f.hops, f.from.as_str()), (1, "peer-a"));
    }
}
