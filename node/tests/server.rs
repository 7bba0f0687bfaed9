//! `weft up` as a user meets it: the binary on a free port with the tiny test
//! model, spoken to over HTTP.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::{
    chunks, client, launch, post, sse, start, tiny_model, wait_ready, Node, START_DEADLINE,
};

/// Waits until the node's /metrics text satisfies `pred`; returns that text.
fn wait_metrics(node: &Node, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        let m = client()
            .get(format!("{}/metrics", node.base))
            .send()
            .unwrap()
            .text()
            .unwrap();
        if pred(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "metrics never matched:\n{m}");
        std::thread::yield_now();
    }
}

fn assert_error(status: u16, body: &Value, want: u16) {
    assert_eq!(status, want, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(body["error"]["type"].is_string(), "{body}");
}

fn get(node: &Node, path: &str) -> reqwest::blocking::Response {
    client().get(format!("{}{path}", node.base)).send().unwrap()
}

fn metrics(node: &Node) -> String {
    get(node, "/metrics").text().unwrap()
}

#[test]
fn healthz_answers_ok() {
    let n = start("");
    assert_eq!(get(&n, "/healthz").status(), 200);
}

#[test]
fn the_model_list_names_the_served_model() {
    let n = start("");
    let models: Value = get(&n, "/v1/models").json().unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-gemma");
}

#[test]
fn a_completion_is_shaped_as_openai_shapes_it() {
    let n = start("");
    let (st, v) = post(
        &n,
        "/v1/completions",
        &json!({"model": "tiny-gemma", "prompt": "hello world", "max_tokens": 5, "temperature": 0}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(
        v["usage"]["total_tokens"],
        v["usage"]["prompt_tokens"].as_u64().unwrap() + 5
    );
}

#[test]
fn a_streamed_completion_gives_the_whole_text_then_its_usage_and_done() {
    let n = start("");
    let (_, v) = post(
        &n,
        "/v1/completions",
        &json!({"model": "tiny-gemma", "prompt": "hello world", "max_tokens": 5, "temperature": 0}),
    );
    let whole = v["choices"][0]["text"].as_str().unwrap().to_string();
    let events = sse(
        &n,
        "/v1/completions",
        &json!({"model": "default", "prompt": "hello world", "max_tokens": 5, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
    );
    let chunks = chunks(&events);
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, whole);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );
}

fn chat_body() -> Value {
    json!({"model": "tiny-gemma", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0, "logprobs": true, "top_logprobs": 2})
}

#[test]
fn a_chat_completion_is_shaped_as_openai_shapes_it_with_its_logprobs() {
    let n = start("");
    let (st, v) = post(&n, "/v1/chat/completions", &chat_body());
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
}

#[test]
fn a_streamed_chat_opens_with_the_role_and_gives_the_whole_content() {
    let n = start("");
    let (_, v) = post(&n, "/v1/chat/completions", &chat_body());
    let mut body = chat_body();
    body["stream"] = json!(true);
    let chunks = chunks(&sse(&n, "/v1/chat/completions", &body));
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        content,
        v["choices"][0]["message"]["content"].as_str().unwrap()
    );
}

#[test]
fn a_clients_data_plane_headers_are_ignored() {
    // a client asking for the data plane's token ids gets plain chunks
    let n = start("");
    let r = client()
        .post(format!("{}/v1/completions", n.base))
        .header("x-weft-token-ids", "1")
        .header("x-weft-hops", "1")
        .json(&json!({"model": "tiny-gemma", "prompt": "hello", "max_tokens": 4, "stream": true}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().unwrap();
    assert!(
        text.contains("data: ") && !text.contains("weft_tokens"),
        "{text}"
    );
}

#[test]
fn a_seed_repeats_its_sampled_text() {
    let n = start("");
    let seeded = json!({"model": "tiny-gemma", "prompt": "the", "max_tokens": 8, "temperature": 1.5, "seed": 11});
    assert_eq!(
        post(&n, "/v1/completions", &seeded).1["choices"],
        post(&n, "/v1/completions", &seeded).1["choices"]
    );
}

#[test]
fn metrics_count_requests_latencies_and_load() {
    let n = start("");
    let (st, _) = post(
        &n,
        "/v1/completions",
        &json!({"model": "tiny-gemma", "prompt": "hello world", "max_tokens": 5, "temperature": 0, "stream": true}),
    );
    assert_eq!(st, 200);
    let metrics = metrics(&n);
    for name in [
        "weft_requests_total{criticality=\"standard\",model=\"tiny-gemma\",status=\"200\"}",
        "weft_time_to_first_token_seconds_bucket",
        "weft_inter_token_seconds_count",
        "weft_generated_tokens_total",
        "weft_queue_depth",
        "weft_kv_blocks_capacity",
        "weft_worker_restarts_total 0",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}:\n{metrics}");
    }
}

/// A model name built to break the text format: quotes, a newline, a
/// fake sample.
const HOSTILE_MODEL: &str = "x\"} 1\nweft_ready 0\n# TYPE y counter\n\\";

/// /metrics after requests naming [`HOSTILE_MODEL`] and 300 other models.
fn metrics_after_hostile_names() -> String {
    let n = start("");
    let (st, _) = post(
        &n,
        "/v1/completions",
        &json!({"model": HOSTILE_MODEL, "prompt": "x"}),
    );
    assert_eq!(st, 404);
    for i in 0..300 {
        post(
            &n,
            "/v1/completions",
            &json!({"model": format!("m{i}"), "prompt": "x"}),
        );
    }
    metrics(&n)
}

#[test]
fn a_hostile_model_name_is_never_a_metric_label() {
    let m = metrics_after_hostile_names();
    assert!(
        m.contains(
            "weft_requests_total{criticality=\"standard\",model=\"other\",status=\"404\"} 301"
        ),
        "{m}"
    );
    assert!(!m.contains("m299") && !m.contains("# TYPE y"), "{m}");
}

#[test]
fn metrics_after_hostile_model_names_pass_promtool() {
    let m = metrics_after_hostile_names();
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/install_test_deps.sh installs it)");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(m.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{m}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const SMALL_LIMITS: &str =
    "max_context = 64\nmax_body_bytes = 4096\nmax_tokens_limit = 100\ndefault_max_tokens = 16\n";

/// Posts raw bytes as a JSON completion request.
fn raw(n: &Node, body: Vec<u8>) -> (u16, Value) {
    let r = client()
        .post(format!("{}/v1/completions", n.base))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .unwrap();
    (
        r.status().as_u16(),
        r.json::<Value>().unwrap_or(Value::Null),
    )
}

#[test]
fn a_body_that_is_not_json_is_a_400() {
    let n = start(SMALL_LIMITS);
    let (st, v) = raw(&n, b"{not json".to_vec());
    assert_error(st, &v, 400);
}

#[test]
fn a_body_that_is_not_utf8_is_a_400() {
    let n = start(SMALL_LIMITS);
    let (st, v) = raw(
        &n,
        b"{\"model\": \"tiny-gemma\", \"prompt\": \"\xff\xfe\"}".to_vec(),
    );
    assert_error(st, &v, 400);
}

#[test]
fn a_body_over_the_limit_is_a_413() {
    let n = start(SMALL_LIMITS);
    let (st, v) = raw(&n, vec![b' '; 5000]);
    assert_error(st, &v, 413);
}

#[test]
fn an_invalid_field_is_a_400_with_openais_error() {
    let n = start(SMALL_LIMITS);
    let cases = [
        json!({"prompt": "x"}),                                     // missing model
        json!({"model": "tiny-gemma", "prompt": 42}),               // wrong type
        json!({"model": "tiny-gemma", "prompt": "a ".repeat(200)}), // over the context
        json!({"model": "tiny-gemma", "prompt": "x", "max_tokens": 101}), // over max_tokens
        json!({"model": "tiny-gemma", "prompt": "x", "n": 2}),
        json!({"model": "tiny-gemma", "prompt": "x", "weft": {"criticality": "urgent"}}),
        json!({"model": "tiny-gemma", "prompt": "x", "temperature": -1}),
    ];
    for body in cases {
        let (st, v) = post(&n, "/v1/completions", &body);
        assert_error(st, &v, 400);
    }
}

#[test]
fn an_unknown_model_is_a_404() {
    let n = start(SMALL_LIMITS);
    let (st, v) = post(
        &n,
        "/v1/completions",
        &json!({"model": "gpt-9", "prompt": "x"}),
    );
    assert_error(st, &v, 404);
}

#[test]
fn a_chat_without_messages_is_a_400() {
    let n = start(SMALL_LIMITS);
    let (st, v) = post(
        &n,
        "/v1/chat/completions",
        &json!({"model": "tiny-gemma", "messages": []}),
    );
    assert_error(st, &v, 400);
}

#[test]
fn an_unknown_criticality_header_is_a_400() {
    let n = start(SMALL_LIMITS);
    let r = client()
        .post(format!("{}/v1/completions", n.base))
        .header("x-weft-criticality", "whenever")
        .json(&json!({"model": "tiny-gemma", "prompt": "x"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[test]
fn an_unknown_endpoint_is_a_404() {
    let n = start(SMALL_LIMITS);
    let (st, v) = post(&n, "/v1/nothing", &json!({}));
    assert_error(st, &v, 404);
}

#[test]
fn the_node_keeps_serving_after_bad_input() {
    let n = start(SMALL_LIMITS);
    raw(&n, b"{not json".to_vec());
    raw(&n, vec![b' '; 5000]);
    post(
        &n,
        "/v1/completions",
        &json!({"model": "tiny-gemma", "prompt": 42}),
    );
    let (st, _) = post(
        &n,
        "/v1/completions",
        &json!({"model": "tiny-gemma", "prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(st, 200);
}

const KEYS: &str = "[api_keys]\n\"sk-alpha-0001\" = \"alpha\"\n\"sk-beta-00002\" = \"beta\"\n[tenants.beta]\ntokens_per_minute = 30\nkv_share = 0.5\n";

/// A short completion with `key` (none: no Authorization header).
fn with_key(n: &Node, key: Option<&str>) -> reqwest::blocking::Response {
    let r = client()
        .post(format!("{}/v1/completions", n.base))
        .json(&json!({"model": "tiny-gemma", "prompt": "hello", "max_tokens": 3}));
    match key {
        Some(k) => r.bearer_auth(k),
        None => r,
    }
    .send()
    .unwrap()
}

/// Uses up beta's tokens per minute; the attempt that was refused.
fn exhaust_beta(n: &Node) -> Option<(usize, bool)> {
    for i in 0..10 {
        let r = with_key(n, Some("sk-beta-00002"));
        if r.status() == 429 {
            return Some((i, r.headers().contains_key("retry-after")));
        }
        assert_eq!(r.status(), 200);
    }
    None
}

#[test]
fn a_request_without_an_api_key_is_a_401() {
    let n = start(KEYS);
    assert_eq!(with_key(&n, None).status(), 401);
}

#[test]
fn a_wrong_api_key_is_a_401_invalid_api_key() {
    let n = start(KEYS);
    let r = with_key(&n, Some("sk-wrong-0000"));
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().unwrap()["error"]["code"],
        "invalid_api_key"
    );
}

#[test]
fn a_valid_api_key_is_served() {
    let n = start(KEYS);
    assert_eq!(with_key(&n, Some("sk-alpha-0001")).status(), 200);
}

#[test]
fn a_tenant_over_its_tokens_per_minute_gets_429_with_retry_after() {
    // beta has 30 tokens a minute: a few requests use them up
    let n = start(KEYS);
    let refused = exhaust_beta(&n);
    assert!(
        refused.is_some_and(|(i, retry_after)| i >= 1 && retry_after),
        "beta was never limited, or without Retry-After: {refused:?}"
    );
}

/// The value of the sample `series` (name and labels as written) in `m`.
fn sample(m: &str, series: &str) -> Option<f64> {
    m.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn a_tenant_over_its_limit_is_counted_as_a_refusal_for_that_reason() {
    let n = start(KEYS);
    let before = sample(
        &metrics(&n),
        r#"weft_route_refusals_total{criticality="standard",reason="tenant_limit"}"#,
    );
    assert_eq!(before, Some(0.0), "the series is not there from the start");
    assert!(exhaust_beta(&n).is_some());
    let m = metrics(&n);
    assert_eq!(
        sample(
            &m,
            r#"weft_route_refusals_total{criticality="standard",reason="tenant_limit"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"weft_route_refusals_total{criticality="standard",reason="overloaded"}"#
        ),
        Some(0.0)
    );
}

#[test]
fn a_served_request_is_counted_as_routed_here() {
    let n = start("");
    let (st, _) = post(
        &n,
        "/v1/completions",
        &json!({"model": "tiny-gemma", "prompt": "x", "max_tokens": 2, "weft": {"criticality": "critical"}}),
    );
    assert_eq!(st, 200);
    let m = metrics(&n);
    assert_eq!(
        sample(
            &m,
            r#"weft_route_decisions_total{criticality="critical",target="local"}"#
        ),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn one_tenants_limit_leaves_another_tenant_served() {
    let n = start(KEYS);
    assert!(exhaust_beta(&n).is_some());
    assert_eq!(with_key(&n, Some("sk-alpha-0001")).status(), 200);
}

#[test]
fn concurrent_limit_per_tenant() {
    let n = start("max_running = 1\n[api_keys]\n\"sk-alpha-0001\" = \"alpha\"\n[tenants.alpha]\nmax_concurrent = 1\n");
    let base = n.base.clone();
    let long = std::thread::spawn(move || {
        client()
            .post(format!("{base}/v1/completions"))
            .bearer_auth("sk-alpha-0001")
            .json(&json!({"model": "tiny-gemma", "prompt": "hello", "max_tokens": 4000}))
            .send()
            .unwrap()
            .status()
    });
    // wait until the long request is in flight
    wait_metrics(&n, |m| m.contains("weft_inflight_requests 1"));
    let r = client()
        .post(format!("{}/v1/completions", n.base))
        .bearer_auth("sk-alpha-0001")
        .json(&json!({"model": "tiny-gemma", "prompt": "x", "max_tokens": 1}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(long.join().unwrap(), 200);
}

/// One long request in the single running slot, two standard ones and a
/// critical one waiting behind it, and then a sheddable one at the
/// shedding mark (half of `max_queue`): the sheddable one's status and
/// whether it had Retry-After, and the order the others finished in.
fn overload() -> ((u16, bool), Vec<&'static str>) {
    let n = start("max_running = 1\nmax_queue = 4\n");
    let base = n.base.clone();
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    let send = |tag: &'static str,
                crit: &'static str,
                max: u32,
                order: std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>| {
        let base = base.clone();
        std::thread::spawn(move || {
            let r = client()
                .post(format!("{base}/v1/completions"))
                .json(&json!({"model": "tiny-gemma", "prompt": "hello", "max_tokens": max, "weft": {"criticality": crit}}))
                .send()
                .unwrap();
            let st = r.status().as_u16();
            if st == 200 {
                order.lock().unwrap().push(tag);
            }
            (tag, st)
        })
    };
    // (the tiny model's context ends it after about 1,000 tokens)
    handles.push(send("first", "standard", 4000, order.clone()));
    wait_metrics(&n, |m| m.contains("weft_inflight_requests 1"));
    handles.push(send("standard", "standard", 5, order.clone()));
    handles.push(send("standard2", "standard", 5, order.clone()));
    wait_metrics(&n, |m| m.contains("weft_inflight_requests 3"));
    handles.push(send("critical", "critical", 5, order.clone()));
    wait_metrics(&n, |m| {
        m.contains("weft_inflight_requests 4") && m.contains("weft_queue_depth 3")
    });
    let r = client()
        .post(format!("{}/v1/completions", n.base))
        .header("x-weft-criticality", "sheddable")
        .json(&json!({"model": "tiny-gemma", "prompt": "hello", "max_tokens": 2}))
        .send()
        .unwrap();
    let shed = (r.status().as_u16(), r.headers().contains_key("retry-after"));
    for h in handles {
        let (tag, st) = h.join().unwrap();
        assert_eq!(st, 200, "{tag}");
    }
    let order = order.lock().unwrap().clone();
    (shed, order)
}

#[test]
fn critical_requests_are_admitted_before_waiting_standard_ones() {
    let (_, order) = overload();
    let pos = |t| order.iter().position(|x| *x == t).unwrap();
    assert!(
        pos("critical") < pos("standard") && pos("critical") < pos("standard2"),
        "{order:?}"
    );
}

#[test]
fn a_sheddable_request_is_refused_at_the_shedding_mark_with_retry_after() {
    let ((status, retry_after), _) = overload();
    assert_eq!(status, 429);
    assert!(retry_after);
}

#[test]
fn a_request_past_its_deadline_is_cancelled_with_a_504() {
    let n = start("");
    let (st, v) = post(
        &n,
        "/v1/completions",
        &json!({"model": "tiny-gemma", "prompt": "hello", "max_tokens": 4000, "weft": {"deadline_ms": 50}}),
    );
    assert_error(st, &v, 504);
    assert_eq!(v["error"]["code"], "deadline_exceeded");
}

#[test]
fn a_request_cancelled_at_its_deadline_is_counted_as_a_deadline_miss() {
    let n = start("");
    let (st, _) = post(
        &n,
        "/v1/completions",
        &json!({"model": "tiny-gemma", "prompt": "hello", "max_tokens": 4000, "weft": {"deadline_ms": 50, "criticality": "critical"}}),
    );
    assert_eq!(st, 504);
    let m = metrics(&n);
    assert_eq!(
        sample(&m, r#"weft_deadline_misses_total{criticality="critical"}"#),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, r#"weft_deadline_misses_total{criticality="standard"}"#),
        Some(0.0)
    );
}

#[test]
fn a_stream_past_its_deadline_ends_with_a_deadline_error_event() {
    let n = start("");
    let events = sse(
        &n,
        "/v1/completions",
        &json!({"model": "tiny-gemma", "prompt": "hello", "max_tokens": 4000, "stream": true, "weft": {"deadline_ms": 50}}),
    );
    assert_eq!(events.last().unwrap(), "[DONE]");
    let err: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(err["error"]["code"], "deadline_exceeded");
}

/// `/readyz`'s report of the worker's confinement.
fn confinement(n: &Node) -> Value {
    let v: Value = get(n, "/readyz").json().unwrap();
    v["worker"]["confinement"].clone()
}

fn layers(c: &Value) -> Vec<String> {
    c["layers"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .filter_map(|l| l.as_str().map(String::from))
        .collect()
}

#[test]
fn the_engine_runs_as_pid_1_of_its_own_namespace() {
    let n = start("");
    let c = confinement(&n);
    assert_eq!(c["pid"], 1, "{c}");
}

#[test]
fn a_worker_runs_as_a_dedicated_uid_the_host_sees() {
    let n = start("sandbox_uid_base = 300000\nsandbox_uids = 1000\n");
    let c = confinement(&n);
    let (uid, gid) = (c["uid"].as_u64().unwrap(), c["gid"].as_u64().unwrap());
    assert!((300_000..301_000).contains(&uid), "{c}");
    assert!((300_000..301_000).contains(&gid), "{c}");
}

#[test]
fn readyz_reports_every_layer_of_tier_process() {
    let n = start("");
    let c = confinement(&n);
    assert_eq!(c["tier"], "process");
    let have = layers(&c);
    for l in [
        "user_namespace",
        "dedicated_uid",
        "new_root",
        "pid_namespace",
        "network_namespace",
        "no_new_privs",
        "no_capabilities",
        "seccomp",
        "landlock",
        "cgroup",
    ] {
        assert!(have.iter().any(|h| h == l), "{l} missing from {c}");
    }
    assert_eq!(c["no_new_privs"], true);
    assert!(
        c["cgroup"].as_str().is_some_and(|g| g.contains("memory")),
        "{c}"
    );
}

#[test]
fn a_worker_cannot_reach_the_nodes_api() {
    let n = start("");
    let v: Value = get(&n, "/readyz").json().unwrap();
    assert_eq!(v["worker"]["reached_node"], false, "{v}");
}

#[test]
fn a_worker_below_a_strict_sandbox_is_refused_naming_what_it_lacks() {
    // a filter that only logs is not the seccomp layer
    let n = launch("sandbox_seccomp = \"log\"\n[sandboxes]\nenabled = false\n");
    let deadline = Instant::now() + START_DEADLINE;
    let v = loop {
        let r = get(&n, "/readyz");
        assert_ne!(r.status(), 200, "a worker below policy became ready");
        let v: Value = r.json().unwrap();
        if v["why"].as_str().is_some_and(|w| w.contains("lacks")) {
            break v;
        }
        assert!(Instant::now() < deadline, "never refused: {v}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let why = v["why"].as_str().unwrap();
    assert!(
        why.contains("the seccomp filter") && why.contains("relaxed"),
        "{why}"
    );
}

#[test]
fn a_relaxed_sandbox_runs_and_says_what_it_lacks_in_readyz() {
    let n = start("sandbox = \"relaxed\"\nsandbox_seccomp = \"log\"\n");
    let c = confinement(&n);
    assert_eq!(c["relaxed"], true, "{c}");
    assert_eq!(c["missing"], json!(["seccomp"]), "{c}");
}

#[test]
fn a_relaxed_sandbox_says_what_it_lacks_in_metrics() {
    let n = start("sandbox = \"relaxed\"\nsandbox_seccomp = \"log\"\n");
    let m = metrics(&n);
    assert!(m.contains("weft_sandbox_relaxed 1"), "{m}");
    assert!(
        m.contains("weft_sandbox_missing_layer{layer=\"seccomp\",model=\"tiny-gemma\"} 1"),
        "{m}"
    );
}

#[test]
fn a_strict_sandbox_reports_no_missing_layer_in_metrics() {
    let n = start("");
    let m = metrics(&n);
    assert!(m.contains("weft_sandbox_relaxed 0"), "{m}");
    assert!(
        m.contains("weft_sandbox_info{model=\"tiny-gemma\",relaxed=\"false\",tier=\"process\"} 1"),
        "{m}"
    );
}

/// Whether process `pid` exists (and is not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
    })
}

/// SIGKILLs `n` and waits until none of `pids` is alive.
fn kill_and_wait_gone(mut n: Node, pids: &[u32]) {
    Command::new("kill")
        .args(["-9", &n.child.id().to_string()])
        .status()
        .unwrap();
    let _ = n.child.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "left behind: {:?}",
            pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The worker's process (the PID namespace's first) and the engine under it.
fn worker_pids(n: &Node) -> Vec<u32> {
    let v: Value = get(n, "/readyz").json().unwrap();
    let pid = v["worker"]["pid"].as_u64().unwrap() as u32;
    let mut out = vec![pid];
    out.extend(children(pid));
    out
}

/// Every descendant of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let ppid = std::fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.to_string()))
            .and_then(|r| {
                r.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u32>().ok())
            });
        if ppid == Some(pid) {
            out.push(p);
            out.extend(children(p));
        }
    }
    out
}

#[test]
fn sigkill_of_the_node_leaves_no_worker_behind() {
    let n = start("");
    let pids = worker_pids(&n);
    assert!(pids.len() >= 2, "the worker and its engine: {pids:?}");
    kill_and_wait_gone(n, &pids);
}

#[test]
fn weft_up_serves_under_gvisor() {
    let n = start("sandbox = \"gvisor\"\n");
    let c = confinement(&n);
    assert_eq!(c["tier"], "gvisor", "{c}");
    assert!(layers(&c).iter().any(|l| l == "gvisor"), "{c}");
    let (st, v) = post(
        &n,
        "/v1/completions",
        &json!({"model": "tiny-gemma", "prompt": "hello", "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(st, 200, "{v}");
}

#[test]
fn sigkill_of_a_gvisor_node_leaves_no_sandbox_behind() {
    let n = start("sandbox = \"gvisor\"\n");
    let pids = worker_pids(&n);
    assert!(!pids.is_empty());
    kill_and_wait_gone(n, &pids);
}

/// Kills (SIGKILL) the worker of `n` under a long stream; what the stream's
/// client read.
fn kill_the_worker_under_a_stream(n: &Node) -> String {
    let base = n.base.clone();
    let stream = std::thread::spawn(move || {
        let r = client()
            .post(format!("{base}/v1/completions"))
            .json(&json!({"model": "tiny-gemma", "prompt": "hello", "max_tokens": 3000, "stream": true}))
            .send()
            .unwrap();
        r.text().unwrap()
    });
    wait_metrics(n, |m| m.contains("weft_inflight_requests 1"));
    let v: Value = get(n, "/readyz").json().unwrap();
    let pid = v["worker"]["pid"].as_u64().unwrap();
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    stream.join().unwrap()
}

#[test]
fn a_killed_worker_ends_its_streams_with_worker_lost() {
    let n = start("");
    let text = kill_the_worker_under_a_stream(&n);
    assert!(text.contains("worker_lost"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
}

#[test]
fn a_killed_worker_is_restarted_and_serves_again() {
    let n = start("");
    kill_the_worker_under_a_stream(&n);
    wait_ready(&n, true);
    let (st, _) = post(
        &n,
        "/v1/completions",
        &json!({"model": "tiny-gemma", "prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(st, 200);
    let m = metrics(&n);
    assert!(m.contains("weft_worker_restarts_total 1"), "{m}");
}

#[test]
fn thirty_two_concurrent_streams_each_get_their_own_text() {
    let n = start("");
    let prompts: Vec<String> = (0..32).map(|i| format!("the {i} world")).collect();
    let expected: Vec<String> = prompts
        .iter()
        .map(|p| {
            post(
                &n,
                "/v1/completions",
                &json!({"model": "tiny-gemma", "prompt": p, "max_tokens": 12, "temperature": 0}),
            )
            .1["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let handles: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|p| {
            let base = n.base.clone();
            std::thread::spawn(move || {
                let r = client()
                    .post(format!("{base}/v1/completions"))
                    .json(&json!({"model": "tiny-gemma", "prompt": p, "max_tokens": 12, "temperature": 0, "stream": true}))
                    .send()
                    .unwrap();
                let text = r.text().unwrap();
                let mut out = String::new();
                for e in text.split("\n\n").filter(|e| !e.is_empty()) {
                    let d = e.strip_prefix("data: ").unwrap();
                    if d != "[DONE]" {
                        let v: Value = serde_json::from_str(d).unwrap();
                        out.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
                    }
                }
                out
            })
        })
        .collect();
    for (h, want) in handles.into_iter().zip(expected) {
        assert_eq!(h.join().unwrap(), want);
    }
}

/// Sends SIGTERM to `n` under a long stream; what the stream's client read.
fn sigterm_under_a_stream(n: &Node) -> String {
    let base = n.base.clone();
    let stream = std::thread::spawn(move || {
        client()
            .post(format!("{base}/v1/completions"))
            .json(&json!({"model": "tiny-gemma", "prompt": "hello", "max_tokens": 4000, "stream": true}))
            .send()
            .unwrap()
            .text()
            .unwrap()
    });
    wait_metrics(n, |m| m.contains("weft_inflight_requests 1"));
    Command::new("kill")
        .args(["-TERM", &n.child.id().to_string()])
        .status()
        .unwrap();
    stream.join().unwrap()
}

#[test]
fn sigterm_lets_in_flight_streams_finish() {
    let n = start("");
    let text = sigterm_under_a_stream(&n);
    assert!(
        text.contains("\"finish_reason\":\"length\""),
        "the stream finished normally: {text}"
    );
    assert!(text.trim_end().ends_with("data: [DONE]"));
}

#[test]
fn sigterm_exits_zero_and_stops_accepting() {
    let mut n = start("");
    sigterm_under_a_stream(&n);
    let status = n.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        client().get(format!("{}/healthz", n.base)).send().is_err(),
        "no longer accepting"
    );
}

#[test]
fn a_client_stuck_in_its_headers_is_disconnected() {
    use std::io::{Read, Write};
    let n = start("read_timeout_s = 1\nmax_connections = 2\n");
    let addr = n.base.trim_start_matches("http://").to_string();
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 256];
    let closed = match slow.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => {
            String::from_utf8_lossy(&buf).contains("408")
                || slow.read(&mut buf).map_or(true, |n| n == 0)
        }
        Err(e) => {
            e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut
        }
    };
    assert!(closed, "a client stuck in its headers was not disconnected");
}

#[test]
fn connections_over_the_cap_wait_until_one_closes() {
    let n = start("read_timeout_s = 1\nmax_connections = 2\n");
    let addr = n.base.trim_start_matches("http://").to_string();
    // two connections accepted but idle hold both slots
    let a = std::net::TcpStream::connect(&addr).unwrap();
    let b = std::net::TcpStream::connect(&addr).unwrap();
    let quick = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(700))
        .build()
        .unwrap();
    let deadline = Instant::now() + START_DEADLINE;
    let mut refused = false;
    while Instant::now() < deadline {
        if quick.get(format!("{}/healthz", n.base)).send().is_err() {
            refused = true;
            break;
        }
    }
    assert!(refused, "a third connection was served while two were open");
    drop(a);
    drop(b);
    assert_eq!(get(&n, "/healthz").status(), 200);
}

#[test]
fn a_client_that_disconnects_cancels_its_sequence() {
    let n = start("");
    let base = n.base.clone();
    let quick = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    // the client gives up long before 3000 tokens
    let r = quick
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": "tiny-gemma", "prompt": "hello", "max_tokens": 3000}))
        .send();
    assert!(r.is_err());
    // the abandoned request stops running and gives its KV blocks back
    wait_metrics(&n, |m| {
        m.contains("weft_inflight_requests 0") && m.contains("weft_kv_blocks_used 0")
    });
}

/// `weft up` embeds a coordinator of one: `weft status` reads the node as
/// it reads a cluster (the node as the member, its model, the placement
/// epoch that puts the model on it).
fn status_of(node: &Node, json: bool) -> std::process::Output {
    let config = node
        .said
        .lock()
        .unwrap()
        .iter()
        .find_map(|l| {
            l.strip_prefix("cluster state: weft status --config ")
                .map(str::to_string)
        })
        .expect("weft up names its cluster state");
    let mut args = vec!["status", "--config", &config];
    if json {
        args.push("--json");
    }
    Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(&args)
        .output()
        .unwrap()
}

#[test]
fn weft_up_keeps_its_state_in_a_coordinator_of_one() {
    let node = start("");
    let out = status_of(&node, true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["leader"], 1);
    assert_eq!(s["voters"], json!([1]));
    let members = s["state"]["members"].as_object().unwrap();
    assert_eq!(members.len(), 1);
    let me = members.values().next().unwrap();
    assert_eq!(me["name"], "local");
    assert_eq!(
        me["address"].as_str().unwrap(),
        node.base.trim_start_matches("http://")
    );
    assert!(
        s["state"]["models"]["tiny-gemma"]["sha256"]
            .as_str()
            .unwrap()
            .len()
            == 64
    );
}

#[test]
fn weft_status_shows_weft_up_holding_its_model() {
    let node = start("");
    let out = status_of(&node, false);
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with("local"))
        .unwrap_or_default();
    assert!(row.contains("tiny-gemma[0.."), "{table}");
}

/// `weft up` logging to `dir` in files of 1,000 bytes, after 6 critical
/// requests and a clean stop.
fn six_logged_requests(dir: &Path) {
    let mut node = start(&format!(
        "intent_log = \"{}\"\nintent_log_file_bytes = 1000\n",
        dir.display()
    ));
    for i in 0..6 {
        let (st, _) = post(
            &node,
            "/v1/completions",
            &json!({"model": "tiny-gemma", "prompt": format!("hello {i}"), "max_tokens": 2, "weft": {"criticality": "critical"}}),
        );
        assert_eq!(st, 200);
    }
    // a clean stop forces the log to disk
    Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status()
        .unwrap();
    assert!(node.child.wait().unwrap().success());
}

fn verify(path: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["audit", "verify"])
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn the_intent_log_records_each_admission_with_its_intent() {
    let logs = tempfile::tempdir().unwrap();
    let dir = logs.path().join("intent");
    six_logged_requests(&dir);
    let text: String = weft_audit::files(&dir)
        .unwrap()
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    let line: Value = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|l| l["record"]["decision"] == "admitted")
        .expect("an admission is logged");
    assert_eq!(line["record"]["intent"]["criticality"], "critical");
    assert!(line["record"]["request_id"]
        .as_str()
        .unwrap()
        .starts_with("cmpl-"));
}

#[test]
fn the_intent_log_rotates_into_one_chain_that_verifies() {
    let logs = tempfile::tempdir().unwrap();
    let dir = logs.path().join("intent");
    six_logged_requests(&dir);
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(files.len() > 1, "no rotation at 1000 bytes");
    let out = verify(&dir);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let admitted = std::fs::read_dir(&dir)
        .unwrap()
        .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
        .collect::<String>()
        .matches("\"decision\":\"admitted\"")
        .count();
    assert_eq!(admitted, 6);
    assert!(said.contains("chain intact"), "{said}");
}

#[test]
fn weft_audit_verify_names_the_line_after_an_edit() {
    let logs = tempfile::tempdir().unwrap();
    let dir = logs.path().join("intent");
    six_logged_requests(&dir);
    // the first file holding an admission
    let edited = weft_audit::files(&dir)
        .unwrap()
        .into_iter()
        .find(|f| std::fs::read_to_string(f).unwrap().contains("\"critical\""))
        .unwrap();
    let t = std::fs::read_to_string(&edited).unwrap();
    std::fs::write(&edited, t.replacen("\"critical\"", "\"sheddable\"", 1)).unwrap();
    let out = verify(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("first bad sequence number"), "{err}");
    assert!(err.contains("edited"), "{err}");
}

#[test]
fn weft_generate_on_cuda_runs_there_or_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args([
            "generate",
            "--device",
            "cuda",
            "--max-tokens",
            "3",
            "--model",
        ])
        .arg(&model)
        .arg("hello")
        .env("WEFT_CACHE_DIR", dir.path().join("cache"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        assert!(err.contains("[running on cuda:0"), "{err}");
    } else {
        assert!(
            err.contains("no CUDA driver") || err.contains("built without CUDA"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// What `weft up` says as it refuses to start with `extra` config lines.
fn refused_to_start(extra: &str) -> String {
    refused_to_start_with(extra, &[])
}

/// [`refused_to_start`] with `env` set for the node.
fn refused_to_start_with(extra: &str, env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let cfg = dir.path().join("node.toml");
    std::fs::write(
        &cfg,
        format!(
            "addr = \"127.0.0.1:0\"\nmodel = \"{}\"\n{extra}",
            model.display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["up", "--config"])
        .arg(&cfg)
        .env("WEFT_CACHE_DIR", dir.path().join("cache"))
        .env_remove("WEFT_DEVICE")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn a_node_told_to_run_cpu_kernels_that_do_not_exist_refuses_to_start_naming_what_it_can_run() {
    let err = refused_to_start_with("", &[("WEFT_CPU_PATH", "avx9000")]);
    assert!(
        err.contains("WEFT_CPU_PATH=avx9000") && err.contains("portable"),
        "{err}"
    );
}

#[test]
fn a_node_asked_for_a_gpu_inside_the_sandbox_refuses_to_start_naming_the_setting() {
    let err = refused_to_start("device = \"cuda\"\n");
    assert!(
        err.contains("device") && err.contains("sandbox = false"),
        "{err}"
    );
}

#[test]
fn a_node_asked_for_a_gpu_it_lacks_says_so_at_start() {
    // no machine here has an eighth GPU: the device is missing everywhere,
    // as the driver, or the CUDA build, may be
    let err = refused_to_start("device = \"cuda:7\"\nsandbox = false\n");
    assert!(
        err.contains("device = \"cuda:7\"")
            && (err.contains("no CUDA driver")
                || err.contains("built without CUDA")
                || err.contains("no CUDA device 7")),
        "{err}"
    );
}

// ------------------------------------------------ the tenants file (AgentPolicy)

/// A node with one key of its own (`sk-alpha-0001`) and a tenants file at
/// the returned path, written with `file` first when it is given.
fn start_with_tenants_file(file: Option<&str>) -> (Node, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tenants.toml");
    if let Some(f) = file {
        std::fs::write(&path, f).unwrap();
    }
    let n = start(&format!(
        "tenants_file = {:?}\n[api_keys]\n\"sk-alpha-0001\" = \"alpha\"\n",
        path.display().to_string()
    ));
    (n, dir, path)
}

/// A short completion with `key` and extra headers.
fn with_key_and(n: &Node, key: &str, headers: &[(&str, &str)]) -> reqwest::blocking::Response {
    let mut r = client()
        .post(format!("{}/v1/completions", n.base))
        .bearer_auth(key)
        .json(&json!({"model": "tiny-gemma", "prompt": "hello", "max_tokens": 2}));
    for (h, v) in headers {
        r = r.header(*h, *v);
    }
    r.send().unwrap()
}

const LINE_KEY: &str = "[api_keys]\n\"sk-line-000001\" = \"line\"\n";

#[test]
fn a_key_written_to_the_tenants_file_is_served_without_a_restart() {
    let (n, _dir, path) = start_with_tenants_file(None);
    assert_eq!(with_key(&n, Some("sk-line-000001")).status(), 401);
    std::fs::write(&path, LINE_KEY).unwrap();
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        let s = with_key(&n, Some("sk-line-000001")).status();
        if s == 200 {
            break;
        }
        assert_eq!(s, 401);
        assert!(Instant::now() < deadline, "the new key was never taken up");
        std::thread::sleep(Duration::from_millis(200));
    }
    // the config's own key still works beside it
    assert_eq!(with_key(&n, Some("sk-alpha-0001")).status(), 200);
}

#[test]
fn a_key_removed_from_the_tenants_file_is_refused_without_a_restart() {
    let (n, _dir, path) = start_with_tenants_file(Some(LINE_KEY));
    assert_eq!(with_key(&n, Some("sk-line-000001")).status(), 200);
    std::fs::write(&path, "[api_keys]\n\"sk-other-00001\" = \"other\"\n").unwrap();
    let deadline = Instant::now() + START_DEADLINE;
    while with_key(&n, Some("sk-line-000001")).status() != 401 {
        assert!(Instant::now() < deadline, "the removed key kept working");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_tenant_may_call_only_the_models_its_policy_names() {
    let (n, _dir, _) = start_with_tenants_file(Some(&format!(
        "{LINE_KEY}[tenants.line]\nmodels = [\"some-other-model\"]\n"
    )));
    let r = with_key_and(&n, "sk-line-000001", &[]);
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().unwrap()["error"]["code"], "not_allowed");
}

#[test]
fn a_tenant_may_send_only_the_criticalities_its_policy_names() {
    let (n, _dir, _) = start_with_tenants_file(Some(&format!(
        "{LINE_KEY}[tenants.line]\ncriticalities = [\"sheddable\"]\n"
    )));
    assert_eq!(
        with_key_and(&n, "sk-line-000001", &[("x-weft-criticality", "critical")]).status(),
        403
    );
    assert_eq!(
        with_key_and(&n, "sk-line-000001", &[("x-weft-criticality", "sheddable")]).status(),
        200
    );
}

#[test]
fn a_tenant_over_its_requests_per_minute_gets_429() {
    let (n, _dir, _) = start_with_tenants_file(Some(&format!(
        "{LINE_KEY}[tenants.line]\nrequests_per_minute = 2\n"
    )));
    assert_eq!(with_key(&n, Some("sk-line-000001")).status(), 200);
    assert_eq!(with_key(&n, Some("sk-line-000001")).status(), 200);
    let r = with_key(&n, Some("sk-line-000001"));
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
}

#[test]
fn a_broken_tenants_file_is_refused_and_the_configs_keys_stay() {
    let (n, _dir, _) = start_with_tenants_file(Some(
        "[api_keys]\n\"sk-line-000001\" = \"line\"\n[tenants.line]\nkv_share = 7.0\n",
    ));
    assert_eq!(with_key(&n, Some("sk-line-000001")).status(), 401);
    assert_eq!(with_key(&n, Some("sk-alpha-0001")).status(), 200);
}

#[test]
fn a_node_whose_keys_come_only_from_a_tenants_file_refuses_requests_until_it_has_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tenants.toml");
    let n = start(&format!(
        "tenants_file = {:?}\n",
        path.display().to_string()
    ));
    // no key anywhere yet: refused, not served as anonymous
    assert_eq!(with_key(&n, None).status(), 401);
    std::fs::write(&path, LINE_KEY).unwrap();
    let deadline = Instant::now() + START_DEADLINE;
    while with_key(&n, Some("sk-line-000001")).status() != 200 {
        assert!(
            Instant::now() < deadline,
            "the file's key was never taken up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(with_key(&n, None).status(), 401);
}

/// An agent's context of about 100 tokens, and the same context with a
/// tool output appended: its next turn.
fn turns() -> (String, String) {
    let context = "You are a careful planning agent for a factory line. ".repeat(8);
    let next = format!("{context}Tool output: conveyor 3 stopped at 14:02, sensor B reads 71 C.");
    (context, next)
}

/// A completion of `prompt` with `key`: its usage.
fn usage_of(n: &Node, key: Option<&str>, prompt: &str) -> Value {
    let mut r = client()
        .post(format!("{}/v1/completions", n.base))
        .json(&json!({"model": "tiny-gemma", "prompt": prompt, "max_tokens": 4, "temperature": 0}));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let r = r.send().unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().unwrap()["usage"].clone()
}

#[test]
fn a_later_turn_reports_the_prompt_tokens_it_found_cached() {
    let n = start("");
    let (context, next) = turns();
    let first = usage_of(&n, None, &context);
    assert_eq!(
        first["prompt_tokens_details"]["cached_tokens"], 0,
        "{first}"
    );
    let second = usage_of(&n, None, &next);
    let cached = second["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= 64, "{second}");
    assert!(cached < second["prompt_tokens"].as_u64().unwrap());
    // the worker's figures come after its last step's events
    wait_metrics(&n, |m| {
        sample(
            m,
            r#"weft_prompt_tokens_total{model="tiny-gemma",source="cached"}"#,
        ) == Some(cached as f64)
    });
}

#[test]
fn with_the_cache_off_nothing_is_reported_cached() {
    let n = start("prefix_cache = false\n");
    let (context, next) = turns();
    usage_of(&n, None, &context);
    let second = usage_of(&n, None, &next);
    assert_eq!(
        second["prompt_tokens_details"]["cached_tokens"], 0,
        "{second}"
    );
}

const TWO_TENANTS: &str =
    "[api_keys]\n\"sk-alpha-0001\" = \"alpha\"\n\"sk-beta-00002\" = \"beta\"\n";

#[test]
fn another_tenant_finds_nothing_of_a_private_prefix_cached() {
    let n = start(TWO_TENANTS);
    let (context, next) = turns();
    usage_of(&n, Some("sk-alpha-0001"), &context);
    let beta = usage_of(&n, Some("sk-beta-00002"), &next);
    assert_eq!(beta["prompt_tokens_details"]["cached_tokens"], 0, "{beta}");
}

#[test]
fn another_tenant_finds_a_shared_prefix_cached() {
    let (context, next) = turns();
    let n = start(&format!("shared_prefixes = [{context:?}]\n{TWO_TENANTS}"));
    usage_of(&n, Some("sk-alpha-0001"), &context);
    let beta = usage_of(&n, Some("sk-beta-00002"), &next);
    assert!(
        beta["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            >= 64,
        "{beta}"
    );
}
