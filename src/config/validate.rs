//! Turns the raw TOML of the config and membership files into a `Config`,
//! collecting every error and warning with its file, line and column.

use super::diag::{ConfigError, Report, Source};
use super::raw::*;
use super::values::*;
use super::*;
use crate::data::tls;
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use toml::Spanned;

/// Loads and fully validates the config at `path` and every file it names.
/// `now` decides which rules have already expired (a warning).
pub fn load(path: &Path, now: SystemTime) -> Result<Config, ConfigError> {
    match super::files::read(path) {
        Ok(bytes) => load_bytes(path, &bytes, now),
        Err(e) => {
            let mut report = Report::default();
            report.file_error(
                path,
                format!(
                    "cannot read the config file: {e}; pass the right path with -c or MOAT_CONFIG"
                ),
            );
            Err(finish(report))
        }
    }
}

/// Validates config text as if read from `path` (files it names are read
/// relative to `path`'s directory). The fuzz target's entry point.
pub fn load_bytes(path: &Path, bytes: &[u8], now: SystemTime) -> Result<Config, ConfigError> {
    let mut report = Report::default();
    let mut hasher = Sha256::new();
    let mut files = vec![path.to_path_buf()];
    hash_file(&mut hasher, path, bytes);
    let src = Source {
        path: path.to_path_buf(),
        text: String::from_utf8_lossy(bytes).into_owned(),
    };
    let Some(raw) = parse::<RawConfig>(&mut report, &src, &super::schema::CONFIG) else {
        return Err(finish(report));
    };
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut v = Validator {
        src: &src,
        base: &base,
        report: &mut report,
        files: &mut files,
        hasher: &mut hasher,
        now,
    };
    let server = v.server(raw.server.as_ref());
    let limits = v.limits(raw.limits.as_ref(), &Limits::default(), true);
    let security_groups = v.security_groups(raw.security_groups.as_ref());
    let store = v.store(raw.store.as_ref());
    let deployments = v.deployments(&raw.deployment, &limits, &security_groups, store.is_some());
    let listeners = v.listeners(&raw.deployment, &deployments);
    let api = raw.api.as_ref().and_then(|a| {
        let names: Vec<&str> = deployments.iter().map(|d| d.name.as_str()).collect();
        v.api(a, &names)
    });
    // The other sockets of the file, bound dual-stack like a listener.
    let admin = raw.server.as_ref().and_then(|s| s.admin_listen.as_ref());
    let admin = server
        .admin_listen
        .zip(admin)
        .map(|(a, at)| ("admin_listen", a, at));
    let api_at = raw.api.as_ref().map(|a| &a.get_ref().listen);
    let api_listen = api
        .as_ref()
        .map(|a| a.listen)
        .zip(api_at)
        .map(|(a, at)| ("[api] listen", a, at));
    let others: Vec<_> = admin.into_iter().chain(api_listen).collect();
    v.listen_conflicts(&raw.deployment, &deployments, &listeners, &others);
    if raw.deployment.is_empty() && report.errors.is_empty() {
        // Also what a truncated file looks like: never take every listener down for it.
        report.error(&src, 0..0, "the config defines no [[deployment]]; moat would serve nothing (add one, see config/moat.toml)");
    }
    if report.errors.is_empty() {
        let fingerprint = hasher.finalize().into();
        let warnings = finish(report).warnings;
        Ok(Config {
            path: path.to_path_buf(),
            server,
            limits,
            security_groups,
            store,
            api,
            deployments,
            listeners,
            files,
            fingerprint,
            warnings,
        })
    } else {
        Err(finish(report))
    }
}

/// Parses TOML text: syntax errors, then the schema pass (unknown keys, wrong
/// types, missing keys, all reported), then the typed structs.
pub(super) fn parse<T: serde::de::DeserializeOwned>(
    report: &mut Report,
    src: &Source,
    schema: &super::schema::Schema,
) -> Option<T> {
    let (mut table, syntax) = toml::de::DeTable::parse_recoverable(&src.text);
    if !syntax.is_empty() {
        for e in syntax {
            report.error(
                src,
                e.span().unwrap_or(0..0),
                format!("{}; fix the TOML syntax here", e.message().trim_end()),
            );
        }
        return None;
    }
    super::schema::check(report, src, &mut table, schema);
    match T::deserialize(toml::de::Deserializer::from(table)) {
        Ok(raw) => Some(raw),
        Err(e) => {
            report.error(
                src,
                e.span().unwrap_or(0..0),
                format!("{}; fix the value here", e.message().trim_end()),
            );
            None
        }
    }
}

fn hash_file(hasher: &mut Sha256, path: &Path, bytes: &[u8]) {
    hasher.update((path.as_os_str().len() as u64).to_le_bytes());
    hasher.update(path.as_os_str().as_encoded_bytes());
    hasher.update((bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

/// The fingerprint `load` would compute for these files now, if all are
/// readable: a cheap test of whether a reload can change anything.
pub fn fingerprint(files: &[PathBuf]) -> Option<[u8; 32]> {
    let mut hasher = Sha256::new();
    for f in files {
        hash_file(&mut hasher, f, &super::files::read(f).ok()?);
    }
    Some(hasher.finalize().into())
}

fn finish(mut report: Report) -> ConfigError {
    for list in [&mut report.errors, &mut report.warnings] {
        list.sort_by(|a, b| (&a.file, a.at).cmp(&(&b.file, b.at)));
    }
    ConfigError {
        errors: report.errors,
        warnings: report.warnings,
    }
}

pub(super) struct Validator<'a> {
    pub(super) src: &'a Source,
    pub(super) base: &'a Path,
    pub(super) report: &'a mut Report,
    pub(super) files: &'a mut Vec<PathBuf>,
    pub(super) hasher: &'a mut Sha256,
    pub(super) now: SystemTime,
}

impl Validator<'_> {
    pub(super) fn err<T>(&mut self, s: &Spanned<T>, msg: impl Into<String>) {
        self.report.error(self.src, s.span(), msg);
    }

    pub(super) fn warn<T>(&mut self, s: &Spanned<T>, msg: impl Into<String>) {
        self.report.warn(self.src, s.span(), msg);
    }

    pub(super) fn duration(&mut self, key: &str, s: &Spanned<String>) -> Option<Duration> {
        parse_duration(key, s.get_ref())
            .map_err(|m| self.err(s, m))
            .ok()
    }

    pub(super) fn choice<T: Copy>(
        &mut self,
        key: &str,
        s: &Spanned<String>,
        options: &[(&str, T)],
    ) -> Option<T> {
        if let Some((_, v)) = options.iter().find(|(n, _)| *n == s.get_ref()) {
            return Some(*v);
        }
        let names: Vec<String> = options.iter().map(|(n, _)| format!("\"{n}\"")).collect();
        self.err(
            s,
            format!(
                "{key} = \"{}\" is not allowed; use {}",
                s.get_ref(),
                names.join(" or ")
            ),
        );
        None
    }

    fn resolve(&self, p: &str) -> PathBuf {
        self.base.join(p)
    }

    fn server(&mut self, raw: Option<&RawServer>) -> Server {
        let mut server = Server {
            admin_listen: None,
            log_format: LogFormat::Text,
            shutdown_grace: Duration::from_secs(30),
            on_revoke: OnRevoke::Close,
        };
        let Some(raw) = raw else { return server };
        if let Some(a) = &raw.admin_listen {
            match a.get_ref().parse::<SocketAddr>() {
                Ok(addr) => server.admin_listen = Some(addr),
                Err(_) => self.err(a, format!("admin_listen = \"{}\" is not an address; write IP:PORT, like \"127.0.0.1:9911\"", a.get_ref())),
            }
        }
        if let Some(f) = &raw.log_format {
            server.log_format = self
                .choice(
                    "log_format",
                    f,
                    &[("text", LogFormat::Text), ("json", LogFormat::Json)],
                )
                .unwrap_or(LogFormat::Text);
        }
        if let Some(g) = &raw.shutdown_grace {
            server.shutdown_grace = self
                .duration("shutdown_grace", g)
                .unwrap_or(server.shutdown_grace);
        }
        if let Some(r) = &raw.on_revoke {
            server.on_revoke = self
                .choice(
                    "on_revoke",
                    r,
                    &[("close", OnRevoke::Close), ("keep", OnRevoke::Keep)],
                )
                .unwrap_or(OnRevoke::Close);
        }
        server
    }

    fn count(&mut self, key: &str, s: &Spanned<i64>) -> Option<u32> {
        match u32::try_from(*s.get_ref()) {
            Ok(n) if n > 0 => Some(n),
            _ => {
                self.err(
                    s,
                    format!(
                        "{key} = {} is out of range; use a whole number from 1 to {}",
                        s.get_ref(),
                        u32::MAX
                    ),
                );
                None
            }
        }
    }

    /// `global` decides what `max_connections` means: the global cap (with a
    /// default) or a deployment's own cap (none unless set).
    fn limits(&mut self, raw: Option<&RawLimits>, base: &Limits, global: bool) -> Limits {
        let mut l = base.clone();
        if !global {
            l.max_connections = None;
        }
        let Some(raw) = raw else { return l };
        if let Some(n) = &raw.max_connections {
            l.max_connections = self.count("max_connections", n).or(l.max_connections);
        }
        if let Some(n) = &raw.max_connections_per_ip {
            l.max_connections_per_ip = self
                .count("max_connections_per_ip", n)
                .unwrap_or(l.max_connections_per_ip);
        }
        if let Some(d) = &raw.connect_timeout {
            l.connect_timeout = self
                .nonzero("connect_timeout", d)
                .unwrap_or(l.connect_timeout);
        }
        if let Some(d) = &raw.handshake_timeout {
            l.handshake_timeout = self
                .nonzero("handshake_timeout", d)
                .unwrap_or(l.handshake_timeout);
        }
        if let Some(d) = &raw.idle_timeout {
            if let Some(d) = self.duration("idle_timeout", d) {
                l.idle_timeout = (!d.is_zero()).then_some(d);
            }
        }
        l
    }

    pub(super) fn nonzero(&mut self, key: &str, s: &Spanned<String>) -> Option<Duration> {
        let d = self.duration(key, s)?;
        if d.is_zero() {
            self.err(
                s,
                format!("{key} must be longer than 0s; write it like \"5s\""),
            );
            return None;
        }
        Some(d)
    }

    /// Reads a file named by the config, hashing it for change detection.
    pub(super) fn read_named(
        &mut self,
        at: &Spanned<String>,
        what: &str,
    ) -> Option<(PathBuf, Vec<u8>)> {
        let path = self.resolve(at.get_ref());
        match super::files::read(&path) {
            Ok(bytes) => {
                hash_file(self.hasher, &path, &bytes);
                self.files.push(path.clone());
                Some((path, bytes))
            }
            Err(e) => {
                self.err(at, format!("cannot read the {what} {}: {e}; check the path (relative paths start at the config file's directory)", path.display()));
                None
            }
        }
    }

    fn deployments(
        &mut self,
        raw: &[Spanned<RawDeployment>],
        global: &Limits,
        sg: &SecurityGroups,
        store: bool,
    ) -> Vec<Deployment> {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let names: BTreeSet<&str> = raw
            .iter()
            .map(|d| d.get_ref().name.get_ref().as_str())
            .collect();
        let mut out = Vec::new();
        for d in raw {
            let r = d.get_ref();
            let name = r.name.get_ref();
            if let Err(m) = check_name(name) {
                self.err(&r.name, m);
            }
            if let Some(first) = seen.get(name.as_str()) {
                let line = self.src.place(*first).0;
                self.err(&r.name, format!("duplicate deployment name \"{name}\" (first defined on line {line}); give each deployment its own name"));
            } else {
                seen.insert(name, r.name.span().start);
            }
            out.push(self.deployment(r, global, sg, &names));
        }
        // With a fleet store, a deployment's rules may all live there.
        if self.report.errors.is_empty() && !store {
            self.empty_rule_warnings(raw, &out);
        }
        out
    }

    fn deployment(
        &mut self,
        r: &RawDeployment,
        global: &Limits,
        sg: &SecurityGroups,
        names: &BTreeSet<&str>,
    ) -> Deployment {
        let name = r.name.get_ref().clone();
        let ctx = format!("deployment \"{name}\"");
        let plan = match &r.plan {
            Some(p) => self
                .choice(
                    "plan",
                    p,
                    &[("dedicated", Plan::Dedicated), ("shared", Plan::Shared)],
                )
                .unwrap_or(Plan::Dedicated),
            None => Plan::Dedicated,
        };
        let mut listen = Vec::new();
        let items = r.listen.get_ref().items();
        if items.is_empty() {
            self.err(
                &r.listen,
                format!(
                    "{ctx}: listen is empty; give at least one address, like \"0.0.0.0:27017\""
                ),
            );
        }
        for item in items {
            match item.parse::<SocketAddr>() {
                Ok(a) if a.port() == 0 => self.err(&r.listen, format!("{ctx}: listen address {a} has port 0, which would listen on a random port no client knows; give the port clients connect to, like \"{}\"", SocketAddr::new(a.ip(), 27017))),
                Ok(a) if listen.contains(&a) => self.err(&r.listen, format!("{ctx}: listen address {a} is given twice")),
                Ok(a) => listen.push(a),
                Err(_) => self.err(&r.listen, format!("{ctx}: listen address \"{item}\" is not IP:PORT; write it like \"0.0.0.0:27017\" or \"[::]:27017\"")),
            }
        }
        if let Err(m) = check_upstream(r.upstream.get_ref()) {
            self.err(&r.upstream, format!("{ctx}: {m}"));
        }
        let mut server_names = Vec::new();
        for s in r.server_names.iter().flatten() {
            match normalise_server_name(s.get_ref()) {
                Ok(n) if !server_names.contains(&n) => server_names.push(n),
                Ok(_) => {}
                Err(m) => self.err(s, format!("{ctx}: {m}")),
            }
        }
        let mut copy_rules_from = Vec::new();
        for c in r.copy_rules_from.iter().flatten() {
            if !names.contains(c.get_ref().as_str()) {
                self.err(c, format!("{ctx}: copy_rules_from names \"{}\", which is not a deployment in this file; check the spelling", c.get_ref()));
            } else if plan == Plan::Shared {
                self.err(c, format!("{ctx}: plan = \"shared\" admits every source and cannot copy rules; remove copy_rules_from or set plan = \"dedicated\""));
            } else {
                copy_rules_from.push(c.get_ref().clone());
            }
        }
        let proxy_trusted = r.proxy_protocol.as_ref().map(|p| {
            let mut nets = Vec::new();
            for t in &p.get_ref().trusted {
                match parse_cidr(t.get_ref()) {
                    Ok(n) => {
                        if is_whole_internet(&n) {
                            self.warn(t, format!("{ctx}: proxy_protocol trusts {}, which is open to the whole internet: any host may send a PROXY header and choose the source address moat checks; list only your load balancers' addresses", written(t.get_ref(), &n)));
                        }
                        nets.push(n)
                    }
                    Err(m) => self.err(t, format!("{ctx}: proxy_protocol trusted: {m}")),
                }
            }
            if nets.is_empty() && p.get_ref().trusted.is_empty() {
                self.err(p, format!("{ctx}: proxy_protocol.trusted is empty; list the load balancers' addresses, like [\"10.0.0.0/8\"]"));
            }
            nets
        });
        let limits = self.limits(r.limits.as_ref(), global, false);
        let tls = r.tls.as_ref().and_then(|t| {
            if plan == Plan::Shared {
                self.err(t, format!("{ctx}: plan = \"shared\" cannot have a [deployment.tls] table: TLS is for dedicated deployments; remove it or set plan = \"dedicated\""));
                None
            } else {
                self.tls(&ctx, t.get_ref())
            }
        });
        if plan == Plan::Shared {
            if let Some(first) = r.allow.first() {
                self.err(first, format!("{ctx}: plan = \"shared\" admits every source and cannot have allow rules; remove them or set plan = \"dedicated\""));
            }
        }
        let mut rules = Vec::new();
        for a in &r.allow {
            if let Some(rule) = self.rule(&ctx, a, sg) {
                rules.push(rule);
            }
        }
        Deployment {
            name,
            plan,
            listen,
            upstream: r.upstream.get_ref().clone(),
            upstream_addr: r.upstream.get_ref().parse().ok(),
            server_names,
            copy_rules_from,
            proxy_trusted,
            limits,
            tls,
            rules,
        }
    }

    fn rule(&mut self, ctx: &str, a: &Spanned<RawAllow>, sg: &SecurityGroups) -> Option<Rule> {
        let r = a.get_ref();
        let target = match (&r.cidr, &r.aws_account, &r.security_group) {
            (Some(c), None, None) => match parse_cidr(c.get_ref()) {
                Ok(net) => {
                    if is_whole_internet(&net) {
                        self.warn(
                            c,
                            format!(
                                "{ctx}: {} is open to the whole internet",
                                written(c.get_ref(), &net)
                            ),
                        );
                    }
                    RuleTarget::Cidr(net)
                }
                Err(m) => {
                    self.err(c, format!("{ctx}: {m}"));
                    return None;
                }
            },
            (None, Some(acct), Some(group)) => {
                let e1 = check_account(acct.get_ref())
                    .map_err(|m| self.err(acct, format!("{ctx}: {m}")));
                let e2 = check_group_id(group.get_ref())
                    .map_err(|m| self.err(group, format!("{ctx}: {m}")));
                if e1.is_err() || e2.is_err() {
                    return None;
                }
                let key = GroupKey {
                    account: acct.get_ref().clone(),
                    id: group.get_ref().clone(),
                };
                if sg.aws.is_none() && !sg.members.contains_key(&key) {
                    self.warn(group, format!("{ctx}: security group {} of account {} is not in the membership file; the rule matches nobody until the group is listed there", key.id, key.account));
                }
                RuleTarget::Group(key)
            }
            _ => {
                self.err(a, format!("{ctx}: an allow rule needs either cidr, or aws_account and security_group together"));
                return None;
            }
        };
        let expires = match &r.expires {
            Some(e) => match parse_expires(e.get_ref()) {
                Ok(t) => {
                    if t <= self.now {
                        self.warn(
                            e,
                            format!(
                                "{ctx}: this rule expired at {}; it is ignored, remove it",
                                tls::format_system_time(t)
                            ),
                        );
                    }
                    Some(t)
                }
                Err(m) => {
                    self.err(e, format!("{ctx}: {m}"));
                    return None;
                }
            },
            None => None,
        };
        let description = match &r.description {
            Some(d) => d.get_ref().clone(),
            None => match &target {
                RuleTarget::Cidr(n) => n.to_string(),
                RuleTarget::Group(g) => g.id.clone(),
            },
        };
        Some(Rule {
            target,
            description,
            expires,
        })
    }

    /// A dedicated deployment without any rule (its own or copied) admits nobody.
    fn empty_rule_warnings(&mut self, raw: &[Spanned<RawDeployment>], deps: &[Deployment]) {
        for (r, d) in raw.iter().zip(deps) {
            if d.plan != Plan::Dedicated {
                continue;
            }
            let live = crate::policy::snapshot::reachable(deps, d)
                .iter()
                .any(|&i| {
                    deps[i]
                        .rules
                        .iter()
                        .any(|rule| rule.expires.is_none_or(|t| t > self.now))
                });
            if !live {
                self.warn(&r.get_ref().name, format!("deployment \"{}\" has no allow rules and admits nobody; add [[deployment.allow]] rules", d.name));
            }
        }
    }

    fn listeners(
        &mut self,
        raw: &[Spanned<RawDeployment>],
        deps: &[Deployment],
    ) -> Vec<ListenerSpec> {
        let mut specs: Vec<ListenerSpec> = Vec::new();
        for (i, d) in deps.iter().enumerate() {
            for addr in &d.listen {
                match specs.iter_mut().find(|s| s.addr == *addr) {
                    Some(s) => s.deployments.push(i),
                    None => specs.push(ListenerSpec {
                        addr: *addr,
                        v6_only: false,
                        deployments: vec![i],
                    }),
                }
            }
        }
        let v4_any: Vec<u16> = specs
            .iter()
            .filter(|s| s.addr.ip() == std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
            .map(|s| s.addr.port())
            .collect();
        for s in &mut specs {
            s.v6_only = s.addr.ip() == std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
                && v4_any.contains(&s.addr.port());
        }
        for s in &specs {
            if s.deployments.len() < 2 {
                continue;
            }
            let mut names: Vec<&str> = Vec::new();
            for &i in &s.deployments {
                let d = &deps[i];
                let at = &raw[i].get_ref().listen;
                let shared_ok = d.tls.as_ref().is_some_and(|t| t.mode == TlsMode::Require)
                    && !d.server_names.is_empty();
                if !shared_ok {
                    self.err(at, format!("deployment \"{}\": listen address {} is shared with other deployments; sharing needs [deployment.tls] mode = \"require\" and server_names on each of them", d.name, s.addr));
                }
                for n in &d.server_names {
                    if names.contains(&n.as_str()) {
                        self.err(at, format!("deployment \"{}\": server name \"{n}\" is used by another deployment on {}; each needs its own names", d.name, s.addr));
                    }
                    names.push(n);
                }
                if d.proxy_trusted != deps[s.deployments[0]].proxy_trusted {
                    self.err(at, format!("deployment \"{}\": deployments sharing {} must have the same proxy_protocol setting", d.name, s.addr));
                }
            }
        }
        specs
    }
}
