//! EC2 security-group membership (feature `aws`): `DescribeNetworkInterfaces`
//! filtered by `group-id`, every page, every private IPv4 (primary and
//! secondary) and IPv6 address of every interface. Credentials come from the
//! standard AWS chain (`aws-config`); groups of accounts listed in `accounts`
//! are read with the role given there, assumed through STS. The one call is
//! made by hand: the query-API form ([`request`]), signed with `aws-sigv4`,
//! sent with hyper, its XML answer read with roxmltree ([`xml`]).

mod request;
mod xml;

use crate::config::{AwsResolver, GroupKey};
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use ipnet::IpNet;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Mutex;

/// Most pages read for one group (1000 interfaces a page).
const MAX_PAGES: usize = 1000;
/// Bound on one HTTP exchange (connect, send, whole answer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts per page when EC2 is unreachable, throttles or fails (5xx).
const ATTEMPTS: u32 = 3;
/// Largest answer read (a page of 1000 interfaces is a few MB).
const MAX_BODY: usize = 32 << 20;
/// Credentials without an expiry are asked for again after this long.
const CREDS_REUSE: Duration = Duration::from_secs(300);
/// Credentials expiring sooner than this are renewed before use.
const CREDS_MARGIN: Duration = Duration::from_secs(300);

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// A credentials provider and its last answer.
struct Creds {
    provider: Option<SharedCredentialsProvider>,
    cached: Mutex<Option<(Credentials, Instant)>>,
}

impl Creds {
    fn new(provider: Option<SharedCredentialsProvider>) -> Self {
        Creds {
            provider,
            cached: Mutex::new(None),
        }
    }

    async fn get(&self) -> Result<Credentials, String> {
        let mut cached = self.cached.lock().await;
        if let Some((c, at)) = cached.as_ref() {
            let fresh = match c.expiry() {
                Some(exp) => exp > SystemTime::now() + CREDS_MARGIN,
                None => at.elapsed() < CREDS_REUSE,
            };
            if fresh {
                return Ok(c.clone());
            }
        }
        let provider = self.provider.as_ref().ok_or(
            "no AWS credentials provider: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or an instance role",
        )?;
        let c = provider
            .provide_credentials()
            .await
            .map_err(|e| format!("no AWS credentials: {}", chain(&e)))?;
        *cached = Some((c.clone(), Instant::now()));
        Ok(c)
    }
}

/// An error and its sources, joined by ": ".
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out = format!("{out}: {s_text}");
        }
        src = s.source();
    }
    out
}

/// Why one attempt failed, and whether another may succeed.
struct Failure {
    message: String,
    retry: bool,
}

/// The EC2 resolver: one HTTPS client, default credentials, and the
/// credentials of each assumed role.
pub struct Ec2 {
    http: Client<Https, Full<bytes::Bytes>>,
    endpoint: Result<http::Uri, String>,
    region: String,
    default: Creds,
    by_account: HashMap<String, Creds>,
}

fn https() -> Https {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        tracing::warn!(errors = ?native.errors, "no trusted CA certificates found on this host (install ca-certificates); HTTPS calls to EC2 will fail");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(REQUEST_TIMEOUT));
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

impl Ec2 {
    pub async fn new(settings: &AwsResolver) -> Self {
        // aws-config's own calls (STS, instance metadata, SSO) use the
        // smithy HTTP client, with rustls on ring like the rest of moat.
        let sdk_http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let base = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            .http_client(sdk_http)
            .load()
            .await;
        let mut by_account = HashMap::new();
        for (account, role) in &settings.accounts {
            let provider = aws_config::sts::AssumeRoleProvider::builder(role)
                .session_name("moat")
                .configure(&base)
                .build()
                .await;
            let provider = SharedCredentialsProvider::new(provider);
            by_account.insert(account.clone(), Creds::new(Some(provider)));
        }
        Ec2 {
            http: Client::builder(TokioExecutor::new()).build(https()),
            endpoint: request::endpoint(&settings.region, settings.endpoint.as_deref()),
            region: settings.region.clone(),
            default: Creds::new(base.credentials_provider()),
            by_account,
        }
    }

    /// The addresses of every interface in the group. Any failed page fails
    /// the whole group: a partial answer must not shrink it.
    pub async fn members(&self, group: &GroupKey) -> Result<Vec<IpNet>, String> {
        let creds = self.by_account.get(&group.account).unwrap_or(&self.default);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let page = self.page(creds, &group.id, token.as_deref()).await?;
            out.extend(
                page.addresses
                    .into_iter()
                    .map(|ip| IpNet::from(crate::policy::addr::canonical(ip))),
            );
            match page.next_token {
                Some(next) if Some(&next) == token.as_ref() => {
                    return Err(format!("EC2 answered the same NextToken twice ({next})"))
                }
                Some(next) => token = Some(next),
                None => {
                    out.sort();
                    out.dedup();
                    return Ok(out);
                }
            }
        }
        Err(format!("more than {MAX_PAGES} pages of network interfaces"))
    }

    /// One page, retried (with a short backoff) while the failure may pass.
    async fn page(
        &self,
        creds: &Creds,
        group_id: &str,
        token: Option<&str>,
    ) -> Result<xml::Page, String> {
        let mut attempt = 1;
        loop {
            match self.attempt(creds, group_id, token).await {
                Ok(page) => return Ok(page),
                Err(f) if f.retry && attempt < ATTEMPTS => {
                    tracing::debug!(error = %f.message, attempt, "EC2 request failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                    attempt += 1;
                }
                Err(f) => return Err(f.message),
            }
        }
    }

    async fn attempt(
        &self,
        creds: &Creds,
        group_id: &str,
        token: Option<&str>,
    ) -> Result<xml::Page, Failure> {
        let fatal = |message: String| Failure {
            message,
            retry: false,
        };
        let uri = self.endpoint.as_ref().map_err(|e| fatal(e.clone()))?;
        let c = creds.get().await.map_err(|m| Failure {
            message: m,
            retry: true,
        })?;
        let req = request::signed(
            uri,
            request::form_body(group_id, token),
            &c,
            &self.region,
            SystemTime::now(),
        )
        .map_err(fatal)?;
        let req = req.map(|b| Full::new(bytes::Bytes::from(b)));
        let exchange = async {
            let resp = self.http.request(req).await.map_err(|e| Failure {
                message: format!("could not reach EC2 at {uri}: {}", chain(&e)),
                retry: true,
            })?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| Failure {
                    message: format!("reading EC2's answer from {uri}: {e}"),
                    retry: true,
                })?
                .to_bytes();
            Ok((status, body))
        };
        let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| Failure {
                message: format!("EC2 at {uri} did not answer within {REQUEST_TIMEOUT:?}"),
                retry: true,
            })??;
        let text = String::from_utf8_lossy(&body);
        if status.is_success() {
            return xml::parse_page(&text).map_err(fatal);
        }
        let (code, message) = xml::parse_error(status.as_u16(), &text);
        let throttled = matches!(
            code.as_deref(),
            Some("RequestLimitExceeded" | "Throttling" | "ThrottlingException" | "RequestExpired")
        );
        Err(Failure {
            message,
            retry: status.is_server_error() || throttled,
        })
    }
}

#[cfg(test)]
mod tests {
    //! `members` against a real HTTP server on loopback that answers a
    //! scripted sequence of EC2 answers.
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const NS: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

    fn page(ips: &[&str], next: Option<&str>) -> (u16, String) {
        let items: String = ips
            .iter()
            .map(|ip| format!("<item><privateIpAddress>{ip}</privateIpAddress></item>"))
            .collect();
        let next = next
            .map(|t| format!("<nextToken>{t}</nextToken>"))
            .unwrap_or_default();
        (200, format!("<DescribeNetworkInterfacesResponse xmlns=\"{NS}\"><networkInterfaceSet>{items}</networkInterfaceSet>{next}</DescribeNetworkInterfacesResponse>"))
    }

    fn error(status: u16, code: &str) -> (u16, String) {
        (status, format!("<Response><Errors><Error><Code>{code}</Code><Message>m</Message></Error></Errors><RequestID>r</RequestID></Response>"))
    }

    /// Serves `answers` in order, one per connection; returns the URL and a
    /// handle yielding the request bodies received.
    async fn serve(answers: Vec<(u16, String)>) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut bodies = Vec::new();
            for (status, body) in answers {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let request = loop {
                    let n = s.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "client closed early");
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len: usize = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break text;
                        }
                    }
                };
                assert!(request.starts_with("POST / HTTP/1.1\r\n"), "{request}");
                assert!(
                    request
                        .to_ascii_lowercase()
                        .contains("authorization: aws4-hmac-sha256 credential=akid/"),
                    "{request}"
                );
                bodies.push(request.split("\r\n\r\n").nth(1).unwrap().to_string());
                let reply = format!("HTTP/1.1 {status} X\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                s.write_all(reply.as_bytes()).await.unwrap();
                s.shutdown().await.ok();
            }
            bodies
        });
        (url, task)
    }

    fn ec2(url: &str) -> Ec2 {
        let creds = Credentials::new("AKID", "secret", None, None, "test");
        Ec2 {
            http: Client::builder(TokioExecutor::new()).build(https()),
            endpoint: request::endpoint("us-east-1", Some(url)),
            region: "us-east-1".into(),
            default: Creds::new(Some(SharedCredentialsProvider::new(creds))),
            by_account: HashMap::new(),
        }
    }

    fn group() -> GroupKey {
        GroupKey {
            account: "123456789012".into(),
            id: "sg-0a1b2c3d".into(),
        }
    }

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[tokio::test]
    async fn pages_are_followed_and_a_transient_error_retried() {
        let (url, server) = serve(vec![
            page(&["10.0.0.2", "10.0.0.1"], Some("t/2+=")),
            error(503, "Unavailable"),
            page(&["10.0.0.3", "10.0.0.1"], None),
        ])
        .await;
        let got = ec2(&url).members(&group()).await.unwrap();
        assert_eq!(got, nets(&["10.0.0.1/32", "10.0.0.2/32", "10.0.0.3/32"]));
        let bodies = server.await.unwrap();
        assert_eq!(bodies.len(), 3);
        assert!(!bodies[0].contains("NextToken"), "{}", bodies[0]);
        assert!(
            bodies[1].ends_with("NextToken=t%2F2%2B%3D"),
            "{}",
            bodies[1]
        );
        assert_eq!(bodies[1], bodies[2], "the retry asks for the same page");
    }

    #[tokio::test]
    async fn a_refused_request_is_not_retried_and_fails_the_group() {
        let (url, server) = serve(vec![
            page(&["10.0.0.1"], Some("p2")),
            error(403, "UnauthorizedOperation"),
        ])
        .await;
        let e = ec2(&url).members(&group()).await.unwrap_err();
        assert!(e.contains("HTTP 403: UnauthorizedOperation"), "{e}");
        assert_eq!(server.await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_page_failing_every_attempt_fails_the_group() {
        let (url, server) = serve(vec![
            page(&["10.0.0.1"], Some("p2")),
            error(500, "InternalError"),
            error(500, "InternalError"),
            error(500, "InternalError"),
        ])
        .await;
        let e = ec2(&url).members(&group()).await.unwrap_err();
        assert!(e.contains("HTTP 500: InternalError"), "{e}");
        assert_eq!(server.await.unwrap().len(), 1 + ATTEMPTS as usize);
    }

    #[tokio::test]
    async fn a_repeated_token_is_an_error_not_a_loop() {
        let (url, _server) = serve(vec![
            page(&["10.0.0.1"], Some("same")),
            page(&["10.0.0.2"], Some("same")),
        ])
        .await;
        let e = ec2(&url).members(&group()).await.unwrap_err();
        assert!(e.contains("same NextToken twice"), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_is_an_error_naming_it() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("http://127.0.0.1:{port}");
        let e = ec2(&url).members(&group()).await.unwrap_err();
        assert!(
            e.contains("could not reach EC2 at http://127.0.0.1:"),
            "{e}"
        );
    }
}
