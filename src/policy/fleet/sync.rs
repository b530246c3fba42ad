//! The store's sync task (SPEC 7): one consistent read of the prefix, then a
//! watch from the next revision; every change published like a reload (one
//! swap, revocation by `on_revoke`) but not counted as one. While etcd is
//! unreachable the last applied entries stay in force (fail-static);
//! reconnects back off (capped at 10 s, ±25 % jitter) and resume from the
//! last applied revision, or resync in full when it was compacted.

use super::cache;
use super::client::{self, REQUEST_TIMEOUT};
use super::view::{Change, View};
use crate::config::Store;
use crate::control::reload::Reloads;
use crate::data::state::Shared;
use crate::metrics::metrics;
use etcd_client::{Client, EventType, WatchOptions, WatchResponse};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long start-up waits for the first read before binding listeners.
pub const START_WAIT: Duration = Duration::from_secs(5);
/// First reconnect delay, and the cap it doubles up to.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Watch responses applied together, at most, before one publish.
const MAX_BATCH: usize = 1024;
/// Full resyncs in a row on one connection before it is dropped and redialled.
const MAX_RESYNCS: u32 = 8;

/// The wait before reconnect attempt `failures` (1, 2, …): 250 ms doubling
/// up to 10 s, each with ±25 % jitter.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let base = BACKOFF_FIRST.saturating_mul(1 << exp).min(BACKOFF_MAX);
    base.mul_f64(0.75 + fastrand::f64() * 0.5)
}

/// What start-up learned: the entries to enforce, and whether etcd answered.
pub struct Initial {
    pub store: Store,
    pub view: View,
    pub read: bool,
}

/// Start-up: the cache (if any), then one consistent read of the prefix,
/// retried for up to [`START_WAIT`]. Never fails: without etcd, the cache;
/// without a cache either, no store entries (and a warning).
pub async fn start(store: &Store) -> Initial {
    let (mut view, cache_problem) = match &store.cache {
        Some(path) => match cache::load(path, &store.prefix) {
            Ok(v) => (v, None),
            Err(e) => (View::new(&store.prefix), Some(e)),
        },
        None => (
            View::new(&store.prefix),
            Some("no cache is configured ([store] etcd cache)".to_string()),
        ),
    };
    let deadline = Instant::now() + START_WAIT;
    let mut failures = 0;
    let mut last_error = String::new();
    loop {
        let attempt = async {
            let mut c = client::connect(store).await?;
            client::read_prefix(&mut c, view.root()).await
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok((revision, kvs))) => {
                view.replace_all(revision, kvs.into_iter().map(|kv| (kv.key, kv.value)));
                let (valid, invalid) = totals(&view);
                tracing::info!(revision, entries = valid, invalid, prefix = %store.prefix, "fleet store read");
                if let (Some(p), Some(e)) = (&store.cache, &cache_problem) {
                    if std::fs::metadata(p).is_ok() {
                        tracing::warn!("fleet store cache ignored: {e}; it is rewritten now");
                    }
                }
                return Initial {
                    store: store.clone(),
                    view,
                    read: true,
                };
            }
            Ok(Err(e)) => last_error = e,
            Err(_) => break,
        }
        failures += 1;
        let wait = backoff(failures).min(Duration::from_secs(1));
        if Instant::now() + wait >= deadline {
            break;
        }
        tokio::time::sleep(wait).await;
    }
    if last_error.is_empty() {
        last_error = format!("no answer within {}s", START_WAIT.as_secs());
    }
    match cache_problem {
        None => {
            let (valid, _) = totals(&view);
            tracing::warn!(revision = view.revision, entries = valid, "fleet store unreachable at start ({last_error}); enforcing the cached entries until it answers");
        }
        Some(e) => {
            tracing::warn!("fleet store unreachable at start ({last_error}) and {e}: enforcing the config file's rules alone until etcd answers");
        }
    }
    Initial {
        store: store.clone(),
        view,
        read: false,
    }
}

fn totals(view: &View) -> (usize, usize) {
    view.counts()
        .values()
        .fold((0, 0), |(a, b), (v, i)| (a + v, b + i))
}

/// What the cache writer is given: where, under which prefix, what.
type CacheJob = Option<(PathBuf, String, View)>;

/// Writes each applied state to the cache, the latest one first (older
/// states still waiting are skipped). Runs off the runtime threads.
async fn write_cache(mut jobs: watch::Receiver<CacheJob>) {
    while jobs.changed().await.is_ok() {
        let Some((path, prefix, view)) = jobs.borrow_and_update().clone() else {
            continue;
        };
        let written = tokio::task::spawn_blocking(move || {
            cache::write_atomically(&path, &cache::render(&prefix, &view)).map_err(|e| (path, e))
        })
        .await;
        if let Ok(Err((path, e))) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the fleet store cache; a restart while etcd is down would not have these entries");
        }
    }
}

/// Why a session with etcd ended.
enum End {
    /// Connection, read or watch failed: back off, then resume.
    Broken(String),
    /// `[store]` changed (or went away) in a reload.
    Settings,
}

struct Sync {
    shared: Arc<Shared>,
    reloads: Reloads,
    store: Store,
    view: View,
    /// A full read is due (never read yet, or the revision was compacted).
    need_read: bool,
    cache: watch::Sender<CacheJob>,
    generation: watch::Receiver<u64>,
}

/// Runs for the daemon's life: follows `[store]` as reloads change it.
pub async fn run(shared: Arc<Shared>, reloads: Reloads, initial: Option<Initial>) {
    let (cache_tx, cache_rx) = watch::channel(None);
    tokio::spawn(write_cache(cache_rx));
    let mut generation = shared.generation.subscribe();
    let mut initial = initial;
    loop {
        let Some(store) = shared.live.load().snap.config.store.clone() else {
            clear_gauges();
            initial = None;
            if generation.changed().await.is_err() {
                return;
            }
            continue;
        };
        // The watch resumes only against the same cluster and prefix; else
        // a full read (the entries in force stay until it succeeds).
        let (view, need_read) = match initial.take() {
            Some(i) if i.store.prefix == store.prefix => {
                let need = !i.read || i.store.endpoints != store.endpoints;
                (i.view, need)
            }
            _ => (View::new(&store.prefix), true),
        };
        let sync = Sync {
            shared: shared.clone(),
            reloads: reloads.clone(),
            store,
            view,
            need_read,
            cache: cache_tx.clone(),
            generation: shared.generation.subscribe(),
        };
        if !sync.need_read {
            sync.save_cache();
        }
        sync.update_gauges();
        let kept = sync.follow().await;
        initial = Some(kept);
    }
}

impl Sync {
    /// Sessions with backoff until `[store]` changes; returns what it knew.
    async fn follow(mut self) -> Initial {
        let mut failures = 0u32;
        loop {
            let (end, was_live) = self.session().await;
            metrics().store.connected.set(0);
            let reason = match end {
                End::Settings => {
                    return Initial {
                        store: self.store,
                        view: self.view,
                        read: !self.need_read,
                    }
                }
                End::Broken(reason) => reason,
            };
            failures = if was_live { 1 } else { failures + 1 };
            let wait = backoff(failures);
            let (valid, _) = totals(&self.view);
            tracing::warn!(
                revision = self.view.revision,
                entries = valid,
                retry_in_ms = wait.as_millis() as u64,
                "fleet store unreachable ({reason}); the last applied entries stay in force"
            );
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                changed = self.settings_changed() => if changed {
                    return Initial { store: self.store, view: self.view, read: !self.need_read };
                },
            }
        }
    }

    /// Resolves once a reload changed `[store]` (true), or the daemon is gone.
    async fn settings_changed(&mut self) -> bool {
        loop {
            if self.generation.changed().await.is_err() {
                return true;
            }
            let now = self.shared.live.load().snap.config.store.clone();
            if now.as_ref() != Some(&self.store) {
                return true;
            }
            // A reload may have added or removed deployments.
            self.update_gauges();
        }
    }

    /// Connect, read if due, watch until something breaks. The bool says
    /// whether the watch went live (the backoff starts over then).
    async fn session(&mut self) -> (End, bool) {
        let mut client = match client::connect(&self.store).await {
            Ok(c) => c,
            Err(e) => return (End::Broken(e), false),
        };
        let mut live = false;
        for _ in 0..MAX_RESYNCS {
            if self.need_read {
                match client::read_prefix(&mut client, self.view.root()).await {
                    Ok((revision, kvs)) => {
                        self.view
                            .replace_all(revision, kvs.into_iter().map(|kv| (kv.key, kv.value)));
                        self.need_read = false;
                        let (valid, invalid) = totals(&self.view);
                        tracing::info!(
                            revision,
                            entries = valid,
                            invalid,
                            "fleet store read in full"
                        );
                        self.publish(None).await;
                    }
                    Err(e) => return (End::Broken(e), live),
                }
            }
            match self.watch(&mut client, &mut live).await {
                Some(end) => return (end, live),
                None => {
                    tracing::warn!(
                        revision = self.view.revision,
                        "fleet store: revision {} was compacted; reading everything again",
                        self.view.revision + 1
                    );
                    self.need_read = true;
                }
            }
        }
        (End::Broken("too many resyncs in a row".into()), live)
    }

    /// Watches from the next revision. None: that revision was compacted.
    async fn watch(&mut self, client: &mut Client, live: &mut bool) -> Option<End> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.view.revision + 1);
        let root = self.view.root().to_string();
        let mut stream =
            match tokio::time::timeout(REQUEST_TIMEOUT, client.watch(root, Some(opts))).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Some(End::Broken(format!("watch failed: {e}"))),
                Err(_) => return Some(End::Broken("starting the watch timed out".into())),
            };
        loop {
            let first = tokio::select! {
                m = stream.message() => m,
                changed = self.settings_changed() => if changed { return Some(End::Settings) } else { continue },
            };
            let arrived = Instant::now();
            let mut batch = Vec::new();
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => return Some(End::Broken("etcd closed the watch".into())),
                    Err(e) => return Some(End::Broken(format!("watch broke: {e}"))),
                };
                if resp.compact_revision() > 0 {
                    return None;
                }
                if resp.canceled() {
                    return Some(End::Broken(format!(
                        "etcd cancelled the watch: {}",
                        resp.cancel_reason()
                    )));
                }
                if resp.created() && !*live {
                    *live = true;
                    metrics().store.connected.set(1);
                    tracing::info!(
                        from_revision = self.view.revision + 1,
                        "fleet store watch live"
                    );
                }
                batch.push(resp);
                if batch.len() < MAX_BATCH {
                    // Whatever else already arrived joins this publish.
                    next = tokio::time::timeout(Duration::ZERO, stream.message())
                        .await
                        .ok();
                }
            }
            if self.apply(&batch) {
                self.publish(Some(arrived)).await;
            }
        }
    }

    /// Applies watch responses to the view; true when entries changed.
    fn apply(&mut self, batch: &[WatchResponse]) -> bool {
        let (changes, revision) = changes_of(batch);
        if changes.is_empty() {
            return false;
        }
        let touched: BTreeSet<String> = self.view.apply(&changes);
        self.view.revision = self.view.revision.max(revision);
        tracing::debug!(revision, deployments = ?touched, "fleet store change");
        true
    }

    /// One swap with the new entries, then gauges and the cache.
    /// `arrived`: when the change came in (logged: how long it took).
    async fn publish(&mut self, arrived: Option<Instant>) {
        let entries = Arc::new(self.view.entries());
        self.reloads.apply_store(entries).await;
        if let Some(t) = arrived {
            tracing::debug!(
                revision = self.view.revision,
                elapsed_us = t.elapsed().as_micros() as u64,
                "fleet store change applied"
            );
        }
        self.update_gauges();
        self.save_cache();
    }

    fn save_cache(&self) {
        if let Some(path) = &self.store.cache {
            self.cache.send_replace(Some((
                path.clone(),
                self.store.prefix.clone(),
                self.view.clone(),
            )));
        }
    }

    fn update_gauges(&self) {
        let m = &metrics().store;
        m.revision.set(self.view.revision);
        m.entries.reset();
        m.invalid.reset();
        let live = self.shared.live.load();
        for d in &live.snap.config.deployments {
            m.entries.with_label_values(&[&d.name]).set(0);
            m.invalid.with_label_values(&[&d.name]).set(0);
        }
        for (name, (valid, invalid)) in self.view.counts() {
            m.entries.with_label_values(&[name]).set(valid as i64);
            m.invalid.with_label_values(&[name]).set(invalid as i64);
        }
    }
}

fn clear_gauges() {
    let m = &metrics().store;
    m.connected.set(0);
    m.revision.set(0);
    m.entries.reset();
    m.invalid.reset();
}

/// The key changes of a batch of watch responses, in order, and the
/// highest revision among them.
fn changes_of(batch: &[WatchResponse]) -> (Vec<Change>, i64) {
    let mut changes = Vec::new();
    let mut revision = 0;
    for resp in batch {
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            revision = revision.max(kv.mod_revision());
            changes.push(match ev.event_type() {
                EventType::Put => Change::Put {
                    key: kv.key().to_vec(),
                    value: kv.value().to_vec(),
                },
                EventType::Delete => Change::Delete {
                    key: kv.key().to_vec(),
                },
            });
        }
    }
    (changes, revision)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_ten_seconds_with_jitter() {
        for n in 1..40 {
            let base = BACKOFF_FIRST
                .saturating_mul(1 << (n - 1).min(16))
                .min(BACKOFF_MAX);
            let w = backoff(n);
            assert!(
                w >= base.mul_f64(0.75) && w <= base.mul_f64(1.25),
                "{n}: {w:?}"
            );
            assert!(w <= Duration::from_millis(12_500));
        }
        assert!(backoff(1) < Duration::from_millis(313));
        // Jitter: not every wait is the same.
        let waits: BTreeSet<_> = (0..20).map(|_| backoff(30)).collect();
        assert!(waits.len() > 1);
    }
}
