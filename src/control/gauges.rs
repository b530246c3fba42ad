//! The gauges that describe the generation in force (rules, certificate
//! expiry, security-group members) and the last successful load.

use crate::config::{GroupKey, RuleTarget};
use crate::data::state::Live;
use crate::metrics::metrics;
use std::collections::BTreeSet;
use std::time::SystemTime;

/// Gauges that describe the configuration in force.
pub fn update(live: &Live) {
    let m = metrics();
    for (d, c) in live.snap.config.deployments.iter().zip(&live.snap.compiled) {
        m.rules
            .with_label_values(&[&d.name])
            .set(c.table.prefixes() as i64);
        match d.tls.as_ref().and_then(|t| t.not_after) {
            Some(na) => m.cert_expiry.with_label_values(&[&d.name]).set(na as f64),
            None => {
                let _ = m.cert_expiry.remove_label_values(&[&d.name]);
            }
        }
    }
    let sg = &live.snap.config.security_groups;
    // A group some rule names but with no member yet shows as 0.
    let named: Vec<&GroupKey> = live
        .snap
        .config
        .deployments
        .iter()
        .flat_map(|d| d.rules.iter().chain(live.snap.store.of(&d.name)))
        .filter_map(|r| match &r.target {
            RuleTarget::Group(g) => Some(g),
            RuleTarget::Cidr(_) => None,
        })
        .collect();
    let keys: BTreeSet<_> = sg
        .members
        .keys()
        .chain(live.snap.resolved.keys())
        .chain(named)
        .collect();
    m.group_members.reset();
    for k in keys {
        let mut nets: Vec<_> = sg
            .members
            .get(k)
            .into_iter()
            .flatten()
            .chain(live.snap.resolved.get(k).into_iter().flatten())
            .collect();
        nets.sort();
        nets.dedup();
        m.group_members
            .with_label_values(&[&k.account, &k.id])
            .set(nets.len() as i64);
    }
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Records a successful load (start-up or reload).
pub fn mark_success() {
    let m = metrics();
    m.last_reload_successful.set(1);
    m.last_reload_success_timestamp.set(now_secs());
}
