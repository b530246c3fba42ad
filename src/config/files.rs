//! Reading the files a config names. A read that blocks (a FIFO with no
//! writer, a hung network filesystem) cannot be interrupted, only abandoned:
//! a reload gives up on it after its timeout, and this guard keeps later
//! loads from piling more blocked threads onto the same file. A read of a
//! file that another read has been blocked on for a while fails at once.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A read still running after this long is presumed blocked.
pub const PRESUMED_BLOCKED: Duration = Duration::from_secs(5);

/// Device and inode: the file itself, whatever path leads to it.
type FileId = (u64, u64);

struct Reading {
    token: u64,
    path: PathBuf,
    /// None until `stat` answered (on a hung filesystem it may not).
    id: Option<FileId>,
    since: Instant,
}

static READING: Mutex<Vec<Reading>> = Mutex::new(Vec::new());
static TOKENS: AtomicU64 = AtomicU64::new(0);

fn readings() -> std::sync::MutexGuard<'static, Vec<Reading>> {
    READING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes its entry when the read ends, however it ends.
struct Registered(u64);

impl Drop for Registered {
    fn drop(&mut self) {
        readings().retain(|r| r.token != self.0);
    }
}

/// How long another read of `path` (of the file `id`, or of any file when
/// that read could not even `stat` it) has been blocked, if it is.
fn blocked(path: &Path, id: Option<FileId>, own: u64) -> Option<Duration> {
    readings()
        .iter()
        .filter(|r| r.token != own && r.path == path && r.since.elapsed() >= PRESUMED_BLOCKED)
        .filter(|r| r.id.is_none() || (id.is_some() && r.id == id))
        .map(|r| r.since.elapsed())
        .max()
}

fn blocked_error(waited: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::WouldBlock,
        format!(
            "an earlier read of this file has been blocked for {}s (a FIFO with no writer, or a hung network filesystem?); make it a regular file that can be read",
            waited.as_secs()
        ),
    )
}

/// Reads a whole file, unless an earlier read of the same file is blocked.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    if let Some(w) = blocked(path, None, u64::MAX) {
        return Err(blocked_error(w));
    }
    let token = TOKENS.fetch_add(1, Ordering::Relaxed);
    readings().push(Reading {
        token,
        path: path.to_path_buf(),
        id: None,
        since: Instant::now(),
    });
    let _registered = Registered(token);
    let id = file_id(&std::fs::metadata(path)?);
    if let Some(w) = blocked(path, Some(id), token) {
        return Err(blocked_error(w));
    }
    if let Some(r) = readings().iter_mut().find(|r| r.token == token) {
        r.id = Some(id);
    }
    std::fs::read(path)
}

/// Files whose read has been running for at least `min` (for the log line
/// of a reload that timed out).
pub fn slow_reads(min: Duration) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = readings()
        .iter()
        .filter(|r| r.since.elapsed() >= min)
        .map(|r| r.path.clone())
        .collect();
    v.sort();
    v.dedup();
    v
}

#[cfg(unix)]
fn file_id(m: &std::fs::Metadata) -> FileId {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

#[cfg(not(unix))]
fn file_id(_: &std::fs::Metadata) -> FileId {
    (0, 0)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn mkfifo(path: &Path) {
        let status = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .expect("mkfifo runs");
        assert!(status.success());
    }

    /// A blocked FIFO read holds one thread; once presumed blocked, later
    /// reads of the same FIFO fail at once, while a regular file put in its
    /// place (another inode) is read normally.
    #[test]
    fn a_blocked_file_is_not_joined() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("members.toml");
        mkfifo(&fifo);
        let path = fifo.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(read(&path).map(|b| b.len()));
        });
        // Not yet presumed blocked: nothing refused so far.
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        let deadline = Instant::now() + PRESUMED_BLOCKED + Duration::from_secs(5);
        while slow_reads(PRESUMED_BLOCKED).is_empty() {
            assert!(
                Instant::now() < deadline,
                "the FIFO read never showed as slow"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(slow_reads(PRESUMED_BLOCKED), vec![fifo.clone()]);
        let started = Instant::now();
        let e = read(&fifo).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(e.to_string().contains("FIFO"), "{e}");
        // The FIFO moved aside and a regular file put in its place (another
        // inode): read at once.
        let aside = dir.path().join("old.fifo");
        std::fs::rename(&fifo, &aside).unwrap();
        std::fs::write(&fifo, b"ok").unwrap();
        assert_eq!(read(&fifo).unwrap(), b"ok");
        // A writer comes and goes: the first read ends (empty) and its entry goes.
        drop(
            std::fs::OpenOptions::new()
                .write(true)
                .open(&aside)
                .unwrap(),
        );
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap(), 0);
        assert!(slow_reads(Duration::ZERO).iter().all(|p| *p != fifo));
    }

    #[test]
    fn ordinary_reads_leave_no_trace() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a");
        std::fs::write(&f, b"abc").unwrap();
        assert_eq!(read(&f).unwrap(), b"abc");
        assert!(read(&dir.path().join("missing")).is_err());
        assert!(readings().iter().all(|r| r.path != f));
    }
}
