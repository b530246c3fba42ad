//! Live security-group membership: every `refresh`, each group some rule
//! references is resolved through EC2 (feature `aws`) and merged with the
//! membership file; a change is applied like a reload, revocation included.
//! A failed or partial refresh keeps the group's last known members.

use crate::config::{Config, GroupKey, RuleTarget};
use crate::control::reload::Reloads;
use crate::data::state::Shared;
#[cfg(feature = "aws")]
use crate::policy::snapshot::GroupMembers;
use std::collections::BTreeSet;
use std::sync::Arc;
#[cfg(feature = "aws")]
use std::time::Duration;

/// The groups that some rule of `config` references.
pub fn referenced(config: &Config) -> BTreeSet<GroupKey> {
    config
        .deployments
        .iter()
        .flat_map(|d| &d.rules)
        .filter_map(|r| match &r.target {
            RuleTarget::Group(g) => Some(g.clone()),
            RuleTarget::Cidr(_) => None,
        })
        .collect()
}

#[cfg(feature = "aws")]
/// Longest wait between retries after failures (before `refresh` caps it).
const BACKOFF_MAX: Duration = Duration::from_secs(60);
#[cfg(feature = "aws")]
/// Bound on one group's resolution (all its pages).
const GROUP_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(feature = "aws")]
/// The wait before the next refresh: `refresh` after a success; after `n`
/// failures in a row, 1 s doubling (capped) with ±25 % jitter.
fn next_wait(refresh: Duration, failures: u32) -> Duration {
    if failures == 0 {
        return refresh;
    }
    let base = Duration::from_secs(1u64 << failures.min(6))
        .min(BACKOFF_MAX)
        .min(refresh);
    base.mul_f64(0.75 + fastrand::f64() * 0.5)
}

/// Resolves every referenced group once. Groups that fail keep their entry
/// in `previous`; the bool says whether all succeeded.
#[cfg(feature = "aws")]
pub async fn resolve_all(
    ec2: &crate::policy::ec2::Ec2,
    groups: &BTreeSet<GroupKey>,
    previous: &GroupMembers,
) -> (GroupMembers, bool) {
    let mut out = GroupMembers::new();
    let mut all_ok = true;
    for g in groups {
        match tokio::time::timeout(GROUP_TIMEOUT, ec2.members(g)).await {
            Ok(Ok(members)) => {
                out.insert(g.clone(), members);
            }
            failed => {
                all_ok = false;
                let error = match failed {
                    Ok(Err(e)) => e,
                    _ => "timed out".to_string(),
                };
                tracing::warn!(aws_account = %g.account, security_group = %g.id, error = %error, "security group refresh failed; keeping its last known members");
                if let Some(old) = previous.get(g) {
                    out.insert(g.clone(), old.clone());
                }
            }
        }
    }
    (out, all_ok)
}

/// Waits until `[security_groups] aws` is configured (now or by a reload)
/// and returns its settings and the referenced groups.
async fn configured(
    shared: &Shared,
    generation: &mut tokio::sync::watch::Receiver<u64>,
) -> Option<Arc<crate::data::state::Live>> {
    loop {
        let live = shared.live.load_full();
        if live.snap.config.security_groups.aws.is_some() {
            return Some(live);
        }
        generation.changed().await.ok()?;
    }
}

fn warn_file_only(config: &Config, groups: &BTreeSet<GroupKey>) {
    for g in groups {
        let n = config.security_groups.members.get(g).map_or(0, Vec::len);
        tracing::warn!(aws_account = %g.account, security_group = %g.id, file_members = n, "security group has only the membership file's members until the first EC2 refresh succeeds");
    }
}

/// Runs for the daemon's life: refreshes groups while `[security_groups]
/// aws` is configured, and applies changes through the reloader.
#[cfg(feature = "aws")]
pub async fn refresh_loop(shared: Arc<Shared>, reloads: Reloads) {
    let mut generation = shared.generation.subscribe();
    let mut client: Option<(crate::config::AwsResolver, crate::policy::ec2::Ec2)> = None;
    let mut failures = 0u32;
    let mut warned = false;
    while let Some(live) = configured(&shared, &mut generation).await {
        let config = &live.snap.config;
        let Some(settings) = config.security_groups.aws.clone() else {
            continue;
        };
        let groups = referenced(config);
        if !std::mem::replace(&mut warned, true) {
            warn_file_only(config, &groups);
        }
        if client.as_ref().is_none_or(|(s, _)| *s != settings) {
            client = Some((
                settings.clone(),
                crate::policy::ec2::Ec2::new(&settings).await,
            ));
        }
        let Some((_, ec2)) = client.as_ref() else {
            continue;
        };
        let (resolved, ok) = resolve_all(ec2, &groups, &live.snap.resolved).await;
        crate::metrics::metrics()
            .group_refreshes
            .with_label_values(&[if ok { "success" } else { "failure" }])
            .inc();
        failures = if ok { 0 } else { failures + 1 };
        reloads.apply_groups(&live.snap.config, resolved).await;
        tokio::time::sleep(next_wait(settings.refresh, failures)).await;
    }
}

/// Without the `aws` feature: say once that groups come from the file only.
#[cfg(not(feature = "aws"))]
pub async fn refresh_loop(shared: Arc<Shared>, _reloads: Reloads) {
    let mut generation = shared.generation.subscribe();
    if let Some(live) = configured(&shared, &mut generation).await {
        tracing::error!(
            "[security_groups] aws is configured but this moat was built without the `aws` feature"
        );
        warn_file_only(&live.snap.config, &referenced(&live.snap.config));
    }
}

#[cfg(all(test, feature = "aws"))]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let refresh = Duration::from_secs(60);
        assert_eq!(next_wait(refresh, 0), refresh);
        for n in 1..20 {
            let w = next_wait(refresh, n);
            let base = Duration::from_secs(1u64 << n.min(6))
                .min(BACKOFF_MAX)
                .min(refresh);
            assert!(
                w >= base.mul_f64(0.75) && w <= base.mul_f64(1.25),
                "{n}: {w:?}"
            );
        }
        assert!(next_wait(Duration::from_secs(5), 10) <= Duration::from_millis(6250));
    }
}
