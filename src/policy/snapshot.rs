//! The compiled, immutable state every connection reads: the validated
//! config plus one rule table per deployment, built for a given instant
//! (expired rules left out). Published through a single `ArcSwap`. A
//! deployment's own rules are its `allow` tables plus its fleet-store entries.

use crate::config::{Config, Deployment, GroupKey, Plan, Rule, RuleTarget};
use crate::policy::rules::RuleTable;
use ipnet::IpNet;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

/// Where an effective prefix came from.
#[derive(Debug, Clone)]
pub struct RuleSource {
    pub description: String,
    /// The deployment that owns the rule (differs from the compiled one for copies).
    pub owner: usize,
    pub group: Option<GroupKey>,
}

/// One deployment's compiled allowlist.
#[derive(Debug)]
pub struct Compiled {
    pub table: RuleTable,
    /// The table's rule indices point here: each prefix and its source's index.
    pub prefixes: Vec<(IpNet, u32)>,
    pub sources: Vec<RuleSource>,
    /// PROXY protocol peers to believe.
    pub trusted: Option<RuleTable>,
}

/// Security-group members learned at run time (the EC2 resolver), merged
/// with the membership file's.
pub type GroupMembers = BTreeMap<GroupKey, Vec<IpNet>>;

/// The fleet store's valid entries as applied (SPEC 7), by deployment name.
#[derive(Debug, Default, Clone)]
pub struct StoreEntries {
    /// The etcd revision these entries reflect (0: nothing read yet).
    pub revision: i64,
    /// Each deployment's entries, as rules, in key order.
    pub rules: BTreeMap<String, Arc<Vec<Rule>>>,
}

impl StoreEntries {
    /// The store's rules for deployment `name` (none if it has no entries).
    pub fn of(&self, name: &str) -> &[Rule] {
        self.rules.get(name).map_or(&[], |r| r.as_slice())
    }
}

#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub resolved: Arc<GroupMembers>,
    /// The fleet store's entries compiled in; `store.revision` is what this
    /// host enforces.
    pub store: Arc<StoreEntries>,
    pub compiled: Vec<Compiled>,
    index: HashMap<String, usize>,
    /// The next instant at which a rule expires: the snapshot must be rebuilt then.
    pub next_expiry: Option<SystemTime>,
}

/// The deployments whose rules apply to `d`: itself and the transitive
/// closure of `copy_rules_from` (cycles allowed).
pub fn reachable(deps: &[Deployment], d: &Deployment) -> Vec<usize> {
    let by_name: HashMap<&str, usize> = deps
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i))
        .collect();
    let mut seen = vec![false; deps.len()];
    let mut order = Vec::new();
    let mut queue: VecDeque<usize> = by_name.get(d.name.as_str()).copied().into_iter().collect();
    while let Some(i) = queue.pop_front() {
        if std::mem::replace(&mut seen[i], true) {
            continue;
        }
        order.push(i);
        for c in &deps[i].copy_rules_from {
            if let Some(&j) = by_name.get(c.as_str()) {
                queue.push_back(j);
            }
        }
    }
    order
}

impl Snapshot {
    /// Compiles `config` as of `now`, with `resolved` group members added to
    /// the membership file's and `store` entries added to each deployment's
    /// own rules.
    pub fn compile(
        config: Arc<Config>,
        resolved: Arc<GroupMembers>,
        store: Arc<StoreEntries>,
        now: SystemTime,
    ) -> Snapshot {
        let mut next_expiry: Option<SystemTime> = None;
        let mut compiled = Vec::with_capacity(config.deployments.len());
        for d in &config.deployments {
            let mut prefixes = Vec::new();
            let mut sources = Vec::new();
            if d.plan == Plan::Dedicated {
                for owner in reachable(&config.deployments, d) {
                    let own = &config.deployments[owner];
                    for rule in own.rules.iter().chain(store.of(&own.name)) {
                        if let Some(t) = rule.expires {
                            if t <= now {
                                continue;
                            }
                            next_expiry = Some(next_expiry.map_or(t, |n| n.min(t)));
                        }
                        let idx = sources.len() as u32;
                        match &rule.target {
                            RuleTarget::Cidr(net) => prefixes.push((*net, idx)),
                            RuleTarget::Group(key) => {
                                let file = config
                                    .security_groups
                                    .members
                                    .get(key)
                                    .into_iter()
                                    .flatten();
                                let api = resolved.get(key).into_iter().flatten();
                                prefixes.extend(file.chain(api).map(|n| (*n, idx)));
                            }
                        }
                        sources.push(RuleSource {
                            description: rule.description.clone(),
                            owner,
                            group: match &rule.target {
                                RuleTarget::Group(k) => Some(k.clone()),
                                RuleTarget::Cidr(_) => None,
                            },
                        });
                    }
                }
            }
            let table = RuleTable::build(
                prefixes
                    .iter()
                    .enumerate()
                    .map(|(i, (net, _))| (*net, i as u32)),
            );
            let trusted = d
                .proxy_trusted
                .as_ref()
                .map(|nets| RuleTable::build(nets.iter().map(|n| (*n, 0))));
            compiled.push(Compiled {
                table,
                prefixes,
                sources,
                trusted,
            });
        }
        let index = config
            .deployments
            .iter()
            .enumerate()
            .map(|(i, d)| (d.name.clone(), i))
            .collect();
        Snapshot {
            config,
            resolved,
            store,
            compiled,
            index,
            next_expiry,
        }
    }

    pub fn deployment_index(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }
}
