//! The `x-weft-*` headers and the chunk field that the API reads and
//! writes, and what the data plane says of a request it hands this node's
//! API ([`Forwarded`], a request extension: no client can set it). The
//! headers of the data plane's own (hops, the forwarding node, token ids,
//! the routing node's request id) travel between nodes on the
//! authenticated data plane; from a client they mean nothing.

use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};

/// The response header naming the node that served the request.
pub const SERVED_BY_HEADER: &str = "x-weft-served-by";
/// The response header of the router's predicted latency (ms); between
/// nodes, the routing node's prediction for the one serving.
pub const PREDICTED_LATENCY_HEADER: &str = "x-weft-predicted-latency-ms";
/// The response header of the router's estimated cost.
pub const ESTIMATED_COST_HEADER: &str = "x-weft-estimated-cost";
/// The response header of the router's utility of its choice.
pub const UTILITY_HEADER: &str = "x-weft-utility";
/// The request header asking for each streamed chunk's token ids (in
/// [`TOKEN_IDS_FIELD`]), so the forwarding node can resume the stream on
/// another replica.
pub const TOKEN_IDS_HEADER: &str = "x-weft-token-ids";
/// The header carrying the id the routing node gave a request, so the
/// records of every node it passes share it.
pub const REQUEST_ID_HEADER: &str = "x-weft-request-id";
/// The chunk field holding its token ids.
pub const TOKEN_IDS_FIELD: &str = "weft_tokens";
/// The request header of a criticality.
pub const CRITICALITY_HEADER: &str = "x-weft-criticality";
/// The request header of a deadline, in milliseconds.
pub const DEADLINE_HEADER: &str = "x-weft-deadline-ms";

/// What the data plane says of a request it hands this node's API: set
/// only by the fabric, as a request extension.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Forwarded {
    /// How often it was forwarded already (1: once, to here).
    pub hops: u32,
    /// The node it came from.
    pub from: String,
    /// Whether each streamed chunk should carry its token ids (so the
    /// forwarding node can resume the stream elsewhere).
    pub token_ids: bool,
    /// The id the routing node gave it.
    pub request_id: Option<String>,
    /// What the routing node's router predicted of serving it here.
    pub prediction: Option<Prediction>,
}

/// A header's value as text, if it is there and is text.
pub fn header_str<'a>(h: &'a HeaderMap, k: &str) -> Option<&'a str> {
    h.get(k).and_then(|v| v.to_str().ok())
}

/// What the router predicted of serving a request where it chose: given
/// back to the agent (headers and `usage.weft`) and logged.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Expected latency (ms).
    pub latency_ms: f64,
    /// Estimated cost.
    pub cost: f64,
    /// The utility of that outcome.
    pub utility: f64,
}

impl Prediction {
    /// Its headers, as the routing node hands them to the serving one and
    /// the serving one to the agent.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        // a value the router could not give (a utility where it refused) is left out
        [
            (PREDICTED_LATENCY_HEADER, self.latency_ms, 1),
            (ESTIMATED_COST_HEADER, self.cost, 0),
            (UTILITY_HEADER, self.utility, 4),
        ]
        .into_iter()
        .filter(|(_, v, _)| v.is_finite())
        .map(|(k, v, places)| {
            let v = if places == 0 {
                format!("{v:.6e}")
            } else {
                format!("{v:.places$}")
            };
            (k, v)
        })
        .collect()
    }

    /// One from those headers (from the authenticated data plane only).
    pub fn from_headers<'a>(mut get: impl FnMut(&str) -> Option<&'a str>) -> Option<Self> {
        let mut num = |k| get(k).and_then(|v| v.trim().parse::<f64>().ok());
        Some(Self {
            latency_ms: num(PREDICTED_LATENCY_HEADER)?,
            cost: num(ESTIMATED_COST_HEADER)?,
            utility: num(UTILITY_HEADER)?,
        })
    }
}
