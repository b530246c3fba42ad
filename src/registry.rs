//! TEMPORARY on branch `api`: the interface of the lead's `src/registry.rs`
//! (live connections), so that the API compiles before it lands on main.
//! The lead's version replaces this file at merge.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

/// One live connection, as `/connections` shows it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub id: u64,
    pub deployment: Arc<str>,
    pub source: IpAddr,
    pub rule: String,
    pub tls: bool,
    pub sni: Option<String>,
    pub since: SystemTime,
    pub bytes_to_upstream: u64,
    pub bytes_to_client: u64,
}

/// The live connections (placeholder: none).
#[derive(Default)]
pub struct Registry {}

impl Registry {
    pub fn list(&self) -> Vec<ConnInfo> {
        Vec::new()
    }

    /// Closes connection `id`, counted as revoked; false when it is gone.
    pub fn close(&self, _id: u64) -> bool {
        false
    }
}
