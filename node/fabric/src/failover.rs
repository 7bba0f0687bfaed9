//! A forwarded request that fails, and a forwarded stream whose replica
//! dies midway: the request goes to the next replica the router offers;
//! a stream resumes there from the tokens the client already has, so the
//! client sees no gap, repeat or restart. A replica is taken as dead when
//! it leaves the gossip table, when its heartbeats stop, or when its stream
//! goes quiet while its reports age.

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use std::sync::Arc;
use tokio::sync::mpsc;
use weft_api::headers::{SERVED_BY_HEADER, TOKEN_IDS_FIELD};
use weft_cluster::overlay::NODE_TIMEOUT;

use crate::forwarder::{target_name, Chunks, Forwarder, Outgoing};
use crate::routing::Target;
use crate::wire::ReplyHead;

/// Chooses where a request goes next, given the nodes that failed it.
pub type Reroute = Box<dyn Fn(&[String]) -> Option<Target> + Send + Sync>;
/// Appends a record to the intent log.
pub type Record = Box<dyn Fn(serde_json::Value) + Send + Sync>;

/// How many replicas a request tries before it fails.
const MAX_TRIES: usize = 4;
/// A forwarded stream that sent tokens and then nothing for this long is
/// taken as stalled and resumed elsewhere. A dead peer is noticed sooner:
/// it leaves the gossip table ([`NODE_TIMEOUT`] after its last report),
/// or its connection times out ([`crate::forwarder::DATA_IDLE_TIMEOUT`]).
pub const STALL: Duration = Duration::from_secs(10);
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
/// A heartbeating stream silent this long, whose peer's last report is
/// older than [`BEAT_AGE`], is taken as cut.
const BEAT_QUIET: Duration = Duration::from_millis(300);
/// See [`BEAT_QUIET`].
const BEAT_AGE: Duration = Duration::from_millis(500);

impl Forwarder {
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
