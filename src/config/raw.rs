//! The TOML files as written: serde structs that keep spans for error messages.
//! Nothing here is validated; `config::load` turns these into a `Config`.

use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub server: Option<RawServer>,
    pub limits: Option<RawLimits>,
    pub security_groups: Option<RawSecurityGroups>,
    pub api: Option<Spanned<RawApi>>,
    pub store: Option<RawStore>,
    #[serde(default)]
    pub deployment: Vec<Spanned<RawDeployment>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub admin_listen: Option<Spanned<String>>,
    pub log_format: Option<Spanned<String>>,
    pub shutdown_grace: Option<Spanned<String>>,
    pub on_revoke: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_connections: Option<Spanned<i64>>,
    pub max_connections_per_ip: Option<Spanned<i64>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub handshake_timeout: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecurityGroups {
    pub file: Option<Spanned<String>>,
    pub aws: Option<Spanned<RawAws>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAws {
    pub region: Spanned<String>,
    pub refresh: Option<Spanned<String>>,
    pub endpoint: Option<Spanned<String>>,
    #[serde(default)]
    pub accounts: BTreeMap<Spanned<String>, RawAwsAccount>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAwsAccount {
    pub role_arn: Spanned<String>,
}

/// `listen` is one address or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn items(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(s) => vec![s.as_str()],
            OneOrMany::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeployment {
    pub name: Spanned<String>,
    pub plan: Option<Spanned<String>>,
    pub listen: Spanned<OneOrMany>,
    pub upstream: Spanned<String>,
    pub server_names: Option<Vec<Spanned<String>>>,
    pub copy_rules_from: Option<Vec<Spanned<String>>>,
    pub proxy_protocol: Option<Spanned<RawProxyProtocol>>,
    pub limits: Option<RawLimits>,
    pub tls: Option<Spanned<RawTls>>,
    #[serde(default)]
    pub allow: Vec<Spanned<RawAllow>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxyProtocol {
    pub trusted: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub mode: Option<Spanned<String>>,
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
    pub client_ca: Option<Spanned<String>>,
    pub min_version: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAllow {
    pub cidr: Option<Spanned<String>>,
    pub aws_account: Option<Spanned<String>>,
    pub security_group: Option<Spanned<String>>,
    pub description: Option<Spanned<String>>,
    /// An RFC 3339 string or a TOML offset date-time.
    pub expires: Option<Spanned<toml::Value>>,
}

/// The security-group membership file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMembership {
    #[serde(default)]
    pub group: Vec<Spanned<RawGroup>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGroup {
    pub aws_account: Spanned<String>,
    pub id: Spanned<String>,
    #[serde(default)]
    pub members: Vec<Spanned<String>>,
}

/// `[api]`: the access-list API (SPEC 6).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    pub listen: Spanned<String>,
    pub tls: Option<Spanned<RawApiTls>>,
    pub keys: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiTls {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

/// The API keys file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeys {
    #[serde(default)]
    pub key: Vec<Spanned<RawKey>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub name: Spanned<String>,
    pub sha256: Spanned<String>,
    pub role: Spanned<String>,
    pub deployments: Option<Vec<Spanned<String>>>,
}

/// `[store]`: the fleet store (SPEC 7).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub etcd: Spanned<RawEtcd>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEtcd {
    pub endpoints: Spanned<Vec<Spanned<String>>>,
    pub prefix: Option<Spanned<String>>,
    pub cache: Option<Spanned<String>>,
    pub username: Option<Spanned<String>>,
    pub password_file: Option<Spanned<String>>,
    pub ca: Option<Spanned<String>>,
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
}
