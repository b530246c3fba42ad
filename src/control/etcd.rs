//! The fleet store as the access-list backend of the API and `moat
//! access-list` (SPEC 6.3, 7): with `[store] etcd`, entries are read from and
//! written to etcd in transactions (`crate::policy::fleet::write`: create only if
//! absent, update and delete only at the revision read), never to the config
//! file. The config in force still decides which deployments exist and their
//! plan.

use super::edit::Edited;
use super::store::{etag, Listing, StoreError};
use crate::config::{Config, Plan};
use crate::policy::access::{Entry, KeyRef, ValidEntry};
use crate::policy::fleet::write::{Listing as WriterListing, WriteError, Writer};
use std::sync::Arc;
use tokio::sync::Mutex;

/// Access lists kept in etcd under `[store] etcd prefix`.
pub struct EtcdStore {
    /// The writer for the settings it was made for (rebuilt when they change).
    writer: Mutex<Option<(crate::config::Store, Arc<Writer>)>>,
}

fn store_error(e: WriteError) -> StoreError {
    match e {
        WriteError::NoEntry { deployment, entry } => StoreError::NoEntry { deployment, entry },
        WriteError::TooMany(why) => StoreError::TooLarge(why),
        WriteError::Unreachable(why) => StoreError::Unavailable(why),
        WriteError::Unconfirmed(why) => StoreError::Unconfirmed(why),
        other => StoreError::Io(other.to_string()),
    }
}

/// A deployment of `config` that takes entries (not a shared plan).
fn check(config: &Config, name: &str, missing: fn(String) -> StoreError) -> Result<(), StoreError> {
    match config.deployments.iter().find(|d| d.name == name) {
        None => Err(missing(name.to_string())),
        Some(d) if d.plan == Plan::Shared => Err(StoreError::SharedPlan(name.to_string())),
        Some(_) => Ok(()),
    }
}

impl Default for EtcdStore {
    fn default() -> Self {
        EtcdStore {
            writer: Mutex::new(None),
        }
    }
}

impl EtcdStore {
    async fn writer(&self, settings: &crate::config::Store) -> Arc<Writer> {
        let mut slot = self.writer.lock().await;
        match slot.as_ref() {
            Some((s, w)) if s == settings => w.clone(),
            _ => {
                let w = Arc::new(Writer::new(settings));
                *slot = Some((settings.clone(), w.clone()));
                w
            }
        }
    }

    async fn read(&self, w: &Writer, name: &str) -> Result<Listing, StoreError> {
        let l = w.list(name).await.map_err(store_error)?;
        let entries = l.entries();
        Ok(Listing {
            etag: etag(&entries),
            entries,
        })
    }

    /// 412 unless the list is still the one `if_match` names; with an
    /// If-Match, the listing read, which the write is then conditioned on.
    async fn precondition(
        &self,
        w: &Writer,
        name: &str,
        if_match: Option<&str>,
    ) -> Result<Option<WriterListing>, StoreError> {
        let Some(tag) = if_match else {
            return Ok(None);
        };
        let read = w.list(name).await.map_err(store_error)?;
        let now = etag(&read.entries());
        if now != tag && tag != "*" {
            return Err(StoreError::Changed(now));
        }
        Ok(Some(read))
    }

    /// A write's error; a conditional write that lost the race is a 412
    /// naming the list's ETag now.
    async fn failed(&self, w: &Writer, name: &str, e: WriteError) -> StoreError {
        match e {
            WriteError::Stale => match self.read(w, name).await {
                Ok(now) => StoreError::Changed(now.etag),
                Err(e) => e,
            },
            other => store_error(other),
        }
    }

    pub async fn list(
        &self,
        config: &Config,
        s: &crate::config::Store,
        name: &str,
    ) -> Result<Listing, StoreError> {
        check(config, name, StoreError::UnknownDeployment)?;
        let w = self.writer(s).await;
        self.read(&w, name).await
    }

    pub async fn add(
        &self,
        config: &Config,
        s: &crate::config::Store,
        name: &str,
        entries: Vec<ValidEntry>,
        if_match: Option<String>,
    ) -> Result<Edited, StoreError> {
        check(config, name, StoreError::UnknownDeployment)?;
        let w = self.writer(s).await;
        let read = self.precondition(&w, name, if_match.as_deref()).await?;
        let written = match w.add(name, &entries, read.as_ref()).await {
            Ok(written) => written,
            Err(e) => return Err(self.failed(&w, name, e).await),
        };
        Ok(Edited {
            listing: self.read(&w, name).await?,
            written: written.revision.is_some(),
        })
    }

    pub async fn remove(
        &self,
        config: &Config,
        s: &crate::config::Store,
        name: &str,
        key: KeyRef,
        if_match: Option<String>,
    ) -> Result<(Edited, Entry), StoreError> {
        check(config, name, StoreError::UnknownDeployment)?;
        let w = self.writer(s).await;
        let read = self.precondition(&w, name, if_match.as_deref()).await?;
        let (written, entry) = match w.remove(name, &key, read.as_ref()).await {
            Ok(done) => done,
            Err(e) => return Err(self.failed(&w, name, e).await),
        };
        Ok((
            Edited {
                listing: self.read(&w, name).await?,
                written: written.revision.is_some(),
            },
            entry,
        ))
    }

    pub async fn copy(
        &self,
        config: &Config,
        s: &crate::config::Store,
        name: &str,
        from: &str,
        if_match: Option<String>,
    ) -> Result<Edited, StoreError> {
        check(config, name, StoreError::UnknownDeployment)?;
        if !config.deployments.iter().any(|d| d.name == from) {
            return Err(StoreError::UnknownSource(from.to_string()));
        }
        let w = self.writer(s).await;
        let read = self.precondition(&w, name, if_match.as_deref()).await?;
        let written = match w.copy(name, from, read.as_ref()).await {
            Ok(written) => written,
            Err(e) => return Err(self.failed(&w, name, e).await),
        };
        Ok(Edited {
            listing: self.read(&w, name).await?,
            written: written.revision.is_some(),
        })
    }
}
