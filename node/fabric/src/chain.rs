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
//! each shard node's socket to its shard worker. They all carry the
//! encoding of [`weft_worker::chain`], so hidden states and logits pass bit
//! for bit: a chain's greedy output equals one node's.
//!
//! Sequence ids are the head's; each shard node maps them to ids unique in
//! its worker, so chains of several heads can share a shard. When a chain's
//! stream closes, its sequences are released on every node after it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Result;
use tokio::sync::mpsc;
use weft_api::trace::{Trace, TRACEPARENT_HEADER};
use weft_kernels::BlockHash;
use weft_kernels::{Chunk, SeqId};
use weft_worker::chain::{
    decode_mapped, decode_message, decode_reply, encode_message, failed, mapped, wants_reply,
    Message, SeqTrace,
};
use weft_worker::{ChainLink, StepReply, Supervisor};

use crate::forwarder::{ChainSession, Forwarder};
use crate::hop::{route_text, Hop};

/// Where a head worker's steps go: the data plane, down `hops`.
#[derive(Clone)]
pub struct ChainRoute {
    /// The data plane.
    pub fwd: Arc<Forwarder>,
    /// The nodes after the head, in layer order.
    pub hops: Vec<Hop>,
}

impl std::fmt::Debug for ChainRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&route_text(&self.hops))
    }
}

impl ChainLink for ChainRoute {
    fn relay(
        &self,
        steps: mpsc::UnboundedReceiver<(u64, Vec<u8>)>,
        reply: StepReply,
    ) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(relay(self.fwd.clone(), self.hops.clone(), steps, reply))
    }
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
        if !s.speaks_v2() && is_v2_only(&body) {
            // an older next node would answer it out of turn: a map finds
            // nothing cached there, the rest is not sent
            if step != 0 {
                reply(step, mapped(0));
            }
            continue;
        }
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

/// Whether `body` is a message of version 2 of the chain protocol (a trace
/// note, a prefix map or registration), which an older node cannot take.
fn is_v2_only(body: &[u8]) -> bool {
    matches!(body.first(), Some(b'T' | b'M' | b'G'))
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
    /// Trace notes for the next node, held until its stream opens (at
    /// most [`MAX_HELD_TRACES`]).
    traces: Vec<SeqTrace>,
}

/// Most trace notes a shard session holds for a next node not yet open.
const MAX_HELD_TRACES: usize = 1024;

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
            traces: Vec::new(),
        }
    }

    /// Handles one message; `Some(reply)` for a forward or a map. A
    /// message it cannot decode gets a failed reply only if its kind wants
    /// a reply: one that wants none (from a newer node) is dropped, so the
    /// replies on the stream stay in step.
    pub async fn handle(&mut self, body: &[u8]) -> Option<Vec<u8>> {
        let msg = match decode_message(body) {
            Ok(m) => m,
            Err(e) if wants_reply(body) => return Some(failed(e)),
            Err(e) => {
                tracing::warn!("dropping a chain message this node cannot read: {e:#}");
                return None;
            }
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
            Message::Trace(notes) => {
                let notes = self.log_traces(notes);
                let held = self.next.is_none() && !self.rest.is_empty();
                if let Some(n) = self.next.as_mut().filter(|n| n.speaks_v2()) {
                    if n.send(&encode_message(&Message::Trace(notes)))
                        .await
                        .is_err()
                    {
                        self.next = None;
                    }
                } else if held {
                    // passed on once the next node's stream is open
                    let room = MAX_HELD_TRACES.saturating_sub(self.traces.len());
                    self.traces.extend(notes.into_iter().take(room));
                }
                None
            }
            Message::Map { seq, hashes } => Some(self.map(seq, hashes).await),
            Message::Register(entries) => {
                let local: Vec<(SeqId, u32, Vec<BlockHash>)> = entries
                    .iter()
                    .filter_map(|(seq, first, h)| Some((*self.ids.get(seq)?, *first, h.clone())))
                    .collect();
                if !local.is_empty() {
                    self.worker
                        .chain_send(encode_message(&Message::Register(local)));
                }
                if let Some(n) = self.next.as_mut().filter(|n| n.speaks_v2()) {
                    if n.send(body).await.is_err() {
                        self.next = None;
                    }
                }
                None
            }
        }
    }

    /// Maps a new sequence's cached prefix on this node's shard worker and
    /// on the rest of the chain: each node maps what it has of what the one
    /// before mapped, and keeps what the last one mapped. The reply is
    /// [`mapped`] with that count.
    async fn map(&mut self, seq: SeqId, hashes: Vec<BlockHash>) -> Vec<u8> {
        let local = *self
            .ids
            .entry(seq)
            .or_insert_with(|| NEXT_LOCAL.fetch_add(1, Ordering::Relaxed));
        let ask = |hashes: Vec<BlockHash>| encode_message(&Message::Map { seq: local, hashes });
        let here = match self.worker.chain_call(ask(hashes.clone())).await {
            Ok(r) => match decode_mapped(&r) {
                Ok(n) => n.min(hashes.len()),
                Err(why) => return failed(why),
            },
            Err(e) => return failed(format!("shard worker: {e}")),
        };
        if self.rest.is_empty() || here == 0 {
            return mapped(here);
        }
        if self.next.is_none() {
            let Some(fwd) = self.fwd.as_ref() else {
                return failed("this node has no data plane to pass the map on");
            };
            match open_patiently(fwd, &self.rest).await {
                Ok(s) => self.next = Some(s),
                Err(e) => return failed(format!("cannot reach {}: {e:#}", self.rest[0].node)),
            }
        }
        let n = self.next.as_mut().expect("opened above");
        let down = if n.speaks_v2() {
            let body = encode_message(&Message::Map {
                seq,
                hashes: hashes[..here].to_vec(),
            });
            match n.call(&body).await {
                Ok(r) => decode_mapped(&r).unwrap_or(0).min(here),
                Err(e) => {
                    self.next = None;
                    return failed(format!("the chain broke after this node: {e:#}"));
                }
            }
        } else {
            0
        };
        if down < here {
            // the later nodes hold less: keep only as much here
            if let Err(e) = self.worker.chain_call(ask(hashes[..down].to_vec())).await {
                return failed(format!("shard worker: {e}"));
            }
        }
        mapped(down)
    }

    /// Logs this node's part of each request in `notes` under its trace (a
    /// span of this node's, child of the sender's), and gives the notes to
    /// pass on: this node's span the next one's parent.
    fn log_traces(&self, notes: Vec<SeqTrace>) -> Vec<SeqTrace> {
        notes
            .into_iter()
            .map(|n| {
                let mut h = axum::http::HeaderMap::new();
                if let Ok(v) = n.traceparent.parse() {
                    h.insert(TRACEPARENT_HEADER, v);
                }
                let t = Trace::from_headers(&h);
                tracing::info!(
                    request_id = %n.request_id,
                    trace_id = %t.trace_id,
                    span_id = %t.span_id,
                    parent_span_id = t.parent_id.as_deref(),
                    seq = n.seq,
                    rest = %route_text(&self.rest),
                    "chain sequence"
                );
                SeqTrace {
                    traceparent: t.header(),
                    ..n
                }
            })
            .collect()
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
                Ok(mut s) => {
                    let traces = std::mem::take(&mut self.traces);
                    if !traces.is_empty() && s.speaks_v2() {
                        // best effort: the step below finds a broken stream
                        let _ = s.send(&encode_message(&Message::Trace(traces))).await;
                    }
                    self.next = Some(s)
                }
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
