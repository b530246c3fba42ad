//! Talking to etcd: a client built from `[store] etcd` (TLS, user and
//! password), and the one consistent read of a prefix, paged at one
//! revision so that a large fleet never exceeds a message's size.

use crate::config::Store;
use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};
use std::time::Duration;

/// Bound on dialling one etcd endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 pings on an idle connection, and how long an answer may take:
/// a silent etcd (a partition, not a closed socket) is noticed within both.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one request (a read page, a transaction).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys per read page, and the most pages one read may take.
const PAGE: i64 = 2000;
const MAX_PAGES: usize = 10_000;

/// Connects to the store (no request is made without a user to log in).
pub async fn connect(store: &Store) -> Result<Client, String> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
        .with_keep_alive_while_idle(true);
    if let Some((user, password)) = &store.auth {
        options = options.with_user(user.clone(), String::from_utf8_lossy(&password.0));
    }
    if let Some(tls) = &store.tls {
        let mut t = TlsOptions::new();
        t = match &tls.ca {
            Some(ca) => t.ca_certificate(Certificate::from_pem(ca)),
            None => t.with_native_roots(),
        };
        if let Some((cert, key)) = &tls.identity {
            t = t.identity(Identity::from_pem(cert, &key.0));
        }
        options = options.with_tls(t);
    }
    let connecting = Client::connect(&store.endpoints, Some(options));
    match tokio::time::timeout(REQUEST_TIMEOUT + CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("cannot connect to etcd: {e}")),
        Err(_) => Err("connecting to etcd timed out".into()),
    }
}

/// The end of the key range that starts with `prefix` (etcd's convention).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// One consistent (linearizable) read of every key under `prefix`: its
/// revision and the keys with their values and mod revisions.
pub async fn read_prefix(client: &mut Client, prefix: &str) -> Result<(i64, Vec<Kv>), String> {
    let end = prefix_end(prefix.as_bytes());
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0i64;
    let mut out = Vec::new();
    for _ in 0..MAX_PAGES {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let resp = match tokio::time::timeout(REQUEST_TIMEOUT, client.get(from.clone(), Some(opts)))
            .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(format!("reading {prefix} failed: {e}")),
            Err(_) => return Err(format!("reading {prefix} timed out")),
        };
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        let more = resp.more();
        for kv in resp.kvs() {
            out.push(Kv {
                key: kv.key().to_vec(),
                value: kv.value().to_vec(),
                mod_revision: kv.mod_revision(),
            });
        }
        match out.last() {
            Some(last) if more => {
                from = last.key.clone();
                from.push(0);
            }
            _ => return Ok((revision, out)),
        }
    }
    Err(format!("reading {prefix} took more than {MAX_PAGES} pages"))
}

/// A key as read.
#[derive(Debug, Clone)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_range() {
        assert_eq!(prefix_end(b"/moat/"), b"/moat0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
