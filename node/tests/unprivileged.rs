//! A node that is not root (a Kubernetes pod's uid, a user's shell): it
//! cannot give its worker a kernel uid of its own, so with `sandbox =
//! "relaxed"` the worker maps itself in its own user namespace (root there
//! is the node's uid) and says what it lacks; with the default strict
//! sandbox the node refuses to run it.

use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{client, launch_with, weft_readable_by_all};

/// A uid no test runs as (the image's is 65532).
const UID: u32 = 65531;

fn start_as_user(extra: &str) -> common::Node {
    launch_with(
        &format!("{extra}\n[sandboxes]\nenabled = false\n"),
        weft_readable_by_all(),
        |cmd| {
            cmd.uid(UID).gid(UID).env("HOME", "/tmp");
        },
    )
}

/// `/readyz` once it says ready, or what it said last by `within`.
fn readyz(n: &common::Node, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let v: Value = client()
            .get(format!("{}/readyz", n.base))
            .send()
            .and_then(|r| r.json())
            .unwrap_or_default();
        if v["status"] == "ready" || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_node_that_is_not_root_runs_its_worker_relaxed_in_a_namespace_it_mapped_itself() {
    let n = start_as_user("sandbox = \"relaxed\"");
    let v = readyz(&n, common::START_DEADLINE);
    assert_eq!(v["status"], "ready", "{v}");
    let c = &v["worker"]["confinement"];
    // root of its own user namespace, the node's uid outside it
    assert_eq!(c["uid"], UID, "{c}");
    let held: Vec<&str> = c["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l.as_str())
        .collect();
    assert!(
        held.contains(&"user_namespace") && held.contains(&"seccomp"),
        "{held:?}"
    );
    assert!(
        c["missing"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == "dedicated_uid"),
        "{c}"
    );
    let r = client()
        .post(format!("{}/v1/completions", n.base))
        .json(&serde_json::json!({"model": "tiny-gemma", "prompt": "hi", "max_tokens": 2}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn a_node_that_is_not_root_refuses_a_strict_sandbox_it_cannot_give() {
    let dir = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let model = common::tiny_model(dir.path());
    let cfg = dir.path().join("node.toml");
    std::fs::write(
        &cfg,
        format!(
            "addr = \"127.0.0.1:0\"\nmodel = \"{}\"\nthreads = 1\nsandbox = \"process\"\n[sandboxes]\nenabled = false\n",
            model.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(weft_readable_by_all())
        .args(["up", "--config"])
        .arg(&cfg)
        .uid(UID)
        .gid(UID)
        .env("HOME", "/tmp")
        .env("WEFT_CACHE_DIR", dir.path().join("cache"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a strict sandbox started without a uid of its own"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("relaxed") && err.contains("not root"), "{err}");
}
