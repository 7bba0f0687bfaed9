//! OpenAI's error JSON with the right HTTP status, and the errors the API
//! gives for each way a request can fail.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

/// Seconds a refused client is told to wait.
const RETRY_AFTER_S: u64 = 1;

/// An OpenAI-shaped error.
#[derive(Debug)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<std::borrow::Cow<'static, str>>,
    pub(crate) message: String,
    retry_after: Option<u64>,
    /// Why a request was refused, as `weft_route_refusals_total`'s
    /// `reason` label writes it (refusals only).
    pub(crate) refused_because: Option<&'static str>,
}

impl ApiError {
    /// An error with `status`, OpenAI's error `kind` and `message`.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            code: None,
            param: None,
            message: message.into(),
            retry_after: None,
            refused_because: None,
        }
    }
    /// A 400 `invalid_request_error`.
    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    /// Names the request field at fault.
    pub fn param(mut self, p: impl Into<std::borrow::Cow<'static, str>>) -> Self {
        self.param = Some(p.into());
        self
    }
    /// Sets OpenAI's error `code`.
    pub fn code(mut self, c: &'static str) -> Self {
        self.code = Some(c);
        self
    }
    /// Marks the error as a refusal for `reason` (one of
    /// [`crate::metrics::REFUSAL_REASONS`]).
    pub(crate) fn refusal_for(mut self, reason: &'static str) -> Self {
        self.refused_because = Some(reason);
        self
    }
    /// The error JSON (also what a stream sends as its last event).
    pub fn body(&self) -> Value {
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

/// A 429 with `Retry-After`.
pub(crate) fn too_many(message: impl Into<String>) -> ApiError {
    let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
        .code("rate_limit_exceeded");
    e.retry_after = Some(RETRY_AFTER_S);
    e
}

/// The API error for what a tenant's policy does not allow it.
pub(crate) fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "permission_error", message)
        .code("not_allowed")
        .refusal_for("not_allowed")
}

/// The `reason` label of a router's refusal.
pub fn rejection_reason(r: &weft_placement::Rejection) -> &'static str {
    use weft_placement::Rejection as R;
    match r {
        R::NoReplica => "no_replica",
        R::NoFreshReplica => "no_fresh_replica",
        R::DeadlineInfeasible { .. } => "deadline_infeasible",
        R::WouldMissDeadline { .. } => "would_miss_deadline",
        R::OverBudget { .. } => "over_budget",
        R::Overloaded { .. } => "overloaded",
        R::NoKvRoom => "no_kv_room",
    }
}

/// The API error for a router's refusal.
pub(crate) fn refusal(r: &weft_placement::Rejection) -> ApiError {
    use weft_placement::Rejection as R;
    let e = match r {
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
    };
    e.refusal_for(rejection_reason(r))
}

/// The request's deadline passed.
pub(crate) fn deadline_error() -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "timeout_error",
        "the request's deadline passed before it finished; it was cancelled",
    )
    .code("deadline_exceeded")
}

/// The worker died under the request.
pub(crate) fn worker_lost() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "the model worker stopped while serving this request; retry",
    )
    .code("worker_lost")
}

/// The worker is not ready (loading or restarting).
pub(crate) fn not_ready() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "the model worker is not ready; retry shortly",
    )
    .refusal_for("not_ready")
}

/// The error for a sequence its replica lost midway (a node of its chain
/// failed): like a lost worker, another replica can continue it.
pub(crate) fn replica_lost(why: &str) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        format!("this replica lost the request midway ({why}); retry"),
    )
    .code("replica_lost")
}
