//! The file watcher: every path to a file in use is watched, not only the
//! file's own directory. Each path is resolved component by component as the
//! kernel does; every directory passed through is watched for the one name
//! taken from it, and a symlink met on the way is followed into the
//! directory it points to (watched too). So a config directory replaced by
//! rename, a `current -> release-N` link switched, a Kubernetes `..data`
//! swap or an editor's rename all change a watched name. The set is derived
//! again after every burst of events and every published generation, and a
//! directory whose inode changed is watched afresh.
//!
//! Runs on a thread of its own: resolving paths on a hung filesystem must
//! not hold a runtime worker.

use crate::control::reload::Reloads;
use crate::data::state::Shared;
use notify::{EventKind, RecursiveMode, Watcher};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Quiet time that ends a burst of file events.
const SETTLE: Duration = Duration::from_millis(150);
/// Longest a steady stream of events can postpone a reload.
const SETTLE_MAX: Duration = Duration::from_secs(2);
/// Symlinks followed while resolving one path (the kernel's limit).
const MAX_LINKS: usize = 40;

/// The directories to watch and, in each, the names that lead to a file in use.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WatchPlan {
    pub dirs: BTreeMap<PathBuf, BTreeSet<OsString>>,
}

impl WatchPlan {
    /// The plan for `files` as the filesystem stands now; relative paths
    /// start at `cwd`.
    pub fn derive(files: &[PathBuf], cwd: &Path) -> WatchPlan {
        let mut plan = WatchPlan::default();
        for f in files {
            plan.trace(&cwd.join(f));
        }
        plan
    }

    /// Walks `path` from the root, following symlinks, recording each
    /// directory and the name looked up in it. Stops at the first name
    /// that does not exist: watching its directory sees it appear.
    fn trace(&mut self, path: &Path) {
        let mut dir = PathBuf::from("/");
        // Components still to resolve, the next one last.
        let mut rest: Vec<OsString> = Vec::new();
        push_front(&mut rest, path, &mut dir);
        let mut links = 0;
        while let Some(name) = rest.pop() {
            if name == ".." {
                dir.pop();
                continue;
            }
            self.dirs
                .entry(dir.clone())
                .or_default()
                .insert(name.clone());
            let here = dir.join(&name);
            let Ok(meta) = std::fs::symlink_metadata(&here) else {
                return;
            };
            if meta.file_type().is_symlink() {
                links += 1;
                let Ok(target) = std::fs::read_link(&here) else {
                    return;
                };
                if links > MAX_LINKS {
                    return;
                }
                push_front(&mut rest, &target, &mut dir);
            } else if meta.is_dir() {
                dir = here;
            } else {
                return;
            }
        }
    }

    /// Whether an event on `path` can change a file in use: a watched
    /// directory itself, or one of the names that lead to a file.
    pub fn relevant(&self, path: &Path) -> bool {
        if self.dirs.contains_key(path) {
            return true;
        }
        match (path.parent(), path.file_name()) {
            (Some(d), Some(n)) => self.dirs.get(d).is_some_and(|names| names.contains(n)),
            _ => false,
        }
    }
}

/// Puts the components of `path` before `rest` (which is reversed); an
/// absolute path restarts from the root.
fn push_front(rest: &mut Vec<OsString>, path: &Path, dir: &mut PathBuf) {
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => {
                *dir = PathBuf::from("/");
                parts.clear();
            }
            Component::CurDir => {}
            Component::ParentDir => parts.push(OsString::from("..")),
            Component::Normal(n) => parts.push(n.to_os_string()),
        }
    }
    rest.extend(parts.into_iter().rev());
}

enum Wake {
    /// A relevant file event (or a lost one: a rescan).
    Changed,
    /// A new generation was published (its files may differ).
    Published,
}

/// Starts the watcher thread. A watcher that cannot start is logged; SIGHUP
/// still reloads.
pub fn spawn(shared: Arc<Shared>, reloads: Reloads) {
    let (tx, rx) = mpsc::channel::<Wake>();
    let published = tx.clone();
    let mut generation = shared.generation.subscribe();
    tokio::spawn(async move {
        while generation.changed().await.is_ok() {
            if published.send(Wake::Published).is_err() {
                return;
            }
        }
    });
    let started = std::thread::Builder::new()
        .name("moat-watch".into())
        .spawn(move || run(shared, reloads, tx, rx));
    if let Err(e) = started {
        tracing::error!(error = %e, "cannot watch the config files; reload with SIGHUP");
    }
}

/// Device and inode of a directory: a replaced one must be watched anew.
fn dir_id(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

fn run(shared: Arc<Shared>, reloads: Reloads, tx: mpsc::Sender<Wake>, rx: mpsc::Receiver<Wake>) {
    let plan = Arc::new(RwLock::new(WatchPlan::default()));
    // Watched directories that an event said were moved, removed or created.
    let touched = Arc::new(Mutex::new(BTreeSet::<PathBuf>::new()));
    let (seen, marks) = (plan.clone(), touched.clone());
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let ev = match res {
            Ok(ev) if matches!(ev.kind, EventKind::Access(_)) => return,
            Ok(ev) => ev,
            // An error (a queue overflow, say): events may be lost.
            Err(_) => notify::Event::new(EventKind::Any),
        };
        let plan = seen.read().unwrap_or_else(|p| p.into_inner());
        let mut ours = ev.paths.is_empty();
        for p in &ev.paths {
            if plan.dirs.contains_key(p) {
                marks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(p.clone());
            }
            ours |= plan.relevant(p);
        }
        if ours {
            let _ = tx.send(Wake::Changed);
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the config files; reload with SIGHUP");
            return;
        }
    };
    let mut watching: BTreeMap<PathBuf, (u64, u64)> = BTreeMap::new();
    let mut failing: BTreeSet<PathBuf> = BTreeSet::new();
    let mut first = true;
    let mut changed = false;
    loop {
        let files = shared.live.load().snap.config.files.clone();
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        let wanted = WatchPlan::derive(&files, &cwd);
        *plan.write().unwrap_or_else(|p| p.into_inner()) = wanted.clone();
        let touched = std::mem::take(&mut *touched.lock().unwrap_or_else(|p| p.into_inner()));
        let rewatched = rewatch(&mut watcher, &wanted, &touched, &mut watching, &mut failing);
        // Watches are in place before the files are read, so no change is
        // missed between the two; a fresh watch may have missed one, so the
        // files are compared again (a no-op when their bytes are unchanged).
        if changed {
            reloads.request(false, "file change");
        } else if rewatched && !first {
            reloads.request(false, "watched paths changed");
        }
        first = false;
        changed = false;
        match rx.recv() {
            Err(_) => return,
            Ok(Wake::Published) => continue,
            Ok(Wake::Changed) => {}
        }
        // Let the burst settle: quiet for SETTLE, or SETTLE_MAX at most.
        let burst = Instant::now();
        let mut quiet_from = Instant::now();
        loop {
            let left = SETTLE.saturating_sub(quiet_from.elapsed());
            if left.is_zero() || burst.elapsed() >= SETTLE_MAX {
                break;
            }
            match rx.recv_timeout(left.min(SETTLE_MAX.saturating_sub(burst.elapsed()))) {
                Ok(Wake::Changed) => quiet_from = Instant::now(),
                Ok(Wake::Published) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        changed = true;
    }
}

/// Brings the watches in line with `wanted`: new directories watched,
/// replaced or touched ones watched afresh, unneeded ones dropped. Returns
/// whether any watch was (re)added.
fn rewatch(
    watcher: &mut impl Watcher,
    wanted: &WatchPlan,
    touched: &BTreeSet<PathBuf>,
    watching: &mut BTreeMap<PathBuf, (u64, u64)>,
    failing: &mut BTreeSet<PathBuf>,
) -> bool {
    watching.retain(|dir, _| {
        let keep = wanted.dirs.contains_key(dir);
        if !keep {
            let _ = watcher.unwatch(dir);
        }
        keep
    });
    let mut added = false;
    for dir in wanted.dirs.keys() {
        let id = dir_id(dir);
        let old = watching.get(dir).copied();
        if old.is_some() && old == id && !touched.contains(dir) {
            continue;
        }
        if old.is_some() {
            let _ = watcher.unwatch(dir);
            watching.remove(dir);
        }
        let Some(id) = id else { continue };
        match watcher.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                watching.insert(dir.clone(), id);
                failing.remove(dir);
                added = true;
            }
            Err(e) => {
                if failing.insert(dir.clone()) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory; changes under it need SIGHUP");
                }
            }
        }
    }
    added
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn names(plan: &WatchPlan, dir: &Path) -> Vec<String> {
        plan.dirs
            .get(dir)
            .map(|s| s.iter().map(|n| n.to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }

    /// Every ancestor is watched for the one name taken from it.
    #[test]
    fn plain_path_watches_every_ancestor() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("etc/moat")).unwrap();
        std::fs::write(root.join("etc/moat/moat.toml"), "").unwrap();
        std::fs::write(root.join("etc/moat/sg.toml"), "").unwrap();
        let files = [
            root.join("etc/moat/moat.toml"),
            root.join("etc/moat/sg.toml"),
        ];
        let plan = WatchPlan::derive(&files, Path::new("/"));
        assert_eq!(
            names(&plan, &root.join("etc/moat")),
            ["moat.toml", "sg.toml"]
        );
        assert_eq!(names(&plan, &root.join("etc")), ["moat"]);
        assert_eq!(names(&plan, &root), ["etc"]);
        assert!(plan.dirs.contains_key(Path::new("/")));
        for a in root.ancestors().skip(1) {
            assert!(plan.dirs.contains_key(a), "{}", a.display());
        }
        // What an event may name: the files, a directory on the way, or the
        // watched directory itself; nothing else.
        assert!(plan.relevant(&root.join("etc/moat/moat.toml")));
        assert!(plan.relevant(&root.join("etc/moat")));
        assert!(plan.relevant(&root.join("etc")));
        assert!(!plan.relevant(&root.join("etc/moat/moat.toml.swp")));
        assert!(!plan.relevant(&root.join("etc/other")));
        assert!(!plan.relevant(&root.join("log/moat.stderr")));
    }

    /// `current -> release-1`: the link's directory for "current", the
    /// release directory it points to, and the release for the file.
    #[test]
    fn symlinked_parent_is_followed() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("releases/r1")).unwrap();
        std::fs::write(root.join("releases/r1/moat.toml"), "").unwrap();
        symlink("releases/r1", root.join("current")).unwrap();
        let plan = WatchPlan::derive(&[root.join("current/moat.toml")], Path::new("/"));
        assert_eq!(names(&plan, &root), ["current", "releases"]);
        assert_eq!(names(&plan, &root.join("releases")), ["r1"]);
        assert_eq!(names(&plan, &root.join("releases/r1")), ["moat.toml"]);
        assert!(plan.relevant(&root.join("current")));
        // Switched: derived again, the new release is watched instead.
        std::fs::create_dir_all(root.join("releases/r2")).unwrap();
        std::fs::write(root.join("releases/r2/moat.toml"), "").unwrap();
        symlink("releases/r2", root.join("current.tmp")).unwrap();
        std::fs::rename(root.join("current.tmp"), root.join("current")).unwrap();
        let after = WatchPlan::derive(&[root.join("current/moat.toml")], Path::new("/"));
        assert_eq!(names(&after, &root.join("releases")), ["r2"]);
        assert!(after.dirs.contains_key(&root.join("releases/r2")));
        assert!(!after.dirs.contains_key(&root.join("releases/r1")));
    }

    /// The Kubernetes volume layout: file -> ..data/file, ..data -> ..TS.
    #[test]
    fn configmap_layout() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().canonicalize().unwrap();
        std::fs::create_dir(d.join("..2026_01_01")).unwrap();
        std::fs::write(d.join("..2026_01_01/moat.toml"), "").unwrap();
        symlink("..2026_01_01", d.join("..data")).unwrap();
        symlink("..data/moat.toml", d.join("moat.toml")).unwrap();
        let plan = WatchPlan::derive(&[d.join("moat.toml")], Path::new("/"));
        assert_eq!(names(&plan, &d), ["..2026_01_01", "..data", "moat.toml"]);
        assert_eq!(names(&plan, &d.join("..2026_01_01")), ["moat.toml"]);
        assert!(plan.relevant(&d.join("..data")));
        assert!(!plan.relevant(&d.join("..data_tmp")));
    }

    /// Absolute and `..` targets, relative paths, a missing component, and
    /// a symlink loop (bounded).
    #[test]
    fn odd_paths() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(root.join("real")).unwrap();
        std::fs::write(root.join("real/cert.pem"), "").unwrap();
        symlink(root.join("real"), root.join("a/b/abs")).unwrap();
        symlink("../../real/cert.pem", root.join("a/b/rel.pem")).unwrap();
        let plan = WatchPlan::derive(
            &[PathBuf::from("b/abs/cert.pem"), PathBuf::from("b/rel.pem")],
            &root.join("a"),
        );
        assert_eq!(names(&plan, &root.join("a/b")), ["abs", "rel.pem"]);
        assert_eq!(names(&plan, &root.join("real")), ["cert.pem"]);
        assert_eq!(names(&plan, &root), ["a", "real"]);
        // Missing: watched up to the directory that would hold it.
        let plan = WatchPlan::derive(&[root.join("gone/deeper/x.toml")], Path::new("/"));
        assert_eq!(names(&plan, &root), ["gone"]);
        assert!(!plan.dirs.contains_key(&root.join("gone")));
        // A loop ends.
        symlink("loop2", root.join("loop1")).unwrap();
        symlink("loop1", root.join("loop2")).unwrap();
        let plan = WatchPlan::derive(&[root.join("loop1/x")], Path::new("/"));
        assert_eq!(names(&plan, &root), ["loop1", "loop2"]);
    }

    /// The watcher itself: a directory replaced by rename is noticed, and
    /// after a re-derivation the new one is watched (events on it arrive).
    #[test]
    fn replaced_directory_is_rewatched() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        let conf = root.join("conf");
        std::fs::create_dir(&conf).unwrap();
        std::fs::write(conf.join("moat.toml"), "a").unwrap();
        let files = [conf.join("moat.toml")];
        let (tx, rx) = mpsc::channel();
        let mut w = notify::recommended_watcher(move |r: notify::Result<notify::Event>| {
            if let Ok(ev) = r {
                if !matches!(ev.kind, EventKind::Access(_)) {
                    let _ = tx.send(ev.paths);
                }
            }
        })
        .unwrap();
        let plan = WatchPlan::derive(&files, Path::new("/"));
        let mut watching = BTreeMap::new();
        let mut failing = BTreeSet::new();
        assert!(rewatch(
            &mut w,
            &plan,
            &BTreeSet::new(),
            &mut watching,
            &mut failing
        ));
        assert!(!rewatch(
            &mut w,
            &plan,
            &BTreeSet::new(),
            &mut watching,
            &mut failing
        ));
        let next = |want: &dyn Fn(&Path) -> bool| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Ok(paths) =
                rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                if paths.iter().any(|p| want(p)) {
                    return true;
                }
            }
            false
        };
        std::fs::create_dir(root.join("conf.new")).unwrap();
        std::fs::write(root.join("conf.new/moat.toml"), "b").unwrap();
        std::fs::rename(&conf, root.join("conf.old")).unwrap();
        std::fs::rename(root.join("conf.new"), &conf).unwrap();
        assert!(next(&|p| plan.relevant(p)), "the swap was not seen");
        let again = WatchPlan::derive(&files, Path::new("/"));
        assert_eq!(again, plan, "same names, other inodes");
        assert!(rewatch(
            &mut w,
            &again,
            &BTreeSet::new(),
            &mut watching,
            &mut failing
        ));
        std::fs::write(conf.join("moat.toml"), "c").unwrap();
        assert!(
            next(&|p| p == conf.join("moat.toml")),
            "an edit in the new directory was not seen"
        );
    }
}
