"""A real MongoDB driver (pymongo) talks through moat to a wire-protocol
upstream (mockupdb, see moatlib.MongoUpstream): plaintext, TLS, mTLS, allow
mode, IPv6, and a refused source (SPEC 3.1-3.3)."""

from __future__ import annotations

import pytest
from moatlib import TEST_NET_1, TEST_NET_V6, assert_refused, fmt_addr, metric_sum

pymongo = pytest.importorskip("pymongo")
from pymongo.errors import ServerSelectionTimeoutError  # noqa: E402


def client(host: str, port: int, **opts) -> "pymongo.MongoClient":
    """directConnection: the upstream is a standalone behind a proxy; short
    timeouts so that a refused connection fails fast."""
    opts.setdefault("serverSelectionTimeoutMS", 3000)
    opts.setdefault("connectTimeoutMS", 3000)
    opts.setdefault("socketTimeoutMS", 5000)
    return pymongo.MongoClient(host=host, port=port, directConnection=True, appname="moat-e2e", **opts)


def crud_roundtrip(c, mongo):
    assert c.admin.command("ping")["ok"] == 1
    c.shop.orders.insert_one({"item": "apple", "qty": 3})
    c.shop.orders.insert_many([{"item": "pear", "qty": 1}, {"item": "fig", "qty": 7}])
    docs = list(c.shop.orders.find())
    assert [d["item"] for d in docs] == ["apple", "pear", "fig"]
    assert [d["qty"] for d in c.shop.orders.find({"item": "fig"})] == [7]
    # what the upstream stored came through moat byte for byte
    assert [d["item"] for d in mongo.collections[("shop", "orders")]] == ["apple", "pear", "fig"]


def config(port: int, upstream: str, cidr: str = "127.0.0.1", extra: str = "", admin: int | None = None,
           listen: str | None = None) -> str:
    server = f'[server]\nadmin_listen = "127.0.0.1:{admin}"\n\n' if admin else ""
    return f"""{server}[[deployment]]
name = "orders"
listen = "{listen or fmt_addr('127.0.0.1', port)}"
upstream = "{upstream}"

[[deployment.allow]]
cidr = "{cidr}"
description = "test client"
{extra}"""


def test_plaintext_ping_insert_find(moat, mongo, ports):
    port, admin = ports(2)
    m = moat(config(port, mongo.address, admin=admin))
    with client("127.0.0.1", port) as c:
        crud_roundtrip(c, mongo)
    assert mongo.connection_count >= 1
    metrics = m.metrics()
    assert metric_sum(metrics, "moat_connections_total", deployment="orders", outcome="allowed") >= 1
    assert metric_sum(metrics, "moat_bytes_total", deployment="orders", direction="to_upstream") > 0
    assert metric_sum(metrics, "moat_bytes_total", deployment="orders", direction="to_client") > 0
    label_values = {value for (_name, labels) in metrics for (_label, value) in labels}
    assert not any("127.0.0.1" in v for v in label_values), f"a metric label carries a client address: {label_values}"


def test_refused_source_never_reaches_mongod(moat, mongo, ports):
    port, admin = ports(2)
    m = moat(config(port, mongo.address, cidr=TEST_NET_1, admin=admin))
    with client("127.0.0.1", port, serverSelectionTimeoutMS=1000) as c:
        with pytest.raises(ServerSelectionTimeoutError):
            c.admin.command("ping")
    assert_refused(port, "127.0.0.2", upstream=mongo)
    assert m.metric("moat_connections_total", deployment="orders", outcome="denied") >= 1


def test_tls_require(moat, mongo, ports, certs):
    port = ports()
    srv = certs.issue("orders", ["localhost", "127.0.0.1"])
    tls = f"""
[deployment.tls]
mode = "require"
cert = "{srv.cert_path}"
key = "{srv.key_path}"
"""
    moat(config(port, mongo.address, extra=tls))
    with client("localhost", port, tls=True, tlsCAFile=str(certs.cert_path)) as c:
        crud_roundtrip(c, mongo)
    # plaintext is not accepted on a require port
    with client("127.0.0.1", port, serverSelectionTimeoutMS=1000) as c:
        with pytest.raises(ServerSelectionTimeoutError):
            c.admin.command("ping")


def test_tls_client_certificate(moat, mongo, ports, certs, tmp_path):
    from moatlib import CertAuthority

    port = ports()
    srv = certs.issue("orders", ["localhost"])
    good = certs.issue("app", [], client=True, cn="app")
    other_ca = CertAuthority(tmp_path / "other", name="other-ca")
    bad = other_ca.issue("intruder", [], client=True, cn="intruder")
    tls = f"""
[deployment.tls]
mode = "require"
cert = "{srv.cert_path}"
key = "{srv.key_path}"
client_ca = "{certs.cert_path}"
"""
    moat(config(port, mongo.address, extra=tls))
    with client("localhost", port, tls=True, tlsCAFile=str(certs.cert_path),
                tlsCertificateKeyFile=str(good.combined_path)) as c:
        crud_roundtrip(c, mongo)
    for opts in ({}, {"tlsCertificateKeyFile": str(bad.combined_path)}):
        with client("localhost", port, tls=True, tlsCAFile=str(certs.cert_path),
                    serverSelectionTimeoutMS=1000, **opts) as c:
            with pytest.raises(ServerSelectionTimeoutError):
                c.admin.command("ping")


def test_tls_allow_mode_serves_tls_and_plaintext(moat, mongo, ports, certs):
    port = ports()
    srv = certs.issue("orders", ["localhost"])
    tls = f"""
[deployment.tls]
mode = "allow"
cert = "{srv.cert_path}"
key = "{srv.key_path}"
"""
    moat(config(port, mongo.address, extra=tls))
    with client("localhost", port, tls=True, tlsCAFile=str(certs.cert_path)) as c:
        assert c.admin.command("ping")["ok"] == 1
    with client("127.0.0.1", port) as c:
        assert c.admin.command("ping")["ok"] == 1


def test_ipv6_client(moat, mongo, ports, need_ipv6):
    port = ports(host="::1")
    m = moat(config(port, mongo.address, cidr="::1", listen=fmt_addr("::1", port)))
    assert m.running()
    with client("[::1]", port) as c:
        crud_roundtrip(c, mongo)


def test_ipv6_rule_does_not_admit_ipv4_client(moat, mongo, ports, need_ipv6):
    port = ports()
    moat(config(port, mongo.address, cidr=TEST_NET_V6))
    assert_refused(port, "127.0.0.1", upstream=mongo)
