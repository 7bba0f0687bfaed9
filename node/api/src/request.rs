//! The OpenAI request bodies, and their checks: what a chat or completion
//! request may ask for, turned into a [`Job`] for the runner.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use weft_kernels::SamplingParams;
use weft_placement::Criticality;

use crate::error::ApiError;
use crate::headers::{header_str, Forwarded, CRITICALITY_HEADER, DEADLINE_HEADER};
use crate::served::Served;
use crate::state::AppState;

/// Most stop strings a request may give (as OpenAI allows).
const MAX_STOP_STRINGS: usize = 4;
/// Most alternatives per token in log-probabilities.
const MAX_TOP_LOGPROBS: u32 = 20;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Default)]
pub(crate) struct IntentField {
    pub(crate) criticality: Option<String>,
    pub(crate) deadline_ms: Option<u64>,
    pub(crate) max_cost: Option<f64>,
    /// Set by the node that failed a stream over to this one.
    pub(crate) resume: Option<ResumeField>,
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
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub(crate) include_usage: bool,
}

/// Fields common to both completion endpoints.
#[derive(Debug, Deserialize)]
pub(crate) struct Common {
    pub(crate) model: String,
    pub(crate) max_tokens: Option<u64>,
    pub(crate) max_completion_tokens: Option<u64>,
    pub(crate) temperature: Option<f32>,
    pub(crate) top_p: Option<f32>,
    pub(crate) top_k: Option<usize>,
    pub(crate) min_p: Option<f32>,
    pub(crate) frequency_penalty: Option<f32>,
    pub(crate) presence_penalty: Option<f32>,
    pub(crate) repetition_penalty: Option<f32>,
    pub(crate) stop: Option<StopField>,
    pub(crate) seed: Option<u64>,
    pub(crate) n: Option<u32>,
    #[serde(default)]
    pub(crate) stream: bool,
    pub(crate) stream_options: Option<StreamOptions>,
    /// Structured output: `text`, `json_object`, `json_schema` (and weft's
    /// `regex`, `choice`, `grammar`).
    pub(crate) response_format: Option<serde_json::Value>,
    /// The caller's end user, for the intent log.
    pub(crate) user: Option<String>,
    pub(crate) weft: Option<IntentField>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum PromptField {
    Text(String),
    Texts(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub(crate) struct CompletionBody {
    pub(crate) prompt: PromptField,
    pub(crate) logprobs: Option<u32>,
    #[serde(flatten)]
    pub(crate) common: Common,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum ContentField {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub(crate) struct ContentPart {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    pub(crate) text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct MessageField {
    pub(crate) role: String,
    pub(crate) content: Option<ContentField>,
    /// An assistant message's tool calls, handed to the chat template.
    pub(crate) tool_calls: Option<serde_json::Value>,
    /// The call a `tool` message answers.
    pub(crate) tool_call_id: Option<String>,
    pub(crate) name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChatBody {
    pub(crate) messages: Vec<MessageField>,
    /// The tools the model may call.
    pub(crate) tools: Option<serde_json::Value>,
    pub(crate) tool_choice: Option<serde_json::Value>,
    pub(crate) parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub(crate) logprobs: bool,
    pub(crate) top_logprobs: Option<u32>,
    #[serde(flatten)]
    pub(crate) common: Common,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Chat,
    Completion,
}

/// A validated request, ready for the worker.
pub(crate) struct Job {
    pub(crate) kind: Kind,
    pub(crate) tenant: String,
    pub(crate) prompt: Vec<u32>,
    pub(crate) params: SamplingParams,
    pub(crate) criticality: Criticality,
    pub(crate) deadline: Option<Instant>,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    pub(crate) model: Arc<Served>,
    /// Continue a stream another replica began.
    pub(crate) resume: Option<ResumeField>,
    /// Put each chunk's token ids in it (a forwarding node asks, so it
    /// can resume the stream elsewhere).
    pub(crate) token_ids: bool,
    /// The id the routing node gave the request, when it was forwarded.
    pub(crate) routed_id: Option<String>,
    /// This node's span of the request's trace.
    pub(crate) trace: crate::trace::Trace,
    /// Read tool calls out of the answer.
    pub(crate) tool_calls: bool,
    /// The call was of a function `tool_choice` named (OpenAI then says
    /// `finish_reason: "stop"`).
    pub(crate) named_call: bool,
    /// The caller's end user, for the intent log.
    pub(crate) user: Option<String>,
    /// The most the caller would pay (`weft.max_cost`).
    pub(crate) max_cost: Option<f64>,
    /// What the router predicted of serving it here.
    pub(crate) prediction: Option<crate::remote::Prediction>,
}

/// Reads a request's body within the size and time limits; it must be UTF-8.
pub(crate) async fn read_bytes(s: &AppState, req: Request) -> Result<axum::body::Bytes, ApiError> {
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

/// Parses a JSON body into `T`, or a 400 naming what is wrong.
pub(crate) fn parse_body<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
}

/// What `prepare` makes of a request's common fields.
pub(crate) struct Prepared {
    pub(crate) params: SamplingParams,
    pub(crate) intent: (Criticality, Option<Instant>),
    pub(crate) model: Arc<Served>,
}

/// Turns the common fields into the model, sampling parameters and intent.
pub(crate) fn prepare(s: &AppState, c: &Common, headers: &HeaderMap) -> Result<Prepared, ApiError> {
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
        // counted under "other": a client's model string is no label
        let crit = c
            .weft
            .as_ref()
            .and_then(|i| i.criticality.as_deref())
            .or_else(|| header_str(headers, CRITICALITY_HEADER))
            .and_then(Criticality::parse)
            .unwrap_or(Criticality::Standard);
        s.count_request(&c.model, 404, crit.as_str());
        // no node serves it (a cluster node's router found no replica)
        s.metrics.refused("no_replica", crit.as_str());
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
        .or_else(|| header_str(headers, CRITICALITY_HEADER).map(String::from));
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
        None => match header_str(headers, DEADLINE_HEADER) {
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
        grammar: None,
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

/// The last checks common to both endpoints: log-probabilities (`(alternatives,
/// field name)` when asked), the prompt's length; then the job.
#[allow(clippy::too_many_arguments)]
pub(crate) fn job(
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
    fwd: Option<&Forwarded>,
    logprobs: Option<(u32, &'static str)>,
    trace: crate::trace::Trace,
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
        token_ids: fwd.is_some_and(|f| f.token_ids),
        routed_id: fwd.and_then(|f| f.request_id.clone()),
        trace,
        tool_calls: false,
        named_call: false,
        user: common.user.clone(),
        max_cost: common.weft.as_ref().and_then(|w| w.max_cost),
        prediction: fwd.and_then(|f| f.prediction),
    })
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A request id for the intent log: unique enough across nodes and restarts.
pub(crate) fn new_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "req-{:x}-{:x}-{}",
        unix_ms(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
