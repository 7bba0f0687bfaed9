//! Intent logs people can trust and use, on a real `weft up`: its log's
//! signed checkpoints held by its embedded coordinator, each tampering
//! `weft audit verify` must find (tried from the attacker's side: the
//! chain recomputed after an edit, lines cut off, a file deleted, a
//! checkpoint signed with a foreign or a revoked key), pruning, `query`
//! and `explain`, and the decision given back to the agent.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use weft_audit::{hash, Checkpoint, Line};

mod common;
use common::{client, start, Node, START_DEADLINE};

const KEYS: &str = "[api_keys]\n\"sk-alpha-000001\" = \"alpha\"\n\"sk-beta-0000001\" = \"beta\"\n";

/// A node whose intent log is signed every second, its price 1e-6 per token.
struct Up {
    node: Node,
    log: PathBuf,
    cluster: PathBuf,
}

fn up(extra: &str) -> Up {
    let dir = tempfile::tempdir().unwrap().keep();
    let log = dir.join("intent");
    let node = start(&format!(
        "intent_log = \"{}\"\nintent_checkpoint_s = 1\ncost_per_token = 0.000001\n{extra}\n{KEYS}",
        log.display()
    ));
    let t = Instant::now();
    let cluster = loop {
        let said = node.said.lock().unwrap().clone();
        if let Some(p) = said
            .iter()
            .find_map(|l| l.strip_prefix("cluster state: weft status --config "))
        {
            break PathBuf::from(p.trim());
        }
        assert!(
            t.elapsed() < START_DEADLINE,
            "no cluster state printed: {said:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    Up { node, log, cluster }
}

/// The node the tests that only read share, and the lock that keeps its
/// log still while one of them looks at it.
fn shared() -> (&'static Up, MutexGuard<'static, ()>) {
    static UP: OnceLock<Up> = OnceLock::new();
    static QUIET: Mutex<()> = Mutex::new(());
    let guard = QUIET.lock().unwrap_or_else(|e| e.into_inner());
    (UP.get_or_init(|| up("")), guard)
}

/// A completion by tenant alpha; the answer's status, headers and body.
fn ask(u: &Up, body: Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = client()
        .post(format!("{}/v1/completions", u.node.base))
        .bearer_auth("sk-alpha-000001")
        .json(&body)
        .send()
        .unwrap();
    let (st, h) = (r.status().as_u16(), r.headers().clone());
    (st, h, r.json().unwrap_or(Value::Null))
}

fn served(u: &Up, n: usize) {
    for i in 0..n {
        let (st, _, v) = ask(
            u,
            json!({"model": "tiny-gemma", "prompt": format!("hello {i}"), "max_tokens": 2}),
        );
        assert_eq!(st, 200, "{v}");
    }
}

fn lines_of(dir: &Path) -> Vec<(PathBuf, Line)> {
    weft_audit::files(dir)
        .unwrap()
        .into_iter()
        .flat_map(|f| {
            std::fs::read_to_string(&f)
                .unwrap()
                .lines()
                .map(|l| (f.clone(), serde_json::from_str::<Line>(l).unwrap()))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn held_checkpoint(u: &Up) -> Option<u64> {
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["status", "--json", "--config"])
        .arg(&u.cluster)
        .output()
        .unwrap();
    let s: Value = serde_json::from_slice(&out.stdout).ok()?;
    s.pointer("/state/checkpoints/local/latest/seq")?.as_u64()
}

/// Waits until the log ends with a checkpoint the coordinator holds.
fn settled(u: &Up) {
    let t = Instant::now();
    loop {
        let last = lines_of(&u.log).pop().map(|(_, l)| l);
        let signed = last
            .as_ref()
            .and_then(|l| Checkpoint::from_record(&l.record))
            .and_then(|c| c.ok());
        if let Some(cp) = signed {
            if held_checkpoint(u) == Some(cp.seq) {
                return;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the log never settled on a checkpoint the coordinator holds"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A copy of the log to tamper with, taken after `n` more answers once the
/// coordinator holds the log's last checkpoint: its one file and lines.
fn settled_copy(u: &Up, n: usize) -> (tempfile::TempDir, PathBuf, Vec<Raw>) {
    served(u, n);
    settled(u);
    let copied = copy(&u.log);
    let (file, lines) = one_file(copied.path());
    (copied, file, lines)
}

/// A copy of the log to tamper with.
fn copy(dir: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    for f in weft_audit::files(dir).unwrap() {
        std::fs::copy(&f, to.path().join(f.file_name().unwrap())).unwrap();
    }
    to
}

fn verify(dir: &Path, cluster: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["audit", "verify"])
        .arg(dir)
        .arg("--cluster")
        .arg(cluster)
        .output()
        .unwrap()
}

/// What `weft audit verify` said of a log it passed.
fn verified(dir: &Path, cluster: &Path) -> String {
    let out = verify(dir, cluster);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    said
}

/// The first bad sequence number `weft audit verify` named (it exited 1).
fn first_bad(out: &Output) -> (u64, String) {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{err}{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let n = err
        .lines()
        .find_map(|l| l.strip_prefix("first bad sequence number: "))
        .unwrap_or_else(|| panic!("no first bad sequence number in: {err}"))
        .trim()
        .parse()
        .unwrap();
    (n, err)
}

/// A line as stored (its exact bytes) and as read.
#[derive(Clone)]
struct Raw {
    text: String,
    line: Line,
}

impl Raw {
    fn of(line: Line) -> Self {
        Self {
            text: serde_json::to_string(&line).unwrap(),
            line,
        }
    }
}

fn write_lines(file: &Path, lines: &[Raw]) {
    let text: String = lines.iter().map(|l| l.text.clone() + "\n").collect();
    std::fs::write(file, text).unwrap();
}

/// The log's only file as lines (the tests that tamper keep to one file).
fn one_file(dir: &Path) -> (PathBuf, Vec<Raw>) {
    let files = weft_audit::files(dir).unwrap();
    assert_eq!(files.len(), 1, "{files:?}");
    let lines = std::fs::read_to_string(&files[0])
        .unwrap()
        .lines()
        .map(|t| Raw {
            text: t.to_string(),
            line: serde_json::from_str(t).unwrap(),
        })
        .collect();
    (files[0].clone(), lines)
}

fn is_checkpoint(l: &Raw) -> bool {
    Checkpoint::from_record(&l.line.record).is_some()
}

/// Appends `record` to `lines` with its chain link.
fn chained(lines: &mut Vec<Raw>, record: Value) {
    let last = lines.last().unwrap();
    lines.push(Raw::of(Line {
        seq: last.line.seq + 1,
        prev: hash(last.text.as_bytes()),
        at_unix_ms: last.line.at_unix_ms + 1,
        record,
    }));
}

/// Appends a request record and a checkpoint of it signed by `signer`.
fn forge_checkpoint(file: &Path, mut lines: Vec<Raw>, signer: &dyn weft_audit::Signer) -> u64 {
    chained(
        &mut lines,
        json!({"decision": "admitted", "request_id": "forged"}),
    );
    let last = lines.last().unwrap();
    let forged = last.line.seq;
    let cp = Checkpoint::sign(signer, forged, &hash(last.text.as_bytes()), 1, "interval").unwrap();
    chained(&mut lines, cp.record());
    write_lines(file, &lines);
    forged
}

#[test]
fn a_running_nodes_log_verifies_against_the_checkpoints_its_coordinator_holds() {
    let (u, _quiet) = shared();
    served(u, 3);
    settled(u);
    let said = verified(&u.log, &u.cluster);
    assert!(said.contains("checked against the cluster's CA"), "{said}");
    assert!(!said.contains("coordinators: 0 of"), "{said}");
}

#[test]
fn a_line_rewritten_with_its_chain_recomputed_is_found_after_the_last_good_checkpoint() {
    let (u, _quiet) = shared();
    let (copied, file, mut lines) = settled_copy(u, 2);
    // the attacker edits an admitted request's tenant and recomputes every hash after it
    let at = lines
        .iter()
        .rposition(|l| l.line.record["decision"] == "admitted")
        .unwrap();
    let since = lines[..at]
        .iter()
        .rposition(is_checkpoint)
        .map_or(0, |i| lines[i].line.seq + 1);
    lines[at].line.record["tenant"] = json!("someone-else");
    for i in at..lines.len() {
        let mut l = lines[i].line.clone();
        if i > 0 {
            l.prev = hash(lines[i - 1].text.as_bytes());
        }
        lines[i] = Raw::of(l);
    }
    write_lines(&file, &lines);
    let (bad, err) = first_bad(&verify(copied.path(), &u.cluster));
    assert_eq!(bad, since, "{err}");
    assert!(err.contains("rewritten"), "{err}");
}

#[test]
fn lines_cut_off_after_the_last_checkpoint_left_are_found() {
    let (u, _quiet) = shared();
    let (copied, file, lines) = settled_copy(u, 1);
    // keep the log up to an earlier checkpoint: what follows it is gone
    let cps: Vec<usize> = (0..lines.len())
        .filter(|&i| is_checkpoint(&lines[i]))
        .collect();
    assert!(cps.len() >= 2, "one checkpoint only");
    let keep = cps[cps.len() - 2];
    write_lines(&file, &lines[..=keep]);
    let (bad, err) = first_bad(&verify(copied.path(), &u.cluster));
    assert_eq!(bad, lines[keep].line.seq + 1, "{err}");
    assert!(err.contains("cut off"), "{err}");
}

#[test]
fn a_checkpoint_signed_with_a_foreign_key_is_found() {
    let (u, _quiet) = shared();
    let (copied, file, lines) = settled_copy(u, 1);
    let (cert, key) = weft_cluster::credentials::ClusterCa::generate("elsewhere").unwrap();
    let stranger = weft_cluster::credentials::ClusterCa::from_pem(cert, &key)
        .unwrap()
        .issue_identity("local", weft_cluster::credentials::Role::Node)
        .unwrap();
    let forged = forge_checkpoint(&file, lines, &stranger);
    let (bad, err) = first_bad(&verify(copied.path(), &u.cluster));
    assert_eq!(bad, forged, "{err}");
    assert!(err.contains("foreign"), "{err}");
}

#[test]
fn a_checkpoint_signed_with_a_revoked_key_is_found() {
    let (u, _quiet) = shared();
    served(u, 1);
    settled(u);
    // a second key of this node's name, stolen, then revoked
    let state = u.cluster.parent().unwrap();
    let ca = weft_cluster::credentials::ClusterCa::load(&state.join("ca")).unwrap();
    let stolen = ca
        .issue_identity("local", weft_cluster::credentials::Role::Node)
        .unwrap();
    let kept = tempfile::tempdir().unwrap();
    stolen.save(kept.path()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["cluster", "revoke", "--config"])
        .arg(&u.cluster)
        .arg(kept.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    settled(u);
    let copied = copy(&u.log);
    let (file, lines) = one_file(copied.path());
    let forged = forge_checkpoint(&file, lines, &stolen);
    let (bad, err) = first_bad(&verify(copied.path(), &u.cluster));
    assert_eq!(bad, forged, "{err}");
    assert!(err.contains("revoked"), "{err}");
}

#[test]
fn a_file_deleted_from_the_middle_of_the_log_is_found() {
    let u = up("intent_log_file_bytes = 1500\n");
    served(&u, 12);
    settled(&u);
    let copied = copy(&u.log);
    let files = weft_audit::files(copied.path()).unwrap();
    assert!(files.len() >= 3, "{files:?}");
    let gone: Line = serde_json::from_str(
        std::fs::read_to_string(&files[1])
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    std::fs::remove_file(&files[1]).unwrap();
    let (bad, err) = first_bad(&verify(copied.path(), &u.cluster));
    assert_eq!(bad, gone.seq, "{err}");
}

#[test]
fn a_pruned_log_still_verifies_from_its_signed_boundary() {
    let u = up("intent_log_file_bytes = 1500\nintent_log_max_bytes = 6000\n");
    served(&u, 30);
    settled(&u);
    let files = weft_audit::files(&u.log).unwrap();
    let total: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    assert!(
        !files[0].ends_with("intent-000000.jsonl"),
        "nothing was pruned ({total} bytes)"
    );
    let said = verified(&u.log, &u.cluster);
    assert!(said.contains("pruned: it starts at seq"), "{said}");
}

#[test]
fn a_clean_stop_ends_the_log_with_a_signed_shutdown_checkpoint() {
    let mut u = up("");
    served(&u, 1);
    let ca = tempfile::tempdir().unwrap();
    let ca_pem = ca.path().join("ca.pem");
    std::fs::copy(u.cluster.parent().unwrap().join("ca/ca.pem"), &ca_pem).unwrap();
    Command::new("kill")
        .args(["-TERM", &u.node.child.id().to_string()])
        .status()
        .unwrap();
    assert!(u.node.child.wait().unwrap().success());
    let (_, last) = lines_of(&u.log).pop().unwrap();
    let cp = Checkpoint::from_record(&last.record).unwrap().unwrap();
    assert_eq!(cp.reason, "shutdown");
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["audit", "verify"])
        .arg(&u.log)
        .arg("--ca")
        .arg(&ca_pem)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn weft_audit_cli(args: &[&str], log: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .arg("audit")
        .args(args)
        .arg(log)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn query_keeps_only_the_tenants_lines_asked_for() {
    let (u, _quiet) = shared();
    served(u, 1);
    let r = client()
        .post(format!("{}/v1/completions", u.node.base))
        .bearer_auth("sk-beta-0000001")
        .json(&json!({"model": "tiny-gemma", "prompt": "hi", "max_tokens": 2}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let (ok, out) = weft_audit_cli(&["query", "--tenant", "beta", "--json"], &u.log);
    assert!(ok, "{out}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!lines.is_empty(), "{out}");
    assert!(
        lines.iter().all(|l| l["record"]["tenant"] == "beta"),
        "{out}"
    );
}

#[test]
fn query_finds_refusals_by_their_reason() {
    let (u, _quiet) = shared();
    let (st, _, _) = ask(
        u,
        json!({"model": "tiny-gemma", "prompt": "hi", "max_tokens": 2, "weft": {"max_cost": 1e-9}}),
    );
    assert_eq!(st, 400);
    let (ok, table) = weft_audit_cli(
        &["query", "--decision", "refused", "--reason", "cost budget"],
        &u.log,
    );
    assert!(ok, "{table}");
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert!(!rows.is_empty(), "{table}");
    assert!(
        rows.iter()
            .all(|r| r.contains("refused") && r.contains("cost budget")),
        "{table}"
    );
}

#[test]
fn explain_shows_the_candidates_terms_the_choice_and_the_outcome() {
    let (u, _quiet) = shared();
    let (st, h, _) = ask(
        u,
        json!({"model": "tiny-gemma", "prompt": "explain me", "max_tokens": 2}),
    );
    assert_eq!(st, 200);
    let id = h["x-weft-request-id"].to_str().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["audit", "explain", &id])
        .arg(&u.log)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("expected"), "{text}");
    assert!(text.contains("local *"), "{text}");
    assert!(text.contains("chose local at utility"), "{text}");
    assert!(text.contains("outcome: served by local"), "{text}");
}

#[test]
fn explain_of_an_unknown_request_exits_1() {
    let (u, _quiet) = shared();
    let (ok, out) = weft_audit_cli(&["explain", "cmpl-never"], &u.log);
    assert!(!ok);
    assert!(out.contains("names request"), "{out}");
}

#[test]
fn a_whole_answer_carries_the_decision_in_its_headers_and_usage() {
    let (u, _quiet) = shared();
    let (st, h, v) = ask(
        u,
        json!({"model": "tiny-gemma", "prompt": "hello", "max_tokens": 2}),
    );
    assert_eq!(st, 200);
    let w = &v["usage"]["weft"];
    assert_eq!(
        h["x-weft-request-id"].to_str().unwrap(),
        w["request_id"],
        "{v}"
    );
    assert_eq!(h["x-weft-served-by"], "local");
    assert_eq!(w["served_by"], "local");
    let latency: f64 = h["x-weft-predicted-latency-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(latency > 0.0 && (latency - w["predicted_latency_ms"].as_f64().unwrap()).abs() < 0.1);
    let cost: f64 = h["x-weft-estimated-cost"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        cost > 0.0 && (cost / w["estimated_cost"].as_f64().unwrap() - 1.0).abs() < 1e-3,
        "{cost} {w}"
    );
    assert!(w["utility"].as_f64().is_some(), "{w}");
}

#[test]
fn a_streamed_answer_carries_the_decision_in_its_headers_and_final_usage_chunk() {
    let (u, _quiet) = shared();
    let r = client()
        .post(format!("{}/v1/completions", u.node.base))
        .bearer_auth("sk-alpha-000001")
        .json(&json!({"model": "tiny-gemma", "prompt": "hello", "max_tokens": 2, "stream": true, "stream_options": {"include_usage": true}}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-weft-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(r.headers().contains_key("x-weft-predicted-latency-ms"));
    let text = r.text().unwrap();
    let usage: Value = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .rfind(|c| !c["usage"].is_null())
        .unwrap_or_else(|| panic!("no usage chunk: {text}"));
    assert_eq!(usage["usage"]["weft"]["request_id"], id.as_str(), "{usage}");
    assert!(usage["usage"]["weft"]["estimated_cost"].as_f64().unwrap() > 0.0);
}

#[test]
fn a_budget_below_the_price_is_refused_with_the_reason_and_logged() {
    let (u, _quiet) = shared();
    let (st, h, v) = ask(
        u,
        json!({"model": "tiny-gemma", "prompt": "hello", "max_tokens": 2, "weft": {"max_cost": 1e-9}}),
    );
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["code"], "over_budget", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cost budget"),
        "{v}"
    );
    let id = h["x-weft-request-id"].to_str().unwrap();
    let logged = lines_of(&u.log)
        .into_iter()
        .map(|(_, l)| l.record)
        .find(|r| r["request_id"] == id)
        .expect("the refusal is in the log");
    assert_eq!(logged["decision"], "refused");
    assert_eq!(logged["intent"]["max_cost"], 1e-9);
    assert!(
        logged["reason"].as_str().unwrap().contains("cost budget"),
        "{logged}"
    );
}

#[test]
fn a_budget_above_the_price_is_served_and_recorded_in_the_intent() {
    let (u, _quiet) = shared();
    let (st, h, _) = ask(
        u,
        json!({"model": "tiny-gemma", "prompt": "hello", "max_tokens": 2, "weft": {"max_cost": 1.0}}),
    );
    assert_eq!(st, 200);
    let id = h["x-weft-request-id"].to_str().unwrap();
    let logged = lines_of(&u.log)
        .into_iter()
        .map(|(_, l)| l.record)
        .find(|r| r["request_id"] == id && r["decision"] == "admitted")
        .expect("the admission is in the log");
    assert_eq!(logged["intent"]["max_cost"], 1.0);
}

#[test]
fn the_embedded_coordinators_placements_are_in_the_same_signed_log() {
    let (u, _quiet) = shared();
    let (ok, out) = weft_audit_cli(
        &["query", "--decision", "control-applied", "--json"],
        &u.log,
    );
    assert!(ok, "{out}");
    let ops: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["record"]["op"].clone())
        .collect();
    assert!(ops.iter().any(|o| o == "commit-placement"), "{out}");
    assert!(ops.iter().any(|o| o == "put-model"), "{out}");
}

#[test]
fn a_client_cannot_set_the_prediction_or_the_request_id_it_is_given() {
    let (u, _quiet) = shared();
    let r = client()
        .post(format!("{}/v1/completions", u.node.base))
        .bearer_auth("sk-alpha-000001")
        .header("x-weft-request-id", "spoofed")
        .header("x-weft-utility", "99")
        .header("x-weft-estimated-cost", "0")
        .header("x-weft-predicted-latency-ms", "0")
        .json(&json!({"model": "tiny-gemma", "prompt": "hello", "max_tokens": 2}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_ne!(h["x-weft-request-id"], "spoofed");
    assert_ne!(h["x-weft-utility"], "99");
    assert_ne!(h["x-weft-estimated-cost"], "0");
}
