//! API keys: `Authorization: Bearer <key>`, checked against the SHA-256 of
//! each key in the keys file, in constant time. The file is re-read as soon
//! as it changes (checked on every request), so a removed key stops working
//! at once, not after the config's reload.

use super::error::ApiError;
use super::route::Route;
use crate::config::{self, ApiKey, Role};
use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use subtle::ConstantTimeEq;

/// What identifies one version of the keys file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
    })
}

/// The keys last read: from which file, which version of it.
type Cached = (PathBuf, Stamp, Arc<Vec<ApiKey>>);

/// The keys in force, re-read whenever the file changes.
#[derive(Default)]
pub struct KeyRing {
    cache: Mutex<Option<Cached>>,
}

impl KeyRing {
    /// The keys of `path` now. A missing file means no key works; a file
    /// that does not parse keeps the last keys read (and is logged), as a
    /// bad config keeps the running one.
    pub fn current(&self, path: &Path) -> Arc<Vec<ApiKey>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let Some(now) = stamp(path) else {
            return Arc::default();
        };
        if let Some((p, s, keys)) = cache.as_ref() {
            if p == path && *s == now {
                return keys.clone();
            }
        }
        let parsed = std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| config::api::parse_keys(path, &b, None).map_err(|e| e.to_string()));
        match parsed {
            Ok(keys) => {
                let keys = Arc::new(keys);
                *cache = Some((path.to_path_buf(), now, keys.clone()));
                keys
            }
            Err(e) => {
                tracing::error!(
                    "API keys file not reloaded, the last keys read stay in force: {e}"
                );
                match cache.as_mut() {
                    Some((p, s, keys)) if p == path => {
                        *s = now;
                        keys.clone()
                    }
                    _ => Arc::default(),
                }
            }
        }
    }
}

/// The presented key, if the header carries one.
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at(value.iter().position(|&b| b == b' ')?);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| token.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// The key the request carries, or 401.
pub fn authenticate(headers: &HeaderMap, keys: &[ApiKey]) -> Result<ApiKey, ApiError> {
    let Some(token) = bearer(headers) else {
        return Err(ApiError::Unauthorized(
            "send an API key: Authorization: Bearer <key>".into(),
        ));
    };
    let digest: [u8; 32] = Sha256::digest(token).into();
    // Every key is compared, whatever matched: the time taken says nothing.
    let mut found = None;
    for k in keys {
        if bool::from(k.sha256.ct_eq(&digest)) {
            found = Some(k);
        }
    }
    found
        .cloned()
        .ok_or_else(|| ApiError::Unauthorized("the API key is not known".into()))
}

/// Whether `key` may make this request: its role, and the deployment the
/// path names. Every route passes through here.
pub fn authorize(key: &ApiKey, route: &Route) -> Result<(), ApiError> {
    if route.role() == Role::Write && key.role != Role::Write {
        return Err(ApiError::Forbidden(format!(
            "key \"{}\" has role \"read\"; this request needs a key with role \"write\"",
            key.name
        )));
    }
    match route.deployment() {
        Some(d) if !key.sees(d) => Err(forbidden_deployment(key, d)),
        _ => Ok(()),
    }
}

pub fn forbidden_deployment(key: &ApiKey, deployment: &str) -> ApiError {
    ApiError::Forbidden(format!(
        "key \"{}\" may not see deployment \"{deployment}\"",
        key.name
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(role: Role, deps: Option<&[&str]>) -> ApiKey {
        ApiKey {
            name: "k".into(),
            sha256: Sha256::digest(b"secret").into(),
            role,
            deployments: deps.map(|d| d.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn bearer_keys_are_matched_by_hash() {
        let keys = [key(Role::Read, None)];
        assert!(authenticate(&headers("Bearer secret"), &keys).is_ok());
        assert!(authenticate(&headers("bearer  secret "), &keys).is_ok());
        assert!(authenticate(&headers("Bearer other"), &keys).is_err());
        assert!(authenticate(&headers("Basic secret"), &keys).is_err());
        assert!(authenticate(&HeaderMap::new(), &keys).is_err());
    }

    #[test]
    fn roles_and_scopes() {
        let read = key(Role::Read, None);
        let scoped = key(Role::Write, Some(&["orders"]));
        let add = |n: &str| Route::AddEntries { name: n.into() };
        assert!(authorize(&read, &Route::Plan).is_ok());
        assert!(authorize(&read, &add("orders")).is_err());
        assert!(authorize(&scoped, &add("orders")).is_ok());
        assert!(authorize(&scoped, &add("billing")).is_err());
    }

    #[test]
    fn a_changed_keys_file_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let line = |name: &str| {
            format!(
                "[[key]]\nname = \"{name}\"\nsha256 = \"{}\"\nrole = \"read\"\n",
                "ab".repeat(32)
            )
        };
        std::fs::write(&path, line("a")).unwrap();
        let ring = KeyRing::default();
        assert_eq!(ring.current(&path)[0].name, "a");
        std::fs::write(&path, line("bb")).unwrap();
        assert_eq!(ring.current(&path)[0].name, "bb");
        std::fs::write(&path, "[[key]]\nname = 1\n").unwrap();
        assert_eq!(ring.current(&path)[0].name, "bb");
        std::fs::remove_file(&path).unwrap();
        assert!(ring.current(&path).is_empty());
    }
}
