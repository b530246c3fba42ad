//! One connection's way through moat, in two phases:
//!
//! ```text
//! accept ─► PROXY header ─► admit(source) ─► limits ─► TLS (+ SNI route ─► admit again) ─► dial   │ forward ─► close
//! └──────────────────────────── setup (this module, boxed: freed once done) ──────────────────────┘ └─ session.rs ─┘
//! ```
//!
//! | stage        | bound               | exit on failure (outcome label, log level)            |
//! |--------------|---------------------|-------------------------------------------------------|
//! | PROXY header | `handshake_timeout` | reset; `proxy_protocol_error`, debug                  |
//! | admit        | one table lookup    | reset before reading; `denied`, info (rate-limited)   |
//! | limits       | atomic counters     | reset; `limited`, info (rate-limited)                 |
//! | TLS          | `handshake_timeout` | close; `tls_error`, debug                             |
//! | dial         | `connect_timeout`   | close; `upstream_error`, warn                         |
//! | forward      | `idle_timeout`, revocation, shutdown grace | `allowed` counted at dial; one info line at the end |
//!
//! The setup phase runs in its own heap allocation so that the long-lived
//! task of an idle connection holds only the forwarding state.

use crate::admission::{admit, Permit};
use crate::classify::{classify, FirstBytes};
use crate::config::TlsMode;
use crate::metrics::Outcome;
use crate::proxy_header::{self, Origin, Prefix};
use crate::session::{Client, Session};
use crate::state::{DeploymentState, Live, Shared, Slot};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Daemon phases every connection watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Stop accepting; live connections run on until the grace period ends.
    Draining,
    /// Grace period over: close everything.
    Closing,
}

/// Handles one accepted connection on the listener bound to `listen`.
pub async fn serve(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr, listen: SocketAddr) {
    if let Some(session) = Box::pin(setup(shared, stream, peer, listen)).await {
        session.run().await;
    }
}

/// Closes a connection with a reset, without reading from it.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Everything up to a dialled upstream; None when the connection ended.
async fn setup(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    listen: SocketAddr,
) -> Option<Session> {
    let started = Instant::now();
    let live = shared.live.load_full();
    let Some(listener) = live
        .snap
        .config
        .listeners
        .iter()
        .position(|l| l.addr == listen)
    else {
        reset(stream); // the listener is being removed
        return None;
    };
    let deps = &live.snap.config.listeners[listener].deployments;
    let first = deps[0];
    let first_state = &live.deployments[first];
    let peer_ip = crate::addr::canonical(peer.ip());
    let handshake_timeout = live.snap.config.deployments[first].limits.handshake_timeout;

    // PROXY protocol: believed only from trusted peers.
    let mut source = peer_ip;
    let mut check_untrusted_header = false;
    if let Some(trusted) = &live.snap.compiled[first].trusted {
        if trusted.lookup(peer_ip).is_some() {
            match timeout(handshake_timeout, proxy_header::read(&mut stream)).await {
                Ok(Ok(Origin::Client(ip))) => source = crate::addr::canonical(ip),
                Ok(Ok(Origin::Local)) => {}
                Ok(Err(e)) => return proxy_error(first_state, stream, peer_ip, &e.to_string()),
                Err(_) => {
                    return proxy_error(
                        first_state,
                        stream,
                        peer_ip,
                        "no PROXY protocol header within handshake_timeout",
                    )
                }
            }
        } else {
            check_untrusted_header = true;
        }
    }

    // Admission before anything else is read or any byte goes upstream.
    let permit = if deps.len() == 1 {
        match admit(&live.snap, first, source) {
            Ok(p) => Some(p),
            Err(d) => {
                return refuse(
                    &shared,
                    first_state,
                    stream,
                    source,
                    Outcome::Denied,
                    &d.to_string(),
                )
            }
        }
    } else {
        if !deps.iter().any(|&d| admit(&live.snap, d, source).is_ok()) {
            let why = "no rule of any deployment on this address matches";
            return refuse(&shared, first_state, stream, source, Outcome::Denied, why);
        }
        None
    };

    if check_untrusted_header {
        match timeout(handshake_timeout, peek_header(&stream)).await {
            Ok(Ok(Prefix::NotHeader)) => {}
            Ok(Ok(_)) => {
                return proxy_error(
                    first_state,
                    stream,
                    source,
                    "PROXY protocol header from an untrusted peer",
                )
            }
            Ok(Err(_)) => return None,
            Err(_) => {
                return proxy_error(
                    first_state,
                    stream,
                    source,
                    "nothing received within handshake_timeout",
                )
            }
        }
    }

    let setup = Setup {
        shared: shared.clone(),
        live: live.clone(),
        source,
        started,
        handshake_timeout,
    };
    match permit {
        Some(p) => setup.single(stream, p).await,
        None => Box::pin(setup.routed(stream, listener)).await,
    }
}

struct Setup {
    shared: Arc<Shared>,
    live: Arc<Live>,
    source: IpAddr,
    started: Instant,
    handshake_timeout: Duration,
}

impl Setup {
    /// One deployment on this address.
    async fn single(self, stream: TcpStream, permit: Permit) -> Option<Session> {
        let dep = permit.deployment();
        let state = self.live.deployments[dep].clone();
        let Some(slot) = self.shared.acquire(&self.live, dep, self.source) else {
            return refuse(
                &self.shared,
                &state,
                stream,
                self.source,
                Outcome::Limited,
                "connection limit reached",
            );
        };
        match self.live.snap.config.deployments[dep].tls.clone() {
            None => self.connect(Client::Plain(stream), permit, slot).await,
            // Boxed: TLS state is large, and a plaintext setup need not carry it.
            Some(tls) => Box::pin(self.terminate(stream, permit, slot, tls)).await,
        }
    }

    /// `[deployment.tls]`: the handshake, or in `allow` mode plaintext when
    /// the first bytes are not TLS.
    async fn terminate(
        self,
        stream: TcpStream,
        permit: Permit,
        slot: Slot,
        tls: crate::config::Tls,
    ) -> Option<Session> {
        let state = slot.state.clone();
        let is_tls = match tls.mode {
            TlsMode::Require => true,
            TlsMode::Allow => match timeout(self.handshake_timeout, first_bytes(&stream)).await {
                Ok(Ok(kind)) => kind == FirstBytes::Tls,
                Ok(Err(_)) => return None, // closed before sending anything
                Err(_) => {
                    reset(stream);
                    return tls_failed(
                        &state,
                        self.source,
                        "nothing received within handshake_timeout",
                    );
                }
            },
        };
        if !is_tls {
            return self.connect(Client::Plain(stream), permit, slot).await;
        }
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
        let limit = self.handshake_timeout;
        self.finish_tls(acceptor.accept(stream), limit, Instant::now(), permit, slot)
            .await
    }

    /// Completes a TLS handshake within `limit`, then dials the upstream.
    async fn finish_tls<F>(
        self,
        handshake: F,
        limit: Duration,
        start: Instant,
        permit: Permit,
        slot: Slot,
    ) -> Option<Session>
    where
        F: std::future::Future<Output = io::Result<tokio_rustls::server::TlsStream<TcpStream>>>,
    {
        let state = slot.state.clone();
        match timeout(limit, handshake).await {
            Ok(Ok(s)) => {
                state
                    .metrics
                    .tls_handshake
                    .observe(start.elapsed().as_secs_f64());
                self.connect(Client::Tls(Box::new(s)), permit, slot).await
            }
            Ok(Err(e)) => tls_failed(&state, self.source, &e.to_string()),
            Err(_) => tls_failed(
                &state,
                self.source,
                "no TLS handshake within handshake_timeout",
            ),
        }
    }

    /// Several deployments on this address: route by SNI, then admit again.
    async fn routed(self, stream: TcpStream, listener: usize) -> Option<Session> {
        let live = self.live.clone();
        let deps = &live.snap.config.listeners[listener].deployments;
        let first = &live.deployments[deps[0]];
        let start = Instant::now();
        let acceptor =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
        let handshake = match timeout(self.handshake_timeout, acceptor).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => return tls_failed(first, self.source, &e.to_string()),
            Err(_) => {
                return tls_failed(
                    first,
                    self.source,
                    "no TLS ClientHello within handshake_timeout",
                )
            }
        };
        let sni = handshake
            .client_hello()
            .server_name()
            .map(|s| s.trim_end_matches('.').to_ascii_lowercase());
        let config = &live.snap.config;
        let chosen = sni.as_deref().and_then(|name| {
            deps.iter()
                .copied()
                .find(|&d| config.deployments[d].server_names.iter().any(|n| n == name))
        });
        let Some(dep) = chosen else {
            let why = match sni {
                Some(n) => format!("unknown SNI name \"{n}\""),
                None => "no SNI name in the ClientHello".to_string(),
            };
            return tls_failed(first, self.source, &why);
        };
        let state = &live.deployments[dep];
        let permit = match admit(&live.snap, dep, self.source) {
            Ok(p) => p,
            Err(d) => {
                state.metrics.count(Outcome::Denied);
                log_refusal(
                    &self.shared,
                    state,
                    self.source,
                    Outcome::Denied,
                    &d.to_string(),
                );
                return None;
            }
        };
        let Some(slot) = self.shared.acquire(&live, dep, self.source) else {
            state.metrics.count(Outcome::Limited);
            log_refusal(
                &self.shared,
                state,
                self.source,
                Outcome::Limited,
                "connection limit reached",
            );
            return None;
        };
        let server = config.deployments[dep].tls.as_ref()?.server.clone();
        let limit = self.handshake_timeout.saturating_sub(start.elapsed());
        self.finish_tls(handshake.into_stream(server), limit, start, permit, slot)
            .await
    }

    /// Dials the upstream; only an admitted connection (a `Permit`) can.
    async fn connect(self, client: Client, permit: Permit, slot: Slot) -> Option<Session> {
        let d = &self.live.snap.config.deployments[permit.deployment()];
        let state = &slot.state;
        let start = Instant::now();
        let dial = async {
            match d.upstream_addr {
                Some(addr) => TcpStream::connect(addr).await,
                None => TcpStream::connect(d.upstream.as_str()).await,
            }
        };
        let result = timeout(d.limits.connect_timeout, dial).await;
        state
            .metrics
            .upstream_connect
            .observe(start.elapsed().as_secs_f64());
        let error = match result {
            Ok(Ok(upstream)) => {
                let _ = upstream.set_nodelay(true);
                state.metrics.count(Outcome::Allowed);
                return Some(Session {
                    shared: self.shared,
                    live: self.live,
                    started: self.started,
                    permit,
                    slot,
                    client,
                    upstream,
                });
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!(
                "no answer within connect_timeout ({})",
                humantime::format_duration(d.limits.connect_timeout)
            ),
        };
        state.metrics.count(Outcome::UpstreamError);
        tracing::warn!(deployment = %state.name, source = %self.source, upstream = %d.upstream, error = %error, "upstream unreachable; client connection closed");
        None
    }
}

/// Waits for the first bytes and tells whether they start a PROXY header.
async fn peek_header(stream: &TcpStream) -> io::Result<Prefix> {
    let mut buf = [0u8; 12];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        match proxy_header::prefix(&buf[..n]) {
            Prefix::Undecided => tokio::time::sleep(Duration::from_millis(5)).await,
            decided => return Ok(decided),
        }
    }
}

/// Peeks until the first bytes tell TLS from plaintext.
async fn first_bytes(stream: &TcpStream) -> io::Result<FirstBytes> {
    let mut buf = [0u8; 12];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        match classify(&buf[..n]) {
            FirstBytes::Undecided => tokio::time::sleep(Duration::from_millis(5)).await,
            kind => return Ok(kind),
        }
    }
}

fn log_refusal(
    shared: &Shared,
    state: &DeploymentState,
    source: IpAddr,
    outcome: Outcome,
    reason: &str,
) {
    if state.refusals.allow(shared.now_ms()) {
        tracing::info!(deployment = %state.name, source = %source, outcome = outcome.label(), reason, "connection refused");
    }
}

fn refuse<T>(
    shared: &Shared,
    state: &DeploymentState,
    stream: TcpStream,
    source: IpAddr,
    outcome: Outcome,
    reason: &str,
) -> Option<T> {
    reset(stream);
    state.metrics.count(outcome);
    log_refusal(shared, state, source, outcome, reason);
    None
}

fn proxy_error<T>(
    state: &DeploymentState,
    stream: TcpStream,
    source: IpAddr,
    reason: &str,
) -> Option<T> {
    reset(stream);
    state.metrics.count(Outcome::ProxyProtocolError);
    tracing::debug!(deployment = %state.name, peer = %source, reason, "PROXY protocol error; connection refused");
    None
}

fn tls_failed<T>(state: &DeploymentState, source: IpAddr, reason: &str) -> Option<T> {
    state.metrics.count(Outcome::TlsError);
    tracing::debug!(deployment = %state.name, source = %source, reason, "TLS handshake failed; connection closed");
    None
}

#[cfg(test)]
mod tests {
    /// Every connection's task is as large as this future for its whole
    /// life: keep the long-lived (forwarding) state small. Setup and TLS
    /// state live in their own boxes.
    #[tokio::test]
    async fn a_connection_task_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let now = std::time::SystemTime::now();
        let config = crate::config::load(std::path::Path::new("config/moat.toml"), now).unwrap();
        let snap = crate::snapshot::Snapshot::compile(
            std::sync::Arc::new(config),
            Default::default(),
            Default::default(),
            now,
        );
        let shared = crate::state::Shared::new(crate::reload::build_live(snap, &[]));
        let size = std::mem::size_of_val(&super::serve(shared, stream, addr, addr));
        assert!(
            size <= 3 * 1024,
            "a connection's task state grew to {size} bytes"
        );
    }
}
