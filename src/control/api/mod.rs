//! The access-list API of SPEC 6: HTTPS (plain HTTP on loopback only) on a
//! thread and runtime of its own, bounded (256 connections, 1 MiB bodies,
//! 16 KiB heads, 10 s per request). Each request is parsed into one typed
//! [`route::Route`], authenticated and authorised in one place, handled by
//! the module of its resource, and counted in `moat_api_requests_total`.

mod access_list;
pub mod auth;
mod connections;
mod deployments;
pub mod error;
pub mod http;
mod plan;
pub mod route;

use crate::config::ApiKey;
use crate::control::Store;
use crate::data::state::{RefusalLog, Shared};
use axum::body::{Body, Bytes};
use axum::extract::{Extension, State};
use axum::http::{header, Method, Request, Response};
use axum::Router;
use error::ApiError;
use route::Route;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};

/// API connections served at once; one more is closed as soon as accepted.
const MAX_CONNECTIONS: usize = 256;
/// Largest request body.
pub const MAX_BODY: usize = 1024 * 1024;
/// A TLS handshake must complete within this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The OpenAPI document, a file of the repository.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// What every handler reaches.
pub struct Api {
    pub shared: Arc<Shared>,
    pub store: Store,
    keys: auth::KeyRing,
    /// Asks the daemon to reload now (a write is waiting to be in force).
    reload_now: Arc<Notify>,
    /// Rate limit for the log lines of failed authentications.
    failures: RefusalLog,
}

/// The peer of a connection, for the log of failed authentications.
#[derive(Clone, Copy)]
struct Peer(SocketAddr);

/// One authorised request's context.
pub struct Ctx {
    pub key: ApiKey,
    /// When the request (its body included) had arrived: writes must be in
    /// force within 5 s of it.
    pub arrival: Instant,
    pub if_match: Option<String>,
    pub body: Bytes,
}

/// Binds `addr` now (so a bad address fails start-up) and serves the API
/// on a thread of its own. `config`: the running config file.
pub fn start(
    addr: SocketAddr,
    config: &Path,
    shared: Arc<Shared>,
    reload_now: Arc<Notify>,
) -> std::io::Result<()> {
    let std_listener = crate::data::listener::bind(addr, false)?;
    let in_force = shared.clone();
    let api = Arc::new(Api {
        store: Store::running(config, move || in_force.live.load().snap.config.clone()),
        shared,
        keys: auth::KeyRing::default(),
        reload_now,
        failures: RefusalLog::default(),
    });
    std::thread::Builder::new()
        .name("moat-api".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return tracing::error!(error = %e, "API runtime failed to start"),
            };
            rt.block_on(async move {
                match TcpListener::from_std(std_listener) {
                    Ok(l) => accept_loop(l, addr, api).await,
                    Err(e) => tracing::error!(error = %e, "API listener failed"),
                }
            });
        })?;
    Ok(())
}

async fn accept_loop(listener: TcpListener, bound: SocketAddr, api: Arc<Api>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let over = RefusalLog::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Full: the connection is closed at once (not left waiting in the
        // kernel's queue until someone else leaves).
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            if over.allow(api.shared.now_ms()) {
                tracing::warn!(%peer, "API connection refused: {MAX_CONNECTIONS} API connections are open");
            }
            continue;
        };
        let api = api.clone();
        tokio::spawn(async move {
            let tls = {
                let live = api.shared.live.load();
                match live.snap.config.api.as_ref() {
                    Some(a) => a.tls.clone(),
                    None => return, // [api] removed by a reload: serve nothing
                }
            };
            let router = Router::new()
                .fallback(dispatch)
                .with_state(api)
                .layer(Extension(Peer(peer)));
            match tls {
                Some(config) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => http::serve(s, router).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "API TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "API TLS handshake timed out"),
                    }
                }
                // Plain HTTP only ever on loopback, whatever a reload said.
                None if bound.ip().is_loopback() => http::serve(stream, router).await,
                None => {}
            }
            drop(permit);
        });
    }
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

async fn dispatch(
    State(api): State<Arc<Api>>,
    Extension(Peer(peer)): Extension<Peer>,
    req: Request<Body>,
) -> Response<Body> {
    let arrival = Instant::now();
    let method = req.method().clone();
    let (template, result) = match Route::parse(&method, req.uri()) {
        Err((template, e)) => (template, Err(e)),
        Ok(route) => (
            route.template(),
            api.handle(route, peer, req, arrival).await,
        ),
    };
    let resp = result.unwrap_or_else(ApiError::into_response);
    crate::metrics::metrics()
        .api_requests
        .with_label_values(&[template, method_label(&method), resp.status().as_str()])
        .inc();
    resp
}

impl Api {
    async fn handle(
        &self,
        route: Route,
        peer: SocketAddr,
        req: Request<Body>,
        arrival: Instant,
    ) -> Result<Response<Body>, ApiError> {
        let keys_file = {
            let live = self.shared.live.load();
            let Some(api) = live.snap.config.api.as_ref() else {
                return Err(ApiError::NotFound(
                    "the API is not configured".into(),
                    Vec::new(),
                ));
            };
            api.keys_file.clone()
        };
        let keys = self.keys.current(&keys_file);
        let key = match auth::authenticate(req.headers(), &keys) {
            Ok(k) => k,
            Err(e) => {
                if self.failures.allow(self.shared.now_ms()) {
                    tracing::warn!(%peer, route = route.template(), "API request refused: {}", match &e { ApiError::Unauthorized(m) => m.as_str(), _ => "" });
                }
                return Err(e);
            }
        };
        auth::authorize(&key, &route)?;
        let (parts, body) = req.into_parts();
        let body = match route {
            Route::AddEntries { .. } | Route::CopyAccessList { .. } | Route::Plan => {
                read_body(&parts.headers, body, arrival).await?
            }
            _ => Bytes::new(),
        };
        let if_match = parts
            .headers
            .get(header::IF_MATCH)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let ctx = Ctx {
            key,
            // The request has arrived once its body has: the 5 s within
            // which a write must be in force start now.
            arrival: Instant::now(),
            if_match,
            body,
        };
        match route {
            Route::ListDeployments => deployments::list(self, &ctx),
            Route::GetAccessList { name } => access_list::get(self, &name).await,
            Route::AddEntries { name } => access_list::add(self, &ctx, &name).await,
            Route::DeleteEntry { name, entry } => {
                access_list::remove(self, &ctx, &name, &entry).await
            }
            Route::EntryStatus { name, entry } => access_list::status(self, &name, &entry).await,
            Route::CopyAccessList { name } => access_list::copy(self, &ctx, &name).await,
            Route::ListConnections { deployment } => {
                connections::list(self, &ctx, deployment.as_deref())
            }
            Route::CloseConnection { id } => connections::close(self, &ctx, &id),
            Route::Plan => plan::plan(self, &ctx).await,
            Route::OpenApi => {
                let mut resp = Response::new(Body::from(OPENAPI));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                Ok(resp)
            }
        }
    }

    /// Waits until the running configuration satisfies `check` (the write is
    /// in force here), asking the daemon to reload now; 504 after 5 s from
    /// the request's arrival (the write stays stored).
    pub async fn enforced(
        &self,
        arrival: Instant,
        check: impl Fn(&crate::policy::snapshot::Snapshot) -> bool,
    ) -> Result<(), ApiError> {
        let deadline = tokio::time::Instant::from_std(arrival + ENFORCE_WITHIN);
        let mut generation = self.shared.generation.subscribe();
        let mut asked = None::<Instant>;
        loop {
            if check(&self.shared.live.load().snap) {
                return Ok(());
            }
            if asked.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                self.reload_now.notify_one();
                asked = Some(Instant::now());
            }
            tokio::select! {
                _ = generation.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(ApiError::NotEnforced(
                        "the change is stored but this host did not apply it within 5 s; it applies with the next successful reload (see the daemon's log)".into(),
                    ));
                }
            }
        }
    }
}

/// Writes answer once in force, within this long of the request's arrival.
const ENFORCE_WITHIN: Duration = Duration::from_secs(5);

/// An oversized body up to this size is read and dropped before the 413,
/// so that the client, still sending, sees the answer rather than a reset.
const DRAIN_MAX: u64 = 8 * 1024 * 1024;

/// Reads a body of at most 1 MiB that must arrive within 10 s of the head.
async fn read_body(
    headers: &header::HeaderMap,
    mut body: Body,
    arrival: Instant,
) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > DRAIN_MAX) {
        return Err(ApiError::PayloadTooLarge);
    }
    let deadline = tokio::time::Instant::from_std(arrival + http::REQUEST_TIMEOUT);
    let mut buf = Vec::new();
    let mut seen: u64 = 0;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(ApiError::Timeout),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::bad(
                    "the request body could not be read",
                    format!("body: {e}"),
                ))
            }
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len() as u64;
        if seen > DRAIN_MAX {
            return Err(ApiError::PayloadTooLarge);
        }
        if seen <= MAX_BODY as u64 {
            buf.extend_from_slice(&data);
        }
    }
    if seen > MAX_BODY as u64 {
        return Err(ApiError::PayloadTooLarge);
    }
    Ok(Bytes::from(buf))
}
