//! One connection's way through moat, in two phases:
//!
//! ```text
//! accept ─► limits ─► PROXY header ─► admit(source) ─► first bytes ─► TLS (+ SNI route ─► admit again) ─► admit again ─► dial │ forward ─► close
//! └──────────────────────────────────── setup (this module, boxed: freed once done) ────────────────────────────────────────┘ └─ session.rs ─┘
//! ```
//!
//! | stage        | bound                          | failure: outcome label, log level                     |
//! |--------------|--------------------------------|-------------------------------------------------------|
//! | limits       | atomic counters, from accept   | reset; `limited`, info (rate-limited)                 |
//! | PROXY header | the set-up deadline            | reset; `proxy_protocol_error`, debug                  |
//! | admit        | one table lookup, before reading | reset; `denied`, info (rate-limited)                |
//! | first bytes  | the set-up deadline            | close; `tls_error` (`proxy_protocol_error` from an untrusted peer on a PROXY port), debug; a client that closes before any byte: no outcome (unless the port requires TLS), debug |
//! | TLS          | the set-up deadline            | close; `tls_error`, debug                             |
//! | admit again  | one lookup, rules in force now | close; `denied`, info (rate-limited)                  |
//! | dial         | `connect_timeout`              | close; `upstream_error`, warn (rate-limited)          |
//! | forward      | `idle_timeout`, revocation, shutdown grace | `allowed` counted at dial; one info line at the end |
//!
//! The set-up deadline is `handshake_timeout` after accept (on an address
//! shared by SNI, the longest of its deployments'): it bounds every
//! stage before the dial together, not each on its own. The connection's
//! slot (global and per-source limits) is taken at accept and travels with
//! it; a stage that waits for bytes holds it. Waiting reads into a small
//! buffer that is replayed afterwards (no peeking in a loop), so a waiting
//! connection costs no CPU and one whose client left ends at once.
//!
//! Every way out of set-up is a [`SetupError`], counted and logged in one
//! place ([`report`]); the one that counts nothing, [`SetupError::Gone`] (a
//! port check on a port where nothing was owed yet), is logged there too. The set-up state lives in its own heap allocation so
//! that the long-lived task of an idle connection holds only the forwarding
//! state.

use crate::config::TlsMode;
use crate::data::classify::{classify, FirstBytes};
use crate::data::proxy_header::{self, Origin, Prefix};
use crate::data::registry::NewConn;
use crate::data::rewind::Rewind;
use crate::data::session::{Client, Session};
use crate::data::state::{DeploymentState, Live, Shared, Slot};
use crate::metrics::Outcome;
use crate::policy::addr::canonical;
use crate::policy::admission::{admit, readmit, Permit};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::server::TlsStream;

/// Daemon phases every connection watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Stop accepting; live connections run on until the grace period ends.
    Draining,
    /// Grace period over: close everything.
    Closing,
}

/// Bytes read to classify a connection: a PROXY v2 signature is the longest.
const FIRST_BYTES: usize = 12;

/// Why set-up ended without a session. Each maps to one outcome (`Gone`:
/// none) and one log line, in [`report`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetupError {
    Denied(String),
    Limited,
    ProxyProtocol(String),
    Tls(String),
    Upstream(String),
    /// The client closed before its first byte where nothing was owed yet:
    /// a `mode = "allow"` port, an untrusted peer on a `proxy_protocol`
    /// port (a TCP port check, say). No outcome: nothing failed.
    Gone(&'static str),
}

impl SetupError {
    /// The `outcome` label this counts under; `None` counts nothing.
    pub fn outcome(&self) -> Option<Outcome> {
        Some(match self {
            SetupError::Denied(_) => Outcome::Denied,
            SetupError::Limited => Outcome::Limited,
            SetupError::ProxyProtocol(_) => Outcome::ProxyProtocolError,
            SetupError::Tls(_) => Outcome::TlsError,
            SetupError::Upstream(_) => Outcome::UpstreamError,
            SetupError::Gone(_) => return None,
        })
    }
}

/// The set-up stages that wait for the client: what a deadline that passes
/// inside one of them means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Admission = 0,
    /// A trusted peer's PROXY header.
    ProxyHeader = 1,
    /// The first bytes on a `mode = "allow"` port: TLS or plaintext?
    FirstBytes = 2,
    Tls = 3,
    /// An untrusted peer's first bytes on a `proxy_protocol` port: a header?
    PeerFirstBytes = 4,
}

impl Stage {
    fn timed_out(self) -> SetupError {
        match self {
            Stage::ProxyHeader | Stage::PeerFirstBytes => SetupError::ProxyProtocol(
                "no complete PROXY protocol header within handshake_timeout".into(),
            ),
            Stage::Admission | Stage::FirstBytes | Stage::Tls => {
                SetupError::Tls("set-up not complete within handshake_timeout".into())
            }
        }
    }

    /// The client closed while this stage waited for it, having sent
    /// `sent` bytes of it.
    fn closed(self, sent: usize) -> SetupError {
        match self {
            // Bytes of what may be a header or a ClientHello, then nothing.
            Stage::PeerFirstBytes if sent > 0 => {
                SetupError::ProxyProtocol("the connection closed inside its first bytes".into())
            }
            Stage::FirstBytes if sent > 0 => {
                SetupError::Tls("the client closed inside its first bytes".into())
            }
            Stage::ProxyHeader => {
                SetupError::ProxyProtocol("the connection closed before its first bytes".into())
            }
            Stage::FirstBytes | Stage::PeerFirstBytes => {
                SetupError::Gone("the client closed before its first byte")
            }
            Stage::Admission | Stage::Tls => {
                SetupError::Tls("the client closed before the handshake".into())
            }
        }
    }
}

/// What set-up has learnt so far; read when its deadline passes.
struct Progress {
    stage: StageCell,
    /// The deployment whose counters a failure is charged to.
    deployment: AtomicUsize,
    source: Mutex<IpAddr>,
}

impl Progress {
    fn source(&self) -> IpAddr {
        *self.source.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_source(&self, ip: IpAddr) {
        *self.source.lock().unwrap_or_else(|p| p.into_inner()) = ip;
    }
}

/// A `Stage` that the set-up future and its deadline both see.
struct StageCell(AtomicU8);

impl StageCell {
    fn new(s: Stage) -> Self {
        StageCell(AtomicU8::new(s as u8))
    }

    fn set(&self, s: Stage) {
        self.0.store(s as u8, Ordering::Relaxed);
    }

    fn get(&self) -> Stage {
        match self.0.load(Ordering::Relaxed) {
            1 => Stage::ProxyHeader,
            2 => Stage::FirstBytes,
            3 => Stage::Tls,
            4 => Stage::PeerFirstBytes,
            _ => Stage::Admission,
        }
    }
}

/// An admitted connection, ready to dial.
struct Ready {
    client: Client,
    /// Plaintext bytes read during set-up, to send upstream first.
    prefix: Vec<u8>,
    permit: Permit,
    slot: Slot,
    tls: bool,
    sni: Option<String>,
}

impl Ready {
    /// A terminated TLS client; its handshake, begun at `start`, is observed.
    fn tls(
        client: TlsStream<Rewind<TcpStream>>,
        permit: Permit,
        slot: Slot,
        sni: Option<String>,
        start: Instant,
    ) -> Ready {
        slot.state
            .metrics
            .tls_handshake
            .observe(start.elapsed().as_secs_f64());
        Ready {
            client: Client::Tls(Box::new(client)),
            prefix: Vec::new(),
            permit,
            slot,
            tls: true,
            sni,
        }
    }

    /// A plaintext client, with the bytes set-up read from it.
    fn plain(stream: TcpStream, prefix: Vec<u8>, permit: Permit, slot: Slot) -> Ready {
        Ready {
            client: Client::Plain(stream),
            prefix,
            permit,
            slot,
            tls: false,
            sni: None,
        }
    }
}

/// Handles one accepted connection on the listener bound to `listen`.
pub async fn serve(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr, listen: SocketAddr) {
    let accepted = Instant::now();
    if let Some(session) = Box::pin(setup(shared, stream, peer, listen, accepted)).await {
        session.run().await;
    }
}

/// Closes a connection with a reset, without reading from it.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Resets `stream` and returns `error`: a refusal never reads a byte.
fn refuse(stream: TcpStream, error: SetupError) -> SetupError {
    reset(stream);
    error
}

/// Everything up to a dialled upstream; None when the connection ended.
async fn setup(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    listen: SocketAddr,
    accepted: Instant,
) -> Option<Session> {
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
    let first = live.snap.config.listeners[listener].deployments[0];
    let peer = canonical(peer.ip());
    let progress = Progress {
        stage: StageCell::new(Stage::Admission),
        deployment: AtomicUsize::new(first),
        source: Mutex::new(peer),
    };
    // Before SNI names the deployment, any of the address's may be the one:
    // the longest of their handshake_timeouts applies.
    let config = &live.snap.config;
    let timeout = config.listeners[listener]
        .deployments
        .iter()
        .map(|&d| config.deployments[d].limits.handshake_timeout)
        .max()
        .unwrap_or(config.deployments[first].limits.handshake_timeout);
    let deadline = accepted + timeout;
    let setup = Setup {
        shared: &shared,
        live: &live,
        listener,
        peer,
        progress: &progress,
    };
    let result = match tokio::time::timeout_at(deadline.into(), setup.establish(stream)).await {
        Ok(Ok(ready)) => setup.dial(ready).await,
        Ok(Err(e)) => Err(e),
        Err(_) => Err(progress.stage.get().timed_out()),
    };
    match result {
        Ok(session) => Some(session),
        Err(e) => {
            let state = &live.deployments[progress.deployment.load(Ordering::Relaxed)];
            report(&shared, state, progress.source(), &e);
            None
        }
    }
}

struct Setup<'a> {
    shared: &'a Arc<Shared>,
    live: &'a Arc<Live>,
    listener: usize,
    peer: IpAddr,
    progress: &'a Progress,
}

impl Setup<'_> {
    fn deployments(&self) -> &[usize] {
        &self.live.snap.config.listeners[self.listener].deployments
    }

    /// Admission of `source`: a `Permit` when one deployment listens here;
    /// with several, whether any of them admits it (SNI decides later).
    fn admit(&self, source: IpAddr) -> Result<Option<Permit>, SetupError> {
        let deps = self.deployments();
        if let [only] = deps {
            return admit(&self.live.snap, *only, source)
                .map(Some)
                .map_err(|d| SetupError::Denied(d.to_string()));
        }
        if deps
            .iter()
            .any(|&d| admit(&self.live.snap, d, source).is_ok())
        {
            Ok(None)
        } else {
            Err(SetupError::Denied(
                "no rule of any deployment on this address matches".into(),
            ))
        }
    }

    /// The connection's slot, taken before a byte is read. On an address
    /// several deployments share, the deployment is not known before the
    /// ClientHello: the slot counts against the global cap and a per-source
    /// cap of the address, and no deployment's own caps until routing.
    fn acquire(&self, source: IpAddr) -> Result<Slot, SetupError> {
        let deps = self.deployments();
        let slot = match deps {
            [only] => self.shared.acquire(self.live, *only, source),
            _ => {
                let config = &self.live.snap.config;
                let per_ip = deps
                    .iter()
                    .map(|&d| config.deployments[d].limits.max_connections_per_ip)
                    .max()
                    .unwrap_or(0);
                let listen = config.listeners[self.listener].addr;
                self.shared
                    .acquire_unrouted(self.live, listen, deps[0], per_ip, source)
            }
        };
        slot.ok_or(SetupError::Limited)
    }

    /// Everything before the dial, under the set-up deadline.
    async fn establish(&self, mut stream: TcpStream) -> Result<Ready, SetupError> {
        let p = self.progress;
        let first = self.deployments()[0];
        let trusted = self.live.snap.compiled[first]
            .trusted
            .as_ref()
            .map(|t| t.lookup(self.peer).is_some());
        let mut prefix = Vec::new();
        let (permit, slot, source) = if trusted == Some(true) {
            // The balancer's connection counts against the balancer until
            // its header names the client.
            let mut slot = match self.acquire(self.peer) {
                Ok(s) => s,
                Err(e) => return Err(refuse(stream, e)),
            };
            p.stage.set(Stage::ProxyHeader);
            let source = match proxy_header::read(&mut stream).await {
                Ok(Origin::Client(ip)) => canonical(ip),
                Ok(Origin::Local) => self.peer,
                Err(e) => return Err(refuse(stream, SetupError::ProxyProtocol(e.to_string()))),
            };
            p.set_source(source);
            p.stage.set(Stage::Admission);
            let permit = match self.admit(source) {
                Ok(p) => p,
                Err(e) => return Err(refuse(stream, e)),
            };
            let moved = match permit {
                Some(_) => slot.move_to(self.live, first, source),
                None => slot.move_unrouted(source),
            };
            if !moved {
                return Err(refuse(stream, SetupError::Limited));
            }
            (permit, slot, source)
        } else {
            // Admission before anything is read.
            let permit = match self.admit(self.peer) {
                Ok(p) => p,
                Err(e) => return Err(refuse(stream, e)),
            };
            let slot = match self.acquire(self.peer) {
                Ok(s) => s,
                Err(e) => return Err(refuse(stream, e)),
            };
            if trusted == Some(false) {
                // A header is never believed from an untrusted peer.
                p.stage.set(Stage::PeerFirstBytes);
                // A port that requires TLS owes a handshake from the start:
                // closing first is a tls_error there, as without PROXY.
                let owes_tls = permit.is_none()
                    || self.live.snap.config.deployments[first]
                        .tls
                        .as_ref()
                        .is_some_and(|t| t.mode == TlsMode::Require);
                read_first(&mut stream, &mut prefix, Stage::PeerFirstBytes, |b| {
                    proxy_header::prefix(b) != Prefix::Undecided
                })
                .await
                .map_err(|e| match e {
                    SetupError::Gone(_) if owes_tls => Stage::Tls.closed(0),
                    e => e,
                })?;
                if proxy_header::prefix(&prefix) == Prefix::Header {
                    return Err(refuse(
                        stream,
                        SetupError::ProxyProtocol(
                            "PROXY protocol header from an untrusted peer".into(),
                        ),
                    ));
                }
            }
            (permit, slot, self.peer)
        };
        let Some(permit) = permit else {
            return Box::pin(self.routed(stream, prefix, slot, source)).await;
        };
        let tls = &self.live.snap.config.deployments[first].tls;
        let Some(tls) = tls else {
            return Ok(Ready::plain(stream, prefix, permit, slot));
        };
        if tls.mode == TlsMode::Allow {
            p.stage.set(Stage::FirstBytes);
            read_first(&mut stream, &mut prefix, Stage::FirstBytes, |b| {
                classify(b) != FirstBytes::Undecided
            })
            .await?;
            if classify(&prefix) != FirstBytes::Tls {
                return Ok(Ready::plain(stream, prefix, permit, slot));
            }
        }
        p.stage.set(Stage::Tls);
        let start = Instant::now();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
        let client = acceptor
            .accept(Rewind::new(&prefix, stream))
            .await
            .map_err(|e| SetupError::Tls(e.to_string()))?;
        let sni = client.get_ref().1.server_name().map(str::to_owned);
        Ok(Ready::tls(client, permit, slot, sni, start))
    }

    /// Several deployments on this address: route by SNI, then admit again.
    async fn routed(
        &self,
        stream: TcpStream,
        prefix: Vec<u8>,
        mut slot: Slot,
        source: IpAddr,
    ) -> Result<Ready, SetupError> {
        let p = self.progress;
        p.stage.set(Stage::Tls);
        let start = Instant::now();
        let acceptor = tokio_rustls::LazyConfigAcceptor::new(
            rustls::server::Acceptor::default(),
            Rewind::new(&prefix, stream),
        );
        let handshake = acceptor.await.map_err(|e| SetupError::Tls(e.to_string()))?;
        let sni = handshake
            .client_hello()
            .server_name()
            .map(|s| s.trim_end_matches('.').to_ascii_lowercase());
        let config = &self.live.snap.config;
        let chosen = sni.as_deref().and_then(|name| {
            self.deployments()
                .iter()
                .copied()
                .find(|&d| config.deployments[d].server_names.iter().any(|n| n == name))
        });
        let Some(dep) = chosen else {
            return Err(SetupError::Tls(match sni {
                Some(n) => format!("unknown SNI name \"{n}\""),
                None => "no SNI name in the ClientHello".to_string(),
            }));
        };
        p.deployment.store(dep, Ordering::Relaxed);
        let permit =
            admit(&self.live.snap, dep, source).map_err(|d| SetupError::Denied(d.to_string()))?;
        if !slot.move_to(self.live, dep, source) {
            return Err(SetupError::Limited);
        }
        let server = match &config.deployments[dep].tls {
            Some(t) => t.server.clone(),
            None => return Err(SetupError::Tls("deployment has no TLS".into())),
        };
        let client = handshake
            .into_stream(server)
            .await
            .map_err(|e| SetupError::Tls(e.to_string()))?;
        Ok(Ready::tls(client, permit, slot, sni, start))
    }

    /// Admits again against the rules in force now, then dials the
    /// upstream; only an admitted connection (a `Permit`) can.
    async fn dial(&self, ready: Ready) -> Result<Session, SetupError> {
        let dep = ready.permit.deployment();
        let d = &self.live.snap.config.deployments[dep];
        let state = &ready.slot.state;
        let source = ready.permit.source();
        // Revocation has no window: a change made during set-up counts.
        if let Err(why) = readmit(&self.shared.live.load().snap, &d.name, source) {
            return Err(SetupError::Denied(format!("{why} (revoked during set-up)")));
        }
        let start = Instant::now();
        let connect = async {
            match d.upstream_addr {
                Some(addr) => TcpStream::connect(addr).await,
                None => TcpStream::connect(d.upstream.as_str()).await,
            }
        };
        let result = timeout(d.limits.connect_timeout, connect).await;
        state
            .metrics
            .upstream_connect
            .observe(start.elapsed().as_secs_f64());
        let upstream = match result {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => return Err(SetupError::Upstream(format!("{}: {e}", d.upstream))),
            Err(_) => {
                return Err(SetupError::Upstream(format!(
                    "{}: no answer within connect_timeout ({})",
                    d.upstream,
                    humantime::format_duration(d.limits.connect_timeout)
                )))
            }
        };
        let _ = upstream.set_nodelay(true);
        state.metrics.count(Outcome::Allowed);
        let (description, cidr) = match ready.permit.rule(&self.live.snap) {
            Some((description, net)) => (description.to_string(), net.to_string()),
            None => ("shared plan".to_string(), String::new()),
        };
        let registration = self.shared.registry.register(NewConn {
            deployment: state.name.clone(),
            source,
            description,
            cidr,
            tls: ready.tls,
            sni: ready.sni,
        });
        Ok(Session {
            shared: self.shared.clone(),
            idle_timeout: d.limits.idle_timeout,
            registration,
            slot: ready.slot,
            client: ready.client,
            prefix: ready.prefix,
            upstream,
        })
    }
}

/// Reads the connection's first bytes into `buf` until `decided` says they
/// are enough (at most [`FIRST_BYTES`]). No polling: it sleeps in `read`.
async fn read_first(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    stage: Stage,
    decided: impl Fn(&[u8]) -> bool,
) -> Result<(), SetupError> {
    let mut chunk = [0u8; FIRST_BYTES];
    while buf.is_empty() || !decided(buf) {
        let room = FIRST_BYTES - buf.len();
        if room == 0 {
            break;
        }
        match stream.read(&mut chunk[..room]).await {
            Ok(0) | Err(_) => return Err(stage.closed(buf.len())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Ok(())
}

/// Counts and logs the end of a set-up that did not reach forwarding: the
/// one place every set-up failure goes through.
fn report(shared: &Shared, state: &DeploymentState, source: IpAddr, e: &SetupError) {
    let Some(outcome) = e.outcome() else {
        tracing::debug!(deployment = %state.name, source = %source, "the client closed before its first byte");
        return;
    };
    state.metrics.count(outcome);
    let name = &state.name;
    let label = outcome.label();
    match e {
        SetupError::Denied(reason) => {
            if state.refusals.allow(shared.now_ms()) {
                tracing::info!(deployment = %name, source = %source, outcome = label, reason = %reason, "connection refused");
            }
        }
        SetupError::Limited => {
            if state.refusals.allow(shared.now_ms()) {
                tracing::info!(deployment = %name, source = %source, outcome = label, reason = "connection limit reached", "connection refused");
            }
        }
        SetupError::ProxyProtocol(reason) => {
            tracing::debug!(deployment = %name, peer = %source, outcome = label, reason = %reason, "PROXY protocol error; connection refused")
        }
        SetupError::Tls(reason) => {
            tracing::debug!(deployment = %name, source = %source, outcome = label, reason = %reason, "TLS set-up failed; connection closed")
        }
        SetupError::Upstream(reason) => {
            if state.upstream_errors.allow(shared.now_ms()) {
                tracing::warn!(deployment = %name, source = %source, outcome = label, error = %reason, "upstream unreachable; client connection closed");
            }
        }
        SetupError::Gone(_) => {}
    }
}

#[cfg(test)]
mod tests;
