//! The one path that edits access lists in the config file: `[[deployment.allow]]`
//! tables added, replaced, removed or copied with `toml_edit` (every other byte
//! of the file kept), the result validated whole by `config::load_bytes` (as
//! `moat check`), written atomically (temp file in the same directory, fsync,
//! rename, fsync of the directory). Writers are serialised in the process (a
//! mutex) and across processes (`flock` on the config file), so the CLI and
//! the daemon never lose each other's update.

use super::store::{etag, Listing, StoreError};
use crate::config::values::parse_cidr;
use crate::config::RuleTarget;
use crate::policy::access::{format_instant, parse_instant, Entry, EntryKey, KeyRef, ValidEntry};
use nix::fcntl::{Flock, FlockArg};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;
use toml_edit::{ArrayOfTables, DocumentMut, Item, Table};

/// Access lists kept as `[[deployment.allow]]` tables of one config file.
pub struct FileStore {
    /// The config path as given (a symlink stays one).
    path: PathBuf,
    /// Serialises this process's writers; `flock` serialises processes.
    lock: Mutex<()>,
}

/// What an edit did.
pub struct Edited {
    pub listing: Listing,
    /// Whether the file was rewritten (false: the change was already there).
    pub written: bool,
}

/// Attempts to take the lock when the file is being replaced under us.
const LOCK_ATTEMPTS: usize = 20;

impl FileStore {
    pub fn new(path: &Path) -> FileStore {
        FileStore {
            path: path.to_path_buf(),
            lock: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The deployment's own entries and their ETag.
    pub fn list(&self, deployment: &str) -> Result<Listing, StoreError> {
        let (_, bytes) = read(&self.path)?;
        let doc = parse(&bytes)?;
        let dep = find(&doc, deployment)?;
        Ok(listing(dep))
    }

    /// Adds entries; one with the key of an existing entry replaces it.
    pub fn add(
        &self,
        deployment: &str,
        entries: &[ValidEntry],
        if_match: Option<&str>,
    ) -> Result<Edited, StoreError> {
        self.edit(deployment, if_match, |allow| {
            for v in entries {
                let new = table_of(v);
                let at = allow
                    .iter()
                    .position(|t| key_of(t).as_ref() == Some(&v.key));
                match at.and_then(|i| allow.get_mut(i)) {
                    Some(old) if entry_of(old) == entry_of(&new) => {}
                    Some(old) => replace_keeping_decor(old, &new),
                    None => allow.push(new),
                }
            }
            Ok(())
        })
    }

    /// Removes the entry `key` names; returns it with the new listing.
    pub fn remove(
        &self,
        deployment: &str,
        key: &KeyRef,
        if_match: Option<&str>,
    ) -> Result<(Edited, Entry), StoreError> {
        let mut removed = None;
        let edited = self.edit(deployment, if_match, |allow| {
            // Every table with that key goes (a hand-written file may repeat one).
            loop {
                let found = allow
                    .iter()
                    .position(|t| key_of(t).is_some_and(|k| key.matches(&k)));
                let Some(i) = found else { break };
                let gone = entry_of(&allow.remove(i));
                removed.get_or_insert(gone);
            }
            match removed {
                Some(_) => Ok(()),
                None => Err(StoreError::NoEntry {
                    deployment: deployment.to_string(),
                    entry: key.to_string(),
                }),
            }
        })?;
        Ok((edited, removed.unwrap_or_default()))
    }

    /// Copies the own entries of `from` that `deployment` does not have yet.
    pub fn copy(
        &self,
        deployment: &str,
        from: &str,
        if_match: Option<&str>,
    ) -> Result<Edited, StoreError> {
        let (_, bytes) = read(&self.path)?;
        let source = listing(find(&parse(&bytes)?, from).map_err(|e| match e {
            StoreError::UnknownDeployment(n) => StoreError::UnknownSource(n),
            e => e,
        })?);
        let valid: Vec<ValidEntry> = source
            .entries
            .iter()
            .filter_map(|e| e.validate(None).ok())
            .collect();
        self.edit(deployment, if_match, |allow| {
            for v in &valid {
                if !allow.iter().any(|t| key_of(t).as_ref() == Some(&v.key)) {
                    allow.push(table_of(v));
                }
            }
            Ok(())
        })
    }

    /// Runs one locked read-modify-validate-write cycle.
    fn edit(
        &self,
        deployment: &str,
        if_match: Option<&str>,
        change: impl FnOnce(&mut ArrayOfTables) -> Result<(), StoreError>,
    ) -> Result<Edited, StoreError> {
        let _held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let (real, _flock) = lock_file(&self.path)?;
        let (_, bytes) = read(&real)?;
        let mut doc = parse(&bytes)?;
        let before = listing(find(&doc, deployment)?);
        if let Some(tag) = if_match {
            if !etag_matches(tag, &before.etag) {
                return Err(StoreError::Changed(before.etag));
            }
        }
        let dep = find_mut(&mut doc, deployment)?;
        if dep.get("plan").and_then(Item::as_str) == Some("shared") {
            return Err(StoreError::SharedPlan(deployment.to_string()));
        }
        if dep.get("allow").is_none() {
            dep.insert("allow", Item::ArrayOfTables(ArrayOfTables::new()));
        }
        let Some(allow) = dep.get_mut("allow").and_then(Item::as_array_of_tables_mut) else {
            return Err(StoreError::Unsupported(format!("deployment \"{deployment}\" writes `allow` as an inline array; moat edits only [[deployment.allow]] tables (rewrite them as tables, or edit the file by hand)")));
        };
        change(allow)?;
        let after = listing(find(&doc, deployment)?);
        if after.entries == before.entries {
            return Ok(Edited {
                listing: after,
                written: false,
            });
        }
        let text = with_line_endings_of(&bytes, doc.to_string());
        if let Err(e) = crate::config::load_bytes(&self.path, text.as_bytes(), SystemTime::now()) {
            return Err(StoreError::Rejected(
                e.errors.iter().map(|d| d.to_string()).collect(),
            ));
        }
        writable(&real)?;
        write_atomically(&real, text.as_bytes())?;
        Ok(Edited {
            listing: after,
            written: true,
        })
    }
}

/// `If-Match`: `*`, or a comma-separated list of entity tags.
pub fn etag_matches(header: &str, current: &str) -> bool {
    header
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == current)
}

fn io_error(path: &Path, what: &str, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("cannot {what} {}: {e}", path.display()))
}

fn read(path: &Path) -> Result<(PathBuf, Vec<u8>), StoreError> {
    let bytes = fs::read(path).map_err(|e| io_error(path, "read the config file", e))?;
    Ok((path.to_path_buf(), bytes))
}

fn parse(bytes: &[u8]) -> Result<DocumentMut, StoreError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| StoreError::Rejected(vec!["the config file is not UTF-8".into()]))?;
    text.parse::<DocumentMut>().map_err(|e| {
        StoreError::Rejected(vec![format!(
            "the config file is not valid TOML ({}); fix it first (moat check)",
            e.message()
        )])
    })
}

fn deployments(doc: &DocumentMut) -> impl Iterator<Item = &Table> {
    doc.get("deployment")
        .and_then(Item::as_array_of_tables)
        .into_iter()
        .flat_map(|a| a.iter())
}

fn find<'d>(doc: &'d DocumentMut, name: &str) -> Result<&'d Table, StoreError> {
    deployments(doc)
        .find(|t| t.get("name").and_then(Item::as_str) == Some(name))
        .ok_or_else(|| StoreError::UnknownDeployment(name.to_string()))
}

fn find_mut<'d>(doc: &'d mut DocumentMut, name: &str) -> Result<&'d mut Table, StoreError> {
    doc.get_mut("deployment")
        .and_then(Item::as_array_of_tables_mut)
        .and_then(|a| {
            a.iter_mut()
                .find(|t| t.get("name").and_then(Item::as_str) == Some(name))
        })
        .ok_or_else(|| StoreError::UnknownDeployment(name.to_string()))
}

fn listing(dep: &Table) -> Listing {
    let entries: Vec<Entry> = dep
        .get("allow")
        .and_then(Item::as_array_of_tables)
        .into_iter()
        .flat_map(|a| a.iter())
        .map(entry_of)
        .collect();
    Listing {
        etag: etag(&entries),
        entries,
    }
}

fn text(t: &Table, key: &str) -> Option<String> {
    match t.get(key)? {
        Item::Value(toml_edit::Value::String(s)) => Some(s.value().clone()),
        Item::Value(toml_edit::Value::Datetime(d)) => Some(d.value().to_string()),
        _ => None,
    }
}

/// The wire form of an allow table, normalised where its values parse.
fn entry_of(t: &Table) -> Entry {
    let cidr = text(t, "cidr").map(|c| parse_cidr(&c).map_or(c, |n| n.to_string()));
    let expires = text(t, "expires").map(|e| parse_instant(&e).map_or(e, format_instant));
    Entry {
        cidr_block: cidr,
        aws_security_group: text(t, "security_group"),
        aws_account_id: text(t, "aws_account"),
        comment: text(t, "description"),
        delete_after_date: expires,
    }
}

fn key_of(t: &Table) -> Option<EntryKey> {
    entry_of(t).validate(None).ok().map(|v| v.key)
}

/// Makes `old` hold what `new` holds, in place: a key whose value stays
/// keeps its line as written (its end-of-line comment too), a changed value
/// keeps the comments around it, a key `new` lacks goes, a new key is added.
fn replace_keeping_decor(old: &mut Table, new: &Table) {
    let gone: Vec<String> = old
        .iter()
        .map(|(k, _)| k.to_string())
        .filter(|k| !new.contains_key(k))
        .collect();
    for k in gone {
        old.remove(&k);
    }
    for (k, item) in new.iter() {
        let (Some(was), Some(value)) = (
            old.get_mut(k).and_then(|i| i.as_value_mut()),
            item.as_value(),
        ) else {
            old.insert(k, item.clone());
            continue;
        };
        if was.as_str() != value.as_str() {
            let decor = was.decor().clone();
            *was = value.clone();
            *was.decor_mut() = decor;
        }
    }
}

/// `text` (which toml_edit writes with `\n`) with CRLF line endings when
/// the file it came from ends its first line so.
fn with_line_endings_of(original: &[u8], text: String) -> String {
    let first = original.iter().position(|&b| b == b'\n');
    if first.is_some_and(|i| i > 0 && original[i - 1] == b'\r') {
        text.replace("\r\n", "\n").replace('\n', "\r\n")
    } else {
        text
    }
}

/// A new allow table for a checked entry.
fn table_of(v: &ValidEntry) -> Table {
    let mut t = Table::new();
    match &v.rule.target {
        RuleTarget::Cidr(n) => {
            t.insert("cidr", toml_edit::value(n.to_string()));
        }
        RuleTarget::Group(g) => {
            t.insert("aws_account", toml_edit::value(g.account.clone()));
            t.insert("security_group", toml_edit::value(g.id.clone()));
        }
    }
    if !v.rule.description.is_empty() {
        t.insert("description", toml_edit::value(v.rule.description.clone()));
    }
    if let Some(e) = v.rule.expires {
        t.insert("expires", toml_edit::value(format_instant(e)));
    }
    t
}

/// Opens and `flock`s the file the config path resolves to, making sure it
/// is still the file at that path once locked (a writer may have renamed a
/// new one over it meanwhile).
fn lock_file(path: &Path) -> Result<(PathBuf, Flock<File>), StoreError> {
    for _ in 0..LOCK_ATTEMPTS {
        let real = fs::canonicalize(path).map_err(|e| io_error(path, "resolve", e))?;
        let file = File::open(&real).map_err(|e| io_error(&real, "open", e))?;
        let locked = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| StoreError::Io(format!("cannot lock {}: {e}", real.display())))?;
        let held = locked.metadata().map_err(|e| io_error(&real, "stat", e))?;
        let now = fs::canonicalize(path).and_then(|p| Ok((fs::metadata(&p)?, p)));
        if let Ok((m, p)) = now {
            if p == real && m.ino() == held.ino() && m.dev() == held.dev() {
                return Ok((real, locked));
            }
        }
    }
    Err(StoreError::Io(format!(
        "{} keeps being replaced; try again",
        path.display()
    )))
}

fn read_only(real: &Path, why: impl std::fmt::Display) -> StoreError {
    StoreError::ReadOnly(format!("{} {why}", real.display()))
}

/// A config that is read-only (mode, mount, directory) is changed at its
/// source, never here — even by root, who could write it anyway.
fn writable(real: &Path) -> Result<(), StoreError> {
    use nix::unistd::{access, AccessFlags};
    let meta = fs::metadata(real).map_err(|e| io_error(real, "stat", e))?;
    if meta.permissions().mode() & 0o222 == 0 {
        return Err(read_only(real, "is read-only"));
    }
    if let Err(e) = access(real, AccessFlags::W_OK) {
        return Err(read_only(real, format_args!("is not writable ({e})")));
    }
    let dir = real.parent().unwrap_or(Path::new("."));
    let dir_meta = fs::metadata(dir).map_err(|e| io_error(dir, "stat", e))?;
    if dir_meta.permissions().mode() & 0o222 == 0 {
        return Err(read_only(dir, "is a read-only directory"));
    }
    if let Err(e) = access(dir, AccessFlags::W_OK | AccessFlags::X_OK) {
        return Err(read_only(dir, format_args!("is not writable ({e})")));
    }
    Ok(())
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Temp file in the same directory, fsync, rename over, fsync the directory:
/// a crash leaves the old file or the new one, never a mix.
fn write_atomically(real: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let meta = fs::metadata(real).map_err(|e| io_error(real, "stat", e))?;
    let dir = real.parent().unwrap_or(Path::new("."));
    let name = real.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(
        ".{name}.moat-{}-{}.tmp",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        // Same owner and mode as the file replaced (chown needs privileges:
        // without them the writer owns the new file, as an editor would).
        let _ = std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid()));
        f.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        f.sync_all()?;
        fs::rename(&tmp, real)?;
        File::open(dir)?.sync_all()
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        match e.raw_os_error() {
            Some(libc_code)
                if [nix::libc::EROFS, nix::libc::EACCES, nix::libc::EPERM].contains(&libc_code) =>
            {
                read_only(real, format_args!("cannot be replaced ({e})"))
            }
            _ => io_error(real, "write", e),
        }
    })
}

#[cfg(test)]
#[path = "edit_tests.rs"]
mod tests;
