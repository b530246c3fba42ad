//! PROXY protocol v1/v2 headers from trusted load balancers: framing is read
//! here (never a byte past the header), parsing is done by the `ppp` crate.

use std::net::IpAddr;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The longest v1 header (the protocol's own limit).
const V1_MAX: usize = 107;
/// v2: a 16-byte preamble and at most this many bytes of addresses and
/// TLVs (the protocol's own limit: the length field is 16 bits).
const V2_MAX_BODY: usize = u16::MAX as usize;
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
            _ if !tlvs_fit(header) => Err(HeaderError::Malformed(
                "a TLV runs past the end of the header".into(),
            )),
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

/// Whether the TLVs after a v2 header's addresses end exactly at the end of
/// the header (each is a type byte, a 16-bit length and that many bytes).
fn tlvs_fit(header: &[u8]) -> bool {
    let Some(&family) = header.get(13) else {
        return false;
    };
    let addresses = match family >> 4 {
        0x1 => 12,
        0x2 => 36,
        0x3 => 216,
        _ => 0,
    };
    let mut rest = match header.get(16 + addresses..) {
        Some(r) => r,
        None => return false,
    };
    while !rest.is_empty() {
        let [_, hi, lo, ..] = *rest else {
            return false;
        };
        let end = 3 + u16::from_be_bytes([hi, lo]) as usize;
        match rest.get(end..) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    true
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

    fn v2_with(tlvs: &[u8]) -> Vec<u8> {
        let mut v2 = V2_SIGNATURE.to_vec();
        let len = (12 + tlvs.len()) as u16;
        v2.extend_from_slice(&[0x21, 0x11]);
        v2.extend_from_slice(&len.to_be_bytes());
        v2.extend_from_slice(&[192, 0, 2, 9, 10, 0, 0, 1, 0x15, 0xb3, 0x69, 0x89]);
        v2.extend_from_slice(tlvs);
        v2
    }

    #[test]
    fn v2_tlvs_must_end_with_the_header() {
        let ok = v2_with(&[0x04, 0, 2, b'h', b'i']);
        assert_eq!(parse(&ok), Ok(Origin::Client("192.0.2.9".parse().unwrap())));
        // Announces 9 bytes of value, carries 2.
        let past = v2_with(&[0x04, 0, 9, b'h', b'i']);
        assert!(matches!(parse(&past), Err(HeaderError::Malformed(_))));
        // A dangling partial TLV header.
        let partial = v2_with(&[0x04, 0]);
        assert!(matches!(parse(&partial), Err(HeaderError::Malformed(_))));
    }

    #[tokio::test]
    async fn v2_headers_up_to_the_protocols_maximum_are_read() {
        let value = vec![b'x'; u16::MAX as usize - 12 - 3];
        let mut tlv = vec![0xe0];
        tlv.extend_from_slice(&(value.len() as u16).to_be_bytes());
        tlv.extend_from_slice(&value);
        let header = v2_with(&tlv);
        assert_eq!(header.len(), 16 + 65_535);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let writer = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut c, &header)
                .await
                .unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut c, b"after")
                .await
                .unwrap();
            c
        });
        let (mut s, _) = listener.accept().await.unwrap();
        assert_eq!(
            read(&mut s).await,
            Ok(Origin::Client("192.0.2.9".parse().unwrap()))
        );
        let _c = writer.await.unwrap();
        let mut rest = [0u8; 5];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"after", "not a byte past the header is consumed");
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
