//! One `DescribeNetworkInterfaces` request of EC2's query API: the endpoint,
//! the form body (a `group-id` filter, a page size, the page's token) and the
//! AWS Signature Version 4 that `aws-sigv4` computes over it.

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use http::header::{CONTENT_TYPE, HOST};
use std::time::SystemTime;

/// The EC2 API version whose XML `xml::parse_page` reads.
pub const API_VERSION: &str = "2016-11-15";
/// Interfaces asked for per page (the API's maximum).
pub const PAGE_SIZE: u32 = 1000;
const FORM: &str = "application/x-www-form-urlencoded; charset=utf-8";

/// EC2's regional endpoint, unless the config names one (`endpoint`).
pub fn endpoint(region: &str, configured: Option<&str>) -> Result<http::Uri, String> {
    let text = match configured {
        Some(e) => e.to_string(),
        None if region.starts_with("cn-") => format!("https://ec2.{region}.amazonaws.com.cn/"),
        None => format!("https://ec2.{region}.amazonaws.com/"),
    };
    let uri: http::Uri = text.parse().map_err(|e| {
        format!("[security_groups] aws endpoint \"{text}\" is not a URL ({e}); write it like \"https://ec2.us-east-1.amazonaws.com\"")
    })?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(uri),
        _ => Err(format!("[security_groups] aws endpoint \"{text}\" needs http:// or https:// and a host; write it like \"https://ec2.us-east-1.amazonaws.com\"")),
    }
}

/// The form body of the request for one page of `group_id`'s interfaces.
pub fn form_body(group_id: &str, next_token: Option<&str>) -> String {
    let mut f = form_urlencoded::Serializer::new(String::new());
    f.append_pair("Action", "DescribeNetworkInterfaces")
        .append_pair("Version", API_VERSION)
        .append_pair("Filter.1.Name", "group-id")
        .append_pair("Filter.1.Value.1", group_id)
        .append_pair("MaxResults", &PAGE_SIZE.to_string());
    if let Some(t) = next_token {
        f.append_pair("NextToken", t);
    }
    f.finish()
}

/// The Host header for `uri`: its host, and its port unless it is the
/// scheme's default (as the signer and HTTP/1.1 clients write it).
fn host_header(uri: &http::Uri) -> String {
    let host = uri.host().unwrap_or_default();
    match (uri.port_u16(), uri.scheme_str()) {
        (Some(80), Some("http")) | (Some(443), Some("https")) | (None, _) => host.to_string(),
        (Some(p), _) => format!("{host}:{p}"),
    }
}

/// A POST of `body` to `uri`, signed for service `ec2` in `region` at `now`.
pub fn signed(
    uri: &http::Uri,
    body: String,
    creds: &Credentials,
    region: &str,
    now: SystemTime,
) -> Result<http::Request<String>, String> {
    let mut req = http::Request::post(uri.clone())
        .header(HOST, host_header(uri))
        .header(CONTENT_TYPE, FORM)
        .body(body)
        .map_err(|e| format!("cannot build the EC2 request: {e}"))?;
    let identity = creds.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("ec2")
        .time(now)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| format!("cannot sign the EC2 request: {e}"))?
        .into();
    let uri_text = uri.to_string();
    let headers = req
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)));
    let signable = SignableRequest::new(
        "POST",
        &uri_text,
        headers,
        SignableBody::Bytes(req.body().as_bytes()),
    )
    .map_err(|e| format!("cannot sign the EC2 request: {e}"))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| format!("cannot sign the EC2 request: {e}"))?
        .into_parts();
    instructions.apply_to_request_http1x(&mut req);
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn creds(token: Option<&str>) -> Credentials {
        Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            token.map(String::from),
            None,
            "test",
        )
    }

    fn form(body: &str) -> Vec<(String, String)> {
        form_urlencoded::parse(body.as_bytes())
            .into_owned()
            .collect()
    }

    #[test]
    fn body_filters_by_group_and_pages() {
        let first = form(&form_body("sg-0a1b2c3d", None));
        let pairs = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            first,
            pairs(&[
                ("Action", "DescribeNetworkInterfaces"),
                ("Version", "2016-11-15"),
                ("Filter.1.Name", "group-id"),
                ("Filter.1.Value.1", "sg-0a1b2c3d"),
                ("MaxResults", "1000"),
            ])
        );
        // tokens are opaque base64-like text: '+', '/' and '=' must survive
        let token = "eyJ2Ijoi+/MiJ9==";
        let body = form_body("sg-0a1b2c3d", Some(token));
        assert!(
            body.contains("NextToken=eyJ2Ijoi%2B%2FMiJ9%3D%3D"),
            "{body}"
        );
        assert_eq!(
            form(&body).last().unwrap(),
            &("NextToken".to_string(), token.to_string())
        );
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            endpoint("eu-west-3", None).unwrap().to_string(),
            "https://ec2.eu-west-3.amazonaws.com/"
        );
        assert_eq!(
            endpoint("cn-north-1", None).unwrap().to_string(),
            "https://ec2.cn-north-1.amazonaws.com.cn/"
        );
        assert_eq!(
            endpoint("us-east-1", Some("http://127.0.0.1:4566"))
                .unwrap()
                .to_string(),
            "http://127.0.0.1:4566/"
        );
        let e = endpoint("us-east-1", Some("http://")).unwrap_err();
        assert!(e.contains("endpoint \"http://\""), "{e}");
        assert!(endpoint("us-east-1", Some("ftp://host")).is_err());
    }

    #[test]
    fn host_header_keeps_only_non_default_ports() {
        let h = |s: &str| host_header(&s.parse().unwrap());
        assert_eq!(
            h("https://ec2.us-east-1.amazonaws.com/"),
            "ec2.us-east-1.amazonaws.com"
        );
        assert_eq!(
            h("https://ec2.us-east-1.amazonaws.com:443/"),
            "ec2.us-east-1.amazonaws.com"
        );
        assert_eq!(h("http://127.0.0.1:4566/"), "127.0.0.1:4566");
        assert_eq!(h("http://localhost:80/"), "localhost");
    }

    #[test]
    fn request_is_signed_for_ec2_in_the_region() {
        let uri = endpoint("us-east-1", Some("http://127.0.0.1:4566")).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_440_938_160); // 2015-08-30T12:36:00Z
        let body = form_body("sg-0a1b2c3d", None);
        let req = signed(&uri, body.clone(), &creds(None), "us-east-1", now).unwrap();
        assert_eq!(req.method(), "POST");
        assert_eq!(req.body(), &body);
        let h = |n: &str| {
            req.headers()
                .get(n)
                .map(|v| v.to_str().unwrap().to_string())
        };
        assert_eq!(h("host").as_deref(), Some("127.0.0.1:4566"));
        assert_eq!(h("content-type").as_deref(), Some(FORM));
        assert_eq!(h("x-amz-date").as_deref(), Some("20150830T123600Z"));
        assert_eq!(h("x-amz-security-token"), None);
        let auth = h("authorization").unwrap();
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/ec2/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature="),
            "{auth}"
        );
        let sig = auth.rsplit("Signature=").next().unwrap();
        assert_eq!(sig.len(), 64);
        assert!(sig.bytes().all(|b| b.is_ascii_hexdigit()));
        // deterministic: same input, same signature; another body, another one
        let again = signed(&uri, body.clone(), &creds(None), "us-east-1", now).unwrap();
        assert_eq!(
            again.headers()["authorization"],
            req.headers()["authorization"]
        );
        let other = signed(
            &uri,
            form_body("sg-other", None),
            &creds(None),
            "us-east-1",
            now,
        )
        .unwrap();
        assert_ne!(
            other.headers()["authorization"],
            req.headers()["authorization"]
        );
    }

    #[test]
    fn temporary_credentials_send_their_session_token() {
        let uri = endpoint("us-east-1", None).unwrap();
        let req = signed(
            &uri,
            form_body("sg-1", None),
            &creds(Some("FwoGZXIvYXdzEXAMPLE")),
            "us-east-1",
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(req.headers()["x-amz-security-token"], "FwoGZXIvYXdzEXAMPLE");
        assert_eq!(req.headers()["host"], "ec2.us-east-1.amazonaws.com");
        assert!(req.headers()["authorization"]
            .to_str()
            .unwrap()
            .contains("x-amz-security-token"));
    }
}
