//! The daemon's shared state: the current generation (snapshot plus the
//! per-deployment runtime state that outlives reloads) behind one `ArcSwap`,
//! the change signal live connections watch, and connection limits.

use crate::config::Limits;
use crate::metrics::{metrics, DeploymentMetrics};
use crate::policy::snapshot::Snapshot;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Instant;
use tokio::sync::watch;

/// One generation of configuration as connections see it.
pub struct Live {
    pub snap: Snapshot,
    /// Parallel to `snap.config.deployments`.
    pub deployments: Vec<Arc<DeploymentState>>,
}

impl Live {
    /// Builds a generation. A deployment keeps its runtime state (counts,
    /// metrics) for as long as it is listed or still has connections open, so
    /// removing and re-adding it never resets its counts.
    pub fn build(snap: Snapshot, old: &[Arc<DeploymentState>]) -> Live {
        let deployments: Vec<Arc<DeploymentState>> = snap
            .config
            .deployments
            .iter()
            .map(|d| DeploymentState::for_name(&d.name))
            .collect();
        let m = metrics();
        for s in old {
            if !deployments.iter().any(|n| n.name == s.name) {
                // Configuration gauges go now; traffic series go with the state.
                let _ = m.rules.remove_label_values(&[&s.name]);
                let _ = m.cert_expiry.remove_label_values(&[&s.name]);
            }
        }
        Live { snap, deployments }
    }
}

/// Runtime state of a deployment, kept by name for as long as anything
/// holds it: a generation that lists the deployment, or a connection still
/// open to it. A deployment removed and added again while its connections
/// run on gets the same state back, so its counts stay true.
pub struct DeploymentState {
    pub name: Arc<str>,
    pub metrics: DeploymentMetrics,
    active: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    pub refusals: RefusalLog,
    /// Rate limit of "upstream unreachable" lines.
    pub upstream_errors: RefusalLog,
}

/// Every deployment state alive, by name.
static STATES: LazyLock<Mutex<HashMap<Arc<str>, Weak<DeploymentState>>>> =
    LazyLock::new(Default::default);

impl DeploymentState {
    /// The state of deployment `name`: the one still alive, or a new one.
    pub fn for_name(name: &str) -> Arc<Self> {
        let mut states = STATES.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = states.get(name).and_then(Weak::upgrade) {
            return s;
        }
        let s = Arc::new(DeploymentState {
            name: name.into(),
            metrics: DeploymentMetrics::new(name),
            active: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            refusals: RefusalLog::default(),
            upstream_errors: RefusalLog::default(),
        });
        states.insert(s.name.clone(), Arc::downgrade(&s));
        s
    }

    /// Connections open to this deployment (set-up and forwarding).
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Open connections from `source`.
    pub fn active_from(&self, source: IpAddr) -> u32 {
        let per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        per_ip.get(&source).copied().unwrap_or(0)
    }
}

impl Drop for DeploymentState {
    /// The last holder is gone: drop the deployment's series, unless a new
    /// state of the same name took its place meanwhile.
    fn drop(&mut self) {
        let mut states = STATES.lock().unwrap_or_else(|p| p.into_inner());
        let ours = states
            .get(&self.name)
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), self));
        if ours {
            states.remove(&self.name);
            DeploymentMetrics::remove(&self.name);
        }
    }
}

pub struct Shared {
    pub live: ArcSwap<Live>,
    /// Bumped after every swap; live connections re-check their permits.
    pub generation: watch::Sender<u64>,
    global_active: AtomicUsize,
    /// Running, draining or closing: the lifecycle every task watches.
    pub phase: watch::Sender<crate::data::conn::Phase>,
    /// Set once every listener is bound (for `/readyz`).
    pub ready: std::sync::atomic::AtomicBool,
    /// When the daemon started, for the coarse clocks below.
    pub epoch: Instant,
    /// Live (forwarding) connections, for the API.
    pub registry: Arc<crate::data::registry::Registry>,
    /// Connections per source on an address several deployments share,
    /// before the ClientHello names their deployment (no deployment's caps
    /// are touched until then).
    unrouted: Mutex<HashMap<(SocketAddr, IpAddr), u32>>,
}

impl Shared {
    pub fn new(live: Live) -> Arc<Self> {
        Arc::new(Shared {
            live: ArcSwap::from_pointee(live),
            generation: watch::channel(0).0,
            global_active: AtomicUsize::new(0),
            phase: watch::channel(crate::data::conn::Phase::Running).0,
            ready: std::sync::atomic::AtomicBool::new(false),
            epoch: Instant::now(),
            registry: Arc::default(),
            unrouted: Mutex::default(),
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
        let global_cap = live.snap.config.limits.max_connections.unwrap_or(u32::MAX) as usize;
        if !take(&self.global_active, global_cap) {
            return None;
        }
        let state = live.deployments[dep].clone();
        if !enter(&state, &live.snap.config.deployments[dep].limits, source) {
            self.global_active.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot {
            shared: self.clone(),
            state,
            source,
            unrouted: None,
        })
    }

    /// Takes a slot on `listen`, an address several deployments share, for
    /// a connection whose deployment is not known yet: the global cap and a
    /// per-source cap on that address (`per_ip`, the largest of its
    /// deployments'). `charge` is the deployment whose counters a failure
    /// before routing is charged to; its own caps are not touched.
    pub fn acquire_unrouted(
        self: &Arc<Self>,
        live: &Live,
        listen: SocketAddr,
        charge: usize,
        per_ip: u32,
        source: IpAddr,
    ) -> Option<Slot> {
        let global_cap = live.snap.config.limits.max_connections.unwrap_or(u32::MAX) as usize;
        if !take(&self.global_active, global_cap) {
            return None;
        }
        if !self.enter_unrouted(listen, source, per_ip) {
            self.global_active.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot {
            shared: self.clone(),
            state: live.deployments[charge].clone(),
            source,
            unrouted: Some((listen, per_ip)),
        })
    }

    fn enter_unrouted(&self, listen: SocketAddr, source: IpAddr, cap: u32) -> bool {
        let mut map = self.unrouted.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry((listen, source)).or_insert(0);
        if *n >= cap {
            if *n == 0 {
                map.remove(&(listen, source));
            }
            return false;
        }
        *n += 1;
        true
    }

    fn leave_unrouted(&self, listen: SocketAddr, source: IpAddr) {
        let mut map = self.unrouted.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&(listen, source)) {
            *n -= 1;
            if *n == 0 {
                map.remove(&(listen, source));
            }
        }
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

/// Counts a connection from `source` into a deployment under its caps.
fn enter(state: &DeploymentState, limits: &Limits, source: IpAddr) -> bool {
    let own_cap = limits.max_connections.unwrap_or(u32::MAX) as usize;
    if !take(&state.active, own_cap) {
        return false;
    }
    let mut per_ip = state.per_ip.lock().unwrap_or_else(|p| p.into_inner());
    let n = per_ip.entry(source).or_insert(0);
    if *n >= limits.max_connections_per_ip {
        if *n == 0 {
            per_ip.remove(&source);
        }
        drop(per_ip);
        state.active.fetch_sub(1, Ordering::AcqRel);
        return false;
    }
    *n += 1;
    drop(per_ip);
    state.metrics.active.inc();
    true
}

/// Undoes `enter`.
fn leave(state: &DeploymentState, source: IpAddr) {
    {
        let mut per_ip = state.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_ip.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&source);
            }
        }
    }
    state.active.fetch_sub(1, Ordering::AcqRel);
    state.metrics.active.dec();
}

/// A held connection slot: one place under the global cap, and one under
/// a deployment's caps for one source address. Taken at accept, so every
/// phase of a connection counts.
pub struct Slot {
    shared: Arc<Shared>,
    /// The deployment counted (or, while unrouted, charged with failures).
    pub state: Arc<DeploymentState>,
    source: IpAddr,
    /// Set while the connection waits on a shared address for its
    /// ClientHello: the address and its per-source cap.
    unrouted: Option<(SocketAddr, u32)>,
}

impl Slot {
    /// Moves the slot to deployment `dep` of `live` and source `source`
    /// (after a PROXY header or SNI routing). On refusal the slot stays
    /// where it was.
    pub fn move_to(&mut self, live: &Live, dep: usize, source: IpAddr) -> bool {
        let state = &live.deployments[dep];
        if self.unrouted.is_none() && Arc::ptr_eq(state, &self.state) && source == self.source {
            return true;
        }
        if !enter(state, &live.snap.config.deployments[dep].limits, source) {
            return false;
        }
        self.release_place();
        self.unrouted = None;
        self.state = state.clone();
        self.source = source;
        true
    }

    /// Counts a still unrouted slot against another source (a trusted
    /// balancer's header named the client).
    pub fn move_unrouted(&mut self, source: IpAddr) -> bool {
        let Some((listen, cap)) = self.unrouted else {
            return false;
        };
        if source == self.source {
            return true;
        }
        if !self.shared.enter_unrouted(listen, source, cap) {
            return false;
        }
        self.shared.leave_unrouted(listen, self.source);
        self.source = source;
        true
    }

    fn release_place(&self) {
        match self.unrouted {
            Some((listen, _)) => self.shared.leave_unrouted(listen, self.source),
            None => leave(&self.state, self.source),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.release_place();
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
