//! The OpenAI-compatible HTTP API: `/v1/chat/completions`, `/v1/completions`
//! (streamed as server-sent events or whole), `/v1/models`, `/healthz`,
//! `/readyz`, `/metrics`. Intent (`weft` body object or `x-weft-*` headers)
//! orders admission; API keys map to tenants with their own limits. Every
//! error is OpenAI's error JSON with the right status.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use weft_kernels::{ChatMessage, FinishReason, SamplingParams, TokenLogprob, Tokenizer};
use weft_placement::{AdmissionPolicy, Criticality, NodeLoad};

use crate::config::NodeConfig;
use crate::metrics::{Gauges, Metrics};
use crate::worker::supervisor::{SubmitError, Supervisor, Update};

/// Most stop strings a request may give (as OpenAI allows).
const MAX_STOP_STRINGS: usize = 4;
/// Most alternatives per token in log-probabilities.
const MAX_TOP_LOGPROBS: u32 = 20;
/// Seconds a refused client is told to wait.
const RETRY_AFTER_S: u64 = 1;
/// Length of the tokens-per-minute window.
const TPM_WINDOW: Duration = Duration::from_secs(60);

/// An OpenAI-shaped error.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            code: None,
            param: None,
            message: message.into(),
            retry_after: None,
        }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    fn param(mut self, p: &'static str) -> Self {
        self.param = Some(p);
        self
    }
    fn code(mut self, c: &'static str) -> Self {
        self.code = Some(c);
        self
    }
    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

#[derive(Debug, Default)]
struct TenantUse {
    concurrent: usize,
    window: VecDeque<(Instant, u64)>,
}

/// Everything the handlers share.
pub struct Served {
    /// The model's id (what requests name).
    pub model_id: String,
    /// Its tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// Its worker.
    pub supervisor: Supervisor,
}

/// What the API serves: the node's settings, the models it holds now (a
/// cluster node adds and drops them as placement epochs change), metrics
/// and tenants' use.
pub struct AppState {
    /// The node's settings.
    pub cfg: NodeConfig,
    /// Metrics.
    pub metrics: Metrics,
    /// Held models, the first one answering for `default`.
    models: RwLock<Vec<Arc<Served>>>,
    tenants: Mutex<HashMap<String, TenantUse>>,
    /// Where admission decisions are recorded, if anywhere.
    intent: Mutex<Option<crate::audit::IntentLog>>,
    /// Sends requests for models held elsewhere to a peer (cluster nodes).
    forwarder: RwLock<Option<Arc<crate::dataplane::Forwarder>>>,
    /// Shard workers of the layer ranges this node runs for chains, by
    /// `<model>/<first layer>/<end layer>`.
    shards: RwLock<HashMap<String, Supervisor>>,
}

impl AppState {
    /// Shared state for the router, serving one model.
    pub fn new(
        cfg: NodeConfig,
        model_id: String,
        tokenizer: Arc<Tokenizer>,
        supervisor: Supervisor,
    ) -> Arc<Self> {
        let s = Self::empty(cfg);
        s.hold(Served {
            model_id,
            tokenizer,
            supervisor,
        });
        s
    }

    /// Shared state for the router, serving nothing yet.
    pub fn empty(cfg: NodeConfig) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            metrics: Metrics::default(),
            models: RwLock::default(),
            tenants: Mutex::default(),
            intent: Mutex::default(),
            forwarder: RwLock::default(),
            shards: RwLock::default(),
        })
    }

    /// The shard worker running `key` (`<model>/<first layer>/<end layer>`).
    pub fn shard(&self, key: &str) -> Option<Supervisor> {
        self.shards
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// Runs `key`'s chain steps on `worker` from now on (`None`: no more).
    pub fn set_shard(&self, key: &str, worker: Option<Supervisor>) {
        let mut shards = self.shards.write().unwrap_or_else(|e| e.into_inner());
        match worker {
            Some(w) => shards.insert(key.to_string(), w),
            None => shards.remove(key),
        };
    }

    /// The data plane's forwarder, on a cluster node.
    pub fn forwarder(&self) -> Option<Arc<crate::dataplane::Forwarder>> {
        self.forwarder
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Forwards requests for models this node does not hold through `f`.
    pub fn set_forwarder(&self, f: Arc<crate::dataplane::Forwarder>) {
        *self.forwarder.write().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// Records every admission decision from now on in `log`.
    pub fn set_intent_log(&self, log: crate::audit::IntentLog) {
        *self.intent.lock().unwrap_or_else(|e| e.into_inner()) = Some(log);
    }

    /// Appends a decision to the intent log, if there is one. A log that
    /// cannot be written is reported, and serving goes on.
    fn record(&self, record: Value) {
        let mut g = self.intent.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(log) = g.as_mut() {
            if let Err(e) = log.append(record) {
                tracing::error!("intent log: {e}");
            }
        }
    }

    /// Forces the intent log to disk (on shutdown).
    pub fn sync_intent_log(&self) {
        let g = self.intent.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Err(e)) = g.as_ref().map(|l| l.sync()) {
            tracing::error!("intent log: {e}");
        }
    }

    /// Serves `m` too (replacing a model of the same id).
    pub fn hold(&self, m: impl Into<Arc<Served>>) {
        let m = m.into();
        let mut models = self.models.write().unwrap_or_else(|e| e.into_inner());
        models.retain(|h| h.model_id != m.model_id);
        models.push(m);
    }

    /// Stops serving `model_id`; requests already running finish. Returns
    /// what was dropped.
    pub fn drop_model(&self, model_id: &str) -> Option<Arc<Served>> {
        let mut models = self.models.write().unwrap_or_else(|e| e.into_inner());
        let i = models.iter().position(|h| h.model_id == model_id)?;
        Some(models.remove(i))
    }

    /// The models served now.
    pub fn held(&self) -> Vec<Arc<Served>> {
        self.models
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The model a request names (`default`: the first one held).
    fn find(&self, name: &str) -> Option<Arc<Served>> {
        let models = self.models.read().unwrap_or_else(|e| e.into_inner());
        if name == "default" {
            return models.first().cloned();
        }
        models.iter().find(|m| m.model_id == name).cloned()
    }

    /// The metrics label of a request that never reached a model.
    fn any_model_id(&self) -> String {
        self.find("default")
            .map_or_else(|| "none".to_string(), |m| m.model_id.clone())
    }

    /// Load of all held models together.
    pub fn gauges(&self) -> Gauges {
        let held = self.held();
        let mut g = Gauges {
            ready: !held.is_empty(),
            ..Default::default()
        };
        for m in &held {
            let s = m.supervisor.stats();
            g.queue_depth += s.waiting;
            g.inflight += m.supervisor.inflight();
            g.kv_used += s.kv_used;
            g.kv_total += s.kv_total;
            g.worker_restarts += m.supervisor.restarts();
            g.tenants.extend(
                m.supervisor
                    .tenants()
                    .into_iter()
                    .map(|t| (m.model_id.clone(), t)),
            );
            g.ready &= m.supervisor.is_ready();
        }
        g
    }
}

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
    let sup = &first.supervisor;
    let worker = match sup.confinement() {
        Some((c, reached)) => {
            json!({"pid": sup.worker_pid(), "confinement": c, "reached_node": reached, "restarts": sup.restarts()})
        }
        None => json!({"pid": sup.worker_pid(), "restarts": sup.restarts()}),
    };
    let ids: Vec<&str> = held.iter().map(|m| m.model_id.as_str()).collect();
    if held.iter().all(|m| m.supervisor.is_ready()) {
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
    let mut text = s.metrics.render(s.gauges());
    if let Some(f) = s
        .forwarder
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        text += &f.render_metrics();
    }
    let mut r = text.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

async fn models(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authenticate(&s, &headers)?;
    Ok(Json(
        json!({"object": "list", "data": s.held().iter().map(|m| json!({"id": m.model_id, "object": "model", "created": 0, "owned_by": "weft"})).collect::<Vec<_>>()}),
    ))
}

fn authenticate(s: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    if s.cfg.api_keys.is_empty() {
        return Ok("anonymous".into());
    }
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match key.and_then(|k| s.cfg.api_keys.get(k)) {
        Some(t) => Ok(t.clone()),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            if key.is_some() {
                "Incorrect API key provided."
            } else {
                "Missing API key: send Authorization: Bearer <key>."
            },
        )
        .code("invalid_api_key")),
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Default)]
struct IntentField {
    criticality: Option<String>,
    deadline_ms: Option<u64>,
    max_cost: Option<f64>,
    /// Set by the node that failed a stream over to this one.
    resume: Option<ResumeField>,
}

/// A stream that another replica began: its tokens so far, the bytes of
/// their text the client has, and the stream's id and creation time, which
/// this node keeps so the client sees one stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResumeField {
    /// Tokens generated so far.
    pub tokens: Vec<u32>,
    /// Bytes of their text already sent.
    pub text_bytes: usize,
    /// The stream's id.
    pub id: String,
    /// Its creation time (Unix seconds).
    pub created: u64,
}

#[derive(Debug, Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Fields common to both completion endpoints.
#[derive(Debug, Deserialize)]
struct Common {
    model: String,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    min_p: Option<f32>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    stop: Option<StopField>,
    seed: Option<u64>,
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    weft: Option<IntentField>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Texts(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    prompt: PromptField,
    logprobs: Option<u32>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ContentField {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct MessageField {
    role: String,
    content: Option<ContentField>,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    messages: Vec<MessageField>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u32>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// A validated request, ready for the worker.
struct Job {
    kind: Kind,
    tenant: String,
    prompt: Vec<u32>,
    params: SamplingParams,
    criticality: Criticality,
    deadline: Option<Instant>,
    stream: bool,
    include_usage: bool,
    model: Arc<Served>,
    /// Continue a stream another replica began.
    resume: Option<ResumeField>,
    /// Put each chunk's token ids in it (a forwarding node asks, so it
    /// can resume the stream elsewhere).
    token_ids: bool,
    /// The id the routing node gave the request, when it was forwarded.
    routed_id: Option<String>,
}

async fn read_bytes(s: &AppState, req: Request) -> Result<axum::body::Bytes, ApiError> {
    let limit = s.cfg.max_body_bytes;
    let read = axum::body::to_bytes(req.into_body(), limit);
    let bytes = match tokio::time::timeout(Duration::from_secs(s.cfg.read_timeout_s), read).await {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "request body took too long",
            ))
        }
        Ok(Err(e)) => {
            let too_big = std::error::Error::source(&e)
                .is_some_and(|src| src.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            return Err(if too_big {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    format!("request body exceeds {limit} bytes"),
                )
            } else {
                ApiError::bad(format!("cannot read request body: {e}"))
            });
        }
        Ok(Ok(b)) => b,
    };
    if std::str::from_utf8(&bytes).is_err() {
        return Err(ApiError::bad("request body is not valid UTF-8"));
    }
    Ok(bytes)
}

fn parse_body<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
}

/// Routes a request on a cluster node: `None` serves it here (or lets the
/// local checks refuse it); otherwise the answer came from a peer, or is
/// the router's refusal. Every decision is in the intent log.
async fn elsewhere(
    s: &Arc<AppState>,
    headers: &HeaderMap,
    uri: &str,
    bytes: &axum::body::Bytes,
) -> Option<Response> {
    let fwd = s
        .forwarder
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()?;
    /// Only the fields routing needs; the rest is checked where it is served.
    #[derive(Deserialize)]
    struct Routable {
        model: String,
        max_tokens: Option<u64>,
        max_completion_tokens: Option<u64>,
        #[serde(default)]
        stream: bool,
        weft: Option<IntentField>,
    }
    let r = serde_json::from_slice::<Routable>(bytes).ok()?;
    let held = s.find(&r.model).is_some();
    let hops = crate::dataplane::hops(headers);
    // a forwarded request was routed by the node that sent it
    if hops > 0 && held {
        return None;
    }
    let tenant = match authenticate(s, headers) {
        Ok(t) => t,
        Err(e) => return Some(e.into_response()),
    };
    let w = r.weft.as_ref();
    let intent = weft_placement::Intent {
        criticality: w
            .and_then(|i| i.criticality.as_deref())
            .or_else(|| header_str(headers, "x-weft-criticality"))
            .and_then(Criticality::parse)
            .unwrap_or(Criticality::Standard),
        deadline_ms: w.and_then(|i| i.deadline_ms).or_else(|| {
            header_str(headers, "x-weft-deadline-ms").and_then(|v| v.trim().parse().ok())
        }),
        max_cost: w.and_then(|i| i.max_cost),
    };
    let output = r
        .max_completion_tokens
        .or(r.max_tokens)
        .unwrap_or(s.cfg.default_max_tokens as u64)
        .min(u32::MAX as u64) as u32;
    let prompt = (bytes.len() / crate::routing::PROMPT_BYTES_PER_TOKEN).max(1) as u32;
    let config = weft_placement::RouterConfig {
        admission: AdmissionPolicy {
            max_queue: s.cfg.max_queue,
        },
        ..crate::routing::router_config()
    };
    let received = unix_ms();
    let ask = crate::routing::Ask {
        model: &r.model,
        intent,
        prompt_tokens: prompt,
        output_tokens: output,
    };
    let routed = fwd.route(&ask, local_load(s, &r.model), &[], &config);
    let request_id = header_str(headers, crate::dataplane::REQUEST_ID_HEADER)
        .map(String::from)
        .unwrap_or_else(new_request_id);
    s.record(json!({
        "request_id": request_id,
        "tenant": tenant,
        "model": r.model,
        "intent": intent,
        "prompt_tokens_estimate": prompt,
        "max_tokens": output,
        "hops": hops,
        "decision": "routed",
        "route": routed.record,
        "received_unix_ms": received,
        "decided_unix_ms": unix_ms(),
    }));
    let target = match routed.target {
        // a stream served here still goes through the forwarder, so that
        // it continues on another replica if this one fails midway
        Ok(crate::routing::Target::Local) if r.stream && hops == 0 => crate::routing::Target::Local,
        Ok(crate::routing::Target::Local) => return None,
        Ok(t) => t,
        // no node serves it: the local checks say so
        Err(weft_placement::Rejection::NoReplica) => return None,
        Err(rej) => {
            let e = refusal(&rej);
            s.metrics
                .request(&r.model, e.status.as_u16(), intent.criticality.as_str());
            return Some(e.into_response());
        }
    };
    if hops >= crate::dataplane::MAX_HOPS {
        let why = format!("forwarded {hops} times already; not forwarding again");
        s.record(json!({"request_id": request_id, "decision": "refused", "reason": why}));
        return Some(ApiError::new(StatusCode::LOOP_DETECTED, "server_error", why).into_response());
    }
    let mut out = crate::dataplane::Outgoing::new(uri, headers, bytes.clone(), hops, r.stream);
    out.headers.push((
        crate::dataplane::REQUEST_ID_HEADER.into(),
        request_id.clone(),
    ));
    let reroute = {
        let (s, fwd, model) = (s.clone(), fwd.clone(), r.model.clone());
        Box::new(move |failed: &[String]| {
            let ask = crate::routing::Ask {
                model: &model,
                intent,
                prompt_tokens: prompt,
                output_tokens: output,
            };
            let routed = fwd.route(&ask, local_load(&s, &model), failed, &config);
            s.record(json!({"request_id": request_id, "decision": "rerouted", "failed": failed, "route": routed.record}));
            routed.target.ok()
        })
    };
    let record = {
        let s = s.clone();
        Box::new(move |v: Value| s.record(v))
    };
    match fwd.forward(target, out, reroute, record).await {
        Ok(resp) => Some(resp),
        Err(why) => {
            s.metrics
                .request(&r.model, 502, intent.criticality.as_str());
            Some(ApiError::new(StatusCode::BAD_GATEWAY, "server_error", why).into_response())
        }
    }
}

/// This node's live load for `model`, if it serves it.
fn local_load(s: &AppState, model: &str) -> Option<crate::routing::LocalLoad> {
    let m = s.find(model)?;
    if !m.supervisor.is_ready() {
        return None;
    }
    let st = m.supervisor.stats();
    Some(crate::routing::LocalLoad {
        queued: st
            .waiting
            .max(m.supervisor.inflight().saturating_sub(st.running)) as u32,
        running: st.running as u32,
        free_kv_tokens: (st.kv_total.saturating_sub(st.kv_used) * weft_kernels::KV_BLOCK_TOKENS)
            as u64,
    })
}

/// The API error for a router's refusal.
fn refusal(r: &weft_placement::Rejection) -> ApiError {
    use weft_placement::Rejection as R;
    match r {
        R::Overloaded { .. } | R::WouldMissDeadline { .. } => too_many(r.to_string()),
        R::DeadlineInfeasible { .. } => {
            ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout_error", r.to_string())
                .code("deadline_infeasible")
        }
        R::OverBudget { .. } => ApiError::bad(r.to_string()).code("over_budget"),
        R::NoReplica | R::NoFreshReplica | R::NoKvRoom => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            r.to_string(),
        )
        .code("no_replica"),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A request id for the intent log: unique enough across nodes and restarts.
fn new_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "req-{:x}-{:x}-{}",
        unix_ms(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn header_str<'a>(h: &'a HeaderMap, k: &str) -> Option<&'a str> {
    h.get(k).and_then(|v| v.to_str().ok())
}

/// What `prepare` makes of a request's common fields.
struct Prepared {
    params: SamplingParams,
    intent: (Criticality, Option<Instant>),
    model: Arc<Served>,
}

/// Turns the common fields into the model, sampling parameters and intent.
fn prepare(s: &AppState, c: &Common, headers: &HeaderMap) -> Result<Prepared, ApiError> {
    // demand is what is asked for, held here or not
    let wanted = if c.model == "default" {
        s.any_model_id()
    } else {
        c.model.clone()
    };
    if wanted != "none" {
        s.metrics.wanted(&wanted);
    }
    let Some(model) = s.find(&c.model) else {
        let held: Vec<String> = s
            .held()
            .iter()
            .map(|m| format!("`{}`", m.model_id))
            .collect();
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "The model `{}` does not exist (this node serves {}).",
                c.model,
                if held.is_empty() {
                    "no model yet".to_string()
                } else {
                    held.join(", ")
                }
            ),
        )
        .param("model")
        .code("model_not_found"));
    };
    if c.n.unwrap_or(1) != 1 {
        return Err(ApiError::bad("only n = 1 is supported").param("n"));
    }
    let max_tokens = c
        .max_completion_tokens
        .or(c.max_tokens)
        .unwrap_or(s.cfg.default_max_tokens as u64);
    if max_tokens == 0 || max_tokens > s.cfg.max_tokens_limit as u64 {
        return Err(ApiError::bad(format!(
            "max_tokens must be between 1 and {}",
            s.cfg.max_tokens_limit
        ))
        .param("max_tokens"));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad("temperature must be between 0 and 2").param("temperature"));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("top_p must be in (0, 1]").param("top_p"));
    }
    let stop_strings = match &c.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(v)) => v.clone(),
    };
    if stop_strings.len() > MAX_STOP_STRINGS || stop_strings.iter().any(String::is_empty) {
        return Err(ApiError::bad(format!(
            "stop takes 1 to {MAX_STOP_STRINGS} non-empty strings"
        ))
        .param("stop"));
    }
    let intent = c.weft.as_ref();
    let crit_text = intent
        .and_then(|i| i.criticality.clone())
        .or_else(|| header_str(headers, "x-weft-criticality").map(String::from));
    let criticality = match crit_text {
        None => Criticality::Standard,
        Some(t) => Criticality::parse(&t).ok_or_else(|| {
            ApiError::bad(format!(
                "unknown criticality {t:?}: use critical, standard or sheddable"
            ))
            .param("weft.criticality")
        })?,
    };
    let deadline_ms = match intent.and_then(|i| i.deadline_ms) {
        Some(d) => Some(d),
        None => match header_str(headers, "x-weft-deadline-ms") {
            Some(v) => Some(v.trim().parse::<u64>().map_err(|_| {
                ApiError::bad("x-weft-deadline-ms must be a number of milliseconds")
            })?),
            None => None,
        },
    };
    if let Some(cost) = intent.and_then(|i| i.max_cost) {
        if cost.is_nan() || cost < 0.0 {
            return Err(
                ApiError::bad("weft.max_cost must be a non-negative number").param("weft.max_cost")
            );
        }
    }
    let params = SamplingParams {
        temperature,
        top_p,
        top_k: c.top_k.unwrap_or(0),
        min_p: c.min_p.unwrap_or(0.0),
        repetition_penalty: c.repetition_penalty.unwrap_or(1.0),
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
        presence_penalty: c.presence_penalty.unwrap_or(0.0),
        seed: c.seed,
        max_tokens: max_tokens as usize,
        stop_tokens: model.tokenizer.stop_tokens(),
        stop_strings,
        logprobs: false,
        top_logprobs: 0,
    };
    Ok(Prepared {
        params,
        intent: (
            criticality,
            deadline_ms.map(|d| Instant::now() + Duration::from_millis(d)),
        ),
        model,
    })
}

fn check_prompt(s: &AppState, prompt: &[u32]) -> Result<(), ApiError> {
    let ctx = s.cfg.max_context;
    if prompt.len() >= ctx {
        return Err(ApiError::bad(format!(
            "This model's maximum context length is {ctx} tokens, but the prompt has {} tokens.",
            prompt.len()
        ))
        .param("messages")
        .code("context_length_exceeded"));
    }
    Ok(())
}

async fn completions(State(s): State<Arc<AppState>>, headers: HeaderMap, req: Request) -> Response {
    let bytes = match read_bytes(&s, req).await {
        Ok(b) => b,
        Err(e) => return respond(s, Err(e)).await,
    };
    if let Some(r) = elsewhere(&s, &headers, "/v1/completions", &bytes).await {
        return r;
    }
    let r = async {
        let tenant = authenticate(&s, &headers)?;
        let body: CompletionBody = parse_body(&bytes)?;
        let prepared = prepare(&s, &body.common, &headers)?;
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
            &headers,
            logprobs,
        )
    }
    .await;
    respond(s, r).await
}

async fn chat(State(s): State<Arc<AppState>>, headers: HeaderMap, req: Request) -> Response {
    let bytes = match read_bytes(&s, req).await {
        Ok(b) => b,
        Err(e) => return respond(s, Err(e)).await,
    };
    if let Some(r) = elsewhere(&s, &headers, "/v1/chat/completions", &bytes).await {
        return r;
    }
    let r = async {
        let tenant = authenticate(&s, &headers)?;
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
            messages.push(ChatMessage {
                role: m.role,
                content,
            });
        }
        let logprobs = body
            .logprobs
            .then(|| (body.top_logprobs.unwrap_or(0), "top_logprobs"));
        let prompt = prepared.model.tokenizer.encode_chat(&messages);
        job(
            &s,
            Kind::Chat,
            tenant,
            prompt,
            prepared,
            &body.common,
            &headers,
            logprobs,
        )
    }
    .await;
    respond(s, r).await
}

/// The last checks common to both endpoints: log-probabilities (`(alternatives,
/// field name)` when asked), the prompt's length; then the job.
#[allow(clippy::too_many_arguments)]
fn job(
    s: &AppState,
    kind: Kind,
    tenant: String,
    prompt: Vec<u32>,
    Prepared {
        mut params,
        intent: (criticality, deadline),
        model,
    }: Prepared,
    common: &Common,
    headers: &HeaderMap,
    logprobs: Option<(u32, &'static str)>,
) -> Result<Job, ApiError> {
    if let Some((n, field)) = logprobs {
        if n > MAX_TOP_LOGPROBS {
            return Err(
                ApiError::bad(format!("{field} must be at most {MAX_TOP_LOGPROBS}")).param(field),
            );
        }
        params.logprobs = true;
        params.top_logprobs = n as usize;
    }
    check_prompt(s, &prompt)?;
    let resume = common.weft.as_ref().and_then(|w| w.resume.clone());
    if resume.is_some() && !common.stream {
        return Err(
            ApiError::bad("weft.resume continues a stream: it needs stream: true")
                .param("weft.resume"),
        );
    }
    Ok(Job {
        kind,
        tenant,
        prompt,
        params,
        criticality,
        deadline,
        stream: common.stream,
        include_usage: common
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
        model,
        resume,
        token_ids: headers.contains_key(crate::dataplane::TOKEN_IDS_HEADER),
        routed_id: header_str(headers, crate::dataplane::REQUEST_ID_HEADER).map(String::from),
    })
}

/// Holds a tenant's concurrency slot and cancels an unfinished request when
/// dropped (the client went away, or the handler ended early).
struct Ticket {
    state: Arc<AppState>,
    model: Arc<Served>,
    tenant: String,
    id: Option<u64>,
    finished: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let (Some(id), false) = (self.id, self.finished) {
            self.model.supervisor.cancel(id);
        }
        let mut t = self.state.tenants.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(u) = t.get_mut(&self.tenant) {
            u.concurrent = u.concurrent.saturating_sub(1);
        }
    }
}

fn too_many(message: impl Into<String>) -> ApiError {
    let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
        .code("rate_limit_exceeded");
    e.retry_after = Some(RETRY_AFTER_S);
    e
}

/// Tenant limits and overload shedding; on success the caller holds a slot.
fn admit(s: &Arc<AppState>, job: &Job) -> Result<Ticket, ApiError> {
    let sup = &job.model.supervisor;
    if !sup.is_ready() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the model worker is not ready; retry shortly",
        ));
    }
    // requests handed to the worker but not yet seen running count as waiting
    let stats = sup.stats();
    let waiting = stats
        .waiting
        .max(sup.inflight().saturating_sub(stats.running));
    AdmissionPolicy {
        max_queue: s.cfg.max_queue,
    }
    .admit(job.criticality, NodeLoad { waiting })
    .map_err(|r| too_many(r.to_string()))?;
    let limits = s.cfg.limits(&job.tenant);
    let mut tenants = s.tenants.lock().unwrap_or_else(|e| e.into_inner());
    let u = tenants.entry(job.tenant.clone()).or_default();
    if let Some(max) = limits.max_concurrent {
        if u.concurrent >= max {
            return Err(too_many(format!(
                "tenant {} already has {max} requests in flight",
                job.tenant
            )));
        }
    }
    if let Some(tpm) = limits.tokens_per_minute {
        let now = Instant::now();
        while u
            .window
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > TPM_WINDOW)
        {
            u.window.pop_front();
        }
        let used: u64 = u.window.iter().map(|(_, n)| n).sum();
        if used + job.prompt.len() as u64 > tpm {
            return Err(too_many(format!(
                "tenant {} used {used} of {tpm} tokens this minute",
                job.tenant
            )));
        }
        u.window.push_back((now, job.prompt.len() as u64));
    }
    u.concurrent += 1;
    Ok(Ticket {
        state: s.clone(),
        model: job.model.clone(),
        tenant: job.tenant.clone(),
        id: None,
        finished: false,
    })
}

fn record_tokens(s: &AppState, tenant: &str, n: u64) {
    if n == 0 {
        return;
    }
    let mut t = s.tenants.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(u) = t.get_mut(tenant) {
        u.window.push_back((Instant::now(), n));
    }
}

async fn respond(s: Arc<AppState>, job: Result<Job, ApiError>) -> Response {
    let job = match job {
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
            },
            "prompt_tokens": job.prompt.len(),
            "node": "local",
            "decision": outcome,
            "reason": reason,
            "queue_waiting": job.model.supervisor.stats().waiting,
            "received_unix_ms": received,
        })
    };
    let mut ticket = match admit(&s, &job) {
        Ok(t) => t,
        Err(e) => {
            s.record(decision(None, "refused", Some(&e.message)));
            s.metrics
                .request(&job.model.model_id, e.status.as_u16(), crit);
            return e.into_response();
        }
    };
    let prompt_tokens = job.prompt.len();
    let (id, rx) = match job.model.supervisor.submit(
        job.prompt.clone(),
        job.params.clone(),
        job.criticality.priority(),
        job.resume
            .as_ref()
            .map(|r| weft_kernels::Resume {
                tokens: r.tokens.clone(),
                text_bytes: r.text_bytes,
            })
            .unwrap_or_default(),
        &job.tenant,
    ) {
        Ok(x) => x,
        Err(SubmitError::NotReady) => {
            s.metrics.request(&job.model.model_id, 503, crit);
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the model worker is not ready; retry shortly",
            )
            .into_response();
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
    };
    s.record(decision(Some(&meta.id), "admitted", None));
    if job.stream {
        stream_response(s, job, ticket, rx, meta)
    } else {
        whole_response(s, job, ticket, rx, meta).await
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    prompt_tokens: usize,
}

impl Meta {
    fn usage(&self, completion: usize) -> Value {
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": completion, "total_tokens": self.prompt_tokens + completion})
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

fn deadline_error() -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "timeout_error",
        "the request's deadline passed before it finished; it was cancelled",
    )
    .code("deadline_exceeded")
}

fn worker_lost() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "the model worker stopped while serving this request; retry",
    )
    .code("worker_lost")
}

/// The error for a sequence its replica lost midway (a node of its chain
/// failed): like a lost worker, another replica can continue it.
fn replica_lost(why: &str) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        format!("this replica lost the request midway ({why}); retry"),
    )
    .code("replica_lost")
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
    let finish = loop {
        let u = match next_update(&mut rx, job.deadline).await {
            Ok(u) => u,
            Err(e) => {
                s.metrics
                    .request(&job.model.model_id, e.status.as_u16(), crit);
                return e.into_response();
            }
        };
        match u {
            Some(Update::Event {
                token,
                text: t,
                logprob,
                finish,
            }) => {
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
                s.metrics.request(&job.model.model_id, 400, crit);
                return ApiError::bad(reason).into_response();
            }
            Some(Update::WorkerLost) | None => {
                ticket.finished = true;
                s.metrics.request(&job.model.model_id, 503, crit);
                return worker_lost().into_response();
            }
        }
    };
    ticket.finished = true;
    s.metrics.tokens(tokens as u64);
    record_tokens(&s, &job.tenant, tokens as u64);
    if let FinishReason::Lost(why) = &finish {
        s.metrics.request(&job.model.model_id, 503, crit);
        return replica_lost(why).into_response();
    }
    if let FinishReason::Error(msg) = &finish {
        s.metrics.request(&job.model.model_id, 500, crit);
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            msg.clone(),
        )
        .into_response();
    }
    s.metrics.request(&job.model.model_id, 200, crit);
    let choice = match meta.kind {
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": if job.params.logprobs { json!({"content": lps.iter().map(|l| chat_logprob(&job.model.tokenizer, l)).collect::<Vec<_>>()}) } else { Value::Null },
            "finish_reason": finish_str(&finish),
        }),
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
        "usage": meta.usage(tokens),
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
        let status;
        loop {
            let u = match next_update(&mut rx, job.deadline).await {
                Ok(u) => u,
                Err(e) => {
                    status = e.status.as_u16();
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
                }) => {
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
                    let fin = finish.as_ref().map(finish_str);
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
                            c[crate::dataplane::TOKEN_IDS_FIELD] =
                                json!(token.into_iter().collect::<Vec<_>>());
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
                            let _ = send(json!({"id": meta.id, "object": object, "created": meta.created, "model": meta.model, "choices": [], "usage": meta.usage(resumed + tokens)})).await;
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
        record_tokens(&s, &job.tenant, tokens as u64);
        s.metrics.request(&job.model.model_id, status, crit);
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
        drop(ticket);
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out)).into_response()
}

/// A body for tests and tools: the bytes of a JSON value.
pub fn json_body(v: &Value) -> Body {
    Body::from(v.to_string())
}
