//! Where access-list entries live, behind one interface the API and the CLI
//! use without knowing the backend: the config file today (`FileStore`); the
//! fleet store (etcd, SPEC 7) is another variant of [`Store`].

use super::edit::{Edited, FileStore};
use crate::policy::access::{Entry, KeyRef, ValidEntry};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;

/// A deployment's own entries and the tag that changes when they do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub entries: Vec<Entry>,
    /// A strong entity tag, quotes included.
    pub etag: String,
}

/// Why a read or an edit failed. Each maps to one HTTP status and one exit.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("there is no deployment named \"{0}\"")]
    UnknownDeployment(String),
    #[error("there is no deployment named \"{0}\" to copy from")]
    UnknownSource(String),
    #[error("deployment \"{deployment}\" has no access-list entry {entry}")]
    NoEntry { deployment: String, entry: String },
    #[error("deployment \"{0}\" has plan = \"shared\": it admits every source and takes no access-list entries")]
    SharedPlan(String),
    #[error(
        "the access list changed since it was read (its ETag is now {0}); read it again and retry"
    )]
    Changed(String),
    #[error("the change makes the configuration invalid; nothing was written")]
    Rejected(Vec<String>),
    #[error("the config file cannot be written here ({0}); change it at its source")]
    ReadOnly(String),
    #[error("{0}")]
    Unsupported(String),
    /// A valid request the store cannot take in one piece (400).
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Io(String),
    /// The fleet store cannot be reached now (503); the entries in force stay.
    #[error("the fleet store (etcd) cannot be reached now; the entries in force stay as they are")]
    Unavailable(String),
    /// A write sent to the fleet store but not confirmed (503): it may
    /// have been applied, in part for a batched change.
    #[error("the fleet store (etcd) did not confirm the write; it may have been applied (in part, for a change of many entries): read the list again")]
    Unconfirmed(String),
}

/// The entity tag of a list of entries: a hash of their normalised JSON.
pub fn etag(entries: &[Entry]) -> String {
    let json = serde_json::to_vec(entries).unwrap_or_default();
    let hash = Sha256::digest(&json);
    let hex: String = hash[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("\"{hex}\"")
}

/// The access-list store in use.
#[derive(Clone)]
pub enum Store {
    File(Arc<FileStore>),
    /// The config file, or the fleet store (etcd) while the config in force
    /// has `[store] etcd` (SPEC 6.3): decided at each request.
    Running(Arc<Running>),
}

/// What [`Store::Running`] needs: both backends and the config in force.
pub struct Running {
    file: Arc<FileStore>,
    etcd: super::etcd::EtcdStore,
    config: Box<dyn Fn() -> Arc<crate::config::Config> + Send + Sync>,
}

impl Running {
    /// The fleet store's settings in force, with that config.
    fn fleet(&self) -> Option<(Arc<crate::config::Config>, crate::config::Store)> {
        let config = (self.config)();
        let store = config.store.clone()?;
        Some((config, store))
    }
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::Io(format!("the edit did not finish: {e}"))))
}

impl Store {
    /// Entries kept in the config file at `path`.
    pub fn file(path: &Path) -> Store {
        Store::File(Arc::new(FileStore::new(path)))
    }

    /// The config file at `path`, or the fleet store while `config()` (the
    /// config in force) has one.
    pub fn running(
        path: &Path,
        config: impl Fn() -> Arc<crate::config::Config> + Send + Sync + 'static,
    ) -> Store {
        Store::Running(Arc::new(Running {
            file: Arc::new(FileStore::new(path)),
            etcd: Default::default(),
            config: Box::new(config),
        }))
    }

    /// Whether writes go to the fleet store now.
    pub fn is_fleet(&self) -> bool {
        matches!(self, Store::Running(r) if r.fleet().is_some())
    }

    /// The file backend of this store.
    fn file_store(&self) -> &Arc<FileStore> {
        match self {
            Store::File(f) => f,
            Store::Running(r) => &r.file,
        }
    }

    pub async fn list(&self, deployment: &str) -> Result<Listing, StoreError> {
        if let Store::Running(r) = self {
            if let Some((c, s)) = r.fleet() {
                return r.etcd.list(&c, &s, deployment).await;
            }
        }
        let (f, d) = (self.file_store().clone(), deployment.to_string());
        blocking(move || f.list(&d)).await
    }

    pub async fn add(
        &self,
        deployment: &str,
        entries: Vec<ValidEntry>,
        if_match: Option<String>,
    ) -> Result<Edited, StoreError> {
        if let Store::Running(r) = self {
            if let Some((c, s)) = r.fleet() {
                return r.etcd.add(&c, &s, deployment, entries, if_match).await;
            }
        }
        let (f, d) = (self.file_store().clone(), deployment.to_string());
        blocking(move || f.add(&d, &entries, if_match.as_deref())).await
    }

    pub async fn remove(
        &self,
        deployment: &str,
        key: KeyRef,
        if_match: Option<String>,
    ) -> Result<(Edited, Entry), StoreError> {
        if let Store::Running(r) = self {
            if let Some((c, s)) = r.fleet() {
                return r.etcd.remove(&c, &s, deployment, key, if_match).await;
            }
        }
        let (f, d) = (self.file_store().clone(), deployment.to_string());
        blocking(move || f.remove(&d, &key, if_match.as_deref())).await
    }

    pub async fn copy(
        &self,
        deployment: &str,
        from: &str,
        if_match: Option<String>,
    ) -> Result<Edited, StoreError> {
        if let Store::Running(r) = self {
            if let Some((c, s)) = r.fleet() {
                return r.etcd.copy(&c, &s, deployment, from, if_match).await;
            }
        }
        let (f, d, from) = (
            self.file_store().clone(),
            deployment.to_string(),
            from.to_string(),
        );
        blocking(move || f.copy(&d, &from, if_match.as_deref())).await
    }
}
