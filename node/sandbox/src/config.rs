//! What the node's `[sandboxes]` section says: templates (a root
//! filesystem bound read-only, default and maximum limits), warm pools,
//! lifetimes, the uids sandboxes run as.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use weft_worker::sandbox::{SeccompMode, Tier};

/// How an agent sandbox is isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Tier `process`: namespaces, a dedicated uid, a new root, seccomp,
    /// Landlock, a cgroup.
    Process,
    /// Tier `gvisor`: under runsc.
    Gvisor,
}

impl Isolation {
    /// The worker-sandbox tier it is.
    pub fn tier(self) -> Tier {
        match self {
            Isolation::Process => Tier::Process,
            Isolation::Gvisor => Tier::Gvisor,
        }
    }

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Process => "process",
            Isolation::Gvisor => "gvisor",
        }
    }
}

/// Limits of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Memory (MiB) of every process in it together.
    pub memory_mb: u64,
    /// CPUs' worth of time.
    pub cpus: f64,
    /// Processes and threads.
    pub pids: u64,
    /// Scratch space (MiB): its files and `/tmp`.
    pub disk_mb: u64,
    /// Lifetime (s) from creation; `PATCH` extends it.
    pub timeout_s: u64,
}

/// A template: what a sandbox sees and may use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// Host paths bound read-only at the same place (a root filesystem:
    /// the host's `/usr` and `/lib`, or a directory a script built). A
    /// symlink is made again as one.
    #[serde(default = "default_binds")]
    pub binds: Vec<String>,
    /// What a sandbox gets unless it asks for less or more.
    #[serde(default = "default_limits")]
    pub defaults: Limits,
    /// The most a sandbox may ask for.
    #[serde(default = "max_limits")]
    pub max: Limits,
    /// Environment every command gets.
    #[serde(default = "default_env")]
    pub env: BTreeMap<String, String>,
}

fn default_binds() -> Vec<String> {
    ["/usr", "/bin", "/sbin", "/lib", "/lib64"]
        .iter()
        .filter(|p| std::path::Path::new(p).exists())
        .map(|p| p.to_string())
        .collect()
}

fn default_limits() -> Limits {
    Limits {
        memory_mb: 256,
        cpus: 1.0,
        pids: 64,
        disk_mb: 64,
        timeout_s: 600,
    }
}

fn max_limits() -> Limits {
    Limits {
        memory_mb: 4096,
        cpus: 4.0,
        pids: 1024,
        disk_mb: 4096,
        timeout_s: 24 * 3600,
    }
}

fn default_env() -> BTreeMap<String, String> {
    [
        ("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"),
        ("HOME", "/work"),
        ("TMPDIR", "/tmp"),
        ("LANG", "C.UTF-8"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

impl Default for Template {
    fn default() -> Self {
        Self {
            binds: default_binds(),
            defaults: default_limits(),
            max: max_limits(),
            env: default_env(),
        }
    }
}

/// A warm pool: sandboxes of a template and tier started in advance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    /// The template.
    pub template: String,
    /// The tier.
    pub isolation: Isolation,
    /// How many wait.
    pub size: usize,
}

/// The `[sandboxes]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// Whether the node offers `/v1/sandboxes`.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Templates by name; `default` is used when a create names none.
    #[serde(default = "default_templates")]
    pub templates: BTreeMap<String, Template>,
    /// Warm pools.
    #[serde(default = "default_pools")]
    pub pools: Vec<Pool>,
    /// First of the kernel uids sandboxes run as (each its own).
    #[serde(default = "uid_base")]
    pub uid_base: u32,
    /// How many uids from `uid_base`.
    #[serde(default = "uids")]
    pub uids: u32,
    /// Where gVisor's state and bundles go (default: a directory under the
    /// system's temporary directory).
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// `runsc`, for tier `gvisor`.
    #[serde(default = "runsc")]
    pub runsc: PathBuf,
    /// How the seccomp filter treats a denied call (`enforce`: `EPERM`;
    /// `log`: allowed and logged by the kernel).
    #[serde(default)]
    pub seccomp: SeccompMode,
    /// Most commands that may wait or run in one sandbox at once.
    #[serde(default = "max_execs")]
    pub max_execs: usize,
    /// Most bytes a file read or write moves.
    #[serde(default = "max_file_bytes")]
    pub max_file_bytes: u64,
    /// Offer sandboxes on an address other than loopback even without
    /// API keys (anyone who reaches the port may then run code).
    #[serde(default)]
    pub allow_without_keys: bool,
}

fn yes() -> bool {
    true
}

fn default_templates() -> BTreeMap<String, Template> {
    BTreeMap::from([("default".to_string(), Template::default())])
}

fn default_pools() -> Vec<Pool> {
    vec![Pool {
        template: "default".into(),
        isolation: Isolation::Process,
        size: 2,
    }]
}

fn uid_base() -> u32 {
    300_000
}

fn uids() -> u32 {
    65_536
}

fn runsc() -> PathBuf {
    PathBuf::from("runsc")
}

fn max_execs() -> usize {
    16
}

fn max_file_bytes() -> u64 {
    MAX_FILE_BYTES
}

/// The most a file request may move: its bytes go base64 in one frame of
/// at most 16 MiB between the node and the sandbox.
pub const MAX_FILE_BYTES: u64 = 8 << 20;

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            templates: default_templates(),
            pools: default_pools(),
            uid_base: uid_base(),
            uids: uids(),
            state_dir: None,
            runsc: runsc(),
            seccomp: SeccompMode::default(),
            max_execs: max_execs(),
            max_file_bytes: max_file_bytes(),
            allow_without_keys: false,
        }
    }
}

impl SandboxConfig {
    /// Checks the section: known templates in pools, limits within their
    /// maximums, a uid range that fits.
    pub fn validate(&self) -> Result<(), String> {
        for p in &self.pools {
            if !self.templates.contains_key(&p.template) {
                return Err(format!(
                    "[[sandboxes.pools]] names template {:?}, which [sandboxes.templates] does not have",
                    p.template
                ));
            }
        }
        for (name, t) in &self.templates {
            let (d, m) = (&t.defaults, &t.max);
            let over = d.memory_mb > m.memory_mb
                || d.cpus > m.cpus
                || d.pids > m.pids
                || d.disk_mb > m.disk_mb
                || d.timeout_s > m.timeout_s;
            if over {
                return Err(format!(
                    "template {name:?}: a default limit is over its maximum"
                ));
            }
            for b in &t.binds {
                if !b.starts_with('/') || b.split('/').any(|c| c == "..") {
                    return Err(format!(
                        "template {name:?}: bind {b:?} must be an absolute path without .."
                    ));
                }
                let own = ["/work", "/tmp", "/proc", "/dev"]
                    .iter()
                    .find(|o| b == *o || b.starts_with(&format!("{o}/")));
                if b == "/" || own.is_some() {
                    return Err(format!(
                        "template {name:?}: bind {b:?} would sit on the sandbox's own {} (its scratch space, /tmp, /proc and /dev are its own)",
                        own.unwrap_or(&"/")
                    ));
                }
            }
        }
        if self.uids == 0 || self.uid_base.checked_add(self.uids).is_none() {
            return Err("[sandboxes] uid_base + uids must fit in a uid".into());
        }
        if self.max_file_bytes > MAX_FILE_BYTES {
            return Err(format!(
                "[sandboxes] max_file_bytes = {}: at most {MAX_FILE_BYTES} (one frame to the sandbox)",
                self.max_file_bytes
            ));
        }
        Ok(())
    }

    /// The directory of gVisor's state and bundles (by default one per
    /// node process, which a later node removes once that process is gone).
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("weft-sandboxes-{}", std::process::id()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_template_binds_the_hosts_programs_and_no_etc() {
        let t = Template::default();
        assert!(t.binds.iter().any(|b| b == "/usr"));
        assert!(!t.binds.iter().any(|b| b.starts_with("/etc")));
    }

    #[test]
    fn a_max_file_bytes_over_a_frame_is_refused() {
        let c = SandboxConfig {
            max_file_bytes: 64 << 20,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("max_file_bytes"));
    }

    #[test]
    fn a_pool_of_an_unknown_template_is_refused() {
        let mut c = SandboxConfig::default();
        c.pools[0].template = "nope".into();
        assert!(c.validate().unwrap_err().contains("nope"));
    }

    #[test]
    fn a_default_over_its_maximum_is_refused() {
        let mut c = SandboxConfig::default();
        let t = c.templates.get_mut("default").unwrap();
        t.defaults.memory_mb = t.max.memory_mb + 1;
        assert!(c.validate().is_err());
    }

    #[test]
    fn a_bind_over_the_scratch_space_is_refused() {
        let mut c = SandboxConfig::default();
        c.templates
            .get_mut("default")
            .unwrap()
            .binds
            .push("/work".into());
        assert!(c.validate().unwrap_err().contains("/work"));
    }

    #[test]
    fn a_bind_under_the_sandboxs_tmp_is_refused() {
        let mut c = SandboxConfig::default();
        c.templates
            .get_mut("default")
            .unwrap()
            .binds
            .push("/tmp/tools".into());
        assert!(c.validate().unwrap_err().contains("/tmp"));
    }

    #[test]
    fn the_section_reads_from_its_serialized_form() {
        let c: SandboxConfig = toml_like(
            r#"{"templates": {"py": {"binds": ["/usr"], "defaults": {"memory_mb": 128, "cpus": 0.5, "pids": 32, "disk_mb": 16, "timeout_s": 60}}},
                "pools": [{"template": "py", "isolation": "gvisor", "size": 1}]}"#,
        );
        assert_eq!(c.pools[0].isolation, Isolation::Gvisor);
        assert_eq!(c.templates["py"].defaults.memory_mb, 128);
        c.validate().unwrap();
    }

    fn toml_like(json: &str) -> SandboxConfig {
        serde_json::from_str(json).unwrap()
    }
}
