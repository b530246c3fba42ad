//! `[store] etcd`: the fleet store's settings (SPEC 7), checked like the rest
//! of the file. Nothing here contacts etcd: `moat check` validates the table
//! and reads the files it names (password, CA, client certificate and key).

use super::raw::*;
use super::validate::Validator;
use super::*;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The prefix when the table gives none.
pub const DEFAULT_PREFIX: &str = "/moat/";

/// How moat reaches the fleet store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    /// Each with its scheme (`http://` or `https://`, one for all) and a port.
    pub endpoints: Vec<String>,
    /// Keys live under `{prefix}deployments/{name}/accessList/`.
    pub prefix: String,
    /// Where the last applied entries are kept for a start while etcd is down.
    pub cache: Option<PathBuf>,
    /// etcd user name and password (read from `password_file`).
    pub auth: Option<(String, Secret)>,
    /// Set for `https://` endpoints.
    pub tls: Option<StoreTls>,
}

/// TLS to etcd: the CA (else the system's roots) and a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreTls {
    pub ca: Option<Vec<u8>>,
    /// PEM certificate chain and PEM key.
    pub identity: Option<(Vec<u8>, Secret)>,
}

/// A value that must never reach a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

impl Store {
    /// Where this fleet's entries of every deployment live.
    pub fn deployments_prefix(&self) -> String {
        format!("{}deployments/", self.prefix)
    }
}

/// An endpoint as written: `http://host:port`, `https://host:port` or
/// `host:port`. Returns whether it says https (None: no scheme), and the rest.
fn endpoint(text: &str) -> Result<(Option<bool>, &str), String> {
    let (https, rest) = if let Some(r) = text.strip_prefix("https://") {
        (Some(true), r)
    } else if let Some(r) = text.strip_prefix("http://") {
        (Some(false), r)
    } else if text.contains("://") {
        return Err(format!(
            "endpoint \"{text}\" has an unknown scheme; use http:// or https://"
        ));
    } else {
        (None, text)
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let port_ok = rest
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty() && !host.contains('/') && host != &"[]")
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .is_some_and(|p| p != 0);
    if !port_ok {
        return Err(format!(
            "endpoint \"{text}\" is not host:port; write it like \"https://etcd1:2379\""
        ));
    }
    Ok((https, rest))
}

impl Validator<'_> {
    pub(super) fn store(&mut self, raw: Option<&RawStore>) -> Option<Store> {
        let etcd = raw?.etcd.get_ref();
        let ctx = "[store] etcd";
        let want_tls = etcd.ca.is_some() || etcd.cert.is_some() || etcd.key.is_some();
        let mut schemes = Vec::new();
        let mut hosts = Vec::new();
        for e in etcd.endpoints.get_ref() {
            match endpoint(e.get_ref()) {
                Ok((https, rest)) => {
                    schemes.push((https, e));
                    hosts.push(rest.to_string());
                }
                Err(m) => self.err(e, format!("{ctx}: {m}")),
            }
        }
        if etcd.endpoints.get_ref().is_empty() {
            self.err(&etcd.endpoints, format!("{ctx}: endpoints is empty; list the etcd cluster's client URLs, like [\"https://etcd1:2379\"]"));
        }
        let https = schemes.iter().any(|(s, _)| *s == Some(true));
        if let Some((_, e)) = schemes.iter().find(|(s, _)| *s == Some(false)) {
            if https {
                self.err(
                    *e,
                    format!(
                        "{ctx}: endpoints mix http:// and https://; use https:// for all of them"
                    ),
                );
            } else if want_tls {
                self.err(*e, format!("{ctx}: ca, cert and key are for TLS, which needs https:// endpoints; write https:// or remove them"));
            }
        }
        let tls_on = https || (want_tls && schemes.iter().all(|(s, _)| s.is_none()));
        let scheme = if tls_on { "https://" } else { "http://" };
        let endpoints = hosts.iter().map(|h| format!("{scheme}{h}")).collect();

        let prefix = match &etcd.prefix {
            None => DEFAULT_PREFIX.to_string(),
            Some(p) if p.get_ref().is_empty() => {
                self.err(p, format!("{ctx}: prefix is empty; give one like \"/moat/\" so that moat reads only its own keys"));
                DEFAULT_PREFIX.to_string()
            }
            Some(p) => {
                if !p.get_ref().ends_with('/') {
                    self.warn(p, format!("{ctx}: prefix \"{0}\" does not end with '/': keys are \"{0}deployments/...\"; did you mean \"{0}/\"?", p.get_ref()));
                }
                p.get_ref().clone()
            }
        };
        let cache = etcd.cache.as_ref().map(|c| self.base.join(c.get_ref()));
        if let Some(c) = etcd.cache.as_ref().filter(|c| c.get_ref().is_empty()) {
            self.err(c, format!("{ctx}: cache is empty; give a file moat may write, like \"/var/lib/moat/store.json\", or remove the key"));
        }
        let auth = self.store_auth(ctx, etcd);
        let tls = tls_on.then(|| self.store_tls(ctx, etcd)).flatten();
        Some(Store {
            endpoints,
            prefix,
            cache,
            auth,
            tls,
        })
    }

    fn store_auth(&mut self, ctx: &str, etcd: &RawEtcd) -> Option<(String, Secret)> {
        match (&etcd.username, &etcd.password_file) {
            (None, None) => None,
            (Some(u), None) => {
                self.err(u, format!("{ctx}: username needs password_file (a file holding the etcd user's password); add it"));
                None
            }
            (None, Some(p)) => {
                self.err(p, format!("{ctx}: password_file needs username; add it"));
                None
            }
            (Some(u), Some(p)) => {
                if u.get_ref().is_empty() {
                    self.err(u, format!("{ctx}: username is empty"));
                }
                let (path, bytes) = self.read_named(p, "etcd password file")?;
                let text = String::from_utf8_lossy(&bytes);
                let password = text.trim_end_matches(['\r', '\n']);
                if password.is_empty() {
                    self.err(
                        p,
                        format!("{ctx}: the password file {} is empty", path.display()),
                    );
                    return None;
                }
                if super::tls::key_readable_by_others(&path) {
                    self.warn(
                        p,
                        format!(
                            "{ctx}: the password file {} is readable by other users; chmod 600 it",
                            path.display()
                        ),
                    );
                }
                Some((u.get_ref().clone(), Secret(password.as_bytes().to_vec())))
            }
        }
    }

    fn store_tls(&mut self, ctx: &str, etcd: &RawEtcd) -> Option<StoreTls> {
        let ca = match &etcd.ca {
            None => None,
            Some(c) => {
                let (path, bytes) = self.read_named(c, "etcd CA file")?;
                if !pem_certs_ok(&bytes) {
                    self.err(c, format!("{ctx}: {} holds no PEM certificate; give the CA that signed etcd's certificate", path.display()));
                    return None;
                }
                Some(bytes)
            }
        };
        let identity = match (&etcd.cert, &etcd.key) {
            (None, None) => None,
            (Some(c), None) => {
                self.err(c, format!("{ctx}: cert needs key; add the client key"));
                return None;
            }
            (None, Some(k)) => {
                self.err(
                    k,
                    format!("{ctx}: key needs cert; add the client certificate"),
                );
                return None;
            }
            (Some(c), Some(k)) => {
                let cert = self.read_named(c, "etcd client certificate");
                let key = self.read_named(k, "etcd client key");
                let ((cpath, cert), (kpath, key)) = (cert?, key?);
                if !pem_certs_ok(&cert) {
                    self.err(
                        c,
                        format!(
                            "{ctx}: {} holds no PEM certificate; give the client certificate chain",
                            cpath.display()
                        ),
                    );
                    return None;
                }
                if PrivateKeyDer::from_pem_slice(&key).is_err() {
                    self.err(k, format!("{ctx}: {} holds no usable private key; give a PEM key in PKCS#8, PKCS#1 or SEC1 form", kpath.display()));
                    return None;
                }
                if super::tls::key_readable_by_others(&kpath) {
                    self.warn(
                        k,
                        format!(
                            "{ctx}: the private key {} is readable by other users; chmod 600 it",
                            kpath.display()
                        ),
                    );
                }
                Some((cert, Secret(key)))
            }
        };
        Some(StoreTls { ca, identity })
    }
}

fn pem_certs_ok(pem: &[u8]) -> bool {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    certs.is_ok_and(|c| !c.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_need_a_port_and_a_known_scheme() {
        assert_eq!(
            endpoint("https://etcd1:2379").unwrap(),
            (Some(true), "etcd1:2379")
        );
        assert_eq!(
            endpoint("http://127.0.0.1:2379/").unwrap(),
            (Some(false), "127.0.0.1:2379")
        );
        assert_eq!(endpoint("[::1]:2379").unwrap(), (None, "[::1]:2379"));
        assert!(endpoint("etcd1").is_err());
        assert!(endpoint("https://etcd1").is_err());
        assert!(endpoint("unix://x:1").is_err());
        assert!(endpoint("etcd1:0").is_err());
        assert!(endpoint("http://:2379").is_err());
    }
}
