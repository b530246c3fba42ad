//! One connection's way through moat:
//!
//! ```text
//! accept ─► PROXY header ─► admit(source) ─► limits ─► TLS (+ SNI route ─► admit again) ─► dial ─► forward ─► close
//! ```
//!
//! | stage        | bound               | exit on failure (outcome label, log level)            |
//! |--------------|---------------------|-------------------------------------------------------|
//! | PROXY header | `handshake_timeout` | reset; `proxy_protocol_error`, debug                  |
//! | admit        | one table lookup    | reset before reading; `denied`, info (rate-limited)   |
//! | limits       | atomic counters     | reset; `limited`, info (rate-limited)                 |
//! | TLS          | `handshake_timeout` | close; `tls_error`, debug                             |
//! | dial         | `connect_timeout`   | close; `upstream_error`, warn                         |
//! | forward      | `idle_timeout`, revocation, shutdown | `allowed` counted at dial; one info line at the end |

use crate::admission::{admit, readmit, Deny, Permit};
use crate::classify::{classify, FirstBytes};
use crate::config::{OnRevoke, TlsMode};
use crate::forward::{self, Activity, Meter, Totals};
use crate::metrics::Outcome;
use crate::proxy_header::{self, Origin, Prefix};
use crate::state::{DeploymentState, Live, Shared, Slot};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::server::TlsStream;

/// Daemon phases a connection watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Stop accepting; live connections run on until the grace period ends.
    Draining,
    /// Grace period over: close everything.
    Closing,
}

/// The client side after admission and TLS.
enum Client {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Why a forwarded connection ended.
#[derive(Debug)]
enum End {
    Finished(io::Result<Totals>),
    Revoked(Deny),
    Idle,
    Shutdown,
}

/// Closes a connection with a reset, without reading from it.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Handles one accepted connection on the listener bound to `listen`.
pub async fn serve(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    listen: SocketAddr,
) {
    let started = Instant::now();
    let live = shared.live.load_full();
    let Some(listener) = live
        .snap
        .config
        .listeners
        .iter()
        .position(|l| l.addr == listen)
    else {
        return reset(stream); // the listener is being removed
    };
    let deps = &live.snap.config.listeners[listener].deployments;
    let first = deps[0];
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
                Ok(Err(e)) => {
                    return proxy_error(&live.deployments[first], stream, peer_ip, &e.to_string())
                }
                Err(_) => {
                    return proxy_error(
                        &live.deployments[first],
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
    let single = deps.len() == 1;
    let permit = if single {
        match admit(&live.snap, first, source) {
            Ok(p) => Some(p),
            Err(d) => {
                return refuse(
                    &shared,
                    &live.deployments[first],
                    stream,
                    source,
                    Outcome::Denied,
                    &d.to_string(),
                )
            }
        }
    } else {
        if !deps.iter().any(|&d| admit(&live.snap, d, source).is_ok()) {
            return refuse(
                &shared,
                &live.deployments[first],
                stream,
                source,
                Outcome::Denied,
                "no rule of any deployment on this address matches",
            );
        }
        None
    };

    if check_untrusted_header {
        match timeout(handshake_timeout, peek_header(&stream)).await {
            Ok(Ok(Prefix::NotHeader)) => {}
            Ok(Ok(_)) => {
                return proxy_error(
                    &live.deployments[first],
                    stream,
                    source,
                    "PROXY protocol header from an untrusted peer",
                )
            }
            Ok(Err(_)) => return,
            Err(_) => {
                return proxy_error(
                    &live.deployments[first],
                    stream,
                    source,
                    "nothing received within handshake_timeout",
                )
            }
        }
    }

    let conn = Conn {
        shared: shared.clone(),
        live,
        source,
        started,
        handshake_timeout,
    };
    match permit {
        Some(p) => conn.single(stream, p).await,
        None => conn.routed(stream, listener).await,
    }
}

struct Conn {
    shared: Arc<Shared>,
    live: Arc<Live>,
    source: IpAddr,
    started: Instant,
    handshake_timeout: Duration,
}

impl Conn {
    /// One deployment on this address.
    async fn single(self, stream: TcpStream, permit: Permit) {
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
        let tls = self.live.snap.config.deployments[dep].tls.clone();
        match tls {
            None => self.plain(stream, permit, slot).await,
            Some(tls) => {
                let is_tls = match tls.mode {
                    TlsMode::Require => true,
                    TlsMode::Allow => {
                        match timeout(self.handshake_timeout, first_bytes(&stream)).await {
                            Ok(Ok(kind)) => kind == FirstBytes::Tls,
                            Ok(Err(_)) => return, // closed before sending anything
                            Err(_) => return tls_timeout(&state, stream, self.source),
                        }
                    }
                };
                if !is_tls {
                    return self.plain(stream, permit, slot).await;
                }
                let start = Instant::now();
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
                match timeout(self.handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => {
                        state
                            .metrics
                            .tls_handshake
                            .observe(start.elapsed().as_secs_f64());
                        self.tls(s, permit, slot).await
                    }
                    Ok(Err(e)) => tls_failed(&state, self.source, &e.to_string()),
                    Err(_) => tls_failed(
                        &state,
                        self.source,
                        "no TLS handshake within handshake_timeout",
                    ),
                }
            }
        }
    }

    /// Several deployments on this address: route by SNI, then admit again.
    async fn routed(self, stream: TcpStream, listener: usize) {
        let live = self.live.clone();
        let deps = &live.snap.config.listeners[listener].deployments;
        let first = self.live.deployments[deps[0]].clone();
        let start = Instant::now();
        let acceptor =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
        let handshake = match timeout(self.handshake_timeout, acceptor).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => return tls_failed(&first, self.source, &e.to_string()),
            Err(_) => {
                return tls_failed(
                    &first,
                    self.source,
                    "no TLS ClientHello within handshake_timeout",
                )
            }
        };
        let sni = handshake
            .client_hello()
            .server_name()
            .map(|s| s.trim_end_matches('.').to_ascii_lowercase());
        let config = &self.live.snap.config;
        let Some(dep) = sni.as_deref().and_then(|name| {
            deps.iter()
                .copied()
                .find(|&d| config.deployments[d].server_names.iter().any(|n| n == name))
        }) else {
            let why = match sni {
                Some(n) => format!("unknown SNI name \"{n}\""),
                None => "no SNI name in the ClientHello".to_string(),
            };
            return tls_failed(&first, self.source, &why);
        };
        let state = self.live.deployments[dep].clone();
        let permit = match admit(&self.live.snap, dep, self.source) {
            Ok(p) => p,
            Err(d) => {
                state.metrics.count(Outcome::Denied);
                log_refusal(&self.shared, &state, self.source, &d.to_string());
                return;
            }
        };
        let Some(slot) = self.shared.acquire(&self.live, dep, self.source) else {
            state.metrics.count(Outcome::Limited);
            log_refusal(
                &self.shared,
                &state,
                self.source,
                "connection limit reached",
            );
            return;
        };
        let Some(tls) = config.deployments[dep].tls.as_ref() else {
            return;
        };
        match timeout(
            self.handshake_timeout.saturating_sub(start.elapsed()),
            handshake.into_stream(tls.server.clone()),
        )
        .await
        {
            Ok(Ok(s)) => {
                state
                    .metrics
                    .tls_handshake
                    .observe(start.elapsed().as_secs_f64());
                self.tls(s, permit, slot).await
            }
            Ok(Err(e)) => tls_failed(&state, self.source, &e.to_string()),
            Err(_) => tls_failed(
                &state,
                self.source,
                "no TLS handshake within handshake_timeout",
            ),
        }
    }

    async fn plain(self, client: TcpStream, permit: Permit, slot: Slot) {
        self.proxy(Client::Plain(client), permit, slot).await
    }

    async fn tls(self, client: TlsStream<TcpStream>, permit: Permit, slot: Slot) {
        self.proxy(Client::Tls(Box::new(client)), permit, slot)
            .await
    }

    async fn proxy(self, client: Client, permit: Permit, slot: Slot) {
        let state = slot.state.clone();
        let Some(upstream) = self.dial(&permit, &state).await else {
            return;
        };
        self.run(&permit, &state, client, upstream).await;
        drop(slot);
    }

    /// Dials the upstream; only an admitted connection (a `Permit`) can.
    async fn dial(&self, permit: &Permit, state: &DeploymentState) -> Option<TcpStream> {
        let d = &self.live.snap.config.deployments[permit.deployment()];
        let start = Instant::now();
        let result = timeout(
            d.limits.connect_timeout,
            TcpStream::connect(d.upstream.as_str()),
        )
        .await;
        state
            .metrics
            .upstream_connect
            .observe(start.elapsed().as_secs_f64());
        let error = match result {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                state.metrics.count(Outcome::Allowed);
                return Some(s);
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

    /// Forwards until the connection ends, is revoked, idles out or the
    /// daemon's grace period ends; then logs the connection's one line.
    async fn run(
        self,
        permit: &Permit,
        state: &DeploymentState,
        client: Client,
        mut upstream: TcpStream,
    ) {
        let limits = &self.live.snap.config.deployments[permit.deployment()].limits;
        let activity = Activity::default();
        let shared = self.shared.clone();
        let clock = move || shared.now_ms();
        activity.touch(clock());
        let meter = Meter {
            to_upstream: &state.metrics.to_upstream,
            to_client: &state.metrics.to_client,
            activity: &activity,
            clock: &clock,
        };
        let forward = async {
            match client {
                Client::Plain(c) => {
                    let _ = c.set_nodelay(true);
                    forward::plain(&c, &upstream, &meter).await
                }
                Client::Tls(c) => {
                    let _ = c.get_ref().0.set_nodelay(true);
                    forward::stream(*c, &mut upstream, &meter).await
                }
            }
        };
        state.metrics.active.inc();
        let end = tokio::select! {
            r = forward => End::Finished(r),
            d = revoked(&self.shared, &state.name, self.source) => End::Revoked(d),
            _ = idle(&activity, limits.idle_timeout, &clock) => End::Idle,
            _ = closing(&self.shared) => End::Shutdown,
        };
        state.metrics.active.dec();
        let (rule, cidr) = permit
            .rule(&self.live.snap)
            .map_or(("shared plan", String::new()), |(d, n)| (d, n.to_string()));
        let ms = self.started.elapsed().as_millis() as u64;
        match end {
            End::Finished(Ok(t)) => {
                tracing::info!(deployment = %state.name, source = %self.source, outcome = "allowed", rule, cidr, to_upstream = t.to_upstream, to_client = t.to_client, duration_ms = ms, "connection closed")
            }
            End::Finished(Err(e)) => {
                tracing::info!(deployment = %state.name, source = %self.source, outcome = "allowed", rule, cidr, duration_ms = ms, error = %e, "connection ended with an error")
            }
            End::Revoked(why) => {
                state.metrics.revoked.inc();
                tracing::warn!(deployment = %state.name, source = %self.source, outcome = "allowed", rule, cidr, duration_ms = ms, reason = %why, "connection revoked: the rules no longer admit its source");
            }
            End::Idle => {
                tracing::info!(deployment = %state.name, source = %self.source, outcome = "allowed", rule, cidr, duration_ms = ms, "connection closed after idle_timeout")
            }
            End::Shutdown => {
                tracing::info!(deployment = %state.name, source = %self.source, outcome = "allowed", rule, cidr, duration_ms = ms, "connection closed: shutdown grace period over")
            }
        }
    }
}

/// Resolves when a reload or an expiry no longer admits `source` (and
/// `on_revoke = "close"`); otherwise never.
async fn revoked(shared: &Shared, name: &str, source: IpAddr) -> Deny {
    let mut rx = shared.generation.subscribe();
    loop {
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        let live = shared.live.load();
        if live.snap.config.server.on_revoke == OnRevoke::Keep {
            continue;
        }
        if let Err(d) = readmit(&live.snap, name, source) {
            return d;
        }
    }
}

async fn idle(activity: &Activity, limit: Option<Duration>, clock: &(dyn Fn() -> u64 + Sync)) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    let limit = limit.as_millis() as u64;
    loop {
        let deadline = activity.last() + limit;
        let now = clock();
        if now >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(deadline - now)).await;
    }
}

async fn closing(shared: &Shared) {
    let mut rx = shared.phase.subscribe();
    let _ = rx.wait_for(|p| *p == Phase::Closing).await;
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

fn log_refusal(shared: &Shared, state: &DeploymentState, source: IpAddr, reason: &str) {
    if state.refusals.allow(shared.now_ms()) {
        tracing::info!(deployment = %state.name, source = %source, outcome = "denied", reason, "connection refused");
    }
}

fn refuse(
    shared: &Shared,
    state: &DeploymentState,
    stream: TcpStream,
    source: IpAddr,
    outcome: Outcome,
    reason: &str,
) {
    reset(stream);
    state.metrics.count(outcome);
    if state.refusals.allow(shared.now_ms()) {
        tracing::info!(deployment = %state.name, source = %source, outcome = outcome.label(), reason, "connection refused");
    }
}

fn proxy_error(state: &DeploymentState, stream: TcpStream, source: IpAddr, reason: &str) {
    reset(stream);
    state.metrics.count(Outcome::ProxyProtocolError);
    tracing::debug!(deployment = %state.name, peer = %source, reason, "PROXY protocol error; connection refused");
}

fn tls_timeout(state: &DeploymentState, stream: TcpStream, source: IpAddr) {
    reset(stream);
    tls_failed(state, source, "nothing received within handshake_timeout");
}

fn tls_failed(state: &DeploymentState, source: IpAddr, reason: &str) {
    state.metrics.count(Outcome::TlsError);
    tracing::debug!(deployment = %state.name, source = %source, reason, "TLS handshake failed; connection closed");
}
