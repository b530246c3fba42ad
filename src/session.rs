//! The forwarding phase of an admitted connection: bytes both ways until the
//! connection ends, its source is revoked, it idles out, or the shutdown
//! grace period ends; then one log line.

use crate::admission::{readmit, Deny, Permit};
use crate::config::OnRevoke;
use crate::conn::Phase;
use crate::forward::{self, Activity, Meter, Totals};
use crate::state::{Live, Shared, Slot};
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// The client side after admission (and TLS).
pub enum Client {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An admitted, connected pair, ready to forward.
pub struct Session {
    pub shared: Arc<Shared>,
    pub live: Arc<Live>,
    pub started: Instant,
    pub permit: Permit,
    /// Holds the connection's place under the limits until it ends.
    pub slot: Slot,
    pub client: Client,
    pub upstream: TcpStream,
}

/// Why a forwarded connection ended.
enum End {
    Finished(io::Result<Totals>),
    Revoked(Deny),
    Idle,
    Shutdown,
}

impl Session {
    pub async fn run(self) {
        let Session {
            shared,
            live,
            started,
            permit,
            slot,
            client,
            mut upstream,
        } = self;
        let state = &slot.state;
        let source = permit.source();
        let idle_timeout = live.snap.config.deployments[permit.deployment()]
            .limits
            .idle_timeout;
        let activity = Activity::default();
        let clock_shared = shared.clone();
        let clock = move || clock_shared.now_ms();
        activity.touch(clock());
        let meter = Meter {
            to_upstream: &state.metrics.to_upstream,
            to_client: &state.metrics.to_client,
            activity: &activity,
            clock: &clock,
        };
        let forward = async {
            match client {
                // TCP_NODELAY is inherited from the listening socket.
                Client::Plain(mut c) => forward::plain(&mut c, &mut upstream, &meter).await,
                Client::Tls(c) => Box::pin(forward::stream(*c, &mut upstream, &meter)).await,
            }
        };
        state.metrics.active.inc();
        let end = tokio::select! {
            r = forward => End::Finished(r),
            d = revoked(&shared, &state.name, source) => End::Revoked(d),
            _ = idle(&activity, idle_timeout, &clock) => End::Idle,
            _ = closing(&shared) => End::Shutdown,
        };
        state.metrics.active.dec();
        let (rule, cidr) = permit
            .rule(&live.snap)
            .map_or(("shared plan", String::new()), |(d, n)| (d, n.to_string()));
        let ms = started.elapsed().as_millis() as u64;
        let name = &state.name;
        match end {
            End::Finished(Ok(t)) => {
                tracing::info!(deployment = %name, source = %source, outcome = "allowed", rule, cidr, to_upstream = t.to_upstream, to_client = t.to_client, duration_ms = ms, "connection closed")
            }
            End::Finished(Err(e)) => {
                tracing::info!(deployment = %name, source = %source, outcome = "allowed", rule, cidr, duration_ms = ms, error = %e, "connection ended with an error")
            }
            End::Revoked(why) => {
                state.metrics.revoked.inc();
                tracing::warn!(deployment = %name, source = %source, outcome = "allowed", rule, cidr, duration_ms = ms, reason = %why, "connection revoked: the rules no longer admit its source");
            }
            End::Idle => {
                tracing::info!(deployment = %name, source = %source, outcome = "allowed", rule, cidr, duration_ms = ms, "connection closed after idle_timeout")
            }
            End::Shutdown => {
                tracing::info!(deployment = %name, source = %source, outcome = "allowed", rule, cidr, duration_ms = ms, "connection closed: shutdown grace period over")
            }
        }
    }
}

/// Resolves when a reload or an expiry no longer admits `source` (and
/// `on_revoke = "close"`); otherwise never.
async fn revoked(shared: &Shared, name: &str, source: std::net::IpAddr) -> Deny {
    let mut rx = shared.generation.subscribe();
    // The first check covers any change made while the connection was
    // being set up (admitted against an older generation).
    let mut first = true;
    loop {
        if !std::mem::replace(&mut first, false) && rx.changed().await.is_err() {
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
