//! The worker sandbox. A worker parses untrusted input (model files,
//! prompts); whatever it does, it must not reach the host, the node or
//! another tenant. Two tiers:
//!
//! - **`process`**: the node forks the worker into new user, mount, PID,
//!   network, IPC, UTS and cgroup namespaces, maps it to a uid and gid of
//!   its own from a configured range (the kernel checks files against that
//!   uid, so the worker owns nothing on the host, whatever the node runs
//!   as), clears its supplementary groups, puts it in a cgroup of its own
//!   (memory, pids, CPU) and sets its rlimits ([`launch`]). After `exec`
//!   the worker builds a root of its own (a read-only tmpfs with only
//!   `/dev/null`, `/dev/zero` and `/dev/urandom`, entered with
//!   `pivot_root`, the old root detached: no host `/proc`, `/sys` or files),
//!   drops every capability, restricts itself with Landlock (no file, TCP,
//!   abstract-socket or signal access beyond it), and once its model is
//!   loaded installs a seccomp allow-list ([`jail`], [`seccomp`]). The model
//!   file reaches it as an open, read-only descriptor.
//! - **`gvisor`**: the same worker under gVisor (`runsc`, on a platform
//!   that needs no KVM): the node writes an OCI bundle whose root holds only the
//!   executable, its libraries and the model, read-only, and talks to the
//!   worker over its stdio ([`gvisor`]). The worker's own seccomp filter
//!   applies inside gVisor too.
//!
//! The worker reports its confinement as it sees it; the node adds what
//! the host sees of it (its kernel uid and gid, seccomp mode, capabilities,
//! `no_new_privs`, from `/proc/<pid>/status`) and refuses a worker below the
//! configured [`Policy`], naming the missing [`Layer`]. With a relaxed
//! policy the worker runs anyway and the missing layers are reported.
//! [`HostSupport`] says at start what this host can offer.
//!
//! `unsafe` here is the syscalls themselves, each block with its `SAFETY:`
//! line; the filters are data, each rule with its reason.
#![allow(unsafe_code)]

pub mod cgroup;
pub mod gvisor;
pub mod host;
pub mod jail;
pub mod launch;
pub mod probe;
pub mod seccomp;

use serde::{Deserialize, Serialize};

pub use host::HostSupport;

/// The file descriptor on which a worker finds its socket to the node.
pub const WORKER_FD: i32 = 3;
/// The file descriptor on which a sandboxed worker finds its model file,
/// open read-only.
pub const MODEL_FD: i32 = 4;
/// Environment variable carrying the worker's [`Plan`] (JSON).
pub const PLAN_ENV: &str = "WEFT_SANDBOX_PLAN";

/// How strongly workers are confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Not at all: a plain child process of the node.
    Off,
    /// Namespaces, a dedicated uid, a new root, seccomp, Landlock, cgroups.
    #[default]
    Process,
    /// The process tier's worker under gVisor.
    Gvisor,
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::Off => "off",
            Tier::Process => "process",
            Tier::Gvisor => "gvisor",
        })
    }
}

/// What the node requires of its workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// The tier.
    pub tier: Tier,
    /// A worker missing a layer of its tier is refused (`true`) or runs
    /// and is reported (`false`, `sandbox = "relaxed"`).
    pub strict: bool,
}

impl Policy {
    /// The layers a worker of this policy's tier must have.
    pub fn required(&self) -> &'static [Layer] {
        match self.tier {
            Tier::Off => &[],
            Tier::Process => &[
                Layer::UserNamespace,
                Layer::DedicatedUid,
                Layer::NewRoot,
                Layer::PidNamespace,
                Layer::NetworkNamespace,
                Layer::NoNewPrivs,
                Layer::NoCapabilities,
                Layer::Seccomp,
                Layer::Landlock,
                Layer::Cgroup,
            ],
            Tier::Gvisor => &[
                Layer::Gvisor,
                Layer::DedicatedUid,
                Layer::NoNewPrivs,
                Layer::NoCapabilities,
                Layer::Seccomp,
            ],
        }
    }

    /// The layers of this policy that `c` lacks.
    pub fn missing(&self, c: &Confinement) -> Vec<Layer> {
        self.required()
            .iter()
            .copied()
            .filter(|l| !c.has(*l))
            .collect()
    }
}

/// One layer of a worker's confinement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    /// A user namespace of its own.
    UserNamespace,
    /// A kernel uid and gid of its own, from the configured range.
    DedicatedUid,
    /// A root of its own (tmpfs, `pivot_root`, the host's detached).
    NewRoot,
    /// A PID namespace (it sees no host process).
    PidNamespace,
    /// A network namespace with no interface up.
    NetworkNamespace,
    /// `no_new_privs`.
    NoNewPrivs,
    /// No capabilities, and an empty bounding set.
    NoCapabilities,
    /// The seccomp allow-list, enforcing.
    Seccomp,
    /// Landlock, fully enforced.
    Landlock,
    /// A cgroup of its own with memory, pids and CPU limits.
    Cgroup,
    /// Running under gVisor.
    Gvisor,
}

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layer::UserNamespace => "a user namespace",
            Layer::DedicatedUid => "a dedicated uid and gid",
            Layer::NewRoot => "a root of its own",
            Layer::PidNamespace => "a PID namespace",
            Layer::NetworkNamespace => "a network namespace",
            Layer::NoNewPrivs => "no_new_privs",
            Layer::NoCapabilities => "an empty capability set",
            Layer::Seccomp => "the seccomp filter",
            Layer::Landlock => "Landlock, fully enforced",
            Layer::Cgroup => "a cgroup with memory, pids and CPU limits",
            Layer::Gvisor => "gVisor",
        })
    }
}

/// How the seccomp filter treats a syscall outside its allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// The process is killed (SIGSYS).
    #[default]
    Enforce,
    /// The call is allowed and logged by the kernel (for finding a missing
    /// syscall: `dmesg`, or run the worker under `strace -f`).
    Log,
}

/// What a sandboxed worker is told to do to itself after `exec` (the node
/// passes it in [`PLAN_ENV`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Its tier.
    pub tier: Tier,
    /// Whether to build a root of its own (the process tier; gVisor's
    /// container root is already its own).
    pub new_root: bool,
    /// Host devices bound into the new root, read-write for `/dev/null`
    /// only.
    pub devices: Vec<String>,
    /// The seccomp filter's treatment of a syscall outside the list.
    pub seccomp: SeccompMode,
    /// Host paths bound read-only at the same place (an agent sandbox's
    /// template; a worker has none).
    #[serde(default)]
    pub binds: Vec<String>,
    /// Whether the new root gets a `/proc` of the sandbox's own PID
    /// namespace (agent sandboxes).
    #[serde(default)]
    pub proc: bool,
    /// Whether the worker may go on without a layer the kernel refuses
    /// (`sandbox = "relaxed"`), reporting it missing; a strict worker stops
    /// before it reads a byte of its model.
    #[serde(default)]
    pub relaxed: bool,
}

/// A worker's confinement: what it saw of itself, and what the host saw
/// of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confinement {
    /// Its tier.
    #[serde(default)]
    pub tier: Tier,
    /// Its PID as it sees it (1 inside a PID namespace).
    pub pid: u32,
    /// Its uid as the host sees it (the worker's own view, where the host
    /// has none).
    pub uid: u32,
    /// Its gid as the host sees it.
    #[serde(default)]
    pub gid: u32,
    /// Whether `no_new_privs` is set.
    pub no_new_privs: bool,
    /// The layers it holds.
    #[serde(default)]
    pub layers: Vec<Layer>,
    /// The Landlock ABI it restricted itself with (0: none).
    #[serde(default)]
    pub landlock_abi: u8,
    /// Its cgroup and limits, as the node set them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Layers the policy asks for that it lacks (a relaxed policy runs it
    /// anyway).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<Layer>,
    /// Whether the policy is relaxed (a missing layer is reported, not
    /// refused).
    #[serde(default)]
    pub relaxed: bool,
}

impl Confinement {
    /// Whether it holds `layer`.
    pub fn has(&self, layer: Layer) -> bool {
        self.layers.contains(&layer)
    }

    /// Records `layer` as held.
    pub fn hold(&mut self, layer: Layer) {
        if !self.has(layer) {
            self.layers.push(layer);
            self.layers.sort();
        }
    }

    /// Records `layer` as not held (the host saw otherwise).
    pub fn lose(&mut self, layer: Layer) {
        self.layers.retain(|l| *l != layer);
    }
}

/// What a process can observe of itself (the worker's half of its
/// [`Confinement`]).
pub fn observe_self() -> Confinement {
    // SAFETY: getters without arguments or with integer arguments.
    let (pid, uid, gid, nnp) = unsafe {
        (
            libc::getpid() as u32,
            libc::getuid(),
            libc::getgid(),
            libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1,
        )
    };
    let mut c = Confinement {
        pid,
        uid,
        gid,
        no_new_privs: nnp,
        ..Confinement::default()
    };
    if nnp {
        c.hold(Layer::NoNewPrivs);
    }
    c
}

/// What the host sees of process `pid`, from `/proc/<pid>/status`: its
/// kernel uid and gid, `no_new_privs`, seccomp mode, and whether it holds
/// any capability (effective, permitted or in its bounding set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostView {
    /// Real uid.
    pub uid: u32,
    /// Real gid.
    pub gid: u32,
    /// Supplementary groups, if any.
    pub groups: usize,
    /// `NoNewPrivs: 1`.
    pub no_new_privs: bool,
    /// `Seccomp: 2` (filter mode).
    pub seccomp_filter: bool,
    /// `CapEff`, `CapPrm` and `CapBnd` all zero.
    pub no_capabilities: bool,
}

impl HostView {
    /// Reads process `pid`'s status.
    pub fn of(pid: u32) -> std::io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string(format!(
            "/proc/{pid}/status"
        ))?))
    }

    /// Parses a `/proc/<pid>/status` text.
    pub fn parse(status: &str) -> Self {
        let field = |name: &str| -> &str {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or("")
        };
        let first = |name: &str| -> u32 {
            field(name)
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(u32::MAX)
        };
        let zero_caps = ["CapEff:", "CapPrm:", "CapBnd:"]
            .iter()
            .all(|k| u64::from_str_radix(field(k), 16) == Ok(0));
        Self {
            uid: first("Uid:"),
            gid: first("Gid:"),
            groups: field("Groups:").split_whitespace().count(),
            no_new_privs: field("NoNewPrivs:") == "1",
            seccomp_filter: field("Seccomp:") == "2",
            no_capabilities: zero_caps,
        }
    }

    /// Corrects `c` with what the host sees: the host's uid and gid, and
    /// the layers the host view confirms or refutes.
    pub fn apply(&self, c: &mut Confinement, uid_range: std::ops::Range<u32>) {
        c.uid = self.uid;
        c.gid = self.gid;
        c.no_new_privs = self.no_new_privs;
        let dedicated =
            uid_range.contains(&self.uid) && uid_range.contains(&self.gid) && self.groups == 0;
        for (layer, held) in [
            (Layer::DedicatedUid, dedicated),
            (Layer::NoNewPrivs, self.no_new_privs),
            (Layer::Seccomp, self.seccomp_filter && c.has(Layer::Seccomp)),
            (Layer::NoCapabilities, self.no_capabilities),
        ] {
            if held {
                c.hold(layer);
            } else {
                c.lose(layer);
            }
        }
    }
}

/// The host pid of `parent`'s first child, if it has one (the engine
/// process of a worker in its own PID namespace is the waiter's child).
pub fn child_of(parent: u32) -> Option<u32> {
    let dir = std::fs::read_dir("/proc").ok()?;
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // the fields after the command (which may hold spaces) in parentheses
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if rest.split_whitespace().nth(1) == Some(&parent.to_string()) {
            return Some(pid);
        }
    }
    None
}

fn check(ret: libc::c_int, what: &'static str) -> std::io::Result<()> {
    if ret == -1 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tweft\nUid:\t200001\t200001\t200001\t200001\nGid:\t200001\t200001\t200001\t200001\nGroups:\t\nCapEff:\t0000000000000000\nCapPrm:\t0000000000000000\nCapBnd:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\n";

    #[test]
    fn the_host_view_confirms_a_dedicated_uid_seccomp_and_no_capabilities() {
        let mut c = Confinement::default();
        c.hold(Layer::Seccomp);
        HostView::parse(STATUS).apply(&mut c, 200_000..265_536);
        assert_eq!((c.uid, c.gid), (200_001, 200_001));
        for l in [
            Layer::DedicatedUid,
            Layer::Seccomp,
            Layer::NoCapabilities,
            Layer::NoNewPrivs,
        ] {
            assert!(c.has(l), "{l:?} in {c:?}");
        }
    }

    #[test]
    fn the_host_view_refutes_a_worker_that_claims_more_than_it_has() {
        let mut c = Confinement::default();
        for l in [Layer::Seccomp, Layer::NoCapabilities, Layer::DedicatedUid] {
            c.hold(l);
        }
        let root = STATUS
            .replace("200001", "0")
            .replace("Seccomp:\t2", "Seccomp:\t0")
            .replace("CapEff:\t0000000000000000", "CapEff:\t000001ffffffffff");
        HostView::parse(&root).apply(&mut c, 200_000..265_536);
        assert!(
            !c.has(Layer::DedicatedUid) && !c.has(Layer::Seccomp) && !c.has(Layer::NoCapabilities)
        );
    }

    #[test]
    fn a_strict_policy_names_what_a_worker_lacks() {
        let p = Policy {
            tier: Tier::Process,
            strict: true,
        };
        let mut c = Confinement::default();
        for l in p.required() {
            c.hold(*l);
        }
        assert!(p.missing(&c).is_empty());
        c.lose(Layer::Landlock);
        assert_eq!(p.missing(&c), vec![Layer::Landlock]);
    }

    #[test]
    fn supplementary_groups_are_not_a_dedicated_identity() {
        let mut c = Confinement::default();
        HostView::parse(&STATUS.replace("Groups:\t\n", "Groups:\t0\n"))
            .apply(&mut c, 200_000..265_536);
        assert!(!c.has(Layer::DedicatedUid));
    }
}
