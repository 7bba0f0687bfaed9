//! Starting one worker process at its tier: a plain child, a process-tier
//! sandbox ([`crate::sandbox::launch`]), or a gVisor container
//! ([`crate::sandbox::gvisor`]); and checking, once it says it is ready,
//! what the host sees of it against the policy.

use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::chain::ChainLink;
use crate::sandbox::cgroup::{Cgroup, Limits};
use crate::sandbox::launch::{self, Launch, Rlimits};
use crate::sandbox::{self, gvisor, Confinement, HostView, Layer, Plan, Policy, SeccompMode, Tier};

/// How to start a worker.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// The `weft` executable.
    pub exe: PathBuf,
    /// The GGUF file.
    pub model: PathBuf,
    /// CPU threads (0: all).
    pub threads: usize,
    /// Where the model runs: `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    /// Bytes of GPU memory the model may take (0: 90% of what is free).
    pub device_memory_budget: usize,
    /// KV pool budget.
    pub kv_budget: usize,
    /// Longest sequence.
    pub max_context: usize,
    /// Most sequences running at once.
    pub max_running: usize,
    /// How it is confined.
    pub sandbox: SandboxSpec,
    /// An address the worker tries to reach to report its isolation.
    pub probe: Option<String>,
    /// The layers it runs (`None`: all of them).
    pub layers: Option<std::ops::Range<u32>>,
    /// For the head of a chain: where its steps go.
    pub chain: Option<Arc<dyn ChainLink>>,
    /// Tenants' shares of the KV cache (`default`: every other tenant).
    pub kv_shares: Vec<(String, f64)>,
    /// Whether the engine keeps and maps cached prefixes.
    pub prefix_cache: bool,
}

/// Devices bound into a process-tier worker's root.
pub const DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/urandom"];

/// How a worker is confined.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// The tier and its strictness.
    pub policy: Policy,
    /// Kernel uids (and gids) dedicated to workers.
    pub uids: Range<u32>,
    /// Its cgroup limits.
    pub limits: Limits,
    /// Its rlimits.
    pub rlimits: Rlimits,
    /// What its seccomp filter does outside the list.
    pub seccomp: SeccompMode,
    /// The `runsc` executable (tier `gvisor`).
    pub runsc: PathBuf,
    /// Where gVisor bundles and runsc's state go.
    pub state_dir: PathBuf,
}

impl SandboxSpec {
    /// No sandbox at all.
    pub fn off() -> Self {
        Self {
            policy: Policy {
                tier: Tier::Off,
                strict: false,
            },
            uids: 0..0,
            limits: Limits::default(),
            rlimits: Rlimits::default(),
            seccomp: SeccompMode::Enforce,
            runsc: PathBuf::from("runsc"),
            state_dir: std::env::temp_dir(),
        }
    }
}

/// A uid from `range` for the next worker: spread by this node's pid, so
/// nodes on one host seldom share one.
fn next_uid(range: &Range<u32>) -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = range.end.saturating_sub(range.start).max(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    range.start + (std::process::id().wrapping_mul(7919).wrapping_add(n)) % span
}

/// What a started worker comes with.
pub struct Spawned {
    /// The process the node started (for the gVisor tier, `runsc`).
    pub child: tokio::process::Child,
    /// Frames from the worker.
    pub reader: Box<dyn AsyncRead + Unpin + Send>,
    /// Frames to the worker.
    pub writer: Box<dyn AsyncWrite + Unpin + Send>,
    /// Its tier.
    pub tier: Tier,
    /// The kernel uid its namespace's root maps to (process tier), or its
    /// container's uid (gVisor).
    pub uid: Option<u32>,
    /// Its cgroup (removed, and whatever is left in it killed, when this
    /// drops).
    pub cgroup: Option<std::sync::Arc<Cgroup>>,
    /// Its gVisor container (deleted when this drops).
    pub container: Option<Container>,
}

impl Spawned {
    /// The host's CPU accounting of its cgroup (ours at tier process,
    /// runsc's at tier gvisor), if it has one.
    pub fn cpu_throttled(&self) -> Option<crate::sandbox::cgroup::CgroupCounter> {
        if let Some(c) = &self.cgroup {
            return Some(c.cpu_throttled());
        }
        let c = self.container.as_ref()?;
        Some(crate::sandbox::cgroup::CgroupCounter::cpu_throttled(
            &std::path::Path::new(crate::sandbox::cgroup::PARENT).join(&c.bundle.id),
        ))
    }
}

/// A gVisor container of a worker, force-deleted when dropped.
pub struct Container {
    runsc: PathBuf,
    state_dir: PathBuf,
    bundle: gvisor::Bundle,
}

impl Drop for Container {
    fn drop(&mut self) {
        gvisor::delete(&self.runsc, &self.state_dir, &self.bundle.id);
    }
}

/// The worker's command line after the executable.
fn worker_args(spec: &WorkerSpec, model: &std::path::Path, extra: &[String]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "worker".into(),
        "--model".into(),
        model.display().to_string(),
        "--threads".into(),
        spec.threads.to_string(),
        "--device".into(),
        spec.device.clone(),
        "--device-memory-budget".into(),
        spec.device_memory_budget.to_string(),
        "--kv-budget".into(),
        spec.kv_budget.to_string(),
        "--max-context".into(),
        spec.max_context.to_string(),
        "--max-running".into(),
        spec.max_running.to_string(),
    ];
    if let Some(p) = &spec.probe {
        a.extend(["--probe".into(), p.clone()]);
    }
    if let Some(l) = &spec.layers {
        a.extend(["--layers".into(), format!("{}..{}", l.start, l.end)]);
    }
    for (name, share) in &spec.kv_shares {
        a.extend(["--tenant-kv-share".into(), format!("{name}={share}")]);
    }
    if !spec.prefix_cache {
        a.push("--no-prefix-cache".into());
    }
    a.extend(extra.iter().cloned());
    a
}

/// The environment a worker is given (nothing else of the node's).
fn worker_env(plan: Option<&Plan>) -> Result<Vec<(String, String)>> {
    let mut env = Vec::new();
    for k in ["WEFT_LOG", "RUST_BACKTRACE", "WEFT_CPU_PATH"] {
        if let Ok(v) = std::env::var(k) {
            env.push((k.to_string(), v));
        }
    }
    if let Some(p) = plan {
        env.push((sandbox::PLAN_ENV.into(), serde_json::to_string(p)?));
    }
    Ok(env)
}

fn cgroup_for(spec: &SandboxSpec) -> Result<Option<std::sync::Arc<Cgroup>>> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "worker-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    // a node that is not root cannot make cgroups under weft's parent (its
    // directories are made when the first task joins, too late to run
    // without one)
    if !host_is_root() && !spec.policy.strict {
        tracing::warn!(
            "running the worker without a cgroup (sandbox = \"relaxed\"): the node is not root"
        );
        return Ok(None);
    }
    match Cgroup::create(&name, spec.limits) {
        Ok(c) => Ok(Some(std::sync::Arc::new(c))),
        Err(e) if spec.policy.strict => {
            anyhow::bail!("the worker's cgroup ({e}); a relaxed sandbox runs without one")
        }
        Err(e) => {
            tracing::warn!("running the worker without a cgroup (sandbox = \"relaxed\"): {e}");
            Ok(None)
        }
    }
}

/// Starts the worker `spec` describes, with `extra` arguments after its
/// own.
pub fn spawn(spec: &WorkerSpec, extra: &[String]) -> Result<Spawned> {
    let sb = &spec.sandbox;
    match sb.policy.tier {
        Tier::Off => spawn_plain(spec, extra),
        Tier::Process => spawn_process(spec, extra),
        Tier::Gvisor => spawn_gvisor(spec, extra),
    }
    .with_context(|| format!("starting a worker at tier {}", sb.policy.tier))
}

fn socket_pair() -> Result<(tokio::net::UnixStream, std::os::unix::net::UnixStream)> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    Ok((tokio::net::UnixStream::from_std(ours)?, theirs))
}

fn spawn_plain(spec: &WorkerSpec, extra: &[String]) -> Result<Spawned> {
    let (ours, theirs) = socket_pair()?;
    let mut cmd = tokio::process::Command::new(&spec.exe);
    cmd.args(worker_args(spec, &spec.model, extra))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let fd = theirs.as_raw_fd();
    // SAFETY: the closure makes only async-signal-safe syscalls.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || plain_child(fd));
    }
    let child = cmd.spawn()?;
    drop(theirs);
    let (rd, wr) = ours.into_split();
    Ok(Spawned {
        child,
        reader: Box::new(rd),
        writer: Box::new(wr),
        tier: Tier::Off,
        uid: None,
        cgroup: None,
        container: None,
    })
}

/// An unsandboxed worker's child setup: its socket on [`sandbox::WORKER_FD`],
/// death with the node, its own process group, no core files.
fn plain_child(socket: i32) -> std::io::Result<()> {
    #[allow(unsafe_code)]
    // SAFETY: plain syscalls on integers in the child after fork.
    unsafe {
        if libc::dup2(socket, sandbox::WORKER_FD) == -1 {
            return Err(std::io::Error::last_os_error());
        }
        let flags = libc::fcntl(sandbox::WORKER_FD, libc::F_GETFD);
        libc::fcntl(sandbox::WORKER_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        libc::setpgid(0, 0);
        let core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &core);
    }
    Ok(())
}

fn spawn_process(spec: &WorkerSpec, extra: &[String]) -> Result<Spawned> {
    let sb = &spec.sandbox;
    let dedicated = host_is_root().then(|| next_uid(&sb.uids));
    if dedicated.is_none() && sb.policy.strict {
        anyhow::bail!(
            "the node is not root, so it cannot map the worker to a uid of its own; run the node as root, or set sandbox = \"relaxed\""
        );
    }
    let cgroup = cgroup_for(sb)?;
    let plan = Plan {
        tier: Tier::Process,
        new_root: true,
        devices: DEVICES.iter().map(|d| d.to_string()).collect(),
        seccomp: sb.seccomp,
        binds: Vec::new(),
        proc: false,
        relaxed: !sb.policy.strict,
    };
    let exe = std::fs::File::open(&spec.exe)
        .with_context(|| format!("opening {}", spec.exe.display()))?;
    let model = std::fs::File::open(&spec.model)
        .with_context(|| format!("opening {}", spec.model.display()))?;
    let (ours, theirs) = socket_pair()?;
    let mut cmd = tokio::process::Command::new(launch::program());
    cmd.args(worker_args(spec, &spec.model, extra))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let pending = launch::prepare(
        &mut cmd,
        Launch {
            uid: dedicated,
            cgroup: cgroup.clone(),
            rlimits: sb.rlimits,
        },
        &exe,
        theirs.as_raw_fd(),
        Some(model.as_raw_fd()),
    )?;
    for (k, v) in worker_env(Some(&plan))? {
        cmd.env(k, v);
    }
    // the mapper thread maps the child and joins it to its cgroup while
    // the spawn waits for the exec
    let spawned = cmd.spawn();
    let mapped = pending.finish();
    let child = spawned?;
    mapped.context("mapping the worker's uid and joining its cgroup")?;
    drop((theirs, exe, model));
    let (rd, wr) = ours.into_split();
    Ok(Spawned {
        child,
        reader: Box::new(rd),
        writer: Box::new(wr),
        tier: Tier::Process,
        uid: dedicated,
        cgroup,
        container: None,
    })
}

fn spawn_gvisor(spec: &WorkerSpec, extra: &[String]) -> Result<Spawned> {
    let sb = &spec.sandbox;
    let uid = next_uid(&sb.uids);
    let plan = Plan {
        tier: Tier::Gvisor,
        new_root: false,
        devices: Vec::new(),
        seccomp: sb.seccomp,
        binds: Vec::new(),
        proc: false,
        relaxed: !sb.policy.strict,
    };
    let mut args = worker_args(spec, std::path::Path::new(gvisor::MODEL_PATH), extra);
    args.extend(["--channel".into(), "stdio".into()]);
    let env = worker_env(Some(&plan))?
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let bundle = gvisor::write_bundle(
        &sb.state_dir,
        &gvisor::BundleSpec {
            exe: &spec.exe,
            binds: vec![(spec.model.clone(), gvisor::MODEL_PATH.to_string())],
            dirs: Vec::new(),
            capabilities: Vec::new(),
            hostname: "weft-worker".into(),
            args,
            env,
            uid,
            limits: sb.limits,
            nofile: sb.rlimits.nofile,
        },
    )?;
    let gvisor::Running {
        child,
        stdout,
        stdin,
    } = gvisor::run(&sb.runsc, &sb.state_dir, &bundle)?;
    let (reader, writer) = (Box::new(stdout), Box::new(stdin));
    Ok(Spawned {
        child,
        reader,
        writer,
        tier: Tier::Gvisor,
        uid: Some(uid),
        cgroup: None,
        container: Some(Container {
            runsc: sb.runsc.clone(),
            state_dir: sb.state_dir.clone(),
            bundle,
        }),
    })
}

fn host_is_root() -> bool {
    #[allow(unsafe_code)]
    // SAFETY: a getter without arguments.
    unsafe {
        libc::geteuid() == 0
    }
}

/// `c` (the worker's report) corrected by what the host sees of it, and
/// the layers `policy` still misses.
pub fn verify(s: &Spawned, spec: &SandboxSpec, mut c: Confinement) -> Confinement {
    c.tier = s.tier;
    match s.tier {
        Tier::Off => {}
        Tier::Process => {
            // the engine is the waiter's child, PID 1 of its namespace
            let engine = s.child.id().and_then(sandbox::child_of);
            match engine.map(HostView::of) {
                Some(Ok(view)) => view.apply(&mut c, spec.uids.clone()),
                _ => {
                    for l in [Layer::DedicatedUid, Layer::Seccomp, Layer::NoCapabilities] {
                        c.lose(l);
                    }
                }
            }
            if s.cgroup.is_some() {
                c.hold(Layer::Cgroup);
            }
        }
        Tier::Gvisor => {
            // the container's uid is the bundle's; the sandbox's processes
            // are gVisor's to show
            c.hold(Layer::Gvisor);
            if s.uid.is_some_and(|u| spec.uids.contains(&u)) && c.uid == s.uid.unwrap_or(0) {
                c.hold(Layer::DedicatedUid);
            }
            c.hold(Layer::Cgroup);
        }
    }
    c.cgroup = s.cgroup.as_deref().map(Cgroup::describe).or_else(|| {
        (s.tier == Tier::Gvisor)
            .then(|| format!("{}/<container> (gVisor's)", super::sandbox::cgroup::PARENT))
    });
    c.missing = spec.policy.missing(&c);
    c.relaxed = !spec.policy.strict && spec.policy.tier != Tier::Off;
    c
}
