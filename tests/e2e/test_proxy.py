"""Plaintext admission and proxying through the real moat binary (SPEC 3.1,
3.2, and the metrics of 4): rules by /32, /24 and IPv6, dual-stack listeners,
most-specific rule reporting, copy_rules_from, security groups, expiring
rules, the shared plan, byte transparency, half-close, upstream errors and
connection limits."""

from __future__ import annotations

import os
import re
import socket
import time

import pytest
from _proxylib import (FinFirstUpstream, close_all, closed_by_peer, echo_conn, free_dual_port, is_refused,
                       label_values, looks_like_ip, quiet_ports, refusal_outcome, rfc3339_in, rule, server, sha,
                       start_retrying, transfer, wait_outcomes)
from moatlib import (TEST_NET_1, TEST_NET_V6, assert_echoes, assert_refused, connect_from, fmt_addr,
                     metric_sum, recv_exactly, recv_until_eof, run_explain, stays_false, wait_until)


def dep(name: str, listen, upstream: str, body: str = "") -> str:
    if isinstance(listen, str):
        listen_toml = f'"{listen}"'
    else:
        listen_toml = "[" + ", ".join(f'"{a}"' for a in listen) + "]"
    return f'[[deployment]]\nname = "{name}"\nlisten = {listen_toml}\nupstream = "{upstream}"\n{body}\n'




# --------------------------------------------------------------------------
# Admission by CIDR
# --------------------------------------------------------------------------


def test_allowed_by_slash32_and_slash24_refused_otherwise(moat, echo, ports):
    port, admin = ports(2)
    m = moat(server(admin) + dep("orders", f"127.0.0.1:{port}", echo.address,
                                 rule("127.0.0.2", "one host") + rule("127.0.1.0/24", "a subnet")))
    assert_echoes(port, "127.0.0.2", b"by /32")
    assert_echoes(port, "127.0.1.77", b"by /24")
    assert_echoes(port, "127.0.1.254", b"by /24 again")
    echo.wait_connections(3)
    assert sorted(p[0] for p in echo.peers) == ["127.0.0.1"] * 3  # moat dials from loopback
    seen = echo.connection_count
    for src in ("127.0.0.3", "127.0.2.1", "127.0.0.1"):
        outcome = refusal_outcome(port, src, send=b"must not reach mongod")
        assert is_refused(outcome), f"{src}: {outcome}"
    assert stays_false(lambda: echo.connection_count > seen, 0.3), "a refused source reached the upstream"
    assert b"must not reach mongod" not in echo.bytes_received
    wait_outcomes(m, "orders", {"allowed": 3, "denied": 3})


def test_refused_connection_never_touches_upstream(moat, echo, ports):
    port = ports()
    moat(dep("orders", f"127.0.0.1:{port}", echo.address, rule(TEST_NET_1, "nobody local")))
    # the readiness probe (from 127.0.0.1) was refused too: the upstream saw nothing at all
    assert_refused(port, "127.0.0.2", upstream=echo)
    assert_refused(port, "127.0.0.3", upstream=echo, send=b"")


def test_allowed_by_ipv6_rule(moat, echo, ports, need_ipv6):
    port = ports(host="::1")
    port4, admin = ports(2)
    m = moat(server(admin) + dep("v6", [fmt_addr("::1", port), f"127.0.0.1:{port4}"], echo.address,
                                 rule("::1/128", "ipv6 loopback") + rule(TEST_NET_V6, "doc net")))
    assert_echoes(port, "::1", b"over ipv6")
    # an IPv4 source is not in any IPv6 rule
    assert_refused(port4, "127.0.0.2")
    wait_outcomes(m, "v6", {"allowed": 1, "denied": 1})


def test_dual_stack_listener_admits_ipv4_client_by_ipv4_rule(moat, echo, ports, need_ipv6):
    chosen = {}

    def config():
        chosen["port"] = port = free_dual_port()
        return server(ports()) + dep("dual", f"[::]:{port}", echo.address,
                                     rule("127.0.0.2", "v4 client") + rule("::1", "v6 client"))
    m = start_retrying(moat, config)
    port = chosen["port"]
    # plain IPv4 socket to 127.0.0.1:P, accepted by the [::] socket as ::ffff:127.0.0.2
    assert_echoes(port, "127.0.0.2", b"v4 on dual stack")
    # the same through an AF_INET6 socket with a v4-mapped source
    assert_echoes(port, "::ffff:127.0.0.2", b"mapped", family=socket.AF_INET6)
    assert_echoes(port, "::1", b"v6 on dual stack")
    assert is_refused(refusal_outcome(port, "127.0.0.3", send=b"x"))
    wait_outcomes(m, "dual", {"allowed": 3, "denied": 1})
    # the log names the IPv4 address, not the mapped form
    m.wait_stderr(r"source=127\.0\.0\.3\b")
    assert "::ffff:127.0.0.3" not in m.stderr_text()


def test_both_wildcard_listeners_bind_and_work(moat, echo, ports, need_ipv6):
    chosen = {}

    def config():
        chosen["port"] = port = free_dual_port()
        return server(ports()) + dep("both", [f"0.0.0.0:{port}", f"[::]:{port}"], echo.address,
                                     rule("127.0.0.2", "v4 client") + rule("::1", "v6 client"))
    m = start_retrying(moat, config)
    port = chosen["port"]
    assert m.running()
    assert_echoes(port, "127.0.0.2", b"via 0.0.0.0")
    assert_echoes(port, "::1", b"via [::]")
    assert is_refused(refusal_outcome(port, "127.0.0.4", send=b"x"))
    wait_outcomes(m, "both", {"allowed": 2, "denied": 1})
    assert not re.search(r"(?i)address (already )?in use", m.stderr_text())


# --------------------------------------------------------------------------
# Which rule
# --------------------------------------------------------------------------

NESTED = (rule("127.0.0.0/8", "all loopback") + rule("127.0.0.0/24", "first loopback /24")
          + rule("127.0.0.2", "exact host") + rule("127.0.0.0/16", "loopback /16"))


def test_most_specific_rule_reported_by_explain_and_log(moat, echo, ports, tmp_path):
    port, admin = ports(2)
    text = server(admin) + dep("orders", f"127.0.0.1:{port}", echo.address, NESTED)
    for ip, desc, net in [("127.0.0.2", "exact host", "127.0.0.2/32"),
                          ("127.0.0.3", "first loopback /24", "127.0.0.0/24"),
                          ("127.0.5.3", "loopback /16", "127.0.0.0/16"),
                          ("127.9.5.3", "all loopback", "127.0.0.0/8")]:
        r = run_explain(text, "orders", ip, directory=tmp_path / f"ex-{ip}")
        assert r.code == 0, r.output
        assert f'allow orders {ip} by "{desc}" ({net})' in r.stdout, r.output
    r = run_explain(text, "orders", "192.0.2.1", directory=tmp_path / "ex-deny")
    assert r.code == 1 and "deny orders 192.0.2.1: no rule matches" in r.stdout, r.output

    m = moat(text)
    assert_echoes(port, "127.0.0.2", b"exact")
    assert_echoes(port, "127.0.0.3", b"slash24")
    # the connection's log line (written when it ends) names the rule that admitted it
    line2 = m.wait_stderr(r"[^\n]*source=127\.0\.0\.2\b[^\n]*").group(0)
    line3 = m.wait_stderr(r"[^\n]*source=127\.0\.0\.3\b[^\n]*").group(0)
    assert "exact host" in line2 and "127.0.0.2/32" in line2, line2
    assert "first loopback /24" in line3 and "127.0.0.0/24" in line3, line3
    assert "all loopback" not in line2 + line3


# --------------------------------------------------------------------------
# copy_rules_from, security groups, shared plan
# --------------------------------------------------------------------------


def test_copy_rules_from_transitive_and_cyclic(moat, echo, ports, tmp_path):
    pa, pb, pc, px, py, admin = ports(6)
    text = (server(admin)
            + dep("a", f"127.0.0.1:{pa}", echo.address, 'copy_rules_from = ["b"]\n' + rule("127.0.0.2", "a own"))
            + dep("b", f"127.0.0.1:{pb}", echo.address, 'copy_rules_from = ["c"]\n' + rule("127.0.0.3", "b own"))
            + dep("c", f"127.0.0.1:{pc}", echo.address, rule("127.0.0.4", "c own"))
            + dep("x", f"127.0.0.1:{px}", echo.address, 'copy_rules_from = ["y"]\n' + rule("127.0.0.5", "x own"))
            + dep("y", f"127.0.0.1:{py}", echo.address, 'copy_rules_from = ["x"]\n' + rule("127.0.0.6", "y own")))
    m = moat(text)
    # a = a + b + c
    for src in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        assert_echoes(pa, src, f"a from {src}".encode())
    # b = b + c, not a
    for src in ("127.0.0.3", "127.0.0.4"):
        assert_echoes(pb, src)
    assert is_refused(refusal_outcome(pb, "127.0.0.2", send=b"x"))
    # c = c only (copying is not symmetric)
    assert_echoes(pc, "127.0.0.4")
    for src in ("127.0.0.2", "127.0.0.3"):
        assert is_refused(refusal_outcome(pc, src, send=b"x"))
    # the cycle x <-> y: both get the union
    for p in (px, py):
        for src in ("127.0.0.5", "127.0.0.6"):
            assert_echoes(p, src)
        assert is_refused(refusal_outcome(p, "127.0.0.7", send=b"x"))
    wait_outcomes(m, "a", {"allowed": 3})
    wait_outcomes(m, "b", {"allowed": 2, "denied": 1})
    wait_outcomes(m, "c", {"allowed": 1, "denied": 2})
    r = run_explain(text, "a", "127.0.0.4", directory=tmp_path / "ex")
    assert r.code == 0 and '"c own"' in r.stdout, r.output


SG_FILE = """\
[[group]]
aws_account = "123456789012"
id = "sg-0a1b2c3d"
members = ["127.0.0.7", "127.0.3.0/28"]

[[group]]
aws_account = "123456789012"
id = "sg-0a1b2c3e"
members = ["127.0.0.8"]
"""


def test_security_group_members_admitted(moat, echo, ports):
    port, admin = ports(2)
    text = (server(admin) + '[security_groups]\nfile = "sg.toml"\n\n'
            + dep("orders", f"127.0.0.1:{port}", echo.address,
                  '[[deployment.allow]]\naws_account = "123456789012"\nsecurity_group = "sg-0a1b2c3d"\n'
                  'description = "web tier"\n'))
    m = moat(text, {"sg.toml": SG_FILE})
    assert_echoes(port, "127.0.0.7", b"member")
    assert_echoes(port, "127.0.3.9", b"member by cidr")
    echo.wait_connections(2)
    n = echo.connection_count
    for src in ("127.0.0.8", "127.0.3.16", "127.0.0.2"):  # another group's member, outside the /28, nobody
        assert is_refused(refusal_outcome(port, src, send=b"x")), src
    assert stays_false(lambda: echo.connection_count > n, 0.3)
    wait_outcomes(m, "orders", {"allowed": 2, "denied": 3})
    line = m.wait_stderr(r"[^\n]*source=127\.0\.0\.7\b[^\n]*").group(0)
    assert "web tier" in line, line


def test_shared_plan_admits_every_source(moat, echo, ports, has_ipv6):
    port, admin = ports(2)
    listen = [f"127.0.0.1:{port}"]
    port6 = None
    if has_ipv6:
        port6 = ports(host="::1")
        listen.append(fmt_addr("::1", port6))
    m = moat(server(admin) + dep("public", listen, echo.address, 'plan = "shared"\n'))
    srcs = ["127.0.0.1", "127.0.0.2", "127.1.2.3", "127.255.255.254"]
    for src in srcs:
        assert_echoes(port, src, f"shared {src}".encode())
    n = len(srcs)
    if port6:
        assert_echoes(port6, "::1", b"shared v6")
        n += 1
    wait_outcomes(m, "public", {"allowed": n})


# --------------------------------------------------------------------------
# Expiring rules
# --------------------------------------------------------------------------


def test_expiring_rule_admits_then_refuses_and_revokes_without_reload(moat, echo, ports):
    port, admin = ports(2)
    lead = 6.0
    expires, at = rfc3339_in(lead)
    m = moat(server(admin) + dep("orders", f"127.0.0.1:{port}", echo.address,
                                 rule("127.0.0.2", "temporary", f'expires = "{expires}"')
                                 + rule("127.0.0.3", "permanent")))
    if time.time() > at - 1.0:
        pytest.skip("moat took too long to start on this machine to observe the rule before it expires")
    temp = echo_conn(port, "127.0.0.2", b"before expiry")
    keep = echo_conn(port, "127.0.0.3", b"keeper")
    reloads_before = m.metric("moat_config_reloads_total", result="success")
    try:
        assert time.time() < at, "the rule expired during setup"
        # the live connection admitted only by the expiring rule is closed at the instant
        assert closed_by_peer(temp, timeout=(at - time.time()) + 10.0), "connection not revoked at expiry"
        assert time.time() >= at - 0.5, "closed well before the rule's expiry instant"
        m.wait_metric("moat_revoked_connections_total", 1, deployment="orders")
        # new connections from that source are refused now
        assert_refused(port, "127.0.0.2", upstream=None)
        # the other source's live connection keeps running
        keep.sendall(b"still here")
        assert recv_exactly(keep, 10) == b"still here"
        assert_echoes(port, "127.0.0.3", b"new permanent")
    finally:
        close_all([temp, keep])
    assert m.metric("moat_config_reloads_total", result="success") == reloads_before
    assert m.metric("moat_revoked_connections_total", deployment="orders") == 1
    wait_outcomes(m, "orders", {"allowed": 3, "denied": 1})


# --------------------------------------------------------------------------
# Proxying
# --------------------------------------------------------------------------


def test_byte_transparency_8mb_each_way(moat, echo, ports):
    port, admin = ports(2)
    m = moat(server(admin) + dep("orders", f"127.0.0.1:{port}", echo.address, rule("127.0.0.2", "c")))
    data = os.urandom(8 << 20)
    back = transfer(port, "127.0.0.2", data, timeout=90)
    assert len(back) == len(data), f"{len(back)} of {len(data)} bytes came back"
    assert sha(back) == sha(data)
    wait_until(lambda: len(echo.bytes_received) >= len(data), 10, what="upstream got everything")
    assert sha(echo.bytes_received) == sha(data)
    m.wait_metric("moat_bytes_total", lambda v: v >= len(data), deployment="orders", direction="to_upstream")
    m.wait_metric("moat_bytes_total", lambda v: v >= len(data), deployment="orders", direction="to_client")
    m.wait_metric("moat_connections_active", 0, deployment="orders")


def test_all_byte_values_and_small_writes(moat, echo, ports):
    port = ports()
    moat(dep("orders", f"127.0.0.1:{port}", echo.address, rule("127.0.0.2", "c")))
    every = bytes(range(256)) * 4
    with connect_from("127.0.0.2", port) as s:
        for i in range(0, len(every), 7):  # many tiny segments
            s.sendall(every[i:i + 7])
        assert recv_exactly(s, len(every), 10) == every
    assert echo.bytes_received == every


def test_half_close_is_passed_on(moat, echo_factory, ports):
    held = echo_factory(hold_until_eof=True)
    port = ports()
    moat(dep("orders", f"127.0.0.1:{port}", held.address, rule("127.0.0.2", "c")))
    payload = os.urandom(1 << 20)
    with connect_from("127.0.0.2", port, timeout=30) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        # upstream sees the FIN only; it answers after it, so the other direction must still flow
        wait_until(lambda: held.conns and held.conns[0].eof, 10, what="upstream to see EOF")
        back = recv_until_eof(s, timeout=30)
    assert sha(back) == sha(payload) and len(back) == len(payload)
    assert held.connection_count == 1
    assert sha(bytes(held.conns[0].received)) == sha(payload)


def test_server_first_greeting_then_client_half_close(moat, echo_factory, ports):
    """An upstream that speaks first (greeting) and then only reads: the
    greeting reaches the client, the client's bytes and its FIN reach the
    upstream, and the upstream's answering FIN reaches the client."""
    up = echo_factory(echo=False, greeting=b"hello from upstream")
    port = ports()
    moat(dep("orders", f"127.0.0.1:{port}", up.address, rule("127.0.0.2", "c")))
    with connect_from("127.0.0.2", port, timeout=10) as s:
        assert recv_exactly(s, 19) == b"hello from upstream"
        s.sendall(b"a" * 100_000)
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s, timeout=10) == b""
    wait_until(lambda: up.conns and up.conns[0].eof, 10, what="upstream EOF")
    assert bytes(up.conns[0].received) == b"a" * 100_000


def test_upstream_half_close_while_client_keeps_sending(moat, ports):
    """The upstream sends a greeting and FIN first; the client gets the
    greeting then EOF, and can still send: its bytes and FIN reach upstream."""
    up = FinFirstUpstream(b"server speaks first")
    try:
        port = ports()
        moat(dep("orders", f"127.0.0.1:{port}", up.address, rule("127.0.0.2", "c")))
        payload = os.urandom(512 * 1024)
        with connect_from("127.0.0.2", port, timeout=10) as s:
            assert recv_until_eof(s, timeout=10) == b"server speaks first"
            s.sendall(payload)  # after the upstream's FIN, this direction still flows
            s.shutdown(socket.SHUT_WR)
            wait_until(lambda: up.eof and up.eof[0], 10, what="upstream to see the client's FIN")
        assert sha(bytes(up.received[0])) == sha(payload)
    finally:
        up.close()


def test_upstream_errors_release_limit_slots(moat, echo, ports):
    good, down, admin, dead = ports(4)
    m = moat(server(admin) + '[limits]\nmax_connections = 2\nmax_connections_per_ip = 2\n\n'
             + dep("down", f"127.0.0.1:{down}", f"127.0.0.1:{dead}", rule("127.0.0.2", "c"))
             + dep("good", f"127.0.0.1:{good}", echo.address, rule("127.0.0.2", "c")))
    for _ in range(5):
        assert is_refused(refusal_outcome(down, "127.0.0.2", send=b"x"))
    wait_outcomes(m, "down", {"upstream_error": 5})
    held = [echo_conn(good, "127.0.0.2"), echo_conn(good, "127.0.0.2")]
    close_all(held)
    wait_outcomes(m, "good", {"allowed": 2})


def test_refusals_are_resets(moat, echo, ports):
    """SPEC 3.1: a refused connection is closed at once with a reset (denied
    and limited alike), without the client sending anything."""
    port, admin = ports(2)
    m = moat(server(admin) + '[limits]\nmax_connections_per_ip = 1\n\n'
             + dep("orders", f"127.0.0.1:{port}", echo.address, rule("127.0.0.2", "c")))
    assert refusal_outcome(port, "127.0.0.3") == "reset"
    with echo_conn(port, "127.0.0.2"):
        assert refusal_outcome(port, "127.0.0.2") == "reset"
    wait_outcomes(m, "orders", {"allowed": 1, "denied": 1, "limited": 1})


def test_per_ip_limit_is_per_deployment(moat, echo, ports):
    p1, p2, admin = ports(3)
    m = moat(server(admin) + '[limits]\nmax_connections_per_ip = 1\n\n'
             + dep("d1", f"127.0.0.1:{p1}", echo.address, rule("127.0.0.2", "c"))
             + dep("d2", f"127.0.0.1:{p2}", echo.address, rule("127.0.0.2", "c")))
    held = [echo_conn(p1, "127.0.0.2"), echo_conn(p2, "127.0.0.2")]
    try:
        assert is_refused(refusal_outcome(p1, "127.0.0.2", send=b"x"))
        wait_outcomes(m, "d1", {"allowed": 1, "limited": 1})
        wait_outcomes(m, "d2", {"allowed": 1})
    finally:
        close_all(held)


def test_upstream_refuses(moat, ports):
    port, admin, dead = ports(3)
    m = moat(server(admin) + '[limits]\nconnect_timeout = "1s"\n\n'
             + dep("orders", f"127.0.0.1:{port}", f"127.0.0.1:{dead}", rule("127.0.0.2", "c")))
    for _ in range(2):
        start = time.monotonic()
        outcome = refusal_outcome(port, "127.0.0.2", send=b"hello?")
        assert is_refused(outcome), outcome
        assert time.monotonic() - start < 5
    wait_outcomes(m, "orders", {"upstream_error": 2})
    m.wait_stderr(r"upstream unreachable|upstream_error|upstream")
    assert m.metric("moat_connections_active", deployment="orders") == 0
    assert m.running()


# --------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------


def test_max_connections_per_ip(moat, echo, ports):
    port, admin = ports(2)
    m = moat(server(admin) + '[limits]\nmax_connections_per_ip = 2\n\n'
             + dep("orders", f"127.0.0.1:{port}", echo.address, rule("127.0.0.0/24", "loopback")))
    held = [echo_conn(port, "127.0.0.2", b"one"), echo_conn(port, "127.0.0.2", b"two")]
    try:
        echo.wait_connections(2)
        assert is_refused(refusal_outcome(port, "127.0.0.2", send=b"three")), "third connection from one source"
        assert stays_false(lambda: echo.connection_count > 2, 0.3)
        # another source is not affected
        held.append(echo_conn(port, "127.0.0.3", b"other source"))
        held.append(echo_conn(port, "127.0.0.3", b"other source 2"))
        wait_outcomes(m, "orders", {"allowed": 4, "limited": 1})
    finally:
        close_all(held)
    # closing frees the slots again
    wait_until(lambda: m.metric("moat_connections_active", deployment="orders") == 0, 10, what="active == 0")
    a, b = echo_conn(port, "127.0.0.2", b"again"), echo_conn(port, "127.0.0.2", b"again")
    close_all([a, b])
    wait_outcomes(m, "orders", {"allowed": 6, "limited": 1})


def test_global_max_connections_across_deployments(moat, echo, ports):
    p1, p2, admin = ports(3)
    m = moat(server(admin) + '[limits]\nmax_connections = 3\n\n'
             + dep("d1", f"127.0.0.1:{p1}", echo.address, rule("127.0.0.0/24", "lo"))
             + dep("d2", f"127.0.0.1:{p2}", echo.address, rule("127.0.0.0/24", "lo")))
    held = [echo_conn(p1, "127.0.0.2"), echo_conn(p1, "127.0.0.3"), echo_conn(p2, "127.0.0.4")]
    try:
        assert is_refused(refusal_outcome(p2, "127.0.0.5", send=b"x"))
        assert is_refused(refusal_outcome(p1, "127.0.0.6", send=b"x"))
        assert stays_false(lambda: echo.connection_count > 3, 0.3)
        wait_outcomes(m, "d1", {"allowed": 2, "limited": 1})
        wait_outcomes(m, "d2", {"allowed": 1, "limited": 1})
        held.pop(0).close()
        wait_until(lambda: m.metric("moat_connections_active", deployment="d1") == 1, 10, what="d1 active 1")
        held.append(echo_conn(p2, "127.0.0.5", b"a freed slot"))
        wait_outcomes(m, "d2", {"allowed": 2, "limited": 1})
    finally:
        close_all(held)


def test_deployment_own_max_connections(moat, echo, ports):
    p1, p2, admin = ports(3)
    m = moat(server(admin) + '[limits]\nmax_connections = 100\n\n'
             + dep("small", f"127.0.0.1:{p1}", echo.address,
                   rule("127.0.0.0/24", "lo") + "[deployment.limits]\nmax_connections = 2\n")
             + dep("big", f"127.0.0.1:{p2}", echo.address, rule("127.0.0.0/24", "lo")))
    held = [echo_conn(p1, "127.0.0.2"), echo_conn(p1, "127.0.0.3")]
    try:
        assert is_refused(refusal_outcome(p1, "127.0.0.4", send=b"x"))
        for i in range(4):
            held.append(echo_conn(p2, f"127.0.0.{10 + i}"))
        wait_outcomes(m, "small", {"allowed": 2, "limited": 1})
        wait_outcomes(m, "big", {"allowed": 4})
    finally:
        close_all(held)


# --------------------------------------------------------------------------
# Metrics: a known sequence, and no addresses in labels
# --------------------------------------------------------------------------


def test_metrics_match_a_known_sequence(moat, echo, ports):
    good, down, admin, dead = ports(4)
    m = moat(server(admin) + '[limits]\nconnect_timeout = "2s"\n\n'
             + dep("good", f"127.0.0.1:{good}", echo.address,
                   rule("127.0.0.2", "two") + rule("127.0.0.3", "three")
                   + "[deployment.limits]\nmax_connections_per_ip = 1\n")
             + dep("down", f"127.0.0.1:{down}", f"127.0.0.1:{dead}", rule("127.0.0.2", "two")))
    before = m.metrics()
    assert metric_sum(before, "moat_connections_total") == 0, "counters must start at zero"

    held = echo_conn(good, "127.0.0.2", b"held")                       # good: allowed 1
    try:
        assert is_refused(refusal_outcome(good, "127.0.0.2", send=b"x"))  # good: limited 1
        for _ in range(2):
            assert is_refused(refusal_outcome(good, "127.0.0.9", send=b"x"))  # good: denied 2
        for _ in range(2):
            assert_echoes(good, "127.0.0.3")                            # good: allowed 3
            # the per-source slot is released asynchronously once moat sees the close
            m.wait_metric("moat_connections_active", 1, deployment="good")
        assert is_refused(refusal_outcome(down, "127.0.0.2", send=b"x"))  # down: upstream_error 1
        assert is_refused(refusal_outcome(down, "127.0.0.9", send=b"x"))  # down: denied 1
        wait_outcomes(m, "good", {"allowed": 3, "denied": 2, "limited": 1})
        wait_outcomes(m, "down", {"upstream_error": 1, "denied": 1})
        assert m.metric("moat_connections_active", deployment="good") == 1
    finally:
        held.close()
    m.wait_metric("moat_connections_active", 0, deployment="good")
    metrics = m.metrics()
    assert metric_sum(metrics, "moat_connections_total") == 8
    assert metric_sum(metrics, "moat_bytes_total", deployment="good", direction="to_upstream") >= 4 + 2 * len(b"ping moat\n")
    assert metric_sum(metrics, "moat_bytes_total", deployment="down") == 0
    values = label_values(metrics)
    offenders = sorted(v for v in values if looks_like_ip(v) or "127.0.0." in v)
    assert not offenders, f"metric label values carrying addresses: {offenders}"
    names = {n for (n, _l) in metrics}
    for required in ("moat_connections_total", "moat_connections_active", "moat_bytes_total", "moat_rules",
                     "moat_config_last_reload_successful"):
        assert required in names, f"{required} missing from /metrics"
    assert m.metric("moat_rules", deployment="good") == 2
