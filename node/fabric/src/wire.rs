//! What travels on a data-plane stream. A request: its head (method,
//! path, headers, hops) and its body, as two frames; then the reply's head
//! (status, headers) and its body in frames as it is produced, to the end
//! of the stream. A chain's stream carries messages of any size, each as
//! its length and then frames of at most [`CHUNK_FRAME`] bytes.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use weft_cluster::transport::{read_frame, write_frame};
use weft_worker::protocol::MAX_CHAIN_FRAME_BYTES;

/// How long a peer has to send a request's head and body once it opened
/// a stream.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request or reply head (method, path, headers).
pub(crate) const HEAD_LIMIT: usize = 64 << 10;
/// Largest forwarded request body (the API refuses more anyway).
pub(crate) const BODY_LIMIT: usize = 16 << 20;

/// The reply header saying why a chain or chunk request was refused.
pub(crate) const REASON_HEADER: &str = "x-weft-reason";
/// A serving node sends an empty frame on a tracked stream (one whose
/// origin asked for token ids) when it has sent nothing for this long, so
/// the origin can tell a slow replica from a dead one without waiting for
/// the gossip to go stale.
pub(crate) const HEARTBEAT: Duration = Duration::from_millis(100);

/// A request's head on a data-plane stream.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Head {
    pub(crate) method: String,
    pub(crate) uri: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) hops: u32,
}

/// A reply's head.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ReplyHead {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
}

impl ReplyHead {
    /// The head of a response from the API.
    pub(crate) fn of(parts: &axum::http::response::Parts) -> Self {
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

/// Where a chain's previous node opens its stream of steps:
/// `/weft/shard/<model>/<first layer>/<end layer>`; the nodes after this one
/// ride in [`ROUTE_HEADER`].
pub(crate) const SHARD_PATH: &str = "/weft/shard/";
/// The header with the rest of a chain's route (JSON [`Hop`]s).
pub(crate) const ROUTE_HEADER: &str = "x-weft-chain-route";
/// Longest a chain step may take on the nodes after this one.
pub(crate) const CHAIN_STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a peer asks for a chunk of a model file:
/// `/weft/chunk/<sha256>/<index>/<chunk bytes>`.
pub(crate) const CHUNK_PATH: &str = "/weft/chunk/";
/// Frames a chunk is sent in.
pub(crate) const CHUNK_FRAME: usize = 1 << 20;

/// Writes a reply head with `status` and no headers.
/// The reply-head header by which a shard node says it speaks version 2 of
/// the chain protocol (trace notes, prefix maps and registrations); a
/// node without it gets none of those.
pub const CHAIN_VERSION_HEADER: &str = "x-weft-chain";
/// The chain protocol version this node speaks.
pub const CHAIN_VERSION: &str = "2";

pub(crate) async fn write_reply_head(
    send: &mut quinn::SendStream,
    status: u16,
) -> anyhow::Result<()> {
    let head = ReplyHead {
        status,
        headers: Vec::new(),
    };
    write_frame(send, &serde_json::to_vec(&head)?).await?;
    Ok(())
}

/// Writes one chain message: its length, then frames of at most
/// [`CHUNK_FRAME`] bytes.
pub(crate) async fn write_blob(send: &mut quinn::SendStream, body: &[u8]) -> anyhow::Result<()> {
    write_frame(send, &(body.len() as u64).to_le_bytes()).await?;
    for part in body.chunks(CHUNK_FRAME) {
        write_frame(send, part).await?;
    }
    Ok(())
}

/// Reads one chain message (`None`: the stream ended between messages).
pub(crate) async fn read_blob(recv: &mut quinn::RecvStream) -> anyhow::Result<Option<Vec<u8>>> {
    let Some(len) = read_frame(recv, 8).await? else {
        return Ok(None);
    };
    let len: [u8; 8] = len
        .as_slice()
        .try_into()
        .map_err(|_| anyhow::anyhow!("bad chain message length"))?;
    let len = u64::from_le_bytes(len) as usize;
    anyhow::ensure!(len <= MAX_CHAIN_FRAME_BYTES, "chain message of {len} bytes");
    // grown as parts arrive: a length is a claim, not an allocation
    let mut out = Vec::new();
    while out.len() < len {
        let part = read_frame(recv, CHUNK_FRAME)
            .await?
            .ok_or_else(|| anyhow::anyhow!("chain message cut short"))?;
        out.extend_from_slice(&part);
    }
    anyhow::ensure!(out.len() == len, "chain message longer than announced");
    Ok(Some(out))
}
