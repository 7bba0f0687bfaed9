//! A worker's cgroup (v1 or v2, whichever the host has) through youki's
//! `libcgroups`: a memory limit (so an out-of-memory kill stays inside the
//! worker), a pids limit (a fork or thread bomb stops there) and a CPU
//! quota. Removing it kills whatever is left in it.

use std::path::{Path, PathBuf};

use libcgroups::common::{create_cgroup_manager, AnyCgroupManager, CgroupConfig, CgroupManager};
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources, LinuxResourcesBuilder,
};

/// The period of the CPU quota (µs).
const CPU_PERIOD_US: u64 = 100_000;
/// Where weft's cgroups live, under the controllers' roots.
pub const PARENT: &str = "weft";

/// What one sandbox may use.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Limits {
    /// Bytes of memory (and memory with swap: no swap).
    pub memory_bytes: Option<u64>,
    /// Tasks (processes and threads).
    pub pids: Option<u64>,
    /// CPUs' worth of time (a quota over a 100 ms period).
    pub cpus: Option<f64>,
}

impl Limits {
    /// The OCI resources these limits are (for a cgroup, or a gVisor
    /// bundle).
    pub fn resources(&self) -> Result<LinuxResources, String> {
        let e = |e: oci_spec::OciSpecError| e.to_string();
        let mut r = LinuxResourcesBuilder::default();
        if let Some(m) = self.memory_bytes {
            let m = m.min(i64::MAX as u64) as i64;
            r = r.memory(
                LinuxMemoryBuilder::default()
                    .limit(m)
                    .swap(m)
                    .build()
                    .map_err(e)?,
            );
        }
        if let Some(p) = self.pids {
            r = r.pids(
                LinuxPidsBuilder::default()
                    .limit(p.min(i64::MAX as u64) as i64)
                    .build()
                    .map_err(e)?,
            );
        }
        if let Some(c) = self.cpus {
            r = r.cpu(
                LinuxCpuBuilder::default()
                    .quota((c * CPU_PERIOD_US as f64).round().max(1000.0) as i64)
                    .period(CPU_PERIOD_US)
                    .build()
                    .map_err(e)?,
            );
        }
        r.build().map_err(e)
    }
}

/// A cgroup of one sandbox, removed (its tasks killed) when dropped. It is
/// made, and its limits applied, when its first process joins
/// ([`Cgroup::add`]): before that process goes on.
pub struct Cgroup {
    manager: AnyCgroupManager,
    path: PathBuf,
    limits: std::sync::Mutex<Limits>,
    resources: LinuxResources,
    applied: std::sync::Once,
}

impl std::fmt::Debug for Cgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Cgroup {
    /// A cgroup `weft/<name>` with `limits`, to be made when its first
    /// process joins.
    pub fn create(name: &str, limits: Limits) -> Result<Self, String> {
        let path = PathBuf::from(PARENT).join(name);
        let manager = create_cgroup_manager(CgroupConfig {
            cgroup_path: path.clone(),
            systemd_cgroup: false,
            container_name: name.to_string(),
        })
        .map_err(|e| format!("cgroup {}: {e}", path.display()))?;
        let resources = limits.resources()?;
        Ok(Self {
            manager,
            path,
            limits: std::sync::Mutex::new(limits),
            resources,
            applied: std::sync::Once::new(),
        })
    }

    /// Changes its limits to `limits` now (an agent sandbox taken from a
    /// warm pool gets its claim's).
    pub fn update(&self, limits: Limits) -> std::io::Result<()> {
        let resources = limits.resources().map_err(std::io::Error::other)?;
        self.manager
            .apply(&libcgroups::common::ControllerOpt {
                resources: &resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| std::io::Error::other(format!("cgroup {}: {e}", self.path.display())))?;
        *self.limits.lock().unwrap_or_else(|e| e.into_inner()) = limits;
        Ok(())
    }

    /// Puts process `pid` in it (making it, the first time) and applies
    /// its limits.
    pub fn add(&self, pid: u32) -> std::io::Result<()> {
        let err = |e: &dyn std::fmt::Display| {
            std::io::Error::other(format!("cgroup {}: {e}", self.path.display()))
        };
        self.manager
            .add_task(nix::unistd::Pid::from_raw(pid as i32))
            .map_err(|e| err(&e))?;
        let mut applied = Ok(());
        self.applied.call_once(|| {
            applied = self
                .manager
                .apply(&libcgroups::common::ControllerOpt {
                    resources: &self.resources,
                    disable_oom_killer: false,
                    oom_score_adj: None,
                    freezer_state: None,
                })
                .map_err(|e| err(&e));
        });
        applied
    }

    /// Whether a cgroup can be made here: a directory under weft's parent
    /// in every controller a sandbox is limited by (or why not).
    pub fn can_create() -> Result<(), String> {
        let root = PathBuf::from("/sys/fs/cgroup");
        let unified = root.join("cgroup.controllers").exists();
        let dirs: Vec<PathBuf> = if unified {
            vec![root.join(PARENT)]
        } else {
            ["memory", "pids", "cpu"]
                .iter()
                .map(|c| root.join(c).join(PARENT))
                .collect()
        };
        for d in dirs {
            let probe = d.join(format!("probe-{}", std::process::id()));
            std::fs::create_dir_all(&probe).map_err(|e| format!("{}: {e}", probe.display()))?;
            let _ = std::fs::remove_dir(&probe);
        }
        Ok(())
    }

    /// Its path and limits, for reports.
    pub fn describe(&self) -> String {
        let l = *self.limits.lock().unwrap_or_else(|e| e.into_inner());
        let mut parts = vec![self.path.display().to_string()];
        if let Some(m) = l.memory_bytes {
            parts.push(format!("memory {} MiB", m >> 20));
        }
        if let Some(p) = l.pids {
            parts.push(format!("pids {p}"));
        }
        if let Some(c) = l.cpus {
            parts.push(format!("cpus {c}"));
        }
        parts.join(", ")
    }

    /// Whether the kernel killed a task of it for lack of memory (v1:
    /// `memory.oom_control`'s `oom_kill`; v2: `memory.events`).
    pub fn oom_killed(&self) -> bool {
        self.oom_kills() > 0
    }

    /// Where the host counts its CPU throttling.
    pub fn cpu_throttled(&self) -> CgroupCounter {
        CgroupCounter::cpu_throttled(&self.path)
    }

    /// How many tasks of it the kernel killed for lack of memory.
    pub fn oom_kills(&self) -> u64 {
        self.oom_count().read()
    }

    /// Where the host counts its OOM kills (readable without holding it).
    pub fn oom_count(&self) -> CgroupCounter {
        CgroupCounter::oom_kills(&self.path)
    }
}

/// One counter the kernel keeps of a cgroup, as the host reads it (v1 in
/// the controller's hierarchy, or v2), without holding the cgroup: what a
/// gVisor sandbox, whose clocks inside are its own, cannot virtualize.
#[derive(Clone, Debug)]
pub struct CgroupCounter {
    /// The file in each hierarchy.
    paths: [PathBuf; 2],
    /// The line's key in it.
    key: &'static str,
}

impl CgroupCounter {
    fn new(path: &Path, v1: &str, v1_file: &str, v2_file: &str, key: &'static str) -> Self {
        let rel = path.strip_prefix("/").unwrap_or(path);
        Self {
            paths: [
                PathBuf::from("/sys/fs/cgroup")
                    .join(v1)
                    .join(rel)
                    .join(v1_file),
                PathBuf::from("/sys/fs/cgroup").join(rel).join(v2_file),
            ],
            key,
        }
    }

    /// The periods cgroup `path` (relative to the hierarchy's root) was
    /// throttled in for running past its CPU quota (`cpu.stat`'s
    /// `nr_throttled`).
    pub fn cpu_throttled(path: &Path) -> Self {
        Self::new(path, "cpu", "cpu.stat", "cpu.stat", "nr_throttled")
    }

    /// The tasks of cgroup `path` the kernel killed for lack of memory
    /// (v1: `memory.oom_control`'s `oom_kill`; v2: `memory.events`).
    pub fn oom_kills(path: &Path) -> Self {
        Self::new(
            path,
            "memory",
            "memory.oom_control",
            "memory.events",
            "oom_kill",
        )
    }

    /// Its value now; 0 when the cgroup is gone.
    pub fn read(&self) -> u64 {
        self.paths
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .flat_map(|t| {
                t.lines()
                    .filter_map(|l| {
                        let (k, v) = l.split_once(' ')?;
                        (k == self.key).then(|| v.trim().parse::<u64>().ok())?
                    })
                    .collect::<Vec<_>>()
            })
            .max()
            .unwrap_or(0)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = self.manager.remove() {
            tracing::warn!(cgroup = %self.path.display(), "removing the cgroup: {e}");
        }
    }
}

/// Removes the cgroups of weft processes that are gone (a node killed
/// with SIGKILL leaves its workers' cgroups behind): each `weft/<kind>-<pid>-…`
/// whose pid no longer runs, after killing anything still in it.
pub fn remove_stale() {
    let root = PathBuf::from("/sys/fs/cgroup");
    let parents: Vec<PathBuf> = if root.join("cgroup.controllers").exists() {
        vec![root.join(PARENT)]
    } else {
        std::fs::read_dir(&root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join(PARENT))
            .filter(|p| p.is_dir())
            .collect()
    };
    for parent in parents {
        for e in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let owner = name.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
            let Some(owner) = owner else { continue };
            if Path::new(&format!("/proc/{owner}")).exists() {
                continue;
            }
            let procs = e.path().join("cgroup.procs");
            for pid in std::fs::read_to_string(&procs)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = std::fs::remove_dir(e.path());
        }
    }
}
