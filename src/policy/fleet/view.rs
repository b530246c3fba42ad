//! The fleet store as this host last applied it: every key under
//! `{prefix}deployments/`, its raw value, and what the value means (a rule,
//! or why it is ignored). Reads and watch events change it; it turns into
//! the `StoreEntries` a snapshot compiles, and into the cache file.

use crate::config::{Rule, RuleTarget};
use crate::policy::access::Entry;
use crate::policy::snapshot::StoreEntries;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// The folder of a deployment's entries, under `{prefix}deployments/{name}/`.
pub const ACCESS_LIST: &str = "accessList/";

/// One stored value and its meaning.
#[derive(Debug, Clone)]
struct Stored {
    raw: String,
    /// The rule it becomes, or why it cannot.
    rule: Result<Rule, String>,
}

/// One deployment's keys, by the key's name under `accessList/`.
#[derive(Debug, Default, Clone)]
struct Deployment {
    keys: BTreeMap<String, Stored>,
    /// The valid entries as rules, rebuilt when `keys` changes.
    rules: Arc<Vec<Rule>>,
}

impl Deployment {
    fn rebuild(&mut self) {
        let rules = self
            .keys
            .values()
            .filter_map(|s| s.rule.as_ref().ok().cloned())
            .collect();
        self.rules = Arc::new(rules);
    }
}

/// A change of one key, as a read or a watch event reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
}

#[derive(Debug, Clone)]
pub struct View {
    /// `{prefix}deployments/`: every key this view holds starts with it.
    root: String,
    /// The etcd revision this view reflects (0: never read).
    pub revision: i64,
    /// Shared with the clones handed to the cache writer: a clone of the
    /// view costs one reference per deployment, and a change copies only
    /// the deployment it touches, and only while the writer still holds it.
    deployments: BTreeMap<String, Arc<Deployment>>,
}

/// Splits `{root}{name}/accessList/{entry}` into the deployment's name and
/// the entry's key name (free text, possibly empty or with slashes).
pub fn split_key<'k>(root: &str, key: &'k str) -> Option<(&'k str, &'k str)> {
    let rest = key.strip_prefix(root)?;
    let (name, rest) = rest.split_once('/')?;
    let entry = rest.strip_prefix(ACCESS_LIST)?;
    (!name.is_empty()).then_some((name, entry))
}

/// What a stored value means: a rule, or a one-line reason it is ignored.
pub fn parse_value(value: &[u8]) -> Result<Rule, String> {
    let entry: Entry = serde_json::from_slice(value).map_err(|e| {
        format!("not an access-list entry in JSON ({e}); write it like {{\"cidrBlock\": \"10.0.0.0/16\", \"comment\": \"app servers\"}}")
    })?;
    let valid = entry.validate(None).map_err(|errs| {
        errs.iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    let mut rule = valid.rule;
    if rule.description.is_empty() {
        rule.description = match &rule.target {
            RuleTarget::Cidr(n) => n.to_string(),
            RuleTarget::Group(g) => g.id.clone(),
        };
    }
    Ok(rule)
}

impl View {
    /// An empty view of the store under `prefix` (the `[store]` prefix).
    pub fn new(prefix: &str) -> View {
        View {
            root: format!("{prefix}deployments/"),
            revision: 0,
            deployments: BTreeMap::new(),
        }
    }

    /// `{prefix}deployments/`: the range to read and watch.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// Replaces everything with a full read at `revision`.
    pub fn replace_all(
        &mut self,
        revision: i64,
        kvs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
    ) {
        self.deployments.clear();
        for (key, value) in kvs {
            self.put(&key, &value);
        }
        for d in self.deployments.values_mut() {
            Arc::make_mut(d).rebuild();
        }
        self.revision = revision;
    }

    /// Applies the changes of one watch response, in order. Returns the
    /// deployments whose entries changed.
    pub fn apply(&mut self, changes: &[Change]) -> BTreeSet<String> {
        let mut touched = BTreeSet::new();
        for c in changes {
            let name = match c {
                Change::Put { key, value } => self.put(key, value),
                Change::Delete { key } => self.delete(key),
            };
            touched.extend(name);
        }
        for name in &touched {
            if let Some(d) = self.deployments.get_mut(name) {
                let d = Arc::make_mut(d);
                d.rebuild();
                if d.keys.is_empty() {
                    self.deployments.remove(name);
                }
            }
        }
        touched
    }

    /// Stores one value (rules are rebuilt by the caller). Returns the
    /// deployment it belongs to, None for a key outside the layout.
    fn put(&mut self, key: &[u8], value: &[u8]) -> Option<String> {
        let key = String::from_utf8_lossy(key);
        let Some((name, entry)) = split_key(&self.root, &key) else {
            tracing::debug!(key = %key, "fleet store: key outside {{prefix}}deployments/NAME/accessList/; ignored");
            return None;
        };
        let rule = parse_value(value);
        if let Err(e) = &rule {
            tracing::warn!(key = %key, deployment = name, "fleet store: ignoring the value of {key}: {e}");
        }
        let stored = Stored {
            raw: String::from_utf8_lossy(value).into_owned(),
            rule,
        };
        let d = self.deployments.entry(name.to_string()).or_default();
        Arc::make_mut(d).keys.insert(entry.to_string(), stored);
        Some(name.to_string())
    }

    fn delete(&mut self, key: &[u8]) -> Option<String> {
        let key = String::from_utf8_lossy(key);
        let (name, entry) = split_key(&self.root, &key)?;
        let d = self.deployments.get_mut(name)?;
        Arc::make_mut(d)
            .keys
            .remove(entry)
            .map(|_| name.to_string())
    }

    /// The valid entries, for a snapshot to compile.
    pub fn entries(&self) -> StoreEntries {
        StoreEntries {
            revision: self.revision,
            rules: self
                .deployments
                .iter()
                .filter(|(_, d)| !d.rules.is_empty())
                .map(|(n, d)| (n.clone(), d.rules.clone()))
                .collect(),
        }
    }

    /// Per deployment: valid entries and invalid keys stored now.
    pub fn counts(&self) -> BTreeMap<&str, (usize, usize)> {
        self.deployments
            .iter()
            .map(|(n, d)| {
                let valid = d.rules.len();
                (n.as_str(), (valid, d.keys.len() - valid))
            })
            .collect()
    }

    /// Every key and its raw value (for the cache file).
    pub fn raw(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (name, d) in &self.deployments {
            for (entry, s) in &d.keys {
                out.push((
                    format!("{}{name}/{ACCESS_LIST}{entry}", self.root),
                    s.raw.clone(),
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> Change {
        Change::Put {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
        }
    }

    fn cidrs(v: &View, dep: &str) -> Vec<String> {
        v.entries()
            .of(dep)
            .iter()
            .map(|r| match &r.target {
                RuleTarget::Cidr(n) => n.to_string(),
                RuleTarget::Group(g) => g.id.clone(),
            })
            .collect()
    }

    #[test]
    fn keys_follow_the_layout() {
        let root = "/moat/deployments/";
        assert_eq!(
            split_key(root, "/moat/deployments/orders/accessList/a"),
            Some(("orders", "a"))
        );
        assert_eq!(
            split_key(root, "/moat/deployments/orders/accessList/x/y"),
            Some(("orders", "x/y"))
        );
        assert_eq!(split_key(root, "/moat/deployments/orders/other/a"), None);
        assert_eq!(split_key(root, "/moat/deployments//accessList/a"), None);
        assert_eq!(
            split_key(root, "/other/deployments/orders/accessList/a"),
            None
        );
    }

    #[test]
    fn values_become_rules_or_reasons() {
        let r = parse_value(br#"{"cidrBlock":"10.0.0.0/16","comment":"app"}"#).unwrap();
        assert_eq!(r.description, "app");
        let r = parse_value(br#"{"cidrBlock":"203.0.113.7"}"#).unwrap();
        assert_eq!(r.description, "203.0.113.7/32");
        assert!(parse_value(b"not json").unwrap_err().contains("JSON"));
        assert!(parse_value(br#"{"cidrBlock":"10.0.0.1/16"}"#)
            .unwrap_err()
            .contains("host bits"));
        assert!(parse_value(br#"{"awsSecurityGroup":"sg-0a1b2c3d"}"#)
            .unwrap_err()
            .contains("awsAccountId"));
        assert!(
            parse_value(br#"{"cidrBlock":"10.0.0.0/8","deleteAfterDate":"soon"}"#)
                .unwrap_err()
                .contains("deleteAfterDate")
        );
        // A past date is not an error when reading: the entry just expires.
        let r =
            parse_value(br#"{"cidrBlock":"10.0.0.0/8","deleteAfterDate":"2000-01-01T00:00:00Z"}"#)
                .unwrap();
        assert!(r.expires.is_some());
    }

    #[test]
    fn a_bad_value_is_counted_and_blocks_nothing() {
        let mut v = View::new("/moat/");
        v.replace_all(
            7,
            [
                (
                    "/moat/deployments/orders/accessList/a",
                    r#"{"cidrBlock":"10.0.0.0/16"}"#,
                ),
                ("/moat/deployments/orders/accessList/b", "garbage"),
                (
                    "/moat/deployments/billing/accessList/c",
                    r#"{"cidrBlock":"10.1.0.0/16"}"#,
                ),
                ("/moat/deployments/orders/meta", "whatever"),
            ]
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())),
        );
        assert_eq!(v.revision, 7);
        assert_eq!(cidrs(&v, "orders"), ["10.0.0.0/16"]);
        assert_eq!(cidrs(&v, "billing"), ["10.1.0.0/16"]);
        assert_eq!(v.counts()["orders"], (1, 1));
        assert_eq!(v.raw().len(), 3);
    }

    #[test]
    fn a_valid_entry_overwritten_with_a_bad_value_stops_applying() {
        let mut v = View::new("/moat/");
        let k = "/moat/deployments/orders/accessList/a";
        v.apply(&[put(k, r#"{"cidrBlock":"10.0.0.0/16"}"#)]);
        assert_eq!(cidrs(&v, "orders"), ["10.0.0.0/16"]);
        let touched = v.apply(&[put(k, r#"{"cidrBlock":"10.0.0.1/16"}"#)]);
        assert!(touched.contains("orders"));
        assert!(cidrs(&v, "orders").is_empty());
        assert_eq!(v.counts()["orders"], (0, 1));
        v.apply(&[Change::Delete {
            key: k.as_bytes().to_vec(),
        }]);
        assert!(v.counts().is_empty());
        assert!(v.entries().rules.is_empty());
    }

    #[test]
    fn changes_apply_in_order_and_touch_only_their_deployment() {
        let mut v = View::new("/p/");
        let a = "/p/deployments/orders/accessList/a";
        let b = "/p/deployments/billing/accessList/b";
        v.apply(&[put(b, r#"{"cidrBlock":"10.9.0.0/16"}"#)]);
        let billing = v.entries().rules["billing"].clone();
        let touched = v.apply(&[
            put(a, r#"{"cidrBlock":"10.0.0.0/16"}"#),
            Change::Delete {
                key: a.as_bytes().to_vec(),
            },
            put(a, r#"{"cidrBlock":"10.2.0.0/16"}"#),
        ]);
        assert_eq!(touched.into_iter().collect::<Vec<_>>(), ["orders"]);
        assert_eq!(cidrs(&v, "orders"), ["10.2.0.0/16"]);
        // Untouched deployments keep their compiled list (no copy).
        assert!(Arc::ptr_eq(&billing, &v.entries().rules["billing"]));
    }
}
