//! EC2's XML answers to `DescribeNetworkInterfaces`: the addresses of a page
//! and its `nextToken`, or the error an EC2 error document names.

use std::net::IpAddr;

/// One page of `DescribeNetworkInterfaces`.
#[derive(Debug, Default, PartialEq)]
pub struct Page {
    /// Every private IPv4 (primary and secondary) and IPv6 address of every
    /// interface of the page, in document order (duplicates included).
    pub addresses: Vec<IpAddr>,
    /// The token of the next page; `None` on the last page.
    pub next_token: Option<String>,
}

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

fn items<'a, 'i>(
    node: roxmltree::Node<'a, 'i>,
    set: &str,
) -> impl Iterator<Item = roxmltree::Node<'a, 'i>> {
    child(node, set)
        .into_iter()
        .flat_map(|s| s.children())
        .filter(|c| c.is_element() && c.tag_name().name() == "item")
}

fn text<'a>(node: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    child(node, name)
        .and_then(|c| c.text())
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Parses a successful answer. An address that does not parse is skipped
/// with a warning (EC2 never sends one); a document that is not a
/// `DescribeNetworkInterfacesResponse` is an error.
pub fn parse_page(xml: &str) -> Result<Page, String> {
    let doc =
        roxmltree::Document::parse(xml).map_err(|e| format!("EC2 answered malformed XML: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "DescribeNetworkInterfacesResponse" {
        return Err(match error_of(&doc) {
            Some(e) => e,
            None => format!(
                "EC2 answered <{}> where <DescribeNetworkInterfacesResponse> was expected",
                root.tag_name().name()
            ),
        });
    }
    let mut page = Page {
        next_token: text(root, "nextToken").map(str::to_string),
        ..Page::default()
    };
    let mut push = |s: Option<&str>| {
        let Some(s) = s else { return };
        match s.parse::<IpAddr>() {
            Ok(ip) => page.addresses.push(ip),
            Err(_) => tracing::warn!(
                address = s,
                "EC2 listed an address that is not an IP address; skipped"
            ),
        }
    };
    for ni in items(root, "networkInterfaceSet") {
        push(text(ni, "privateIpAddress"));
        for a in items(ni, "privateIpAddressesSet") {
            push(text(a, "privateIpAddress"));
        }
        for a in items(ni, "ipv6AddressesSet") {
            push(text(a, "ipv6Address"));
        }
    }
    Ok(page)
}

fn error_of(doc: &roxmltree::Document) -> Option<String> {
    let e = doc
        .descendants()
        .find(|n| n.is_element() && n.tag_name().name() == "Error")?;
    let code = text(e, "Code").unwrap_or("UnknownError");
    let mut out = code.to_string();
    if let Some(m) = text(e, "Message") {
        out = format!("{out}: {m}");
    }
    let id = doc
        .descendants()
        .find(|n| n.is_element() && matches!(n.tag_name().name(), "RequestID" | "RequestId"))
        .and_then(|n| n.text());
    if let Some(id) = id {
        out = format!("{out} (request {})", id.trim());
    }
    Some(out)
}

/// What a failed answer (HTTP status not 2xx) says: its EC2 error code and
/// message when the body is an EC2 error document, else the start of the body.
/// The error code alone is returned too, for retry decisions.
pub fn parse_error(status: u16, body: &str) -> (Option<String>, String) {
    let parsed = roxmltree::Document::parse(body).ok();
    if let Some(doc) = &parsed {
        if let Some(e) = error_of(doc) {
            let code = doc
                .descendants()
                .find(|n| n.is_element() && n.tag_name().name() == "Code")
                .and_then(|n| n.text())
                .map(|c| c.trim().to_string());
            return (code, format!("EC2 answered HTTP {status}: {e}"));
        }
    }
    let snippet: String = body.chars().take(200).collect();
    (
        None,
        format!("EC2 answered HTTP {status}: {}", snippet.trim()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of a real answer (trimmed from the EC2 API reference), with
    /// nested `item`s whose addresses must not be mistaken for the interface's.
    const PAGE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeNetworkInterfacesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>fc45294c-006b-457b-bab9-012f5b3b0e40</requestId>
  <networkInterfaceSet>
    <item>
      <networkInterfaceId>eni-0f7db8e9aa8b1a7a2</networkInterfaceId>
      <privateIpAddress>10.0.1.17</privateIpAddress>
      <association><publicIp>203.0.113.12</publicIp><ipOwnerId>amazon</ipOwnerId></association>
      <groupSet><item><groupId>sg-0a1b2c3d</groupId><groupName>web</groupName></item></groupSet>
      <privateIpAddressesSet>
        <item><privateIpAddress>10.0.1.17</privateIpAddress><primary>true</primary>
          <association><publicIp>203.0.113.12</publicIp></association></item>
        <item><privateIpAddress>10.0.1.30</privateIpAddress><primary>false</primary></item>
      </privateIpAddressesSet>
      <ipv6AddressesSet><item><ipv6Address>2001:db8:1234:1a00::123</ipv6Address></item></ipv6AddressesSet>
      <tagSet/>
    </item>
    <item>
      <networkInterfaceId>eni-0a1b2c3d4e5f60718</networkInterfaceId>
      <privateIpAddress>10.0.2.5</privateIpAddress>
      <privateIpAddressesSet/>
      <ipv6AddressesSet/>
    </item>
  </networkInterfaceSet>
  <nextToken>eyJ2IjoiMiIsImMiOiJ0b2tlbiJ9+/=</nextToken>
</DescribeNetworkInterfacesResponse>"#;

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn page_lists_every_private_and_ipv6_address_and_the_next_token() {
        let page = parse_page(PAGE).unwrap();
        assert_eq!(
            page.addresses,
            ips(&[
                "10.0.1.17",
                "10.0.1.17",
                "10.0.1.30",
                "2001:db8:1234:1a00::123",
                "10.0.2.5"
            ])
        );
        assert_eq!(
            page.next_token.as_deref(),
            Some("eyJ2IjoiMiIsImMiOiJ0b2tlbiJ9+/=")
        );
    }

    #[test]
    fn last_and_empty_pages() {
        let last = PAGE.replace(
            "<nextToken>eyJ2IjoiMiIsImMiOiJ0b2tlbiJ9+/=</nextToken>",
            "<nextToken/>",
        );
        assert_eq!(parse_page(&last).unwrap().next_token, None);
        let empty = r#"<DescribeNetworkInterfacesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
            <requestId>x</requestId><networkInterfaceSet/></DescribeNetworkInterfacesResponse>"#;
        assert_eq!(parse_page(empty).unwrap(), Page::default());
    }

    #[test]
    fn moto_shaped_page_without_namespace_prefix_issues() {
        // moto answers without the secondary sets when there are none
        let xml = "<DescribeNetworkInterfacesResponse><networkInterfaceSet><item>\
                   <privateIpAddress>127.0.10.5</privateIpAddress></item></networkInterfaceSet>\
                   </DescribeNetworkInterfacesResponse>";
        assert_eq!(parse_page(xml).unwrap().addresses, ips(&["127.0.10.5"]));
    }

    #[test]
    fn an_unparsable_address_is_skipped() {
        let xml = "<DescribeNetworkInterfacesResponse><networkInterfaceSet><item>\
                   <privateIpAddress>not-an-ip</privateIpAddress><ipv6AddressesSet><item>\
                   <ipv6Address>::1</ipv6Address></item></ipv6AddressesSet></item>\
                   </networkInterfaceSet></DescribeNetworkInterfacesResponse>";
        assert_eq!(parse_page(xml).unwrap().addresses, ips(&["::1"]));
    }

    #[test]
    fn malformed_or_unexpected_documents_are_errors() {
        let e = parse_page("<DescribeNetworkInterfacesResponse><networkInterfaceSet>").unwrap_err();
        assert!(e.contains("malformed XML"), "{e}");
        let e = parse_page("<DescribeVpcsResponse/>").unwrap_err();
        assert!(e.contains("<DescribeVpcsResponse>"), "{e}");
        let e = parse_page("").unwrap_err();
        assert!(e.contains("malformed XML"), "{e}");
    }

    #[test]
    fn error_documents_name_code_message_and_request() {
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error>\
                    <Code>UnauthorizedOperation</Code><Message>You are not authorized to perform this operation.</Message>\
                    </Error></Errors><RequestID>7a62c49f-347e-4fc4-9331-6e8eEXAMPLE</RequestID></Response>";
        let (code, msg) = parse_error(403, body);
        assert_eq!(code.as_deref(), Some("UnauthorizedOperation"));
        assert_eq!(msg, "EC2 answered HTTP 403: UnauthorizedOperation: You are not authorized to perform this operation. (request 7a62c49f-347e-4fc4-9331-6e8eEXAMPLE)");
        // an error document answered with 200 is still an error
        assert!(parse_page(body)
            .unwrap_err()
            .starts_with("UnauthorizedOperation"));
        let (code, msg) = parse_error(502, "<html>Bad Gateway</html>");
        assert_eq!(code, None);
        assert_eq!(msg, "EC2 answered HTTP 502: <html>Bad Gateway</html>");
    }
}
