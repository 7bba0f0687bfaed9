//! Answering an admitted request: submitting it to its runner and turning
//! the runner's updates into OpenAI's JSON, whole or as server-sent events,
//! within the request's deadline.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use weft_kernels::{FinishReason, TokenLogprob, Tokenizer};
use weft_worker::{Submission, SubmitError, Update};

use crate::error::{deadline_error, not_ready, replica_lost, worker_lost, ApiError};
use crate::headers::TOKEN_IDS_FIELD;
use crate::request::{Job, Kind};
use crate::state::AppState;
use crate::structured::{call_id, CallSplitter, Piece};
use crate::tenants::{Admission, Ticket};

/// Admits a validated request and answers it, whole or streamed; every
/// decision goes to the intent log.
pub(crate) async fn respond(s: Arc<AppState>, job: Result<Job, ApiError>) -> Response {
    let mut job = match job {
        Ok(j) => j,
        Err(e) => {
            s.metrics
                .request(&s.any_model_id(), e.status.as_u16(), "unknown");
            return e.into_response();
        }
    };
    let crit = job.criticality.as_str();
    let received = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    // a node alone asks its router what serving it here would take (a
    // cluster node's router did, where it routed the request)
    let mut route = None;
    let mut over_budget = None;
    if s.remote().is_none() && job.routed_id.is_none() && job.prediction.is_none() {
        if let Some(p) = s.predictor() {
            let intent = weft_placement::Intent {
                criticality: job.criticality,
                deadline_ms: job
                    .deadline
                    .map(|d| d.saturating_duration_since(Instant::now()).as_millis() as u64),
                max_cost: job.max_cost,
            };
            let (prediction, refused, record) = p.predict(
                &job.model.model_id,
                intent,
                job.prompt.len() as u32,
                job.params.max_tokens.min(u32::MAX as usize) as u32,
                crate::remote::LocalNode::load(&*s, &job.model.model_id),
            );
            job.prediction = prediction;
            route = Some(record);
            // alone, it keeps to the cost budget; deadlines it meets or
            // cancels as it serves
            over_budget =
                refused.filter(|r| matches!(r, weft_placement::Rejection::OverBudget { .. }));
        }
    }
    let decision = |id: Option<&str>, outcome: &str, reason: Option<&str>| {
        json!({
            "request_id": id,
            "routed_id": job.routed_id,
            "resumed_after": job.resume.as_ref().map(|r| r.tokens.len()),
            "tenant": job.tenant,
            "model": job.model.model_id,
            "intent": {
                "criticality": crit,
                "deadline_ms": job.deadline.map(|d| d.saturating_duration_since(Instant::now()).as_millis() as u64),
                "max_cost": job.max_cost,
            },
            "prediction": job.prediction,
            "route": route,
            "prompt_tokens": job.prompt.len(),
            "constrained": job.params.grammar.as_ref().map(|g| json!({
                "kind": if job.tool_calls { "tools" } else { g.kind() },
                "grammar_key": hex::encode(&g.key()[..8]),
            })),
            "user": job.user,
            "node": s.cfg.node_name,
            "trace_id": job.trace.trace_id,
            "span_id": job.trace.span_id,
            "parent_span_id": job.trace.parent_id,
            "decision": outcome,
            "reason": reason,
            "queue_waiting": job.model.runner.stats().waiting,
            "received_unix_ms": received,
        })
    };
    let admission = Admission {
        model: &job.model,
        tenant: &job.tenant,
        criticality: job.criticality,
        prompt_tokens: job.prompt.len(),
    };
    // a node without a data plane routes every request to itself (a
    // cluster node's router counted its own choice), before admission
    if s.remote().is_none() && job.routed_id.is_none() {
        s.metrics
            .routed("local", crit, job.prediction.map(|p| p.utility));
    }
    // a refused request's id in the log, given back with the refusal
    let refused_id = || {
        job.routed_id
            .clone()
            .unwrap_or_else(crate::request::new_request_id)
    };
    if let Some(rej) = over_budget {
        let e = crate::error::refusal(&rej);
        let id = refused_id();
        s.record(decision(Some(&id), "refused", Some(&e.message)));
        s.metrics
            .request(&job.model.model_id, e.status.as_u16(), crit);
        s.metrics
            .refused(crate::error::rejection_reason(&rej), crit);
        return with_request_id(e.into_response(), &id);
    }
    let mut ticket = match s.tenants.admit(&s.cfg, &s.policy(), admission) {
        Ok(t) => t,
        Err(e) => {
            let id = refused_id();
            s.record(decision(Some(&id), "refused", Some(&e.message)));
            s.metrics
                .request(&job.model.model_id, e.status.as_u16(), crit);
            if let Some(reason) = e.refused_because {
                s.metrics.refused(reason, crit);
            }
            return with_request_id(e.into_response(), &id);
        }
    };
    let prompt_tokens = job.prompt.len();
    let submission = Submission {
        prompt: job.prompt.clone(),
        params: job.params.clone(),
        priority: job.criticality.priority(),
        resume: job
            .resume
            .as_ref()
            .map(|r| weft_kernels::Resume {
                tokens: r.tokens.clone(),
                text_bytes: r.text_bytes,
            })
            .unwrap_or_default(),
        tenant: job.tenant.clone(),
        trace: Some((
            job.trace.header(),
            job.routed_id.clone().unwrap_or_default(),
        )),
        shared_tokens: s.shared_tokens(&job.model, &job.prompt),
    };
    let (id, rx) = match job.model.runner.submit(submission) {
        Ok(x) => x,
        Err(SubmitError::NotReady | SubmitError::TimedOut(_)) => {
            s.count_request(&job.model.model_id, 503, crit);
            s.metrics.refused("not_ready", crit);
            return not_ready().into_response();
        }
    };
    ticket.id = Some(id);
    let meta = Meta {
        id: match &job.resume {
            Some(r) => r.id.clone(),
            None => format!(
                "{}-{id}",
                if job.kind == Kind::Chat {
                    "chatcmpl"
                } else {
                    "cmpl"
                }
            ),
        },
        created: match &job.resume {
            Some(r) => r.created,
            None => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        },
        model: job.model.model_id.clone(),
        kind: job.kind,
        prompt_tokens,
        weft: json!({}),
    };
    let mut meta = meta;
    meta.weft = json!({
        "request_id": job.routed_id.clone().unwrap_or_else(|| meta.id.clone()),
        "served_by": s.cfg.node_name,
        "predicted_latency_ms": job.prediction.map(|p| p.latency_ms),
        "estimated_cost": job.prediction.map(|p| p.cost),
        "utility": job.prediction.map(|p| p.utility),
    });
    s.record(decision(Some(&meta.id), "admitted", None));
    tracing::info!(
        request_id = %meta.id,
        routed_id = job.routed_id.as_deref(),
        trace_id = %job.trace.trace_id,
        span_id = %job.trace.span_id,
        parent_span_id = job.trace.parent_id.as_deref(),
        model = %job.model.model_id,
        tenant = %job.tenant,
        criticality = crit,
        "admitted"
    );
    let headers = decision_headers(&s, &job, &meta);
    let mut resp = if job.stream {
        stream_response(s, job, ticket, rx, meta)
    } else {
        whole_response(s, job, ticket, rx, meta).await
    };
    for (k, v) in headers {
        resp.headers_mut().insert(k, v);
    }
    resp
}

/// `resp` with the id its refusal is logged under.
fn with_request_id(mut resp: Response, id: &str) -> Response {
    if let Ok(v) = axum::http::HeaderValue::try_from(id) {
        resp.headers_mut()
            .insert(crate::headers::REQUEST_ID_HEADER, v);
    }
    resp
}

/// The decision given back to the agent: the id its records are under,
/// the node serving it, and the router's prediction.
fn decision_headers(
    s: &AppState,
    job: &Job,
    meta: &Meta,
) -> Vec<(axum::http::HeaderName, axum::http::HeaderValue)> {
    use crate::headers::{REQUEST_ID_HEADER, SERVED_BY_HEADER};
    let id = job.routed_id.clone().unwrap_or_else(|| meta.id.clone());
    let mut out: Vec<(&str, String)> = vec![
        (REQUEST_ID_HEADER, id),
        (SERVED_BY_HEADER, s.cfg.node_name.clone()),
    ];
    if let Some(p) = job.prediction {
        out.extend(p.headers());
    }
    out.into_iter()
        .filter_map(|(k, v)| {
            Some((
                axum::http::HeaderName::from_static(k),
                axum::http::HeaderValue::try_from(v).ok()?,
            ))
        })
        .collect()
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    prompt_tokens: usize,
    /// `usage.weft`: the request's id in the intent log, the node serving
    /// it, and the router's prediction.
    weft: Value,
}

impl Meta {
    /// OpenAI's usage, `cached` of the prompt's tokens mapped from the
    /// prefix cache.
    fn usage(&self, completion: usize, cached: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached.min(self.prompt_tokens)},
            "weft": self.weft,
        })
    }
}

fn finish_str(f: &FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        _ => "stop",
    }
}

fn token_text(tok: &Tokenizer, id: u32) -> String {
    String::from_utf8_lossy(&tok.token_bytes(id, false)).into_owned()
}

fn chat_logprob(tok: &Tokenizer, lp: &TokenLogprob) -> Value {
    let entry = |id: u32, l: f32| json!({"token": token_text(tok, id), "logprob": l, "bytes": tok.token_bytes(id, false)});
    let mut v = entry(lp.token, lp.logprob);
    v["top_logprobs"] = Value::Array(lp.top.iter().map(|&(t, l)| entry(t, l)).collect());
    v
}

fn completion_logprobs(tok: &Tokenizer, lps: &[TokenLogprob]) -> Value {
    let mut offset = 0;
    let mut offsets = Vec::new();
    for lp in lps {
        offsets.push(offset);
        offset += token_text(tok, lp.token).len();
    }
    json!({
        "tokens": lps.iter().map(|l| token_text(tok, l.token)).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|l| l.top.iter().map(|&(t, p)| (token_text(tok, t), json!(p))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

async fn next_update(
    rx: &mut mpsc::UnboundedReceiver<Update>,
    deadline: Option<Instant>,
) -> Result<Option<Update>, ApiError> {
    match deadline {
        None => Ok(rx.recv().await),
        Some(d) => match tokio::time::timeout_at(d.into(), rx.recv()).await {
            Ok(u) => Ok(u),
            Err(_) => Err(deadline_error()),
        },
    }
}

async fn whole_response(
    s: Arc<AppState>,
    job: Job,
    mut ticket: Ticket,
    mut rx: mpsc::UnboundedReceiver<Update>,
    meta: Meta,
) -> Response {
    let crit = job.criticality.as_str();
    let start = Instant::now();
    let mut text = String::new();
    let mut tokens = 0usize;
    let mut lps = Vec::new();
    let mut cached: Option<usize> = None;
    let finish = loop {
        let u = match next_update(&mut rx, job.deadline).await {
            Ok(u) => u,
            Err(e) => {
                s.metrics
                    .request(&job.model.model_id, e.status.as_u16(), crit);
                s.metrics.deadline_missed(crit);
                return e.into_response();
            }
        };
        match u {
            Some(Update::Event {
                token,
                text: t,
                logprob,
                finish,
                cached: c,
            }) => {
                cached = cached.or(c);
                if token.is_some() {
                    if tokens == 0 {
                        s.metrics.ttft(start.elapsed().as_secs_f64());
                    }
                    tokens += 1;
                }
                text.push_str(&t);
                lps.extend(logprob);
                if let Some(f) = finish {
                    break f;
                }
            }
            Some(Update::Rejected(reason)) => {
                ticket.finished = true;
                s.count_request(&job.model.model_id, 400, crit);
                return ApiError::bad(reason).into_response();
            }
            Some(Update::WorkerLost) | None => {
                ticket.finished = true;
                s.count_request(&job.model.model_id, 503, crit);
                return worker_lost().into_response();
            }
        }
    };
    ticket.finished = true;
    s.metrics.tokens(tokens as u64);
    s.tenants.record_tokens(&job.tenant, tokens as u64);
    if let FinishReason::Lost(why) = &finish {
        s.count_request(&job.model.model_id, 503, crit);
        return replica_lost(why).into_response();
    }
    if let FinishReason::Error(msg) = &finish {
        s.count_request(&job.model.model_id, 500, crit);
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            msg.clone(),
        )
        .into_response();
    }
    s.count_request(&job.model.model_id, 200, crit);
    let choice = match meta.kind {
        Kind::Chat => {
            let mut message = json!({"role": "assistant", "content": text});
            let mut reason = finish_str(&finish);
            if job.tool_calls {
                let mut split = CallSplitter::default();
                let mut pieces = split.push(&text);
                pieces.extend(split.finish());
                let mut content = String::new();
                let mut calls = Vec::new();
                for p in pieces {
                    match p {
                        Piece::Text(t) => content.push_str(&t),
                        Piece::Call {
                            name, arguments, ..
                        } => calls.push(json!({
                            "id": call_id(),
                            "type": "function",
                            "function": {"name": name, "arguments": arguments},
                        })),
                    }
                }
                if !calls.is_empty() {
                    message = json!({
                        "role": "assistant",
                        "content": if content.is_empty() { Value::Null } else { json!(content) },
                        "tool_calls": calls,
                    });
                    if finish == FinishReason::Stop && !job.named_call {
                        reason = "tool_calls";
                    }
                }
            }
            json!({
                "index": 0,
                "message": message,
                "logprobs": if job.params.logprobs { json!({"content": lps.iter().map(|l| chat_logprob(&job.model.tokenizer, l)).collect::<Vec<_>>()}) } else { Value::Null },
                "finish_reason": reason,
            })
        }
        Kind::Completion => json!({
            "index": 0,
            "text": text,
            "logprobs": if job.params.logprobs { completion_logprobs(&job.model.tokenizer, &lps) } else { Value::Null },
            "finish_reason": finish_str(&finish),
        }),
    };
    Json(json!({
        "id": meta.id,
        "object": if meta.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": meta.created,
        "model": meta.model,
        "choices": [choice],
        "usage": meta.usage(tokens, cached.unwrap_or(0)),
    }))
    .into_response()
}

fn stream_response(
    s: Arc<AppState>,
    job: Job,
    mut ticket: Ticket,
    mut rx: mpsc::UnboundedReceiver<Update>,
    meta: Meta,
) -> Response {
    let (tx, out) = mpsc::channel::<Result<Event, Infallible>>(64);
    let crit = job.criticality.as_str();
    tokio::spawn(async move {
        let object = if meta.kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let chunk = |choice: Value| json!({"id": meta.id, "object": object, "created": meta.created, "model": meta.model, "choices": [choice]});
        let send = |v: Value| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(Event::default().data(v.to_string())))
                    .await
                    .is_ok()
            }
        };
        // a resumed stream's client has had its first chunk
        if meta.kind == Kind::Chat && job.resume.is_none() && !send(chunk(json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}))).await {
            return;
        }
        let start = Instant::now();
        let mut last = start;
        let resumed = job.resume.as_ref().map_or(0, |r| r.tokens.len());
        let mut tokens = 0usize;
        let mut cached: Option<usize> = None;
        let mut split = (meta.kind == Kind::Chat && job.tool_calls).then(CallSplitter::default);
        let status;
        loop {
            let u = match next_update(&mut rx, job.deadline).await {
                Ok(u) => u,
                Err(e) => {
                    status = e.status.as_u16();
                    s.metrics.deadline_missed(crit);
                    let _ = send(e.body()).await;
                    break;
                }
            };
            match u {
                Some(Update::Event {
                    token,
                    text,
                    logprob,
                    finish,
                    cached: c,
                }) => {
                    cached = cached.or(c);
                    if token.is_some() {
                        let now = Instant::now();
                        if tokens == 0 {
                            s.metrics.ttft(now.duration_since(start).as_secs_f64());
                        } else {
                            s.metrics
                                .inter_token(now.duration_since(last).as_secs_f64());
                        }
                        last = now;
                        tokens += 1;
                    }
                    if let Some(FinishReason::Lost(why)) = &finish {
                        ticket.finished = true;
                        status = 503;
                        let _ = send(replica_lost(why).body()).await;
                        break;
                    }
                    if let Some(FinishReason::Error(msg)) = &finish {
                        ticket.finished = true;
                        status = 500;
                        let _ = send(
                            ApiError::new(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "server_error",
                                msg.clone(),
                            )
                            .body(),
                        )
                        .await;
                        break;
                    }
                    let mut fin = finish.as_ref().map(finish_str);
                    // an answer that may hold calls: its text as it becomes
                    // final, each call when it is closed
                    let mut text = text;
                    if let Some(sp) = split.as_mut() {
                        let mut pieces = sp.push(&text);
                        if finish.is_some() {
                            pieces.extend(sp.finish());
                        }
                        text = String::new();
                        let mut ok = true;
                        for p in pieces {
                            let delta = match p {
                                Piece::Text(t) => {
                                    text.push_str(&t);
                                    continue;
                                }
                                Piece::Call {
                                    index,
                                    name,
                                    arguments,
                                } => [
                                    json!({"tool_calls": [{"index": index, "id": call_id(), "type": "function", "function": {"name": name, "arguments": ""}}]}),
                                    json!({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}),
                                ],
                            };
                            for d in delta {
                                ok = ok && send(chunk(json!({"index": 0, "delta": d, "logprobs": null, "finish_reason": null}))).await;
                            }
                        }
                        if !ok {
                            status = 499;
                            break;
                        }
                        if sp.calls() > 0 && finish == Some(FinishReason::Stop) && !job.named_call {
                            fin = Some("tool_calls");
                        }
                    }
                    if !text.is_empty() || logprob.is_some() || fin.is_some() {
                        let choice = match meta.kind {
                            Kind::Chat => json!({
                                "index": 0,
                                "delta": if text.is_empty() { json!({}) } else { json!({"content": text}) },
                                "logprobs": logprob.map(|l| json!({"content": [chat_logprob(&job.model.tokenizer, &l)]})),
                                "finish_reason": fin,
                            }),
                            Kind::Completion => json!({
                                "index": 0,
                                "text": text,
                                "logprobs": logprob.map(|l| completion_logprobs(&job.model.tokenizer, &[l])),
                                "finish_reason": fin,
                            }),
                        };
                        let mut c = chunk(choice);
                        if job.token_ids {
                            c[TOKEN_IDS_FIELD] = json!(token.into_iter().collect::<Vec<_>>());
                        }
                        if !send(c).await {
                            // the client went away: the ticket cancels the request
                            status = 499;
                            break;
                        }
                    }
                    if finish.is_some() {
                        ticket.finished = true;
                        status = 200;
                        if job.include_usage {
                            let _ = send(json!({"id": meta.id, "object": object, "created": meta.created, "model": meta.model, "choices": [], "usage": meta.usage(resumed + tokens, cached.unwrap_or(0))})).await;
                        }
                        break;
                    }
                }
                Some(Update::Rejected(reason)) => {
                    ticket.finished = true;
                    status = 400;
                    let _ = send(ApiError::bad(reason).body()).await;
                    break;
                }
                Some(Update::WorkerLost) | None => {
                    ticket.finished = true;
                    status = 503;
                    let _ = send(worker_lost().body()).await;
                    break;
                }
            }
        }
        s.metrics.tokens(tokens as u64);
        s.tenants.record_tokens(&job.tenant, tokens as u64);
        s.count_request(&job.model.model_id, status, crit);
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
        drop(ticket);
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out)).into_response()
}
