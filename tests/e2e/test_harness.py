"""Self-tests of the test harness (moatlib), without moat: if these fail, the
end-to-end results mean nothing."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading

import pytest
from moatlib import (CertAuthority, EchoServer, MongoUpstream, assert_echoes, assert_refused, connect_from,
                     metric, metric_sum, parse_prometheus, recv_until_eof)


def test_parse_prometheus():
    text = """\
# HELP moat_connections_total Connections by outcome.
# TYPE moat_connections_total counter
moat_connections_total{deployment="orders",outcome="allowed"} 3
moat_connections_total{deployment="orders",outcome="denied"} 2
moat_connections_total{deployment="billing",outcome="denied"} 1.5e1
moat_config_last_reload_successful 1
moat_tls_handshake_seconds_bucket{deployment="orders",le="+Inf"} 4
weird{a="x\\"y",b="1,2"} 7 1700000000000
"""
    m = parse_prometheus(text)
    assert metric(m, "moat_connections_total", deployment="orders", outcome="allowed") == 3
    assert metric_sum(m, "moat_connections_total", outcome="denied") == 17
    assert metric(m, "moat_config_last_reload_successful") == 1
    assert metric(m, "moat_tls_handshake_seconds_bucket", deployment="orders", le="+Inf") == 4
    assert metric(m, "weird", a='x"y', b="1,2") == 7
    assert metric(m, "absent", default=-1) == -1


def test_echo_records_peers_and_bytes(echo):
    assert_echoes(echo.port, "127.0.0.2", b"hello")
    assert_echoes(echo.port, "127.0.0.3", b"world")
    echo.wait_connections(2)
    assert sorted(p[0] for p in echo.peers) == ["127.0.0.2", "127.0.0.3"]
    assert sorted([b"hello", b"world"]) == sorted(bytes(c.received) for c in echo.conns)


def test_echo_hold_until_eof(echo_factory):
    e = echo_factory(hold_until_eof=True)
    with connect_from("127.0.0.4", e.port) as s:
        s.sendall(b"half")
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s) == b"half"


def test_assert_refused_detects_a_listening_upstream(echo):
    with pytest.raises(AssertionError):
        assert_refused(echo.port, "127.0.0.5", upstream=echo)


def test_assert_refused_accepts_a_reset_and_an_untouched_upstream(echo):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def reject():
        c, _ = srv.accept()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        c.close()
    t = threading.Thread(target=reject)
    t.start()
    try:
        assert assert_refused(srv.getsockname()[1], "127.0.0.6", upstream=echo) in ("reset", "closed")
    finally:
        t.join()
        srv.close()


def test_mongo_upstream_with_pymongo():
    pymongo = pytest.importorskip("pymongo")
    with MongoUpstream() as m:
        with pymongo.MongoClient(m.host, m.port, directConnection=True, serverSelectionTimeoutMS=3000) as c:
            assert c.admin.command("ping")["ok"] == 1
            c.db.things.insert_many([{"n": 1}, {"n": 2}])
            assert [d["n"] for d in c.db.things.find()] == [1, 2]
            assert c.server_info()["version"]
        assert m.connection_count >= 1
        assert {"ping", "insert", "find"} <= set(m.commands)


def test_cert_authority_issues_working_certs(tmp_path):
    ca = CertAuthority(tmp_path)
    srv = ca.issue("srv", ["orders.db.test", "127.0.0.1"])
    cli = ca.issue("cli", [], client=True, cn="app")
    now = dt.datetime.now(dt.timezone.utc)
    old = ca.issue("old", not_after=now - dt.timedelta(days=1))
    assert old.cert.not_valid_after_utc < now
    assert (srv.key_path.stat().st_mode & 0o777) == 0o600

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(srv.cert_path), str(srv.key_path))
    server_ctx.load_verify_locations(str(ca.cert_path))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    client_ctx.load_cert_chain(str(cli.cert_path), str(cli.key_path))

    lsock = socket.create_server(("127.0.0.1", 0))
    peer_cn = []

    def serve():
        c, _ = lsock.accept()
        with server_ctx.wrap_socket(c, server_side=True) as tls:
            peer_cn.append(dict(x[0] for x in tls.getpeercert()["subject"])["commonName"])
            tls.sendall(b"ok")
    t = threading.Thread(target=serve)
    t.start()
    with socket.create_connection(lsock.getsockname()) as raw:
        with client_ctx.wrap_socket(raw, server_hostname="orders.db.test") as tls:
            assert tls.recv(2) == b"ok"
    t.join()
    lsock.close()
    assert peer_cn == ["app"]


def test_second_ca_is_not_trusted(tmp_path):
    ca, other = CertAuthority(tmp_path, "ca"), CertAuthority(tmp_path, "other")
    srv = other.issue("srv", ["localhost"])
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(srv.cert_path), str(srv.key_path))
    lsock = socket.create_server(("127.0.0.1", 0))

    def serve():
        c, _ = lsock.accept()
        try:
            server_ctx.wrap_socket(c, server_side=True).close()
        except (ssl.SSLError, OSError):
            c.close()
    t = threading.Thread(target=serve)
    t.start()
    with socket.create_connection(lsock.getsockname()) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(raw, server_hostname="localhost")
    t.join()
    lsock.close()


def test_ipv6_echo(need_ipv6):
    with EchoServer("::1") as e:
        assert_echoes(e.port, "::1", b"six")
        assert e.peers[0][0] == "::1"
