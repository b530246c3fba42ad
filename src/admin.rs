//! The admin listener: `/metrics`, `/healthz`, `/readyz`, on its own thread
//! and runtime so that neither a connection flood nor a slow scraper can
//! stall admission (nor the other way round).

use crate::conn::Phase;
use crate::state::Shared;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request must arrive whole within this long and this many bytes.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_MAX: usize = 8 * 1024;

/// Binds the admin address now (so a bad address fails start-up) and serves
/// it on a thread of its own.
pub fn start(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<()> {
    let std_listener = crate::listener::bind(addr, false)?;
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
                loop {
                    if let Ok((s, _)) = listener.accept().await {
                        tokio::spawn(serve(s, shared.clone()));
                    } else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            });
        })?;
    Ok(())
}

async fn serve(mut s: TcpStream, shared: Arc<Shared>) {
    let mut buf = Vec::with_capacity(1024);
    let path = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut s, &mut buf)).await {
        Ok(Some(p)) => p,
        _ => return,
    };
    let (status, ctype, body): (&str, &str, Vec<u8>) = match path.as_str() {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            crate::metrics::render(),
        ),
        "/healthz" => ("200 OK", "text/plain", b"ok\n".to_vec()),
        "/readyz" => {
            let ready =
                shared.ready.load(Ordering::Acquire) && *shared.phase.borrow() == Phase::Running;
            if ready {
                ("200 OK", "text/plain", b"ready\n".to_vec())
            } else {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    b"not ready\n".to_vec(),
                )
            }
        }
        _ => (
            "404 Not Found",
            "text/plain",
            b"not found; try /metrics, /healthz or /readyz\n".to_vec(),
        ),
    };
    let head = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
        s.write_all(head.as_bytes()).await?;
        s.write_all(&body).await?;
        s.shutdown().await
    })
    .await;
}

/// Reads a request head; returns its path for a GET (or HEAD), else None.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(_)) => {
                let path = req.path?.split('?').next()?.to_string();
                return matches!(req.method, Some("GET") | Some("HEAD")).then_some(path);
            }
            Ok(httparse::Status::Partial) if buf.len() < REQUEST_MAX => continue,
            _ => return None,
        }
    }
}
