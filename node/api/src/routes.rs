//! The routes: `/v1/chat/completions`, `/v1/completions` (streamed as
//! server-sent events or whole), `/v1/models`, `/healthz`, `/readyz`,
//! `/metrics`. A cluster node first asks its [`Remote`] where a request
//! goes; the rest is checked and served here.
//!
//! [`Remote`]: crate::remote::Remote

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use weft_kernels::ChatMessage;
use weft_placement::{Criticality, Intent};

use crate::error::{refusal, ApiError};
use crate::headers::{header_str, Forwarded, CRITICALITY_HEADER, DEADLINE_HEADER};
use crate::remote::{RouteAsk, Routing};
use crate::request::{
    job, new_request_id, parse_body, prepare, read_bytes, ChatBody, CompletionBody, ContentField,
    IntentField, Kind, PromptField,
};
use crate::respond::respond;
use crate::served::Served;
use crate::state::AppState;
use crate::structured;
use crate::tenants::authenticate;
use crate::trace::Trace;

/// The API's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "no such endpoint",
            )
        })
        .with_state(state)
}

/// Ready when at least one model is held and every held model's worker
/// serves. Shows the first model's worker (and every model's id).
async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    let held = s.held();
    let Some(first) = held.first() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "why": "no model is held yet", "models": []})),
        )
            .into_response();
    };
    let runner = &first.runner;
    let worker = match runner.confinement() {
        Some((c, reached)) => {
            json!({"pid": runner.worker_pid(), "confinement": c, "reached_node": reached, "restarts": runner.restarts()})
        }
        None => json!({"pid": runner.worker_pid(), "restarts": runner.restarts()}),
    };
    let ids: Vec<&str> = held.iter().map(|m| m.model_id.as_str()).collect();
    if let Some(why) = held.iter().find_map(|m| m.runner.refused()) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "why": why, "models": ids, "worker": worker})),
        )
            .into_response();
    }
    if held.iter().all(|m| m.runner.is_ready()) {
        Json(json!({"status": "ready", "model": first.model_id, "models": ids, "worker": worker}))
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "models": ids, "worker": worker})),
        )
            .into_response()
    }
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let mut r = weft_metrics::encode(s.registry()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(weft_metrics::CONTENT_TYPE),
    );
    r
}

async fn models(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authenticate(&s.policy(), &headers)?;
    Ok(Json(
        json!({"object": "list", "data": s.held().iter().map(|m| json!({"id": m.model_id, "object": "model", "created": 0, "owned_by": "weft"})).collect::<Vec<_>>()}),
    ))
}

/// What serving a request here starts from.
struct Here {
    /// This node's span of the request's trace.
    trace: Trace,
    /// The id its routing decision was logged under, when this node routed it.
    routed_id: Option<String>,
    /// What the router predicted of serving it here.
    prediction: Option<crate::remote::Prediction>,
}

/// Starts this node's span of the request's trace and routes it (see
/// [`elsewhere`]): `Err` is the answer when it was answered elsewhere or
/// refused.
async fn route_first(
    s: &Arc<AppState>,
    headers: &HeaderMap,
    fwd: Option<&Forwarded>,
    uri: &'static str,
    bytes: &axum::body::Bytes,
) -> Result<Here, Response> {
    let trace = Trace::from_headers(headers);
    let mut routed = (None, None);
    match elsewhere(s, headers, fwd, uri, bytes, &trace, &mut routed).await {
        Some(answered) => Err(answered),
        None => Ok(Here {
            trace,
            routed_id: routed.0,
            prediction: routed.1,
        }),
    }
}

/// Routes a request on a cluster node: `None` serves it here (or lets the
/// local checks refuse it); otherwise the answer came from a peer, or is
/// the router's refusal. Every decision is in the intent log.
async fn elsewhere(
    s: &Arc<AppState>,
    headers: &HeaderMap,
    fwd: Option<&Forwarded>,
    uri: &'static str,
    bytes: &axum::body::Bytes,
    trace: &Trace,
    // the id its decision is logged under, and the router's prediction
    routed: &mut (Option<String>, Option<crate::remote::Prediction>),
) -> Option<Response> {
    let remote = s.remote()?;
    /// Only the fields routing needs; the rest is checked where it is served.
    #[derive(Deserialize)]
    struct Routable {
        model: String,
        max_tokens: Option<u64>,
        max_completion_tokens: Option<u64>,
        #[serde(default)]
        stream: bool,
        weft: Option<IntentField>,
        response_format: Option<Value>,
        tools: Option<Value>,
        tool_choice: Option<Value>,
    }
    let r = serde_json::from_slice::<Routable>(bytes).ok()?;
    let held = s.find(&r.model).is_some();
    let hops = fwd.map_or(0, |f| f.hops);
    // a forwarded request was routed by the node that sent it
    if hops > 0 && held {
        return None;
    }
    let tenant = match authenticate(&s.policy(), headers) {
        Ok(t) => t,
        Err(e) => return Some(e.into_response()),
    };
    let w = r.weft.as_ref();
    let intent = Intent {
        criticality: w
            .and_then(|i| i.criticality.as_deref())
            .or_else(|| header_str(headers, CRITICALITY_HEADER))
            .and_then(Criticality::parse)
            .unwrap_or(Criticality::Standard),
        deadline_ms: w
            .and_then(|i| i.deadline_ms)
            .or_else(|| header_str(headers, DEADLINE_HEADER).and_then(|v| v.trim().parse().ok())),
        max_cost: w.and_then(|i| i.max_cost),
    };
    let output_tokens = r
        .max_completion_tokens
        .or(r.max_tokens)
        .unwrap_or(s.cfg.default_max_tokens as u64)
        .min(u32::MAX as u64) as u32;
    let request_id = fwd
        .and_then(|f| f.request_id.clone())
        .unwrap_or_else(new_request_id);
    let ask = RouteAsk {
        uri,
        headers: headers.clone(),
        body: bytes.clone(),
        model: r.model.clone(),
        stream: r.stream,
        hops,
        tenant,
        intent,
        output_tokens,
        request_id,
        max_queue: s.cfg.max_queue,
        trace: trace.clone(),
        constrained: constrained(&r.tools, &r.tool_choice, &r.response_format),
    };
    let crit = intent.criticality.as_str();
    routed.0 = Some(ask.request_id.clone());
    match remote.route(ask, s.clone()).await {
        Routing::Here(p) => {
            routed.1 = p;
            None
        }
        Routing::Answered(resp) => Some(resp),
        Routing::Refused(rej) => {
            let e = refusal(&rej);
            s.count_request(&r.model, e.status.as_u16(), crit);
            s.metrics
                .refused(crate::error::rejection_reason(&rej), crit);
            // the id the refusal is logged under
            let mut resp = e.into_response();
            if let Some(v) = routed
                .0
                .as_deref()
                .and_then(|id| axum::http::HeaderValue::try_from(id).ok())
            {
                resp.headers_mut()
                    .insert(crate::headers::REQUEST_ID_HEADER, v);
            }
            Some(resp)
        }
        Routing::Looped(why) => {
            s.metrics.refused("looped", crit);
            Some(ApiError::new(StatusCode::LOOP_DETECTED, "server_error", why).into_response())
        }
        Routing::Failed(why) => {
            s.metrics.refused("replicas_failed", crit);
            s.count_request(&r.model, 502, crit);
            Some(ApiError::new(StatusCode::BAD_GATEWAY, "server_error", why).into_response())
        }
    }
}

/// Checks that `grammar` compiles for `model` (off the async runtime: a
/// first compile indexes the vocabulary), or a 400 naming `param`.
async fn checked(
    model: &Arc<Served>,
    grammar: Option<&weft_kernels::Grammar>,
    param: &'static str,
) -> Result<(), ApiError> {
    let Some(g) = grammar.cloned() else {
        return Ok(());
    };
    let m = model.clone();
    match tokio::task::spawn_blocking(move || m.check_grammar(&g)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ApiError::bad(e.to_string())
            .param(param)
            .code("invalid_response_format")),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("the grammar check failed: {e}"),
        )),
    }
}

/// What constrains a request's output, as the intent log names it.
fn constrained(
    tools: &Option<Value>,
    choice: &Option<Value>,
    format: &Option<Value>,
) -> Option<String> {
    let has_tools = tools
        .as_ref()
        .and_then(Value::as_array)
        .is_some_and(|t| !t.is_empty());
    if has_tools && choice.as_ref().and_then(Value::as_str) != Some("none") {
        return Some("tools".into());
    }
    format
        .as_ref()
        .and_then(|f| f.get("type"))
        .and_then(Value::as_str)
        .filter(|t| *t != "text")
        .map(String::from)
}

async fn completions(State(s): State<Arc<AppState>>, headers: HeaderMap, req: Request) -> Response {
    let fwd = req.extensions().get::<Forwarded>().cloned();
    let bytes = match read_bytes(&s, req).await {
        Ok(b) => b,
        Err(e) => return respond(s, Err(e)).await,
    };
    let Here {
        trace,
        routed_id,
        prediction,
    } = match route_first(&s, &headers, fwd.as_ref(), "/v1/completions", &bytes).await {
        Ok(h) => h,
        Err(answered) => return answered,
    };
    let r = async {
        let tenant = authenticate(&s.policy(), &headers)?;
        crate::fields::check(Kind::Completion, &bytes)?;
        let body: CompletionBody = parse_body(&bytes)?;
        let prepared = prepare(&s, &body.common, &headers)?;
        let grammar = structured::response_grammar(body.common.response_format.as_ref())?;
        checked(&prepared.model, grammar.as_ref(), "response_format").await?;
        let text = match body.prompt {
            PromptField::Text(t) => t,
            PromptField::Texts(v) if v.len() == 1 => v.into_iter().next().unwrap_or_default(),
            PromptField::Texts(_) => {
                return Err(
                    ApiError::bad("only one prompt per request is supported").param("prompt")
                )
            }
        };
        let logprobs = body.logprobs.map(|n| (n, "logprobs"));
        let prompt = prepared.model.tokenizer.encode(&text, true, false);
        job(
            &s,
            Kind::Completion,
            tenant,
            prompt,
            prepared,
            &body.common,
            fwd.as_ref(),
            logprobs,
            trace,
        )
        .map(|mut j| {
            j.params.grammar = grammar;
            j.routed_id = j.routed_id.or(routed_id);
            j.prediction = j.prediction.or(prediction);
            // valid: this node is about to hold its prefix
            s.note_prefix(&j.tenant, &bytes);
            j
        })
    }
    .await;
    respond(s, r).await
}

async fn chat(State(s): State<Arc<AppState>>, headers: HeaderMap, req: Request) -> Response {
    let fwd = req.extensions().get::<Forwarded>().cloned();
    let bytes = match read_bytes(&s, req).await {
        Ok(b) => b,
        Err(e) => return respond(s, Err(e)).await,
    };
    let Here {
        trace,
        routed_id,
        prediction,
    } = match route_first(&s, &headers, fwd.as_ref(), "/v1/chat/completions", &bytes).await {
        Ok(h) => h,
        Err(answered) => return answered,
    };
    let r = async {
        let tenant = authenticate(&s.policy(), &headers)?;
        crate::fields::check(Kind::Chat, &bytes)?;
        let body: ChatBody = parse_body(&bytes)?;
        let prepared = prepare(&s, &body.common, &headers)?;
        if body.messages.is_empty() {
            return Err(ApiError::bad("messages must not be empty").param("messages"));
        }
        let mut messages = Vec::with_capacity(body.messages.len());
        for m in body.messages {
            if !matches!(
                m.role.as_str(),
                "system" | "developer" | "user" | "assistant" | "model" | "tool"
            ) {
                return Err(ApiError::bad(format!("unknown role {:?}", m.role)).param("messages"));
            }
            let content = match m.content {
                None => String::new(),
                Some(ContentField::Text(t)) => t,
                Some(ContentField::Parts(parts)) => {
                    let mut t = String::new();
                    for p in parts {
                        if p.kind != "text" {
                            return Err(ApiError::bad(format!(
                                "content parts of type {:?} are not supported",
                                p.kind
                            ))
                            .param("messages"));
                        }
                        t.push_str(p.text.as_deref().unwrap_or(""));
                    }
                    t
                }
            };
            // the names chat templates know
            let role = match m.role.as_str() {
                "developer" => "system".to_string(),
                "model" => "assistant".to_string(),
                _ => m.role,
            };
            messages.push(ChatMessage {
                role,
                content,
                tool_calls: m.tool_calls,
                tool_call_id: m.tool_call_id,
                name: m.name,
            });
        }
        let tools = structured::parse_tools(body.tools.as_ref())?;
        let choice = structured::parse_tool_choice(body.tool_choice.as_ref(), &tools)?;
        let answer = structured::response_grammar(body.common.response_format.as_ref())?;
        let grammar = structured::tool_grammar(
            &tools,
            &choice,
            body.parallel_tool_calls.unwrap_or(true),
            answer.as_ref(),
        )?;
        let calls = choice != structured::ToolChoice::None;
        checked(
            &prepared.model,
            grammar.as_ref(),
            if calls { "tools" } else { "response_format" },
        )
        .await?;
        let (messages, shown) =
            structured::conversation(&prepared.model.tokenizer, messages, &tools, &choice);
        let logprobs = body
            .logprobs
            .then(|| (body.top_logprobs.unwrap_or(0), "top_logprobs"));
        let prompt = prepared
            .model
            .tokenizer
            .encode_chat(&messages, shown.as_ref())
            .map_err(|e| {
                let no_template = matches!(e, weft_kernels::KernelError::NoChatTemplate);
                let err = ApiError::bad(format!("{e}")).param("messages");
                if no_template {
                    err.code("model_has_no_chat_template")
                } else {
                    err
                }
            })?;
        job(
            &s,
            Kind::Chat,
            tenant,
            prompt,
            prepared,
            &body.common,
            fwd.as_ref(),
            logprobs,
            trace,
        )
        .map(|mut j| {
            j.params.grammar = grammar;
            j.tool_calls = calls;
            j.named_call = matches!(choice, structured::ToolChoice::Named(_));
            j.routed_id = j.routed_id.or(routed_id);
            j.prediction = j.prediction.or(prediction);
            // valid: this node is about to hold its prefix
            s.note_prefix(&j.tenant, &bytes);
            j
        })
    }
    .await;
    respond(s, r).await
}
