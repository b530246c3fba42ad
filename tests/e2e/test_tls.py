"""TLS termination end to end (SPEC 3.3, 3.4 and the certificate rules of 2.1),
with Python's `ssl` module (and pymongo) as the client and plaintext
upstreams behind moat."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import time
import warnings

import pytest
from _tlslib import (cert_cn, cert_dns_names, client_ctx, client_hello, served_cert, tls_echo,
                     tls_fails, wait_closed)
from _proxylib import outcomes, wait_outcomes
from moatlib import (CertAuthority, assert_echoes, assert_refused, connect_from,
                     connection_outcome, run_check, stays_false)

PAYLOAD = b"moat tls e2e \x00\x01\x02\xff" * 64


def tls_config(port: int, upstream: str, cert, *, admin: int | None = None, mode: str = "require",
               name: str = "orders", allow=("127.0.0.2", "127.0.0.3"), extra_tls: str = "",
               limits: str = "") -> str:
    server = f'[server]\nadmin_listen = "127.0.0.1:{admin}"\n\n' if admin else ""
    rules = "".join(f'\n[[deployment.allow]]\ncidr = "{c}"\ndescription = "client {c}"\n' for c in allow)
    return f"""{server}{limits}[[deployment]]
name = "{name}"
listen = "127.0.0.1:{port}"
upstream = "{upstream}"

[deployment.tls]
mode = "{mode}"
cert = "{cert.cert_path}"
key = "{cert.key_path}"
{extra_tls}
{rules}"""


@pytest.fixture
def srv(certs):
    return certs.issue("orders", ["localhost", "orders.db.test"])


# --------------------------------------------------------------------------
# mode = "require" / "allow"
# --------------------------------------------------------------------------


def test_require_tls_client_echoes_and_upstream_gets_plaintext(moat, echo, ports, certs, srv):
    port, admin = ports(2)
    m = moat(tls_config(port, echo.address, srv, admin=admin))
    ctx = client_ctx(certs.cert_path)
    with tls_echo(port, "127.0.0.2", ctx, "localhost", PAYLOAD) as s:
        assert s.version() in ("TLSv1.2", "TLSv1.3")
        # the served certificate is ours
        assert served_cert(s).serial_number == srv.cert.serial_number
    # the upstream received exactly the plaintext, no TLS record
    echo.wait_connections(1)
    assert echo.bytes_received == PAYLOAD
    m.wait_metric("moat_connections_total", lambda v: v >= 1, deployment="orders", outcome="allowed")
    m.wait_metric("moat_tls_handshake_seconds_count", lambda v: v >= 1, deployment="orders")


def test_require_refuses_plaintext_client_as_tls_error(moat, echo, ports, srv):
    port, admin = ports(2)
    m = moat(tls_config(port, echo.address, srv, admin=admin))
    before = m.metric("moat_connections_total", deployment="orders", outcome="tls_error")
    with connect_from("127.0.0.2", port) as s:
        # an OP_MSG-looking plaintext start: not a TLS handshake record
        s.sendall(b"\x3a\x00\x00\x00\x01\x00\x00\x00" + b"\x00" * 50)
        data, how = read_to_close(s, timeout=5)
    # closed, at most after a TLS alert record (content type 21)
    assert how in ("eof", "reset"), how
    assert data[:1] in (b"", b"\x15"), f"plaintext client got {data[:16]!r}"
    assert len(data) <= 64, data
    echo.assert_untouched()
    m.wait_metric("moat_connections_total", lambda v: v >= before + 1,
                  deployment="orders", outcome="tls_error")


def test_allow_mode_serves_tls_and_plaintext_on_one_port(moat, echo, ports, certs, srv):
    port = ports()
    moat(tls_config(port, echo.address, srv, mode="allow"))
    tls_echo(port, "127.0.0.2", client_ctx(certs.cert_path), "localhost", PAYLOAD).close()
    assert_echoes(port, "127.0.0.3", PAYLOAD)
    tls_echo(port, "127.0.0.3", client_ctx(certs.cert_path), "localhost", b"again").close()
    echo.wait_connections(3)
    # the upstream always receives plaintext
    assert echo.bytes_received == PAYLOAD + PAYLOAD + b"again"


def test_allow_mode_port_check_counts_no_outcome(moat, echo, ports, certs, srv):
    """SPEC 3.3: on an allow-mode port a connection is TLS or plaintext by its
    first byte; one that closes before any byte (a TCP port check) is
    neither, and counts no outcome."""
    port, admin = ports(2)
    m = moat(tls_config(port, echo.address, srv, admin=admin, mode="allow"))
    for _ in range(3):
        connect_from("127.0.0.2", port).close()
    assert_echoes(port, "127.0.0.2", PAYLOAD)
    wait_outcomes(m, "orders", {"allowed": 1})
    assert stays_false(lambda: outcomes(m, "orders")["tls_error"] > 0, 0.3)
    # The first byte of a TLS record, then nothing: a handshake cut off.
    with connect_from("127.0.0.2", port) as s:
        s.sendall(b"\x16")
    wait_outcomes(m, "orders", {"allowed": 1, "tls_error": 1})


def test_allow_mode_still_enforces_rules(moat, echo, ports, certs, srv):
    port = ports()
    moat(tls_config(port, echo.address, srv, mode="allow", allow=("127.0.0.2",)))
    assert_refused(port, "127.0.0.4", upstream=echo)
    assert_refused(port, "127.0.0.4", upstream=echo, send=b"plain bytes\n")


# --------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------


def test_min_version_13_refuses_tls12_client(moat, echo, ports, certs, srv):
    port = ports()
    moat(tls_config(port, echo.address, srv, extra_tls='min_version = "1.3"'))
    how = tls_fails(port, "127.0.0.2", client_ctx(certs.cert_path, max_version=ssl.TLSVersion.TLSv1_2),
                    "localhost")
    assert how.startswith("handshake"), how
    echo.assert_untouched()
    ctx13 = client_ctx(certs.cert_path, min_version=ssl.TLSVersion.TLSv1_3)
    with tls_echo(port, "127.0.0.2", ctx13, "localhost") as s:
        assert s.version() == "TLSv1.3"


def test_default_min_version_accepts_tls12_client(moat, echo, ports, certs, srv):
    port = ports()
    moat(tls_config(port, echo.address, srv))
    ctx12 = client_ctx(certs.cert_path, max_version=ssl.TLSVersion.TLSv1_2)
    with tls_echo(port, "127.0.0.2", ctx12, "localhost", PAYLOAD) as s:
        assert s.version() == "TLSv1.2"


def test_tls11_client_is_refused(moat, echo, ports, certs, srv):
    """TLS 1.2 and 1.3 only. (Skipped when the local OpenSSL cannot even
    offer TLS 1.1.)"""
    port = ports()
    moat(tls_config(port, echo.address, srv))
    ctx = client_ctx(certs.cert_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError) as e:
        pytest.skip(f"local OpenSSL cannot offer TLS 1.1: {e}")
    how = tls_fails(port, "127.0.0.2", ctx, "localhost")
    assert how.startswith("handshake"), how
    echo.assert_untouched()


# --------------------------------------------------------------------------
# Client certificates
# --------------------------------------------------------------------------


def test_client_ca(moat, echo, ports, certs, srv, tmp_path):
    port = ports()
    good = certs.issue("app", [], client=True, cn="app")
    other = CertAuthority(tmp_path / "other", name="other-ca")
    intruder = other.issue("intruder", [], client=True, cn="intruder")
    moat(tls_config(port, echo.address, srv, extra_tls=f'client_ca = "{certs.cert_path}"'))

    with tls_echo(port, "127.0.0.2", client_ctx(certs.cert_path, client=good), "localhost", PAYLOAD):
        pass
    echo.wait_connections(1)
    n = echo.connection_count
    received = echo.bytes_received

    for ctx, what in ((client_ctx(certs.cert_path), "no client certificate"),
                      (client_ctx(certs.cert_path, client=intruder), "certificate from another CA")):
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            ctx.minimum_version = ctx.maximum_version = version
            how = tls_fails(port, "127.0.0.2", ctx, "localhost")
            assert how, what
    # nothing of the failed sessions reached the upstream
    assert echo.bytes_received == received
    assert echo.connection_count == n, "a client without a valid certificate reached the upstream"


# --------------------------------------------------------------------------
# pymongo
# --------------------------------------------------------------------------


def _mongo_client(port, **opts):
    pymongo = pytest.importorskip("pymongo")
    opts.setdefault("serverSelectionTimeoutMS", 5000)
    opts.setdefault("connectTimeoutMS", 5000)
    opts.setdefault("socketTimeoutMS", 10000)
    return pymongo.MongoClient(host="localhost", port=port, directConnection=True, appname="moat-tls-e2e",
                               **opts)


def _crud(c, mongo):
    assert c.admin.command("ping")["ok"] == 1
    c.shop.items.insert_one({"sku": "a-1", "qty": 2})
    c.shop.items.insert_one({"sku": "b-2", "qty": 5})
    assert [d["qty"] for d in c.shop.items.find({"sku": "b-2"})] == [5]
    assert sorted(d["sku"] for d in c.shop.items.find()) == ["a-1", "b-2"]
    assert [d["sku"] for d in mongo.collections[("shop", "items")]] == ["a-1", "b-2"]


def test_pymongo_tls(moat, mongo, ports, certs, srv):
    port = ports()
    moat(tls_config(port, mongo.address, srv, allow=("127.0.0.1",)))
    with _mongo_client(port, tls=True, tlsCAFile=str(certs.cert_path)) as c:
        _crud(c, mongo)


def test_pymongo_tls_client_certificate(moat, mongo, ports, certs, srv):
    from pymongo.errors import ServerSelectionTimeoutError
    port = ports()
    app = certs.issue("app", [], client=True, cn="app")
    moat(tls_config(port, mongo.address, srv, allow=("127.0.0.1",),
                    extra_tls=f'client_ca = "{certs.cert_path}"'))
    with _mongo_client(port, tls=True, tlsCAFile=str(certs.cert_path),
                       tlsCertificateKeyFile=str(app.combined_path)) as c:
        _crud(c, mongo)
    with _mongo_client(port, tls=True, tlsCAFile=str(certs.cert_path), serverSelectionTimeoutMS=1500) as c:
        with pytest.raises(ServerSelectionTimeoutError):
            c.admin.command("ping")


# --------------------------------------------------------------------------
# SNI: several deployments on one address (3.4)
# --------------------------------------------------------------------------


@pytest.fixture
def sni_pair(moat, echo_factory, ports, certs):
    port, admin = ports(2)
    up_a, up_b = echo_factory(), echo_factory()
    cert_a = certs.issue("a", ["a.test"], cn="a.test")
    cert_b = certs.issue("b", ["b.test"], cn="b.test")
    m = moat(f"""
        [server]
        admin_listen = "127.0.0.1:{admin}"

        [[deployment]]
        name = "alpha"
        listen = "127.0.0.1:{port}"
        upstream = "{up_a.address}"
        server_names = ["a.test"]
        [deployment.tls]
        mode = "require"
        cert = "{cert_a.cert_path}"
        key = "{cert_a.key_path}"
        [[deployment.allow]]
        cidr = "127.0.0.2"

        [[deployment]]
        name = "beta"
        listen = "127.0.0.1:{port}"
        upstream = "{up_b.address}"
        server_names = ["b.test"]
        [deployment.tls]
        mode = "require"
        cert = "{cert_b.cert_path}"
        key = "{cert_b.key_path}"
        [[deployment.allow]]
        cidr = "127.0.0.3"
    """)
    return dict(port=port, m=m, a=up_a, b=up_b, cert_a=cert_a, cert_b=cert_b, ctx=client_ctx(certs.cert_path))


def test_sni_routes_to_each_deployment_with_its_certificate(sni_pair):
    p = sni_pair
    with tls_echo(p["port"], "127.0.0.2", p["ctx"], "a.test", b"for A") as s:
        cert = served_cert(s)
        assert cert.serial_number == p["cert_a"].cert.serial_number
        assert cert_cn(cert) == "a.test" and cert_dns_names(cert) == ["a.test"]
    with tls_echo(p["port"], "127.0.0.3", p["ctx"], "b.test", b"for B") as s:
        cert = served_cert(s)
        assert cert.serial_number == p["cert_b"].cert.serial_number
        assert cert_cn(cert) == "b.test" and cert_dns_names(cert) == ["b.test"]
    p["a"].wait_connections(1)
    p["b"].wait_connections(1)
    assert p["a"].bytes_received == b"for A"
    assert p["b"].bytes_received == b"for B"


def test_sni_unknown_or_missing_name_is_refused(sni_pair):
    p = sni_pair
    unverified = client_ctx(verify=False)
    for src in ("127.0.0.2", "127.0.0.3"):
        tls_fails(p["port"], src, unverified, "c.test")
        tls_fails(p["port"], src, unverified, None)
    p["a"].assert_untouched()
    p["b"].assert_untouched()


def test_sni_source_admitted_by_no_deployment_is_reset_before_handshake(sni_pair):
    p = sni_pair
    hello = client_hello("a.test")
    for _ in range(3):
        try:
            s = connect_from("127.0.0.4", p["port"])
        except ConnectionResetError:
            continue  # reset before connect() even returned: refused
        with s:
            outcome = connection_outcome(s, timeout=5, send=hello)
        assert outcome in ("reset", "closed"), f"{outcome}: handshake bytes came back to an unadmitted source"
    # and without sending anything at all: nothing comes back either
    try:
        s = connect_from("127.0.0.4", p["port"])
    except ConnectionResetError:
        pass
    else:
        with s:
            assert connection_outcome(s, timeout=5) in ("reset", "closed")
    p["a"].assert_untouched()
    p["b"].assert_untouched()
    # counted as a refusal (under whichever of the address's deployments moat reports)
    ms = p["m"].metrics()
    from moatlib import metric_sum
    assert metric_sum(ms, "moat_connections_total", outcome="denied") >= 1, ms


def test_sni_source_admitted_by_a_only_cannot_reach_b(sni_pair):
    p = sni_pair
    how = tls_fails(p["port"], "127.0.0.2", p["ctx"], "b.test")
    assert how
    how = tls_fails(p["port"], "127.0.0.3", p["ctx"], "a.test")
    assert how
    p["a"].assert_untouched()
    p["b"].assert_untouched()
    # while the right pairings keep working
    tls_echo(p["port"], "127.0.0.2", p["ctx"], "a.test").close()
    tls_echo(p["port"], "127.0.0.3", p["ctx"], "b.test").close()


def read_to_close(s, timeout: float = 5.0) -> tuple[bytes, str]:
    """Everything the peer sends until it closes: (bytes, "eof"|"reset")."""
    s.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, ConnectionAbortedError):
            return data, "reset"
        except socket.timeout:
            break
        if not chunk:
            return data, "eof"
        data += chunk
    return data, "open"


def test_sni_refusal_after_clienthello_sends_no_server_hello(sni_pair):
    """127.0.0.2 is admitted by alpha only; asking for b.test gets no
    ServerHello carrying beta's certificate."""
    p = sni_pair
    hello = client_hello("b.test")
    try:
        s = connect_from("127.0.0.2", p["port"])
    except ConnectionResetError:
        return
    with s:
        s.sendall(hello)
        data, how = read_to_close(s, timeout=5)
    assert how in ("eof", "reset"), how
    # either nothing, or a TLS alert record (type 21); never a handshake record (22)
    assert data[:1] in (b"", b"\x15"), f"server answered a refused SNI with {data[:16]!r}"
    p["b"].assert_untouched()


# --------------------------------------------------------------------------
# handshake_timeout
# --------------------------------------------------------------------------


def test_handshake_timeout_closes_silent_connection(moat, echo, ports, srv):
    port, admin = ports(2)
    m = moat(tls_config(port, echo.address, srv, admin=admin, limits='[limits]\nhandshake_timeout = "1s"\n\n'))
    before = m.metric("moat_connections_total", deployment="orders", outcome="tls_error")
    with connect_from("127.0.0.2", port) as s:
        t0 = time.monotonic()
        how = wait_closed(s, timeout=5.0)
        elapsed = time.monotonic() - t0
    assert how in ("eof", "reset"), how
    assert 0.5 <= elapsed <= 5.0, f"closed after {elapsed:.2f}s, wanted about 1s"
    echo.assert_untouched()
    m.wait_metric("moat_connections_total", lambda v: v >= before + 1, deployment="orders", outcome="tls_error")


def test_handshake_timeout_on_an_sni_address_is_its_longest(moat, echo, ports, certs):
    """Before the ClientHello names a deployment, the longest handshake_timeout
    of the address's deployments bounds the wait: 1 s and 3 s -> 3 s."""
    port = ports()
    cert_a = certs.issue("a", ["a.test"], cn="a.test")
    cert_b = certs.issue("b", ["b.test"], cn="b.test")

    def deployment(name, cert, timeout):
        return (f'[[deployment]]\nname = "{name}"\nlisten = "127.0.0.1:{port}"\nupstream = "{echo.address}"\n'
                f'server_names = ["{name}.test"]\n[deployment.limits]\nhandshake_timeout = "{timeout}"\n'
                f'[deployment.tls]\nmode = "require"\ncert = "{cert.cert_path}"\nkey = "{cert.key_path}"\n'
                '[[deployment.allow]]\ncidr = "127.0.0.2"\n\n')
    moat(deployment("a", cert_a, "1s") + deployment("b", cert_b, "3s"))
    with connect_from("127.0.0.2", port) as s:
        t0 = time.monotonic()
        how = wait_closed(s, timeout=8.0)
        elapsed = time.monotonic() - t0
    assert how in ("eof", "reset"), how
    assert 2.5 <= elapsed <= 6.0, f"closed after {elapsed:.2f}s, wanted about 3s"


def test_handshake_timeout_partial_clienthello(moat, echo, ports, srv):
    """A client that sends half a ClientHello and stalls is closed too."""
    port = ports()
    moat(tls_config(port, echo.address, srv, limits='[limits]\nhandshake_timeout = "1s"\n\n'))
    hello = client_hello("localhost")
    with connect_from("127.0.0.2", port) as s:
        s.sendall(hello[: len(hello) // 2])
        t0 = time.monotonic()
        how = wait_closed(s, timeout=5.0)
        elapsed = time.monotonic() - t0
    assert how in ("eof", "reset"), how
    assert 0.5 <= elapsed <= 5.0, f"closed after {elapsed:.2f}s"
    echo.assert_untouched()


# --------------------------------------------------------------------------
# moat check: certificate rules (2.1)
# --------------------------------------------------------------------------


def _check_cfg(cert_path, key_path, client_ca=None) -> str:
    ca = f'client_ca = "{client_ca}"\n' if client_ca else ""
    return f"""[[deployment]]
name = "orders"
listen = "127.0.0.1:27017"
upstream = "127.0.0.1:27018"

[deployment.tls]
mode = "require"
cert = "{cert_path}"
key = "{key_path}"
{ca}
[[deployment.allow]]
cidr = "192.0.2.0/24"
"""


def _check(tmp_path, name, text):
    return run_check(text, directory=tmp_path / name)


def test_check_cert_key_mismatch(tmp_path, certs):
    a = certs.issue("a", ["localhost"])
    b = certs.issue("b", ["localhost"])
    r = _check(tmp_path, "mismatch", _check_cfg(a.cert_path, b.key_path))
    assert r.code == 1, r.output
    assert str(a.cert_path) in r.output or str(b.key_path) in r.output, r.output
    assert "match" in r.output.lower(), r.output


def test_check_garbage_cert_pem(tmp_path, certs):
    a = certs.issue("a", ["localhost"])
    bad = tmp_path / "garbage.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nthis is not base64 !!!\n-----END CERTIFICATE-----\n")
    r = _check(tmp_path, "garbage", _check_cfg(bad, a.key_path))
    assert r.code == 1, r.output
    assert str(bad) in r.output, r.output
    # and a file with no PEM block at all
    bad2 = tmp_path / "notpem.pem"
    bad2.write_bytes(os.urandom(300))
    r = _check(tmp_path, "notpem", _check_cfg(bad2, a.key_path))
    assert r.code == 1, r.output
    assert str(bad2) in r.output, r.output


def test_check_missing_key_file(tmp_path, certs):
    a = certs.issue("a", ["localhost"])
    missing = tmp_path / "nope" / "key.pem"
    r = _check(tmp_path, "missing", _check_cfg(a.cert_path, missing))
    assert r.code == 1, r.output
    assert str(missing) in r.output, r.output


def test_check_garbage_client_ca(tmp_path, certs):
    a = certs.issue("a", ["localhost"])
    bad = tmp_path / "ca-garbage.pem"
    bad.write_text("not a certificate at all\n")
    r = _check(tmp_path, "badca", _check_cfg(a.cert_path, a.key_path, client_ca=bad))
    assert r.code == 1, r.output
    assert str(bad) in r.output, r.output


def test_check_expired_certificate_is_a_warning(tmp_path, certs):
    now = dt.datetime.now(dt.timezone.utc)
    old = certs.issue("old", ["localhost"], not_after=now - dt.timedelta(days=2))
    r = _check(tmp_path, "expired", _check_cfg(old.cert_path, old.key_path))
    assert r.code == 0, r.output
    assert "warning" in r.output.lower() and "expire" in r.output.lower(), r.output
    assert str(old.cert_path) in r.output, r.output


def test_check_key_readable_by_others_is_a_warning(tmp_path, certs):
    a = certs.issue("a", ["localhost"], key_mode=0o644)
    r = _check(tmp_path, "keymode", _check_cfg(a.cert_path, a.key_path))
    assert r.code == 0, r.output
    assert "warning" in r.output.lower(), r.output
    assert str(a.key_path) in r.output, r.output
    # the same key at 0600: no such warning
    a.key_path.chmod(0o600)
    r = _check(tmp_path, "keymode600", _check_cfg(a.cert_path, a.key_path))
    assert r.code == 0, r.output
    assert str(a.key_path) not in r.output, r.output


def test_check_valid_tls_config_is_clean(tmp_path, certs):
    a = certs.issue("a", ["localhost"])
    r = _check(tmp_path, "ok", _check_cfg(a.cert_path, a.key_path, client_ca=certs.cert_path))
    assert r.code == 0, r.output
    assert "expire" not in r.output.lower(), r.output


@pytest.mark.parametrize("fmt,key_type", [("pkcs8", "ec"), ("traditional", "ec"),
                                           ("pkcs8", "rsa"), ("traditional", "rsa")])
def test_key_formats_pkcs8_pkcs1_sec1(moat, echo, ports, certs, fmt, key_type):
    port = ports()
    c = certs.issue(f"k-{fmt}-{key_type}", ["localhost"], key_type=key_type, key_format=fmt)
    if fmt == "traditional":
        head = c.key_path.read_text().splitlines()[0]
        assert head == ("-----BEGIN RSA PRIVATE KEY-----" if key_type == "rsa" else "-----BEGIN EC PRIVATE KEY-----")
    moat(tls_config(port, echo.address, c))
    tls_echo(port, "127.0.0.2", client_ctx(certs.cert_path), "localhost").close()


# --------------------------------------------------------------------------
# Metric: certificate expiry
# --------------------------------------------------------------------------


def test_certificate_expiry_metric(moat, echo, ports, certs):
    port, admin = ports(2)
    not_after = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(days=42, seconds=17)
    c = certs.issue("exp", ["localhost"], not_after=not_after)
    m = moat(tls_config(port, echo.address, c, admin=admin))
    want = c.cert.not_valid_after_utc.timestamp()
    assert want == not_after.timestamp()
    got = m.metric("moat_tls_certificate_expiry_timestamp_seconds", default=-1, deployment="orders")
    assert got == want, f"expiry metric {got}, cert notAfter {want}"
