//! The `[api]` table and the API keys file it names (SPEC 6.1): where the
//! access-list API listens, its TLS material, and the keys (SHA-256 only).

use super::diag::{ConfigError, Report, Source};
use super::raw::*;
use super::validate::{parse, Validator};
use super::*;
use std::path::Path;
use toml::Spanned;

/// The access-list API's settings, checked.
#[derive(Debug, Clone)]
pub struct Api {
    pub listen: SocketAddr,
    /// None: plain HTTP (only allowed on a loopback address).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The certificate file, so that the CLI can pin the served certificate.
    pub cert: Option<PathBuf>,
    pub keys_file: PathBuf,
    pub keys: Arc<Vec<ApiKey>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Read,
    Write,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
        }
    }
}

/// One API key: a name for the logs and the SHA-256 of the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub name: String,
    pub sha256: [u8; 32],
    pub role: Role,
    /// The deployments this key may see; None: all of them.
    pub deployments: Option<Vec<String>>,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("deployments", &self.deployments)
            .finish_non_exhaustive()
    }
}

impl ApiKey {
    /// Whether this key may see deployment `name`.
    pub fn sees(&self, name: &str) -> bool {
        self.deployments
            .as_ref()
            .is_none_or(|list| list.iter().any(|d| d == name))
    }
}

/// Parses a keys file on its own (the API re-reads it when it changes, so
/// that a removed key stops working at once). `deployments`: the names a
/// scope may use, or None to accept any.
pub fn parse_keys(
    path: &Path,
    bytes: &[u8],
    deployments: Option<&[&str]>,
) -> Result<Vec<ApiKey>, ConfigError> {
    let mut report = Report::default();
    let keys = keys(&mut report, path, bytes, deployments);
    if report.errors.is_empty() {
        Ok(keys)
    } else {
        Err(ConfigError {
            errors: report.errors,
            warnings: report.warnings,
        })
    }
}

fn hex32(text: &str) -> Option<[u8; 32]> {
    let b = text.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

fn keys(report: &mut Report, path: &Path, bytes: &[u8], deps: Option<&[&str]>) -> Vec<ApiKey> {
    let src = Source {
        path: path.to_path_buf(),
        text: String::from_utf8_lossy(bytes).into_owned(),
    };
    let Some(raw) = parse::<RawKeys>(report, &src, &super::schema::KEYS) else {
        return Vec::new();
    };
    let mut out: Vec<ApiKey> = Vec::new();
    for k in &raw.key {
        let k = k.get_ref();
        let name = k.name.get_ref();
        let mut ok = true;
        if name.trim().is_empty() {
            report.error(
                &src,
                k.name.span(),
                "a key needs a non-empty name (shown in audit logs)",
            );
            ok = false;
        } else if out.iter().any(|o| &o.name == name) {
            report.error(
                &src,
                k.name.span(),
                format!("key name \"{name}\" is used twice; give each key its own name"),
            );
            ok = false;
        }
        let sha = hex32(k.sha256.get_ref());
        if sha.is_none() {
            report.error(&src, k.sha256.span(), format!("key \"{name}\": sha256 must be 64 hex digits (the SHA-256 of the key, as `moat api-key new` prints it), not \"{}\"", k.sha256.get_ref()));
        }
        let role = match k.role.get_ref().as_str() {
            "read" => Some(Role::Read),
            "write" => Some(Role::Write),
            other => {
                report.error(&src, k.role.span(), format!("key \"{name}\": role = \"{other}\" is not a role; use \"read\" or \"write\""));
                None
            }
        };
        let mut scope = None;
        if let Some(list) = &k.deployments {
            let mut names = Vec::new();
            for d in list {
                if deps.is_some_and(|all| !all.contains(&d.get_ref().as_str())) {
                    report.error(&src, d.span(), format!("key \"{name}\": deployment \"{}\" is not in the config; check the spelling", d.get_ref()));
                    ok = false;
                }
                names.push(d.get_ref().clone());
            }
            scope = Some(names);
        }
        if let (true, Some(sha256), Some(role)) = (ok, sha, role) {
            out.push(ApiKey {
                name: name.clone(),
                sha256,
                role,
                deployments: scope,
            });
        }
    }
    out
}

impl Validator<'_> {
    /// `[api]`; `deployments`: the names the config defines.
    pub(super) fn api(&mut self, raw: &Spanned<RawApi>, deployments: &[&str]) -> Option<Api> {
        let r = raw.get_ref();
        let listen = match r.listen.get_ref().parse::<SocketAddr>() {
            Ok(a) if a.port() == 0 => {
                self.err(&r.listen, "[api] listen: port 0 is not allowed; give the port the API serves on, like \"127.0.0.1:9912\"");
                None
            }
            Ok(a) => Some(a),
            Err(_) => {
                self.err(&r.listen, format!("[api] listen = \"{}\" is not an address; write IP:PORT, like \"10.0.0.5:9912\"", r.listen.get_ref()));
                None
            }
        };
        let (mut tls, mut cert) = (None, None);
        match &r.tls {
            None => {
                if listen.is_some_and(|a| !a.ip().is_loopback()) {
                    self.err(&r.listen, format!("[api] listen = \"{}\" is not a loopback address, so the API needs TLS (keys would cross the network in clear); add tls = {{ cert = \"…\", key = \"…\" }} or listen on 127.0.0.1", r.listen.get_ref()));
                }
            }
            Some(t) => {
                let t = t.get_ref();
                let c = self.read_named(&t.cert, "API certificate file");
                let k = self.read_named(&t.key, "API private key file");
                if let (Some(c), Some(k)) = (c, k) {
                    let files = crate::data::tls::Files {
                        cert: &c.1,
                        key: &k.1,
                        client_ca: None,
                        tls13_only: false,
                    };
                    match crate::data::tls::server_config(&files) {
                        Ok(loaded) => {
                            let mut config = (*loaded.config).clone();
                            config.alpn_protocols = vec![b"http/1.1".to_vec()];
                            tls = Some(Arc::new(config));
                            cert = Some(c.0);
                        }
                        Err(errors) => {
                            for e in errors {
                                let (at, path) = match e {
                                    crate::data::tls::TlsFileError::Key(_) => (&t.key, &k.0),
                                    _ => (&t.cert, &c.0),
                                };
                                self.err(at, format!("[api] tls: {}: {e}", path.display()));
                            }
                        }
                    }
                }
            }
        }
        let (path, bytes) = self.read_named(&r.keys, "API keys file")?;
        let keys = keys(self.report, &path, &bytes, Some(deployments));
        Some(Api {
            listen: listen?,
            tls,
            cert,
            keys_file: path,
            keys: Arc::new(keys),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn a_keys_file_parses() {
        let text = format!(
            "[[key]]\nname = \"portal\"\nsha256 = \"{}\"\nrole = \"write\"\ndeployments = [\"orders\"]\n",
            SHA.to_uppercase()
        );
        let keys = parse_keys(Path::new("k.toml"), text.as_bytes(), Some(&["orders"])).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].role, Role::Write);
        assert_eq!(keys[0].sha256[0], 0x9f);
        assert!(keys[0].sees("orders") && !keys[0].sees("billing"));
        assert!(!format!("{:?}", keys[0]).contains("9f"));
    }

    #[test]
    fn bad_keys_are_errors_with_places() {
        let text = "[[key]]\nname = \"a\"\nsha256 = \"abc\"\nrole = \"admin\"\ndeployments = [\"nope\"]\n\n[[key]]\nname = \"b\"\nrole = \"read\"\n";
        let e = parse_keys(Path::new("k.toml"), text.as_bytes(), Some(&["orders"])).unwrap_err();
        let all = e.to_string();
        assert!(
            all.contains("k.toml:3:10: key \"a\": sha256 must be 64 hex digits"),
            "{all}"
        );
        assert!(
            all.contains("k.toml:4:8: key \"a\": role = \"admin\""),
            "{all}"
        );
        assert!(
            all.contains("k.toml:5:16: key \"a\": deployment \"nope\""),
            "{all}"
        );
        assert!(all.contains("missing `sha256`"), "{all}");
        assert!(parse_keys(Path::new("k.toml"), b"[[key]\n", None).is_err());
        assert!(parse_keys(Path::new("k.toml"), b"bogus = 1\n", None).is_err());
    }
}
