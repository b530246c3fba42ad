//! Serving one HTTP/1.1 connection with hyper under the bounds both the API
//! and the admin endpoint keep: a request head must arrive within 10 s and
//! fit in 16 KiB, or the connection is closed.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// A request (head, then body) must arrive within this long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Request heads larger than this are refused (431).
pub const MAX_HEAD: usize = 16 * 1024;
/// Headers in one request head, at most (431 above).
pub const MAX_HEADERS: usize = 256;

/// Serves `router` on `io` until the client closes or a bound is hit.
pub async fn serve<S>(io: S, router: Router)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        // 16 KiB is the bound on a head; hyper's default of 100 headers is
        // raised, not unbounded (each parse allocates room for them all).
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    if let Err(e) = builder.serve_connection(TokioIo::new(io), service).await {
        tracing::debug!(error = %e, "HTTP connection ended");
    }
}
