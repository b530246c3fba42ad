//! TLS material: PEM certificates, keys and client CAs turned into a rustls
//! `ServerConfig` per deployment, with the checks `moat check` reports.
//!
//! Each deployment gets its own `ServerConfig`, hence its own session cache
//! and ticket keys: a session resumed under one tenant's SNI name can never
//! carry over to another tenant's (the lesson of nginx CVE-2025-23419).

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use std::time::SystemTime;

/// The bytes of one deployment's TLS files.
pub struct Files<'a> {
    pub cert: &'a [u8],
    pub key: &'a [u8],
    pub client_ca: Option<&'a [u8]>,
    pub tls13_only: bool,
}

/// A ready server config and the served certificate's notAfter.
pub struct Loaded {
    pub config: Arc<ServerConfig>,
    pub not_after: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("{0}")]
    Cert(String),
    #[error("{0}")]
    Key(String),
    #[error("{0}")]
    Mismatch(String),
    #[error("{0}")]
    ClientCa(String),
}

/// The crypto provider every TLS config of moat uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    match certs {
        Ok(c) if !c.is_empty() => Ok(c),
        Ok(_) => Err("no PEM certificate (-----BEGIN CERTIFICATE-----) found in it".into()),
        Err(e) => Err(format!("not a readable PEM certificate file ({e})")),
    }
}

/// The leaf-first chain and the leaf's notAfter.
fn chain(pem: &[u8]) -> Result<(Vec<CertificateDer<'static>>, i64), TlsFileError> {
    const GIVE: &str = "give a PEM certificate chain, leaf first";
    let chain = certs(pem).map_err(|m| TlsFileError::Cert(format!("{m}; {GIVE}")))?;
    match x509_parser::parse_x509_certificate(&chain[0]) {
        Ok((_, cert)) => {
            let not_after = cert.validity().not_after.timestamp();
            Ok((chain, not_after))
        }
        Err(e) => Err(TlsFileError::Cert(format!(
            "the first certificate cannot be parsed ({e}); {GIVE}"
        ))),
    }
}

/// The private key, loaded by the crypto provider.
fn signing_key(
    pem: &[u8],
    provider: &CryptoProvider,
) -> Result<(PrivateKeyDer<'static>, Arc<dyn rustls::sign::SigningKey>), TlsFileError> {
    let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        TlsFileError::Key(format!(
            "no usable private key in it ({e}); give a PEM key in PKCS#8, PKCS#1 or SEC1 form"
        ))
    })?;
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| {
            TlsFileError::Key(format!(
                "the private key is not usable ({e}); give an RSA, ECDSA or Ed25519 key"
            ))
        })?;
    Ok((key, signing))
}

/// The verifier of client certificates signed by the CA in `pem`.
fn client_verifier(
    pem: &[u8],
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsFileError> {
    let mut roots = RootCertStore::empty();
    let cas = certs(pem).map_err(|m| {
        TlsFileError::ClientCa(format!(
            "{m}; give the PEM certificate of the CA that signs client certificates"
        ))
    })?;
    for c in cas {
        roots
            .add(c)
            .map_err(|e| TlsFileError::ClientCa(format!("a CA certificate is not usable ({e})")))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| TlsFileError::ClientCa(format!("cannot build a client verifier ({e})")))
}

/// Builds the server config. Certificate, key and client CA are checked
/// independently, so every file at fault is named at once; whether the
/// certificate matches the key is checked when both are usable.
pub fn server_config(files: &Files) -> Result<Loaded, Vec<TlsFileError>> {
    let provider = provider();
    let chain = chain(files.cert);
    let key = signing_key(files.key, &provider);
    let verifier = files
        .client_ca
        .map(|ca| client_verifier(ca, provider.clone()))
        .transpose();
    let ((chain, not_after), (key, signing), verifier) = match (chain, key, verifier) {
        (Ok(c), Ok(k), Ok(v)) => (c, k, v),
        (c, k, v) => {
            return Err([c.err(), k.err(), v.err()].into_iter().flatten().collect());
        }
    };
    let certified = CertifiedKey::new(chain.clone(), signing);
    if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
        certified.keys_match()
    {
        return Err(vec![TlsFileError::Mismatch("the certificate does not match the private key; give the key the certificate was issued for".into())]);
    }
    let versions: &[&rustls::SupportedProtocolVersion] = if files.tls13_only {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| vec![TlsFileError::Cert(e.to_string())])?;
    let builder = match verifier {
        None => builder.with_no_client_auth(),
        Some(v) => builder.with_client_cert_verifier(v),
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| {
        vec![TlsFileError::Mismatch(format!(
            "the certificate and key cannot be used together ({e})"
        ))]
    })?;
    Ok(Loaded {
        config: Arc::new(config),
        not_after: Some(not_after),
    })
}

/// Seconds since the epoch as RFC 3339.
pub fn format_time(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

pub fn format_system_time(t: SystemTime) -> String {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    format_time(secs)
}
