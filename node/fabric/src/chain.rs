//! Layer-sharded models across nodes.
//!
//! When the placement splits a model's layers over several nodes, the node
//! holding the first range (the head) serves the model through its API: its
//! worker runs the embedding and its layers, and every engine step sends the
//! head's hidden states down the chain. Each later node runs its range in a
//! shard worker and passes the result on to the next; the last range returns
//! the logits, which come back the same way to the head, which samples.
//!
//! A step crosses three kinds of link: the head worker's socket to its node,
//! the data plane (QUIC, one long-lived stream per chain) between nodes, and
//! each shard node's socket to its shard worker. They all carry the same
//! binary encoding, [`Message`] down and [`Reply`] up, so hidden states and
//! logits pass bit for bit: a chain's greedy output equals one node's.
//!
//! Sequence ids are the head's; each shard node maps them to ids unique in
//! its worker, so chains of several heads can share a shard. When a chain's
//! stream closes, its sequences are released on every node after it.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use weft_kernels::{Chunk, ChunkInput, ChunkOutput, SeqId};

use crate::dataplane::{ChainSession, Forwarder};
use crate::worker::supervisor::Supervisor;

/// One node of a chain after the head: who runs which layers of what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hop {
    /// The node's name.
    pub node: String,
    /// The model.
    pub model: String,
    /// The layers it runs.
    pub layers: Range<u32>,
}

impl std::fmt::Display for Hop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}[{}..{})@{}",
            self.model, self.layers.start, self.layers.end, self.node
        )
    }
}

/// What goes down a chain.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Run these chunks (hidden states) through the rest of the model; a
    /// [`Reply`] comes back.
    Forward(Vec<Chunk>),
    /// Forget these sequences (finished, cancelled or preempted at the
    /// head); no reply.
    Release(Vec<SeqId>),
}

/// What comes back up: one output per chunk (the last range's logits), or
/// why the step failed.
pub type Reply = std::result::Result<Vec<ChunkOutput>, String>;

const FORWARD: u8 = b'F';
const RELEASE: u8 = b'R';
const OUTPUTS: u8 = b'O';
const FAILED: u8 = b'E';
const TOKENS: u8 = 0;
const HIDDEN: u8 = 1;
const NO_LOGITS: u8 = 2;
const LOGITS: u8 = 3;
const LAST: u8 = 4;
const NO_LAST: u8 = 5;

fn put_u32(out: &mut Vec<u8>, v: usize) {
    out.extend_from_slice(&(v as u32).to_le_bytes());
}

fn put_f32s(out: &mut Vec<u8>, v: &[f32]) {
    put_u32(out, v.len());
    out.reserve(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

/// Reads an encoding back, refusing anything short or malformed.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        ensure!(self.0.len() >= n, "chain message cut short");
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<usize> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as usize)
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn f32s(&mut self) -> Result<Vec<f32>> {
        let n = self.u32()?;
        let b = self.take(n.checked_mul(4).context("chain message too long")?)?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }
    fn end(&self) -> Result<()> {
        ensure!(
            self.0.is_empty(),
            "{} stray bytes after a chain message",
            self.0.len()
        );
        Ok(())
    }
}

/// Encodes `m`.
pub fn encode_message(m: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    match m {
        Message::Forward(chunks) => {
            out.push(FORWARD);
            put_u32(&mut out, chunks.len());
            for c in chunks {
                out.extend_from_slice(&c.seq.to_le_bytes());
                out.extend_from_slice(&(c.pos as u64).to_le_bytes());
                out.push(u8::from(c.want_logits));
                match &c.input {
                    ChunkInput::Tokens(t) => {
                        out.push(TOKENS);
                        put_u32(&mut out, t.len());
                        for x in t {
                            out.extend_from_slice(&x.to_le_bytes());
                        }
                    }
                    ChunkInput::Hidden(h) => {
                        out.push(HIDDEN);
                        put_f32s(&mut out, h);
                    }
                }
            }
        }
        Message::Release(seqs) => {
            out.push(RELEASE);
            put_u32(&mut out, seqs.len());
            for s in seqs {
                out.extend_from_slice(&s.to_le_bytes());
            }
        }
    }
    out
}

/// Decodes a [`Message`].
pub fn decode_message(b: &[u8]) -> Result<Message> {
    let mut r = Reader(b);
    let m = match r.u8()? {
        FORWARD => {
            let n = r.u32()?;
            let mut chunks = Vec::with_capacity(n.min(4096));
            for _ in 0..n {
                let seq = r.u64()?;
                let pos = r.u64()? as usize;
                let want_logits = r.u8()? != 0;
                let input = match r.u8()? {
                    TOKENS => {
                        let k = r.u32()?;
                        let b = r.take(k.checked_mul(4).context("chain message too long")?)?;
                        ChunkInput::Tokens(
                            b.chunks_exact(4)
                                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                                .collect(),
                        )
                    }
                    HIDDEN => ChunkInput::Hidden(r.f32s()?),
                    k => bail!("unknown chunk input kind {k}"),
                };
                chunks.push(Chunk {
                    seq,
                    pos,
                    input,
                    want_logits,
                });
            }
            Message::Forward(chunks)
        }
        RELEASE => {
            let n = r.u32()?;
            Message::Release((0..n).map(|_| r.u64()).collect::<Result<_>>()?)
        }
        k => bail!("unknown chain message kind {k}"),
    };
    r.end()?;
    Ok(m)
}

/// Encodes `r`.
pub fn encode_reply(r: &Reply) -> Vec<u8> {
    let mut out = Vec::new();
    match r {
        Ok(outs) => {
            out.push(OUTPUTS);
            put_u32(&mut out, outs.len());
            for o in outs {
                match o {
                    ChunkOutput::Hidden(h) => {
                        out.push(HIDDEN);
                        put_f32s(&mut out, h);
                    }
                    ChunkOutput::Logits(None) => out.push(NO_LOGITS),
                    ChunkOutput::Logits(Some(l)) => {
                        out.push(LOGITS);
                        put_f32s(&mut out, l);
                    }
                    ChunkOutput::Last(None) => out.push(NO_LAST),
                    ChunkOutput::Last(Some(l)) => {
                        out.push(LAST);
                        put_f32s(&mut out, l);
                    }
                }
            }
        }
        Err(why) => {
            out.push(FAILED);
            out.extend_from_slice(why.as_bytes());
        }
    }
    out
}

/// Decodes a [`Reply`]; a malformed one is a failed step.
pub fn decode_reply(b: &[u8]) -> Reply {
    let mut r = Reader(b);
    let parse = |r: &mut Reader<'_>| -> Result<Reply> {
        match r.u8()? {
            OUTPUTS => {
                let n = r.u32()?;
                let mut outs = Vec::with_capacity(n.min(4096));
                for _ in 0..n {
                    outs.push(match r.u8()? {
                        HIDDEN => ChunkOutput::Hidden(r.f32s()?),
                        NO_LOGITS => ChunkOutput::Logits(None),
                        LOGITS => ChunkOutput::Logits(Some(r.f32s()?)),
                        LAST => ChunkOutput::Last(Some(r.f32s()?)),
                        NO_LAST => ChunkOutput::Last(None),
                        k => bail!("unknown chunk output kind {k}"),
                    });
                }
                r.end()?;
                Ok(Ok(outs))
            }
            FAILED => Ok(Err(String::from_utf8_lossy(r.0).into_owned())),
            k => bail!("unknown chain reply kind {k}"),
        }
    };
    parse(&mut r).unwrap_or_else(|e| Err(format!("bad reply from the chain: {e}")))
}

/// A failed step's reply, encoded.
pub fn failed(why: impl std::fmt::Display) -> Vec<u8> {
    encode_reply(&Err(why.to_string()))
}

/// Runs a head worker's chain steps over the data plane, in order: each
/// `(step, body)` from the worker goes down `route`, and a forward's reply
/// is handed to `reply`. Steps are never reordered: a release must reach
/// the shards before a later forward of the same sequence. A chain that
/// breaks fails the step it was on (the head ends its running sequences)
/// and is opened afresh for the next.
pub async fn relay(
    fwd: Arc<Forwarder>,
    route: Vec<Hop>,
    mut steps: tokio::sync::mpsc::UnboundedReceiver<(u64, Vec<u8>)>,
    reply: impl Fn(u64, Vec<u8>),
) {
    let mut session: Option<ChainSession> = None;
    while let Some((step, body)) = steps.recv().await {
        if session.is_none() {
            // a node of the chain may still be loading its range: a step
            // waits for it a while rather than failing at once
            let opened = if step == 0 {
                fwd.open_chain(&route).await
            } else {
                open_patiently(&fwd, &route).await
            };
            match opened {
                Ok(s) => session = Some(s),
                Err(e) => {
                    tracing::warn!(chain = %route_text(&route), "cannot open the chain: {e:#}");
                    if step != 0 {
                        reply(
                            step,
                            failed(format!("cannot reach {}: {e:#}", route[0].node)),
                        );
                    }
                    continue;
                }
            }
        }
        let s = session.as_mut().expect("opened above");
        if step == 0 {
            if let Err(e) = s.send(&body).await {
                tracing::warn!(chain = %route_text(&route), "chain broke: {e:#}");
                session = None;
            }
            continue;
        }
        match s.call(&body).await {
            Ok(r) => reply(step, r),
            Err(e) => {
                tracing::warn!(chain = %route_text(&route), "chain broke: {e:#}");
                session = None;
                reply(step, failed(format!("the chain broke: {e:#}")));
            }
        }
    }
}

/// How long a step waits for its chain to open.
const OPEN_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// Opens `route`, trying again every 200 ms for up to [`OPEN_PATIENCE`].
async fn open_patiently(fwd: &Forwarder, route: &[Hop]) -> Result<ChainSession> {
    let start = std::time::Instant::now();
    loop {
        match fwd.open_chain(route).await {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() >= OPEN_PATIENCE => return Err(e),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    }
}

/// `route` for logs: `m[2..4)@b -> m[4..6)@c`.
pub fn route_text(route: &[Hop]) -> String {
    route
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" -> ")
}

/// Ids unique among every sequence a shard worker of this node runs.
static NEXT_LOCAL: AtomicU64 = AtomicU64::new(1);

/// One chain stream on a shard node: runs each step on the local shard
/// worker, then on the rest of the chain, and answers with the last range's
/// output. `recv_step` gives the next encoded message (`None`: the stream
/// ended), `send_reply` answers one.
pub struct ShardSession {
    worker: Supervisor,
    rest: Vec<Hop>,
    fwd: Option<Arc<Forwarder>>,
    next: Option<ChainSession>,
    /// The head's sequence ids to this worker's.
    ids: HashMap<SeqId, SeqId>,
}

impl ShardSession {
    /// A session on `worker`, passing results on to `rest` (empty: this
    /// node runs the last range).
    pub fn new(worker: Supervisor, rest: Vec<Hop>, fwd: Option<Arc<Forwarder>>) -> Self {
        Self {
            worker,
            rest,
            fwd,
            next: None,
            ids: HashMap::new(),
        }
    }

    /// Handles one message; `Some(reply)` for a forward.
    pub async fn handle(&mut self, body: &[u8]) -> Option<Vec<u8>> {
        let msg = match decode_message(body) {
            Ok(m) => m,
            Err(e) => return Some(failed(e)),
        };
        match msg {
            Message::Release(seqs) => {
                let local: Vec<SeqId> = seqs.iter().filter_map(|s| self.ids.remove(s)).collect();
                if !local.is_empty() {
                    self.worker
                        .chain_send(encode_message(&Message::Release(local)));
                }
                if let Some(n) = self.next.as_mut() {
                    if n.send(body).await.is_err() {
                        self.next = None;
                    }
                }
                None
            }
            Message::Forward(chunks) => Some(self.forward(chunks).await),
        }
    }

    async fn forward(&mut self, chunks: Vec<Chunk>) -> Vec<u8> {
        let local: Vec<Chunk> = chunks
            .iter()
            .map(|c| Chunk {
                seq: *self
                    .ids
                    .entry(c.seq)
                    .or_insert_with(|| NEXT_LOCAL.fetch_add(1, Ordering::Relaxed)),
                pos: c.pos,
                input: c.input.clone(),
                want_logits: c.want_logits,
            })
            .collect();
        let here = match self
            .worker
            .chain_call(encode_message(&Message::Forward(local)))
            .await
        {
            Ok(r) => r,
            Err(e) => return failed(format!("shard worker: {e}")),
        };
        if self.rest.is_empty() {
            return here; // the last range: its logits go back as they are
        }
        let outs = match decode_reply(&here) {
            Ok(o) => o,
            Err(why) => return failed(why),
        };
        let next = match weft_kernels::next_input(&chunks, outs) {
            Ok(n) => n,
            Err(e) => return failed(e),
        };
        if self.next.is_none() {
            let Some(fwd) = self.fwd.as_ref() else {
                return failed("this node has no data plane to pass the step on");
            };
            match open_patiently(fwd, &self.rest).await {
                Ok(s) => self.next = Some(s),
                Err(e) => return failed(format!("cannot reach {}: {e:#}", self.rest[0].node)),
            }
        }
        let n = self.next.as_mut().expect("opened above");
        match n.call(&encode_message(&Message::Forward(next))).await {
            Ok(r) => r,
            Err(e) => {
                self.next = None;
                failed(format!("the chain broke after this node: {e:#}"))
            }
        }
    }
}

impl Drop for ShardSession {
    /// The head is gone: its sequences are released here (and after here,
    /// by the next session's end).
    fn drop(&mut self) {
        let local: Vec<SeqId> = self.ids.drain().map(|(_, v)| v).collect();
        if !local.is_empty() {
            self.worker
                .chain_send(encode_message(&Message::Release(local)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_replies_round_trip_bit_for_bit_and_garbage_is_refused() {
        let m = Message::Forward(vec![
            Chunk {
                seq: 7,
                pos: 3,
                input: ChunkInput::Hidden(vec![1.5, -0.0, f32::MIN_POSITIVE, 1e-30]),
                want_logits: true,
            },
            Chunk {
                seq: u64::MAX,
                pos: 0,
                input: ChunkInput::Tokens(vec![2, 99]),
                want_logits: false,
            },
        ]);
        let b = encode_message(&m);
        assert_eq!(decode_message(&b).unwrap(), m);
        let rel = Message::Release(vec![1, 2]);
        assert_eq!(decode_message(&encode_message(&rel)).unwrap(), rel);
        let r: Reply = Ok(vec![
            ChunkOutput::Logits(None),
            ChunkOutput::Logits(Some(vec![0.1, 0.2])),
            ChunkOutput::Hidden(vec![3.0]),
            ChunkOutput::Last(None),
            ChunkOutput::Last(Some(vec![4.0])),
        ]);
        assert_eq!(decode_reply(&encode_reply(&r)), r);
        assert_eq!(decode_reply(&failed("gone")), Err("gone".to_string()));
        // cut short, trailing bytes, unknown kinds
        assert!(decode_message(&b[..b.len() - 1]).is_err());
        let mut long = b.clone();
        long.push(0);
        assert!(decode_message(&long).is_err());
        assert!(decode_message(b"X").is_err());
        assert!(decode_reply(b"Z").is_err());
        assert!(decode_reply(&encode_reply(&r)[..5]).is_err());
    }
}
