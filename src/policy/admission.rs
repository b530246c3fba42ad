//! Admission: the one place that decides whether a source may reach a
//! deployment. It returns a `Permit` (a proof only this module can build)
//! that the dial and forward stages require, or the reason for refusal.

use crate::config::Plan;
use crate::policy::addr::canonical;
use crate::policy::snapshot::Snapshot;
use ipnet::IpNet;
use std::fmt;
use std::net::IpAddr;

/// Proof that `source` was admitted to a deployment, and by which rule.
#[derive(Debug, Clone)]
pub struct Permit {
    source: IpAddr,
    deployment: usize,
    rule: Option<u32>,
}

impl Permit {
    pub fn source(&self) -> IpAddr {
        self.source
    }

    pub fn deployment(&self) -> usize {
        self.deployment
    }

    /// The admitting rule's description and prefix (None for a shared plan).
    pub fn rule<'s>(&self, snap: &'s Snapshot) -> Option<(&'s str, IpNet)> {
        let c = snap.compiled.get(self.deployment)?;
        let (net, src) = *c.prefixes.get(self.rule? as usize)?;
        Some((c.sources[src as usize].description.as_str(), net))
    }

    /// Matching rule's index into the compiled prefixes.
    pub fn rule_index(&self) -> Option<u32> {
        self.rule
    }
}

/// Why a source was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deny {
    NoRule,
    UnknownDeployment,
}

impl fmt::Display for Deny {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Deny::NoRule => "no rule matches",
            Deny::UnknownDeployment => "deployment no longer exists",
        })
    }
}

/// Decides whether `source` may connect to deployment `deployment` of `snap`.
/// No lock, no allocation.
#[inline]
pub fn admit(snap: &Snapshot, deployment: usize, source: IpAddr) -> Result<Permit, Deny> {
    let source = canonical(source);
    let d = snap
        .config
        .deployments
        .get(deployment)
        .ok_or(Deny::UnknownDeployment)?;
    if d.plan == Plan::Shared {
        return Ok(Permit {
            source,
            deployment,
            rule: None,
        });
    }
    let c = &snap.compiled[deployment];
    match c.table.lookup(source) {
        Some(i) => Ok(Permit {
            source,
            deployment,
            rule: Some(i),
        }),
        None => Err(Deny::NoRule),
    }
}

/// Re-checks a live connection's permit against a newer snapshot.
pub fn readmit(snap: &Snapshot, name: &str, source: IpAddr) -> Result<Permit, Deny> {
    let i = snap.deployment_index(name).ok_or(Deny::UnknownDeployment)?;
    admit(snap, i, source)
}
