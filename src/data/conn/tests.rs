//! Unit tests of set-up: task size, and the stage errors' outcomes.

use super::*;

/// Every connection's task is as large as this future for its whole
/// life: keep the long-lived (forwarding) state small. Setup and TLS
/// state live in their own boxes.
#[tokio::test]
async fn a_connection_task_stays_small() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let now = std::time::SystemTime::now();
    let config = crate::config::load(std::path::Path::new("config/moat.toml"), now).unwrap();
    let snap = crate::policy::snapshot::Snapshot::compile(
        Arc::new(config),
        Default::default(),
        Default::default(),
        now,
    );
    let shared = crate::data::state::Shared::new(crate::data::state::Live::build(snap, &[]));
    let size = std::mem::size_of_val(&serve(shared, stream, addr, addr));
    assert!(
        size <= 3 * 1024,
        "a connection's task state grew to {size} bytes"
    );
}

#[test]
fn a_deadline_is_charged_to_the_stage_it_passed_in() {
    let outcome = |e: SetupError| e.outcome();
    let proxy = Some(Outcome::ProxyProtocolError);
    let tls = Some(Outcome::TlsError);
    assert_eq!(outcome(Stage::ProxyHeader.timed_out()), proxy);
    assert_eq!(outcome(Stage::PeerFirstBytes.timed_out()), proxy);
    assert_eq!(outcome(Stage::FirstBytes.timed_out()), tls);
    assert_eq!(outcome(Stage::Tls.timed_out()), tls);
    // A trusted peer owes a header and a TLS port a handshake; on an
    // allow-mode port, or from an untrusted peer, closing first is no failure.
    assert_eq!(outcome(Stage::ProxyHeader.closed(0)), proxy);
    assert_eq!(outcome(Stage::Tls.closed(0)), tls);
    assert_eq!(outcome(Stage::FirstBytes.closed(0)), None);
    assert_eq!(outcome(Stage::PeerFirstBytes.closed(0)), None);
    // Some bytes, then nothing: a cut-off header or ClientHello is a failure.
    assert_eq!(outcome(Stage::FirstBytes.closed(2)), tls);
    assert_eq!(outcome(Stage::PeerFirstBytes.closed(4)), proxy);
    for s in [
        Stage::Admission,
        Stage::ProxyHeader,
        Stage::FirstBytes,
        Stage::Tls,
        Stage::PeerFirstBytes,
    ] {
        let cell = StageCell::new(Stage::Admission);
        cell.set(s);
        assert_eq!(cell.get(), s);
    }
}

/// The first bytes are read as they come, with no polling: a client that
/// sends one ambiguous byte and then leaves ends the wait at once.
#[tokio::test]
async fn first_bytes_wait_ends_when_the_client_leaves() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut server, _) = listener.accept().await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut client, &[0x16])
        .await
        .unwrap();
    let mut buf = Vec::new();
    let reader = read_first(&mut server, &mut buf, Stage::FirstBytes, |b| {
        classify(b) != FirstBytes::Undecided
    });
    let closer = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(client);
    };
    let (r, ()) = tokio::time::timeout(Duration::from_secs(5), async {
        tokio::join!(reader, closer)
    })
    .await
    .expect("the wait ends when the client leaves");
    // One byte sent, then gone: a cut-off handshake, counted.
    assert_eq!(r, Err(Stage::FirstBytes.closed(1)));
    assert_eq!(r.unwrap_err().outcome(), Some(Outcome::TlsError));
    assert_eq!(buf, [0x16]);
}

#[tokio::test]
async fn first_bytes_are_read_until_decided() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut server, _) = listener.accept().await.unwrap();
    let writer = async {
        for b in [b"PR" as &[u8], b"OX", b"Y TCP4"] {
            tokio::io::AsyncWriteExt::write_all(&mut client, b)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let mut buf = Vec::new();
    let reader = read_first(&mut server, &mut buf, Stage::ProxyHeader, |b| {
        proxy_header::prefix(b) != Prefix::Undecided
    });
    let (r, ()) = tokio::join!(reader, writer);
    r.unwrap();
    assert_eq!(proxy_header::prefix(&buf), Prefix::Header);
    assert!(buf.len() <= FIRST_BYTES);
}
