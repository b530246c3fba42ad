//! The validated configuration: raw TOML in, one immutable `Config` out, or
//! every problem of the files with its place. Start-up, `moat check`,
//! `moat explain` and reloads all go through [`load`].

pub mod api;
mod diag;
pub mod files;
mod groups;
mod listen;
mod raw;
mod schema;
mod store;
mod tls;
mod validate;
pub mod values;

pub use api::{Api, ApiKey, Role};
pub use diag::{ConfigError, Diagnostic, Severity};
pub use listen::bind_conflict;
pub use store::{Secret, Store, StoreTls, DEFAULT_PREFIX};
pub use validate::{fingerprint, load, load_bytes};

use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Everything the files say, checked. Immutable once built.
#[derive(Debug)]
pub struct Config {
    pub path: PathBuf,
    pub server: Server,
    pub limits: Limits,
    pub security_groups: SecurityGroups,
    /// `[store] etcd`: the fleet store of access-list entries (SPEC 7).
    pub store: Option<Store>,
    /// `[api]`: the access-list API, if configured.
    pub api: Option<Api>,
    pub deployments: Vec<Deployment>,
    /// Each distinct listen address and the deployments served on it.
    pub listeners: Vec<ListenerSpec>,
    /// Every file that was read (config, membership, certificates, keys, CAs).
    pub files: Vec<PathBuf>,
    /// A hash of all those files' bytes: equal hashes mean nothing changed.
    pub fingerprint: [u8; 32],
    pub warnings: Vec<Diagnostic>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRevoke {
    Close,
    Keep,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub admin_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
    pub on_revoke: OnRevoke,
}

/// Limits in force for one deployment (or the global defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Globally: all deployments together. Per deployment: its own cap, if set.
    pub max_connections: Option<u32>,
    pub max_connections_per_ip: u32,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    /// None: never time out an idle connection.
    pub idle_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: Some(20_000),
            max_connections_per_ip: 500,
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: None,
        }
    }
}

/// An AWS security group: account and group id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupKey {
    pub account: String,
    pub id: String,
}

impl std::fmt::Display for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.account, self.id)
    }
}

#[derive(Debug, Clone, Default)]
pub struct SecurityGroups {
    pub file: Option<PathBuf>,
    pub aws: Option<AwsResolver>,
    /// Members listed by the membership file.
    pub members: BTreeMap<GroupKey, Vec<IpNet>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsResolver {
    pub region: String,
    pub refresh: Duration,
    pub endpoint: Option<String>,
    /// Role to assume, per account, for groups of other accounts.
    pub accounts: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Dedicated,
    Shared,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Require,
    Allow,
}

/// TLS termination of one deployment, loaded and checked.
#[derive(Debug, Clone)]
pub struct Tls {
    pub mode: TlsMode,
    pub server: Arc<rustls::ServerConfig>,
    /// The served certificate's notAfter, seconds since the epoch.
    pub not_after: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct Deployment {
    pub name: String,
    pub plan: Plan,
    pub listen: Vec<SocketAddr>,
    pub upstream: String,
    /// The upstream as an address when it is one (no DNS lookup per dial).
    pub upstream_addr: Option<SocketAddr>,
    pub server_names: Vec<String>,
    pub copy_rules_from: Vec<String>,
    /// Peers whose PROXY protocol header is believed; None: no PROXY protocol.
    pub proxy_trusted: Option<Vec<IpNet>>,
    pub limits: Limits,
    pub tls: Option<Tls>,
    /// The deployment's own allow rules, in file order (copies not included).
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleTarget {
    Cidr(IpNet),
    Group(GroupKey),
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub target: RuleTarget,
    pub description: String,
    pub expires: Option<SystemTime>,
}

/// One socket to bind and the deployments behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    pub addr: SocketAddr,
    /// `[::]:P` is IPv6-only when `0.0.0.0:P` is listed as well.
    pub v6_only: bool,
    pub deployments: Vec<usize>,
}
