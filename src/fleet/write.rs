//! Writes to the fleet store (SPEC 6.3 and 7), for the API and `moat
//! access-list`: every change is one etcd transaction that creates a key only
//! if it is absent and updates or deletes a key only at the mod revision it
//! was read at, so two writers never lose each other's change. Each write
//! returns the revision it made: this host enforces it once its snapshot's
//! `store.revision` reaches it ([`super::enforced`]).

use super::client::{self, REQUEST_TIMEOUT};
use super::view::ACCESS_LIST;
use crate::access::{Entry, EntryKey, KeyRef, ValidEntry};
use crate::config::Store;
use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use tokio::sync::Mutex;

/// Attempts of one change when another writer got in between.
const ATTEMPTS: usize = 5;

/// One valid entry as stored: its key, the entry, and its mod revision.
#[derive(Debug, Clone)]
pub struct Stored {
    pub key: String,
    /// The entry, normalised (`cidrBlock` with its prefix length).
    pub entry: Entry,
    pub entry_key: EntryKey,
    pub mod_revision: i64,
}

/// A deployment's entries in the store, read at one revision.
#[derive(Debug, Clone)]
pub struct Listing {
    pub revision: i64,
    /// Valid entries, in key order (invalid values are left out).
    pub entries: Vec<Stored>,
}

impl Listing {
    pub fn entries(&self) -> Vec<Entry> {
        self.entries.iter().map(|s| s.entry.clone()).collect()
    }
}

/// Why a write did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error("the fleet store (etcd) cannot be reached: {0}")]
    Unreachable(String),
    #[error("the access list kept changing under this write; read it again and retry")]
    Changed,
    #[error("deployment \"{deployment}\" has no access-list entry {entry}")]
    NoEntry { deployment: String, entry: String },
}

/// The result of a change: the revision it made (None: nothing to change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub revision: Option<i64>,
}

/// Writes one fleet store's entries.
pub struct Writer {
    store: Store,
    client: Mutex<Option<Client>>,
}

/// The key a new entry gets: its CIDR or group, with '/' as '_'.
pub fn key_name(key: &EntryKey) -> String {
    match key {
        EntryKey::Cidr(n) => n.to_string().replace('/', "_"),
        EntryKey::Group(g) => format!("{}_{}", g.account, g.id),
    }
}

impl Writer {
    pub fn new(store: &Store) -> Writer {
        Writer {
            store: store.clone(),
            client: Mutex::new(None),
        }
    }

    /// `{prefix}deployments/{name}/accessList/`.
    pub fn folder(&self, deployment: &str) -> String {
        format!(
            "{}{deployment}/{ACCESS_LIST}",
            self.store.deployments_prefix()
        )
    }

    async fn client(&self) -> Result<Client, WriteError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = client::connect(&self.store)
            .await
            .map_err(WriteError::Unreachable)?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// The deployment's valid entries, read consistently.
    pub async fn list(&self, deployment: &str) -> Result<Listing, WriteError> {
        let mut c = self.client().await?;
        let read = client::read_prefix(&mut c, &self.folder(deployment)).await;
        let (revision, kvs) = match read {
            Ok(r) => r,
            Err(e) => {
                // Dial again next time (etcd restarted, another runtime).
                *self.client.lock().await = None;
                return Err(WriteError::Unreachable(e));
            }
        };
        let entries = kvs
            .into_iter()
            .filter_map(|kv| {
                let entry: Entry = serde_json::from_slice(&kv.value).ok()?;
                let valid = entry.validate(None).ok()?;
                Some(Stored {
                    key: String::from_utf8_lossy(&kv.key).into_owned(),
                    entry: Entry::from_rule(&valid.rule),
                    entry_key: valid.key,
                    mod_revision: kv.mod_revision,
                })
            })
            .collect();
        Ok(Listing { revision, entries })
    }

    /// Runs one transaction: `ops` if every compare holds. Ok(None): a
    /// compare failed (someone else wrote first).
    async fn txn(
        &self,
        compares: Vec<Compare>,
        ops: Vec<TxnOp>,
    ) -> Result<Option<i64>, WriteError> {
        let mut c = self.client().await?;
        let txn = Txn::new().when(compares).and_then(ops);
        match tokio::time::timeout(REQUEST_TIMEOUT, c.txn(txn)).await {
            Ok(Ok(r)) if r.succeeded() => Ok(Some(r.header().map_or(0, |h| h.revision()))),
            Ok(Ok(_)) => Ok(None),
            Ok(Err(e)) => {
                *self.client.lock().await = None;
                Err(WriteError::Unreachable(e.to_string()))
            }
            Err(_) => Err(WriteError::Unreachable("the transaction timed out".into())),
        }
    }

    /// Creates `key` holding `entry` only if the key is absent.
    pub async fn put_if_absent(&self, key: &str, entry: &Entry) -> Result<Option<i64>, WriteError> {
        self.txn(
            vec![Compare::create_revision(key, CompareOp::Equal, 0)],
            vec![TxnOp::put(key, to_json(entry), None)],
        )
        .await
    }

    /// Replaces `key` with `entry` only if it is still at `mod_revision`.
    pub async fn update_at(
        &self,
        key: &str,
        entry: &Entry,
        mod_revision: i64,
    ) -> Result<Option<i64>, WriteError> {
        self.txn(
            vec![Compare::mod_revision(key, CompareOp::Equal, mod_revision)],
            vec![TxnOp::put(key, to_json(entry), None)],
        )
        .await
    }

    /// Deletes `key` only if it is still at `mod_revision`.
    pub async fn delete_at(&self, key: &str, mod_revision: i64) -> Result<Option<i64>, WriteError> {
        self.txn(
            vec![Compare::mod_revision(key, CompareOp::Equal, mod_revision)],
            vec![TxnOp::delete(key, None)],
        )
        .await
    }

    /// Adds entries; one already present (same CIDR or group) is replaced.
    pub async fn add(
        &self,
        deployment: &str,
        entries: &[ValidEntry],
    ) -> Result<Written, WriteError> {
        for _ in 0..ATTEMPTS {
            let listing = self.list(deployment).await?;
            let (compares, ops) = plan_add(&self.folder(deployment), &listing, entries);
            if ops.is_empty() {
                return Ok(Written { revision: None });
            }
            if let Some(rev) = self.txn(compares, ops).await? {
                return Ok(Written {
                    revision: Some(rev),
                });
            }
        }
        Err(WriteError::Changed)
    }

    /// Removes every key holding the entry `key` names; returns the entry.
    pub async fn remove(
        &self,
        deployment: &str,
        key: &KeyRef,
    ) -> Result<(Written, Entry), WriteError> {
        for _ in 0..ATTEMPTS {
            let listing = self.list(deployment).await?;
            let found: Vec<&Stored> = listing
                .entries
                .iter()
                .filter(|s| key.matches(&s.entry_key))
                .collect();
            let Some(first) = found.first() else {
                return Err(WriteError::NoEntry {
                    deployment: deployment.to_string(),
                    entry: match key {
                        KeyRef::Cidr(n) => n.to_string(),
                        KeyRef::Group(g) => g.clone(),
                    },
                });
            };
            let compares = found
                .iter()
                .map(|s| Compare::mod_revision(s.key.as_str(), CompareOp::Equal, s.mod_revision))
                .collect();
            let ops = found
                .iter()
                .map(|s| TxnOp::delete(s.key.as_str(), None))
                .collect();
            if let Some(rev) = self.txn(compares, ops).await? {
                return Ok((
                    Written {
                        revision: Some(rev),
                    },
                    first.entry.clone(),
                ));
            }
        }
        Err(WriteError::Changed)
    }

    /// Copies `from`'s entries once; entries already present are kept.
    pub async fn copy(&self, deployment: &str, from: &str) -> Result<Written, WriteError> {
        for _ in 0..ATTEMPTS {
            let source = self.list(from).await?;
            let target = self.list(deployment).await?;
            let folder = self.folder(deployment);
            let mut compares = Vec::new();
            let mut ops = Vec::new();
            for s in &source.entries {
                if target.entries.iter().any(|t| t.entry_key == s.entry_key) {
                    continue;
                }
                let key = format!("{folder}{}", key_name(&s.entry_key));
                if ops.len() < MAX_OPS {
                    compares.push(Compare::create_revision(key.as_str(), CompareOp::Equal, 0));
                    ops.push(TxnOp::put(key, to_json(&s.entry), None));
                }
            }
            if ops.is_empty() {
                return Ok(Written { revision: None });
            }
            if let Some(rev) = self.txn(compares, ops).await? {
                return Ok(Written {
                    revision: Some(rev),
                });
            }
        }
        Err(WriteError::Changed)
    }
}

/// etcd's default bound on the operations of one transaction (`--max-txn-ops`).
const MAX_OPS: usize = 128;

fn to_json(entry: &Entry) -> String {
    serde_json::to_string(entry).unwrap_or_default()
}

/// The compares and operations that add `entries` to `listing`: an entry
/// with the same key is updated at its mod revision (and duplicates of it
/// deleted), a new one created under its own key only if that key is absent.
fn plan_add(folder: &str, listing: &Listing, entries: &[ValidEntry]) -> (Vec<Compare>, Vec<TxnOp>) {
    let mut compares = Vec::new();
    let mut ops = Vec::new();
    for v in entries {
        let want = Entry::from_rule(&v.rule);
        let present: Vec<&Stored> = listing
            .entries
            .iter()
            .filter(|s| s.entry_key == v.key)
            .collect();
        match present.split_first() {
            Some((first, rest)) => {
                if first.entry == want && rest.is_empty() {
                    continue;
                }
                compares.push(Compare::mod_revision(
                    first.key.as_str(),
                    CompareOp::Equal,
                    first.mod_revision,
                ));
                ops.push(TxnOp::put(first.key.as_str(), to_json(&want), None));
                for s in rest {
                    compares.push(Compare::mod_revision(
                        s.key.as_str(),
                        CompareOp::Equal,
                        s.mod_revision,
                    ));
                    ops.push(TxnOp::delete(s.key.as_str(), None));
                }
            }
            None => {
                let key = format!("{folder}{}", key_name(&v.key));
                compares.push(Compare::create_revision(key.as_str(), CompareOp::Equal, 0));
                ops.push(TxnOp::put(key, to_json(&want), None));
            }
        }
    }
    (compares, ops)
}

#[cfg(test)]
mod tests {
    use super::super::testing::Etcd;
    use super::*;

    fn valid(json: &str) -> ValidEntry {
        serde_json::from_str::<Entry>(json)
            .unwrap()
            .validate(None)
            .unwrap()
    }

    #[tokio::test]
    async fn writes_are_transactions_on_the_revision_read() {
        let etcd = Etcd::start();
        let w = Writer::new(&etcd.store("/t/"));
        let folder = w.folder("orders");
        assert_eq!(folder, "/t/deployments/orders/accessList/");

        // Create only if absent.
        let e: Entry = serde_json::from_str(r#"{"cidrBlock":"10.0.0.0/16"}"#).unwrap();
        let key = format!("{folder}app");
        let r1 = w.put_if_absent(&key, &e).await.unwrap().unwrap();
        assert_eq!(w.put_if_absent(&key, &e).await.unwrap(), None);

        // Update and delete only at the mod revision read.
        let stale = r1 - 1;
        assert_eq!(w.update_at(&key, &e, stale).await.unwrap(), None);
        let r2 = w.update_at(&key, &e, r1).await.unwrap().unwrap();
        assert!(r2 > r1);
        assert_eq!(w.delete_at(&key, r1).await.unwrap(), None);
        assert!(w.delete_at(&key, r2).await.unwrap().is_some());
        assert!(w.list("orders").await.unwrap().entries.is_empty());
    }

    #[tokio::test]
    async fn add_replaces_by_key_remove_and_copy() {
        let etcd = Etcd::start();
        let w = Writer::new(&etcd.store("/t/"));
        let a = valid(r#"{"cidrBlock":"10.0.0.0/16","comment":"app"}"#);
        let written = w.add("orders", std::slice::from_ref(&a)).await.unwrap();
        assert!(written.revision.is_some());
        // The same entry again changes nothing.
        assert_eq!(w.add("orders", &[a]).await.unwrap().revision, None);
        // Same CIDR, new comment: replaced in place, not added.
        let a2 = valid(r#"{"cidrBlock":"10.0.0.0/16","comment":"apps"}"#);
        w.add("orders", &[a2]).await.unwrap();
        let list = w.list("orders").await.unwrap();
        assert_eq!(list.entries.len(), 1);
        assert_eq!(list.entries[0].entry.comment.as_deref(), Some("apps"));
        assert_eq!(
            list.entries[0].key,
            "/t/deployments/orders/accessList/10.0.0.0_16"
        );

        let g = valid(r#"{"awsSecurityGroup":"sg-0a1b2c3d","awsAccountId":"123456789012"}"#);
        w.add("billing", &[g]).await.unwrap();
        w.copy("orders", "billing").await.unwrap();
        assert_eq!(w.list("orders").await.unwrap().entries.len(), 2);
        assert_eq!(w.copy("orders", "billing").await.unwrap().revision, None);

        let (_, removed) = w
            .remove("orders", &crate::access::parse_key("sg-0a1b2c3d").unwrap())
            .await
            .unwrap();
        assert_eq!(removed.aws_security_group.as_deref(), Some("sg-0a1b2c3d"));
        let missing = w
            .remove("orders", &crate::access::parse_key("10.9.0.0/16").unwrap())
            .await;
        assert!(matches!(missing, Err(WriteError::NoEntry { .. })));
        // Another prefix is another fleet.
        let other = Writer::new(&etcd.store("/u/"));
        assert!(other.list("orders").await.unwrap().entries.is_empty());
    }

    #[tokio::test]
    async fn an_unreachable_store_is_an_error_not_a_hang() {
        let mut store = Etcd::start().store("/t/"); // dropped: etcd is gone
        store.endpoints = vec![format!(
            "http://127.0.0.1:{}",
            super::super::testing::free_port()
        )];
        let w = Writer::new(&store);
        assert!(matches!(
            w.list("orders").await,
            Err(WriteError::Unreachable(_))
        ));
    }
}

#[cfg(test)]
mod status_tests {
    use super::super::testing::Etcd;
    use super::*;

    /// A write, then this host's snapshot: the entry is enforced once the
    /// store revision it made is applied.
    #[test]
    fn the_cli_path_writes_and_a_snapshot_enforces_it() {
        let etcd = Etcd::start();
        let store = etcd.store("/t/");
        let w = Writer::new(&store);
        let v = serde_json::from_str::<Entry>(r#"{"cidrBlock":"10.1.0.0/16","comment":"ops"}"#)
            .unwrap()
            .validate(None)
            .unwrap();
        let (written, listing) = super::super::block_on(async {
            let written = w.add("orders", std::slice::from_ref(&v)).await?;
            Ok((written, w.list("orders").await?))
        })
        .unwrap();
        let revision = written.revision.unwrap();
        assert_eq!(listing.entries.len(), 1);
        assert!(listing.revision >= revision);

        let mut view = super::super::View::new("/t/");
        view.replace_all(
            listing.revision,
            listing.entries.iter().map(|s| {
                (
                    s.key.clone().into_bytes(),
                    serde_json::to_vec(&s.entry).unwrap(),
                )
            }),
        );
        let cfg = crate::config::load_bytes(
            std::path::Path::new("/nonexistent/moat.toml"),
            b"[store]\netcd = { endpoints = [\"http://127.0.0.1:1\"] }\n[[deployment]]\nname = \"orders\"\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:2\"\n",
            std::time::SystemTime::now(),
        )
        .unwrap();
        let snap = crate::snapshot::Snapshot::compile(
            std::sync::Arc::new(cfg),
            Default::default(),
            std::sync::Arc::new(view.entries()),
            std::time::SystemTime::now(),
        );
        assert!(snap.store.revision >= revision);
        assert!(super::super::enforces(
            &snap,
            "orders",
            &listing.entries[0].entry
        ));
        let other: Entry =
            serde_json::from_str(r#"{"cidrBlock":"10.1.0.0/16","comment":"other"}"#).unwrap();
        assert!(!super::super::enforces(&snap, "orders", &other));
        assert_eq!(snap.compiled[0].table.prefixes(), 1);
    }
}
