//! The admin listener: `/metrics`, `/healthz`, `/readyz` (unauthenticated,
//! for scrapers and probes), served by axum on its own thread and runtime so
//! that neither a connection flood nor a slow scraper can stall admission
//! (nor the other way round).

use crate::data::conn::Phase;
use crate::data::state::Shared;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Admin connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;

/// Binds the admin address now (so a bad address fails start-up) and serves
/// it on a thread of its own.
pub fn start(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<()> {
    let std_listener = crate::data::listener::bind(addr, false)?;
    std::thread::Builder::new()
        .name("moat-admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return tracing::error!(error = %e, "admin runtime failed to start"),
            };
            rt.block_on(async move {
                let listener = match TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!(error = %e, "admin listener failed"),
                };
                let router = router(shared);
                let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
                loop {
                    let Ok(permit) = slots.clone().acquire_owned().await else {
                        return;
                    };
                    match listener.accept().await {
                        Ok((s, _)) => {
                            let router = router.clone();
                            tokio::spawn(async move {
                                crate::control::api::http::serve(s, router).await;
                                drop(permit);
                            });
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            });
        })?;
    Ok(())
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found; try /metrics, /healthz or /readyz\n",
            )
        })
        .with_state(shared)
}

async fn metrics() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(),
    )
}

async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let ready = shared.ready.load(Ordering::Acquire) && *shared.phase.borrow() == Phase::Running;
    if ready {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
