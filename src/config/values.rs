//! Parsers for the scalar values of the config: CIDRs, durations, timestamps,
//! AWS ids and names. Each returns a message that says what to write instead.

use ipnet::{IpNet, Ipv4Net};
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

/// A CIDR range or a bare address (a /32 or /128). Host bits are an error;
/// IPv4-mapped IPv6 ranges become IPv4 ranges, as peers do.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let t = text.trim();
    let net = if t.contains('/') {
        t.parse::<IpNet>().map_err(|_| bad_cidr(text))?
    } else {
        IpNet::from(t.parse::<IpAddr>().map_err(|_| bad_cidr(text))?)
    };
    if net.trunc() != net {
        return Err(format!(
            "\"{text}\" has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(unmap(net))
}

fn bad_cidr(text: &str) -> String {
    format!(
        "\"{text}\" is not a CIDR range or an address; write it like \"10.0.0.0/16\", \"203.0.113.7\" or \"2001:db8::/32\""
    )
}

fn unmap(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if let (Some(v4), true) = (v6.network().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            if let Ok(n) = Ipv4Net::new(v4, v6.prefix_len() - 96) {
                return IpNet::V4(n);
            }
        }
    }
    net
}

/// Whether a range admits every address of its family. Ranges come from
/// [`parse_cidr`], so `::ffff:0.0.0.0/96` is already `0.0.0.0/0` here.
pub fn is_whole_internet(net: &IpNet) -> bool {
    net.prefix_len() == 0
}

/// The range as written, and what it means when that differs (a mapped
/// `::ffff:0.0.0.0/96` is `0.0.0.0/0`).
pub fn written(text: &str, net: &IpNet) -> String {
    if text.trim() == net.to_string() {
        net.to_string()
    } else {
        format!("\"{}\" ({net})", text.trim())
    }
}

/// The longest duration any setting takes (so deadlines cannot overflow).
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// `"30s"`, `"5m"`, `"1h30m"`, `"0s"`.
pub fn parse_duration(key: &str, text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        format!("{key} = \"{text}\" is not a duration ({e}); write a number with a unit, like \"5s\", \"30m\" or \"1h\"")
    })?;
    if d > MAX_DURATION {
        return Err(format!(
            "{key} = \"{text}\" is too long; durations go up to 365 days"
        ));
    }
    Ok(d)
}

/// An RFC 3339 instant: a string, or a TOML offset date-time.
pub fn parse_expires(value: &toml::Value) -> Result<SystemTime, String> {
    let text = match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Datetime(d) => d.to_string(),
        other => {
            return Err(format!(
                "expires must be an RFC 3339 timestamp like \"2026-12-31T00:00:00Z\", not a {}",
                other.type_str()
            ))
        }
    };
    let t = time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| {
            format!("expires = \"{text}\" is not an RFC 3339 timestamp; write it with a date, a time and an offset, like \"2026-12-31T00:00:00Z\"")
        })?;
    let secs = t.unix_timestamp();
    let since_epoch = Duration::new(secs.unsigned_abs(), t.nanosecond());
    let instant = if secs >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(since_epoch)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    instant.ok_or_else(|| format!("expires = \"{text}\" is out of range"))
}

/// An AWS account id: exactly 12 digits.
pub fn check_account(text: &str) -> Result<(), String> {
    if text.len() == 12 && text.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(format!(
            "aws_account \"{text}\" is not an AWS account id; it must be exactly 12 digits, like \"123456789012\""
        ))
    }
}

/// A security group id: `sg-` and 8 or 17 lowercase hex digits.
pub fn check_group_id(text: &str) -> Result<(), String> {
    let ok = text.strip_prefix("sg-").is_some_and(|hex| {
        (hex.len() == 8 || hex.len() == 17)
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "security group \"{text}\" is not a security group id; it must be \"sg-\" and 8 or 17 lowercase hex digits, like \"sg-0a1b2c3d\""
        ))
    }
}

/// A deployment name: letters, digits, '-' and '_'.
pub fn check_name(text: &str) -> Result<(), String> {
    if !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(())
    } else {
        Err(format!(
            "deployment name \"{text}\" may only use letters, digits, '-' and '_'"
        ))
    }
}

/// `host:port` of the upstream: an IP or a DNS name, and a port.
pub fn check_upstream(text: &str) -> Result<(), String> {
    if let Ok(addr) = text.parse::<std::net::SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!(
                "upstream \"{text}\" has port 0, which nothing listens on; give mongod's port, like \"{}\"",
                std::net::SocketAddr::new(addr.ip(), 27018)
            ));
        }
        return Ok(());
    }
    let ok = text.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && port.parse::<u16>().is_ok_and(|p| p != 0)
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "upstream \"{text}\" is not host:port; write it like \"127.0.0.1:27018\" or \"[::1]:27018\""
        ))
    }
}

/// A TLS server name as it appears in SNI: lowercased, without a final dot.
pub fn normalise_server_name(text: &str) -> Result<String, String> {
    let name = text.trim_end_matches('.').to_ascii_lowercase();
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(name)
    } else {
        Err(format!(
            "server name \"{text}\" is not a DNS name; write it like \"orders.db.example.com\""
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("10.0.0.0/16").unwrap().to_string(),
            "10.0.0.0/16"
        );
        assert_eq!(
            parse_cidr("203.0.113.7").unwrap().to_string(),
            "203.0.113.7/32"
        );
        assert_eq!(
            parse_cidr("2001:db8::1").unwrap().to_string(),
            "2001:db8::1/128"
        );
        assert_eq!(
            parse_cidr("::ffff:10.0.0.0/104").unwrap().to_string(),
            "10.0.0.0/8"
        );
        let e = parse_cidr("10.0.0.1/16").unwrap_err();
        assert!(
            e.contains("host bits set; did you mean 10.0.0.0/16?"),
            "{e}"
        );
        assert!(parse_cidr("10.0.0.300/8").is_err());
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("").is_err());
    }

    #[test]
    fn whole_internet() {
        for t in ["0.0.0.0/0", "::/0", "::ffff:0.0.0.0/96"] {
            assert!(is_whole_internet(&parse_cidr(t).unwrap()), "{t}");
        }
        for t in ["0.0.0.0/1", "::/1", "::ffff:0.0.0.0/97", "128.0.0.0/1"] {
            assert!(!is_whole_internet(&parse_cidr(t).unwrap()), "{t}");
        }
        let n = parse_cidr("::ffff:0.0.0.0/96").unwrap();
        assert_eq!(
            written("::ffff:0.0.0.0/96", &n),
            "\"::ffff:0.0.0.0/96\" (0.0.0.0/0)"
        );
        assert_eq!(written("::/0", &parse_cidr("::/0").unwrap()), "::/0");
    }

    #[test]
    fn ids_and_names() {
        assert!(check_account("123456789012").is_ok());
        assert!(check_account("12345678901").is_err());
        assert!(check_group_id("sg-0a1b2c3d").is_ok());
        assert!(check_group_id("sg-0123456789abcdef0").is_ok());
        assert!(check_group_id("sg-0A1B2C3D").is_err());
        assert!(check_group_id("sg-0a1b2c3").is_err());
        assert!(check_name("orders_v2-x").is_ok());
        assert!(check_name("or ders").is_err());
        assert!(check_upstream("127.0.0.1:27018").is_ok());
        assert!(check_upstream("[::1]:27018").is_ok());
        assert!(check_upstream("mongo.internal:27018").is_ok());
        assert!(check_upstream("mongo.internal").is_err());
        assert!(check_upstream("mongo.internal:0").is_err());
        let e = check_upstream("127.0.0.1:0").unwrap_err();
        assert!(e.contains("port 0") && e.contains("127.0.0.1:27018"), "{e}");
        let e = check_upstream("[::1]:0").unwrap_err();
        assert!(e.contains("[::1]:27018"), "{e}");
    }

    #[test]
    fn times() {
        assert!(parse_duration("d", "30s").is_ok());
        assert_eq!(parse_duration("d", "0s").unwrap(), Duration::ZERO);
        assert!(parse_duration("d", "soon").is_err());
        let v = toml::Value::String("2026-12-31T00:00:00Z".into());
        assert!(parse_expires(&v).is_ok());
        let v = toml::Value::String("2026-12-31".into());
        assert!(parse_expires(&v).is_err());
        let far = parse_expires(&toml::Value::String("2600-01-01T00:00:00Z".into())).unwrap();
        assert!(far > SystemTime::UNIX_EPOCH + Duration::from_secs(19_000_000_000));
        assert!(parse_duration("d", "400days").is_err());
    }
}
