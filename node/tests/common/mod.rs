//! What the process tests of `weft up` share: the binary on a free port
//! with the tiny test model.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weft_kernels::testing::{write_tiny_model, TinyModelSpec};

/// How long a node may take to start and load the tiny model.
pub const START_DEADLINE: Duration = Duration::from_secs(60);

pub struct Node {
    pub child: Child,
    pub base: String,
    /// What it printed after its first line.
    pub said: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tiny_model(dir: &Path) -> PathBuf {
    let p = dir.join("tiny-gemma.gguf");
    write_tiny_model(&p, &TinyModelSpec::default()).unwrap();
    p
}

/// The weft binary where any uid may run it: a link to the built one (under
/// root's home) in `/var/tmp/weft-test-bin` (not under /tmp: a sandbox's
/// /tmp is its own), one name per test process, those of ended ones
/// removed (a static's TempDir never is).
#[allow(dead_code)]
pub fn weft_readable_by_all() -> &'static str {
    static W: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    W.get_or_init(|| {
        let d = std::path::Path::new("/var/tmp/weft-test-bin");
        std::fs::create_dir_all(d).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let pid = name
                .strip_prefix("weft-")
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let p = d.join(format!("weft-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let built = env!("CARGO_BIN_EXE_weft");
        if std::fs::hard_link(built, &p).is_err() {
            std::fs::copy(built, &p).unwrap();
        }
        p.display().to_string()
    })
}

/// Starts `weft up` with extra TOML lines; returns once it listens.
pub fn launch(extra_toml: &str) -> Node {
    launch_with(extra_toml, env!("CARGO_BIN_EXE_weft"), |_| {})
}

/// As [`launch`], running `program`, with `setup` applied to the command
/// first (another user, more environment); the node's directory is
/// readable by all.
pub fn launch_with(extra_toml: &str, program: &str, setup: impl FnOnce(&mut Command)) -> Node {
    let dir = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let model = tiny_model(dir.path());
    let cfg = dir.path().join("node.toml");
    std::fs::write(
        &cfg,
        format!("addr = \"127.0.0.1:0\"\nmodel = \"{}\"\nthreads = 1\nkv_budget = 67108864\ngrace_s = 20\n{extra_toml}", model.display()),
    )
    .unwrap();
    let mut cmd = Command::new(program);
    setup(&mut cmd);
    cmd.args(["up", "--config"])
        .arg(&cfg)
        .env("WEFT_CACHE_DIR", dir.path().join("cache"))
        .env_remove("WEFT_ADDR")
        .env_remove("WEFT_MODEL")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = spawn_ending_with_the_tests(cmd).unwrap();
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    let first = lines.next().expect("weft up prints its address").unwrap();
    let base = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("an http:// URL on the first line")
        .to_string();
    let said = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let lines_said = said.clone();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            lines_said.lock().unwrap().push(l);
        }
    });
    Node {
        child,
        base,
        said,
        dir,
    }
}

/// Spawns `cmd` so that it gets SIGTERM when this test process ends, even
/// when a `static` holds it (statics are never dropped) or the harness is
/// killed. `PR_SET_PDEATHSIG` fires when the spawning *thread* ends, so
/// every such child is spawned from one thread that lives as long as the
/// process, not from the test's own.
pub fn spawn_ending_with_the_tests(cmd: Command) -> std::io::Result<Child> {
    type Job = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Job>>> =
        std::sync::OnceLock::new();
    let jobs = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::spawn(move || {
            for (mut cmd, reply) in rx {
                use std::os::unix::process::CommandExt;
                // SAFETY: prctl with integer arguments is async-signal-safe.
                unsafe {
                    cmd.pre_exec(|| {
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0);
                        Ok(())
                    });
                }
                let _ = reply.send(cmd.spawn());
            }
        });
        std::sync::Mutex::new(tx)
    });
    let (tx, rx) = std::sync::mpsc::channel();
    jobs.lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, tx))
        .expect("the spawner thread lives as long as the tests");
    rx.recv().expect("the spawner thread answers")
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

pub fn wait_ready(node: &Node, want: bool) {
    let deadline = Instant::now() + START_DEADLINE;
    let c = client();
    loop {
        let ok = c
            .get(format!("{}/readyz", node.base))
            .send()
            .map(|r| r.status().is_success())
            .unwrap_or(false);
        if ok == want {
            return;
        }
        assert!(Instant::now() < deadline, "readyz never became {want}");
        std::thread::yield_now();
    }
}

/// Starts `weft up` with extra TOML lines (agent sandboxes off: for tests
/// of the model API); waits until it is ready.
pub fn start(extra_toml: &str) -> Node {
    let node = launch(&format!("{extra_toml}\n[sandboxes]\nenabled = false\n"));
    wait_ready(&node, true);
    node
}

/// POSTs `body` as JSON to `path`; the status and the JSON answer (null
/// when it is not JSON).
pub fn post(node: &Node, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let r = client()
        .post(format!("{}{path}", node.base))
        .json(body)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(serde_json::Value::Null))
}

/// The data payloads of an SSE response, in order.
pub fn sse(node: &Node, path: &str, body: &serde_json::Value) -> Vec<String> {
    let r = client()
        .post(format!("{}{path}", node.base))
        .json(body)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = r.text().unwrap();
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                .to_string()
        })
        .collect()
}

/// The JSON payloads of an SSE response before its `[DONE]`, which must
/// end it.
pub fn chunks(events: &[String]) -> Vec<serde_json::Value> {
    assert_eq!(events.last().unwrap(), "[DONE]");
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}
