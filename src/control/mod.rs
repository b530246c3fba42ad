//! The control plane: what changes the policy and shows the state. The
//! access-list stores and the one edit path that the HTTP API (`api`) and
//! `moat access-list` (`cli`, `client`) share; config reloads (`reload`,
//! `watch`); the admin endpoint (`admin`); systemd notification (`systemd`).

pub mod admin;
pub mod api;
pub mod cli;
pub mod client;
pub mod edit;
pub mod etcd;
pub mod gauges;
pub mod reload;
pub mod store;
pub mod systemd;
pub mod watch;

use crate::config::{Rule, RuleTarget};
use crate::policy::access::{format_instant, Entry, KeyRef};
use crate::policy::snapshot::Snapshot;

pub use store::{Listing, Store, StoreError};

/// Whether `rule` is what `entry` stores (target, comment, expiry).
pub fn rule_is(rule: &Rule, entry: &Entry) -> bool {
    let Ok(v) = entry.validate(None) else {
        return false;
    };
    if v.rule.target != rule.target
        || v.rule.expires.map(format_instant) != rule.expires.map(format_instant)
    {
        return false;
    }
    match &entry.comment {
        Some(c) => *c == rule.description,
        // The config's description defaults to the CIDR or the group id.
        None => {
            rule.description.is_empty()
                || rule.description
                    == match &rule.target {
                        RuleTarget::Cidr(n) => n.to_string(),
                        RuleTarget::Group(g) => g.id.clone(),
                    }
        }
    }
}

/// The deployment's own rules in force: its `allow` tables and its
/// fleet-store entries (SPEC 7).
fn own_rules<'s>(snap: &'s Snapshot, deployment: &str) -> impl Iterator<Item = &'s Rule> {
    let file = snap
        .config
        .deployments
        .iter()
        .find(|d| d.name == deployment)
        .into_iter()
        .flat_map(|d| &d.rules);
    file.chain(snap.store.of(deployment))
}

/// Whether `snap` (the one in force) has `entry` among the deployment's own rules.
pub fn in_force(snap: &Snapshot, deployment: &str, entry: &Entry) -> bool {
    own_rules(snap, deployment).any(|r| rule_is(r, entry))
}

/// Whether `snap` no longer has a rule of the deployment that `key` names.
pub fn gone(snap: &Snapshot, deployment: &str, key: &KeyRef) -> bool {
    !own_rules(snap, deployment).any(|r| {
        let k = match &r.target {
            RuleTarget::Cidr(n) => crate::policy::access::EntryKey::Cidr(*n),
            RuleTarget::Group(g) => crate::policy::access::EntryKey::Group(g.clone()),
        };
        key.matches(&k)
    })
}
