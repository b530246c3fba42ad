//! The control plane's library: access-list stores and the one edit path
//! that the HTTP API and `moat access-list` share.

pub mod cli;
pub mod client;
pub mod edit;
pub mod store;

use crate::access::{format_instant, Entry, KeyRef};
use crate::config::{Config, Rule, RuleTarget};

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

/// Whether `config` (the one in force) has `entry` among the deployment's own rules.
pub fn in_force(config: &Config, deployment: &str, entry: &Entry) -> bool {
    config
        .deployments
        .iter()
        .find(|d| d.name == deployment)
        .is_some_and(|d| d.rules.iter().any(|r| rule_is(r, entry)))
}

/// Whether `config` no longer has a rule of the deployment that `key` names.
pub fn gone(config: &Config, deployment: &str, key: &KeyRef) -> bool {
    config
        .deployments
        .iter()
        .find(|d| d.name == deployment)
        .is_none_or(|d| {
            !d.rules.iter().any(|r| {
                let k = match &r.target {
                    RuleTarget::Cidr(n) => crate::access::EntryKey::Cidr(*n),
                    RuleTarget::Group(g) => crate::access::EntryKey::Group(g.clone()),
                };
                key.matches(&k)
            })
        })
}
