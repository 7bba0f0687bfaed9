//! The gVisor tier: the worker runs under `runsc run` (no network, on
//! runsc's default platform: systrap on current releases, ptrace on
//! Debian 12's 2022 build; neither needs KVM) from an OCI bundle the node
//! writes. Its root is an empty
//! read-only directory into which only what the worker needs is bound,
//! read-only: the executable, the directories of the shared libraries the
//! node itself runs with (the worker is the same binary), and the model
//! file. gVisor's own `/proc` and `/dev` stand in for the host's. The
//! worker runs as its dedicated uid with no capabilities and
//! `no_new_privs`, under the bundle's cgroup limits, and speaks the worker
//! protocol on its stdin and stdout.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::cgroup::Limits;

/// Where the model file appears in the sandbox.
pub const MODEL_PATH: &str = "/model.gguf";
/// Where the executable appears in the sandbox.
pub const EXE_PATH: &str = "/weft";

/// A bundle on disk (removed when dropped) and the container's id.
pub struct Bundle {
    dir: tempfile::TempDir,
    /// The container id (unique on this host).
    pub id: String,
}

impl Bundle {
    /// The bundle directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// What a bundle holds.
pub struct BundleSpec<'a> {
    /// The executable.
    pub exe: &'a Path,
    /// Host paths bound read-only (source, where it appears): a worker's
    /// model file, an agent sandbox's template.
    pub binds: Vec<(PathBuf, String)>,
    /// Empty directories made in the root (mount points the process
    /// mounts on itself).
    pub dirs: Vec<String>,
    /// Capabilities the process starts with inside gVisor (an agent
    /// sandbox's init mounts its scratch space, then drops them).
    pub capabilities: Vec<String>,
    /// The container's host name.
    pub hostname: String,
    /// The worker's arguments after the executable.
    pub args: Vec<String>,
    /// Environment, `KEY=VALUE`.
    pub env: Vec<String>,
    /// The dedicated uid and gid.
    pub uid: u32,
    /// Limits.
    pub limits: Limits,
    /// Open files allowed.
    pub nofile: u64,
}

/// The directories holding the shared libraries this process has mapped
/// (and the dynamic loader).
pub fn library_dirs() -> Vec<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut dirs = BTreeSet::new();
    for l in maps.lines() {
        let Some(path) = l.split_whitespace().nth(5) else {
            continue;
        };
        if path.contains(".so") {
            if let Some(d) = Path::new(path).parent() {
                dirs.insert(d.to_path_buf());
            }
        }
    }
    dirs.into_iter().collect()
}

fn bind(src: &Path, dst: &str) -> Value {
    json!({
        "destination": dst,
        "type": "bind",
        "source": src,
        "options": ["rbind", "ro", "nosuid", "nodev"],
    })
}

/// Writes a bundle for `s` under `state_dir`.
pub fn write_bundle(state_dir: &Path, s: &BundleSpec<'_>) -> std::io::Result<Bundle> {
    std::fs::create_dir_all(state_dir)?;
    let dir = tempfile::Builder::new()
        .prefix("bundle-")
        .tempdir_in(state_dir)?;
    std::fs::create_dir(dir.path().join("rootfs"))?;
    let id = format!(
        "weft-{}-{}",
        std::process::id(),
        dir.path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        bind(s.exe, EXE_PATH),
    ];
    for (src, dst) in &s.binds {
        mounts.push(bind(src, dst));
    }
    for d in &s.dirs {
        std::fs::create_dir_all(dir.path().join("rootfs").join(d.trim_start_matches('/')))?;
    }
    for d in library_dirs() {
        let dst = d.to_string_lossy().into_owned();
        if !mounts.iter().any(|m| m["destination"] == dst.as_str()) {
            mounts.push(bind(&d, &dst));
        }
    }
    // the dynamic loader's configured name, where the libraries' directory
    // is not it (Debian: /lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu)
    for extra in ["/lib64", "/lib"] {
        let p = Path::new(extra);
        if p.is_dir() && !mounts.iter().any(|m| m["destination"] == extra) {
            mounts.push(bind(p, extra));
        }
    }
    let resources = s.limits.resources().map_err(std::io::Error::other)?;
    let mut args = vec![EXE_PATH.to_string()];
    args.extend(s.args.iter().cloned());
    let config = json!({
        "ociVersion": "1.0.0",
        "process": {
            "terminal": false,
            "user": {"uid": s.uid, "gid": s.uid},
            "args": args,
            "env": s.env,
            "cwd": "/",
            "capabilities": {"bounding": s.capabilities, "effective": s.capabilities, "permitted": s.capabilities, "inheritable": [], "ambient": []},
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": s.nofile, "soft": s.nofile},
                {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
            ],
            "noNewPrivileges": true,
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": s.hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "resources": serde_json::to_value(&resources).map_err(std::io::Error::other)?,
            "cgroupsPath": format!("/{}/{id}", super::cgroup::PARENT),
        },
    });
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_vec_pretty(&config).map_err(std::io::Error::other)?,
    )?;
    Ok(Bundle { dir, id })
}

/// The `runsc` arguments that run `bundle` in the foreground, its stdio
/// the container's, keeping runsc's state under `state_dir`.
pub fn run_args(state_dir: &Path, bundle: &Bundle) -> Vec<String> {
    vec![
        format!("--root={}", state_dir.join("runsc").display()),
        "--network=none".into(),
        "run".into(),
        "--bundle".into(),
        bundle.path().display().to_string(),
        bundle.id.clone(),
    ]
}

/// A running `runsc` and the container's stdin and stdout.
pub struct Running {
    /// `runsc run`, in a process group of its own, killed when this node
    /// process (its spawning thread) ends.
    pub child: tokio::process::Child,
    /// The container's stdout.
    pub stdout: tokio::process::ChildStdout,
    /// The container's stdin.
    pub stdin: tokio::process::ChildStdin,
}

/// Starts `runsc` on `bundle` in the foreground ([`run_args`]), its stdin
/// and stdout piped (the channel to what runs inside).
pub fn run(runsc: &Path, state_dir: &Path, bundle: &Bundle) -> std::io::Result<Running> {
    let mut cmd = tokio::process::Command::new(runsc);
    cmd.args(run_args(state_dir, bundle))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: the closure makes only async-signal-safe syscalls.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            libc::setpgid(0, 0);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| std::io::Error::new(e.kind(), format!("running {}: {e}", runsc.display())))?;
    let missing = |what| std::io::Error::other(format!("runsc's {what} was not piped"));
    let stdout = child.stdout.take().ok_or_else(|| missing("stdout"))?;
    let stdin = child.stdin.take().ok_or_else(|| missing("stdin"))?;
    Ok(Running {
        child,
        stdout,
        stdin,
    })
}

/// Removes container `id`'s state, killing it if it still runs (after a
/// worker ends, or one the node lost track of).
pub fn delete(runsc: &Path, state_dir: &Path, id: &str) {
    let _ = std::process::Command::new(runsc)
        .arg(format!("--root={}", state_dir.join("runsc").display()))
        .args(["delete", "--force", id])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}
