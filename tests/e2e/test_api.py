"""The access-list API (SPEC 6) and its CLI, over real HTTPS against the
real binary: the auth matrix, every route, the file-preservation property,
concurrent writers, If-Match, revocation, plan, bounds, read-only configs,
and a schemathesis run against docs/openapi.json."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

import moatlib
from moatlib import connect_from, recv_exactly, run_moat, wait_until

REPO = Path(__file__).resolve().parents[2]
WRITE, READ, SCOPED, OTHER = "write-key-0123", "read-key-4567", "scoped-key-89ab", "unknown-key"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_file(*keys: tuple[str, str, str, list | None]) -> str:
    out = ["# API keys (test)"]
    for name, key, role, deps in keys:
        out += ["", "[[key]]", f'name = "{name}"', f'sha256 = "{sha(key)}"', f'role = "{role}"']
        if deps is not None:
            out.append("deployments = [" + ", ".join(f'"{d}"' for d in deps) + "]")
    return "\n".join(out) + "\n"


DEFAULT_KEYS = keys_file(("portal", WRITE, "write", None), ("viewer", READ, "read", None),
                         ("orders-team", SCOPED, "write", ["orders"]))


class Api:
    """A running moat with [api] on HTTPS, and a small client for it."""

    def __init__(self, m, port: int, ca):
        self.m, self.port, self.ca = m, port, ca
        self.base = f"https://127.0.0.1:{port}/api/v1"

    def call(self, method: str, path: str, key: str | None = WRITE, headers=None, **kw):
        h = dict(headers or {})
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        return requests.request(method, self.base + path, headers=h, verify=str(self.ca.cert_path),
                                timeout=15, **kw)

    def entries(self, dep: str) -> list[dict]:
        r = self.call("GET", f"/deployments/{dep}/accessList")
        assert r.status_code == 200, r.text
        return r.json()["results"]


def config(api_port: int, admin: int, orders: int, billing: int, upstream: str, cert, extra="") -> str:
    return f"""\
# moat test config: this comment must survive API writes
[server]
admin_listen = "127.0.0.1:{admin}"   # metrics

[api]
listen = "127.0.0.1:{api_port}"
tls = {{ cert = "{cert.cert_path}", key = "{cert.key_path}" }}
keys = "api-keys.toml"
{extra}
[[deployment]]
name = "orders"
listen = "127.0.0.1:{orders}"
upstream = "{upstream}"

# the app servers
[[deployment.allow]]
cidr = "127.0.0.2"
description = "app server"

[[deployment]]
name = "billing"
listen = "127.0.0.1:{billing}"
upstream = "{upstream}"

[[deployment.allow]]
cidr = "192.0.2.0/24"
description = "billing hosts"

[[deployment]]
name = "public"
plan = "shared"
listen = "127.0.0.1:{billing + 1}"
upstream = "{upstream}"
"""


@pytest.fixture
def api(moat, certs, echo, ports):
    def start(keys: str = DEFAULT_KEYS, extra: str = "") -> Api:
        p = ports(5)
        cert = certs.issue("api", ["127.0.0.1"])
        text = config(p[0], p[1], p[2], p[3], echo.address, cert, extra)
        m = moat(text, {"api-keys.toml": keys})
        a = Api(m, p[0], certs)
        a.orders_port = p[2]
        return a
    return start


def closed(sock: socket.socket) -> bool:
    """Whether the peer closes (FIN or reset) within 5 s."""
    try:
        return moatlib.recv_until_eof(sock, timeout=5) == b""
    except ConnectionResetError:
        return True


def read_config(a: Api) -> str:
    return a.m.config_path.read_text()


# --------------------------------------------------------------------------- auth


def test_auth_matrix(api):
    a = api()
    r = a.call("GET", "/deployments", key=None)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert r.json()["error"]
    r = a.call("GET", "/deployments", key=OTHER)
    assert r.status_code == 401 and "Bearer" in r.headers["WWW-Authenticate"]
    assert a.call("GET", "/deployments", key=READ).status_code == 200
    body = [{"cidrBlock": "198.51.100.0/24"}]
    assert a.call("POST", "/deployments/orders/accessList", key=READ, json=body).status_code == 403
    assert a.call("DELETE", "/connections/1", key=READ).status_code == 403
    assert a.call("POST", "/plan", key=READ, data=read_config(a)).status_code == 200
    assert a.call("POST", "/deployments/orders/accessList", key=WRITE, json=body).status_code == 201
    # Scoped to orders: sees and writes orders only.
    names = [d["name"] for d in a.call("GET", "/deployments", key=SCOPED).json()["results"]]
    assert names == ["orders"]
    assert a.call("GET", "/deployments/billing/accessList", key=SCOPED).status_code == 403
    assert a.call("POST", "/deployments/billing/accessList", key=SCOPED, json=body).status_code == 403
    assert a.call("POST", "/deployments/orders/accessList/copy", key=SCOPED,
                  json={"from": "billing"}).status_code == 403
    assert a.call("GET", "/connections?deployment=billing", key=SCOPED).status_code == 403
    assert a.call("GET", "/deployments/orders/accessList", key=SCOPED).status_code == 200
    # Failed attempts are logged with the peer, never with the key.
    err = a.m.stderr_text()
    assert "127.0.0.1" in err and OTHER not in err and WRITE not in err
    m = a.m.metrics()
    assert moatlib.metric(m, "moat_api_requests_total", route="/api/v1/deployments",
                          method="GET", code="401") == 2


def test_a_removed_key_stops_working_at_once(api):
    a = api()
    assert a.call("GET", "/deployments", key=READ).status_code == 200
    keys = a.m.dir / "api-keys.toml"
    tmp = keys.with_name("keys.tmp")
    tmp.write_text(keys_file(("portal", WRITE, "write", None)))
    os.replace(tmp, keys)
    assert a.call("GET", "/deployments", key=READ).status_code == 401
    assert a.call("GET", "/deployments", key=WRITE).status_code == 200


def test_plain_http_is_refused_on_https(api):
    a = api()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{a.port}/api/v1/deployments", timeout=5)


# --------------------------------------------------------------------------- routes


def test_every_route(api):
    a = api()
    r = a.call("GET", "/deployments")
    assert r.status_code == 200
    deps = {d["name"]: d for d in r.json()["results"]}
    assert r.json()["totalCount"] == 3
    assert deps["orders"] == {"name": "orders", "plan": "dedicated", "listen": [f"127.0.0.1:{a.orders_port}"],
                              "tls": False, "accessListEntries": 1, "activeConnections": 0}
    assert deps["public"]["plan"] == "shared"

    r = a.call("GET", "/deployments/orders/accessList")
    assert r.json() == {"results": [{"cidrBlock": "127.0.0.2/32", "comment": "app server"}], "totalCount": 1}
    etag = r.headers["ETag"]

    r = a.call("POST", "/deployments/orders/accessList",
               json=[{"cidrBlock": "203.0.113.7", "comment": "on-call", "deleteAfterDate": "2099-12-31T00:00:00Z"},
                     {"awsSecurityGroup": "sg-0a1b2c3d", "awsAccountId": "123456789012"}])
    assert r.status_code == 201, r.text
    assert r.headers["ETag"] != etag
    assert r.json()["totalCount"] == 3
    assert {"cidrBlock": "203.0.113.7/32", "comment": "on-call",
            "deleteAfterDate": "2099-12-31T00:00:00Z"} in r.json()["results"]
    # In force when the answer comes: explain agrees, status is ACTIVE.
    assert a.call("GET", "/deployments/orders/accessList/203.0.113.7%2F32/status").json() == {"status": "ACTIVE"}
    assert a.call("GET", "/deployments/orders/accessList/sg-0a1b2c3d/status").json() == {"status": "ACTIVE"}
    assert a.call("GET", "/deployments/orders/accessList/198.51.100.1%2F32/status").status_code == 404

    # Replace: same CIDR, the omitted comment is cleared.
    r = a.call("POST", "/deployments/orders/accessList", json=[{"cidrBlock": "203.0.113.7/32"}])
    assert {"cidrBlock": "203.0.113.7/32"} in r.json()["results"] and r.json()["totalCount"] == 3

    assert a.call("DELETE", "/deployments/orders/accessList/203.0.113.7%2F32").status_code == 204
    assert a.call("DELETE", "/deployments/orders/accessList/203.0.113.7%2F32").status_code == 404
    assert a.call("DELETE", "/deployments/orders/accessList/sg-0a1b2c3d").status_code == 204
    assert a.call("DELETE", "/deployments/nope/accessList/10.0.0.0%2F8").status_code == 404
    assert a.call("GET", "/deployments/nope/accessList").status_code == 404

    r = a.call("POST", "/deployments/orders/accessList/copy", json={"from": "billing"})
    assert r.status_code == 201
    assert [e["cidrBlock"] for e in r.json()["results"]] == ["127.0.0.2/32", "192.0.2.0/24"]
    assert a.call("POST", "/deployments/orders/accessList/copy", json={"from": "nope"}).status_code == 404

    r = a.call("GET", "/connections")
    assert r.status_code == 200 and r.json() == {"results": [], "totalCount": 0}
    assert a.call("DELETE", "/connections/12345").status_code == 404
    assert a.call("DELETE", "/connections/abc").status_code == 404

    r = a.call("GET", "/openapi.json")
    assert r.status_code == 200 and r.json()["openapi"].startswith("3.1")
    assert r.json() == json.loads((REPO / "docs/openapi.json").read_text())

    r = a.call("GET", "/nope")
    assert r.status_code == 404 and r.json()["error"]
    r = a.call("PUT", "/deployments")  # unmatched routes are 404, whatever matched the path
    assert r.status_code == 404 and r.json()["detail"] == ["method: this path takes GET"]
    m = a.m.metrics()
    assert moatlib.metric(m, "moat_api_requests_total", route="/api/v1/deployments/{name}/accessList/{entry}",
                          method="DELETE", code="204") == 2


def test_invalid_writes_name_the_field_and_write_nothing(api):
    a = api()
    before = read_config(a)
    cases = [
        ([{"cidrBlock": "10.0.0.1/16"}], "cidrBlock"),
        ([{"cidrBlock": "10.0.0.0/16", "deleteAfterDate": "2001-01-01T00:00:00Z"}], "deleteAfterDate"),
        ([{"cidrBlock": "10.0.0.0/16", "deleteAfterDate": "soon"}], "deleteAfterDate"),
        ([{"awsSecurityGroup": "sg-0a1b2c3d"}], "awsAccountId"),
        ([{"cidrBlock": "10.0.0.0/16", "bogus": 1}], "bogus"),
        ([{"cidrBlock": 10}], "cidrBlock"),
        ({"cidrBlock": "10.0.0.0/16"}, "body"),
        ([], "body"),
    ]
    for body, field in cases:
        r = a.call("POST", "/deployments/orders/accessList", json=body)
        assert r.status_code == 400, (body, r.text)
        assert any(d.startswith(field) for d in r.json()["detail"]), (body, r.json())
    r = a.call("POST", "/deployments/orders/accessList", data=b"[{not json",
               headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"][0].startswith("body")
    r = a.call("POST", "/deployments/public/accessList", json=[{"cidrBlock": "10.0.0.0/16"}])
    assert r.status_code == 400 and "shared" in r.json()["error"]
    r = a.call("POST", "/deployments/nope/accessList", json=[{"cidrBlock": "10.0.0.0/16"}])
    assert r.status_code == 404
    r = a.call("DELETE", "/deployments/orders/accessList/not-a-cidr")
    assert r.status_code == 400 and r.json()["detail"][0].startswith("entry")
    r = a.call("GET", "/deployments/%FF/accessList")
    assert r.status_code == 400 and r.json()["detail"][0].startswith("path")
    r = a.call("POST", "/deployments/orders/accessList/copy", json={"form": "billing"})
    assert r.status_code == 400
    assert read_config(a) == before
    assert "result=400" in a.m.stderr_text()


# --------------------------------------------------------------------------- the file


def test_writes_keep_every_other_byte(api):
    a = api()
    before = read_config(a)
    r = a.call("POST", "/deployments/billing/accessList", json=[{"cidrBlock": "198.51.100.0/24", "comment": "vpn"}])
    assert r.status_code == 201
    after = read_config(a)
    block = '[[deployment.allow]]\ncidr = "198.51.100.0/24"\ndescription = "vpn"\n'
    at = before.index("[[deployment]]\nname = \"public\"")
    assert after == before[:at] + block + "\n" + before[at:]
    assert run_moat(["check", "-c", str(a.m.config_path)]).code == 0
    assert a.call("DELETE", "/deployments/billing/accessList/198.51.100.0%2F24").status_code == 204
    assert read_config(a) == before
    assert "action=\"add\"" in a.m.stderr_text() and "key=portal" in a.m.stderr_text()


def test_twenty_concurrent_writers_lose_nothing(api):
    a = api()
    results = []

    def write(i):
        r = a.call("POST", "/deployments/orders/accessList", json=[{"cidrBlock": f"198.51.100.{i}"}])
        results.append(r.status_code)
    threads = [threading.Thread(target=write, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [201] * 20
    got = {e["cidrBlock"] for e in a.entries("orders")}
    assert got == {"127.0.0.2/32"} | {f"198.51.100.{i}/32" for i in range(20)}


def test_if_match_makes_writes_conditional(api):
    a = api()
    etag = a.call("GET", "/deployments/orders/accessList").headers["ETag"]
    # Another deployment's change does not count.
    assert a.call("POST", "/deployments/billing/accessList", json=[{"cidrBlock": "198.51.100.0/24"}]).status_code == 201
    r = a.call("POST", "/deployments/orders/accessList", json=[{"cidrBlock": "198.51.100.1"}],
               headers={"If-Match": etag})
    assert r.status_code == 201
    r = a.call("POST", "/deployments/orders/accessList", json=[{"cidrBlock": "198.51.100.2"}],
               headers={"If-Match": etag})
    assert r.status_code == 412 and r.json()["error"]
    r = a.call("DELETE", "/deployments/orders/accessList/198.51.100.1%2F32", headers={"If-Match": etag})
    assert r.status_code == 412
    assert "198.51.100.2/32" not in {e["cidrBlock"] for e in a.entries("orders")}


def test_a_read_only_config_answers_409(api):
    a = api()
    before = read_config(a)
    a.m.config_path.chmod(0o444)
    r = a.call("POST", "/deployments/orders/accessList", json=[{"cidrBlock": "198.51.100.0/24"}])
    assert r.status_code == 409 and "source" in r.json()["error"]
    assert read_config(a) == before
    r = a.call("DELETE", "/deployments/orders/accessList/127.0.0.2%2F32")
    assert r.status_code == 409
    code, out, err = run_moat(["access-list", "add", "198.51.100.0/24", "--deployment", "orders",
                               "-c", str(a.m.config_path)])
    assert code == 1 and "source" in err
    assert read_config(a) == before


def test_a_symlinked_config_keeps_its_link(moat, certs, echo, ports, tmp_path):
    p = ports(5)
    cert = certs.issue("api", ["127.0.0.1"])
    release = tmp_path / "release-1"
    release.mkdir()
    text = config(p[0], p[1], p[2], p[3], echo.address, cert)
    (release / "moat.toml").write_text(text)
    (release / "api-keys.toml").write_text(DEFAULT_KEYS)
    link_dir = tmp_path / "etc"
    link_dir.mkdir()
    (link_dir / "moat.toml").symlink_to(release / "moat.toml")
    (link_dir / "api-keys.toml").write_text(DEFAULT_KEYS)
    code, out, err = run_moat(["access-list", "add", "198.51.100.9", "--deployment", "orders",
                               "-c", str(link_dir / "moat.toml"), "--comment", "laptop"])
    assert code == 0, err
    assert (link_dir / "moat.toml").is_symlink()
    assert 'cidr = "198.51.100.9/32"' in (release / "moat.toml").read_text()


# --------------------------------------------------------------------------- live connections


def test_delete_revokes_live_connections(api):
    a = api()
    a.call("POST", "/deployments/orders/accessList", json=[{"cidrBlock": "127.0.0.3", "comment": "second"}])
    s2 = connect_from("127.0.0.2", a.orders_port)
    s3 = connect_from("127.0.0.3", a.orders_port)
    for s in (s2, s3):
        s.sendall(b"hello")
        assert recv_exactly(s, 5) == b"hello"
    def listed():
        c = a.call("GET", "/connections").json()
        done = c["totalCount"] == 2 and all(x["bytesToUpstream"] == 5 for x in c["results"])
        return c if done else None
    conns = wait_until(listed, what="2 connections listed, 5 bytes each")
    by_source = {c["source"]: c for c in conns["results"]}
    c2 = by_source["127.0.0.2"]
    assert c2["deployment"] == "orders" and c2["tls"] is False and c2["sni"] is None
    assert c2["bytesToUpstream"] == 5 and "app server" in c2["rule"]
    assert a.call("GET", "/connections?deployment=billing").json()["totalCount"] == 0
    assert a.call("GET", "/deployments").json()["results"][0]["activeConnections"] == 2

    # DELETE the entry that alone admits 127.0.0.2: that connection is revoked at once.
    assert a.call("DELETE", "/deployments/orders/accessList/127.0.0.2%2F32").status_code == 204
    assert closed(s2)
    s3.sendall(b"still")
    assert recv_exactly(s3, 5) == b"still"

    # DELETE /connections/{id}: closed, counted as revoked; then 404.
    c3 = by_source["127.0.0.3"]["id"]
    assert a.call("DELETE", f"/connections/{c3}").status_code == 204
    assert closed(s3)
    assert a.call("DELETE", f"/connections/{c3}").status_code == 404
    a.m.wait_metric("moat_revoked_connections_total", 2, deployment="orders")


def test_plan_reports_and_applies_nothing(api, tmp_path):
    a = api()
    s2 = connect_from("127.0.0.2", a.orders_port)
    s2.sendall(b"x")
    assert recv_exactly(s2, 1) == b"x"
    wait_until(lambda: a.call("GET", "/connections").json()["totalCount"] == 1, what="connection listed")
    before = read_config(a)
    candidate = before.replace('cidr = "127.0.0.2"', 'cidr = "198.51.100.0/24"')
    r = a.call("POST", "/plan", data=candidate.encode(), headers={"Content-Type": "application/toml"})
    assert r.status_code == 200, r.text
    plan = r.json()
    assert plan["valid"] is True and plan["errors"] == []
    orders = next(d for d in plan["deployments"] if d["name"] == "orders")
    assert orders["added"] == ["198.51.100.0/24"] and orders["removed"] == ["127.0.0.2/32"]
    assert [x["source"] for x in orders["revokes"]] == ["127.0.0.2"]
    billing = next(d for d in plan["deployments"] if d["name"] == "billing")
    assert billing == {"name": "billing", "added": [], "removed": [], "revokes": []}
    # Nothing applied: the connection lives, the file is the same.
    s2.sendall(b"y")
    assert recv_exactly(s2, 1) == b"y"
    assert read_config(a) == before

    r = a.call("POST", "/plan", data=candidate.replace('"198.51.100.0/24"', '"198.51.100.1/24"'))
    assert r.json()["valid"] is False and "host bits" in r.json()["errors"][0]

    # The CLI: the running config from MOAT_CONFIG, the key from MOAT_API_KEY.
    new = tmp_path / "new.toml"
    new.write_text(candidate)
    env = {"MOAT_CONFIG": str(a.m.config_path), "MOAT_API_KEY": READ}
    code, out, err = run_moat(["plan", "-c", str(new)], env=env)
    assert code == 0, err
    assert "orders: +198.51.100.0/24 -127.0.0.2/32" in out and "127.0.0.2" in out
    new.write_text(candidate.replace('"198.51.100.0/24"', '"198.51.100.1/24"'))
    assert run_moat(["plan", "-c", str(new)], env=env).code == 1
    code, out, err = run_moat(["connections"], env=env)
    assert code == 0 and "127.0.0.2" in out
    code, out, err = run_moat(["connections", "--json", "--deployment", "orders"], env=env)
    assert code == 0 and json.loads(out)["totalCount"] == 1
    assert run_moat(["connections"], env={**env, "MOAT_API_KEY": OTHER}).code == 2
    a.m.kill()
    assert run_moat(["connections"], env=env).code == 2
    assert run_moat(["plan", "-c", str(new)], env=env).code == 2


# --------------------------------------------------------------------------- bounds


def test_bounds(api):
    a = api()
    r = a.call("POST", "/deployments/orders/accessList", data=b"[" + b" " * (1024 * 1024) + b"]",
               headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]
    r = a.call("POST", "/plan", data=b"#" * (1024 * 1024 + 1))
    assert r.status_code == 413
    # Headers: up to 16 KiB and 256 of them; above either, 431.
    many = {f"X-Probe-{i}": "1" for i in range(200)}
    assert a.call("GET", "/deployments", headers=many).status_code == 200
    assert a.call("GET", "/deployments", headers={"X-Big": "x" * (17 * 1024)}).status_code == 431
    # HEAD is GET without the body.
    r = a.call("HEAD", "/deployments")
    assert r.status_code == 200 and r.content == b"" and r.headers["Content-Type"] == "application/json"
    # At most 256 API connections: the 257th is closed at once, not queued.
    held = [socket.create_connection(("127.0.0.1", a.port), timeout=5) for _ in range(256)]
    try:
        # Once the API has taken all 256, the next one is closed at once.
        def refused() -> bool:
            try:
                a.call("GET", "/deployments")
                return False  # the API had not taken all 256 yet
            except requests.exceptions.ConnectionError:
                return True
        wait_until(refused, 10, interval=0.05, what="the 257th connection refused")
        a.m.wait_stderr(r"API connection refused: 256 API connections are open")
        started = time.monotonic()
        with pytest.raises(requests.exceptions.ConnectionError):
            a.call("GET", "/deployments")
        assert time.monotonic() - started < 3
    finally:
        for h in held:
            h.close()

    def answers() -> bool:
        try:
            return a.call("GET", "/deployments").status_code == 200
        except requests.exceptions.ConnectionError:
            return False  # the held connections are still being released
    wait_until(answers, 10, interval=0.1, what="the API answers again")
    # A request that does not arrive within 10 s is closed.
    import ssl
    ctx = moatlib.ssl_client_context(a.ca)
    raw = socket.create_connection(("127.0.0.1", a.port), timeout=20)
    s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    s.sendall(b"GET /api/v1/deployments HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    try:
        data = s.recv(4096)
        while data:
            data = s.recv(4096)
    except (ssl.SSLError, ConnectionResetError):
        pass
    assert 8 < time.monotonic() - started < 15
    # The API still answers.
    assert a.call("GET", "/deployments").status_code == 200


# --------------------------------------------------------------------------- CLI


def test_cli_access_list_without_a_daemon(tmp_path):
    cfg = tmp_path / "moat.toml"
    text = ('# hand-written\n[[deployment]]\nname = "orders"\nlisten = "127.0.0.1:1"\nupstream = "127.0.0.1:2"\n\n'
            '[[deployment.allow]]\ncidr = "10.0.0.0/16"  # keep me\n\n'
            '[[deployment]]\nname = "billing"\nlisten = "127.0.0.1:3"\nupstream = "127.0.0.1:4"\n')
    cfg.write_text(text)
    c = ["-c", str(cfg), "--deployment", "orders"]
    code, out, err = run_moat(["access-list", "add", "203.0.113.7", *c, "--comment", "on-call",
                               "--delete-after", "2099-01-01T00:00:00Z"])
    assert code == 0, err
    code, out, err = run_moat(["access-list", "list", *c])
    assert code == 0 and "203.0.113.7/32" in out and "on-call" in out and "10.0.0.0/16" in out
    assert "# keep me" in cfg.read_text()
    code, out, err = run_moat(["access-list", "add", "sg-0a1b2c3d", *c, "--aws-account", "123456789012"])
    assert code == 0, err
    code, out, err = run_moat(["access-list", "add", "10.0.0.1/16", *c])
    assert code == 1 and "host bits" in err
    code, out, err = run_moat(["access-list", "remove", "198.51.100.0/24", *c])
    assert code == 1 and "no access-list entry" in err
    assert run_moat(["access-list", "add", "10.1.0.0/16", "-c", str(cfg), "--deployment", "nope"]).code == 1
    assert run_moat(["access-list", "add", "-c", str(cfg), "--deployment", "orders"]).code == 2
    assert run_moat(["access-list", "frobnicate", *c]).code == 2
    code, out, err = run_moat(["access-list", "copy", "-c", str(cfg), "--deployment", "billing", "--from", "orders"])
    assert code == 0, err
    code, out, err = run_moat(["access-list", "list", "-c", str(cfg), "--deployment", "billing", "--json"])
    assert json.loads(out)["totalCount"] == 3
    code, out, err = run_moat(["access-list", "remove", "203.0.113.7", *c])
    assert code == 0, err
    assert run_moat(["check", "-c", str(cfg)]).code == 0


def test_cli_remove_names_the_account_of_a_group(tmp_path):
    """SPEC 1: `remove` takes --aws-account like `add`: the same sg- id in
    two accounts is two entries, and the flag removes the one it names."""
    cfg = tmp_path / "moat.toml"
    cfg.write_text('[[deployment]]\nname = "orders"\nlisten = "127.0.0.1:1"\nupstream = "127.0.0.1:2"\n')
    c = ["-c", str(cfg), "--deployment", "orders"]
    for account in ("111111111111", "222222222222"):
        code, _, err = run_moat(["access-list", "add", "sg-0a1b2c3d", *c, "--aws-account", account])
        assert code == 0, err
    code, _, err = run_moat(["access-list", "remove", "sg-0a1b2c3d", *c, "--aws-account", "111111111111"])
    assert code == 0, err
    code, out, err = run_moat(["access-list", "list", *c, "--json"])
    left = json.loads(out)["results"]
    assert [(e["awsSecurityGroup"], e["awsAccountId"]) for e in left] == [("sg-0a1b2c3d", "222222222222")]
    code, _, err = run_moat(["access-list", "remove", "sg-0a1b2c3d", *c, "--aws-account", "111111111111"])
    assert code == 1 and "no access-list entry" in err
    code, _, err = run_moat(["access-list", "remove", "10.0.0.0/8", *c, "--aws-account", "111111111111"])
    assert code == 1 and "--aws-account" in err
    code, _, err = run_moat(["access-list", "remove", "sg-0a1b2c3d", *c])
    assert code == 0, err


def test_cli_edits_reach_a_running_daemon(api):
    a = api()
    code, out, err = run_moat(["access-list", "add", "198.51.100.7", "--deployment", "orders",
                               "-c", str(a.m.config_path)])
    assert code == 0, err
    wait_until(lambda: a.call("GET", "/deployments/orders/accessList/198.51.100.7%2F32/status").json()
               == {"status": "ACTIVE"}, what="the CLI's edit in force")


def test_api_key_new(api):
    code, out, err = run_moat(["api-key", "new", "--name", "ci", "--role", "write", "--deployment", "orders"])
    assert code == 0, err
    key = out.splitlines()[0].strip()
    block = out[out.index("[[key]]"):]
    assert sha(key) in block and 'role = "write"' in block and 'deployments = ["orders"]' in block
    assert len(key) >= 43
    assert run_moat(["api-key", "new", "--name", "x", "--role", "admin"]).code == 2
    a = api(keys=DEFAULT_KEYS + "\n" + block)
    assert a.call("GET", "/deployments/orders/accessList", key=key).status_code == 200
    assert a.call("GET", "/deployments/billing/accessList", key=key).status_code == 403


def test_check_validates_the_api_table(check, certs):
    base = '[[deployment]]\nname = "orders"\nlisten = "127.0.0.1:1"\nupstream = "127.0.0.1:2"\n'
    r = check('[api]\nlisten = "0.0.0.0:9912"\nkeys = "k.toml"\n' + base, {"k.toml": ""})
    assert r.code == 1 and "moat.toml:2:10" in r.stderr and "TLS" in r.stderr
    r = check('[api]\nlisten = "127.0.0.1:9912"\nkeys = "missing.toml"\n' + base)
    assert r.code == 1 and "missing.toml" in r.stderr
    bad = '[[key]]\nname = "a"\nsha256 = "abc"\nrole = "admin"\ndeployments = ["nope"]\n'
    r = check('[api]\nlisten = "127.0.0.1:9912"\nkeys = "k.toml"\n' + base, {"k.toml": bad})
    assert r.code == 1
    assert "k.toml:3:10" in r.stderr and "64 hex" in r.stderr
    assert "k.toml:4:8" in r.stderr and "admin" in r.stderr
    assert "k.toml:5:16" in r.stderr and "nope" in r.stderr
    r = check('[api]\nlisten = "127.0.0.1:9912"\nkeys = "k.toml"\n' + base, {"k.toml": "[[key]\n"})
    assert r.code == 1 and "k.toml:1" in r.stderr
    r = check('[api]\nlisten = "127.0.0.1:9912"\nkeys = "k.toml"\n' + base, {"k.toml": DEFAULT_KEYS})
    assert r.code == 0, r.stderr


# --------------------------------------------------------------------------- schemathesis


@pytest.mark.timeout(600)
def test_schemathesis_finds_nothing(api, tmp_path):
    exe = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "schemathesis"
    if not exe.exists():
        exe = shutil.which("schemathesis")
    assert exe, "schemathesis is not installed (tests/requirements.txt)"
    a = api()
    cmd = [str(exe), "run", str(REPO / "docs/openapi.json"), "--url", a.base,
           "-H", f"Authorization: Bearer {WRITE}", "--tls-verify", str(a.ca.cert_path),
           "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                       "response_headers_conformance,response_schema_conformance",
           "--max-examples", "10", "--max-time", "100", "--seed", "1",
           "--report", "junit", "--report-dir", str(tmp_path / "report")]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": str(Path(__file__).parent)}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=500, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stdout[-20000:] + p.stderr[-5000:]
    assert a.m.running()
    assert "panicked" not in a.m.stderr_text()


# --------------------------------------------------------------------------- README


def test_readme_curl_examples_work(api, tmp_path):
    """The README's curl block, run as written against a live API."""
    assert shutil.which("curl"), "curl is needed (test.sh installs it)"
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Access-list API"):readme.index("## Tests and fuzzing")]
    block = next(b for b in section.split("```sh\n")[1:] if b.startswith("# every deployment"))
    block = block[:block.index("```")]
    a = api()
    (tmp_path / "moat.toml.new").write_text(read_config(a).replace('"127.0.0.2"', '"198.51.100.0/24"'))
    env = {**os.environ, "API": a.base, "KEY": WRITE, "CA": str(a.ca.cert_path)}
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert '"totalCount":3' in out                      # GET /deployments
    assert "etag:" in out.lower()                       # GET accessList -i
    assert '"status":"ACTIVE"' in out                   # status after the add
    assert '"valid":true' in out and "198.51.100.0/24" in out   # plan
    assert '"openapi":"3.1.0"' in out.replace(" ", "")
    entries = {e.get("cidrBlock") or e.get("awsSecurityGroup") for e in a.entries("orders")}
    # Added then removed; the If-Match example's made-up tag was refused (412); billing copied.
    assert entries == {"127.0.0.2/32", "192.0.2.0/24"}, entries
