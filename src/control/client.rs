//! A small HTTPS client for `moat connections` and `moat plan`: it reaches
//! the running daemon's API at `[api] listen` of the running config, trusts
//! exactly the certificate that config names (pinned: the CLI runs on the
//! host, beside the file), and sends the key from `$MOAT_API_KEY`.

use crate::config::{self, Api};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Connecting and the whole exchange must finish within these.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Client {
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    key: String,
}

/// An answer: status and body.
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Client {
    /// The API of the daemon running `config_path`; the key from `$MOAT_API_KEY`.
    pub fn for_config(config_path: &Path) -> Result<Client, String> {
        let config = config::load(config_path, SystemTime::now()).map_err(|e| {
            format!(
                "cannot read the running config to find the API:\n{e}\n(set MOAT_CONFIG to the config the daemon runs)"
            )
        })?;
        let Some(api) = config.api else {
            return Err(format!(
                "{} has no [api] table, so the daemon serves no API; add one (see README, \"Access-list API\")",
                config_path.display()
            ));
        };
        let key = std::env::var("MOAT_API_KEY")
            .ok()
            .filter(|k| !k.trim().is_empty())
            .ok_or("set MOAT_API_KEY to an API key (see `moat api-key new`)")?;
        Ok(Client {
            addr: reachable(api.listen),
            tls: pinned(&api)?,
            key: key.trim().to_string(),
        })
    }

    /// Sends one request; Err when the API cannot be reached.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Answer, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime: {e}"))?;
        rt.block_on(async {
            tokio::time::timeout(
                REQUEST_TIMEOUT,
                self.exchange(method, path, content_type, body),
            )
            .await
            .map_err(|_| format!("the API at {} did not answer within 30 s", self.addr))?
        })
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Answer, String> {
        let unreachable =
            |e: &dyn std::fmt::Display| format!("cannot reach the API at {}: {e}", self.addr);
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(self.addr))
            .await
            .map_err(|_| unreachable(&"timed out"))?
            .map_err(|e| unreachable(&e))?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("authorization", format!("Bearer {}", self.key));
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let resp = match &self.tls {
            None => send(TokioIo::new(tcp), req).await,
            Some(config) => {
                let name = ServerName::IpAddress(self.addr.ip().into());
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| unreachable(&e))?;
                send(TokioIo::new(tls), req).await
            }
        };
        resp.map_err(|e| unreachable(&e))
    }
}

async fn send<I>(io: I, req: Request<Full<Bytes>>) -> Result<Answer, hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes().to_vec();
    Ok(Answer { status, body })
}

/// An unspecified listen address is reached on loopback.
fn reachable(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, listen.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, listen.port()).into(),
        _ => listen,
    }
}

fn pinned(api: &Api) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    let Some(cert) = &api.cert else {
        return Ok(None);
    };
    let pem = std::fs::read(cert)
        .map_err(|e| format!("cannot read the API certificate {}: {e}", cert.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file ({e})", cert.display()))?;
    let provider = crate::data::tls::provider();
    let verifier = Arc::new(Pinned {
        certs,
        provider: provider.clone(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(Arc::new(config)))
}

/// Trusts exactly the certificate of the config's `[api] tls cert` file.
#[derive(Debug)]
struct Pinned {
    certs: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.certs.iter().any(|c| c.as_ref() == end_entity.as_ref()) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the API serves another certificate than the config's [api] tls cert".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
