//! The forwarding phase of an admitted connection: bytes both ways until the
//! connection ends, its source is revoked (a reload, an expiry, a store
//! update, or `DELETE /connections/{id}`), it idles out, or the shutdown
//! grace period ends; then one log line. A session keeps what it needs by
//! value, never a whole config generation, so old rule tables are freed.

use crate::config::OnRevoke;
use crate::data::conn::Phase;
use crate::data::forward::{self, Activity, Counter, Meter, Totals};
use crate::data::registry::Registration;
use crate::data::rewind::Rewind;
use crate::data::state::{Shared, Slot};
use crate::policy::admission::{readmit, Deny};
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// The client side after admission (and TLS).
pub enum Client {
    Plain(TcpStream),
    Tls(Box<TlsStream<Rewind<TcpStream>>>),
}

/// An admitted, connected pair, ready to forward.
pub struct Session {
    pub shared: Arc<Shared>,
    pub idle_timeout: Option<Duration>,
    /// The connection's entry in the live-connection registry.
    pub registration: Registration,
    /// Holds the connection's place under the limits until it ends.
    pub slot: Slot,
    pub client: Client,
    /// Plaintext read during set-up, sent upstream first.
    pub prefix: Vec<u8>,
    pub upstream: TcpStream,
}

/// Why a forwarded connection ended.
enum End {
    Finished(io::Result<Totals>),
    Revoked(String),
    Idle,
    Shutdown,
}

impl Session {
    pub async fn run(self) {
        let Session {
            shared,
            idle_timeout,
            registration,
            slot,
            client,
            prefix,
            mut upstream,
        } = self;
        let state = &slot.state;
        let record = &registration.record;
        let source = record.source;
        let activity = Activity::default();
        let clock_shared = shared.clone();
        let clock = move || clock_shared.now_ms();
        activity.touch(clock());
        let meter = Meter {
            to_upstream: Counter {
                metric: &state.metrics.to_upstream,
                conn: &record.to_upstream,
            },
            to_client: Counter {
                metric: &state.metrics.to_client,
                conn: &record.to_client,
            },
            activity: &activity,
            clock: &clock,
        };
        let forward = async {
            match client {
                // TCP_NODELAY is inherited from the listening socket.
                Client::Plain(mut c) => {
                    forward::plain(&mut c, &prefix, &mut upstream, &meter).await
                }
                Client::Tls(c) => Box::pin(forward::stream(*c, &mut upstream, &meter)).await,
            }
        };
        // Revocation wins over data: checked first, before any byte moves.
        let end = tokio::select! {
            biased;
            d = revoked(&shared, &state.name, source) => End::Revoked(d.to_string()),
            _ = record.closed() => End::Revoked("closed through the API".into()),
            _ = closing(&shared) => End::Shutdown,
            _ = idle(&activity, idle_timeout, &clock) => End::Idle,
            r = forward => End::Finished(r),
        };
        if matches!(end, End::Revoked(_) | End::Shutdown) {
            // Not one more byte: drop what is still queued for the upstream
            // (a reset) instead of flushing it before the FIN.
            let _ = socket2::SockRef::from(&upstream).set_linger(Some(Duration::ZERO));
        }
        let ms = record.since.elapsed().map_or(0, |d| d.as_millis() as u64);
        let name = &state.name;
        let rule = &record.description;
        let cidr = &record.cidr;
        match end {
            End::Finished(Ok(t)) => {
                tracing::info!(deployment = %name, source = %source, outcome = "allowed", rule, cidr, to_upstream = t.to_upstream, to_client = t.to_client, duration_ms = ms, "connection closed")
            }
            End::Finished(Err(e)) => {
                tracing::info!(deployment = %name, source = %source, outcome = "allowed", rule, cidr, duration_ms = ms, error = %e, "connection ended with an error")
            }
            End::Revoked(why) => {
                state.metrics.revoked.inc();
                tracing::warn!(deployment = %name, source = %source, outcome = "allowed", rule, cidr, duration_ms = ms, reason = %why, "connection revoked");
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

/// Resolves when the rules in force no longer admit `source` (and
/// `on_revoke = "close"`); otherwise never. The first check runs at once:
/// it covers a change made while the upstream was being dialled.
async fn revoked(shared: &Shared, name: &str, source: IpAddr) -> Deny {
    let mut rx = shared.generation.subscribe();
    rx.mark_changed();
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
