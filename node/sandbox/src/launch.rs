//! Starting a sandbox's init at its tier, up to its `Ready`: tier
//! `process` through the worker sandbox's launcher (namespaces, the
//! dedicated uid, the cgroup), tier `gvisor` under `runsc` from a bundle.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::io::{AsyncRead, AsyncWrite};
use weft_worker::sandbox::cgroup::{self, Cgroup};
use weft_worker::sandbox::launch::{self, Launch, Rlimits};
use weft_worker::sandbox::{gvisor, Plan, SeccompMode, PLAN_ENV};
use weft_worker::spawn::DEVICES;

use crate::config::{Isolation, Limits, Template};

/// What a started sandbox comes with.
pub struct Started {
    /// The process the node started (for gVisor, `runsc`).
    pub child: tokio::process::Child,
    /// Frames from its init.
    pub reader: Box<dyn AsyncRead + Unpin + Send>,
    /// Frames to its init.
    pub writer: Box<dyn AsyncWrite + Unpin + Send>,
    /// Its cgroup (the process tier's; gVisor's container has its own).
    pub cgroup: Option<Arc<Cgroup>>,
    /// The name of the cgroup that limits it, under weft's parent.
    pub cgroup_name: String,
    /// Its gVisor container, deleted when this drops.
    pub container: Option<Container>,
    /// The kernel uid it runs as.
    pub uid: u32,
    /// That uid, no other sandbox's while this lives.
    pub uid_lease: UidLease,
}

/// A sandbox's hold on its kernel uid: no other live sandbox gets it.
pub struct UidLease {
    uid: u32,
    in_use: Arc<std::sync::Mutex<std::collections::HashSet<u32>>>,
}

impl Drop for UidLease {
    fn drop(&mut self) {
        self.in_use
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.uid);
    }
}

/// A sandbox's gVisor container, force-deleted when dropped.
pub struct Container {
    runsc: PathBuf,
    state_dir: PathBuf,
    bundle: gvisor::Bundle,
}

impl Container {
    /// The container's id.
    pub fn id(&self) -> &str {
        &self.bundle.id
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        gvisor::delete(&self.runsc, &self.state_dir, &self.bundle.id);
    }
}

/// How sandboxes are started on this node.
#[derive(Debug, Clone)]
pub struct Launcher {
    /// The weft executable (its `sandbox-init`).
    pub exe: PathBuf,
    /// `runsc`.
    pub runsc: PathBuf,
    /// gVisor's state and bundles.
    pub state_dir: PathBuf,
    /// The sandboxes' uids.
    pub uids: std::ops::Range<u32>,
    /// Those live sandboxes hold.
    pub uids_in_use: Arc<std::sync::Mutex<std::collections::HashSet<u32>>>,
    /// The seccomp filter's mode.
    pub seccomp: SeccompMode,
}

/// What gVisor itself holds of a sandbox's cgroup on top of what runs in
/// it: the sentry's and the gofer's threads (about 60 when idle, more as
/// it works) and memory (about 16 MiB idle). Its cgroup allows these on
/// top of the sandbox's limits, so the limits bound what the agent's
/// commands get.
pub const GVISOR_PIDS: u64 = 128;
/// See [`GVISOR_PIDS`].
pub const GVISOR_MEMORY_BYTES: u64 = 64 << 20;

/// The cgroup limits of `l` at `isolation`.
pub fn cgroup_limits(l: &Limits, isolation: Isolation) -> cgroup::Limits {
    let (pids, memory) = match isolation {
        Isolation::Process => (0, 0),
        Isolation::Gvisor => (GVISOR_PIDS, GVISOR_MEMORY_BYTES),
    };
    cgroup::Limits {
        memory_bytes: Some((l.memory_mb << 20) + memory),
        pids: Some(l.pids + pids),
        cpus: Some(l.cpus),
    }
}

impl Launcher {
    /// A uid of the range that no live sandbox holds, in turn.
    fn next_uid(&self) -> Result<UidLease> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let span = self.uids.end.saturating_sub(self.uids.start).max(1);
        let mut in_use = self.uids_in_use.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..span {
            let uid = self.uids.start + NEXT.fetch_add(1, Ordering::Relaxed) % span;
            if in_use.insert(uid) {
                return Ok(UidLease {
                    uid,
                    in_use: self.uids_in_use.clone(),
                });
            }
        }
        anyhow::bail!("every one of the {span} sandbox uids is held by a live sandbox")
    }

    fn plan(&self, t: &Template, isolation: Isolation) -> Plan {
        Plan {
            tier: isolation.tier(),
            new_root: isolation == Isolation::Process,
            devices: match isolation {
                Isolation::Process => DEVICES.iter().map(|d| d.to_string()).collect(),
                Isolation::Gvisor => Vec::new(),
            },
            seccomp: self.seccomp,
            binds: t.binds.clone(),
            proc: isolation == Isolation::Process,
            // an agent sandbox never runs with fewer layers than asked
            relaxed: false,
        }
    }

    /// Starts a sandbox of template `t` at `isolation` with `limits`.
    pub fn start(&self, t: &Template, isolation: Isolation, limits: &Limits) -> Result<Started> {
        match isolation {
            Isolation::Process => self.start_process(t, limits),
            Isolation::Gvisor => self.start_gvisor(t, limits),
        }
        .with_context(|| format!("starting a sandbox at tier {}", isolation.as_str()))
    }

    fn start_process(&self, t: &Template, limits: &Limits) -> Result<Started> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "sandbox-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let cg = Arc::new(
            Cgroup::create(&name, cgroup_limits(limits, Isolation::Process))
                .map_err(|e| anyhow::anyhow!("the sandbox's cgroup: {e}"))?,
        );
        let uid_lease = self.next_uid()?;
        let uid = uid_lease.uid;
        let plan = self.plan(t, Isolation::Process);
        let exe = std::fs::File::open(&self.exe)
            .with_context(|| format!("opening {}", self.exe.display()))?;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        let ours = tokio::net::UnixStream::from_std(ours)?;
        let mut cmd = tokio::process::Command::new(launch::program());
        cmd.args(["sandbox-init", "--channel", "fd"])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let pending = launch::prepare(
            &mut cmd,
            Launch {
                uid: Some(uid),
                cgroup: Some(cg.clone()),
                rlimits: Rlimits {
                    nofile: 1024,
                    fsize: libc::RLIM_INFINITY,
                    memlock: 64 << 10,
                },
            },
            &exe,
            theirs.as_raw_fd(),
            None,
        )?;
        cmd.env(PLAN_ENV, serde_json::to_string(&plan)?);
        let spawned = cmd.spawn();
        let mapped = pending.finish();
        let child = spawned?;
        mapped.context("mapping the sandbox's uid and joining its cgroup")?;
        drop((theirs, exe));
        let (rd, wr) = ours.into_split();
        Ok(Started {
            child,
            reader: Box::new(rd),
            writer: Box::new(wr),
            cgroup: Some(cg),
            cgroup_name: name,
            container: None,
            uid,
            uid_lease,
        })
    }

    fn start_gvisor(&self, t: &Template, limits: &Limits) -> Result<Started> {
        let uid_lease = self.next_uid()?;
        let uid = uid_lease.uid;
        let plan = self.plan(t, Isolation::Gvisor);
        let env = vec![format!("{PLAN_ENV}={}", serde_json::to_string(&plan)?)];
        let bundle = gvisor::write_bundle(
            &self.state_dir,
            &gvisor::BundleSpec {
                exe: &self.exe,
                binds: t
                    .binds
                    .iter()
                    .filter(|b| Path::new(b).exists())
                    .map(|b| (PathBuf::from(b), b.clone()))
                    .collect(),
                dirs: vec!["/work".into(), "/tmp".into()],
                // to mount its scratch space, then to give every
                // capability up (the bounding set needs CAP_SETPCAP)
                capabilities: vec!["CAP_SYS_ADMIN".into(), "CAP_SETPCAP".into()],
                hostname: "weft-sandbox".into(),
                args: vec!["sandbox-init".into(), "--channel".into(), "stdio".into()],
                env,
                uid,
                limits: cgroup_limits(limits, Isolation::Gvisor),
                nofile: 1024,
            },
        )?;
        let name = bundle.id.clone();
        let gvisor::Running {
            child,
            stdout,
            stdin,
        } = gvisor::run(&self.runsc, &self.state_dir, &bundle)?;
        let (reader, writer) = (Box::new(stdout), Box::new(stdin));
        Ok(Started {
            child,
            reader,
            writer,
            cgroup: None,
            cgroup_name: name,
            container: Some(Container {
                runsc: self.runsc.clone(),
                state_dir: self.state_dir.clone(),
                bundle,
            }),
            uid,
            uid_lease,
        })
    }
}

/// The one thread every sandbox is started from. A sandbox's first
/// process is killed when the thread that started it ends
/// (`PR_SET_PDEATHSIG` follows the thread, not the process), so that
/// thread must live as long as the service: not one of tokio's blocking
/// threads, which end after ten idle seconds.
pub struct LaunchThread {
    jobs: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl LaunchThread {
    /// Starts the thread, in the current tokio runtime's context (a
    /// child's reaper needs one).
    pub fn new() -> Result<Self> {
        let handle = tokio::runtime::Handle::try_current()
            .context("the sandbox service needs a tokio runtime")?;
        let (jobs, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        std::thread::Builder::new()
            .name("weft-sandbox-launch".into())
            .spawn(move || {
                let _entered = handle.enter();
                for job in rx {
                    job();
                }
            })
            .context("starting the sandbox launch thread")?;
        Ok(Self { jobs })
    }

    /// Runs `f` on the thread; its result.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| anyhow::anyhow!("the sandbox launch thread ended"))?;
        rx.await.context("the sandbox launch thread ended")
    }
}

/// Whether this host can start sandboxes at `isolation` (or why not).
pub fn can_start(isolation: Isolation, runsc: &Path) -> Result<(), String> {
    // SAFETY: a getter without arguments
    if unsafe { libc::geteuid() } != 0 {
        return Err("the node is not root, so it cannot map sandboxes to uids of their own".into());
    }
    match isolation {
        Isolation::Process => Cgroup::can_create(),
        Isolation::Gvisor => std::process::Command::new(runsc)
            .arg("--version")
            .output()
            .map_err(|e| format!("{}: {e}", runsc.display()))
            .and_then(|o| {
                if o.status.success() {
                    Ok(())
                } else {
                    Err(format!("{} --version failed", runsc.display()))
                }
            }),
    }
}
