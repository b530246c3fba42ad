//! PROXY protocol v1/v2 headers from trusted load balancers: framing is read
//! here (never a byte past the header), parsing is done by the `ppp` crate.

use std::net::IpAddr;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The longest v1 header (the protocol's own limit).
const V1_MAX: usize = 107;
/// v2: a 16-byte preamble and at most this many bytes of addresses and TLVs.
const V2_MAX_BODY: usize = 2048;
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// What a header says about the connection's origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client's address as the balancer saw it.
    Client(IpAddr),
    /// v2 LOCAL (a balancer's own health check) or v1 UNKNOWN: the protocol
    /// says to use the real connection endpoints.
    Local,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("the connection does not start with a PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    #[error("the PROXY protocol header is too long")]
    TooLong,
    #[error("the connection closed inside the PROXY protocol header")]
    Truncated,
}

/// Parses one complete header (exactly its bytes).
pub fn parse(header: &[u8]) -> Result<Origin, HeaderError> {
    use ppp::{v1, v2, HeaderResult};
    match HeaderResult::parse(header) {
        HeaderResult::V1(Ok(h)) => Ok(match h.addresses {
            v1::Addresses::Tcp4(a) => Origin::Client(IpAddr::V4(a.source_address)),
            v1::Addresses::Tcp6(a) => Origin::Client(IpAddr::V6(a.source_address)),
            v1::Addresses::Unknown => Origin::Local,
        }),
        HeaderResult::V2(Ok(h)) => match (h.command, h.addresses) {
            (v2::Command::Local, _) => Ok(Origin::Local),
            (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                Ok(Origin::Client(IpAddr::V4(a.source_address)))
            }
            (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                Ok(Origin::Client(IpAddr::V6(a.source_address)))
            }
            (v2::Command::Proxy, other) => Err(HeaderError::Malformed(format!(
                "address family {:?} cannot be admitted by IP rules",
                other.address_family()
            ))),
        },
        HeaderResult::V1(Err(e)) => Err(HeaderError::Malformed(e.to_string())),
        HeaderResult::V2(Err(e)) => Err(HeaderError::Malformed(e.to_string())),
    }
}

/// How the first bytes of a connection relate to a PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    /// A complete v1 or v2 signature.
    Header,
    /// Could still become one with more bytes.
    Undecided,
    /// Cannot be a header.
    NotHeader,
}

/// Classifies a connection's first bytes (at most 12 are looked at).
pub fn prefix(bytes: &[u8]) -> Prefix {
    for sig in [b"PROXY " as &[u8], V2_SIGNATURE] {
        let n = bytes.len().min(sig.len());
        if bytes[..n] == sig[..n] {
            return if n == sig.len() {
                Prefix::Header
            } else {
                Prefix::Undecided
            };
        }
    }
    Prefix::NotHeader
}

/// Reads exactly one header from the stream; the bytes after it stay unread.
pub async fn read(stream: &mut TcpStream) -> Result<Origin, HeaderError> {
    let mut first = [0u8; 1];
    read_exact(stream, &mut first).await?;
    match first[0] {
        b'\r' => {
            let mut buf = vec![0u8; 16];
            buf[0] = b'\r';
            read_exact(stream, &mut buf[1..]).await?;
            if &buf[..12] != V2_SIGNATURE {
                return Err(HeaderError::Missing);
            }
            let body = u16::from_be_bytes([buf[14], buf[15]]) as usize;
            if body > V2_MAX_BODY {
                return Err(HeaderError::TooLong);
            }
            buf.resize(16 + body, 0);
            read_exact(stream, &mut buf[16..]).await?;
            parse(&buf)
        }
        b'P' => {
            let mut buf = Vec::with_capacity(V1_MAX);
            buf.push(b'P');
            let mut peeked = [0u8; V1_MAX];
            loop {
                if prefix(&buf) == Prefix::NotHeader {
                    return Err(HeaderError::Missing);
                }
                let room = V1_MAX - buf.len();
                if room == 0 {
                    return Err(HeaderError::TooLong);
                }
                let n = stream
                    .peek(&mut peeked[..room])
                    .await
                    .map_err(|_| HeaderError::Truncated)?;
                if n == 0 {
                    return Err(HeaderError::Truncated);
                }
                // Take bytes up to and including the first '\n', or all of them.
                let take = peeked[..n]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(n, |i| i + 1);
                let start = buf.len();
                buf.resize(start + take, 0);
                read_exact(stream, &mut buf[start..]).await?;
                if buf.ends_with(b"\n") {
                    return parse(&buf);
                }
            }
        }
        _ => Err(HeaderError::Missing),
    }
}

async fn read_exact(stream: &mut TcpStream, buf: &mut [u8]) -> Result<(), HeaderError> {
    stream
        .read_exact(buf)
        .await
        .map(drop)
        .map_err(|_| HeaderError::Truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2() {
        assert_eq!(
            parse(b"PROXY TCP4 192.0.2.1 198.51.100.1 5555 27017\r\n"),
            Ok(Origin::Client("192.0.2.1".parse().unwrap()))
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok(Origin::Local));
        assert!(matches!(
            parse(b"PROXY TCP4 300.0.2.1 1.1.1.1 1 2\r\n"),
            Err(HeaderError::Malformed(_))
        ));
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[
            0x21, 0x11, 0, 12, 192, 0, 2, 9, 10, 0, 0, 1, 0x15, 0xb3, 0x69, 0x89,
        ]);
        assert_eq!(parse(&v2), Ok(Origin::Client("192.0.2.9".parse().unwrap())));
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local), Ok(Origin::Local));
    }

    #[test]
    fn prefixes() {
        assert_eq!(prefix(b"PRO"), Prefix::Undecided);
        assert_eq!(prefix(b"PROXY "), Prefix::Header);
        assert_eq!(prefix(b"\r\n\r\n\0\r\nQUIT\nxx"), Prefix::Header);
        assert_eq!(prefix(&[0x16, 3, 1]), Prefix::NotHeader);
        assert_eq!(prefix(b""), Prefix::Undecided);
    }
}
