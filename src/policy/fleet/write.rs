//! Writes to the fleet store (SPEC 6.3 and 7), for the API and `moat
//! access-list`: every change is one etcd transaction that creates a key only
//! if it is absent and updates or deletes a key only at the mod revision it
//! was read at, so two writers never lose each other's change. Each write
//! returns the revision it made: this host enforces it once its snapshot's
//! `store.revision` reaches it ([`super::enforced`]).

use super::client::{self, REQUEST_TIMEOUT};
use super::view::ACCESS_LIST;
use crate::config::Store;
use crate::policy::access::{Entry, EntryKey, KeyRef, ValidEntry};
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
    /// A transaction was sent but not answered: it may have committed.
    #[error("the fleet store (etcd) did not confirm the write ({0}); it may have been applied: read the list again")]
    Unconfirmed(String),
    #[error("the access list kept changing under this write; read it again and retry")]
    Changed,
    #[error("deployment \"{deployment}\" has no access-list entry {entry}")]
    NoEntry { deployment: String, entry: String },
    /// The list changed since the read the write was conditioned on (If-Match).
    #[error("the access list changed since it was read; read it again and retry")]
    Stale,
    #[error("{0}")]
    TooMany(String),
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
                Err(WriteError::Unconfirmed(e.to_string()))
            }
            Err(_) => Err(WriteError::Unconfirmed("the transaction timed out".into())),
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
    /// `read`: the listing an If-Match was checked against; the write is then
    /// one transaction that commits only if the list is still that one
    /// ([`WriteError::Stale`] otherwise, no retry). Without it, more changes
    /// than one transaction takes are written in batches of [`MAX_OPS`].
    pub async fn add(
        &self,
        deployment: &str,
        entries: &[ValidEntry],
        read: Option<&Listing>,
    ) -> Result<Written, WriteError> {
        let folder = self.folder(deployment);
        if let Some(read) = read {
            let (_, ops) = plan_add(&folder, read, entries);
            return self.pinned(&folder, read, ops).await;
        }
        let mut last = None;
        let mut rest = entries;
        while !rest.is_empty() {
            let mut done = false;
            for _ in 0..ATTEMPTS {
                let listing = self.list(deployment).await?;
                // The longest run of entries whose changes fit one transaction.
                let (mut compares, mut ops, mut taken) = (Vec::new(), Vec::new(), 0);
                for v in rest {
                    let (c, o) = plan_add(&folder, &listing, std::slice::from_ref(v));
                    if taken > 0
                        && (ops.len() + o.len() > MAX_OPS || compares.len() + c.len() > MAX_OPS)
                    {
                        break;
                    }
                    compares.extend(c);
                    ops.extend(o);
                    taken += 1;
                }
                if ops.is_empty() {
                    rest = &rest[taken..];
                    done = true;
                    break;
                }
                if let Some(rev) = self.txn(compares, ops).await? {
                    last = Some(rev);
                    rest = &rest[taken..];
                    done = true;
                    break;
                }
            }
            if !done {
                return Err(WriteError::Changed);
            }
        }
        Ok(Written { revision: last })
    }

    /// One transaction of `ops` that commits only if the deployment's list
    /// is still `read`: no key under `folder` created or changed since its
    /// revision, and every key it listed still at its mod revision.
    async fn pinned(
        &self,
        folder: &str,
        read: &Listing,
        ops: Vec<TxnOp>,
    ) -> Result<Written, WriteError> {
        if ops.is_empty() {
            return Ok(Written { revision: None });
        }
        if ops.len() > MAX_OPS {
            return Err(WriteError::TooMany(format!(
                "this change makes {} writes and a conditional request (If-Match) is one etcd transaction of at most {MAX_OPS} (etcd --max-txn-ops); send at most {MAX_OPS} entries, or send it without If-Match",
                ops.len()
            )));
        }
        let mut compares =
            vec![Compare::mod_revision(folder, CompareOp::Less, read.revision + 1).with_prefix()];
        // A deleted key shows only in a compare on it; they fit beside the
        // range compare up to the transaction's bound.
        if read.entries.len() < MAX_OPS {
            compares.extend(
                read.entries.iter().map(|s| {
                    Compare::mod_revision(s.key.as_str(), CompareOp::Equal, s.mod_revision)
                }),
            );
        }
        match self.txn(compares, ops).await? {
            Some(rev) => Ok(Written {
                revision: Some(rev),
            }),
            None => Err(WriteError::Stale),
        }
    }

    /// Removes every key holding the entry `key` names; returns the entry.
    /// `read`: as for [`Writer::add`].
    pub async fn remove(
        &self,
        deployment: &str,
        key: &KeyRef,
        read: Option<&Listing>,
    ) -> Result<(Written, Entry), WriteError> {
        for _ in 0..ATTEMPTS {
            let listing = match read {
                Some(r) => r.clone(),
                None => self.list(deployment).await?,
            };
            let found: Vec<&Stored> = listing
                .entries
                .iter()
                .filter(|s| key.matches(&s.entry_key))
                .collect();
            let Some(first) = found.first() else {
                return Err(WriteError::NoEntry {
                    deployment: deployment.to_string(),
                    entry: key.to_string(),
                });
            };
            let compares = found
                .iter()
                .map(|s| Compare::mod_revision(s.key.as_str(), CompareOp::Equal, s.mod_revision))
                .collect();
            let ops: Vec<TxnOp> = found
                .iter()
                .map(|s| TxnOp::delete(s.key.as_str(), None))
                .collect();
            if read.is_some() {
                let written = self.pinned(&self.folder(deployment), &listing, ops).await?;
                return Ok((written, first.entry.clone()));
            }
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
    /// `read`: as for [`Writer::add`]; without it, in batches of [`MAX_OPS`].
    pub async fn copy(
        &self,
        deployment: &str,
        from: &str,
        read: Option<&Listing>,
    ) -> Result<Written, WriteError> {
        let folder = self.folder(deployment);
        let mut last = None;
        let mut attempts = 0;
        loop {
            let source = self.list(from).await?;
            let target = match read {
                Some(r) => r.clone(),
                None => self.list(deployment).await?,
            };
            let mut compares = Vec::new();
            let mut ops = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for s in &source.entries {
                if target.entries.iter().any(|t| t.entry_key == s.entry_key) {
                    continue;
                }
                let key = format!("{folder}{}", key_name(&s.entry_key));
                if seen.insert(key.clone()) {
                    ops.push((key, s.entry.clone())); // once, if the source holds it twice
                }
            }
            let put = |batch: &[(String, Entry)]| -> Vec<TxnOp> {
                batch
                    .iter()
                    .map(|(k, e)| TxnOp::put(k.as_str(), to_json(e), None))
                    .collect()
            };
            if let Some(read) = read {
                return self.pinned(&folder, read, put(&ops)).await;
            }
            if ops.is_empty() {
                return Ok(Written { revision: last });
            }
            ops.truncate(MAX_OPS); // the rest in the next round
            compares.extend(
                ops.iter()
                    .map(|(k, _)| Compare::create_revision(k.as_str(), CompareOp::Equal, 0)),
            );
            match self.txn(compares, put(&ops)).await? {
                Some(rev) => {
                    last = Some(rev);
                    attempts = 0;
                }
                None => {
                    attempts += 1;
                    if attempts >= ATTEMPTS {
                        return Err(WriteError::Changed);
                    }
                }
            }
        }
    }
}

/// etcd's default bound on the operations of one transaction (`--max-txn-ops`).
pub const MAX_OPS: usize = 128;

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
        let written = w
            .add("orders", std::slice::from_ref(&a), None)
            .await
            .unwrap();
        assert!(written.revision.is_some());
        // The same entry again changes nothing.
        assert_eq!(w.add("orders", &[a], None).await.unwrap().revision, None);
        // Same CIDR, new comment: replaced in place, not added.
        let a2 = valid(r#"{"cidrBlock":"10.0.0.0/16","comment":"apps"}"#);
        w.add("orders", &[a2], None).await.unwrap();
        let list = w.list("orders").await.unwrap();
        assert_eq!(list.entries.len(), 1);
        assert_eq!(list.entries[0].entry.comment.as_deref(), Some("apps"));
        assert_eq!(
            list.entries[0].key,
            "/t/deployments/orders/accessList/10.0.0.0_16"
        );

        let g = valid(r#"{"awsSecurityGroup":"sg-0a1b2c3d","awsAccountId":"123456789012"}"#);
        w.add("billing", &[g], None).await.unwrap();
        w.copy("orders", "billing", None).await.unwrap();
        assert_eq!(w.list("orders").await.unwrap().entries.len(), 2);
        assert_eq!(
            w.copy("orders", "billing", None).await.unwrap().revision,
            None
        );

        let (_, removed) = w
            .remove(
                "orders",
                &crate::policy::access::parse_key("sg-0a1b2c3d").unwrap(),
                None,
            )
            .await
            .unwrap();
        assert_eq!(removed.aws_security_group.as_deref(), Some("sg-0a1b2c3d"));
        let missing = w
            .remove(
                "orders",
                &crate::policy::access::parse_key("10.9.0.0/16").unwrap(),
                None,
            )
            .await;
        assert!(matches!(missing, Err(WriteError::NoEntry { .. })));
        // Another prefix is another fleet.
        let other = Writer::new(&etcd.store("/u/"));
        assert!(other.list("orders").await.unwrap().entries.is_empty());
    }

    /// Two writers holding the same read (one ETag): exactly one commits,
    /// the other is told the list changed, whatever kind of write each is.
    #[tokio::test]
    async fn a_conditional_write_commits_only_on_the_list_read() {
        let etcd = Etcd::start();
        let w = Writer::new(&etcd.store("/t/"));
        let a = valid(r#"{"cidrBlock":"10.0.0.0/16"}"#);
        let b = valid(r#"{"cidrBlock":"10.1.0.0/16"}"#);
        let c = valid(r#"{"cidrBlock":"10.2.0.0/16"}"#);
        w.add("orders", std::slice::from_ref(&a), None)
            .await
            .unwrap();
        w.add("billing", std::slice::from_ref(&c), None)
            .await
            .unwrap();

        // add vs add (an added key).
        let read = w.list("orders").await.unwrap();
        assert!(w
            .add("orders", std::slice::from_ref(&b), Some(&read))
            .await
            .unwrap()
            .revision
            .is_some());
        let other = valid(r#"{"cidrBlock":"10.3.0.0/16"}"#);
        assert_eq!(
            w.add("orders", &[other], Some(&read)).await,
            Err(WriteError::Stale)
        );

        // remove vs add (a deleted key).
        let read = w.list("orders").await.unwrap();
        let key = crate::policy::access::parse_key("10.1.0.0/16").unwrap();
        w.remove("orders", &key, Some(&read)).await.unwrap();
        assert_eq!(
            w.copy("orders", "billing", Some(&read)).await,
            Err(WriteError::Stale)
        );

        // add vs remove (a changed key).
        let read = w.list("orders").await.unwrap();
        let a2 = valid(r#"{"cidrBlock":"10.0.0.0/16","comment":"new"}"#);
        w.add("orders", &[a2], Some(&read)).await.unwrap();
        let key = crate::policy::access::parse_key("10.0.0.0/16").unwrap();
        assert_eq!(
            w.remove("orders", &key, Some(&read)).await.err(),
            Some(WriteError::Stale)
        );
        assert_eq!(w.list("orders").await.unwrap().entries.len(), 1);
    }

    /// More changes than one etcd transaction takes (--max-txn-ops 128):
    /// written in batches without If-Match, refused by name with it.
    #[tokio::test]
    async fn large_writes_are_batched_never_truncated() {
        let etcd = Etcd::start();
        let w = Writer::new(&etcd.store("/t/"));
        let many: Vec<ValidEntry> = (0..300)
            .map(|i| {
                valid(&format!(
                    r#"{{"cidrBlock":"10.{}.{}.0/24"}}"#,
                    i / 256,
                    i % 256
                ))
            })
            .collect();
        assert!(w
            .add("billing", &many, None)
            .await
            .unwrap()
            .revision
            .is_some());
        assert_eq!(w.list("billing").await.unwrap().entries.len(), 300);
        let read = w.list("orders").await.unwrap();
        assert!(matches!(
            w.add("orders", &many, Some(&read)).await,
            Err(WriteError::TooMany(m)) if m.contains("128")
        ));
        assert!(matches!(
            w.copy("orders", "billing", Some(&read)).await,
            Err(WriteError::TooMany(_))
        ));
        assert!(w
            .copy("orders", "billing", None)
            .await
            .unwrap()
            .revision
            .is_some());
        assert_eq!(w.list("orders").await.unwrap().entries.len(), 300);
        assert_eq!(
            w.copy("orders", "billing", None).await.unwrap().revision,
            None
        );
        // Replacing them all (new comments) also takes several transactions.
        let again: Vec<ValidEntry> = (0..300)
            .map(|i| {
                valid(&format!(
                    r#"{{"cidrBlock":"10.{}.{}.0/24","comment":"x"}}"#,
                    i / 256,
                    i % 256
                ))
            })
            .collect();
        w.add("orders", &again, None).await.unwrap();
        let list = w.list("orders").await.unwrap();
        assert!(list
            .entries
            .iter()
            .all(|s| s.entry.comment.as_deref() == Some("x")));
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
            let written = w.add("orders", std::slice::from_ref(&v), None).await?;
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
        let snap = crate::policy::snapshot::Snapshot::compile(
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
