//! Finding decisions in intent logs (`weft audit query`) and telling the
//! story of one request (`weft audit explain`).

use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::Value;

use crate::{read_lines, resolve, Checkpoint, Line, Result};

/// One line found, with the log it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// The log's node (the signer of its checkpoints, else the name its
    /// records give, else its directory).
    pub node: String,
    /// The line.
    pub line: Line,
}

/// Every line of each log in `logs` (each a directory or one file), in
/// order, with the node each came from. Lines that do not parse are
/// skipped (`weft audit verify` reports them).
pub fn read(logs: &[PathBuf]) -> Result<Vec<Found>> {
    let mut out = Vec::new();
    for log in logs {
        let files = resolve(std::slice::from_ref(log))?;
        let mut lines = Vec::new();
        let mut node = None;
        read_lines(&files, |_, _, _, parsed| {
            if let Ok(l) = parsed {
                if node.is_none() {
                    node = Checkpoint::from_record(&l.record)
                        .and_then(|c| c.ok())
                        .map(|c| c.node);
                }
                lines.push(l);
            }
            true
        })?;
        let node = node
            .or_else(|| {
                lines.iter().find_map(|l| {
                    l.record
                        .get("node")
                        .and_then(Value::as_str)
                        .map(String::from)
                })
            })
            .unwrap_or_else(|| log.display().to_string());
        out.extend(lines.into_iter().map(|line| Found {
            node: node.clone(),
            line,
        }));
    }
    Ok(out)
}

/// What `weft audit query` keeps; every field set must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Written at or after (ms since the epoch).
    pub since_ms: Option<u64>,
    /// Written before.
    pub until_ms: Option<u64>,
    /// The tenant.
    pub tenant: Option<String>,
    /// The model.
    pub model: Option<String>,
    /// The request id (a node's own id or the routing node's).
    pub request_id: Option<String>,
    /// The decision (`routed`, `admitted`, `refused`, `rerouted`, …) or
    /// event (`sandbox.create`, `control-refused`, `checkpoint`, …).
    pub decision: Option<String>,
    /// Words of the refusal reason (case-insensitive).
    pub reason: Option<String>,
    /// The node that wrote it, was chosen, or served it.
    pub node: Option<String>,
}

fn s<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

/// The decision or event a record states.
pub fn kind(r: &Value) -> &str {
    s(r, "decision").or_else(|| s(r, "event")).unwrap_or("-")
}

/// The refusal reason a record gives, if any.
pub fn reason(r: &Value) -> Option<String> {
    if let Some(x) = s(r, "reason") {
        return Some(x.to_string());
    }
    r.pointer("/route/rejected/message")
        .and_then(Value::as_str)
        .map(String::from)
}

/// The request ids a record belongs to.
fn ids(r: &Value) -> impl Iterator<Item = &str> {
    ["request_id", "routed_id", "sandbox"]
        .into_iter()
        .filter_map(move |k| s(r, k))
}

impl Filter {
    /// Whether `f` passes.
    pub fn matches(&self, f: &Found) -> bool {
        let (l, r) = (&f.line, &f.line.record);
        let eq = |want: &Option<String>, got: Option<&str>| {
            want.as_deref().is_none_or(|w| got == Some(w))
        };
        self.since_ms.is_none_or(|t| l.at_unix_ms >= t)
            && self.until_ms.is_none_or(|t| l.at_unix_ms < t)
            && eq(&self.tenant, s(r, "tenant"))
            && eq(&self.model, s(r, "model"))
            && self
                .request_id
                .as_deref()
                .is_none_or(|id| ids(r).any(|x| x == id))
            && self
                .decision
                .as_deref()
                .is_none_or(|d| s(r, "decision") == Some(d) || s(r, "event") == Some(d))
            && self.reason.as_deref().is_none_or(|w| {
                reason(r).is_some_and(|x| x.to_lowercase().contains(&w.to_lowercase()))
            })
            && self.node.as_deref().is_none_or(|n| {
                f.node == n
                    || s(r, "node") == Some(n)
                    || r.pointer("/route/choice").and_then(Value::as_str) == Some(n)
            })
    }
}

/// `at` (ms since the epoch) as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_time(at: u64) -> String {
    let (secs, ms) = (at / 1000, at % 1000);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // days since 1970-01-01 to a civil date (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A time as `weft audit query` takes it: RFC 3339 in UTC
/// (`2026-12-02T10:00:00Z`, seconds and fraction optional), a Unix time
/// in seconds or milliseconds, or an age before `now_ms` (`90s`, `15m`,
/// `2h`, `7d`).
pub fn parse_time(t: &str, now_ms: u64) -> std::result::Result<u64, String> {
    let t = t.trim();
    let bad = || {
        format!("{t:?} is not a time: give 2026-12-02T10:00:00Z, Unix seconds or milliseconds, or an age such as 15m, 2h or 7d")
    };
    if let Some((n, unit)) = t
        .find(|c: char| !c.is_ascii_digit())
        .filter(|&i| i > 0 && t[i..].len() == 1)
        .map(|i| (&t[..i], &t[i..]))
    {
        let n: u64 = n.parse().map_err(|_| bad())?;
        let ms: u64 = match unit {
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        return Ok(now_ms.saturating_sub(n.saturating_mul(ms)));
    }
    if t.bytes().all(|b| b.is_ascii_digit()) && !t.is_empty() {
        let n: u64 = t.parse().map_err(|_| bad())?;
        // before 2001-09-09 in ms means it was given in seconds
        return Ok(if n < 1_000_000_000_000 { n * 1000 } else { n });
    }
    let t2 = t
        .strip_suffix('Z')
        .or_else(|| t.strip_suffix("+00:00"))
        .ok_or_else(bad)?;
    let (date, time) = t2.split_once('T').unwrap_or((t2, "00:00:00"));
    let num = |x: &str| x.parse::<i64>().map_err(|_| bad());
    let dp: Vec<&str> = date.split('-').collect();
    let [y, m, d] = dp[..] else { return Err(bad()) };
    let (y, m, d) = (num(y)?, num(m)?, num(d)?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let tp: Vec<&str> = hms.split(':').collect();
    let (hh, mm, ss) = match tp[..] {
        [h, m] => (num(h)?, num(m)?, 0),
        [h, m, s] => (num(h)?, num(m)?, num(s)?),
        _ => return Err(bad()),
    };
    if !(1970..=9999).contains(&y)
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&d)
        || !(0..=23).contains(&hh)
        || !(0..=59).contains(&mm)
        || !(0..=60).contains(&ss)
    {
        return Err(bad());
    }
    let ms_frac = if frac.is_empty() {
        0
    } else {
        let f3: String = frac.chars().chain("000".chars()).take(3).collect();
        num(&f3)?
    };
    // a civil date to days since 1970-01-01
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs * 1000 + ms_frac).map_err(|_| bad())
}

/// Lines as a table: time, node, seq, decision, request, tenant, model,
/// where it went, reason.
pub fn table(found: &[Found]) -> String {
    let mut rows = vec![[
        "TIME".to_string(),
        "NODE".into(),
        "SEQ".into(),
        "DECISION".into(),
        "REQUEST".into(),
        "TENANT".into(),
        "MODEL".into(),
        "TO".into(),
        "REASON".into(),
    ]];
    for f in found {
        let r = &f.line.record;
        let to = r
            .pointer("/route/choice")
            .and_then(Value::as_str)
            .or_else(|| s(r, "served_by"))
            .unwrap_or("-");
        rows.push([
            format_time(f.line.at_unix_ms),
            f.node.clone(),
            f.line.seq.to_string(),
            kind(r).to_string(),
            ids(r).next().unwrap_or("-").to_string(),
            s(r, "tenant").unwrap_or("-").to_string(),
            s(r, "model").unwrap_or("-").to_string(),
            to.to_string(),
            reason(r).unwrap_or_else(|| "-".into()),
        ]);
    }
    let mut widths = [0usize; 9];
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (w, c)) in widths.iter().zip(row).enumerate() {
            if i == 8 {
                line.push_str(c);
            } else {
                let _ = write!(line, "{c:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn num(v: &Value, k: &str) -> String {
    match v.get(k).and_then(Value::as_f64) {
        Some(x) if x.abs() >= 1000.0 || x == x.trunc() => format!("{x:.0}"),
        Some(x) if x.abs() < 0.01 && x != 0.0 => format!("{x:.2e}"),
        Some(x) => format!("{x:.2}"),
        None => "-".into(),
    }
}

/// The story of request `id` across `found` (every node's logs): each
/// routing decision with its candidates and every term of their scores,
/// the choice and its utility, and what happened next. `None` when no
/// line names it.
pub fn explain(id: &str, found: &[Found]) -> Option<String> {
    let mine: Vec<&Found> = found
        .iter()
        .filter(|f| ids(&f.line.record).any(|x| x == id))
        .collect();
    if mine.is_empty() {
        return None;
    }
    let mut mine = mine;
    mine.sort_by_key(|f| f.line.at_unix_ms);
    let mut out = format!("request {id}\n");
    let mut outcome = String::from("no outcome recorded");
    for f in &mine {
        let r = &f.line.record;
        let at = format_time(f.line.at_unix_ms);
        let what = kind(r);
        let _ = write!(out, "\n{at}  {}  seq {}  {what}", f.node, f.line.seq);
        if let Some(i) = r.get("intent") {
            let _ = write!(
                out,
                "  (criticality {}, deadline {} ms, max cost {})",
                s(i, "criticality").unwrap_or("standard"),
                num(i, "deadline_ms"),
                num(i, "max_cost"),
            );
        }
        out.push('\n');
        if let Some(t) = s(r, "tenant") {
            let _ = writeln!(out, "  tenant {t}, model {}", s(r, "model").unwrap_or("-"));
        }
        if let Some(route) = r.get("route") {
            if let Some(failed) = r.get("failed").and_then(Value::as_array) {
                let names: Vec<&str> = failed.iter().filter_map(Value::as_str).collect();
                let _ = writeln!(out, "  after {} failed:", names.join(", "));
            }
            let _ = writeln!(
                out,
                "  {:<14} {:>8} {:>8} {:>9} {:>8} {:>8} {:>9} {:>10} {:>8}  excluded",
                "candidate",
                "net ms",
                "wait ms",
                "compute",
                "saved",
                "stale",
                "expected",
                "cost",
                "utility"
            );
            for c in route
                .get("candidates")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let chosen = route.get("choice") == c.get("node");
                let name = format!(
                    "{}{}",
                    s(c, "node").unwrap_or("?"),
                    if chosen { " *" } else { "" }
                );
                let excluded = s(c, "excluded")
                    .map(String::from)
                    .or_else(|| c.get("excluded").map(Value::to_string))
                    .unwrap_or_else(|| "-".into());
                let _ = writeln!(
                    out,
                    "  {name:<14} {:>8} {:>8} {:>9} {:>8} {:>8} {:>9} {:>10} {:>8}  {excluded}",
                    num(c, "network_ms"),
                    num(c, "wait_ms"),
                    num(c, "compute_ms"),
                    num(c, "prefill_saved_ms"),
                    num(c, "stale_ms"),
                    num(c, "expected_ms"),
                    num(c, "cost"),
                    num(c, "utility"),
                );
            }
            match (
                s(route, "choice"),
                route.pointer("/rejected/message").and_then(Value::as_str),
            ) {
                (Some(c), _) => {
                    let _ = writeln!(out, "  chose {c} at utility {}", num(route, "utility"));
                    outcome = format!("routed to {c}");
                }
                (None, Some(m)) => {
                    let _ = writeln!(out, "  refused: {m}");
                    outcome = format!("refused by the router: {m}");
                }
                _ => {}
            }
        }
        match what {
            "admitted" => {
                outcome = format!("served by {}", s(r, "node").unwrap_or(&f.node));
                if let Some(n) = r.get("resumed_after").and_then(Value::as_u64) {
                    outcome = format!(
                        "resumed on {} after {n} tokens",
                        s(r, "node").unwrap_or(&f.node)
                    );
                }
                let _ = writeln!(
                    out,
                    "  admitted on {} with {} waiting",
                    s(r, "node").unwrap_or(&f.node),
                    num(r, "queue_waiting")
                );
            }
            "refused" => {
                let why = reason(r).unwrap_or_else(|| "no reason given".into());
                let _ = writeln!(out, "  refused: {why}");
                outcome = format!("refused on {}: {why}", f.node);
            }
            "rerouted" => {}
            other if other.starts_with("sandbox.") => {
                outcome = other.to_string();
            }
            _ => {
                if let Some(why) = reason(r) {
                    let _ = writeln!(out, "  {why}");
                }
            }
        }
    }
    let _ = writeln!(out, "\noutcome: {outcome}");
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn found(node: &str, seq: u64, at: u64, record: Value) -> Found {
        Found {
            node: node.into(),
            line: Line {
                seq,
                prev: String::new(),
                at_unix_ms: at,
                record,
            },
        }
    }

    #[test]
    fn times_print_and_parse_back() {
        let at = 1_796_191_234_567;
        let t = format_time(at);
        assert_eq!(t, "2026-12-02T06:00:34.567Z");
        assert_eq!(parse_time(&t, 0).unwrap(), at);
    }

    #[test]
    fn a_time_may_be_unix_seconds_or_an_age() {
        assert_eq!(parse_time("1796191234", 0).unwrap(), 1_796_191_234_000);
        assert_eq!(parse_time("15m", 1_000_000).unwrap(), 100_000);
        assert!(parse_time("yesterday", 0)
            .unwrap_err()
            .contains("not a time"));
    }

    #[test]
    fn a_filter_keeps_only_what_matches_every_field() {
        let a = found(
            "gw-1",
            0,
            10,
            json!({"decision": "admitted", "tenant": "a", "model": "m", "request_id": "r1"}),
        );
        let b = found(
            "gw-1",
            1,
            20,
            json!({"decision": "refused", "tenant": "b", "model": "m", "reason": "Tenant over its token budget"}),
        );
        let f = Filter {
            model: Some("m".into()),
            reason: Some("token budget".into()),
            ..Default::default()
        };
        assert!(!f.matches(&a));
        assert!(f.matches(&b));
        let by_time = Filter {
            since_ms: Some(15),
            ..Default::default()
        };
        assert!(!by_time.matches(&a) && by_time.matches(&b));
    }

    #[test]
    fn explain_lists_each_candidates_terms_and_the_outcome() {
        let route = json!({"candidates": [
            {"node": "gw-1", "network_ms": 1.0, "wait_ms": 0.0, "compute_ms": 40.0, "prefill_saved_ms": 0.0, "stale_ms": 0.0, "expected_ms": 41.0, "cost": 0.0, "utility": 0.9},
            {"node": "cloud-1", "network_ms": 30.0, "wait_ms": 0.0, "compute_ms": 10.0, "prefill_saved_ms": 0.0, "stale_ms": 0.0, "expected_ms": 40.0, "cost": 0.002, "utility": 0.7}],
            "choice": "gw-1", "utility": 0.9});
        let lines = [
            found(
                "gw-1",
                3,
                10,
                json!({"decision": "routed", "request_id": "req-1", "tenant": "t", "model": "m", "intent": {"criticality": "critical"}, "route": route}),
            ),
            found(
                "gw-1",
                4,
                11,
                json!({"decision": "admitted", "request_id": "cmpl-7", "routed_id": "req-1", "node": "gw-1"}),
            ),
            found(
                "gw-1",
                5,
                12,
                json!({"decision": "admitted", "request_id": "other"}),
            ),
        ];
        let text = explain("req-1", &lines).unwrap();
        assert!(text.contains("cloud-1"), "{text}");
        assert!(text.contains("gw-1 *"), "{text}");
        assert!(text.contains("chose gw-1 at utility 0.90"), "{text}");
        assert!(text.contains("outcome: served by gw-1"), "{text}");
        assert!(!text.contains("other"), "{text}");
        assert!(explain("nobody", &lines).is_none());
    }
}
