//! `[deployment.tls]`: the certificate, key and client CA read and checked
//! together, every problem of the table reported (none hides another), and
//! the warnings a TLS table earns (an expired certificate, a key others can
//! read).

use super::raw::*;
use super::validate::Validator;
use super::*;
use crate::data::tls::{self, TlsFileError};
use std::path::Path;

impl Validator<'_> {
    pub(super) fn tls(&mut self, ctx: &str, t: &RawTls) -> Option<Tls> {
        // Every problem of the table is reported, none hides another.
        let mode = match &t.mode {
            Some(m) => self.choice(
                "mode",
                m,
                &[("require", TlsMode::Require), ("allow", TlsMode::Allow)],
            ),
            None => Some(TlsMode::Require),
        };
        let tls13_only = match &t.min_version {
            Some(v) => self.choice("min_version", v, &[("1.2", false), ("1.3", true)]),
            None => Some(false),
        };
        let cert = self.read_named(&t.cert, "certificate file");
        let key = self.read_named(&t.key, "private key file");
        let ca = t
            .client_ca
            .as_ref()
            .map(|at| (at, self.read_named(at, "client CA file")));
        if let Some((path, _)) = &key {
            if key_readable_by_others(path) {
                self.warn(
                    &t.key,
                    format!(
                        "{ctx}: the private key {} is readable by other users; chmod 600 it",
                        path.display()
                    ),
                );
            }
        }
        // A file that could not be read is reported already; the others are
        // still checked (with its bytes empty, and its errors not repeated).
        let files = tls::Files {
            cert: read_bytes(&cert),
            key: read_bytes(&key),
            client_ca: ca.as_ref().map(|(_, f)| read_bytes(f)),
            tls13_only: tls13_only.unwrap_or(false),
        };
        let loaded = tls::server_config(&files);
        for e in loaded.as_ref().err().into_iter().flatten() {
            let (at, file) = match (e, &ca) {
                (TlsFileError::Cert(_) | TlsFileError::Mismatch(_), _) => (&t.cert, &cert),
                (TlsFileError::Key(_), _) => (&t.key, &key),
                (TlsFileError::ClientCa(_), Some((at, f))) => (*at, f),
                (TlsFileError::ClientCa(_), None) => continue,
            };
            if let Some((path, _)) = file {
                self.err(at, format!("{ctx}: {}: {e}", path.display()));
            }
        }
        let (Some(mode), Some(_), Some((cert_path, _)), Ok(loaded)) =
            (mode, tls13_only, &cert, loaded)
        else {
            return None;
        };
        if let Some(na) = loaded.not_after {
            let now = self
                .now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            if na < now {
                self.warn(&t.cert, format!("{ctx}: the certificate {} expired (notAfter {}); clients will refuse it, renew it", cert_path.display(), tls::format_time(na)));
            }
        }
        Some(Tls {
            mode,
            server: loaded.config,
            not_after: loaded.not_after,
        })
    }
}

/// The bytes of a file that was read, or none.
fn read_bytes(file: &Option<(std::path::PathBuf, Vec<u8>)>) -> &[u8] {
    file.as_ref().map_or(&[], |f| f.1.as_slice())
}

#[cfg(unix)]
pub(super) fn key_readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    // Follow symlinks, as Kubernetes secret volumes are symlinks.
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o004 != 0)
}

#[cfg(not(unix))]
pub(super) fn key_readable_by_others(_: &Path) -> bool {
    false
}
