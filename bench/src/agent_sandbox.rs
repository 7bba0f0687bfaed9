//! `weft-bench agent-sandbox`: how fast an agent gets a sandbox and runs a
//! command in it, through `/v1/sandboxes` of a real `weft up` (the `weft`
//! binary next to this one, serving a tiny model). Each phase runs its
//! operations at each parallelism in turn, every operation timed alone:
//!
//! - `baseline`: a plain fork+exec of the `weft` binary (`--version`) to
//!   its first line of output, the floor a cold sandbox start is held to;
//! - `cold-process`, `cold-gvisor`: a create from a template without a
//!   pool, to the 201 (the sandbox started, confined and claimed);
//! - `warm-process`: a create that takes a sandbox from a warm pool (the
//!   pool is refilled, untimed, between waves);
//! - `exec-true`: `exec true` in a live sandbox, to the whole answer;
//! - `python`: create, `exec python3 -c pass`, delete, as one operation.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

/// `weft-bench agent-sandbox` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentSandboxArgs {
    /// Operations per phase and parallelism.
    #[arg(long, default_value_t = 2000)]
    pub count: usize,
    /// Operations of `cold-gvisor` per parallelism (each start takes a
    /// tenth of a second or more).
    #[arg(long, default_value_t = 200)]
    pub gvisor_count: usize,
    /// Parallelisms to run each phase at.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub parallelism: Vec<usize>,
    /// Phases to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "baseline,cold-process,cold-gvisor,warm-process,exec-true,python"
    )]
    pub phases: Vec<String>,
    /// The warm pool's size (claims come in waves of this many).
    #[arg(long, default_value_t = 16)]
    pub pool: usize,
}

/// One phase at one parallelism.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseFigures {
    /// The phase.
    pub phase: String,
    /// Concurrent clients.
    pub parallelism: usize,
    /// Operations timed.
    pub count: usize,
    /// Latency percentiles (ms).
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    /// Completed operations per second of the phase's wall time.
    pub per_s: f64,
    /// How the creates were served (`warm`/`cold` counts), where it applies.
    pub launches: Vec<(String, usize)>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct AgentSandboxReport {
    /// The CPU.
    pub cpu: String,
    /// Every phase at every parallelism.
    pub phases: Vec<PhaseFigures>,
}

/// A `weft up` for the run, stopped when dropped.
struct Node {
    child: std::process::Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        // SIGTERM, so the node ends its sandboxes and removes their cgroups
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn start_node(weft: &Path, pool: usize) -> Result<Node> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("tiny.gguf");
    weft_kernels::testing::write_tiny_model(&model, &Default::default())?;
    // the weft binary bound into the template must be readable by the
    // sandboxes' uids wherever it was built
    let bin_dir = PathBuf::from("/var/tmp/weft-bench-bin");
    std::fs::create_dir_all(&bin_dir)?;
    let bin = bin_dir.join(format!("weft-{}", std::process::id()));
    let _ = std::fs::remove_file(&bin);
    std::fs::copy(weft, &bin)?;
    let cfg = dir.path().join("node.toml");
    let binds = r#"["/usr", "/bin", "/sbin", "/lib", "/lib64"]"#;
    let limits =
        "defaults = { memory_mb = 256, cpus = 1.0, pids = 64, disk_mb = 16, timeout_s = 600 }";
    std::fs::write(
        &cfg,
        format!(
            r#"addr = "127.0.0.1:0"
model = "{model}"
threads = 1

[sandboxes]
max_file_bytes = 1048576
[sandboxes.templates.cold]
binds = {binds}
{limits}
[sandboxes.templates.warm]
binds = {binds}
{limits}

[[sandboxes.pools]]
template = "warm"
isolation = "process"
size = {pool}
"#,
            model = model.display(),
        ),
    )?;
    let mut child = Command::new(&bin)
        .args(["up", "--config"])
        .arg(&cfg)
        .env("WEFT_CACHE_DIR", dir.path().join("cache"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let out = child.stdout.take().context("its stdout")?;
    let mut lines = BufReader::new(out).lines();
    let first = lines.next().context("weft up said nothing")??;
    let base = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .context("no URL on weft up's first line")?
        .to_string();
    std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
    let node = Node {
        child,
        base,
        _dir: dir,
    };
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !c
        .get(format!("{}/readyz", node.base))
        .send()
        .is_ok_and(|r| r.status().is_success())
    {
        if Instant::now() > deadline {
            bail!("the node was not ready within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(node)
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("a client")
}

fn call(c: &reqwest::blocking::Client, m: &str, url: &str, body: Option<Value>) -> Result<Value> {
    let mut r = c.request(reqwest::Method::from_bytes(m.as_bytes())?, url);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send()?;
    let status = r.status();
    let v: Value = r.json().unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("{m} {url}: {status}: {v}");
    }
    Ok(v)
}

/// One operation's latency (ms) and, for a create, its launch kind.
type Timed = (f64, Option<String>);

/// Runs `count` operations over `parallelism` threads; each `op` returns
/// its own latency and, for creates, its launch kind.
fn run_parallel<F>(count: usize, parallelism: usize, op: F) -> Result<(Vec<f64>, Vec<String>, f64)>
where
    F: Fn(&reqwest::blocking::Client, usize) -> Result<Timed> + Sync,
{
    let t0 = Instant::now();
    let results: Vec<Result<Vec<Timed>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..parallelism)
            .map(|w| {
                let op = &op;
                s.spawn(move || {
                    let c = client();
                    (w..count)
                        .step_by(parallelism)
                        .map(|i| op(&c, i))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a bench thread"))
            .collect()
    });
    let wall = t0.elapsed().as_secs_f64();
    let mut lat = Vec::new();
    let mut launches = Vec::new();
    for r in results {
        for (ms, l) in r? {
            lat.push(ms);
            launches.extend(l);
        }
    }
    Ok((lat, launches, wall))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn figures(
    phase: &str,
    parallelism: usize,
    mut lat: Vec<f64>,
    launches: Vec<String>,
    wall: f64,
) -> PhaseFigures {
    lat.sort_by(|a, b| a.total_cmp(b));
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for l in launches {
        match kinds.iter_mut().find(|(k, _)| *k == l) {
            Some((_, n)) => *n += 1,
            None => kinds.push((l, 1)),
        }
    }
    PhaseFigures {
        phase: phase.to_string(),
        parallelism,
        count: lat.len(),
        p50_ms: percentile(&lat, 0.50),
        p95_ms: percentile(&lat, 0.95),
        p99_ms: percentile(&lat, 0.99),
        per_s: lat.len() as f64 / wall,
        launches: kinds,
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Creates a sandbox; its id, the create's latency and its launch kind.
fn create(
    c: &reqwest::blocking::Client,
    base: &str,
    template: &str,
    isolation: &str,
) -> Result<(String, f64, String)> {
    let t = Instant::now();
    let v = call(
        c,
        "POST",
        &format!("{base}/v1/sandboxes"),
        Some(json!({"template": template, "isolation": isolation})),
    )?;
    let took = ms(t);
    let id = v["id"].as_str().context("no id")?.to_string();
    Ok((id, took, v["launch"].as_str().unwrap_or("?").to_string()))
}

fn delete(c: &reqwest::blocking::Client, base: &str, id: &str) -> Result<()> {
    call(c, "DELETE", &format!("{base}/v1/sandboxes/{id}"), None).map(drop)
}

fn pool_ready(c: &reqwest::blocking::Client, base: &str) -> usize {
    let Ok(text) = c
        .get(format!("{base}/metrics"))
        .send()
        .and_then(|r| r.text())
    else {
        return 0;
    };
    text.lines()
        .find(|l| {
            l.starts_with("weft_sandbox_pool_ready{")
                && l.contains("isolation=\"process\"")
                && l.contains("template=\"warm\"")
        })
        .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .unwrap_or(0.0) as usize
}

fn wait_pool_full(c: &reqwest::blocking::Client, base: &str, size: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while pool_ready(c, base) < size {
        if Instant::now() > deadline {
            bail!("the warm pool did not refill to {size} within 120 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Runs the benchmark.
pub fn run(a: &AgentSandboxArgs) -> Result<AgentSandboxReport> {
    let weft = std::env::current_exe()?.with_file_name("weft");
    anyhow::ensure!(
        weft.exists(),
        "no weft binary at {} (build it first)",
        weft.display()
    );
    let node = start_node(&weft, a.pool)?;
    let base = node.base.as_str();
    let mut phases = Vec::new();
    for phase in &a.phases {
        for &p in &a.parallelism {
            let f = match phase.as_str() {
                "baseline" => {
                    let (lat, l, wall) = run_parallel(a.count, p, |_, _| {
                        let t = Instant::now();
                        let mut child = Command::new(&weft)
                            .arg("--version")
                            .stdout(Stdio::piped())
                            .spawn()?;
                        let mut first = String::new();
                        BufReader::new(child.stdout.take().context("stdout")?)
                            .read_line(&mut first)?;
                        let took = ms(t);
                        child.wait()?;
                        Ok((took, None))
                    })?;
                    figures(phase, p, lat, l, wall)
                }
                "cold-process" | "cold-gvisor" => {
                    let isolation = phase.trim_start_matches("cold-");
                    let n = if isolation == "gvisor" {
                        a.gvisor_count
                    } else {
                        a.count
                    };
                    let (lat, l, wall) = run_parallel(n, p, |c, _| {
                        let (id, took, launch) = create(c, base, "cold", isolation)?;
                        delete(c, base, &id)?;
                        Ok((took, Some(launch)))
                    })?;
                    figures(phase, p, lat, l, wall)
                }
                "warm-process" => {
                    let c = client();
                    let mut lat = Vec::new();
                    let mut launches = Vec::new();
                    let mut wall = 0.0;
                    while lat.len() < a.count {
                        wait_pool_full(&c, base, a.pool)?;
                        let wave = a.pool.min(a.count - lat.len());
                        let ids = std::sync::Mutex::new(Vec::new());
                        let (l, k, w) = run_parallel(wave, p, |c, _| {
                            let (id, took, launch) = create(c, base, "warm", "process")?;
                            ids.lock().unwrap_or_else(|e| e.into_inner()).push(id);
                            Ok((took, Some(launch)))
                        })?;
                        for id in ids.into_inner().unwrap_or_default() {
                            delete(&c, base, &id)?;
                        }
                        lat.extend(l);
                        launches.extend(k);
                        wall += w;
                    }
                    figures(phase, p, lat, launches, wall)
                }
                "exec-true" => {
                    let c = client();
                    let ids: Vec<String> = (0..p)
                        .map(|_| create(&c, base, "cold", "process").map(|x| x.0))
                        .collect::<Result<_>>()?;
                    let (lat, l, wall) = run_parallel(a.count, p, |c, i| {
                        let id = &ids[i % p];
                        let t = Instant::now();
                        let v = call(
                            c,
                            "POST",
                            &format!("{base}/v1/sandboxes/{id}/exec"),
                            Some(json!({"cmd": ["true"]})),
                        )?;
                        let took = ms(t);
                        anyhow::ensure!(v["exit_code"] == 0, "exec true: {v}");
                        Ok((took, None))
                    })?;
                    for id in &ids {
                        delete(&c, base, id)?;
                    }
                    figures(phase, p, lat, l, wall)
                }
                "python" => {
                    let (lat, l, wall) = run_parallel(a.count, p, |c, _| {
                        let t = Instant::now();
                        let (id, _, launch) = create(c, base, "cold", "process")?;
                        let v = call(
                            c,
                            "POST",
                            &format!("{base}/v1/sandboxes/{id}/exec"),
                            Some(json!({"cmd": ["python3", "-c", "pass"]})),
                        )?;
                        anyhow::ensure!(v["exit_code"] == 0, "python: {v}");
                        delete(c, base, &id)?;
                        Ok((ms(t), Some(launch)))
                    })?;
                    figures(phase, p, lat, l, wall)
                }
                other => bail!("unknown phase {other}"),
            };
            eprintln!(
                "{} x{}: p50 {:.2} ms, p99 {:.2} ms",
                f.phase, f.parallelism, f.p50_ms, f.p99_ms
            );
            phases.push(f);
        }
    }
    drop(node);
    Ok(AgentSandboxReport {
        cpu: crate::sandbox::cpu_name(),
        phases,
    })
}

/// The report as a Markdown table.
pub fn table(r: &AgentSandboxReport) -> String {
    let mut s = String::from(
        "| phase | parallelism | n | p50 (ms) | p95 (ms) | p99 (ms) | ops/s | launches |\n|---|---|---|---|---|---|---|---|\n",
    );
    for f in &r.phases {
        let launches = f
            .launches
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        s.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {} |\n",
            f.phase, f.parallelism, f.count, f.p50_ms, f.p95_ms, f.p99_ms, f.per_s, launches
        ));
    }
    s
}
