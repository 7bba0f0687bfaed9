//! `/v1/sandboxes` on the node's HTTP server: the same API keys and
//! tenants as the model API, OpenAI-shaped errors.
//!
//! | method and path | does |
//! |---|---|
//! | `POST /v1/sandboxes` | creates one |
//! | `GET /v1/sandboxes` | the tenant's own |
//! | `GET /v1/sandboxes/{id}` | one of them |
//! | `PATCH /v1/sandboxes/{id}` | extends `timeout_s` |
//! | `DELETE /v1/sandboxes/{id}` | ends it (again: the same) |
//! | `POST /v1/sandboxes/{id}/exec` | runs a command (server-sent events with `stream`) |
//! | `GET/PUT/DELETE /v1/sandboxes/{id}/files?path=` | its scratch space's files |

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use weft_api::tenants::authenticate;
use weft_api::{ApiError, AppState};

use crate::config::Isolation;
use crate::protocol::{FailKind, Stream};
use crate::service::{
    unix_s, CreateAsk, Ended, ExecAsk, ExecEnd, ExecEvent, Sandbox, SandboxError, SandboxService,
};

/// What the routes share.
#[derive(Clone)]
struct Ctx {
    app: Arc<AppState>,
    sandboxes: Arc<SandboxService>,
}

/// The sandbox routes, authenticated by `app`'s API keys.
pub fn router(app: Arc<AppState>, sandboxes: Arc<SandboxService>) -> Router {
    Router::new()
        .route("/v1/sandboxes", post(create).get(list))
        .route("/v1/sandboxes/{id}", get(show).patch(extend).delete(delete))
        .route("/v1/sandboxes/{id}/exec", post(exec))
        .route(
            "/v1/sandboxes/{id}/files",
            get(read_file).put(write_file).delete(delete_file),
        )
        .layer(axum::extract::DefaultBodyLimit::max(
            sandboxes.config().max_file_bytes as usize + (64 << 10),
        ))
        .with_state(Ctx { app, sandboxes })
}

fn error(e: SandboxError) -> ApiError {
    match e {
        SandboxError::Invalid(m) => ApiError::bad(m),
        SandboxError::NotFound(id) => ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("No sandbox {id}."),
        )
        .code("sandbox_not_found"),
        SandboxError::Ended { id, why } => ApiError::new(
            StatusCode::GONE,
            "invalid_request_error",
            match why {
                Ended::Expired => format!("Sandbox {id} expired: its timeout_s ran out."),
                Ended::Deleted => format!("Sandbox {id} was deleted."),
                Ended::Died => {
                    format!("Sandbox {id} ended: its processes died (out of memory, or killed).")
                }
                Ended::Shutdown => format!("Sandbox {id} ended: the node stopped."),
            },
        )
        .code(match why {
            Ended::Expired => "expired",
            Ended::Deleted => "deleted",
            Ended::Died => "died",
            Ended::Shutdown => "shutdown",
        }),
        SandboxError::Quota(m) => {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", m)
                .code("sandbox_quota")
        }
        SandboxError::Unavailable(m) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", m)
                .code("isolation_unavailable")
        }
        SandboxError::Busy(m) => {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", m).code("busy")
        }
        SandboxError::Failed { kind, message } => match kind {
            FailKind::NotFound => {
                ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
                    .code("file_not_found")
            }
            FailKind::IsDir | FailKind::Invalid => ApiError::bad(message).param("path"),
            FailKind::TooLarge => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                message,
            )
            .code("disk_limit"),
            FailKind::NotStarted => ApiError::bad(message).param("cmd").code("not_started"),
            FailKind::Io => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
            }
        },
        SandboxError::Internal(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("{e:#}"),
        ),
    }
}

fn describe(s: &Sandbox) -> Value {
    json!({
        "id": s.id,
        "object": "sandbox",
        "template": s.template,
        "isolation": s.isolation.as_str(),
        "launch": s.launch.as_str(),
        "status": match s.ended() { None => "running", Some(e) => e.as_str() },
        "created_at": unix_s(s.created_at),
        "expires_at": unix_s(s.expires_at()),
        "limits": {
            "memory_mb": s.limits.memory_mb,
            "cpus": s.limits.cpus,
            "pids": s.limits.pids,
            "disk_mb": s.limits.disk_mb,
            "timeout_s": s.limits.timeout_s,
        },
        "network": {"type": "disabled"},
        "running_commands": s.running(),
        "confinement": {
            "layers": s.confinement.layers,
            "landlock_abi": s.confinement.landlock_abi,
            "uid": s.uid,
        },
    })
}

/// The tenant of `headers`, or the error to answer.
fn tenant(ctx: &Ctx, headers: &HeaderMap) -> Result<String, ApiError> {
    authenticate(&ctx.app.policy(), headers)
}

/// Sandbox `id` of the caller's tenant (another tenant's is not found).
fn owned(ctx: &Ctx, headers: &HeaderMap, id: &str) -> Result<Arc<Sandbox>, ApiError> {
    let t = tenant(ctx, headers)?;
    ctx.sandboxes.get(&t, id).map_err(error)
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    if body.is_empty() {
        return serde_json::from_slice(b"{}").map_err(|e| ApiError::bad(e.to_string()));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Network {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    template: Option<String>,
    isolation: Option<Isolation>,
    memory_mb: Option<u64>,
    cpus: Option<f64>,
    pids: Option<u64>,
    disk_mb: Option<u64>,
    timeout_s: Option<u64>,
    network: Option<Network>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

async fn create(State(ctx): State<Ctx>, headers: HeaderMap, body: Bytes) -> Response {
    let r = async {
        let tenant = tenant(&ctx, &headers)?;
        let b: CreateBody = parse(&body)?;
        if let Some(n) = &b.network {
            if n.kind != "disabled" {
                return Err(ApiError::bad(format!(
                    "network {:?} is not supported: sandboxes have no network (\"disabled\"); an allow-list is not built yet",
                    n.kind
                ))
                .param("network"));
            }
        }
        let quota = ctx.app.policy().limits(&tenant);
        let sb = ctx
            .sandboxes
            .create(
                &tenant,
                &quota,
                CreateAsk {
                    template: b.template,
                    isolation: b.isolation,
                    memory_mb: b.memory_mb,
                    cpus: b.cpus,
                    pids: b.pids,
                    disk_mb: b.disk_mb,
                    timeout_s: b.timeout_s,
                    env: b.env.into_iter().collect(),
                },
            )
            .await
            .map_err(error)?;
        Ok::<_, ApiError>((StatusCode::CREATED, Json(describe(&sb))).into_response())
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

async fn list(State(ctx): State<Ctx>, headers: HeaderMap) -> Response {
    match tenant(&ctx, &headers) {
        Ok(t) => {
            let data: Vec<Value> = ctx.sandboxes.list(&t).iter().map(|s| describe(s)).collect();
            Json(json!({"object": "list", "data": data})).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn show(State(ctx): State<Ctx>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let r = owned(&ctx, &headers, &id).map(|s| Json(describe(&s)));
    r.map_or_else(IntoResponse::into_response, IntoResponse::into_response)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtendBody {
    timeout_s: u64,
}

async fn extend(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let r = (|| {
        let t = tenant(&ctx, &headers)?;
        let b: ExtendBody = parse(&body)?;
        let sb = ctx.sandboxes.get(&t, &id).map_err(error)?;
        ctx.sandboxes.extend(&sb, b.timeout_s).map_err(error)?;
        Ok::<_, ApiError>(Json(describe(&sb)))
    })();
    r.map_or_else(IntoResponse::into_response, IntoResponse::into_response)
}

async fn delete(State(ctx): State<Ctx>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let r = tenant(&ctx, &headers).and_then(|t| ctx.sandboxes.delete(&t, &id).map_err(error));
    match r {
        Ok(()) => {
            Json(json!({"id": id, "object": "sandbox.deleted", "deleted": true})).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    cmd: Vec<String>,
    #[serde(default)]
    cwd: String,
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Standard input as text.
    stdin: Option<String>,
    /// Standard input as base64.
    stdin_b64: Option<String>,
    timeout_s: Option<u64>,
    #[serde(default)]
    stream: bool,
}

/// Output as JSON: UTF-8 text where it is, else base64.
fn output_json(data: &[u8]) -> Value {
    match std::str::from_utf8(data) {
        Ok(s) => json!({"data": s, "encoding": "utf-8"}),
        Err(_) => json!({
            "data": base64::engine::general_purpose::STANDARD.encode(data),
            "encoding": "base64",
        }),
    }
}

fn end_json(e: &ExecEnd) -> Value {
    json!({
        "exit_code": e.exit_code,
        "signal": e.signal,
        "timed_out": e.timed_out,
        "oom_killed": e.oom_killed,
        "duration_ms": e.duration_ms,
    })
}

/// Most output a whole (not streamed) answer carries per stream.
const MAX_WHOLE_OUTPUT: usize = 8 << 20;

async fn exec(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let r = async {
        let t = tenant(&ctx, &headers)?;
        let b: ExecBody = parse(&body)?;
        let stdin = match (b.stdin, b.stdin_b64) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad("give stdin or stdin_b64, not both").param("stdin"))
            }
            (Some(s), None) => s.into_bytes(),
            (None, Some(s)) => base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| ApiError::bad(format!("stdin_b64: {e}")).param("stdin_b64"))?,
            (None, None) => Vec::new(),
        };
        let sb = ctx.sandboxes.get(&t, &id).map_err(error)?;
        let mut events = ctx
            .sandboxes
            .exec(
                &sb,
                ExecAsk {
                    cmd: b.cmd,
                    cwd: b.cwd,
                    env: b.env.into_iter().collect(),
                    stdin,
                    timeout_s: b.timeout_s,
                },
            )
            .await
            .map_err(error)?;
        if b.stream {
            let s = async_stream(events);
            return Ok(Sse::new(s).into_response());
        }
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (mut pid, mut truncated) = (None, false);
        while let Some(ev) = events.recv().await {
            match ev {
                ExecEvent::Start { pid: p } => pid = Some(p),
                ExecEvent::Output { stream, data } => {
                    let buf = match stream {
                        Stream::Stdout => &mut out,
                        Stream::Stderr => &mut err,
                    };
                    let room = MAX_WHOLE_OUTPUT.saturating_sub(buf.len());
                    truncated |= data.len() > room;
                    buf.extend_from_slice(&data[..data.len().min(room)]);
                }
                ExecEvent::End(e) => {
                    let mut v = end_json(&e);
                    v["object"] = "sandbox.exec".into();
                    v["pid"] = json!(pid);
                    v["stdout"] = output_json(&out);
                    v["stderr"] = output_json(&err);
                    v["truncated"] = truncated.into();
                    return Ok(Json(v).into_response());
                }
                ExecEvent::Failed(m) => {
                    return Err(ApiError::bad(m).param("cmd").code("exec_failed"));
                }
            }
        }
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the command's events ended without its end",
        ))
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

/// The command's events as server-sent events: `start`, `stdout`,
/// `stderr`, `end` (or `error`).
fn async_stream(
    events: tokio::sync::mpsc::Receiver<ExecEvent>,
) -> impl futures::Stream<Item = Result<Event, Infallible>> {
    use futures::StreamExt;
    tokio_stream::wrappers::ReceiverStream::new(events).map(|ev| {
        let (name, data) = match ev {
            ExecEvent::Start { pid } => ("start", json!({"pid": pid})),
            ExecEvent::Output { stream, data } => (
                match stream {
                    Stream::Stdout => "stdout",
                    Stream::Stderr => "stderr",
                },
                output_json(&data),
            ),
            ExecEvent::End(e) => ("end", end_json(&e)),
            ExecEvent::Failed(m) => ("error", json!({"message": m})),
        };
        Ok(Event::default().event(name).data(data.to_string()))
    })
}

#[derive(Deserialize)]
struct FileQuery {
    #[serde(default)]
    path: String,
}

async fn read_file(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> Response {
    let r = async {
        let sb = owned(&ctx, &headers, &id)?;
        match ctx.sandboxes.read_file(&sb, &q.path).await {
            Ok(data) => Ok((
                [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
                data,
            )
                .into_response()),
            Err(SandboxError::Failed {
                kind: FailKind::IsDir,
                ..
            }) => {
                let entries = ctx
                    .sandboxes
                    .list_files(&sb, &q.path)
                    .await
                    .map_err(error)?;
                Ok(
                    Json(json!({"object": "list", "path": q.path, "data": entries}))
                        .into_response(),
                )
            }
            Err(e) => Err(error(e)),
        }
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

async fn write_file(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
    body: Bytes,
) -> Response {
    let r = async {
        let sb = owned(&ctx, &headers, &id)?;
        let n = body.len();
        ctx.sandboxes
            .write_file(&sb, &q.path, body.to_vec())
            .await
            .map_err(error)?;
        Ok::<_, ApiError>(
            Json(json!({"object": "sandbox.file", "path": q.path, "bytes": n})).into_response(),
        )
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

async fn delete_file(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> Response {
    let r = async {
        let sb = owned(&ctx, &headers, &id)?;
        ctx.sandboxes
            .delete_file(&sb, &q.path)
            .await
            .map_err(error)?;
        Ok::<_, ApiError>(
            Json(json!({"object": "sandbox.file.deleted", "path": q.path, "deleted": true}))
                .into_response(),
        )
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}
