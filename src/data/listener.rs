//! Listening sockets: bound with the right options, each with an accept loop
//! that never dies of one connection, and reconciled with the config on reload.

use crate::config::ListenerSpec;
use crate::data::state::Shared;
use socket2::{Domain, Protocol, Socket, Type};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Pending connections the kernel may queue per listener.
const BACKLOG: i32 = 4096;
/// Keepalive: probe after 2 minutes of silence, every 20 s, 6 times.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(120);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_PROBES: u32 = 6;
/// Pause after the process runs out of file descriptors or memory.
const EXHAUSTED_BACKOFF: Duration = Duration::from_millis(100);

/// Binds one listener; `[::]` is dual-stack unless `v6_only`.
pub fn bind(addr: SocketAddr, v6_only: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(v6_only)?;
    }
    socket.set_nonblocking(true)?;
    // Inherited by every accepted socket (no syscall per connection):
    // TCP_NODELAY, and keepalive so that a client host that vanishes
    // without FIN or RST frees its slot and its upstream connection.
    socket.set_tcp_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    socket.set_tcp_keepalive(&keepalive)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// The running accept loops, keyed by address and IPv6-only flag.
#[derive(Default)]
pub struct Listeners {
    running: HashMap<(SocketAddr, bool), JoinHandle<()>>,
}

/// Sockets bound for a new generation, not yet accepting.
pub struct Prepared {
    bound: Vec<((SocketAddr, bool), std::net::TcpListener)>,
}

impl Listeners {
    /// Binds every listener of `specs` that is not running yet. If any
    /// fails, the others are dropped and nothing changes.
    pub fn prepare(&self, specs: &[ListenerSpec]) -> Result<Prepared, String> {
        let mut bound = Vec::new();
        for s in specs {
            let key = (s.addr, s.v6_only);
            if self.running.contains_key(&key) {
                continue;
            }
            match bind(s.addr, s.v6_only) {
                Ok(l) => bound.push((key, l)),
                Err(e) => return Err(format!("cannot listen on {}: {e}", s.addr)),
            }
        }
        Ok(Prepared { bound })
    }

    /// Starts accepting on the prepared sockets and stops the listeners no
    /// longer in `specs`. Unchanged listeners keep their sockets.
    pub fn commit(&mut self, shared: &Arc<Shared>, prepared: Prepared, specs: &[ListenerSpec]) {
        let wanted: Vec<(SocketAddr, bool)> = specs.iter().map(|s| (s.addr, s.v6_only)).collect();
        self.running.retain(|key, handle| {
            let keep = wanted.contains(key);
            if !keep {
                handle.abort();
                tracing::info!(listen = %key.0, "listener removed");
            }
            keep
        });
        for (key, l) in prepared.bound {
            match TcpListener::from_std(l) {
                Ok(l) => {
                    tracing::info!(listen = %key.0, "listening");
                    self.running
                        .insert(key, tokio::spawn(accept_loop(shared.clone(), l, key.0)));
                }
                Err(e) => tracing::error!(listen = %key.0, error = %e, "cannot accept on listener"),
            }
        }
    }

    /// Stops every accept loop (new connections are refused by the kernel).
    pub fn close_all(&mut self) {
        for (_, h) in self.running.drain() {
            h.abort();
        }
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, addr: SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(crate::data::conn::serve(shared.clone(), stream, peer, addr));
            }
            Err(e) if exhausted(&e) => {
                tracing::warn!(listen = %addr, error = %e, "cannot accept: out of resources; backing off");
                tokio::time::sleep(EXHAUSTED_BACKOFF).await;
            }
            Err(e) => tracing::debug!(listen = %addr, error = %e, "accept failed"),
        }
    }
}

/// EMFILE, ENFILE, ENOBUFS, ENOMEM: retrying at once would spin.
fn exhausted(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23) | Some(24) | Some(105) | Some(12))
}
