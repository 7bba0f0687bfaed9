//! `weft operator`: the Kubernetes operator (weft-operator's controllers)
//! with its health and metrics endpoint.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use weft_operator::controller::{self, Ctx};
use weft_operator::fabric::Quic;

/// Runs the controllers until SIGTERM or SIGINT.
pub async fn run(namespace: Option<String>, health: SocketAddr) -> Result<()> {
    let client = kube::Client::try_default().await.context(
        "no Kubernetes API: not inside a cluster (no ServiceAccount) and no usable KUBECONFIG",
    )?;
    let ctx = Arc::new(Ctx::new(client.clone(), Arc::new(Quic)));
    let ready = Arc::new(AtomicBool::new(false));
    let app = {
        let (ctx, ready) = (ctx.clone(), ready.clone());
        axum::Router::new()
            .route("/healthz", axum::routing::get(|| async { "ok\n" }))
            .route(
                "/readyz",
                axum::routing::get(move || {
                    let ok = ready.load(Ordering::Acquire);
                    async move {
                        if ok {
                            (axum::http::StatusCode::OK, "ready\n")
                        } else {
                            (
                                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                                "the Kubernetes API has not answered yet\n",
                            )
                        }
                    }
                }),
            )
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let text = ctx.metrics_text();
                    async move {
                        (
                            [(axum::http::header::CONTENT_TYPE, weft_metrics::CONTENT_TYPE)],
                            text,
                        )
                    }
                }),
            )
    };
    let listener = tokio::net::TcpListener::bind(health)
        .await
        .with_context(|| format!("binding the health endpoint on {health}"))?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    // ready once the API server answers (its version: any account may ask)
    {
        let (client, ready) = (client.clone(), ready.clone());
        tokio::spawn(async move {
            loop {
                match client.apiserver_version().await {
                    Ok(v) => {
                        tracing::info!(version = %v.git_version, "Kubernetes API reachable");
                        ready.store(true, Ordering::Release);
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "Kubernetes API not reachable yet"),
                }
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        });
    }
    controller::run(ctx, namespace).await
}
