//! What the API needs of a cluster's data plane: a [`Remote`] decides, for
//! a request, whether this node serves it or a peer does, and carries it
//! there. `weft-fabric` implements it; a node of its own (`weft up`) has
//! none and serves everything itself.

use std::sync::Arc;

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::response::Response;
use futures::future::BoxFuture;
use serde_json::Value;
use weft_placement::{Intent, Rejection};

/// This node's live load for one model, read from its runner rather than
/// from its last gossiped report.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalLoad {
    /// Requests waiting.
    pub queued: u32,
    /// Sequences decoding.
    pub running: u32,
    /// KV tokens free.
    pub free_kv_tokens: u64,
}

/// What the node itself offers a [`Remote`]: its load per model, and its
/// intent log.
pub trait LocalNode: Send + Sync {
    /// This node's live load for `model`, if it serves it and is ready.
    fn load(&self, model: &str) -> Option<LocalLoad>;
    /// Appends a decision to the node's intent log.
    fn record(&self, record: Value);
    /// Counts a request the router sent to `target` (`local`, `edge_peer`
    /// or `cloud`) at the router's expected `utility`.
    fn routed(&self, target: &'static str, criticality: &str, utility: Option<f64>);
}

/// A request for the data plane to route, authenticated and with its
/// intent read.
#[derive(Debug, Clone)]
pub struct RouteAsk {
    /// The API path it came in on.
    pub uri: &'static str,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its JSON body as sent.
    pub body: Bytes,
    /// The model it names.
    pub model: String,
    /// Whether it asks for a stream.
    pub stream: bool,
    /// How often it was forwarded before.
    pub hops: u32,
    /// Its tenant.
    pub tenant: String,
    /// Its intent.
    pub intent: Intent,
    /// Tokens it may generate.
    pub output_tokens: u32,
    /// The id its records carry (the routing node's, when forwarded).
    pub request_id: String,
    /// Waiting requests beyond which this node sheds standard ones.
    pub max_queue: usize,
    /// This node's span of the request's trace (the next node's parent).
    pub trace: crate::trace::Trace,
    /// What constrains its output, when something does (`tools`, or a
    /// `response_format` type): the intent log says so.
    pub constrained: Option<String>,
}

pub use crate::headers::Prediction;

/// What a node alone predicts of serving a request itself (a node with no
/// data plane: `weft up`), and whether its cost budget refuses it.
pub trait Predict: Send + Sync {
    /// The router's view of serving `prompt_tokens` + `output_tokens` of
    /// `model` here under `intent` at load `load`: its prediction, the
    /// refusal if the budget cannot be met, and the decision record.
    fn predict(
        &self,
        model: &str,
        intent: Intent,
        prompt_tokens: u32,
        output_tokens: u32,
        load: Option<LocalLoad>,
    ) -> (Option<Prediction>, Option<Rejection>, Value);
}

/// Where a request went.
pub enum Routing {
    /// This node serves it, through its own handlers, as the router
    /// predicted.
    Here(Option<Prediction>),
    /// It was answered (by a peer, or here through the data plane so that
    /// a stream can fail over).
    Answered(Response),
    /// The router refused it.
    Refused(Rejection),
    /// It was forwarded too often already.
    Looped(String),
    /// No replica answered.
    Failed(String),
}

/// Routes requests across the cluster.
pub trait Remote: Send + Sync {
    /// Routes `ask`, with `local` for this node's own load and log.
    fn route(
        self: Arc<Self>,
        ask: RouteAsk,
        local: Arc<dyn LocalNode>,
    ) -> BoxFuture<'static, Routing>;
}
