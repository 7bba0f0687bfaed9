//! The node's sandboxes: creating them (from a warm pool, or cold),
//! running commands and file requests in them, ending them (on delete,
//! on expiry, when their init dies), keeping the pools full, and saying
//! so in the intent log and the metrics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use weft_metrics::{
    counter_vec, gauge_vec, histogram, Histogram, IntCounterVec, IntGaugeVec, Registry,
};
use weft_worker::protocol::{encode, read_msg_async};
use weft_worker::sandbox::cgroup::{Cgroup, CgroupCounter};
use weft_worker::sandbox::{Confinement, HostView, Layer};

use crate::config::{Isolation, Limits, SandboxConfig, Template};
use crate::launch::{cgroup_limits, Container, LaunchThread, Launcher, Started};
use crate::protocol::{ExecLimits, FromInit, ToInit};

/// Messages (of at most 64 KiB of output each) queued for one waiter
/// before the channel from its sandbox waits for it.
const QUEUE: usize = 64;
/// How long a sandbox has to say it is ready (gVisor's first start on a
/// loaded machine is the slow one).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a claimed sandbox has to seal itself.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an ended sandbox's id still answers with why it ended.
const TOMBSTONE_FOR: Duration = Duration::from_secs(3600);
/// Most tombstones kept.
const MAX_TOMBSTONES: usize = 10_000;

/// Why a sandbox ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Deleted by its tenant.
    Deleted,
    /// Its lifetime ran out.
    Expired,
    /// Its init died (killed for lack of memory, or crashed).
    Died,
    /// The node is stopping.
    Shutdown,
}

impl Ended {
    /// Its name, in errors and the `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::Deleted => "delete",
            Ended::Expired => "expiry",
            Ended::Died => "died",
            Ended::Shutdown => "shutdown",
        }
    }
}

/// How a sandbox was had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// From a warm pool.
    Warm,
    /// Started for the create.
    Cold,
}

impl Launch {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Launch::Warm => "warm",
            Launch::Cold => "cold",
        }
    }
}

/// Why a request to the service failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Bad arguments.
    #[error("{0}")]
    Invalid(String),
    /// No such sandbox (of this tenant).
    #[error("no sandbox {0}")]
    NotFound(String),
    /// It ended.
    #[error("sandbox {id} has ended ({})", why.as_str())]
    Ended {
        /// The sandbox.
        id: String,
        /// Why.
        why: Ended,
    },
    /// Over the tenant's quota.
    #[error("{0}")]
    Quota(String),
    /// This node cannot start sandboxes of that kind.
    #[error("{0}")]
    Unavailable(String),
    /// Too many commands at once in it.
    #[error("{0}")]
    Busy(String),
    /// The sandbox failed the request.
    #[error("{message}")]
    Failed {
        /// What kind of failure.
        kind: crate::protocol::FailKind,
        /// Why.
        message: String,
    },
    /// Starting or talking to it failed.
    #[error("{0:#}")]
    Internal(anyhow::Error),
}

/// What a create asks for.
#[derive(Debug, Clone, Default)]
pub struct CreateAsk {
    /// Its template (`default` when none).
    pub template: Option<String>,
    /// Its tier (`process` when none).
    pub isolation: Option<Isolation>,
    /// Memory (MiB).
    pub memory_mb: Option<u64>,
    /// CPUs.
    pub cpus: Option<f64>,
    /// Processes and threads.
    pub pids: Option<u64>,
    /// Scratch space (MiB).
    pub disk_mb: Option<u64>,
    /// Lifetime (s).
    pub timeout_s: Option<u64>,
    /// Environment of every command.
    pub env: Vec<(String, String)>,
}

/// What a command asks for.
#[derive(Debug, Clone, Default)]
pub struct ExecAsk {
    /// Program and arguments.
    pub cmd: Vec<String>,
    /// Working directory under the scratch space.
    pub cwd: String,
    /// Environment on top of the sandbox's.
    pub env: Vec<(String, String)>,
    /// Standard input.
    pub stdin: Vec<u8>,
    /// Wall-clock limit (s); none: the sandbox's remaining lifetime.
    pub timeout_s: Option<u64>,
}

/// One event of a running command.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecEvent {
    /// It started.
    Start {
        /// Its pid in the sandbox.
        pid: u32,
    },
    /// Output.
    Output {
        /// Which stream.
        stream: crate::protocol::Stream,
        /// The bytes.
        data: Vec<u8>,
    },
    /// It ended.
    End(ExecEnd),
    /// It could not start, or the sandbox went away.
    Failed(String),
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecEnd {
    /// Its exit code, if it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended it.
    pub signal: Option<i32>,
    /// Killed for running past its timeout.
    pub timed_out: bool,
    /// Killed for lack of memory (the sandbox's cgroup).
    pub oom_killed: bool,
    /// Start to end (ms).
    pub duration_ms: u64,
}

/// The sandbox metrics.
struct Metrics {
    live: IntGaugeVec,
    creates: IntCounterVec,
    kills: IntCounterVec,
    pool: IntGaugeVec,
    start: Histogram,
    claim: Histogram,
    exec: Histogram,
}

impl Metrics {
    fn new(r: &Registry) -> Self {
        const LATENCY: &[f64] = &[
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
        ];
        Self {
            live: gauge_vec(
                r,
                "weft_sandboxes_live",
                "Agent sandboxes running, by tier and template.",
                &["isolation", "template"],
            ),
            creates: counter_vec(
                r,
                "weft_sandbox_creates_total",
                "Agent sandboxes created, by launch (warm: from a pool; cold: started for the create).",
                &["launch", "isolation"],
            ),
            kills: counter_vec(
                r,
                "weft_sandbox_kills_total",
                "Agent sandboxes and commands ended by the node, by reason (timeout, oom, expiry, delete, died).",
                &["reason"],
            ),
            pool: gauge_vec(
                r,
                "weft_sandbox_pool_ready",
                "Warm sandboxes waiting in a pool.",
                &["isolation", "template"],
            ),
            start: histogram(
                r,
                "weft_sandbox_start_seconds",
                "Create request to a sandbox that runs commands.",
                LATENCY,
            ),
            claim: histogram(
                r,
                "weft_sandbox_cold_start_seconds",
                "Starting a sandbox's init to its being ready (cold starts and pool refills).",
                LATENCY,
            ),
            exec: histogram(
                r,
                "weft_sandbox_exec_seconds",
                "A command's run, request to end.",
                LATENCY,
            ),
        }
    }
}

/// The control channel to one sandbox's init.
struct Conn {
    writer: tokio::sync::Mutex<Box<dyn AsyncWrite + Unpin + Send>>,
    /// Who waits for answers to which request. Bounded: a reader that
    /// does not keep up (a slow client of a streamed exec) holds the
    /// channel back rather than the node's memory filling.
    waiters: Mutex<HashMap<u64, mpsc::Sender<FromInit>>>,
    next: AtomicU64,
}

impl Conn {
    async fn send(&self, m: &ToInit) -> Result<()> {
        let frame = encode(m)?;
        let mut w = self.writer.lock().await;
        w.write_all(&frame).await?;
        w.flush().await?;
        Ok(())
    }

    fn wait_for(&self) -> (u64, mpsc::Receiver<FromInit>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(QUEUE);
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        (id, rx)
    }

    fn done(&self, id: u64) {
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}

/// What keeps a sandbox's processes: dropped, they are killed and
/// removed.
struct Held {
    child: tokio::process::Child,
    /// Held for its drop, which deletes the gVisor container (before the
    /// cgroup below goes: fields drop in order).
    _container: Option<Container>,
    /// Removed when this drops.
    cgroup: Option<Arc<Cgroup>>,
    /// Its uid, free again once all the above is gone.
    _uid: crate::launch::UidLease,
}

/// A started sandbox up to `Ready`: a pool's, or a cold start's.
struct Warm {
    held: Held,
    reader: Box<dyn AsyncRead + Unpin + Send>,
    writer: Box<dyn AsyncWrite + Unpin + Send>,
    cgroup_name: String,
    uid: u32,
}

/// A live (or ended) sandbox.
pub struct Sandbox {
    /// Its id.
    pub id: String,
    /// Its tenant.
    pub tenant: String,
    /// Its template.
    pub template: String,
    /// Its tier.
    pub isolation: Isolation,
    /// How it was had.
    pub launch: Launch,
    /// Its limits.
    pub limits: Limits,
    /// Its kernel uid.
    pub uid: u32,
    /// When it was created.
    pub created_at: SystemTime,
    /// What its init reported of its confinement.
    pub confinement: Confinement,
    expires_at: Mutex<SystemTime>,
    extended: Notify,
    conn: Conn,
    held: Mutex<Option<Held>>,
    /// Where the kernel counts its OOM kills (gVisor's container's cgroup,
    /// or ours), read without holding the cgroup.
    oom_count: Option<CgroupCounter>,
    ended: Mutex<Option<Ended>>,
    execs: AtomicUsize,
}

impl Sandbox {
    /// When it expires.
    pub fn expires_at(&self) -> SystemTime {
        *self.expires_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why it ended, if it did.
    pub fn ended(&self) -> Option<Ended> {
        *self.ended.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commands running now.
    pub fn running(&self) -> usize {
        self.execs.load(Ordering::Relaxed)
    }

    fn check_live(&self) -> Result<(), SandboxError> {
        match self.ended() {
            Some(why) => Err(SandboxError::Ended {
                id: self.id.clone(),
                why,
            }),
            None => Ok(()),
        }
    }
}

/// Unix seconds of `t`.
pub fn unix_s(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn new_id() -> String {
    use rand_core::RngCore;
    let mut b = [0u8; 12];
    rand_core::OsRng.fill_bytes(&mut b);
    format!("sbx_{}", hex::encode(b))
}

/// A warm pool.
struct PoolState {
    template: String,
    isolation: Isolation,
    size: usize,
    ready: Mutex<Vec<Warm>>,
    wanted: Notify,
}

/// Records one event in the intent log.
pub type Recorder = Arc<dyn Fn(Value) + Send + Sync>;

/// The layers a sandbox of tier process must hold, as the host sees them.
const HOST_CHECKED: [Layer; 4] = [
    Layer::DedicatedUid,
    Layer::NoNewPrivs,
    Layer::Seccomp,
    Layer::NoCapabilities,
];

/// `c` (what a sealed sandbox's init reported) corrected by what the host
/// sees of the init at tier process (its `/proc/<pid>/status`: uid, no
/// new privileges, a seccomp filter, no capabilities); a sandbox that
/// lacks one is refused. Under gVisor the host sees only runsc, whose
/// confinement is runsc's to keep.
fn verify(held: &Held, isolation: Isolation, uid: u32, mut c: Confinement) -> Result<Confinement> {
    if isolation != Isolation::Process {
        return Ok(c);
    }
    // the init is the first process's child, PID 1 of its namespace
    let init = held.child.id().and_then(weft_worker::sandbox::child_of);
    match init.map(HostView::of) {
        Some(Ok(view)) => view.apply(&mut c, uid..uid + 1),
        _ => bail!("the host cannot see the sandbox's init to check its confinement"),
    }
    let missing: Vec<String> = HOST_CHECKED
        .iter()
        .filter(|l| !c.has(**l))
        .map(|l| l.to_string())
        .collect();
    if !missing.is_empty() {
        bail!(
            "the sandbox's init lacks {} as the host sees it; refused",
            missing.join(", ")
        );
    }
    Ok(c)
}

/// Makes `dir` (gVisor's state and the bundles runsc runs as root) a
/// directory of this process's user alone, refusing one someone else made
/// first or a symlink in its place.
fn own_private_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => bail!("making {}: {e}", dir.display()),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    // SAFETY: a getter without arguments
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
        bail!(
            "{} is not a directory of uid {me} alone (a symlink, another owner, or writable by others): remove it",
            dir.display()
        );
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

/// A tenant's place for a sandbox being created, given back when dropped.
struct Reserved {
    svc: Arc<SandboxService>,
    tenant: String,
    memory_mb: u64,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let mut pending = self.svc.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = pending.get_mut(&self.tenant) {
            e.0 = e.0.saturating_sub(1);
            e.1 = e.1.saturating_sub(self.memory_mb);
            if e.0 == 0 {
                pending.remove(&self.tenant);
            }
        }
    }
}

/// The node's agent sandboxes.
pub struct SandboxService {
    cfg: SandboxConfig,
    launcher: Launcher,
    launch_thread: LaunchThread,
    live: Mutex<HashMap<String, Arc<Sandbox>>>,
    /// Sandboxes being created, by tenant: how many, how much memory.
    pending: Mutex<HashMap<String, (usize, u64)>>,
    /// Ended sandboxes: tenant, why, when.
    tombstones: Mutex<HashMap<String, (String, Ended, Instant)>>,
    pools: Vec<Arc<PoolState>>,
    record: Recorder,
    metrics: Metrics,
    /// Why a tier cannot be had here, if it cannot.
    unavailable: HashMap<Isolation, String>,
    stopping: std::sync::atomic::AtomicBool,
}

impl SandboxService {
    /// The service `cfg` describes, starting sandboxes with the weft
    /// executable `exe`, its metrics in `registry`, its events to
    /// `record`. Pools start filling once [`SandboxService::start_pools`]
    /// runs.
    pub fn new(
        cfg: SandboxConfig,
        exe: std::path::PathBuf,
        registry: &Registry,
        record: Recorder,
    ) -> Result<Arc<Self>> {
        cfg.validate().map_err(anyhow::Error::msg)?;
        own_private_dir(&cfg.state_dir())?;
        let launcher = Launcher {
            exe,
            runsc: cfg.runsc.clone(),
            state_dir: cfg.state_dir(),
            uids: cfg.uid_base..cfg.uid_base + cfg.uids,
            uids_in_use: Arc::default(),
            seccomp: cfg.seccomp,
        };
        let mut unavailable = HashMap::new();
        for i in [Isolation::Process, Isolation::Gvisor] {
            if let Err(e) = crate::launch::can_start(i, &cfg.runsc) {
                unavailable.insert(i, e);
            }
        }
        let pools = cfg
            .pools
            .iter()
            .filter(|p| p.size > 0 && !unavailable.contains_key(&p.isolation))
            .map(|p| {
                Arc::new(PoolState {
                    template: p.template.clone(),
                    isolation: p.isolation,
                    size: p.size,
                    ready: Mutex::default(),
                    wanted: Notify::new(),
                })
            })
            .collect();
        Ok(Arc::new(Self {
            metrics: Metrics::new(registry),
            cfg,
            launcher,
            launch_thread: LaunchThread::new()?,
            live: Mutex::default(),
            pending: Mutex::default(),
            tombstones: Mutex::default(),
            pools,
            record,
            unavailable,
            stopping: Default::default(),
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &SandboxConfig {
        &self.cfg
    }

    /// Why tier `i` cannot be had on this node, if it cannot.
    pub fn unavailable(&self, i: Isolation) -> Option<&str> {
        self.unavailable.get(&i).map(String::as_str)
    }

    /// Starts filling the warm pools in the background.
    pub fn start_pools(self: &Arc<Self>) {
        for p in &self.pools {
            let (me, p) = (self.clone(), p.clone());
            tokio::spawn(async move { me.refill(p).await });
        }
    }

    /// Warm sandboxes waiting in the pool of `template` at `isolation`.
    pub fn pool_ready(&self, template: &str, isolation: Isolation) -> usize {
        self.pools
            .iter()
            .filter(|p| p.template == template && p.isolation == isolation)
            .map(|p| p.ready.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    async fn refill(self: Arc<Self>, pool: Arc<PoolState>) {
        let Some(t) = self.cfg.templates.get(&pool.template).cloned() else {
            return;
        };
        let labels = [pool.isolation.as_str(), pool.template.as_str()];
        let mut failures = 0u32;
        loop {
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
            let have = pool.ready.lock().unwrap_or_else(|e| e.into_inner()).len();
            self.metrics
                .pool
                .with_label_values(&labels)
                .set(have as i64);
            if have >= pool.size {
                pool.wanted.notified().await;
                continue;
            }
            match self.start_warm(&t, pool.isolation, &t.defaults).await {
                Ok(w) => {
                    failures = 0;
                    pool.ready.lock().unwrap_or_else(|e| e.into_inner()).push(w);
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(template = %pool.template, isolation = pool.isolation.as_str(), "filling the sandbox pool: {e:#}");
                    // back off, but keep trying: the host may recover
                    let wait = Duration::from_millis(200 * 2u64.pow(failures.min(8)));
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Starts a sandbox and waits for its `Ready`.
    async fn start_warm(
        &self,
        t: &Template,
        isolation: Isolation,
        limits: &Limits,
    ) -> Result<Warm> {
        let t0 = Instant::now();
        let (launcher, t, limits) = (self.launcher.clone(), t.clone(), *limits);
        let started: Started = self
            .launch_thread
            .run(move || launcher.start(&t, isolation, &limits))
            .await??;
        let Started {
            child,
            mut reader,
            writer,
            cgroup,
            cgroup_name,
            container,
            uid,
            uid_lease,
        } = started;
        let held = Held {
            child,
            cgroup,
            _container: container,
            _uid: uid_lease,
        };
        let first = tokio::time::timeout(READY_TIMEOUT, read_msg_async::<FromInit>(&mut reader))
            .await
            .map_err(|_| anyhow::anyhow!("the sandbox did not start within {READY_TIMEOUT:?}"))?;
        match first {
            Ok(FromInit::Ready) => {}
            Ok(other) => bail!("the sandbox said {other:?} before it was ready"),
            Err(e) => {
                let mut held = held;
                let status = held.child.try_wait().ok().flatten();
                bail!("the sandbox ended before it was ready ({e}; status {status:?})")
            }
        }
        self.metrics.claim.observe(t0.elapsed().as_secs_f64());
        Ok(Warm {
            held,
            reader,
            writer,
            cgroup_name,
            uid,
        })
    }

    fn take_warm(&self, template: &str, isolation: Isolation) -> Option<Warm> {
        let pool = self
            .pools
            .iter()
            .find(|p| p.template == template && p.isolation == isolation)?;
        let w = pool.ready.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let left = pool.ready.lock().unwrap_or_else(|e| e.into_inner()).len();
        self.metrics
            .pool
            .with_label_values(&[isolation.as_str(), template])
            .set(left as i64);
        pool.wanted.notify_one();
        w
    }

    fn limits_for(t: &Template, ask: &CreateAsk) -> Result<Limits, SandboxError> {
        let d = &t.defaults;
        let l = Limits {
            memory_mb: ask.memory_mb.unwrap_or(d.memory_mb),
            cpus: ask.cpus.unwrap_or(d.cpus),
            pids: ask.pids.unwrap_or(d.pids),
            disk_mb: ask.disk_mb.unwrap_or(d.disk_mb),
            timeout_s: ask.timeout_s.unwrap_or(d.timeout_s),
        };
        let m = &t.max;
        let checks: [(&str, bool, String); 5] = [
            (
                "memory_mb",
                l.memory_mb >= 16 && l.memory_mb <= m.memory_mb,
                format!("16 to {}", m.memory_mb),
            ),
            (
                "cpus",
                l.cpus >= 0.01 && l.cpus <= m.cpus,
                format!("0.01 to {}", m.cpus),
            ),
            (
                "pids",
                l.pids >= 4 && l.pids <= m.pids,
                format!("4 to {}", m.pids),
            ),
            (
                "disk_mb",
                l.disk_mb >= 1 && l.disk_mb <= m.disk_mb,
                format!("1 to {}", m.disk_mb),
            ),
            (
                "timeout_s",
                l.timeout_s >= 1 && l.timeout_s <= m.timeout_s,
                format!("1 to {}", m.timeout_s),
            ),
        ];
        for (field, ok, range) in checks {
            if !ok {
                return Err(SandboxError::Invalid(format!(
                    "{field} must be {range} for this template"
                )));
            }
        }
        Ok(l)
    }

    /// Checks `tenant`'s quotas for one more sandbox of `memory_mb`,
    /// counting its live sandboxes and those being created, and reserves
    /// its place until the returned guard drops (so parallel creates
    /// cannot all pass the same check).
    fn reserve_quota(
        self: &Arc<Self>,
        tenant: &str,
        limits: &weft_api::TenantLimits,
        memory_mb: u64,
    ) -> Result<Reserved, SandboxError> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let (pending_n, pending_mb) = pending.get(tenant).copied().unwrap_or((0, 0));
        {
            let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            let mine: Vec<&Arc<Sandbox>> = live.values().filter(|s| s.tenant == tenant).collect();
            let n = mine.len() + pending_n;
            if let Some(max) = limits.max_sandboxes {
                if n >= max {
                    return Err(SandboxError::Quota(format!(
                        "tenant {tenant:?} has {n} sandboxes, its max_sandboxes quota"
                    )));
                }
            }
            if let Some(max) = limits.sandbox_memory_mb {
                let used: u64 = mine.iter().map(|s| s.limits.memory_mb).sum::<u64>() + pending_mb;
                if used + memory_mb > max {
                    return Err(SandboxError::Quota(format!(
                        "tenant {tenant:?}'s sandboxes would have {} MiB of memory, over its sandbox_memory_mb quota of {max}",
                        used + memory_mb
                    )));
                }
            }
        }
        let e = pending.entry(tenant.to_string()).or_default();
        e.0 += 1;
        e.1 += memory_mb;
        Ok(Reserved {
            svc: self.clone(),
            tenant: tenant.to_string(),
            memory_mb,
        })
    }

    /// Creates a sandbox for `tenant`, within its `quota`.
    pub async fn create(
        self: &Arc<Self>,
        tenant: &str,
        quota: &weft_api::TenantLimits,
        ask: CreateAsk,
    ) -> Result<Arc<Sandbox>, SandboxError> {
        let t0 = Instant::now();
        if self.stopping.load(Ordering::Relaxed) {
            return Err(SandboxError::Unavailable("the node is stopping".into()));
        }
        let template = ask.template.clone().unwrap_or_else(|| "default".into());
        let t = self.cfg.templates.get(&template).ok_or_else(|| {
            SandboxError::Invalid(format!(
                "no template {template:?} (this node has {})",
                self.cfg
                    .templates
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let isolation = ask.isolation.unwrap_or(Isolation::Process);
        if let Some(why) = self.unavailable(isolation) {
            return Err(SandboxError::Unavailable(format!(
                "isolation {:?} is not available on this node: {why}",
                isolation.as_str()
            )));
        }
        let limits = Self::limits_for(t, &ask)?;
        let _reserved = self.reserve_quota(tenant, quota, limits.memory_mb)?;
        for (k, _) in &ask.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(SandboxError::Invalid(format!("bad environment name {k:?}")));
            }
        }
        let (warm, launch) = match self.take_warm(&template, isolation) {
            Some(w) => (w, Launch::Warm),
            None => (
                self.start_warm(t, isolation, &limits)
                    .await
                    .map_err(SandboxError::Internal)?,
                Launch::Cold,
            ),
        };
        let sb = self
            .claim(
                warm, tenant, &template, t, isolation, limits, launch, &ask.env,
            )
            .await
            .map_err(SandboxError::Internal)?;
        self.metrics
            .creates
            .with_label_values(&[launch.as_str(), isolation.as_str()])
            .inc();
        self.metrics
            .live
            .with_label_values(&[isolation.as_str(), &template])
            .inc();
        self.metrics.start.observe(t0.elapsed().as_secs_f64());
        (self.record)(json!({
            "event": "sandbox.create",
            "tenant": tenant,
            "sandbox": sb.id,
            "template": template,
            "isolation": isolation.as_str(),
            "launch": launch.as_str(),
            "limits": {
                "memory_mb": limits.memory_mb, "cpus": limits.cpus, "pids": limits.pids,
                "disk_mb": limits.disk_mb, "timeout_s": limits.timeout_s,
            },
            "uid": sb.uid,
            "ms": t0.elapsed().as_secs_f64() * 1e3,
        }));
        Ok(sb)
    }

    /// Applies the claim's limits, tells the init its scratch size and
    /// environment, and waits for it to seal itself.
    #[allow(clippy::too_many_arguments)]
    async fn claim(
        self: &Arc<Self>,
        warm: Warm,
        tenant: &str,
        template: &str,
        t: &Template,
        isolation: Isolation,
        limits: Limits,
        launch: Launch,
        env: &[(String, String)],
    ) -> Result<Arc<Sandbox>> {
        let Warm {
            mut held,
            mut reader,
            writer,
            cgroup_name,
            uid,
        } = warm;
        // the claim's limits: for a pool's sandbox they replace the
        // template's defaults it was started with (a gVisor sandbox's
        // cgroup is runsc's, taken over by name)
        let cgroup = match &held.cgroup {
            Some(c) => c.clone(),
            None => {
                let c = Arc::new(
                    Cgroup::create(&cgroup_name, cgroup_limits(&limits, isolation))
                        .map_err(anyhow::Error::msg)?,
                );
                held.cgroup = Some(c.clone());
                c
            }
        };
        if launch == Launch::Warm {
            cgroup.update(cgroup_limits(&limits, isolation))?;
        }
        let oom_count = Some(cgroup.oom_count());
        let mut all_env: Vec<(String, String)> =
            t.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        all_env.extend(env.iter().cloned());
        let claim = ToInit::Claim {
            disk_bytes: limits.disk_mb << 20,
            env: all_env,
        };
        let mut writer = writer;
        writer.write_all(&encode(&claim)?).await?;
        writer.flush().await?;
        let sealed = tokio::time::timeout(CLAIM_TIMEOUT, read_msg_async::<FromInit>(&mut reader))
            .await
            .map_err(|_| {
                anyhow::anyhow!("the sandbox did not seal itself within {CLAIM_TIMEOUT:?}")
            })?;
        let confinement = match sealed {
            Ok(FromInit::Claimed { confinement }) => confinement,
            Ok(other) => bail!("the sandbox answered its claim with {other:?}"),
            Err(e) => bail!("the sandbox ended at its claim: {e}"),
        };
        let confinement = verify(&held, isolation, uid, confinement)?;
        let now = SystemTime::now();
        let sb = Arc::new(Sandbox {
            id: new_id(),
            tenant: tenant.to_string(),
            template: template.to_string(),
            isolation,
            launch,
            limits,
            uid,
            created_at: now,
            confinement,
            expires_at: Mutex::new(now + Duration::from_secs(limits.timeout_s)),
            extended: Notify::new(),
            conn: Conn {
                writer: tokio::sync::Mutex::new(writer),
                waiters: Mutex::default(),
                next: AtomicU64::new(0),
            },
            held: Mutex::new(Some(held)),
            oom_count,
            ended: Mutex::new(None),
            execs: AtomicUsize::new(0),
        });
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sb.id.clone(), sb.clone());
        // answers from the init, to whoever waits for them
        {
            let (me, sb) = (self.clone(), sb.clone());
            tokio::spawn(async move {
                // (after its claim the init is not trusted further than
                // its frames' limits)
                while let Ok(m) = read_msg_async::<FromInit>(&mut reader).await {
                    let Some(id) = m.id() else { continue };
                    let tx = sb
                        .conn
                        .waiters
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&id)
                        .cloned();
                    if let Some(tx) = tx {
                        let _ = tx.send(m).await;
                    }
                }
                // the init is gone: every waiter hears it
                sb.conn
                    .waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clear();
                me.end(&sb, Ended::Died);
            });
        }
        // its lifetime
        {
            let (me, sb) = (self.clone(), sb.clone());
            tokio::spawn(async move {
                loop {
                    let left = sb
                        .expires_at()
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    if left.is_zero() {
                        me.end(&sb, Ended::Expired);
                        return;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(left) => {}
                        _ = sb.extended.notified() => {}
                    }
                    if sb.ended().is_some() {
                        return;
                    }
                }
            });
        }
        Ok(sb)
    }

    /// Ends `sb` for `why` (once): its processes are killed and removed in
    /// the background.
    pub fn end(&self, sb: &Arc<Sandbox>, why: Ended) {
        {
            let mut e = sb.ended.lock().unwrap_or_else(|e| e.into_inner());
            if e.is_some() {
                return;
            }
            *e = Some(why);
        }
        // its lifetime task lets go of it now, not at its expiry
        sb.extended.notify_one();
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&sb.id);
        {
            let mut t = self.tombstones.lock().unwrap_or_else(|e| e.into_inner());
            t.retain(|_, (_, _, at)| at.elapsed() < TOMBSTONE_FOR);
            if t.len() >= MAX_TOMBSTONES {
                if let Some(oldest) = t.iter().min_by_key(|(_, v)| v.2).map(|(k, _)| k.clone()) {
                    t.remove(&oldest);
                }
            }
            t.insert(sb.id.clone(), (sb.tenant.clone(), why, Instant::now()));
        }
        self.metrics
            .live
            .with_label_values(&[sb.isolation.as_str(), &sb.template])
            .dec();
        self.metrics.kills.with_label_values(&[why.as_str()]).inc();
        if why != Ended::Deleted {
            (self.record)(json!({
                "event": "sandbox.end",
                "tenant": sb.tenant,
                "sandbox": sb.id,
                "reason": why.as_str(),
            }));
        }
        let held = sb.held.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(held) = held {
            // killing the child, removing the cgroup (which kills what is
            // left in it) and deleting a gVisor container can block
            tokio::task::spawn_blocking(move || drop(held));
        }
    }

    /// `tenant`'s sandbox `id`; another tenant's is not found.
    pub fn get(&self, tenant: &str, id: &str) -> Result<Arc<Sandbox>, SandboxError> {
        if let Some(sb) = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .filter(|s| s.tenant == tenant)
        {
            return Ok(sb.clone());
        }
        match self
            .tombstones
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
        {
            Some((t, why, _)) if t == tenant => Err(SandboxError::Ended {
                id: id.to_string(),
                why: *why,
            }),
            _ => Err(SandboxError::NotFound(id.to_string())),
        }
    }

    /// `tenant`'s live sandboxes, oldest first.
    pub fn list(&self, tenant: &str) -> Vec<Arc<Sandbox>> {
        let mut v: Vec<Arc<Sandbox>> = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|s| s.tenant == tenant)
            .cloned()
            .collect();
        v.sort_by_key(|s| s.created_at);
        v
    }

    /// Extends `sb`'s lifetime to `timeout_s` from its creation.
    pub fn extend(&self, sb: &Arc<Sandbox>, timeout_s: u64) -> Result<(), SandboxError> {
        sb.check_live()?;
        let max = self
            .cfg
            .templates
            .get(&sb.template)
            .map_or(0, |t| t.max.timeout_s);
        if timeout_s == 0 || timeout_s > max {
            return Err(SandboxError::Invalid(format!(
                "timeout_s must be 1 to {max} for this template"
            )));
        }
        *sb.expires_at.lock().unwrap_or_else(|e| e.into_inner()) =
            sb.created_at + Duration::from_secs(timeout_s);
        sb.extended.notify_one();
        Ok(())
    }

    /// Deletes `tenant`'s sandbox `id` (again: the same answer).
    pub fn delete(&self, tenant: &str, id: &str) -> Result<(), SandboxError> {
        match self.get(tenant, id) {
            Ok(sb) => {
                self.end(&sb, Ended::Deleted);
                (self.record)(json!({
                    "event": "sandbox.delete",
                    "tenant": tenant,
                    "sandbox": id,
                }));
                Ok(())
            }
            Err(SandboxError::Ended { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Runs a command in `sb`; its events arrive on the receiver.
    pub async fn exec(
        self: &Arc<Self>,
        sb: &Arc<Sandbox>,
        ask: ExecAsk,
    ) -> Result<mpsc::Receiver<ExecEvent>, SandboxError> {
        sb.check_live()?;
        if ask.cmd.is_empty() || ask.cmd[0].is_empty() {
            return Err(SandboxError::Invalid("cmd needs a program".into()));
        }
        crate::protocol::scratch_path(&ask.cwd).map_err(SandboxError::Invalid)?;
        if sb.execs.fetch_add(1, Ordering::SeqCst) >= self.cfg.max_execs {
            sb.execs.fetch_sub(1, Ordering::SeqCst);
            return Err(SandboxError::Busy(format!(
                "sandbox {} already runs {} commands",
                sb.id, self.cfg.max_execs
            )));
        }
        let left = sb
            .expires_at()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let limit = ask
            .timeout_s
            .map_or(left, |s| Duration::from_secs(s).min(left))
            .max(Duration::from_millis(1));
        let (id, mut rx) = sb.conn.wait_for();
        let msg = ToInit::Exec {
            id,
            cmd: ask.cmd.clone(),
            cwd: ask.cwd.clone(),
            env: ask.env.clone(),
            stdin: ask.stdin.clone(),
            timeout_ms: limit.as_millis() as u64,
            limits: ExecLimits {
                nofile: 1024,
                cpu_s: limit.as_secs().max(1) * (sb.limits.cpus.ceil() as u64).max(1),
            },
        };
        let oom_before = sb.oom_count.as_ref().map_or(0, |c| c.read());
        if let Err(e) = sb.conn.send(&msg).await {
            sb.conn.done(id);
            sb.execs.fetch_sub(1, Ordering::SeqCst);
            return Err(SandboxError::Internal(e));
        }
        let (tx, out) = mpsc::channel(QUEUE);
        let (me, sb) = (self.clone(), sb.clone());
        tokio::spawn(async move {
            let t0 = Instant::now();
            let mut end = None;
            // whether whoever asked went away (its command is killed)
            let mut gone = false;
            while let Some(m) = rx.recv().await {
                let ev = match m {
                    FromInit::Started { pid, .. } => ExecEvent::Start { pid },
                    FromInit::Output { stream, data, .. } => ExecEvent::Output { stream, data },
                    FromInit::Exited {
                        code,
                        signal,
                        timed_out,
                        duration_ms,
                        ..
                    } => {
                        let oom = sb.oom_count.as_ref().is_some_and(|c| c.read() > oom_before);
                        let e = ExecEnd {
                            exit_code: code,
                            signal,
                            timed_out,
                            oom_killed: oom,
                            duration_ms,
                        };
                        end = Some(e.clone());
                        let _ = tx.send(ExecEvent::End(e)).await;
                        break;
                    }
                    FromInit::Failed { message, .. } => {
                        let _ = tx.send(ExecEvent::Failed(message.clone())).await;
                        me.exec_record(&sb, &ask, None, Some(&message), t0);
                        sb.conn.done(id);
                        sb.execs.fetch_sub(1, Ordering::SeqCst);
                        return;
                    }
                    _ => continue,
                };
                if !gone && tx.send(ev).await.is_err() {
                    gone = true;
                    let _ = sb.conn.send(&ToInit::Kill { id }).await;
                }
            }
            sb.conn.done(id);
            sb.execs.fetch_sub(1, Ordering::SeqCst);
            match &end {
                Some(e) => {
                    if e.timed_out {
                        me.metrics.kills.with_label_values(&["timeout"]).inc();
                    }
                    if e.oom_killed {
                        me.metrics.kills.with_label_values(&["oom"]).inc();
                    }
                    me.metrics.exec.observe(t0.elapsed().as_secs_f64());
                    me.exec_record(&sb, &ask, Some(e), None, t0);
                }
                None => {
                    let why = match sb.ended() {
                        Some(w) => format!("the sandbox ended ({})", w.as_str()),
                        None => "the sandbox's init went away".to_string(),
                    };
                    let _ = tx.send(ExecEvent::Failed(why.clone())).await;
                    me.exec_record(&sb, &ask, None, Some(&why), t0);
                }
            }
        });
        Ok(out)
    }

    fn exec_record(
        &self,
        sb: &Sandbox,
        ask: &ExecAsk,
        end: Option<&ExecEnd>,
        failed: Option<&str>,
        t0: Instant,
    ) {
        (self.record)(json!({
            "event": "sandbox.exec",
            "tenant": sb.tenant,
            "sandbox": sb.id,
            "template": sb.template,
            "isolation": sb.isolation.as_str(),
            "cmd": ask.cmd,
            "cwd": ask.cwd,
            "exit_code": end.and_then(|e| e.exit_code),
            "signal": end.and_then(|e| e.signal),
            "timed_out": end.is_some_and(|e| e.timed_out),
            "oom_killed": end.is_some_and(|e| e.oom_killed),
            "failed": failed,
            "duration_ms": t0.elapsed().as_millis() as u64,
        }));
    }

    async fn file_request(
        &self,
        sb: &Arc<Sandbox>,
        make: impl FnOnce(u64) -> ToInit,
    ) -> Result<FromInit, SandboxError> {
        sb.check_live()?;
        let (id, mut rx) = sb.conn.wait_for();
        let r = async {
            sb.conn
                .send(&make(id))
                .await
                .map_err(SandboxError::Internal)?;
            match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
                Ok(Some(FromInit::Failed { kind, message, .. })) => {
                    Err(SandboxError::Failed { kind, message })
                }
                Ok(Some(m)) => Ok(m),
                Ok(None) => {
                    sb.check_live()?;
                    Err(SandboxError::Internal(anyhow::anyhow!(
                        "the sandbox's init went away"
                    )))
                }
                Err(_) => Err(SandboxError::Internal(anyhow::anyhow!(
                    "the sandbox did not answer within 30 s"
                ))),
            }
        }
        .await;
        sb.conn.done(id);
        r
    }

    /// A file of `sb`'s scratch space.
    pub async fn read_file(&self, sb: &Arc<Sandbox>, path: &str) -> Result<Vec<u8>, SandboxError> {
        let path = crate::protocol::scratch_path(path).map_err(SandboxError::Invalid)?;
        let max_bytes = self.cfg.max_file_bytes;
        match self
            .file_request(sb, |id| ToInit::ReadFile {
                id,
                path,
                max_bytes,
            })
            .await?
        {
            FromInit::File { data, .. } => Ok(data),
            other => Err(SandboxError::Internal(anyhow::anyhow!(
                "a file read answered {other:?}"
            ))),
        }
    }

    /// A directory of `sb`'s scratch space.
    pub async fn list_files(
        &self,
        sb: &Arc<Sandbox>,
        path: &str,
    ) -> Result<Vec<crate::protocol::Entry>, SandboxError> {
        let path = crate::protocol::scratch_path(path).map_err(SandboxError::Invalid)?;
        match self
            .file_request(sb, |id| ToInit::ListFiles { id, path })
            .await?
        {
            FromInit::Listing { entries, .. } => Ok(entries),
            other => Err(SandboxError::Internal(anyhow::anyhow!(
                "a listing answered {other:?}"
            ))),
        }
    }

    /// Writes a file of `sb`'s scratch space.
    pub async fn write_file(
        &self,
        sb: &Arc<Sandbox>,
        path: &str,
        data: Vec<u8>,
    ) -> Result<(), SandboxError> {
        let path = crate::protocol::scratch_path(path).map_err(SandboxError::Invalid)?;
        if path.is_empty() {
            return Err(SandboxError::Invalid("a file needs a path".into()));
        }
        if data.len() as u64 > self.cfg.max_file_bytes {
            return Err(SandboxError::Failed {
                kind: crate::protocol::FailKind::TooLarge,
                message: format!("a file of at most {} bytes", self.cfg.max_file_bytes),
            });
        }
        self.file_request(sb, |id| ToInit::WriteFile { id, path, data })
            .await
            .map(|_| ())
    }

    /// Removes a file of `sb`'s scratch space.
    pub async fn delete_file(&self, sb: &Arc<Sandbox>, path: &str) -> Result<(), SandboxError> {
        let path = crate::protocol::scratch_path(path).map_err(SandboxError::Invalid)?;
        self.file_request(sb, |id| ToInit::DeleteFile { id, path })
            .await
            .map(|_| ())
    }

    /// Ends every sandbox and empties the pools (the node is stopping).
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let live: Vec<Arc<Sandbox>> = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for sb in live {
            self.end(&sb, Ended::Shutdown);
        }
        for p in &self.pools {
            p.ready.lock().unwrap_or_else(|e| e.into_inner()).clear();
            p.wanted.notify_one();
        }
    }
}
