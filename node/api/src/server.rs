//! The API's listener: a cap on open connections (the rest wait in the
//! kernel's backlog), a deadline for each request's headers, and a graceful
//! shutdown that lets in-flight requests finish within the grace period.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::routes::router;
use crate::state::AppState;

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

/// Serves `state`'s API (and the `extra` routes: agent sandboxes) on
/// `listener` until `stop` turns true, then lets
/// in-flight requests finish within the grace period; requests still
/// running after it end with an error event when `on_grace_over` stops
/// their workers.
pub async fn serve_api(
    listener: TcpListener,
    state: Arc<AppState>,
    extra: Option<axum::Router>,
    stop: tokio::sync::watch::Receiver<bool>,
    on_grace_over: impl FnOnce(),
) {
    let grace = Duration::from_secs(state.cfg.grace_s);
    let max_conn = state.cfg.max_connections;
    let header_timeout = Duration::from_secs(state.cfg.read_timeout_s);
    let app = match extra {
        Some(r) => r.merge(router(state)),
        None => router(state),
    };
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
