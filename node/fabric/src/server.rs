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
    read_blob, write_blob, write_reply_head, Head, ReplyHead, BODY_LIMIT, CHUNK_FRAME, CHUNK_PATH,
    HEAD_LIMIT, HEARTBEAT, REASON_HEADER, REQUEST_TIMEOUT, ROUTE_HEADER, SHARD_PATH,
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
        let head: Head = serde_json::from_slice(
            &read_frame(&mut recv, HEAD_LIMIT)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no request head"))?,
        )?;
        let body = read_frame(&mut recv, BODY_LIMIT).await?.unwrap_or_default();
        anyhow::Ok((head, body))
    };
    let (head, body) = tokio::time::timeout(REQUEST_TIMEOUT, read)
        .await
        .map_err(|_| anyhow::anyhow!("{peer} sent no request within {REQUEST_TIMEOUT:?}"))??;
    if let Some(what) = head.uri.strip_prefix(CHUNK_PATH) {
        return send_chunk(store, what, send).await;
    }
    if let Some(what) = head.uri.strip_prefix(SHARD_PATH) {
        return run_shard(node, what, &head, send, recv).await;
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
        });
    // the client's own headers; the data plane's own ride in the extension
    for (k, v) in &head.headers {
        if !k.starts_with("x-weft-") || k == "x-weft-criticality" || k == "x-weft-deadline-ms" {
            req = req.header(k, v);
        }
    }
    let req = req.body(Body::from(body))?;
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
    head: &Head,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    let refuse = |status: u16, why: String| ReplyHead {
        status,
        headers: vec![(REASON_HEADER.into(), why)],
    };
    let route: Vec<Hop> = head
        .headers
        .iter()
        .find(|(k, _)| k == ROUTE_HEADER)
        .map(|(_, v)| serde_json::from_str(v))
        .transpose()?
        .unwrap_or_default();
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
    write_reply_head(&mut send, 200).await?;
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
    let Some(offset) = index.checked_mul(n) else {
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
