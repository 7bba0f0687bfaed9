//! The `x-weft-*` headers and the chunk field that the API reads and
//! writes, and that the data plane carries between nodes.

use axum::http::HeaderMap;

/// The header counting how often a request was forwarded.
pub const HOPS_HEADER: &str = "x-weft-hops";
/// The header naming the node a forwarded request came from.
pub const FROM_HEADER: &str = "x-weft-forwarded-by";
/// The response header naming the node that served a forwarded request.
pub const SERVED_BY_HEADER: &str = "x-weft-served-by";
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

/// How often a request in `headers` was forwarded already.
pub fn hops(headers: &HeaderMap) -> u32 {
    headers
        .get(HOPS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A header's value as text, if it is there and is text.
pub fn header_str<'a>(h: &'a HeaderMap, k: &str) -> Option<&'a str> {
    h.get(k).and_then(|v| v.to_str().ok())
}
