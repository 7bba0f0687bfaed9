//! What this host can offer a sandbox, found out at start: a node in
//! strict mode refuses to start when a layer its tier needs is missing,
//! and says which and why; a relaxed node says so and runs anyway.

use std::path::Path;

use super::cgroup::Cgroup;
use super::{Layer, Policy, Tier};

/// The Landlock ABI a worker restricts itself with (file, TCP and scope
/// rights).
pub const LANDLOCK_ABI: u8 = 6;

/// One layer the host cannot give, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lack {
    /// The layer.
    pub layer: Layer,
    /// Why not.
    pub why: String,
}

impl std::fmt::Display for Lack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.layer, self.why)
    }
}

/// What the host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSupport {
    /// The kernel's Landlock ABI (0: none).
    pub landlock_abi: u8,
    /// Whether the node can map a worker to a uid of its own (it is root).
    pub dedicated_uid: bool,
    /// Whether user namespaces can be made.
    pub user_namespaces: bool,
    /// A cgroup could be made and limited (or why not).
    pub cgroups: Result<(), String>,
    /// `runsc --version`'s first line (or why it is not there).
    pub gvisor: Result<String, String>,
}

impl HostSupport {
    /// Finds out, trying `runsc` for the gVisor tier.
    pub fn probe(runsc: &Path) -> Self {
        Self {
            landlock_abi: landlock_abi(),
            // SAFETY: a getter without arguments.
            dedicated_uid: unsafe { libc::geteuid() } == 0,
            user_namespaces: std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
                .map_or(true, |v| v.trim() != "0"),
            cgroups: Cgroup::can_create(),
            gvisor: runsc_version(runsc),
        }
    }

    /// The layers `policy` needs that this host cannot give.
    pub fn lacks(&self, policy: &Policy) -> Vec<Lack> {
        let mut out = Vec::new();
        let mut lack = |layer, why: String| out.push(Lack { layer, why });
        let needs = |l| policy.required().contains(&l);
        if needs(Layer::UserNamespace) && !self.user_namespaces {
            lack(
                Layer::UserNamespace,
                "user namespaces are disabled (/proc/sys/user/max_user_namespaces is 0)".into(),
            );
        }
        if needs(Layer::DedicatedUid) && !self.dedicated_uid {
            lack(
                Layer::DedicatedUid,
                "the node is not root, so it cannot map a worker to a uid of its own".into(),
            );
        }
        if needs(Layer::Landlock) && self.landlock_abi < LANDLOCK_ABI {
            lack(
                Layer::Landlock,
                if self.landlock_abi == 0 {
                    "this kernel has no Landlock (or it is not enabled at boot)".into()
                } else {
                    format!(
                        "this kernel's Landlock ABI is {}; the worker's rules need {LANDLOCK_ABI}",
                        self.landlock_abi
                    )
                },
            );
        }
        if needs(Layer::Cgroup) {
            if let Err(why) = &self.cgroups {
                lack(
                    Layer::Cgroup,
                    format!("no cgroup can be made here (delegate one to the node): {why}"),
                );
            }
        }
        if policy.tier == Tier::Gvisor {
            if let Err(why) = &self.gvisor {
                lack(Layer::Gvisor, why.clone());
            }
        }
        out
    }
}

/// The kernel's Landlock ABI version (0: none).
pub fn landlock_abi() -> u8 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: landlock_create_ruleset(NULL, 0, VERSION) only returns a number.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    v.clamp(0, u8::MAX as i64) as u8
}

fn runsc_version(runsc: &Path) -> Result<String, String> {
    let out = std::process::Command::new(runsc)
        .arg("--version")
        .output()
        .map_err(|e| {
            format!(
                "{} cannot run ({e}): install gVisor (Debian: apt-get install runsc)",
                runsc.display()
            )
        })?;
    if !out.status.success() {
        return Err(format!("{} --version failed", runsc.display()));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("runsc")
        .to_string())
}
