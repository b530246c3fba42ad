//! The first-bytes classifier: tells a TLS ClientHello from a PROXY header
//! from anything else (plaintext MongoDB), and reads the SNI name of a
//! ClientHello. Pure functions over bytes, shared by the data path and fuzzing.

use crate::data::proxy_header::{self, Prefix};

/// What a connection's first bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstBytes {
    /// A TLS handshake record (content type 22, version major 3).
    Tls,
    /// A PROXY protocol v1 or v2 signature.
    ProxyHeader,
    /// Anything else: plaintext for the upstream.
    Plaintext,
    /// Too few bytes to tell yet.
    Undecided,
}

/// TLS record content type of a handshake.
const HANDSHAKE: u8 = 0x16;

pub fn classify(bytes: &[u8]) -> FirstBytes {
    match proxy_header::prefix(bytes) {
        Prefix::Header => return FirstBytes::ProxyHeader,
        Prefix::Undecided if !bytes.is_empty() => return FirstBytes::Undecided,
        _ => {}
    }
    // A record header: type 22, version 3.x with x in 1..=4 (a MongoDB
    // message of 790 + 65536·k bytes starts 0x16 0x03 0x00 or 0x16 0x03 ≥5).
    match bytes {
        [] | [HANDSHAKE] | [HANDSHAKE, 3] => FirstBytes::Undecided,
        [HANDSHAKE, 3, 1..=4, ..] => FirstBytes::Tls,
        _ => FirstBytes::Plaintext,
    }
}

/// The SNI name of the ClientHello at the start of `bytes`: `Ok(None)` when
/// it has none, `Err` when the bytes are not a (complete) ClientHello.
pub fn sni(bytes: &[u8]) -> Result<Option<String>, String> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut reader = bytes;
    acceptor.read_tls(&mut reader).map_err(|e| e.to_string())?;
    match acceptor.accept() {
        Ok(Some(accepted)) => Ok(accepted.client_hello().server_name().map(str::to_owned)),
        Ok(None) => Err("incomplete ClientHello".into()),
        Err((e, _)) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        assert_eq!(classify(&[0x16, 3, 1, 0, 5]), FirstBytes::Tls);
        assert_eq!(classify(&[0x16]), FirstBytes::Undecided);
        assert_eq!(classify(&[0x16, 3]), FirstBytes::Undecided);
        // A 790-byte MongoDB message is not a TLS record.
        assert_eq!(classify(&[0x16, 3, 0, 0, 0xdd, 7]), FirstBytes::Plaintext);
        assert_eq!(classify(b"PROXY TCP4 "), FirstBytes::ProxyHeader);
        assert_eq!(classify(b"PRO"), FirstBytes::Undecided);
        // A MongoDB message starts with its little-endian length.
        assert_eq!(classify(&[0x3f, 0, 0, 0, 1, 2]), FirstBytes::Plaintext);
        assert_eq!(classify(b""), FirstBytes::Undecided);
        assert!(sni(b"garbage").is_err());
    }

    #[test]
    fn reads_sni_of_a_real_client_hello() {
        // Captured from Python's ssl module (the fuzz seed of first_bytes).
        let hello = include_bytes!("../../fuzz/corpus/first_bytes/client_hello_sni");
        assert_eq!(classify(hello), FirstBytes::Tls);
        assert_eq!(
            sni(hello).unwrap().as_deref(),
            Some("orders.db.example.com")
        );
        assert!(sni(&hello[..hello.len() / 2]).is_err());
    }
}
