//! What the node and a worker say to each other: length-prefixed JSON frames
//! (`u32` little-endian length, then the payload) over a Unix socket.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use weft_kernels::{FinishReason, Resume, SamplingParams, TokenLogprob};

/// Largest message frame either side accepts; a larger length is a
/// protocol error.
pub const MAX_FRAME_BYTES: usize = 16 << 20;
/// Largest chain frame (a step's hidden states or logits) either side
/// accepts.
pub const MAX_CHAIN_FRAME_BYTES: usize = 1 << 30;
/// The first byte of a chain frame's payload; a message's JSON never
/// starts with it.
const CHAIN_TAG: u8 = 0xC1;

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_fresh(r: &Resume) -> bool {
    r.tokens.is_empty()
}

/// Node → worker.
// a message lives only until it is written or read, so its size is no cost
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum ToWorker {
    /// Run a request.
    Submit {
        /// Request id, unique per worker connection.
        id: u64,
        /// Prompt tokens.
        prompt: Vec<u32>,
        /// Sampling and stopping.
        params: SamplingParams,
        /// Higher is admitted first.
        priority: u8,
        /// What it produced on a replica that failed mid-stream.
        #[serde(default, skip_serializing_if = "is_fresh")]
        resume: Resume,
        /// Whose request it is (the engine shares itself fairly by tenant).
        #[serde(default)]
        tenant: String,
        /// Leading prompt tokens any tenant may share the prefix cache of.
        #[serde(default, skip_serializing_if = "is_zero")]
        shared_tokens: usize,
    },
    /// Stop a request (its client went away or its deadline passed).
    Cancel {
        /// Request id.
        id: u64,
    },
}

/// Worker → node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum FromWorker {
    /// The model is loaded and the engine runs.
    Ready {
        /// The engine's context limit.
        context_length: usize,
        /// KV blocks in the pool.
        kv_blocks: usize,
        /// How the worker sees its own confinement.
        confinement: crate::sandbox::Confinement,
        /// Whether the worker could open a TCP connection to the node's API
        /// address (it must not, inside the network namespace).
        reached_node: bool,
    },
    /// Tokens and text for one request.
    Event {
        /// Request id.
        id: u64,
        /// The token produced, if any.
        token: Option<u32>,
        /// Text that became final.
        text: String,
        /// Its log-probability, when asked.
        logprob: Option<TokenLogprob>,
        /// Set on the last event of a request.
        finish: Option<FinishReason>,
        /// On a request's first event: prompt tokens mapped from the
        /// prefix cache.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cached: Option<usize>,
    },
    /// A request the engine refused outright.
    Rejected {
        /// Request id.
        id: u64,
        /// Why.
        reason: String,
    },
    /// Load figures, sent after steps.
    Stats {
        /// Requests waiting for admission.
        waiting: usize,
        /// Requests running.
        running: usize,
        /// KV blocks in use.
        kv_used: usize,
        /// KV blocks in all.
        kv_total: usize,
        /// Each tenant with sequences in the engine.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tenants: Vec<weft_kernels::TenantUsage>,
        /// The prefix cache's counters since the worker started.
        #[serde(default)]
        cache: crate::runner::CacheStats,
    },
}

/// A frame as read: a message, or a chain frame (a layer-sharded model's
/// step: its id and the body [`crate::chain`] encodes).
#[derive(Debug, Clone, PartialEq)]
pub enum Frame<T> {
    /// A JSON message.
    Msg(T),
    /// A chain step: a request to a shard (or from a head), or its reply.
    /// Step 0 asks for no reply.
    Chain {
        /// The step it belongs to.
        step: u64,
        /// The encoded step.
        body: Vec<u8>,
    },
}

/// Encodes a chain frame.
pub fn encode_chain(step: u64, body: &[u8]) -> Result<Vec<u8>, FrameError> {
    let n = 1 + 8 + body.len();
    if n > MAX_CHAIN_FRAME_BYTES {
        return Err(FrameError::TooLarge(n));
    }
    let mut out = Vec::with_capacity(n + 4);
    out.extend_from_slice(&(n as u32).to_le_bytes());
    out.push(CHAIN_TAG);
    out.extend_from_slice(&step.to_le_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// A frame's payload (after its length) as a message or a chain frame.
fn parse<T: for<'de> Deserialize<'de>>(body: Vec<u8>) -> Result<Frame<T>, FrameError> {
    if body.first() == Some(&CHAIN_TAG) {
        if body.len() < 9 {
            return Err(FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "short chain frame",
            )));
        }
        let step = u64::from_le_bytes(body[1..9].try_into().expect("8 bytes"));
        return Ok(Frame::Chain {
            step,
            body: body[9..].to_vec(),
        });
    }
    if body.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(body.len()));
    }
    Ok(Frame::Msg(serde_json::from_slice(&body)?))
}

/// How much of a frame is read (and allocated) at a time: a length is a
/// claim, not an allocation.
const READ_CHUNK: usize = 1 << 20;

/// Reads a frame's body of `n` bytes (blocking): its first byte says its
/// kind, and a message (not a chain frame) longer than [`MAX_FRAME_BYTES`]
/// is refused before the rest is read.
fn read_body(r: &mut impl Read, n: usize) -> Result<Vec<u8>, FrameError> {
    let mut body = Vec::with_capacity(n.min(READ_CHUNK));
    if n == 0 {
        return Ok(body);
    }
    body.push(0);
    r.read_exact(&mut body[..1])?;
    check_kind(&body, n)?;
    while body.len() < n {
        let start = body.len();
        body.resize(start + (n - start).min(READ_CHUNK), 0);
        r.read_exact(&mut body[start..])?;
    }
    Ok(body)
}

/// A frame whose first byte says it is a message may be no longer than
/// [`MAX_FRAME_BYTES`].
fn check_kind(first: &[u8], n: usize) -> Result<(), FrameError> {
    if first.first() != Some(&CHAIN_TAG) && n > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(n));
    }
    Ok(())
}

/// Reads one frame of either kind (blocking).
pub fn read_any<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> Result<Frame<T>, FrameError> {
    let mut len = [0u8; 4];
    let n = frame_len(r.read_exact(&mut len), len, MAX_CHAIN_FRAME_BYTES)?;
    parse(read_body(r, n)?)
}

/// Reads one frame of either kind from an async reader, as [`read_any`].
pub async fn read_any_async<T: for<'de> Deserialize<'de>>(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<Frame<T>, FrameError> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    let n = frame_len(
        r.read_exact(&mut len).await.map(|_| ()),
        len,
        MAX_CHAIN_FRAME_BYTES,
    )?;
    let mut body = Vec::with_capacity(n.min(READ_CHUNK));
    if n > 0 {
        body.push(0);
        r.read_exact(&mut body[..1]).await?;
        check_kind(&body, n)?;
    }
    while body.len() < n {
        let start = body.len();
        body.resize(start + (n - start).min(READ_CHUNK), 0);
        r.read_exact(&mut body[start..]).await?;
    }
    parse(body)
}

/// Reads one message frame from an async reader, refusing chain frames
/// and anything longer than [`MAX_FRAME_BYTES`] before reading it: for a
/// peer that speaks only messages and is trusted less than a worker (an
/// agent sandbox's init).
pub async fn read_msg_async<T: for<'de> Deserialize<'de>>(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<T, FrameError> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    let n = frame_len(
        r.read_exact(&mut len).await.map(|_| ()),
        len,
        MAX_FRAME_BYTES,
    )?;
    let mut body = Vec::with_capacity(n.min(READ_CHUNK));
    while body.len() < n {
        let start = body.len();
        body.resize(start + (n - start).min(READ_CHUNK), 0);
        r.read_exact(&mut body[start..]).await?;
        if body.first() == Some(&CHAIN_TAG) {
            return Err(FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "a chain frame where only messages are spoken",
            )));
        }
    }
    Ok(serde_json::from_slice(&body)?)
}

/// Frame errors.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection.
    #[error("connection closed")]
    Closed,
    /// Reading or writing failed.
    #[error("frame io: {0}")]
    Io(#[from] std::io::Error),
    /// A frame longer than [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// A frame that is not valid JSON for the expected message.
    #[error("bad frame: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Encodes one message as a frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Writes one frame (blocking).
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), FrameError> {
    w.write_all(&encode(msg)?)?;
    Ok(())
}

/// The body length announced by a frame header, or why it is refused.
fn frame_len(
    read: std::io::Result<()>,
    header: [u8; 4],
    limit: usize,
) -> Result<usize, FrameError> {
    match read {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let n = u32::from_le_bytes(header) as usize;
    if n > limit {
        return Err(FrameError::TooLarge(n));
    }
    Ok(n)
}

/// Reads one message frame (blocking).
pub fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    let n = frame_len(r.read_exact(&mut len), len, MAX_FRAME_BYTES)?;
    Ok(serde_json::from_slice(&read_body(r, n)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_submit_round_trips() {
        let msg = ToWorker::Submit {
            id: 7,
            prompt: vec![2, 3],
            params: SamplingParams::greedy(4),
            priority: 2,
            resume: Resume {
                tokens: vec![9],
                text_bytes: 1,
            },
            tenant: "acme".into(),
            shared_tokens: 16,
        };
        let bytes = encode(&msg).unwrap();
        let back: ToWorker = read_frame(&mut bytes.as_slice()).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn load_figures_carry_each_tenants_use() {
        let stats = FromWorker::Stats {
            waiting: 1,
            running: 2,
            kv_used: 3,
            kv_total: 9,
            tenants: vec![weft_kernels::TenantUsage {
                tenant: "acme".into(),
                running: 2,
                waiting: 1,
                kv_blocks: 3,
                kv_quota: 4,
                served_tokens: 50,
                preemptions: 0,
            }],
            cache: crate::runner::CacheStats {
                hits: 1,
                ..Default::default()
            },
        };
        let bytes = encode(&stats).unwrap();
        assert_eq!(
            read_frame::<FromWorker>(&mut bytes.as_slice()).unwrap(),
            stats
        );
    }

    #[test]
    fn an_older_workers_load_figures_without_tenants_still_read() {
        let old = br#"{"Stats":{"waiting":0,"running":0,"kv_used":0,"kv_total":9}}"#;
        let mut framed = (old.len() as u32).to_le_bytes().to_vec();
        framed.extend_from_slice(old);
        assert!(matches!(
            read_frame::<FromWorker>(&mut framed.as_slice()).unwrap(),
            FromWorker::Stats { tenants, .. } if tenants.is_empty()
        ));
    }

    #[test]
    fn an_oversize_frame_is_refused() {
        let mut huge = ((MAX_FRAME_BYTES + 1) as u32).to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(matches!(
            read_frame::<ToWorker>(&mut huge.as_slice()),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn an_oversize_message_among_chain_frames_is_refused_before_its_body() {
        // 20 MiB announced, a message's first byte, and no more: refused at
        // once, without waiting for (or allocating) the rest
        let mut frame = ((20u32 << 20) + 1).to_le_bytes().to_vec();
        frame.push(b'{');
        assert!(matches!(
            read_any::<ToWorker>(&mut frame.as_slice()),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn a_chain_frame_announcing_more_than_it_sends_is_an_error() {
        let mut frame = (1u32 << 29).to_le_bytes().to_vec();
        frame.push(CHAIN_TAG);
        frame.extend_from_slice(&[0; 100]);
        assert!(matches!(
            read_any::<ToWorker>(&mut frame.as_slice()),
            Err(FrameError::Io(_))
        ));
    }

    #[test]
    fn an_empty_stream_reads_as_closed() {
        assert!(matches!(
            read_frame::<ToWorker>(&mut [].as_slice()),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn a_chain_frame_passes_whole_beside_messages() {
        let mut both = encode_chain(9, &[1, 2, 3]).unwrap();
        both.extend(encode(&ToWorker::Cancel { id: 4 }).unwrap());
        let mut r = both.as_slice();
        assert_eq!(
            read_any::<ToWorker>(&mut r).unwrap(),
            Frame::Chain {
                step: 9,
                body: vec![1, 2, 3]
            }
        );
        assert_eq!(
            read_any::<ToWorker>(&mut r).unwrap(),
            Frame::Msg(ToWorker::Cancel { id: 4 })
        );
    }

    #[test]
    fn a_frame_that_is_not_the_expected_json_is_a_decode_error() {
        let mut bad = 2u32.to_le_bytes().to_vec();
        bad.extend_from_slice(b"{]");
        assert!(matches!(
            read_frame::<ToWorker>(&mut bad.as_slice()),
            Err(FrameError::Decode(_))
        ));
    }
}
