//! Node configuration: defaults, a TOML file, `WEFT_*` environment overrides and
//! command-line flags (in that order of precedence, flags last), validated at
//! start with messages that name the offending setting.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use weft_api::{ApiConfig, ApiKeys, KeyMap, TenantLimits};
use weft_worker::sandbox::cgroup::Limits;
use weft_worker::sandbox::launch::Rlimits;
use weft_worker::sandbox::{Policy, SeccompMode, Tier};
use weft_worker::{ChainLink, SandboxSpec, WorkerSpec};

/// Default listen address.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8080";
/// Default KV pool budget.
pub const DEFAULT_KV_BUDGET: usize = 1 << 30;
/// Default longest sequence (prompt + output).
pub const DEFAULT_MAX_CONTEXT: usize = 8192;
/// Default largest request body.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;
/// Default largest `max_tokens` a request may ask for.
pub const DEFAULT_MAX_TOKENS_LIMIT: usize = 4096;
/// Default `max_tokens` when a request names none.
pub const DEFAULT_MAX_TOKENS: usize = 256;
/// Default cap on open connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default requests waiting in the worker beyond which standard requests are refused.
pub const DEFAULT_MAX_QUEUE: usize = 256;
/// Default most sequences the worker runs at once.
pub const DEFAULT_MAX_RUNNING: usize = 64;
/// Default seconds allowed to read a request's headers and body.
pub const DEFAULT_READ_TIMEOUT_S: u64 = 30;
/// Default seconds in-flight requests get to finish on shutdown.
pub const DEFAULT_GRACE_S: u64 = 30;
/// Default first kernel uid dedicated to sandboxed workers.
pub const DEFAULT_SANDBOX_UID_BASE: u32 = 200_000;
/// Default most bytes an intent log keeps.
pub const DEFAULT_INTENT_LOG_MAX_BYTES: u64 = 1 << 30;
/// Default seconds between signed intent-log checkpoints.
pub const DEFAULT_INTENT_CHECKPOINT_S: u64 = 60;
/// Default `weft up` decode capacity the router predicts from (tokens/s).
pub const DEFAULT_TOKENS_PER_S: f64 = 200.0;
/// Default number of uids sandboxed workers draw from.
pub const DEFAULT_SANDBOX_UIDS: u32 = 65_536;
/// Default memory a worker may use beyond its model and KV budget.
pub const DEFAULT_SANDBOX_MEMORY_MARGIN: u64 = 512 << 20;
/// Default tasks a worker may have.
pub const DEFAULT_SANDBOX_PIDS: u64 = 256;

/// How workers are sandboxed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sandbox {
    /// Not at all.
    Off,
    /// Tier process, strict: a worker missing a layer is refused.
    Process,
    /// Tier gvisor, strict.
    Gvisor,
    /// Tier process, running without the layers the host cannot give.
    Relaxed,
}

impl Sandbox {
    /// Parses `off`, `process`, `gvisor`, `relaxed` (or `true` / `false`).
    pub fn parse(v: &str) -> Option<Self> {
        Some(match v.trim() {
            "off" | "false" | "0" | "no" => Sandbox::Off,
            "process" | "true" | "1" | "yes" | "on" => Sandbox::Process,
            "gvisor" => Sandbox::Gvisor,
            "relaxed" => Sandbox::Relaxed,
            _ => return None,
        })
    }

    /// The policy workers are held to.
    pub fn policy(self) -> Policy {
        let (tier, strict) = match self {
            Sandbox::Off => (Tier::Off, false),
            Sandbox::Process => (Tier::Process, true),
            Sandbox::Gvisor => (Tier::Gvisor, true),
            Sandbox::Relaxed => (Tier::Process, false),
        };
        Policy { tier, strict }
    }
}

impl<'de> Deserialize<'de> for Sandbox {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(Sandbox::Process),
            Raw::Bool(false) => Ok(Sandbox::Off),
            Raw::Text(t) => Sandbox::parse(&t).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "sandbox = {t:?}: use \"process\", \"gvisor\", \"relaxed\" or \"off\""
                ))
            }),
        }
    }
}

/// Everything a node is configured with.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Listen address.
    pub addr: String,
    /// Model source (path, known name, `hf:...`).
    pub model: String,
    /// CPU threads for the worker (0: all cores).
    pub threads: usize,
    /// Where the worker runs the model: `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Bytes of GPU memory the worker may take (weights, KV cache,
    /// buffers); 0: 90% of what is free.
    pub gpu_memory_budget: usize,
    /// KV pool budget in bytes.
    pub kv_budget: usize,
    /// Longest sequence.
    pub max_context: usize,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
    /// `max_tokens` when a request names none.
    pub default_max_tokens: usize,
    /// Cap on open connections.
    pub max_connections: usize,
    /// Waiting requests beyond which standard requests are refused (sheddable at half of it).
    pub max_queue: usize,
    /// Most sequences the worker runs at once (the rest wait, critical first).
    pub max_running: usize,
    /// Seconds to read a request's headers and body.
    pub read_timeout_s: u64,
    /// Seconds in-flight requests get to finish on shutdown.
    pub grace_s: u64,
    /// How workers are sandboxed: `"process"` (the default; `true`),
    /// `"gvisor"`, `"relaxed"` (tier process, running without the layers
    /// this host cannot give, and saying so), or `"off"` (`false`).
    pub sandbox: Sandbox,
    /// The first kernel uid (and gid) dedicated to sandboxed workers.
    pub sandbox_uid_base: u32,
    /// How many uids from `sandbox_uid_base` workers draw from.
    pub sandbox_uids: u32,
    /// Memory a worker may use beyond its model file and KV budget
    /// (bytes): its cgroup's limit is their sum.
    pub sandbox_memory_margin: u64,
    /// Tasks (processes and threads) a worker may have.
    pub sandbox_pids: u64,
    /// CPUs' worth of time a worker may use (0: its `threads`, or every
    /// core when that is 0).
    pub sandbox_cpus: f64,
    /// What the worker's seccomp filter does with a syscall outside its
    /// list: `"enforce"` (kill) or `"log"` (allow and log: for finding a
    /// missing syscall; a strict sandbox refuses such a worker).
    pub sandbox_seccomp: SeccompMode,
    /// The gVisor runtime (tier `gvisor`).
    pub runsc: PathBuf,
    /// `text` or `json` logs.
    pub log_format: String,
    /// API keys and the tenant each belongs to; empty: no authentication.
    /// (Never printed: its `Debug` is redacted.)
    pub api_keys: KeyMap,
    /// Limits per tenant name; `default` applies to tenants not listed.
    pub tenants: BTreeMap<String, TenantLimits>,
    /// A file of more API keys and tenants (`[api_keys]`, `[tenants.*]`,
    /// as here), put over these ones; the node reloads it when it
    /// changes, without a restart (the Kubernetes operator writes it from
    /// AgentPolicies). A missing file adds nothing; a broken one is
    /// refused and the keys in force stay.
    pub tenants_file: Option<PathBuf>,
    /// Directory of the intent log (every admission decision, hash-chained);
    /// unset: `weft up` keeps it in its state directory, if it has one.
    pub intent_log: Option<PathBuf>,
    /// Size at which an intent-log file is closed and the next begun.
    pub intent_log_file_bytes: u64,
    /// Most bytes the intent log keeps (0: no limit): the oldest files go
    /// first, and a signed boundary keeps what remains verifiable.
    pub intent_log_max_bytes: u64,
    /// Oldest an intent-log file may get, in seconds since its last line
    /// (0: no limit).
    pub intent_log_max_age_s: u64,
    /// Seconds between signed checkpoints of the intent log (committed to
    /// the coordinators; `weft up`'s embedded one).
    pub intent_checkpoint_s: u64,
    /// `weft up`: the price of a token served here, which the router
    /// weighs against a request's `max_cost` (a cluster node's is its
    /// `[node]` one).
    pub cost_per_token: f64,
    /// `weft up`: the aggregate decode rate at full batch (tokens/s) the
    /// router predicts latency from (a cluster node's is its `[node]` one).
    pub tokens_per_s: f64,
    /// Cluster nodes: where peers' forwarded requests arrive (UDP, QUIC);
    /// unset: the node's cluster address, unless it is a coordinator (whose
    /// cluster address carries Raft), then none.
    pub data_addr: Option<SocketAddr>,
    /// Agent sandboxes (`/v1/sandboxes`): templates, warm pools, uids.
    pub sandboxes: weft_sandbox::SandboxConfig,
    /// Keep the KV blocks of prompts (and answers) after their request
    /// ends and map them into later requests with the same prefix, so an
    /// agent's next turn computes only what it added.
    pub prefix_cache: bool,
    /// Prompt prefixes (texts: a system prompt or tool definitions every
    /// tenant sends) whose cached blocks every tenant may share; other
    /// cached blocks serve only the tenant that computed them.
    pub shared_prefixes: Vec<String>,
    /// Cluster nodes: let the router count the prefill a node saves by
    /// holding a request's prefix (off: it routes by load and distance
    /// alone).
    pub prefix_routing: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            addr: DEFAULT_ADDR.into(),
            model: "default".into(),
            threads: 0,
            device: "cpu".into(),
            gpu_memory_budget: 0,
            kv_budget: DEFAULT_KV_BUDGET,
            max_context: DEFAULT_MAX_CONTEXT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_tokens_limit: DEFAULT_MAX_TOKENS_LIMIT,
            default_max_tokens: DEFAULT_MAX_TOKENS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_queue: DEFAULT_MAX_QUEUE,
            max_running: DEFAULT_MAX_RUNNING,
            read_timeout_s: DEFAULT_READ_TIMEOUT_S,
            grace_s: DEFAULT_GRACE_S,
            sandbox: Sandbox::Process,
            sandbox_uid_base: DEFAULT_SANDBOX_UID_BASE,
            sandbox_uids: DEFAULT_SANDBOX_UIDS,
            sandbox_memory_margin: DEFAULT_SANDBOX_MEMORY_MARGIN,
            sandbox_pids: DEFAULT_SANDBOX_PIDS,
            sandbox_cpus: 0.0,
            sandbox_seccomp: SeccompMode::Enforce,
            runsc: PathBuf::from("runsc"),
            log_format: "text".into(),
            api_keys: KeyMap::default(),
            tenants: BTreeMap::new(),
            tenants_file: None,
            intent_log: None,
            intent_log_file_bytes: weft_audit::DEFAULT_MAX_FILE_BYTES,
            intent_log_max_bytes: DEFAULT_INTENT_LOG_MAX_BYTES,
            intent_log_max_age_s: 0,
            intent_checkpoint_s: DEFAULT_INTENT_CHECKPOINT_S,
            cost_per_token: 0.0,
            tokens_per_s: DEFAULT_TOKENS_PER_S,
            prefix_cache: true,
            shared_prefixes: Vec::new(),
            prefix_routing: true,
            data_addr: None,
            sandboxes: weft_sandbox::SandboxConfig::default(),
        }
    }
}

/// A configuration problem, naming the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for a node config.
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A setting has a bad value.
    #[error("invalid setting {key}: {message}")]
    Invalid { key: String, message: String },
}

/// Reads environment variables (a trait so tests need not touch the real environment).
pub trait Env {
    /// The value of `key`, if set.
    fn var(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).cloned()
    }
}

fn parse_num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, ConfigError> {
    v.trim().parse().map_err(|_| ConfigError::Invalid {
        key: key.into(),
        message: format!("{v:?} is not a valid number"),
    })
}

impl NodeConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })
    }

    /// Applies `WEFT_*` overrides.
    pub fn apply_env(&mut self, env: &dyn Env) -> Result<(), ConfigError> {
        if let Some(v) = env.var("WEFT_ADDR") {
            self.addr = v;
        }
        if let Some(v) = env.var("WEFT_MODEL") {
            self.model = v;
        }
        if let Some(v) = env.var("WEFT_THREADS") {
            self.threads = parse_num("WEFT_THREADS", &v)?;
        }
        if let Some(v) = env.var("WEFT_DEVICE") {
            self.device = v;
        }
        if let Some(v) = env.var("WEFT_GPU_MEMORY_BUDGET") {
            self.gpu_memory_budget = parse_num("WEFT_GPU_MEMORY_BUDGET", &v)?;
        }
        if let Some(v) = env.var("WEFT_KV_BUDGET") {
            self.kv_budget = parse_num("WEFT_KV_BUDGET", &v)?;
        }
        if let Some(v) = env.var("WEFT_MAX_CONTEXT") {
            self.max_context = parse_num("WEFT_MAX_CONTEXT", &v)?;
        }
        if let Some(v) = env.var("WEFT_MAX_QUEUE") {
            self.max_queue = parse_num("WEFT_MAX_QUEUE", &v)?;
        }
        if let Some(v) = env.var("WEFT_SANDBOX") {
            self.sandbox = Sandbox::parse(&v).ok_or_else(|| ConfigError::Invalid {
                key: "WEFT_SANDBOX".into(),
                message: format!("{v:?} is not process, gvisor, relaxed or off"),
            })?;
        }
        if let Some(v) = env.var("WEFT_SANDBOX_SECCOMP") {
            self.sandbox_seccomp = match v.trim() {
                "enforce" => SeccompMode::Enforce,
                "log" => SeccompMode::Log,
                _ => {
                    return Err(ConfigError::Invalid {
                        key: "WEFT_SANDBOX_SECCOMP".into(),
                        message: format!("{v:?} is not enforce or log"),
                    })
                }
            };
        }
        if let Some(v) = env.var("WEFT_LOG_FORMAT") {
            self.log_format = v;
        }
        if let Some(v) = env.var("WEFT_GRACE_S") {
            self.grace_s = parse_num("WEFT_GRACE_S", &v)?;
        }
        Ok(())
    }

    /// Checks every setting; returns the listen address.
    pub fn validate(&self) -> Result<SocketAddr, ConfigError> {
        let bad = |key: &str, message: String| {
            Err(ConfigError::Invalid {
                key: key.into(),
                message,
            })
        };
        let addr: SocketAddr = match self.addr.parse() {
            Ok(a) => a,
            Err(_) => {
                return bad(
                    "addr",
                    format!(
                        "{:?} is not HOST:PORT (for example 127.0.0.1:8080)",
                        self.addr
                    ),
                )
            }
        };
        if self.intent_log_max_bytes > 0 && self.intent_log_max_bytes < self.intent_log_file_bytes {
            return bad(
                "intent_log_max_bytes",
                format!(
                    "{} is less than one file ({} bytes, intent_log_file_bytes): the log would keep nothing closed",
                    self.intent_log_max_bytes, self.intent_log_file_bytes
                ),
            );
        }
        if self.intent_checkpoint_s == 0 {
            return bad(
                "intent_checkpoint_s",
                "must be at least 1 (seconds between signed checkpoints)".into(),
            );
        }
        if !(self.cost_per_token.is_finite() && self.cost_per_token >= 0.0) {
            return bad(
                "cost_per_token",
                format!("{} is not a price (a number >= 0)", self.cost_per_token),
            );
        }
        if !(self.tokens_per_s.is_finite() && self.tokens_per_s > 0.0) {
            return bad(
                "tokens_per_s",
                format!("{} is not a rate (a number > 0)", self.tokens_per_s),
            );
        }
        if self.kv_budget < 1 << 20 {
            return bad(
                "kv_budget",
                format!("{} bytes is too small (at least 1 MiB)", self.kv_budget),
            );
        }
        if self.max_context < 16 {
            return bad(
                "max_context",
                format!("{} is too small (at least 16)", self.max_context),
            );
        }
        if self.max_body_bytes < 1024 {
            return bad(
                "max_body_bytes",
                format!("{} is too small (at least 1024)", self.max_body_bytes),
            );
        }
        if self.max_tokens_limit == 0 || self.default_max_tokens == 0 {
            return bad("max_tokens_limit", "must be at least 1".into());
        }
        if self.default_max_tokens > self.max_tokens_limit {
            return bad(
                "default_max_tokens",
                format!(
                    "{} exceeds max_tokens_limit {}",
                    self.default_max_tokens, self.max_tokens_limit
                ),
            );
        }
        if self.max_connections == 0 || self.max_queue == 0 || self.max_running == 0 {
            return bad(
                "max_connections",
                "max_connections, max_queue and max_running must be at least 1".into(),
            );
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return bad(
                "log_format",
                format!("{:?} is not text or json", self.log_format),
            );
        }
        for (key, tenant) in &self.api_keys.0 {
            if key.len() < 8 || tenant.is_empty() {
                return bad(
                    "api_keys",
                    "keys need at least 8 characters and a tenant name".into(),
                );
            }
        }
        match self.device.parse::<weft_kernels::Backend>() {
            Err(e) => return bad("device", e.to_string()),
            Ok(weft_kernels::Backend::Cuda(_)) if self.sandbox != Sandbox::Off => {
                return bad(
                    "device",
                    "the worker sandbox does not let the CUDA driver through yet; set sandbox = false to run on a GPU".into(),
                )
            }
            Ok(_) => {}
        }
        if self.sandbox_uids == 0
            || self
                .sandbox_uid_base
                .checked_add(self.sandbox_uids)
                .is_none()
        {
            return bad(
                "sandbox_uids",
                format!(
                    "{} uids from {} is not a range of kernel uids",
                    self.sandbox_uids, self.sandbox_uid_base
                ),
            );
        }
        if self.sandbox_pids < 16 {
            return bad(
                "sandbox_pids",
                format!(
                    "{} is too few for a worker's threads (at least 16)",
                    self.sandbox_pids
                ),
            );
        }
        if !(self.sandbox_cpus >= 0.0 && self.sandbox_cpus.is_finite()) {
            return bad(
                "sandbox_cpus",
                format!("{} is not a number of CPUs", self.sandbox_cpus),
            );
        }
        for (name, l) in &self.tenants {
            if let Some(v) = l.kv_share.filter(|v| !(*v > 0.0 && *v <= 1.0)) {
                return bad(
                    "tenants",
                    format!("tenant {name:?} has kv_share {v}; a share is above 0 and at most 1"),
                );
            }
        }
        if let Err(e) = self.sandboxes.validate() {
            return bad("sandboxes", e);
        }
        let workers =
            self.sandbox_uid_base as u64..self.sandbox_uid_base as u64 + self.sandbox_uids as u64;
        let agents = self.sandboxes.uid_base as u64
            ..self.sandboxes.uid_base as u64 + self.sandboxes.uids as u64;
        if self.sandboxes.enabled && workers.start < agents.end && agents.start < workers.end {
            return bad(
                "sandboxes.uid_base",
                format!(
                    "agent sandboxes' uids {}..{} overlap the model workers' {}..{} (sandbox_uid_base): a sandbox could act as a worker",
                    agents.start, agents.end, workers.start, workers.end
                ),
            );
        }
        Ok(addr)
    }

    /// The KV shares the worker's engine enforces: `default` (or the whole
    /// cache) for every tenant, then the named ones.
    pub fn kv_shares(&self) -> Vec<(String, f64)> {
        self.tenants
            .iter()
            .filter_map(|(name, l)| l.kv_share.map(|s| (name.clone(), s)))
            .collect()
    }

    /// How a worker of the model file at `model` is confined: this node's
    /// policy, its uid range, and limits of the file's size plus the KV
    /// budget plus the margin, `sandbox_pids` tasks and `sandbox_cpus`.
    pub fn sandbox_spec(&self, model: &Path) -> SandboxSpec {
        let policy = self.sandbox.policy();
        if policy.tier == Tier::Off {
            return SandboxSpec::off();
        }
        let model_bytes = std::fs::metadata(model).map_or(0, |m| m.len());
        let cpus = if self.sandbox_cpus > 0.0 {
            self.sandbox_cpus
        } else if self.threads > 0 {
            self.threads as f64
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
        };
        SandboxSpec {
            policy,
            uids: self.sandbox_uid_base..self.sandbox_uid_base + self.sandbox_uids,
            limits: Limits {
                memory_bytes: Some(
                    model_bytes + self.kv_budget as u64 + self.sandbox_memory_margin,
                ),
                pids: Some(self.sandbox_pids),
                cpus: Some(cpus),
            },
            rlimits: Rlimits::default(),
            seccomp: self.sandbox_seccomp,
            runsc: self.runsc.clone(),
            state_dir: std::env::temp_dir().join(format!("weft-sandbox-{}", std::process::id())),
        }
    }

    /// How much of its intent log the node keeps.
    pub fn intent_retention(&self) -> weft_audit::Retention {
        weft_audit::Retention {
            max_bytes: (self.intent_log_max_bytes > 0).then_some(self.intent_log_max_bytes),
            max_age: (self.intent_log_max_age_s > 0)
                .then(|| std::time::Duration::from_secs(self.intent_log_max_age_s)),
        }
    }

    /// Seconds between signed checkpoints, as a duration.
    pub fn checkpoint_every(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.intent_checkpoint_s)
    }

    /// What the API enforces and how its listener behaves.
    pub fn api_config(&self) -> ApiConfig {
        ApiConfig {
            api_keys: ApiKeys::new(&self.api_keys),
            tenants: self.tenants.clone(),
            max_context: self.max_context,
            max_body_bytes: self.max_body_bytes,
            max_tokens_limit: self.max_tokens_limit,
            default_max_tokens: self.default_max_tokens,
            max_queue: self.max_queue,
            max_connections: self.max_connections,
            read_timeout_s: self.read_timeout_s,
            grace_s: self.grace_s,
            shared_prefixes: self.shared_prefixes.clone(),
            node_name: "local".into(),
        }
    }

    /// How to start a worker for `layers` of the model file at `model`
    /// (`None`: all of it) with this node's engine settings: the head of a
    /// chain when `chain` says where its steps go, else a shard that runs
    /// its layers for the data plane. `probe` is an address the worker
    /// tries to reach, to report its network isolation.
    pub fn worker_spec(
        &self,
        model: PathBuf,
        probe: Option<String>,
        layers: Option<std::ops::Range<u32>>,
        chain: Option<Arc<dyn ChainLink>>,
    ) -> WorkerSpec {
        WorkerSpec {
            exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("weft")),
            sandbox: self.sandbox_spec(&model),
            model,
            threads: self.threads,
            device: self.device.clone(),
            device_memory_budget: self.gpu_memory_budget,
            kv_budget: self.kv_budget,
            max_context: self.max_context,
            max_running: self.max_running,
            probe,
            layers,
            chain,
            kv_shares: self.kv_shares(),
            prefix_cache: self.prefix_cache,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config file at `dir/n.toml` with `text`, read.
    fn from_toml(dir: &tempfile::TempDir, text: &str) -> Result<NodeConfig, ConfigError> {
        let p = dir.path().join("n.toml");
        std::fs::write(&p, text).unwrap();
        NodeConfig::from_file(&p)
    }

    #[test]
    fn agent_sandbox_uids_overlapping_the_workers_are_refused() {
        let mut c = NodeConfig::default();
        c.sandboxes.uid_base = c.sandbox_uid_base + 10;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("overlap"), "{e}");
    }

    const KEYS_AND_LIMITS: &str = "addr = \"0.0.0.0:9000\"\nthreads = 2\n[api_keys]\n\"sk-test-123456\" = \"acme\"\n[tenants.acme]\nmax_concurrent = 2\n";

    #[test]
    fn a_file_sets_settings_and_tenant_limits() {
        let dir = tempfile::tempdir().unwrap();
        let c = from_toml(&dir, KEYS_AND_LIMITS).unwrap();
        assert_eq!(c.threads, 2);
        assert_eq!(c.api_config().limits("acme").max_concurrent, Some(2));
        assert_eq!(c.api_config().limits("other"), TenantLimits::default());
        assert!(c.validate().is_ok());
    }

    #[test]
    fn a_node_configs_debug_shows_no_api_key() {
        let dir = tempfile::tempdir().unwrap();
        let c = from_toml(&dir, KEYS_AND_LIMITS).unwrap();
        let printed = format!("{c:?} {:?}", c.api_config());
        assert!(!printed.contains("sk-test-123456"), "{printed}");
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = from_toml(&dir, KEYS_AND_LIMITS).unwrap();
        let env: BTreeMap<String, String> = [("WEFT_THREADS".to_string(), "1".to_string())].into();
        c.apply_env(&env).unwrap();
        assert_eq!(c.threads, 1);
    }

    #[test]
    fn a_bad_environment_value_is_named() {
        let mut c = NodeConfig::default();
        let env: BTreeMap<String, String> =
            [("WEFT_THREADS".to_string(), "many".to_string())].into();
        assert!(c
            .apply_env(&env)
            .unwrap_err()
            .to_string()
            .contains("WEFT_THREADS"));
    }

    #[test]
    fn a_bad_address_is_named() {
        let c = NodeConfig {
            addr: "nonsense".into(),
            ..NodeConfig::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("addr"));
    }

    #[test]
    fn an_unknown_setting_in_the_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert!(from_toml(&dir, "adr = 1\n")
            .unwrap_err()
            .to_string()
            .contains("adr"));
    }

    const SHARES: &str = "[tenants.default]\nkv_share = 0.5\n[tenants.acme]\nkv_share = 0.25\nmax_concurrent = 4\n[tenants.free]\nmax_concurrent = 1\n";

    #[test]
    fn tenants_kv_shares_reach_the_worker() {
        let dir = tempfile::tempdir().unwrap();
        let c = from_toml(&dir, SHARES).unwrap();
        assert!(c.validate().is_ok());
        assert_eq!(
            c.kv_shares(),
            vec![("acme".to_string(), 0.25), ("default".to_string(), 0.5)]
        );
        assert_eq!(
            c.worker_spec("m.gguf".into(), None, None, None).kv_shares,
            c.kv_shares()
        );
    }

    #[test]
    fn a_kv_share_out_of_range_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = from_toml(&dir, SHARES).unwrap();
        c.tenants.get_mut("acme").unwrap().kv_share = Some(1.5);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("acme") && err.contains("1.5"), "{err}");
    }
}
