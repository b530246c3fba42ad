"""The fleet store (SPEC 7) against a real etcd: Debian's etcd-server, one per
test, on free loopback ports with a temporary data directory, stopped by PID.

Every host's moat reads `{prefix}deployments/{name}/accessList/*` once, then
watches; changes apply like a reload (revocation included) without counting
as one; etcd going away changes nothing until it comes back.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import time

import pytest

from etcdlib import Etcd, Relay, etcd_server_cert, wait_admitted, wait_refused
from moatlib import (TEST_NET_1, assert_echoes, connect_from, free_port, recv_exactly,
                     stays_false, wait_until)


@pytest.fixture
def etcd_factory():
    started: list[Etcd] = []

    def make() -> Etcd:
        e = Etcd()
        started.append(e)
        return e.start()
    yield make
    for e in started:
        e.cleanup()


@pytest.fixture
def etcd(etcd_factory) -> Etcd:
    return etcd_factory()


def key(name: str, entry: str, prefix: str = "/moat/") -> str:
    return f"{prefix}deployments/{name}/accessList/{entry}"


def store_config(port: int, echo, endpoint: str, *, prefix: str | None = None,
                 cache: str | None = "store.json", allow: str = "", admin: int | None = None,
                 extra: str = "") -> str:
    opts = [f'endpoints = ["{endpoint}"]']
    if prefix is not None:
        opts.append(f'prefix = "{prefix}"')
    if cache is not None:
        opts.append(f'cache = "{cache}"')
    server = f'[server]\nadmin_listen = "127.0.0.1:{admin}"\n' if admin else ""
    return f"""
{server}
[store]
etcd = {{ {", ".join(opts)} }}

[[deployment]]
name = "orders"
listen = "127.0.0.1:{port}"
upstream = "{echo.address}"
{allow}
{extra}
"""


def open_connection(port: int, src: str) -> socket.socket:
    s = connect_from(src, port)
    s.sendall(b"hello")
    assert recv_exactly(s, 5) == b"hello"
    return s


def is_closed(s: socket.socket) -> bool:
    s.settimeout(0.05)
    try:
        return s.recv(1) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def test_start_up_load_and_metrics(moat, echo, etcd, ports):
    port, admin = ports(2)
    etcd.put(key("orders", "app"), {"cidrBlock": "127.0.0.2", "comment": "app"})
    etcd.put(key("orders", "bad"), "{not json")
    etcd.put(key("billing", "x"), {"cidrBlock": "10.0.0.0/8"})
    rev = etcd.revision()
    m = moat(store_config(port, echo, etcd.client_url, admin=admin))
    # In force when the listeners are bound: no polling needed.
    assert_echoes(port, "127.0.0.2")
    wait_refused(port, "127.0.0.3", timeout=1)
    assert m.metric("moat_store_entries", deployment="orders") == 1
    assert m.metric("moat_store_invalid_entries", deployment="orders") == 1
    assert m.metric("moat_store_entries", deployment="billing") == 1
    assert m.metric("moat_store_revision") == rev
    m.wait_metric("moat_store_connected", 1)
    assert m.metric("moat_rules", deployment="orders") == 1
    assert key("orders", "bad") in m.stderr_text()


def test_put_and_delete_apply_within_a_second_and_revoke(moat, echo, etcd, ports):
    port, admin = ports(2)
    m = moat(store_config(port, echo, etcd.client_url, admin=admin))
    m.wait_metric("moat_store_connected", 1)
    reloads = m.metric("moat_config_reloads_total", result="success")
    wait_refused(port, "127.0.0.2", timeout=1)

    rev = etcd.put(key("orders", "laptop"), {"cidrBlock": "127.0.0.2/32", "comment": "laptop"})
    took = wait_admitted(port, "127.0.0.2", timeout=5)
    assert took < 1.0, f"the put took {took:.2f}s to apply"
    assert m.metric("moat_store_revision") >= rev
    live = open_connection(port, "127.0.0.2")

    etcd.delete(key("orders", "laptop"))
    wait_until(lambda: is_closed(live), 1.0, what="the live connection to be revoked")
    wait_refused(port, "127.0.0.2", timeout=1)
    m.wait_metric("moat_revoked_connections_total", 1, deployment="orders")
    m.wait_metric("moat_store_entries", 0, deployment="orders")
    # Not a config reload.
    assert m.metric("moat_config_reloads_total", result="success") == reloads


def test_three_hosts_converge(moat, echo, etcd, ports):
    hosts = []
    for i in range(3):
        port = free_port()
        hosts.append((port, moat(store_config(port, echo, etcd.client_url))))
    for port, _ in hosts:
        wait_refused(port, "127.0.0.4", timeout=1)
    etcd.put(key("orders", "a"), {"cidrBlock": "127.0.0.4"})
    t0 = time.monotonic()
    for port, _ in hosts:
        wait_admitted(port, "127.0.0.4", timeout=5)
    assert time.monotonic() - t0 < 1.5
    etcd.put(key("orders", "a"), {"cidrBlock": "127.0.0.5"})
    for port, _ in hosts:
        wait_refused(port, "127.0.0.4", timeout=5)
        assert_echoes(port, "127.0.0.5")


def test_prefix_isolation(moat, echo, etcd, ports):
    port = ports()
    moat(store_config(port, echo, etcd.client_url, prefix="/fleet-a/"))
    etcd.put(key("orders", "x", prefix="/fleet-b/"), {"cidrBlock": "127.0.0.2"})
    etcd.put(key("orders", "x"), {"cidrBlock": "127.0.0.2"})  # the default prefix
    etcd.put("/fleet-a/deployments/orders/other/x", json.dumps({"cidrBlock": "127.0.0.2"}))
    etcd.put(key("orders", "y", prefix="/fleet-a/"), {"cidrBlock": "127.0.0.3"})
    wait_admitted(port, "127.0.0.3")
    wait_refused(port, "127.0.0.2", timeout=1)


def test_a_bad_entry_is_ignored_logged_and_counted(moat, echo, etcd, ports):
    port, admin = ports(2)
    m = moat(store_config(port, echo, etcd.client_url, admin=admin))
    bad = key("orders", "typo")
    etcd.put(bad, {"cidrBlock": "10.0.0.1/16"})
    etcd.put(key("orders", "group"), {"awsSecurityGroup": "sg-0a1b2c3d"})
    etcd.put(key("orders", "good"), {"cidrBlock": "127.0.0.2"})
    wait_admitted(port, "127.0.0.2")
    m.wait_metric("moat_store_invalid_entries", 2, deployment="orders")
    assert m.metric("moat_store_entries", deployment="orders") == 1
    m.wait_stderr(bad + ".*host bits")
    # The store is the truth: a valid entry overwritten with a bad value stops applying.
    etcd.put(key("orders", "good"), {"cidrBlock": "127.0.0.2", "deleteAfterDate": "tomorrow"})
    wait_refused(port, "127.0.0.2")
    m.wait_metric("moat_store_invalid_entries", 3, deployment="orders")


def test_etcd_killed_and_restarted_fail_static_then_resume(moat, echo, etcd, ports):
    port, admin = ports(2)
    etcd.put(key("orders", "a"), {"cidrBlock": "127.0.0.2"})
    m = moat(store_config(port, echo, etcd.client_url, admin=admin))
    m.wait_metric("moat_store_connected", 1)
    live = open_connection(port, "127.0.0.2")
    etcd.kill()
    m.wait_metric("moat_store_connected", 0, timeout=15)
    # Fail-static: the entries stay in force, the connection stays up.
    assert_echoes(port, "127.0.0.2")
    wait_refused(port, "127.0.0.3", timeout=1)
    assert not is_closed(live)
    etcd.start()
    m.wait_metric("moat_store_connected", 1, timeout=20)
    rev = etcd.put(key("orders", "b"), {"cidrBlock": "127.0.0.3"})
    wait_admitted(port, "127.0.0.3", timeout=3)
    assert m.metric("moat_store_revision") >= rev
    assert_echoes(port, "127.0.0.2")
    assert "compacted" not in m.stderr_text()
    live.close()


def test_start_from_the_cache_while_etcd_is_down(moat, echo, etcd, ports, tmp_path):
    port = ports()
    cfg = store_config(port, echo, etcd.client_url)
    etcd.put(key("orders", "a"), {"cidrBlock": "127.0.0.2"})
    first = moat(cfg, directory=tmp_path / "host")
    wait_admitted(port, "127.0.0.2")
    cache = tmp_path / "host" / "store.json"
    wait_until(lambda: cache.exists() and key("orders", "a") in cache.read_text(), what="the cache")
    first.stop()
    etcd.kill()
    t0 = time.monotonic()
    second = moat(cfg, directory=tmp_path / "host", timeout=15)
    assert time.monotonic() - t0 < 9, "start-up waits at most 5 s for etcd"
    assert_echoes(port, "127.0.0.2")
    second.wait_stderr("unreachable at start")
    # etcd back: moat catches up.
    etcd.start()
    etcd.put(key("orders", "b"), {"cidrBlock": "127.0.0.3"})
    wait_admitted(port, "127.0.0.3", timeout=20)


def test_start_without_cache_while_etcd_is_down_enforces_the_file(moat, echo, ports):
    port = ports()
    dead = f"http://127.0.0.1:{free_port()}"
    allow = '[[deployment.allow]]\ncidr = "127.0.0.4"'
    m = moat(store_config(port, echo, dead, allow=allow), timeout=15)
    assert_echoes(port, "127.0.0.4")
    wait_refused(port, "127.0.0.2", timeout=1)
    m.wait_stderr("config file's rules alone")


def test_compaction_while_disconnected_resyncs(moat, echo, etcd, ports):
    port, admin = ports(2)
    relay = Relay(etcd.client_port)
    try:
        etcd.put(key("orders", "old"), {"cidrBlock": "127.0.0.2"})
        m = moat(store_config(port, echo, relay.url, admin=admin))
        m.wait_metric("moat_store_connected", 1)
        relay.cut()
        m.wait_metric("moat_store_connected", 0, timeout=20)
        etcd.delete(key("orders", "old"))
        etcd.put(key("orders", "new"), {"cidrBlock": "127.0.0.3"})
        for i in range(5):
            etcd.put(f"/elsewhere/{i}", "x")
        rev = etcd.compact()
        assert_echoes(port, "127.0.0.2")  # still the last applied state
        relay.heal()
        wait_admitted(port, "127.0.0.3", timeout=20)
        wait_refused(port, "127.0.0.2", timeout=2)
        m.wait_stderr("compacted")
        assert m.metric("moat_store_revision") >= rev
    finally:
        relay.close()


def test_delete_after_date_expires_the_entry_and_revokes(moat, echo, etcd, ports):
    port, admin = ports(2)
    m = moat(store_config(port, echo, etcd.client_url, admin=admin))
    soon = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(seconds=3)
    etcd.put(key("orders", "temp"), {"cidrBlock": "127.0.0.2",
                                     "deleteAfterDate": soon.isoformat().replace("+00:00", "Z")})
    etcd.put(key("orders", "past"), {"cidrBlock": "127.0.0.3",
                                     "deleteAfterDate": "2001-01-01T00:00:00Z"})
    wait_admitted(port, "127.0.0.2")
    live = open_connection(port, "127.0.0.2")
    wait_until(lambda: is_closed(live), 6, what="the connection to be revoked at deleteAfterDate")
    assert time.time() >= soon.timestamp() - 0.05
    wait_refused(port, "127.0.0.2", timeout=1)
    wait_refused(port, "127.0.0.3", timeout=1)
    # moat never deletes keys: the writer cleans up.
    assert etcd.get(key("orders", "temp")) is not None
    assert m.metric("moat_store_invalid_entries", deployment="orders") == 0


def test_check_validates_store_without_reading_etcd(check, ports):
    # A listener standing in for etcd: check must never connect to it.
    fake = socket.socket()
    fake.bind(("127.0.0.1", 0))
    fake.listen(8)
    fake.setblocking(False)
    port = ports()
    try:
        r = check(f"""
            [store]
            etcd = {{ endpoints = ["http://127.0.0.1:{fake.getsockname()[1]}"], cache = "store.json" }}

            [[deployment]]
            name = "orders"
            listen = "127.0.0.1:{port}"
            upstream = "127.0.0.1:27018"
        """)
        assert r.code == 0, r.output
        assert "admits nobody" not in r.output
        with pytest.raises(BlockingIOError):
            fake.accept()
    finally:
        fake.close()
    # The spec's own example is valid (https with the system's roots).
    r = check(f"""
        [store]
        etcd = {{ endpoints = ["https://etcd1:2379", "https://etcd2:2379"], prefix = "/moat/", cache = "/var/lib/moat/store.json" }}

        [[deployment]]
        name = "orders"
        listen = "127.0.0.1:{port}"
        upstream = "127.0.0.1:27018"
    """)
    assert r.code == 0, r.output
    # Without a store, the warning is still there.
    r = check(f"""
        [[deployment]]
        name = "orders"
        listen = "127.0.0.1:{port}"
        upstream = "127.0.0.1:27018"
    """)
    assert "admits nobody" in r.output


def test_check_reports_a_bad_store_table(check, ports):
    port = ports()
    r = check(f"""
        [store]
        etcd = {{ endpoints = ["etcd1"], username = "moat", bogus = 1 }}

        [[deployment]]
        name = "orders"
        listen = "127.0.0.1:{port}"
        upstream = "127.0.0.1:27018"
    """)
    assert r.code == 1
    assert "moat.toml:3:" in r.output
    assert "bogus" in r.output
    r = check(f"""
        [store]
        etcd = {{ endpoints = ["etcd1"], username = "moat" }}

        [[deployment]]
        name = "orders"
        listen = "127.0.0.1:{port}"
        upstream = "127.0.0.1:27018"
    """)
    assert r.code == 1
    assert "host:port" in r.output and "password_file" in r.output
    r = check(f"""
        [store]
        etcd = {{ endpoints = ["http://127.0.0.1:2379"], ca = "ca.pem" }}

        [[deployment]]
        name = "orders"
        listen = "127.0.0.1:{port}"
        upstream = "127.0.0.1:27018"
    """)
    assert r.code == 1 and "https://" in r.output


def test_user_and_password(moat, echo, etcd, ports, tmp_path):
    """etcd with authentication on: moat logs in with username + password_file."""
    port = ports()
    etcd.call("/v3/auth/user/add", {"name": "root", "password": "rootpw"})
    etcd.call("/v3/auth/role/add", {"name": "root"})
    etcd.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
    etcd.call("/v3/auth/role/add", {"name": "moat-reader"})
    import base64
    b = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    etcd.call("/v3/auth/role/grant", {"name": "moat-reader", "perm": {
        "permType": "READ", "key": b("/moat/"), "range_end": b("/moat0")}})
    etcd.call("/v3/auth/user/add", {"name": "host1", "password": "s3cret"})
    etcd.call("/v3/auth/user/grant", {"user": "host1", "role": "moat-reader"})
    etcd.put(key("orders", "a"), {"cidrBlock": "127.0.0.2"})
    etcd.call("/v3/auth/enable", {})
    extra_files = {"etcd-password": "s3cret\n"}
    cfg = store_config(port, echo, etcd.client_url).replace(
        "cache = ", 'username = "host1", password_file = "etcd-password", cache = ')
    moat(cfg, extra_files=extra_files)
    assert_echoes(port, "127.0.0.2")


def test_tls_with_a_client_certificate(moat, echo, certs, ports):
    """etcd on https with --client-cert-auth: moat presents `cert` + `key` and trusts `ca`."""
    port = ports()
    server = etcd_server_cert(certs)
    client = certs.issue("etcd-client", [], client=True, cn="db1")
    etcd = Etcd(tls=(certs, server, client))
    try:
        etcd.start()
        etcd.put(key("orders", "a"), {"cidrBlock": "127.0.0.2"})
        cfg = store_config(port, echo, etcd.client_url).replace(
            "cache = ", f'ca = "{certs.cert_path}", cert = "{client.cert_path}", '
                        f'key = "{client.key_path}", cache = ')
        moat(cfg)
        assert_echoes(port, "127.0.0.2")
        etcd.put(key("orders", "b"), {"cidrBlock": "127.0.0.3"})
        wait_admitted(port, "127.0.0.3")
    finally:
        etcd.cleanup()


def test_store_added_and_removed_by_a_reload(moat, echo, etcd, ports):
    port, admin = ports(2)
    etcd.put(key("orders", "a"), {"cidrBlock": "127.0.0.2"})
    plain = f"""
        [server]
        admin_listen = "127.0.0.1:{admin}"

        [[deployment]]
        name = "orders"
        listen = "127.0.0.1:{port}"
        upstream = "{echo.address}"
        [[deployment.allow]]
        cidr = "127.0.0.4"
    """
    m = moat(plain)
    wait_refused(port, "127.0.0.2", timeout=1)
    m.write_config(store_config(port, echo, etcd.client_url, admin=admin,
                                allow='[[deployment.allow]]\ncidr = "127.0.0.4"'))
    wait_admitted(port, "127.0.0.2", timeout=5)
    assert_echoes(port, "127.0.0.4")
    m.write_config(plain)
    wait_refused(port, "127.0.0.2", timeout=5)
    assert_echoes(port, "127.0.0.4")


API_KEY = "fleet-test-key-0123456789abcdef"


def api_config(port: int, api: int, echo, etcd: Etcd, allow: str = "") -> tuple[str, dict]:
    import hashlib
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    keys = f'[[key]]\nname = "portal"\nsha256 = "{digest}"\nrole = "write"\n'
    cfg = store_config(port, echo, etcd.client_url, allow=allow) + f"""
[api]
listen = "127.0.0.1:{api}"
keys = "api-keys.toml"
"""
    return cfg, {"api-keys.toml": keys}


def api_call(api: int, method: str, path: str, body=None, if_match: str | None = None,
             etag: list | None = None) -> tuple[int, bytes]:
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", api, timeout=10)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    if if_match:
        headers["If-Match"] = if_match
    try:
        conn.request(method, "/api/v1" + path, json.dumps(body) if body is not None else None, headers)
        r = conn.getresponse()
        if etag is not None:
            etag.append(r.getheader("ETag"))
        return r.status, r.read()
    finally:
        conn.close()


def test_api_writes_go_to_etcd_and_answer_once_enforced(moat, echo, etcd, ports, tmp_path):
    port, api, other_port = ports(3)
    # A host rule in the file: enforced, but not part of the API's (the store's) list.
    cfg, files = api_config(port, api, echo, etcd, allow='[[deployment.allow]]\ncidr = "127.0.0.9"')
    host = moat(cfg, extra_files=files, directory=tmp_path / "a")
    other = moat(store_config(other_port, echo, etcd.client_url), directory=tmp_path / "b")
    before = host.config_path.read_bytes()

    status, body = api_call(api, "POST", "/deployments/orders/accessList",
                            [{"cidrBlock": "127.0.0.2", "comment": "laptop"}])
    assert status == 201, body
    assert json.loads(body)["results"] == [{"cidrBlock": "127.0.0.2/32", "comment": "laptop"}]
    # In force on this host when the API answers: no polling.
    assert_echoes(port, "127.0.0.2")
    stored = etcd.keys("/moat/deployments/orders/accessList/")
    assert [json.loads(v) for v in stored.values()] == [{"cidrBlock": "127.0.0.2/32", "comment": "laptop"}]
    wait_admitted(other_port, "127.0.0.2", timeout=2)
    assert host.config_path.read_bytes() == before  # the file is never written

    status, body = api_call(api, "GET", "/deployments/orders/accessList/127.0.0.2%2F32/status")
    assert (status, json.loads(body)) == (200, {"status": "ACTIVE"})
    # A portal's direct write shows up in the API's list.
    etcd.put(key("orders", "portal-made"), {"cidrBlock": "127.0.0.5"})
    wait_admitted(port, "127.0.0.5")
    status, body = api_call(api, "GET", "/deployments/orders/accessList")
    assert status == 200 and json.loads(body)["totalCount"] == 2
    # GET /deployments counts what the list holds (the file's host rule is not in it).
    status, body = api_call(api, "GET", "/deployments")
    assert status == 200 and json.loads(body)["results"][0]["accessListEntries"] == 2
    # If-Match: the ETag of the list as read from etcd; a write by someone else voids it.
    tag: list = []
    api_call(api, "GET", "/deployments/orders/accessList", etag=tag)
    etcd.put(key("orders", "portal-made"), {"cidrBlock": "127.0.0.5", "comment": "changed"})
    status, _ = api_call(api, "POST", "/deployments/orders/accessList",
                         [{"cidrBlock": "127.0.0.6"}], if_match=tag[0])
    assert status == 412
    assert "127.0.0.6" not in str(etcd.keys("/moat/deployments/orders/accessList/"))

    status, body = api_call(api, "DELETE", "/deployments/orders/accessList/127.0.0.2%2F32")
    assert status == 204, body
    wait_refused(port, "127.0.0.2", timeout=0.5)
    wait_refused(other_port, "127.0.0.2", timeout=2)
    assert etcd.keys("/moat/deployments/orders/accessList/").keys() == {key("orders", "portal-made")}
    status, _ = api_call(api, "DELETE", "/deployments/orders/accessList/127.0.0.2%2F32")
    assert status == 404


def test_cli_writes_reach_other_hosts(moat, echo, etcd, ports, tmp_path):
    from moatlib import run_moat
    port, other_port = ports(2)
    cli_dir = tmp_path / "cli"
    cli_dir.mkdir()
    cfg = cli_dir / "moat.toml"
    cfg.write_text(store_config(free_port(), echo, etcd.client_url))
    before = cfg.read_bytes()
    moat(store_config(other_port, echo, etcd.client_url), directory=tmp_path / "host")

    r = run_moat(["access-list", "add", "-c", str(cfg), "--deployment", "orders", "127.0.0.3",
                  "--comment", "from the cli"])
    assert r.code == 0, r.output
    # The command returned once etcd accepted the write: it is stored.
    assert etcd.keys("/moat/deployments/orders/accessList/")
    wait_admitted(other_port, "127.0.0.3", timeout=2)
    r = run_moat(["access-list", "list", "-c", str(cfg), "--deployment", "orders"])
    assert r.code == 0 and "127.0.0.3/32" in r.stdout and "from the cli" in r.stdout
    r = run_moat(["access-list", "remove", "-c", str(cfg), "--deployment", "orders", "127.0.0.3"])
    assert r.code == 0, r.output
    wait_refused(other_port, "127.0.0.3", timeout=2)
    r = run_moat(["access-list", "remove", "-c", str(cfg), "--deployment", "orders", "127.0.0.3"])
    assert r.code == 1
    assert cfg.read_bytes() == before


def test_api_answers_503_while_etcd_is_down_and_enforcement_stays(moat, echo, etcd, ports, tmp_path):
    """With the store unreachable the API cannot read or write the access
    list: 503 with the JSON error body, the transport error in `detail`; the
    entries in force stay (fail-static), and the API works again after."""
    port, api = ports(2)
    cfg, files = api_config(port, api, echo, etcd)
    etcd.put(key("orders", "a"), {"cidrBlock": "127.0.0.2"})
    moat(cfg, extra_files=files, directory=tmp_path / "a")
    wait_admitted(port, "127.0.0.2")
    etcd.kill()
    for method, path, body in (("GET", "/deployments/orders/accessList", None),
                               ("POST", "/deployments/orders/accessList", [{"cidrBlock": "127.0.0.3"}]),
                               ("DELETE", "/deployments/orders/accessList/127.0.0.2%2F32", None)):
        status, answer = api_call(api, method, path, body)
        assert status == 503, (method, path, status, answer)
        err = json.loads(answer)
        # unreachable, or (a write already sent) unconfirmed: never a 500
        assert "fleet store (etcd)" in err["error"] and err["detail"][0].startswith("etcd: "), err
    assert_echoes(port, "127.0.0.2")
    etcd.start()
    status, _ = api_call(api, "POST", "/deployments/orders/accessList", [{"cidrBlock": "127.0.0.3"}])
    assert status == 201
    assert_echoes(port, "127.0.0.3")


def test_two_writers_with_one_etag_one_gets_412(moat, echo, etcd, ports, tmp_path):
    """SPEC 6.2: writers holding the same ETag, all at once: exactly one
    commits, every other one gets 412 and its entry is not stored."""
    import concurrent.futures
    port, api = ports(2)
    cfg, files = api_config(port, api, echo, etcd)
    moat(cfg, extra_files=files, directory=tmp_path / "a")
    tag: list = []
    status, _ = api_call(api, "GET", "/deployments/orders/accessList", etag=tag)
    assert status == 200 and tag[0]
    writers = 8
    with concurrent.futures.ThreadPoolExecutor(writers) as pool:
        answers = list(pool.map(
            lambda i: api_call(api, "POST", "/deployments/orders/accessList",
                               [{"cidrBlock": f"127.0.1.{i}"}], if_match=tag[0])[0],
            range(writers)))
    assert sorted(answers) == [201] + [412] * (writers - 1), answers
    assert len(etcd.keys("/moat/deployments/orders/accessList/")) == 1


def test_large_and_repeating_bodies_are_written_whole(moat, echo, etcd, ports, tmp_path):
    """More entries than one etcd transaction takes, and one CIDR twice in a
    body: written (the last one wins), never a 500, never truncated."""
    port, api, billing = ports(3)
    cfg, files = api_config(port, api, echo, etcd)
    cfg += f'\n[[deployment]]\nname = "billing"\nlisten = "127.0.0.1:{billing}"\nupstream = "{echo.address}"\n'
    moat(cfg, extra_files=files, directory=tmp_path / "a")
    many = [{"cidrBlock": f"10.{i // 256}.{i % 256}.0/24"} for i in range(300)]
    status, body = api_call(api, "POST", "/deployments/orders/accessList", many)
    assert status == 201, body
    assert json.loads(body)["totalCount"] == 300
    assert len(etcd.keys("/moat/deployments/orders/accessList/")) == 300
    # A copy of them all, too.
    status, body = api_call(api, "POST", "/deployments/billing/accessList/copy", {"from": "orders"})
    assert status == 201, body
    assert json.loads(body)["totalCount"] == 300
    # With If-Match it must be one transaction: a 400 naming the limit.
    tag: list = []
    api_call(api, "GET", "/deployments/orders/accessList", etag=tag)
    more = [{"cidrBlock": f"10.9.{i}.0/24"} for i in range(200)]
    status, body = api_call(api, "POST", "/deployments/orders/accessList", more, if_match=tag[0])
    assert status == 400 and b"128" in body, body
    # The same CIDR twice: the last one wins.
    status, body = api_call(api, "POST", "/deployments/orders/accessList",
                            [{"cidrBlock": "127.0.0.7", "comment": "first"},
                             {"cidrBlock": "127.0.0.7/32", "comment": "second"}])
    assert status == 201, body
    got = [e for e in json.loads(body)["results"] if e["cidrBlock"] == "127.0.0.7/32"]
    assert got == [{"cidrBlock": "127.0.0.7/32", "comment": "second"}]
