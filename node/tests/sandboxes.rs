//! Agent sandboxes through `/v1/sandboxes` of a running `weft up`, as an
//! agent (and an attacker) meets them: the escape suite exec'd inside
//! sandboxes at both tiers, tenants kept apart, paths kept in, limits that
//! end what breaks them, expiry, warm pools, and a node that keeps serving
//! models meanwhile. One node serves every test of this file (pools of
//! both tiers); tests that kill a node start their own.
//!
//! Needs root (sandboxes run as uids of their own) and `runsc` (tier
//! gvisor), as CI has (`scripts/install_test_deps.sh`).

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{client, launch, wait_ready, Node};

const ALPHA: &str = "sk-alpha-000000000000";
const BETA: &str = "sk-beta-0000000000000";
const SMALL: &str = "sk-small-000000000000";

/// Host files a sandbox must never see, made as a node's would be.
struct Host {
    _dir: tempfile::TempDir,
    node_key: String,
    model: String,
}

fn host() -> &'static Host {
    static H: OnceLock<Host> = OnceLock::new();
    H.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("node.key");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nsecret\n").unwrap();
        let model = dir.path().join("model.gguf");
        std::fs::write(&model, "GGUF").unwrap();
        use std::os::unix::fs::PermissionsExt;
        for p in [&key, &model] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o666)).unwrap();
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Host {
            node_key: key.display().to_string(),
            model: model.display().to_string(),
            _dir: dir,
        }
    })
}

/// The weft binary, bound into the test template so sandboxes can run its
/// escape probe (`weft sandbox-probe`).
fn weft() -> &'static str {
    common::weft_readable_by_all()
}

/// A node's config: keys of three tenants (one with small quotas), a
/// template that also binds the weft binary, and warm pools.
fn config(pool_process: usize, pool_gvisor: usize) -> String {
    format!(
        r#"
intent_log = "{intent}"

[api_keys]
"{ALPHA}" = "alpha"
"{BETA}" = "beta"
"{SMALL}" = "small"

[tenants.small]
max_sandboxes = 1
sandbox_memory_mb = 96

[sandboxes]
[sandboxes.templates.default]
binds = ["/usr", "/bin", "/sbin", "/lib", "/lib64", "{weft}"]
defaults = {{ memory_mb = 128, cpus = 1.0, pids = 64, disk_mb = 16, timeout_s = 300 }}
max = {{ memory_mb = 512, cpus = 2.0, pids = 256, disk_mb = 64, timeout_s = 600 }}

[[sandboxes.pools]]
template = "default"
isolation = "process"
size = {pool_process}

[[sandboxes.pools]]
template = "default"
isolation = "gvisor"
size = {pool_gvisor}
"#,
        weft = weft(),
        intent = intent_dir().display(),
    )
}

/// A fresh intent-log directory (kept for the test process's life).
fn intent_dir() -> std::path::PathBuf {
    static DIRS: std::sync::Mutex<Vec<tempfile::TempDir>> = std::sync::Mutex::new(Vec::new());
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("intent");
    DIRS.lock().unwrap().push(d);
    p
}

/// Where node `n` keeps its intent log (from its config file).
fn intent_of(n: &Node) -> std::path::PathBuf {
    let cfg = std::fs::read_to_string(n.dir.path().join("node.toml")).unwrap();
    let line = cfg.lines().find(|l| l.starts_with("intent_log")).unwrap();
    std::path::PathBuf::from(line.split('"').nth(1).unwrap())
}

fn node() -> &'static Node {
    static N: OnceLock<Node> = OnceLock::new();
    N.get_or_init(|| {
        let n = launch(&config(2, 1));
        wait_ready(&n, true);
        n
    })
}

fn api(n: &Node, method: &str, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut r = client()
        .request(m, format!("{}{path}", n.base))
        .bearer_auth(key);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().unwrap();
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A sandbox of `key`'s tenant created with `body`; its id.
fn create(n: &Node, key: &str, body: Value) -> String {
    let (st, v) = api(n, "POST", "/v1/sandboxes", key, Some(body));
    assert_eq!(st, 201, "create: {v}");
    v["id"].as_str().unwrap().to_string()
}

fn exec(n: &Node, key: &str, id: &str, body: Value) -> (u16, Value) {
    api(
        n,
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        key,
        Some(body),
    )
}

/// Runs `sh -c script` in `id`; the whole answer.
fn sh(n: &Node, id: &str, script: &str) -> Value {
    let (st, v) = exec(n, ALPHA, id, json!({"cmd": ["sh", "-c", script]}));
    assert_eq!(st, 200, "exec: {v}");
    v
}

/// The sandbox of each tier the escape attempts run in (one each).
fn escape_box(isolation: &str) -> String {
    static P: OnceLock<String> = OnceLock::new();
    static G: OnceLock<String> = OnceLock::new();
    let cell = if isolation == "process" { &P } else { &G };
    cell.get_or_init(|| create(node(), ALPHA, json!({"isolation": isolation})))
        .clone()
}

/// Runs escape attempt `attempt` at `target` inside a sandbox of tier
/// `isolation`; true when it was denied (an errno, a stop, or the signal
/// the sandbox answers with).
fn denied(isolation: &str, attempt: &str, target: &str) -> (bool, Value) {
    let n = node();
    let id = escape_box(isolation);
    let (st, v) = exec(
        n,
        ALPHA,
        &id,
        json!({"cmd": [weft(), "sandbox-probe", "--attempt", attempt, "--target", target], "timeout_s": 60}),
    );
    assert_eq!(st, 200, "exec of the probe: {v}");
    if v["signal"].is_number() {
        return (true, v);
    }
    let out: Value =
        serde_json::from_str(v["stdout"]["data"].as_str().unwrap_or("")).unwrap_or(Value::Null);
    let no = out.get("Errno").is_some() || out.get("Stopped").is_some();
    (no, v)
}

macro_rules! escape {
    ($name:ident, $attempt:expr, $target:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn is_denied_at_tier_process() {
                let (no, v) = denied("process", $attempt, $target);
                assert!(no, "{} got through at tier process: {v}", $attempt);
            }
            #[test]
            fn is_denied_at_tier_gvisor() {
                let (no, v) = denied("gvisor", $attempt, $target);
                assert!(no, "{} got through at tier gvisor: {v}", $attempt);
            }
        }
    };
}

escape!(write_node_data, "write-node-data", &host().node_key);
escape!(write_model, "write-model", &host().model);
escape!(read_node_keys, "read-cluster-keys", &host().node_key);
escape!(write_etc_passwd, "write-etc-passwd", "");
escape!(read_etc_shadow, "read-etc-shadow", "");
escape!(create_a_file_in_the_root, "create-file", "");
escape!(open_dev_mem, "open-dev-mem", "");
escape!(open_dev_kvm, "open-dev-kvm", "");
escape!(open_a_block_device, "open-block-device", "/dev/vda");
escape!(connect_to_the_node_api, "connect-node-api", &node_api());
escape!(
    connect_an_abstract_unix_socket,
    "abstract-unix-socket",
    "weft-test"
);
escape!(open_a_packet_socket, "packet-socket", "");
escape!(open_a_vsock_socket, "vsock-socket", "");
escape!(open_a_kernel_crypto_socket, "alg-socket", "");
escape!(ptrace_the_init, "ptrace-node", "1");
escape!(read_the_inits_memory, "process-vm-readv-node", "1");
escape!(mount, "mount", "");
escape!(unshare_a_user_namespace, "unshare-user", "");
escape!(unshare_a_mount_namespace, "unshare-mount", "");
escape!(setns, "setns", "");
escape!(chroot, "chroot", "");
escape!(pivot_root, "pivot-root", "");
escape!(bpf, "bpf", "");
escape!(perf_event_open, "perf-event-open", "");
escape!(userfaultfd, "userfaultfd", "");
escape!(io_uring_setup, "io-uring-setup", "");
escape!(keyctl, "keyctl", "");
escape!(init_module, "init-module", "");
escape!(open_by_handle_at, "open-by-handle-at", "");
escape!(an_x32_syscall, "x32-syscall", "");
escape!(tiocsti, "tiocsti", "");

/// The node's API as `HOST:PORT`.
fn node_api() -> String {
    node().base.trim_start_matches("http://").to_string()
}

#[test]
fn a_sandbox_sees_only_its_template_and_scratch_space() {
    let n = node();
    let id = create(n, ALPHA, json!({}));
    let v = sh(
        n,
        &id,
        "ls /; test -e /etc && echo HAS_ETC; test -e /root && echo HAS_ROOT",
    );
    let listing = v["stdout"]["data"].as_str().unwrap();
    assert!(
        !listing.contains("HAS_ETC") && !listing.contains("HAS_ROOT"),
        "{listing}"
    );
    assert!(
        listing.contains("work") && listing.contains("usr"),
        "{listing}"
    );
}

#[test]
fn python_runs_in_a_sandbox() {
    let n = node();
    let id = create(n, ALPHA, json!({}));
    let (st, v) = exec(
        n,
        ALPHA,
        &id,
        json!({"cmd": ["python3", "-c", "print(6*7)"]}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["stdout"]["data"], "42\n", "{v}");
    assert_eq!(v["exit_code"], 0);
}

#[test]
fn a_streamed_exec_sends_start_output_and_end_events() {
    let n = node();
    let id = create(n, ALPHA, json!({}));
    let r = client()
        .post(format!("{}/v1/sandboxes/{id}/exec", n.base))
        .bearer_auth(ALPHA)
        .json(&json!({"cmd": ["sh", "-c", "echo out; echo err >&2; exit 3"], "stream": true}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(events.first(), Some(&"start"), "{text}");
    assert_eq!(events.last(), Some(&"end"), "{text}");
    assert!(
        events.contains(&"stdout") && events.contains(&"stderr"),
        "{text}"
    );
    assert!(text.contains("\"exit_code\":3"), "{text}");
}

#[test]
fn binary_output_comes_as_base64() {
    let n = node();
    let id = create(n, ALPHA, json!({}));
    let v = sh(n, &id, "printf '\\377\\376'");
    assert_eq!(v["stdout"]["encoding"], "base64", "{v}");
    assert_eq!(v["stdout"]["data"], "//4=", "{v}");
}

#[test]
fn stdin_reaches_the_command() {
    let n = node();
    let id = create(n, ALPHA, json!({}));
    let (_, v) = exec(n, ALPHA, &id, json!({"cmd": ["cat"], "stdin": "hello\n"}));
    assert_eq!(v["stdout"]["data"], "hello\n", "{v}");
}

#[test]
fn another_tenants_sandbox_is_not_found() {
    let n = node();
    let id = create(n, ALPHA, json!({}));
    for (m, path, body) in [
        ("GET", format!("/v1/sandboxes/{id}"), None),
        (
            "POST",
            format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"cmd": ["true"]})),
        ),
        ("GET", format!("/v1/sandboxes/{id}/files?path=x"), None),
        ("PUT", format!("/v1/sandboxes/{id}/files?path=x"), None),
        (
            "PATCH",
            format!("/v1/sandboxes/{id}"),
            Some(json!({"timeout_s": 10})),
        ),
        ("DELETE", format!("/v1/sandboxes/{id}"), None),
    ] {
        let (st, v) = api(n, m, &path, BETA, body);
        assert_eq!(st, 404, "{m} {path} by another tenant: {v}");
    }
    let (st, _) = api(n, "GET", &format!("/v1/sandboxes/{id}"), ALPHA, None);
    assert_eq!(st, 200, "the owner lost it");
}

#[test]
fn a_tenant_lists_only_its_own_sandboxes() {
    let n = node();
    let mine = create(n, BETA, json!({}));
    let theirs = create(n, ALPHA, json!({}));
    let (_, v) = api(n, "GET", "/v1/sandboxes", BETA, None);
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&mine.as_str()) && !ids.contains(&theirs.as_str()),
        "{v}"
    );
}

#[test]
fn a_request_without_a_key_is_refused() {
    let n = node();
    let r = client()
        .get(format!("{}/v1/sandboxes", n.base))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
}

#[test]
fn a_file_put_then_read_comes_back() {
    let n = node();
    let id = create(n, ALPHA, json!({}));
    let url = format!("{}/v1/sandboxes/{id}/files?path=dir/a.bin", n.base);
    let data = vec![0u8, 1, 2, 255];
    let r = client()
        .put(&url)
        .bearer_auth(ALPHA)
        .body(data.clone())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let back = client()
        .get(&url)
        .bearer_auth(ALPHA)
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(back.to_vec(), data);
    let v = sh(n, &id, "wc -c < /work/dir/a.bin");
    assert_eq!(v["stdout"]["data"].as_str().unwrap().trim(), "4");
}

#[test]
fn a_file_path_with_dot_dot_is_refused() {
    let n = node();
    let id = create(n, ALPHA, json!({}));
    for path in ["../etc/passwd", "a/../../x", "/work/../usr/bin/sh"] {
        let r = client()
            .get(format!("{}/v1/sandboxes/{id}/files", n.base))
            .query(&[("path", path)])
            .bearer_auth(ALPHA)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{path}");
    }
}

#[test]
fn a_file_request_does_not_follow_a_symlink_out_of_the_scratch_space() {
    let n = node();
    let id = create(n, ALPHA, json!({}));
    sh(
        n,
        &id,
        "ln -s /usr/bin /work/out && ln -s /usr/bin/sh /work/sh",
    );
    for path in ["out/sh", "sh"] {
        let r = client()
            .get(format!("{}/v1/sandboxes/{id}/files", n.base))
            .query(&[("path", path)])
            .bearer_auth(ALPHA)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{path} was followed");
    }
}

#[test]
fn a_file_over_the_disk_limit_is_refused() {
    let n = node();
    let id = create(n, ALPHA, json!({"disk_mb": 2}));
    let r = client()
        .put(format!("{}/v1/sandboxes/{id}/files?path=big", n.base))
        .bearer_auth(ALPHA)
        .body(vec![7u8; 3 << 20])
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
}

#[test]
fn a_command_writing_past_the_disk_limit_fails() {
    let n = node();
    let id = create(n, ALPHA, json!({"disk_mb": 2}));
    let v = sh(
        n,
        &id,
        "dd if=/dev/zero of=/work/big bs=1M count=8 2>&1; echo rc=$?",
    );
    let out = v["stdout"]["data"].as_str().unwrap();
    assert!(
        out.contains("No space left") && !out.contains("rc=0"),
        "{out}"
    );
}

#[test]
fn a_command_over_the_memory_limit_is_killed_and_said_so() {
    let n = node();
    let id = create(n, ALPHA, json!({"memory_mb": 32}));
    let (_, v) = exec(
        n,
        ALPHA,
        &id,
        json!({"cmd": [weft(), "sandbox-probe", "--attempt", "memory-bomb"], "timeout_s": 60}),
    );
    assert_eq!(v["oom_killed"], true, "{v}");
    assert_eq!(v["signal"], 9, "{v}");
}

#[test]
fn a_thread_bomb_stops_at_the_pids_limit() {
    let n = node();
    let id = create(n, ALPHA, json!({"pids": 16}));
    let (_, v) = exec(
        n,
        ALPHA,
        &id,
        json!({"cmd": [weft(), "sandbox-probe", "--attempt", "thread-bomb"], "timeout_s": 60}),
    );
    let out: Value = serde_json::from_str(v["stdout"]["data"].as_str().unwrap()).unwrap();
    let reached = out["Stopped"]["reached"].as_u64().unwrap_or(u64::MAX);
    assert!(reached < 16, "{v}");
}

#[test]
fn a_command_gets_no_more_cpu_than_its_limit() {
    let n = node();
    let id = create(n, ALPHA, json!({"cpus": 0.25}));
    let (_, v) = exec(
        n,
        ALPHA,
        &id,
        json!({"cmd": [weft(), "sandbox-probe", "--attempt", "cpu-spin", "--target", "2000"], "timeout_s": 60}),
    );
    let out = v["stdout"]["data"].as_str().unwrap();
    let cpu_ms: u64 = out
        .split("cpu_ms=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX);
    // two spinning threads for 2 s of wall time at a quarter of a CPU
    assert!(cpu_ms < 1000, "used {cpu_ms} ms of CPU: {out}");
}

#[test]
fn a_command_past_its_timeout_is_killed_and_said_so() {
    let n = node();
    let id = create(n, ALPHA, json!({}));
    let t = Instant::now();
    let (_, v) = exec(
        n,
        ALPHA,
        &id,
        json!({"cmd": ["sleep", "60"], "timeout_s": 1}),
    );
    assert_eq!(v["timed_out"], true, "{v}");
    assert_eq!(v["signal"], 9, "{v}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "after {:?}",
        t.elapsed()
    );
}

#[test]
fn what_a_command_leaves_running_ends_with_it() {
    let n = node();
    let id = create(n, ALPHA, json!({}));
    let t = Instant::now();
    sh(n, &id, "sleep 300 & echo started");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "the exec waited for its child"
    );
    // (the group is killed as the exec ends; its init reaps it after)
    gone_within(n, &id, "sleep 300", Duration::from_secs(10));
}

/// Waits until no process in sandbox `id` runs a command line starting
/// with `cmd` (an ended command's group is killed, then reaped by its
/// init); fails after `within`.
fn gone_within(n: &Node, id: &str, cmd: &str, within: Duration) {
    let script = format!(
        "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c '^{cmd}'"
    );
    eventually(within, || {
        let v = sh(n, id, &script);
        (v["stdout"]["data"].as_str().unwrap().trim() == "0").then_some(())
    });
}

/// Polls `f` until it returns `Some` or `within` passes.
fn eventually<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < within, "not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_expired_sandbox_refuses_calls_saying_expired() {
    let n = node();
    let id = create(n, ALPHA, json!({"timeout_s": 1}));
    let v = eventually(Duration::from_secs(20), || {
        let (st, v) = exec(n, ALPHA, &id, json!({"cmd": ["true"]}));
        (st == 410).then_some(v)
    });
    assert_eq!(v["error"]["code"], "expired", "{v}");
}

#[test]
fn extending_a_sandbox_keeps_it_past_its_first_timeout() {
    let n = node();
    let id = create(n, ALPHA, json!({"timeout_s": 2}));
    let (st, v) = api(
        n,
        "PATCH",
        &format!("/v1/sandboxes/{id}"),
        ALPHA,
        Some(json!({"timeout_s": 120})),
    );
    assert_eq!(st, 200, "{v}");
    std::thread::sleep(Duration::from_secs(3));
    let (st, _) = exec(n, ALPHA, &id, json!({"cmd": ["true"]}));
    assert_eq!(st, 200);
}

#[test]
fn extending_past_the_templates_maximum_is_refused() {
    let n = node();
    let id = create(n, ALPHA, json!({}));
    let (st, _) = api(
        n,
        "PATCH",
        &format!("/v1/sandboxes/{id}"),
        ALPHA,
        Some(json!({"timeout_s": 100000})),
    );
    assert_eq!(st, 400);
}

#[test]
fn deleting_twice_answers_the_same() {
    let n = node();
    let id = create(n, ALPHA, json!({}));
    for _ in 0..2 {
        let (st, v) = api(n, "DELETE", &format!("/v1/sandboxes/{id}"), ALPHA, None);
        assert_eq!(st, 200, "{v}");
    }
    let (st, v) = exec(n, ALPHA, &id, json!({"cmd": ["true"]}));
    assert_eq!((st, v["error"]["code"].clone()), (410, json!("deleted")));
}

#[test]
fn a_network_other_than_disabled_is_refused_saying_why() {
    let n = node();
    let (st, v) = api(
        n,
        "POST",
        "/v1/sandboxes",
        ALPHA,
        Some(json!({"network": {"type": "allow-list"}})),
    );
    assert_eq!(st, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not supported"),
        "{v}"
    );
}

#[test]
fn a_limit_over_the_templates_maximum_is_refused_naming_it() {
    let n = node();
    let (st, v) = api(
        n,
        "POST",
        "/v1/sandboxes",
        ALPHA,
        Some(json!({"memory_mb": 100000})),
    );
    assert_eq!(st, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("memory_mb"),
        "{v}"
    );
}

#[test]
fn over_the_sandbox_quota_is_a_429_that_says_which() {
    let n = node();
    create(n, SMALL, json!({"memory_mb": 32}));
    let (st, v) = api(
        n,
        "POST",
        "/v1/sandboxes",
        SMALL,
        Some(json!({"memory_mb": 32})),
    );
    assert_eq!(st, 429, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_sandboxes"),
        "{v}"
    );
}

#[test]
fn every_create_exec_and_delete_is_in_the_intent_log() {
    let n = node();
    let id = create(n, ALPHA, json!({}));
    sh(n, &id, "echo audited");
    api(n, "DELETE", &format!("/v1/sandboxes/{id}"), ALPHA, None);
    let dir = intent_of(n);
    let events = eventually(Duration::from_secs(10), || {
        let text: String = std::fs::read_dir(&dir)
            .ok()?
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .collect();
        let mine: Vec<String> = text
            .lines()
            .filter(|l| l.contains(&id))
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                v["record"]["event"].as_str().unwrap_or("").to_string()
            })
            .collect();
        (mine.len() >= 3).then_some(mine)
    });
    assert_eq!(events, ["sandbox.create", "sandbox.exec", "sandbox.delete"]);
}

#[test]
fn sandbox_metrics_count_creates_by_launch() {
    let n = node();
    create(n, ALPHA, json!({}));
    let m = client()
        .get(format!("{}/metrics", n.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        m.contains("weft_sandbox_creates_total{isolation=\"process\",launch="),
        "{m}"
    );
    assert!(m.contains("weft_sandbox_pool_ready{"), "{m}");
    assert!(m.contains("weft_sandbox_start_seconds_bucket"), "{m}");
}

/// A node of its own with one warm sandbox of tier process and none of
/// gvisor.
fn pool_of_one() -> Node {
    let n = launch(&config(1, 0));
    wait_ready(&n, true);
    n
}

fn pool_ready(n: &Node) -> u64 {
    let m = client()
        .get(format!("{}/metrics", n.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    m.lines()
        .find(|l| l.starts_with("weft_sandbox_pool_ready{isolation=\"process\""))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or(0)
}

fn launch_of(n: &Node) -> String {
    let (st, v) = api(n, "POST", "/v1/sandboxes", ALPHA, Some(json!({})));
    assert_eq!(st, 201, "{v}");
    v["launch"].as_str().unwrap().to_string()
}

#[test]
fn a_create_takes_a_warm_sandbox_from_the_pool() {
    let n = pool_of_one();
    eventually(Duration::from_secs(30), || {
        (pool_ready(&n) == 1).then_some(())
    });
    assert_eq!(launch_of(&n), "warm");
}

#[test]
fn an_empty_pool_falls_back_to_a_cold_start() {
    let n = pool_of_one();
    eventually(Duration::from_secs(30), || {
        (pool_ready(&n) == 1).then_some(())
    });
    let launches = [launch_of(&n), launch_of(&n)];
    assert!(launches.contains(&"cold".to_string()), "{launches:?}");
}

#[test]
fn the_pool_refills_after_a_claim() {
    let n = pool_of_one();
    eventually(Duration::from_secs(30), || {
        (pool_ready(&n) == 1).then_some(())
    });
    launch_of(&n);
    eventually(Duration::from_secs(30), || {
        (pool_ready(&n) == 1).then_some(())
    });
    assert_eq!(launch_of(&n), "warm");
}

#[test]
fn a_sandbox_is_never_handed_out_twice() {
    let n = pool_of_one();
    let a = create(&n, ALPHA, json!({}));
    sh(&n, &a, "echo mine > /work/secret");
    let b = create(&n, ALPHA, json!({}));
    let v = sh(&n, &b, "cat /work/secret 2>&1 || echo none");
    assert!(
        v["stdout"]["data"].as_str().unwrap().contains("none"),
        "{v}"
    );
}

#[test]
fn the_node_keeps_serving_models_while_sandboxes_are_abused() {
    let n = node();
    let id = create(n, ALPHA, json!({"cpus": 1.0, "pids": 64, "memory_mb": 64}));
    let base = n.base.clone();
    let abuse = std::thread::spawn(move || {
        let _ = client()
            .post(format!("{base}/v1/sandboxes/{id}/exec"))
            .bearer_auth(ALPHA)
            .json(&json!({"cmd": ["sh", "-c", "for i in 1 2 3 4; do (while :; do :; done) & done; :(){ :|:& };: ; sleep 10"], "timeout_s": 8}))
            .send();
    });
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let r = client()
        .post(format!("{}/v1/completions", n.base))
        .bearer_auth(ALPHA)
        .json(&json!({"model": "tiny-gemma", "prompt": "hello", "max_tokens": 4}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "after {:?}",
        t.elapsed()
    );
    abuse.join().unwrap();
}

/// The host processes running as a uid of the sandboxes' range.
fn sandbox_processes() -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        let uid: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        if (300_000..300_000 + 65_536).contains(&uid) {
            out.push(pid);
        }
    }
    out
}

/// Pids of `node`'s sandboxes: processes of the sandbox uids whose
/// ancestry reaches it.
fn descendants_of(root: u32) -> Vec<u32> {
    sandbox_processes()
        .into_iter()
        .filter(|&pid| {
            let mut p = pid;
            for _ in 0..64 {
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                let ppid: u32 = stat
                    .rsplit(')')
                    .next()
                    .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
                    .unwrap_or(0);
                if ppid == root {
                    return true;
                }
                if ppid <= 1 {
                    return false;
                }
                p = ppid;
            }
            false
        })
        .collect()
}

#[test]
fn a_sigkilled_node_leaves_no_sandbox_process_behind() {
    let mut n = pool_of_one();
    let id = create(&n, ALPHA, json!({}));
    let base = n.base.clone();
    std::thread::spawn(move || {
        let _ = client()
            .post(format!("{base}/v1/sandboxes/{id}/exec"))
            .bearer_auth(ALPHA)
            .json(&json!({"cmd": ["sleep", "300"]}))
            .send();
    });
    let root = n.child.id();
    eventually(Duration::from_secs(10), || {
        (descendants_of(root).len() >= 2).then_some(())
    });
    let mine = descendants_of(root);
    n.child.kill().unwrap();
    n.child.wait().unwrap();
    eventually(Duration::from_secs(10), || {
        let alive: Vec<u32> = mine
            .iter()
            .copied()
            .filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
            .collect();
        alive.is_empty().then_some(())
    });
}

#[test]
fn a_restarted_node_removes_what_a_killed_one_left() {
    let mut n = pool_of_one();
    eventually(Duration::from_secs(30), || {
        (pool_ready(&n) == 1).then_some(())
    });
    let pid = n.child.id();
    n.child.kill().unwrap();
    n.child.wait().unwrap();
    let left = |pid: u32| {
        ["memory", "pids", "cpu"].iter().any(|c| {
            std::fs::read_dir(format!("/sys/fs/cgroup/{c}/weft"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("sandbox-{pid}-"))
                })
        })
    };
    let again = pool_of_one();
    eventually(Duration::from_secs(10), || (!left(pid)).then_some(()));
    drop(again);
}

/// Runs `weft sandbox ARGS` against node `n` as tenant alpha.
fn cli(n: &Node, args: &[&str], stdin: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .arg("sandbox")
        .args(args)
        .env("WEFT_URL", &n.base)
        .env("WEFT_API_KEY", ALPHA)
        .env_remove("RUST_BACKTRACE")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn cli_create(n: &Node) -> String {
    let out = cli(n, &["create"], b"");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn the_cli_exec_prints_the_output_and_exits_with_the_commands_status() {
    let n = node();
    let id = cli_create(n);
    let out = cli(
        n,
        &["exec", &id, "--", "sh", "-c", "echo from-inside; exit 7"],
        b"",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-inside\n");
    assert_eq!(out.status.code(), Some(7));
}

#[test]
fn the_cli_copies_a_file_in_and_back_out() {
    let n = node();
    let id = cli_create(n);
    let put = cli(
        n,
        &["cp", "-", &format!("{id}:notes/a.txt")],
        b"agent notes\n",
    );
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let seen = cli(n, &["exec", &id, "--", "cat", "/work/notes/a.txt"], b"");
    assert_eq!(String::from_utf8_lossy(&seen.stdout), "agent notes\n");
    let back = cli(n, &["cp", &format!("{id}:notes/a.txt"), "-"], b"");
    assert_eq!(String::from_utf8_lossy(&back.stdout), "agent notes\n");
}

#[test]
fn the_cli_lists_a_created_sandbox() {
    let n = node();
    let id = cli_create(n);
    let out = cli(n, &["ls"], b"");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&id),
        "{out:?}"
    );
}

#[test]
fn the_cli_rm_deletes_a_sandbox() {
    let n = node();
    let id = cli_create(n);
    let rm = cli(n, &["rm", &id], b"");
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    let (st, _) = api(n, "GET", &format!("/v1/sandboxes/{id}"), ALPHA, None);
    assert_eq!(st, 410);
}

#[test]
fn the_cli_says_why_a_call_on_a_deleted_sandbox_failed() {
    let n = node();
    let id = cli_create(n);
    cli(n, &["rm", &id], b"");
    let out = cli(n, &["exec", &id, "--", "true"], b"");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("deleted"),
        "{out:?}"
    );
}

/// Runs the README's example `script` (in examples/) on `task` against
/// `n`; what it printed, after checking it succeeded and deleted the
/// sandbox it names.
fn run_example(n: &Node, script: &str, task: &str) -> String {
    let path = format!("{}/../examples/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("python3")
        .arg(path)
        .arg(task)
        .env("WEFT_URL", &n.base)
        .env("WEFT_API_KEY", ALPHA)
        .output()
        .expect("python3 (scripts/install_test_deps.sh installs it with openai and requests)");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = said
        .split_whitespace()
        .find(|w| w.starts_with("sbx_"))
        .unwrap_or_else(|| panic!("no sandbox id in {said}"));
    let (st, _) = api(n, "GET", &format!("/v1/sandboxes/{id}"), ALPHA, None);
    assert_eq!(st, 410, "the example left {id} behind");
    said
}

#[test]
fn the_readme_agent_example_runs_the_models_command_in_a_sandbox_and_deletes_it() {
    let said = run_example(node(), "sandbox_agent.py", "List the files here.");
    assert!(said.contains("exit code"), "{said}");
}

#[test]
fn the_readme_tool_agent_runs_the_models_call_in_a_sandbox_and_sends_back_the_result() {
    let said = run_example(node(), "tool_agent.py", "What is 2 to the power of 20?");
    // the first turn must call a tool: its call ran and its result went back
    assert!(said.contains("call call_"), "{said}");
    assert!(said.contains("result: {\"exit_code\""), "{said}");
}

/// How many cgroups (of the memory controller) node `n`'s sandboxes have.
fn sandbox_cgroups(n: &Node) -> usize {
    let prefix = format!("sandbox-{}-", n.child.id());
    std::fs::read_dir("/sys/fs/cgroup/memory/weft")
        .or_else(|_| std::fs::read_dir("/sys/fs/cgroup/weft"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_deleted_sandbox_leaves_no_cgroup_behind() {
    let n = pool_of_one();
    eventually(Duration::from_secs(30), || {
        (pool_ready(&n) == 1).then_some(())
    });
    let id = create(&n, ALPHA, json!({}));
    eventually(Duration::from_secs(30), || {
        (pool_ready(&n) == 1).then_some(())
    });
    assert_eq!(
        sandbox_cgroups(&n),
        2,
        "the claimed sandbox's and the refill's"
    );
    api(&n, "DELETE", &format!("/v1/sandboxes/{id}"), ALPHA, None);
    // (well before the sandbox's lifetime of 300 s would have run out)
    eventually(Duration::from_secs(20), || {
        (sandbox_cgroups(&n) == 1).then_some(())
    });
}

#[test]
fn a_command_cannot_reach_the_inits_channel_to_the_node() {
    let n = node();
    let id = create(n, ALPHA, json!({}));
    // fd 3 is the init's channel; a command inherits nothing but 0, 1, 2
    let v = sh(n, &id, "ls /proc/self/fd/ | sort -n | tr '\\n' ' '");
    assert_eq!(
        v["stdout"]["data"].as_str().unwrap().trim(),
        "0 1 2 3",
        "{v}"
    );
    let v = sh(n, &id, "echo forged >&3 && echo wrote");
    assert!(
        !v["stdout"]["data"].as_str().unwrap().contains("wrote"),
        "{v}"
    );
}

#[test]
fn a_process_that_left_the_commands_group_ends_with_the_last_command() {
    let n = node();
    let id = create(n, ALPHA, json!({}));
    let t = Instant::now();
    sh(n, &id, "setsid sleep 301 > /dev/null 2>&1 & echo started");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "the exec waited for the escapee"
    );
    gone_within(n, &id, "sleep 301", Duration::from_secs(10));
}

#[test]
fn reading_a_fifo_fails_without_stalling_the_sandbox() {
    let n = node();
    let id = create(n, ALPHA, json!({}));
    sh(n, &id, "mkfifo /work/pipe");
    let r = client()
        .get(format!("{}/v1/sandboxes/{id}/files?path=pipe", n.base))
        .bearer_auth(ALPHA)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v = sh(n, &id, "echo still-serving");
    assert_eq!(v["stdout"]["data"], "still-serving\n");
}

#[test]
fn parallel_creates_cannot_pass_the_sandbox_quota_together() {
    let n = launch(&config(0, 0));
    wait_ready(&n, true);
    let base = n.base.clone();
    let created: Vec<u16> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let base = base.clone();
                s.spawn(move || {
                    client()
                        .post(format!("{base}/v1/sandboxes"))
                        .bearer_auth(SMALL)
                        .json(&json!({"memory_mb": 32}))
                        .send()
                        .unwrap()
                        .status()
                        .as_u16()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        created.iter().filter(|&&c| c == 201).count(),
        1,
        "{created:?}"
    );
    assert_eq!(
        created.iter().filter(|&&c| c == 429).count(),
        3,
        "{created:?}"
    );
}
