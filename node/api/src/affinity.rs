//! Prefix affinity: which node is likely to hold a request's prefix in its
//! KV cache, decided before the request is tokenized (the routing node may
//! not hold the model, nor its tokenizer).
//!
//! A request's text (its `prompt`, or its messages' roles and contents in
//! order) is cut into [`CHUNK_BYTES`]-byte chunks and named by a hash chain
//! salted by the tenant, as the KV cache's blocks are; only the names at
//! depths 1, 2, 4, 8, ... chunks and at its last whole chunk are kept. A node
//! notes the names of every request it serves in a bounded summary
//! ([`PrefixSummary`], the most recently used [`MAX_SUMMARY`] names) and
//! gossips it in its load report; the router finds, per candidate, the
//! deepest name of the request the candidate's summary holds, and counts
//! that many bytes of prompt as cached there: a lower bound, within a
//! factor of two, of what the two share. A name says nothing of the
//! text (though one who knows a tenant's name could test a guessed text
//! against the gossip), and one tenant's names never match another's, nor
//! another model's.

use std::collections::HashMap;

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Bytes of request text per chunk.
pub const CHUNK_BYTES: usize = 256;
/// Most names a node's summary keeps (and gossips).
pub const MAX_SUMMARY: usize = 192;

/// A request's text as affinity reads it: its prompt, or its messages'
/// roles and texts, each ended by a separator no text holds.
pub fn request_text(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return String::new();
    };
    match (&v["prompt"], &v["messages"]) {
        (Value::String(p), _) => p.clone(),
        (Value::Array(ps), _) if ps.first().is_some_and(Value::is_string) => {
            ps[0].as_str().unwrap_or_default().to_string()
        }
        (_, Value::Array(ms)) => {
            let mut out = String::new();
            for m in ms {
                out.push_str(m["role"].as_str().unwrap_or_default());
                out.push('\u{1e}');
                match &m["content"] {
                    Value::String(t) => out.push_str(t),
                    Value::Array(parts) => {
                        for p in parts {
                            out.push_str(p["text"].as_str().unwrap_or_default());
                        }
                    }
                    _ => {}
                }
                out.push('\u{1f}');
            }
            out
        }
        _ => String::new(),
    }
}

/// The names of `body`'s prefixes for `tenant`: `(chunks, name)` at the
/// sampled depths, shallowest first.
pub fn fingerprints(tenant: &str, body: &[u8]) -> Vec<(u32, u64)> {
    let text = request_text(body);
    let model = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["model"].as_str().map(String::from))
        .unwrap_or_default();
    let bytes = text.as_bytes();
    let whole = bytes.len() / CHUNK_BYTES;
    let mut out = Vec::new();
    // one tenant's names never match another's, nor another model's
    let mut h: [u8; 32] =
        Sha256::digest(format!("weft-affinity {} {tenant} {model}", tenant.len()).as_bytes())
            .into();
    for i in 0..whole {
        let mut d = Sha256::new();
        d.update(h);
        d.update(&bytes[i * CHUNK_BYTES..(i + 1) * CHUNK_BYTES]);
        h = d.finalize().into();
        let depth = i + 1;
        if depth.is_power_of_two() || depth == whole {
            out.push((
                depth as u32,
                u64::from_le_bytes(h[..8].try_into().expect("8 bytes")),
            ));
        }
    }
    out
}

/// The deepest of `fps` (a request's names) that `held` (a node's
/// summary) has, in chunks; 0 when none.
pub fn deepest_match(fps: &[(u32, u64)], held: &[u64]) -> u32 {
    fps.iter()
        .rev()
        .find(|(_, h)| held.contains(h))
        .map_or(0, |(d, _)| *d)
}

/// The names of the requests a node served lately, most recent kept.
#[derive(Debug, Default)]
pub struct PrefixSummary {
    /// Name → when it was last noted.
    seen: HashMap<u64, u64>,
    tick: u64,
}

impl PrefixSummary {
    /// Notes the names of a request this node serves.
    pub fn note(&mut self, fps: &[(u32, u64)]) {
        for (_, h) in fps {
            self.tick += 1;
            self.seen.insert(*h, self.tick);
        }
        if self.seen.len() > MAX_SUMMARY {
            let mut by_age: Vec<(u64, u64)> = self.seen.iter().map(|(h, t)| (*t, *h)).collect();
            by_age.sort_unstable();
            let drop = self.seen.len() - MAX_SUMMARY;
            for (_, h) in by_age.into_iter().take(drop) {
                self.seen.remove(&h);
            }
        }
    }

    /// The names, for a load report (most recent first).
    pub fn names(&self) -> Vec<u64> {
        let mut v: Vec<(u64, u64)> = self.seen.iter().map(|(h, t)| (*t, *h)).collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v.into_iter().map(|(_, h)| h).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(prompt: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"model": "m", "prompt": prompt})).unwrap()
    }

    #[test]
    fn a_longer_turn_matches_its_earlier_turn_at_the_deepest_depth_both_name() {
        // the earlier turn has 6 whole chunks (names at 1, 2, 4, 6), the
        // later one 14 (1, 2, 4, 8, 14): they share the name at 4 chunks,
        // a lower bound on the 6 they share, within a factor of 2
        let context = "x".repeat(CHUNK_BYTES * 6 + 10);
        let first = fingerprints("t", &body(&context));
        let later = fingerprints("t", &body(&format!("{context}{}", "y".repeat(2000))));
        let held: Vec<u64> = first.iter().map(|f| f.1).collect();
        assert_eq!(deepest_match(&later, &held), 4);
    }

    #[test]
    fn a_changed_chunk_stops_the_match_before_it() {
        let context = "x".repeat(CHUNK_BYTES * 8);
        let mut other = context.clone().into_bytes();
        other[CHUNK_BYTES * 3] = b'q';
        let held: Vec<u64> = fingerprints("t", &body(&context))
            .iter()
            .map(|f| f.1)
            .collect();
        let fps = fingerprints("t", &body(&String::from_utf8(other).unwrap()));
        assert_eq!(deepest_match(&fps, &held), 2);
    }

    #[test]
    fn another_tenants_names_never_match() {
        let text = "z".repeat(CHUNK_BYTES * 4);
        let a: Vec<u64> = fingerprints("alpha", &body(&text))
            .iter()
            .map(|f| f.1)
            .collect();
        assert_eq!(deepest_match(&fingerprints("beta", &body(&text)), &a), 0);
    }

    #[test]
    fn another_models_names_never_match() {
        let text = "z".repeat(CHUNK_BYTES * 4);
        let b =
            |m: &str| serde_json::to_vec(&serde_json::json!({"model": m, "prompt": text})).unwrap();
        let held: Vec<u64> = fingerprints("t", &b("a")).iter().map(|f| f.1).collect();
        assert_eq!(deepest_match(&fingerprints("t", &b("b")), &held), 0);
    }

    #[test]
    fn chat_messages_are_read_in_order_with_their_roles() {
        let m = |role: &str, c: &str| serde_json::json!({"role": role, "content": c});
        let b = serde_json::to_vec(
            &serde_json::json!({"messages": [m("system", "be brief"), m("user", "hi")]}),
        )
        .unwrap();
        assert_eq!(
            request_text(&b),
            "system\u{1e}be brief\u{1f}user\u{1e}hi\u{1f}"
        );
    }

    #[test]
    fn the_summary_keeps_the_most_recent_names_within_its_bound() {
        let mut s = PrefixSummary::default();
        for i in 0..(MAX_SUMMARY as u64 + 50) {
            s.note(&[(1, i)]);
        }
        let names = s.names();
        assert_eq!(names.len(), MAX_SUMMARY);
        assert_eq!(names[0], MAX_SUMMARY as u64 + 49);
        assert!(!names.contains(&0));
    }
}
