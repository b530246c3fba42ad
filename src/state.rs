//! The daemon's shared state: the current generation (snapshot plus the
//! per-deployment runtime state that outlives reloads) behind one `ArcSwap`,
//! the change signal live connections watch, and connection limits.

use crate::metrics::DeploymentMetrics;
use crate::snapshot::Snapshot;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::watch;

/// One generation of configuration as connections see it.
pub struct Live {
    pub snap: Snapshot,
    /// Parallel to `snap.config.deployments`.
    pub deployments: Vec<Arc<DeploymentState>>,
}

/// Runtime state of a deployment, kept across reloads by name.
pub struct DeploymentState {
    pub name: Arc<str>,
    pub metrics: DeploymentMetrics,
    active: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    pub refusals: RefusalLog,
}

impl DeploymentState {
    pub fn new(name: &str) -> Self {
        DeploymentState {
            name: name.into(),
            metrics: DeploymentMetrics::new(name),
            active: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            refusals: RefusalLog::default(),
        }
    }
}

pub struct Shared {
    pub live: ArcSwap<Live>,
    /// Bumped after every swap; live connections re-check their permits.
    pub generation: watch::Sender<u64>,
    global_active: AtomicUsize,
    /// Running, draining or closing: the lifecycle every task watches.
    pub phase: watch::Sender<crate::conn::Phase>,
    /// Set once every listener is bound (for `/readyz`).
    pub ready: std::sync::atomic::AtomicBool,
    /// When the daemon started, for the coarse clocks below.
    pub epoch: Instant,
    /// Live connections (for the API's `/connections`).
    pub registry: crate::registry::Registry,
}

impl Shared {
    pub fn new(live: Live) -> Arc<Self> {
        Arc::new(Shared {
            live: ArcSwap::from_pointee(live),
            generation: watch::channel(0).0,
            global_active: AtomicUsize::new(0),
            phase: watch::channel(crate::conn::Phase::Running).0,
            ready: std::sync::atomic::AtomicBool::new(false),
            epoch: Instant::now(),
            registry: Default::default(),
        })
    }

    /// Publishes a new generation and tells live connections.
    pub fn publish(&self, live: Live) {
        self.live.store(Arc::new(live));
        self.generation.send_modify(|g| *g += 1);
    }

    /// Takes a connection slot under the global, deployment and per-source
    /// caps; the slot is released when the returned guard drops.
    pub fn acquire(self: &Arc<Self>, live: &Live, dep: usize, source: IpAddr) -> Option<Slot> {
        let config = &live.snap.config;
        let limits = &config.deployments[dep].limits;
        let state = &live.deployments[dep];
        let global_cap = config.limits.max_connections.unwrap_or(u32::MAX) as usize;
        if !take(&self.global_active, global_cap) {
            return None;
        }
        let own_cap = limits.max_connections.unwrap_or(u32::MAX) as usize;
        if !take(&state.active, own_cap) {
            self.global_active.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        {
            let mut per_ip = state.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            let n = per_ip.entry(source).or_insert(0);
            if *n >= limits.max_connections_per_ip {
                drop(per_ip);
                state.active.fetch_sub(1, Ordering::AcqRel);
                self.global_active.fetch_sub(1, Ordering::AcqRel);
                return None;
            }
            *n += 1;
        }
        Some(Slot {
            shared: self.clone(),
            state: state.clone(),
            source,
        })
    }

    pub fn active_connections(&self) -> usize {
        self.global_active.load(Ordering::Acquire)
    }

    /// Milliseconds since start: a cheap clock for idle tracking.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

fn take(counter: &AtomicUsize, cap: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < cap).then_some(n + 1)
        })
        .is_ok()
}

/// A held connection slot.
pub struct Slot {
    shared: Arc<Shared>,
    pub state: Arc<DeploymentState>,
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut per_ip = self.state.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = per_ip.get_mut(&self.source) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&self.source);
                }
            }
        }
        self.state.active.fetch_sub(1, Ordering::AcqRel);
        self.shared.global_active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Rate limit for refusal log lines: a few per second per deployment, the
/// rest summarised as "N more refused".
#[derive(Default)]
pub struct RefusalLog {
    /// Second (since start) of the current window, and lines logged in it.
    window: AtomicU64,
    logged: AtomicU64,
    suppressed: AtomicU64,
}

/// Refusal lines logged per deployment per second before summarising.
const REFUSALS_PER_SECOND: u64 = 5;

impl RefusalLog {
    /// Whether this refusal may be logged in full now.
    pub fn allow(&self, now_ms: u64) -> bool {
        let second = now_ms / 1000;
        if self.window.swap(second, Ordering::AcqRel) != second {
            self.logged.store(0, Ordering::Release);
        }
        if self.logged.fetch_add(1, Ordering::AcqRel) < REFUSALS_PER_SECOND {
            true
        } else {
            self.suppressed.fetch_add(1, Ordering::AcqRel);
            false
        }
    }

    /// Refusals not logged since the last call.
    pub fn take_suppressed(&self) -> u64 {
        self.suppressed.swap(0, Ordering::AcqRel)
    }
}
