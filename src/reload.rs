//! Reload: files are re-read through the same `config::load` as start-up,
//! and a valid result is compiled and published in one swap; an invalid one
//! changes nothing. Triggers: the directory watcher (in-place writes, editor
//! renames, Kubernetes `..data` symlink swaps), SIGHUP, and rule expiry.

use crate::config::{self, Config};
use crate::listener::Listeners;
use crate::metrics::{metrics, DeploymentMetrics};
use crate::snapshot::{GroupMembers, Snapshot, StoreEntries};
use crate::state::{DeploymentState, Live, Shared};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, Mutex};

/// Quiet time that ends a burst of file events.
const SETTLE: Duration = Duration::from_millis(150);
/// Longest a steady stream of events can postpone a reload.
const SETTLE_MAX: Duration = Duration::from_secs(2);

/// Builds a generation, reusing the runtime state of deployments that stay.
pub fn build_live(snap: Snapshot, old: &[Arc<DeploymentState>]) -> Live {
    let by_name: HashMap<&str, &Arc<DeploymentState>> = old.iter().map(|s| (&*s.name, s)).collect();
    let deployments: Vec<Arc<DeploymentState>> = snap
        .config
        .deployments
        .iter()
        .map(|d| {
            by_name
                .get(d.name.as_str())
                .map_or_else(|| Arc::new(DeploymentState::new(&d.name)), |s| (*s).clone())
        })
        .collect();
    for s in old {
        if !deployments.iter().any(|n| n.name == s.name) {
            DeploymentMetrics::remove(&s.name);
        }
    }
    Live { snap, deployments }
}

/// Gauges that describe the configuration in force.
pub fn update_gauges(live: &Live) {
    let m = metrics();
    for (d, c) in live.snap.config.deployments.iter().zip(&live.snap.compiled) {
        m.rules
            .with_label_values(&[&d.name])
            .set(c.table.prefixes() as i64);
        match d.tls.as_ref().and_then(|t| t.not_after) {
            Some(na) => m.cert_expiry.with_label_values(&[&d.name]).set(na as f64),
            None => {
                let _ = m.cert_expiry.remove_label_values(&[&d.name]);
            }
        }
    }
    let sg = &live.snap.config.security_groups;
    let keys: BTreeSet<_> = sg.members.keys().chain(live.snap.resolved.keys()).collect();
    m.group_members.reset();
    for k in keys {
        let mut nets: Vec<_> = sg
            .members
            .get(k)
            .into_iter()
            .flatten()
            .chain(live.snap.resolved.get(k).into_iter().flatten())
            .collect();
        nets.sort();
        nets.dedup();
        m.group_members
            .with_label_values(&[&k.account, &k.id])
            .set(nets.len() as i64);
    }
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Records a successful load (start-up or reload).
pub fn mark_success() {
    let m = metrics();
    m.last_reload_successful.set(1);
    m.last_reload_success_timestamp.set(now_secs());
}

/// Owns the listeners and serialises every change of generation.
pub struct Reloader {
    shared: Arc<Shared>,
    path: PathBuf,
    listeners: Listeners,
    /// Set once shutdown began: nothing is reloaded or re-bound after that.
    stopped: bool,
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

    /// Shutdown: closes every listener; later reloads change nothing.
    pub fn stop(&mut self) {
        self.stopped = true;
        self.listeners.close_all();
    }

    /// Re-reads the files. Unless `force`, nothing happens when their bytes
    /// are unchanged. Returns whether a new generation was published.
    pub fn reload(&mut self, force: bool, why: &str) -> bool {
        if self.stopped {
            return false;
        }
        let started = Instant::now();
        let current = self.shared.live.load_full();
        if !force
            && config::fingerprint(&current.snap.config.files)
                == Some(current.snap.config.fingerprint)
        {
            // The files are those in force again (say, a bad edit reverted).
            metrics().last_reload_successful.set(1);
            tracing::debug!(trigger = why, "files unchanged; nothing to reload");
            return false;
        }
        crate::systemd::reloading();
        let published = match config::load(&self.path, SystemTime::now()) {
            Err(e) => {
                for d in &e.errors {
                    tracing::error!(trigger = why, "reload refused, running config kept: {d}");
                }
                false
            }
            Ok(cfg) => {
                if !force && cfg.fingerprint == current.snap.config.fingerprint {
                    metrics().last_reload_successful.set(1);
                    crate::systemd::ready();
                    return false;
                }
                self.apply(cfg, &current, why, started)
            }
        };
        let m = metrics();
        if published {
            m.reloads.with_label_values(&["success"]).inc();
            mark_success();
        } else {
            m.reloads.with_label_values(&["failure"]).inc();
            m.last_reload_successful.set(0);
        }
        crate::systemd::ready();
        published
    }

    fn apply(&mut self, cfg: Config, current: &Live, why: &str, started: Instant) -> bool {
        for w in &cfg.warnings {
            tracing::warn!("{w}");
        }
        // Members learned from EC2 carry over only while a resolver is
        // configured, and only for groups still referenced.
        let resolved: GroupMembers = match cfg.security_groups.aws {
            Some(_) => {
                let wanted = crate::groups::referenced(&cfg);
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
        let snap = Snapshot::compile(Arc::new(cfg), Arc::new(resolved), store, SystemTime::now());
        let prepared = match self.listeners.prepare(&snap.config.listeners) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(trigger = why, "reload refused, running config kept: {e}");
                return false;
            }
        };
        let live = build_live(snap, &current.deployments);
        update_gauges(&live);
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

    /// Applies EC2 members resolved under `config`, unless a reload replaced
    /// that config meanwhile (the next refresh resolves for the new one).
    pub fn apply_groups(&mut self, config: &Arc<Config>, resolved: GroupMembers) {
        let current = self.shared.live.load();
        if Arc::ptr_eq(&current.snap.config, config) && *current.snap.resolved != resolved {
            drop(current);
            self.recompile(Some(Arc::new(resolved)), "security groups refreshed");
        }
    }

    /// Rebuilds the current generation at a new instant (rules expire) or
    /// with new security-group members, without re-reading files.
    pub fn recompile(&mut self, resolved: Option<Arc<GroupMembers>>, why: &str) {
        if self.stopped {
            return;
        }
        let current = self.shared.live.load_full();
        let resolved = resolved.unwrap_or_else(|| current.snap.resolved.clone());
        let snap = Snapshot::compile(
            current.snap.config.clone(),
            resolved,
            current.snap.store.clone(),
            SystemTime::now(),
        );
        let live = build_live(snap, &current.deployments);
        update_gauges(&live);
        self.shared.publish(live);
        tracing::info!(trigger = why, "rules recompiled");
    }

    /// Publishes the fleet store's entries (SPEC 7): the running config
    /// compiled with them off the runtime threads, then one swap. Not a
    /// config reload. Returns false after shutdown began.
    pub async fn apply_store(&mut self, store: Arc<StoreEntries>) -> bool {
        if self.stopped {
            return false;
        }
        let current = self.shared.live.load_full();
        let (config, resolved) = (current.snap.config.clone(), current.snap.resolved.clone());
        let compiled = tokio::task::spawn_blocking(move || {
            Snapshot::compile(config, resolved, store, SystemTime::now())
        })
        .await;
        let Ok(snap) = compiled else {
            return false;
        };
        let live = build_live(snap, &current.deployments);
        update_gauges(&live);
        self.shared.publish(live);
        true
    }
}

/// Directories to watch: those of every file the config read.
fn watched_dirs(files: &[PathBuf]) -> BTreeSet<PathBuf> {
    files
        .iter()
        .map(|f| {
            f.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf()
        })
        .collect()
}

/// Whether an event on `path` can change a file in use: one of the files
/// read (by name, as editors rename over it), or Kubernetes' `..data` link
/// and its timestamped directories. Other files in the same directories (a
/// log file, an editor's swap file) are ignored.
fn relevant(path: &Path, names: &BTreeSet<std::ffi::OsString>) -> bool {
    match path.file_name() {
        Some(name) => names.contains(name) || name.as_encoded_bytes().starts_with(b".."),
        None => true,
    }
}

/// Watches the directories of every file in use and reloads after a burst
/// of changes settles. Never stops; a watch that fails is logged and retried
/// at the next reload.
pub async fn watch_files(shared: Arc<Shared>, reloader: Arc<Mutex<Reloader>>) {
    use notify::{EventKind, RecursiveMode, Watcher};
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let names = Arc::new(std::sync::RwLock::new(BTreeSet::new()));
    let seen = names.clone();
    let mut watcher =
        match notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                let names = seen.read().unwrap_or_else(|p| p.into_inner());
                let ours = ev.paths.is_empty() || ev.paths.iter().any(|p| relevant(p, &names));
                if ours && !matches!(ev.kind, EventKind::Access(_)) {
                    let _ = tx.send(());
                }
            }
        }) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the config files; reload with SIGHUP");
                return;
            }
        };
    let mut watching: BTreeSet<PathBuf> = BTreeSet::new();
    loop {
        let files = shared.live.load().snap.config.files.clone();
        *names.write().unwrap_or_else(|p| p.into_inner()) = files
            .iter()
            .filter_map(|f| f.file_name().map(|n| n.to_os_string()))
            .collect();
        let wanted = watched_dirs(&files);
        for gone in watching.difference(&wanted) {
            let _ = watcher.unwatch(gone);
        }
        let mut now_watching = BTreeSet::new();
        for dir in &wanted {
            if watching.contains(dir) {
                now_watching.insert(dir.clone());
                continue;
            }
            match watcher.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    now_watching.insert(dir.clone());
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory")
                }
            }
        }
        watching = now_watching;
        if rx.recv().await.is_none() {
            return;
        }
        let burst = Instant::now();
        while burst.elapsed() < SETTLE_MAX {
            match tokio::time::timeout(SETTLE, rx.recv()).await {
                Ok(Some(())) => continue,
                _ => break,
            }
        }
        reloader.lock().await.reload(false, "file change");
    }
}

/// Wake a little after an expiry instant, so the rule is past it for sure.
const EXPIRY_MARGIN: Duration = Duration::from_millis(2);

/// Rebuilds the rules when the next `expires` instant passes.
pub async fn expire_rules(shared: Arc<Shared>, reloader: Arc<Mutex<Reloader>>) {
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
                reloader.lock().await.recompile(None, "rule expired");
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
