//! W3C Trace Context (`traceparent`): one request followed through every
//! node it passes. A client's `traceparent` is kept (its trace id); a
//! missing or malformed one starts a new trace, as the recommendation says.
//! Each node gives its part of the request a span id of its own, sends
//! `traceparent` with that span as the parent to the next node (forwarded
//! requests, chains), and writes trace id, span id and parent span id into
//! its JSON log lines and intent records next to the request id.
//!
//! Only version `00` is read field by field; a later version is read for
//! its first three fields, as the recommendation asks of version-00
//! parsers, and `ff` is invalid.

use axum::http::HeaderMap;
use rand_core::{OsRng, RngCore};

/// The request header (a node passes it on to the next, never back).
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// A node's span of a request's trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// The trace id: 32 lowercase hex digits, not all zero.
    pub trace_id: String,
    /// This node's span: 16 lowercase hex digits, not all zero.
    pub span_id: String,
    /// The span it came from (the client's or the previous node's), if any.
    pub parent_id: Option<String>,
    /// The trace flags (bit 0: sampled), as 2 hex digits.
    pub flags: String,
}

impl Trace {
    /// This node's span of the trace `headers` carry, or of a new trace.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        headers
            .get(TRACEPARENT_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse)
            .map_or_else(Self::root, |(trace_id, parent, flags)| Self {
                trace_id,
                span_id: random_hex::<8>(),
                parent_id: Some(parent),
                flags,
            })
    }

    /// A new trace, this node's span its first.
    pub fn root() -> Self {
        Self {
            trace_id: random_hex::<16>(),
            span_id: random_hex::<8>(),
            parent_id: None,
            flags: "01".into(),
        }
    }

    /// The `traceparent` that makes this span the parent of the next.
    pub fn header(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.span_id, self.flags)
    }
}

/// The trace id, parent id and flags of a valid `traceparent`.
pub fn parse(v: &str) -> Option<(String, String, String)> {
    let v = v.trim();
    if !v.is_ascii() {
        return None;
    }
    let b = v.as_bytes();
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let (version, trace, parent, flags) = (&v[..2], &v[3..35], &v[36..52], &v[53..55]);
    let lower_hex = |s: &str| s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    if ![version, trace, parent, flags].iter().all(|s| lower_hex(s)) || version == "ff" {
        return None;
    }
    // version 00 is exactly 55 characters; a later one may add fields
    if (version == "00" && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
        return None;
    }
    if trace.bytes().all(|c| c == b'0') || parent.bytes().all(|c| c == b'0') {
        return None;
    }
    Some((trace.into(), parent.into(), flags.into()))
}

fn random_hex<const N: usize>() -> String {
    let mut b = [0u8; N];
    loop {
        OsRng.fill_bytes(&mut b);
        if b.iter().any(|x| *x != 0) {
            return hex::encode(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT_HEADER, v.parse().unwrap());
        h
    }

    #[test]
    fn a_clients_trace_id_is_kept_and_its_span_becomes_the_parent() {
        let t = Trace::from_headers(&headers(GOOD));
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_id.as_deref(), Some("00f067aa0ba902b7"));
        assert_ne!(t.span_id, "00f067aa0ba902b7");
        assert_eq!(t.flags, "01");
    }

    #[test]
    fn the_header_passed_on_names_this_nodes_span_as_parent() {
        let t = Trace::from_headers(&headers(GOOD));
        let next = Trace::from_headers(&headers(&t.header()));
        assert_eq!(next.trace_id, t.trace_id);
        assert_eq!(next.parent_id.as_deref(), Some(t.span_id.as_str()));
    }

    #[test]
    fn malformed_traceparents_start_a_new_trace() {
        for bad in [
            "",
            "garbage",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // upper case
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero parent
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // version ff
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", // 00 with more
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01", // dash misplaced
        ] {
            assert!(parse(bad).is_none(), "{bad:?} accepted");
            let t = Trace::from_headers(&headers(bad));
            assert_eq!(t.parent_id, None, "{bad:?}");
            assert_ne!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736", "{bad:?}");
        }
    }

    #[test]
    fn a_traceparent_with_a_multibyte_character_is_malformed_not_a_panic() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0\u{e9}";
        assert!(parse(v).is_none());
    }

    #[test]
    fn a_later_version_is_read_for_its_first_fields() {
        let v = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        assert_eq!(
            parse(v).map(|p| p.0),
            Some("4bf92f3577b34da6a3ce929d0e0e4736".into())
        );
    }

    #[test]
    fn new_traces_do_not_repeat() {
        let a = Trace::root();
        let b = Trace::root();
        assert_ne!(a.trace_id, b.trace_id);
        assert_eq!(a.trace_id.len(), 32);
        assert_eq!(a.span_id.len(), 16);
        assert!(parse(&a.header()).is_some(), "{}", a.header());
    }
}
