//! `weft-bench sandbox`: what the worker sandbox costs. A worker of the
//! model (the real `weft` binary next to this one) is started at each
//! tier in turn, round after round: `off` (a plain child process),
//! `process` and `gvisor`. Each start is timed from the spawn to the
//! worker's Ready, and each worker then decodes greedy tokens for a fixed
//! prompt, timed token by token. Medians per tier, and each tier's ratio
//! against `off` measured in the same rounds.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use weft_kernels::SamplingParams;
use weft_worker::sandbox::cgroup::Limits;
use weft_worker::sandbox::launch::Rlimits;
use weft_worker::sandbox::{Policy, SeccompMode, Tier};
use weft_worker::{Runner, SandboxSpec, Submission, Supervisor, Update, WorkerSpec};

/// `weft-bench sandbox` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct SandboxArgs {
    /// Model source (default: the default model, fetched if needed).
    #[arg(long, default_value = "default")]
    pub model: String,
    /// CPU threads of each worker.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Rounds (every tier once per round, in turn).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Tokens decoded per worker.
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Tiers to measure beside `off`.
    #[arg(long, value_delimiter = ',', default_value = "process,gvisor")]
    pub tiers: Vec<String>,
}

/// One tier's figures.
#[derive(Debug, Clone, Serialize)]
pub struct TierFigures {
    /// The tier.
    pub tier: String,
    /// Median start to ready (ms).
    pub start_ms: f64,
    /// Median decode tokens/s (one sequence).
    pub decode_tok_s: f64,
    /// Start to ready, each round (ms).
    pub starts_ms: Vec<f64>,
    /// Decode tokens/s, each round.
    pub decodes_tok_s: Vec<f64>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxReport {
    /// Model file.
    pub model: String,
    /// Threads per worker.
    pub threads: usize,
    /// The CPU.
    pub cpu: String,
    /// Per tier, `off` first.
    pub tiers: Vec<TierFigures>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

fn spec(exe: &Path, model: &Path, threads: usize, tier: Tier) -> WorkerSpec {
    let model_bytes = std::fs::metadata(model).map_or(0, |m| m.len());
    let kv = 64 << 20;
    WorkerSpec {
        exe: exe.to_path_buf(),
        model: model.to_path_buf(),
        threads,
        device: "cpu".into(),
        device_memory_budget: 0,
        kv_budget: kv,
        max_context: 1024,
        max_running: 4,
        sandbox: if tier == Tier::Off {
            SandboxSpec::off()
        } else {
            SandboxSpec {
                policy: Policy { tier, strict: true },
                uids: 200_000..265_536,
                limits: Limits {
                    memory_bytes: Some(model_bytes + kv as u64 + (512 << 20)),
                    pids: Some(256),
                    cpus: Some(threads as f64),
                },
                rlimits: Rlimits::default(),
                seccomp: SeccompMode::Enforce,
                runsc: PathBuf::from("runsc"),
                state_dir: std::env::temp_dir().join(format!("weft-bench-{}", std::process::id())),
            }
        },
        probe: None,
        layers: None,
        chain: None,
        kv_shares: Vec::new(),
        prefix_cache: true,
    }
}

/// Starts a worker at `tier`, times it to Ready, decodes `tokens` greedy
/// tokens, and stops it: (start ms, decode tokens/s).
async fn one(
    exe: &Path,
    model: &Path,
    threads: usize,
    tier: Tier,
    prompt: &[u32],
    tokens: usize,
) -> Result<(f64, f64)> {
    let t0 = Instant::now();
    let sup = Supervisor::start(spec(exe, model, threads, tier));
    let mut ready = sup.ready();
    tokio::time::timeout(Duration::from_secs(120), ready.wait_for(|r| *r))
        .await
        .context("the worker never became ready")??;
    let start_ms = t0.elapsed().as_secs_f64() * 1e3;
    if let Some(why) = sup.refused() {
        anyhow::bail!("tier {tier} refused: {why}");
    }
    let runner: Arc<dyn Runner> = Arc::new(sup.clone());
    let (_, mut rx) = runner
        .submit(Submission {
            prompt: prompt.to_vec(),
            params: SamplingParams::greedy(tokens),
            priority: 1,
            resume: Default::default(),
            tenant: String::new(),
            trace: None,
            shared_tokens: 0,
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut first = None;
    let mut n = 0usize;
    while let Some(u) = rx.recv().await {
        match u {
            Update::Event { token, finish, .. } => {
                if token.is_some() {
                    n += 1;
                    first.get_or_insert_with(Instant::now);
                }
                if finish.is_some() {
                    break;
                }
            }
            other => anyhow::bail!("tier {tier}: {other:?}"),
        }
    }
    let decode = match first {
        Some(f) if n > 1 => (n - 1) as f64 / f.elapsed().as_secs_f64(),
        _ => 0.0,
    };
    sup.shutdown();
    // let the process and its cgroup go before the next start
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok((start_ms, decode))
}

/// Runs the benchmark and prints the table; returns the report.
pub fn run(a: &SandboxArgs, model: &Path) -> Result<SandboxReport> {
    let exe = std::env::current_exe()?.with_file_name("weft");
    anyhow::ensure!(
        exe.exists(),
        "no weft binary at {} (build it first)",
        exe.display()
    );
    let mut tiers = vec![Tier::Off];
    for t in &a.tiers {
        tiers.push(match t.as_str() {
            "process" => Tier::Process,
            "gvisor" => Tier::Gvisor,
            other => anyhow::bail!("unknown tier {other:?}"),
        });
    }
    let lm = weft_kernels::load(model, None, weft_kernels::Backend::Cpu)?;
    let prompt = lm
        .tokenizer
        .encode("The history of the fabric of the edge is", true, false);
    drop(lm);
    let rt = tokio::runtime::Runtime::new()?;
    let mut starts = vec![Vec::new(); tiers.len()];
    let mut decodes = vec![Vec::new(); tiers.len()];
    // a warm-up start of each tier (page cache, runsc's first run)
    for &t in &tiers {
        rt.block_on(one(&exe, model, a.threads, t, &prompt, 8))?;
    }
    for round in 0..a.rounds {
        for (i, &t) in tiers.iter().enumerate() {
            let (s, d) = rt.block_on(one(&exe, model, a.threads, t, &prompt, a.tokens))?;
            eprintln!("round {round} tier {t}: start {s:.1} ms, decode {d:.1} tok/s");
            starts[i].push(s);
            decodes[i].push(d);
        }
    }
    let cpu = cpu_name();
    Ok(SandboxReport {
        model: model.display().to_string(),
        threads: a.threads,
        cpu,
        tiers: tiers
            .iter()
            .enumerate()
            .map(|(i, t)| TierFigures {
                tier: t.to_string(),
                start_ms: median(&starts[i]),
                decode_tok_s: median(&decodes[i]),
                starts_ms: starts[i].clone(),
                decodes_tok_s: decodes[i].clone(),
            })
            .collect(),
    })
}

/// The report as a Markdown table, each tier against `off`.
pub fn table(r: &SandboxReport) -> String {
    let base = &r.tiers[0];
    let mut out = String::from(
        "| tier | start to ready, median (ms) | start overhead vs off (ms) | decode tok/s, median | decode vs off |\n|---|---|---|---|---|\n",
    );
    for t in &r.tiers {
        out += &format!(
            "| {} | {:.1} | {:+.1} | {:.1} | {:.3}x |\n",
            t.tier,
            t.start_ms,
            t.start_ms - base.start_ms,
            t.decode_tok_s,
            t.decode_tok_s / base.decode_tok_s
        );
    }
    out
}

/// The CPU's model name (`/proc/cpuinfo`).
pub(crate) fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default()
}
