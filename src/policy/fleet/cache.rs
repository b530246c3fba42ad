//! The cache file: the last applied state of the fleet store (every key, its
//! raw value, the revision), written atomically after each change so that a
//! moat starting while etcd is down enforces what it last knew.

use super::view::View;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// Bumped when the file's shape changes; other versions are ignored.
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheFile {
    version: u32,
    /// The `[store]` prefix the entries were read under.
    prefix: String,
    revision: i64,
    /// Full etcd key -> raw value.
    entries: BTreeMap<String, String>,
}

/// The contents to write for `view`.
pub fn render(prefix: &str, view: &View) -> Vec<u8> {
    let file = CacheFile {
        version: VERSION,
        prefix: prefix.to_string(),
        revision: view.revision,
        entries: view.raw().into_iter().collect(),
    };
    serde_json::to_vec(&file).unwrap_or_default()
}

/// Reads the cache at `path` for `prefix`; the error says why it cannot be used.
pub fn load(path: &Path, prefix: &str) -> Result<View, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file: CacheFile = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} is not a moat store cache ({e})", path.display()))?;
    if file.version != VERSION {
        return Err(format!(
            "{} has version {}, this moat writes {VERSION}",
            path.display(),
            file.version
        ));
    }
    if file.prefix != prefix {
        return Err(format!(
            "{} holds entries of prefix \"{}\", not \"{prefix}\"",
            path.display(),
            file.prefix
        ));
    }
    let mut view = View::new(prefix);
    view.replace_all(
        file.revision,
        file.entries
            .into_iter()
            .map(|(k, v)| (k.into_bytes(), v.into_bytes())),
    );
    Ok(view)
}

/// Replaces `path` with `bytes`: a temporary file in the same directory,
/// synced, renamed over it, and the directory synced. A crash leaves the
/// old file or the new one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().map_or_else(
        || "store-cache".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        use std::os::unix::fs::OpenOptionsExt;
        // Only moat's user reads it: it maps the fleet's access lists.
        let mut f = std::fs::OpenOptions::new()
            .mode(0o600)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_round_trips_and_belongs_to_its_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.json");
        let mut v = View::new("/moat/");
        v.replace_all(
            42,
            [
                (
                    "/moat/deployments/orders/accessList/a",
                    r#"{"cidrBlock":"10.0.0.0/16"}"#,
                ),
                ("/moat/deployments/orders/accessList/b", "not json"),
            ]
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())),
        );
        write_atomically(&path, &render("/moat/", &v)).unwrap();
        let back = load(&path, "/moat/").unwrap();
        assert_eq!(back.revision, 42);
        assert_eq!(back.counts()["orders"], (1, 1));
        assert!(load(&path, "/other/").unwrap_err().contains("prefix"));
        std::fs::write(&path, "{").unwrap();
        assert!(load(&path, "/moat/").is_err());
        assert!(load(&dir.path().join("missing.json"), "/moat/").is_err());
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
