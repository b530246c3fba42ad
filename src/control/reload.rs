//! Reload: files are re-read through the same `config::load` as start-up,
//! and a valid result is compiled and published in one swap; an invalid one
//! changes nothing. Triggers: the file watcher (`crate::control::watch`), SIGHUP,
//! rule expiry and security-group refreshes.
//!
//! One task owns the listeners and publishes every generation, in order.
//! It never reads or compiles on a runtime worker: files are loaded on a
//! thread of their own, bounded by [`LOAD_TIMEOUT`] (a FIFO or a hung
//! network filesystem fails that reload and is abandoned), and compiling
//! runs in `spawn_blocking`. While a load is pending the task still serves
//! expiry and security-group recompiles; reloads asked for meanwhile are
//! merged into one that starts when the pending load ends.

use crate::config::{self, Config, ConfigError};
use crate::control::gauges;
use crate::data::listener::Listeners;
use crate::data::state::{Live, Shared};
use crate::metrics::metrics;
use crate::policy::snapshot::{GroupMembers, Snapshot, StoreEntries};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot};

/// Longest a reload may spend reading and validating files (SPEC 3.9).
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Owns the listeners; lives inside the reload task.
pub struct Reloader {
    shared: Arc<Shared>,
    path: PathBuf,
    listeners: Listeners,
    /// Set once shutdown began: nothing is reloaded or re-bound after that.
    stopped: bool,
}

/// What a load thread found.
enum Loaded {
    /// The files are byte for byte those in force.
    Unchanged,
    Invalid(ConfigError),
    Valid(Box<Config>),
}

/// A load running on its own thread.
struct Pending {
    result: oneshot::Receiver<Loaded>,
    deadline: tokio::time::Instant,
    started: Instant,
    why: String,
    waiters: Vec<oneshot::Sender<bool>>,
}

/// A reload asked for while another was pending (several merge into one).
struct Queued {
    force: bool,
    why: String,
    waiters: Vec<oneshot::Sender<bool>>,
}

enum Request {
    Reload {
        force: bool,
        why: String,
        done: Option<oneshot::Sender<bool>>,
    },
    Recompile {
        resolved: Option<Arc<GroupMembers>>,
        /// New fleet-store entries (SPEC 7); None keeps those in force.
        store: Option<Arc<StoreEntries>>,
        /// Only if this config is still the one in force.
        only_for: Option<Arc<Config>>,
        why: &'static str,
        done: oneshot::Sender<bool>,
    },
    Stop(oneshot::Sender<()>),
}

/// The handle every trigger uses; cheap to clone.
#[derive(Clone)]
pub struct Reloads {
    tx: mpsc::UnboundedSender<Request>,
}

impl Reloads {
    /// Starts the reload task, which owns `reloader` from now on.
    pub fn start(reloader: Reloader) -> Reloads {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(reloader.run(rx));
        Reloads { tx }
    }

    /// Asks for a reload and returns at once (usable from any thread).
    /// Unless `force`, nothing happens when the files' bytes are unchanged.
    pub fn request(&self, force: bool, why: &str) {
        let _ = self.tx.send(Request::Reload {
            force,
            why: why.to_string(),
            done: None,
        });
    }

    /// Reloads and waits: whether a new generation was published.
    pub async fn reload(&self, force: bool, why: &str) -> bool {
        let (done, rx) = oneshot::channel();
        let sent = self.tx.send(Request::Reload {
            force,
            why: why.to_string(),
            done: Some(done),
        });
        sent.is_ok() && rx.await.unwrap_or(false)
    }

    /// Rebuilds the current generation at a new instant (rules expire) or
    /// with new security-group members, without reading files; returns
    /// once it is published.
    pub async fn recompile(&self, resolved: Option<Arc<GroupMembers>>, why: &'static str) -> bool {
        self.ask_recompile(resolved, None, None, why).await
    }

    /// Publishes the fleet store's entries (SPEC 7): one swap, revocation
    /// included, but not a config reload. Returns once it is published.
    pub async fn apply_store(&self, entries: Arc<StoreEntries>) -> bool {
        self.ask_recompile(None, Some(entries), None, STORE_CHANGE)
            .await
    }

    /// Applies EC2 members resolved under `config`, unless a reload replaced
    /// that config meanwhile (the next refresh resolves for the new one).
    pub async fn apply_groups(&self, config: &Arc<Config>, resolved: GroupMembers) -> bool {
        self.ask_recompile(
            Some(Arc::new(resolved)),
            None,
            Some(config.clone()),
            "security groups refreshed",
        )
        .await
    }

    async fn ask_recompile(
        &self,
        resolved: Option<Arc<GroupMembers>>,
        store: Option<Arc<StoreEntries>>,
        only_for: Option<Arc<Config>>,
        why: &'static str,
    ) -> bool {
        let (done, rx) = oneshot::channel();
        let sent = self.tx.send(Request::Recompile {
            resolved,
            store,
            only_for,
            why,
            done,
        });
        sent.is_ok() && rx.await.unwrap_or(false)
    }

    /// Shutdown: closes every listener; later reloads change nothing.
    pub async fn stop(&self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Request::Stop(done)).is_ok() {
            let _ = rx.await;
        }
    }
}

impl Reloader {
    pub fn new(shared: Arc<Shared>, path: PathBuf, listeners: Listeners) -> Self {
        Reloader {
            shared,
            path,
            listeners,
            stopped: false,
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Request>) {
        let mut pending: Option<Pending> = None;
        let mut queued: Option<Queued> = None;
        loop {
            let request = tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => r,
                    None => return,
                },
                outcome = wait(&mut pending), if pending.is_some() => {
                    if let Some(p) = pending.take() {
                        self.finish(p, outcome).await;
                    }
                    if let Some(q) = queued.take() {
                        pending = self.start_load(q);
                    }
                    continue;
                }
            };
            match request {
                Request::Reload { force, why, done } => {
                    let waiters: Vec<_> = done.into_iter().collect();
                    match (&pending, &mut queued) {
                        (None, _) => {
                            pending = self.start_load(Queued {
                                force,
                                why,
                                waiters,
                            })
                        }
                        (Some(_), Some(q)) => {
                            q.force |= force;
                            q.why = why;
                            q.waiters.extend(waiters);
                        }
                        (Some(_), None) => {
                            queued = Some(Queued {
                                force,
                                why,
                                waiters,
                            })
                        }
                    }
                }
                Request::Recompile {
                    resolved,
                    store,
                    only_for,
                    why,
                    done,
                } => {
                    let published = self.recompile(resolved, store, only_for, why).await;
                    let _ = done.send(published);
                }
                Request::Stop(done) => {
                    self.stopped = true;
                    self.listeners.close_all();
                    // Waiters of a pending or queued reload hear "not published".
                    pending = None;
                    queued = None;
                    let _ = done.send(());
                }
            }
        }
    }

    /// Starts loading the files on a thread of their own.
    fn start_load(&mut self, q: Queued) -> Option<Pending> {
        if self.stopped {
            return None;
        }
        let current = self.shared.live.load_full();
        let files = current.snap.config.files.clone();
        let in_force = current.snap.config.fingerprint;
        drop(current);
        let path = self.path.clone();
        let force = q.force;
        let (tx, result) = oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("moat-load".into())
            .spawn(move || {
                if !force && config::fingerprint(&files) == Some(in_force) {
                    let _ = tx.send(Loaded::Unchanged);
                    return;
                }
                crate::control::systemd::reloading();
                let loaded = match config::load(&path, SystemTime::now()) {
                    Err(e) => Loaded::Invalid(e),
                    Ok(c) if !force && c.fingerprint == in_force => Loaded::Unchanged,
                    Ok(c) => Loaded::Valid(Box::new(c)),
                };
                let _ = tx.send(loaded);
            });
        if let Err(e) = spawned {
            tracing::error!(trigger = %q.why, error = %e, "reload refused, running config kept: cannot start a thread to read the files");
            count(false);
            notify(q.waiters, false);
            return None;
        }
        Some(Pending {
            result,
            deadline: tokio::time::Instant::now() + LOAD_TIMEOUT,
            started: Instant::now(),
            why: q.why,
            waiters: q.waiters,
        })
    }

    /// Ends a load: publishes a valid config, and counts and logs the outcome.
    async fn finish(&mut self, p: Pending, outcome: Outcome) {
        let why = p.why.as_str();
        let published = match outcome {
            Outcome::TimedOut => {
                let files = config::files::slow_reads(LOAD_TIMEOUT / 2);
                let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
                tracing::error!(
                    trigger = why,
                    blocked_on = %files.join(", "),
                    "reload refused, running config kept: reading the files took longer than {}s (a FIFO, or a hung network filesystem?); the read is abandoned",
                    LOAD_TIMEOUT.as_secs()
                );
                false
            }
            Outcome::Died => {
                tracing::error!(trigger = why, "reload refused, running config kept: loading the files failed unexpectedly (see the panic above)");
                false
            }
            Outcome::Done(Loaded::Unchanged) => {
                // The files are those in force again (say, a bad edit reverted).
                metrics().last_reload_successful.set(1);
                tracing::debug!(trigger = why, "files unchanged; nothing to reload");
                crate::control::systemd::ready();
                notify(p.waiters, false);
                return;
            }
            Outcome::Done(Loaded::Invalid(e)) => {
                for d in &e.errors {
                    tracing::error!(trigger = why, "reload refused, running config kept: {d}");
                }
                false
            }
            Outcome::Done(Loaded::Valid(cfg)) if !self.stopped => {
                self.apply(*cfg, why, p.started).await
            }
            Outcome::Done(Loaded::Valid(_)) => false,
        };
        count(published);
        crate::control::systemd::ready();
        notify(p.waiters, published);
    }

    async fn apply(&mut self, cfg: Config, why: &str, started: Instant) -> bool {
        for w in &cfg.warnings {
            tracing::warn!("{w}");
        }
        let current = self.shared.live.load_full();
        // Members learned from EC2 carry over only while a resolver is
        // configured, and only for groups still referenced.
        let resolved: GroupMembers = match cfg.security_groups.aws {
            Some(_) => {
                let wanted = crate::policy::groups::referenced(&cfg);
                current
                    .snap
                    .resolved
                    .iter()
                    .filter(|(k, _)| wanted.contains(*k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            }
            None => GroupMembers::new(),
        };
        // Fleet-store entries carry over while a store is configured (its
        // task resyncs when the settings change).
        let store = match cfg.store {
            Some(_) => current.snap.store.clone(),
            None => Arc::default(),
        };
        let Some(snap) = compile(Arc::new(cfg), Arc::new(resolved), store).await else {
            tracing::error!(
                trigger = why,
                "reload refused, running config kept: compiling the rules failed"
            );
            return false;
        };
        let prepared = match self.listeners.prepare(&snap.config.listeners) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(trigger = why, "reload refused, running config kept: {e}");
                return false;
            }
        };
        let live = Live::build(snap, &current.deployments);
        let Some(live) = with_gauges(live).await else {
            return false;
        };
        let listeners = live.snap.config.listeners.clone();
        self.shared.publish(live);
        self.listeners.commit(&self.shared, prepared, &listeners);
        tracing::info!(
            trigger = why,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "configuration reloaded"
        );
        true
    }

    async fn recompile(
        &mut self,
        resolved: Option<Arc<GroupMembers>>,
        store: Option<Arc<StoreEntries>>,
        only_for: Option<Arc<Config>>,
        why: &'static str,
    ) -> bool {
        if self.stopped {
            return false;
        }
        let current = self.shared.live.load_full();
        if let Some(config) = &only_for {
            let same = Arc::ptr_eq(&current.snap.config, config);
            if !same || resolved.as_ref() == Some(&current.snap.resolved) {
                return false;
            }
        }
        let resolved = resolved.unwrap_or_else(|| current.snap.resolved.clone());
        let store = store.unwrap_or_else(|| current.snap.store.clone());
        let Some(snap) = compile(current.snap.config.clone(), resolved, store).await else {
            tracing::error!(
                trigger = why,
                "compiling the rules failed; the rules in force are kept"
            );
            return false;
        };
        let live = Live::build(snap, &current.deployments);
        let Some(live) = with_gauges(live).await else {
            return false;
        };
        self.shared.publish(live);
        if why == STORE_CHANGE {
            tracing::debug!(trigger = why, "rules recompiled");
        } else {
            tracing::info!(trigger = why, "rules recompiled");
        }
        true
    }
}

/// How a pending load ended.
enum Outcome {
    Done(Loaded),
    /// Its deadline passed; the thread is abandoned.
    TimedOut,
    /// The thread ended without an answer (a panic).
    Died,
}

async fn wait(pending: &mut Option<Pending>) -> Outcome {
    let Some(p) = pending.as_mut() else {
        return std::future::pending().await;
    };
    match tokio::time::timeout_at(p.deadline, &mut p.result).await {
        Ok(Ok(loaded)) => Outcome::Done(loaded),
        Ok(Err(_)) => Outcome::Died,
        Err(_) => Outcome::TimedOut,
    }
}

/// The trigger of fleet-store changes (logged at debug: one per write).
const STORE_CHANGE: &str = "fleet store change";

/// Compiles off the runtime's workers (a big table takes a while).
async fn compile(
    config: Arc<Config>,
    resolved: Arc<GroupMembers>,
    store: Arc<StoreEntries>,
) -> Option<Snapshot> {
    tokio::task::spawn_blocking(move || {
        Snapshot::compile(config, resolved, store, SystemTime::now())
    })
    .await
    .ok()
}

/// Sets the gauges of a generation before it is published, off the
/// runtime's workers (counting members sorts them).
async fn with_gauges(live: Live) -> Option<Live> {
    tokio::task::spawn_blocking(move || {
        gauges::update(&live);
        live
    })
    .await
    .ok()
}

fn count(published: bool) {
    let m = metrics();
    if published {
        m.reloads.with_label_values(&["success"]).inc();
        gauges::mark_success();
    } else {
        m.reloads.with_label_values(&["failure"]).inc();
        m.last_reload_successful.set(0);
    }
}

fn notify(waiters: Vec<oneshot::Sender<bool>>, published: bool) {
    for w in waiters {
        let _ = w.send(published);
    }
}

/// Wake a little after an expiry instant, so the rule is past it for sure.
const EXPIRY_MARGIN: Duration = Duration::from_millis(2);

/// Rebuilds the rules when the next `expires` instant passes.
pub async fn expire_rules(shared: Arc<Shared>, reloads: Reloads) {
    let mut generation = shared.generation.subscribe();
    loop {
        let next = shared.live.load().snap.next_expiry;
        let wait = next.map(|t| {
            t.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                + EXPIRY_MARGIN
        });
        tokio::select! {
            _ = async { match wait { Some(d) => tokio::time::sleep(d).await, None => std::future::pending().await } } => {
                // Not published (shutdown began): wait for a new generation
                // rather than retrying the past instant every few ms.
                if !reloads.recompile(None, "rule expired").await
                    && generation.changed().await.is_err()
                {
                    return;
                }
            }
            r = generation.changed() => if r.is_err() { return },
        }
    }
}

/// Summarises refusals that the rate limit kept out of the log.
pub async fn summarise_refusals(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tick.tick().await;
        for s in shared.live.load().deployments.iter() {
            let n = s.refusals.take_suppressed();
            if n > 0 {
                tracing::info!(deployment = %s.name, suppressed = n, "{n} more refused connections not logged");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn mkfifo(path: &std::path::Path) {
        let ok = std::process::Command::new("mkfifo").arg(path).status();
        assert!(ok.expect("mkfifo runs").success());
    }

    /// A load stuck on a FIFO fails at its deadline (paused time runs to it
    /// at once) and counts a failure; a recompile asked for meanwhile is
    /// served first, never queued behind it; a later reload of a fixed file
    /// applies.
    #[tokio::test(start_paused = true)]
    async fn a_blocked_load_fails_at_its_deadline_without_holding_recompiles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moat.toml");
        let sg = dir.path().join("sg.toml");
        let members = |m: &str| {
            format!("[[group]]\naws_account = \"123456789012\"\nid = \"sg-0a1b2c3d\"\nmembers = [\"{m}\"]\n")
        };
        std::fs::write(&sg, members("192.0.2.1")).unwrap();
        std::fs::write(&path, "[security_groups]\nfile = \"sg.toml\"\n\n[[deployment]]\nname = \"d\"\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:27018\"\n\n[[deployment.allow]]\naws_account = \"123456789012\"\nsecurity_group = \"sg-0a1b2c3d\"\n").unwrap();
        let config = Arc::new(config::load(&path, SystemTime::now()).unwrap());
        let snap = Snapshot::compile(config, Arc::default(), Arc::default(), SystemTime::now());
        let shared = Shared::new(Live::build(snap, &[]));
        let reloads = Reloads::start(Reloader::new(shared.clone(), path, Listeners::default()));
        let failures = || metrics().reloads.with_label_values(&["failure"]).get();
        let before = failures();
        let fifo = dir.path().join("sg.fifo");
        mkfifo(&fifo);
        std::fs::rename(&fifo, &sg).unwrap();

        let order = AtomicUsize::new(0);
        let (reloaded, recompiled) = tokio::join!(
            async {
                let r = reloads.reload(false, "test: FIFO").await;
                (r, order.fetch_add(1, Ordering::SeqCst))
            },
            async {
                tokio::task::yield_now().await;
                let r = reloads.recompile(None, "test: expiry").await;
                (r, order.fetch_add(1, Ordering::SeqCst))
            }
        );
        assert_eq!(
            recompiled,
            (true, 0),
            "the recompile waited for the blocked load"
        );
        assert_eq!(reloaded, (false, 1));
        assert!(failures() > before);
        assert_eq!(metrics().last_reload_successful.get(), 0);

        // Fixed: the next reload applies (a real read: real time from here).
        tokio::time::resume();
        std::fs::write(dir.path().join("sg.new"), members("10.0.0.0/8")).unwrap();
        std::fs::rename(dir.path().join("sg.new"), &sg).unwrap();
        assert!(reloads.reload(false, "test: fixed").await);
        let live = shared.live.load();
        assert!(live.snap.compiled[0].table.prefixes() == 1);
        assert_eq!(
            live.snap
                .config
                .security_groups
                .members
                .values()
                .next()
                .unwrap()[0]
                .to_string(),
            "10.0.0.0/8"
        );
    }
}
