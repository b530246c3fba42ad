"""PROXY protocol v1/v2 from trusted balancers (SPEC 3.5) and abuse of the
listeners: floods of refused connections, slow senders, garbage, resets
mid-transfer, connection caps. Every load loop is bounded in time and count;
memory is only checked against loose bounds."""

from __future__ import annotations

import os
import select
import socket
import threading
import time

import pytest
from _proxylib import (close_all, closed_by_peer, echo_conn, is_refused, outcomes, proxy_v1, proxy_v2,
                       quiet_ports, refusal_outcome, rss_kb, rule, server, set_linger0, wait_outcomes)
from moatlib import assert_echoes, connect_from, recv_exactly, stays_false, wait_until

LB = "127.0.0.9"          # the trusted balancer
CLIENT = "192.0.2.7"      # the client behind it (allowed)
STRANGER = "192.0.2.8"    # another client behind it (not allowed)


def pp_config(admin: int, port: int, upstream: str, *, extra_rules: str = "", handshake: str = "2s",
              name: str = "lb", more: str = "") -> str:
    return (server(admin) + f'[limits]\nhandshake_timeout = "{handshake}"\n\n'
            + f'[[deployment]]\nname = "{name}"\nlisten = "127.0.0.1:{port}"\nupstream = "{upstream}"\n'
            + f'proxy_protocol = {{ trusted = ["{LB}"] }}\n'
            + rule(CLIENT, "client behind the balancer") + extra_rules + more)


def pp_echo(port: int, header: bytes, payload: bytes = b"through the balancer", src: str = LB) -> None:
    """Header then data from `src`: the data comes back."""
    with echo_conn(port, src, payload, prefix=header):
        pass


@pytest.fixture
def pp(moat, echo, ports):
    """moat with one PROXY protocol deployment "lb" (trusted 127.0.0.9, allow
    192.0.2.7 and 127.0.0.2) and a second one, "lb2", that also allows the
    balancer's own address."""
    port, port2, admin = ports(3)
    text = (pp_config(admin, port, echo.address, extra_rules=rule("127.0.0.2", "direct client"))
            + f'[[deployment]]\nname = "lb2"\nlisten = "127.0.0.1:{port2}"\nupstream = "{echo.address}"\n'
            + f'proxy_protocol = {{ trusted = ["{LB}"] }}\n'
            + rule(CLIENT, "client") + rule(LB, "the balancer itself"))
    m = moat(text)
    return m, port, port2




# --------------------------------------------------------------------------
# Trusted balancer
# --------------------------------------------------------------------------


def test_v1_header_inner_address_decides(pp, echo):
    m, port, _ = pp
    payload = b"after a v1 header"
    pp_echo(port, proxy_v1(CLIENT, "127.0.0.1", 5555, port), payload)
    echo.wait_connections(1)
    wait_until(lambda: echo.bytes_received == payload, 5, what="upstream data")
    assert b"PROXY" not in echo.bytes_received, "the header was forwarded upstream"
    # the same balancer relaying a client the rules do not admit
    assert is_refused(refusal_outcome(port, LB, send=proxy_v1(STRANGER) + b"data"))
    assert stays_false(lambda: echo.connection_count > 1, 0.3)
    wait_outcomes(m, "lb", {"allowed": 1, "denied": 1})
    # logs name the client, not the balancer
    line = m.wait_stderr(r"[^\n]*source=192\.0\.2\.8[^\n]*").group(0)
    assert "denied" in line


def test_v1_inner_address_overrides_allowed_peer(pp, echo):
    """lb2 allows the balancer's own address, but a header naming a stranger
    is judged by the stranger's address."""
    m, _, port2 = pp
    assert is_refused(refusal_outcome(port2, LB, send=proxy_v1(STRANGER) + b"x"))
    echo.assert_untouched()
    pp_echo(port2, proxy_v1(CLIENT))
    wait_outcomes(m, "lb2", {"allowed": 1, "denied": 1})


def test_v1_tcp6_header(moat, echo, ports):
    port, admin = ports(2)
    m = moat(pp_config(admin, port, echo.address, extra_rules=rule("2001:db8::7", "v6 client")))
    pp_echo(port, proxy_v1("2001:db8::7", "2001:db8::1", 5555, 27017), b"v6 inside")
    assert is_refused(refusal_outcome(port, LB, send=proxy_v1("2001:db8::8", "2001:db8::1") + b"x"))
    wait_outcomes(m, "lb", {"allowed": 1, "denied": 1})
    assert echo.bytes_received == b"v6 inside"


def test_v1_ipv4_mapped_inner_address_matches_ipv4_rule(pp, echo):
    m, port, _ = pp
    pp_echo(port, proxy_v1("::ffff:192.0.2.7", "::ffff:127.0.0.1"), b"mapped inside")
    assert is_refused(refusal_outcome(port, LB, send=proxy_v1("::ffff:192.0.2.8", "::1") + b"x"))
    wait_outcomes(m, "lb", {"allowed": 1, "denied": 1})


def test_limits_apply_to_the_inner_address(moat, echo, ports):
    port, admin = ports(2)
    m = moat(pp_config(admin, port, echo.address, extra_rules=rule("192.0.2.0/24", "clients"),
                       more="[deployment.limits]\nmax_connections_per_ip = 1\n"))
    held = [echo_conn(port, LB, b"a", prefix=proxy_v1("192.0.2.20")),
            echo_conn(port, LB, b"b", prefix=proxy_v1("192.0.2.21")),
            echo_conn(port, LB, b"c", prefix=proxy_v2("192.0.2.22"))]
    try:
        # a second connection of one inner client is over its per-source limit
        assert is_refused(refusal_outcome(port, LB, send=proxy_v1("192.0.2.20") + b"x"))
        wait_outcomes(m, "lb", {"allowed": 3, "limited": 1})
        line = m.wait_stderr(r"[^\n]*limited[^\n]*").group(0)
        assert "192.0.2.20" in line and LB not in line, line
    finally:
        close_all(held)


def test_v2_header(pp, echo):
    m, port, _ = pp
    payload = b"after a v2 header \x00\x01\x02"
    pp_echo(port, proxy_v2(CLIENT, "127.0.0.1", 40000, port), payload)
    wait_until(lambda: echo.bytes_received == payload, 5, what="upstream data")
    assert proxy_v2(CLIENT)[:12] not in echo.bytes_received
    assert is_refused(refusal_outcome(port, LB, send=proxy_v2(STRANGER) + b"data"))
    assert stays_false(lambda: echo.connection_count > 1, 0.3)
    # a v2 header with TLVs (e.g. PP2_TYPE_AUTHORITY) is still one header
    tlv = bytes([0x02]) + (11).to_bytes(2, "big") + b"db.test.com"
    pp_echo(port, proxy_v2(CLIENT, tlvs=tlv), b"with tlvs")
    wait_until(lambda: echo.bytes_received == payload + b"with tlvs", 5, what="upstream data")
    wait_outcomes(m, "lb", {"allowed": 2, "denied": 1})


def test_v2_local_uses_real_peer_address(pp, echo):
    m, port, port2 = pp
    # "lb" does not allow 127.0.0.9 itself: a LOCAL header (health check) is refused
    assert is_refused(refusal_outcome(port, LB, send=proxy_v2(None, local=True) + b"health"))
    echo.assert_untouched()
    # "lb2" allows the balancer's own address: admitted, payload forwarded without the header
    pp_echo(port2, proxy_v2(None, local=True), b"health check")
    wait_until(lambda: echo.bytes_received == b"health check", 5, what="upstream data")
    wait_outcomes(m, "lb", {"denied": 1})
    wait_outcomes(m, "lb2", {"allowed": 1})
    # v1 "PROXY UNKNOWN" means the same: the real peer address is used
    assert is_refused(refusal_outcome(port, LB, send=b"PROXY UNKNOWN\r\nhealth"))
    pp_echo(port2, b"PROXY UNKNOWN\r\n", b"v1 health check")
    wait_outcomes(m, "lb", {"denied": 2})
    wait_outcomes(m, "lb2", {"allowed": 2})


def test_header_split_across_segments(pp, echo):
    m, port, _ = pp
    header = proxy_v1(CLIENT)
    with connect_from(LB, port) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(header), 5):
            s.sendall(header[i:i + 5])
            time.sleep(0.01)  # not synchronisation: forces separate segments
        s.sendall(b"split")
        assert recv_exactly(s, 5) == b"split"
    assert echo.bytes_received == b"split"
    # data in the same segment as the header is not lost
    pp_echo(port, proxy_v2(CLIENT), b"same segment")
    wait_outcomes(m, "lb", {"allowed": 2})


# --------------------------------------------------------------------------
# Untrusted peers, missing and malformed headers
# --------------------------------------------------------------------------


def test_header_from_untrusted_peer_is_refused(pp, echo):
    m, port, _ = pp
    # 127.0.0.2 is allowed by a rule but is not a trusted balancer
    for header in (proxy_v1(CLIENT), proxy_v2(CLIENT)):
        assert is_refused(refusal_outcome(port, "127.0.0.2", send=header + b"data"))
    echo.assert_untouched()
    wait_outcomes(m, "lb", {"proxy_protocol_error": 2})
    # the same peer speaking plainly is proxied
    assert_echoes(port, "127.0.0.2", b"plain bytes")
    wait_outcomes(m, "lb", {"proxy_protocol_error": 2, "allowed": 1})


def test_a_port_check_counts_no_outcome_only_a_trusted_peer_owes_a_header(pp, echo):
    """A TCP connect-and-close (a port check) from an untrusted peer owes
    nothing and fails nothing: no outcome. From the trusted balancer it is a
    connection without its header: proxy_protocol_error."""
    m, port, _ = pp
    for src in ("127.0.0.2", "127.0.0.2", LB):
        connect_from(src, port).close()
    assert_echoes(port, "127.0.0.2", b"plain bytes")  # in order after the checks
    echo.wait_connections(1)
    wait_outcomes(m, "lb", {"proxy_protocol_error": 1, "allowed": 1})
    assert stays_false(lambda: outcomes(m, "lb")["proxy_protocol_error"] > 1, 0.3)
    # The start of a header, then nothing, from an untrusted peer: counted.
    with connect_from("127.0.0.2", port) as s:
        s.sendall(b"PROX")
    wait_outcomes(m, "lb", {"proxy_protocol_error": 2, "allowed": 1})


def test_trusted_peer_without_header_is_refused(pp, echo):
    m, port, _ = pp
    assert is_refused(refusal_outcome(port, LB, send=b"\x3a\x00\x00\x00 mongo bytes"))
    echo.assert_untouched()
    wait_outcomes(m, "lb", {"proxy_protocol_error": 1})


@pytest.mark.parametrize("bad", [
    b"PROXY TCP4 999.1.1.1 127.0.0.1 5555 27017\r\n",
    b"PROXY TCP4 192.0.2.7 127.0.0.1 5555\r\n",
    b"PROXY TCP6 192.0.2.7 127.0.0.1 5555 27017\r\n",
    b"PROXY TCP4 192.0.2.7 127.0.0.1 99999 27017\r\n",
    b"PROXY " + b"A" * 200 + b"\r\n",
    proxy_v2(CLIENT)[:12] + b"\x99\x11\x00\x0c" + b"\x00" * 12,      # bad version
    proxy_v2(CLIENT)[:12] + b"\x21\x11\x00\x04" + b"\x00" * 4,       # too short for TCP4
    proxy_v2(CLIENT)[:12] + b"\x21\x11\xff\xff",                     # too long a body (then EOF)
], ids=["v1-bad-ip", "v1-missing-port", "v1-family-mismatch", "v1-port-range", "v1-too-long",
        "v2-bad-version", "v2-short-body", "v2-huge-length"])
def test_malformed_header_is_refused(pp, echo, bad):
    m, port, _ = pp
    outcome = refusal_outcome(port, LB, send=bad + b"data", shutdown_after_send=True)
    assert is_refused(outcome), outcome
    echo.assert_untouched()
    wait_outcomes(m, "lb", {"proxy_protocol_error": 1})


def test_truncated_header_then_close_is_counted(pp, echo):
    m, port, _ = pp
    with connect_from(LB, port) as s:
        s.sendall(b"PROXY TCP4 192.0.2.7 127.0")
    with connect_from(LB, port) as s:
        s.sendall(proxy_v2(CLIENT)[:20])
    wait_outcomes(m, "lb", {"proxy_protocol_error": 2})
    echo.assert_untouched()


def test_silent_trusted_peer_closed_at_handshake_timeout(moat, echo, ports):
    port, admin = ports(2)
    m = moat(pp_config(admin, port, echo.address, handshake="1s"))
    s = connect_from(LB, port)
    start = time.monotonic()
    try:
        assert closed_by_peer(s, 10.0), "a silent trusted peer was never closed"
        elapsed = time.monotonic() - start
    finally:
        s.close()
    assert 0.8 <= elapsed <= 6.0, f"closed after {elapsed:.2f}s, handshake_timeout is 1s"
    wait_outcomes(m, "lb", {"proxy_protocol_error": 1})
    echo.assert_untouched()


# --------------------------------------------------------------------------
# Abuse
# --------------------------------------------------------------------------


def _hammer(port: int, src: str, total: int, seconds: float, threads: int = 4) -> int:
    """Open and drop up to `total` connections from `src` within `seconds`;
    returns how many TCP handshakes completed."""
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    state = {"left": total, "done": 0}

    def worker():
        while time.monotonic() < deadline:
            with lock:
                if state["left"] == 0:
                    return
                state["left"] -= 1
            try:
                s = socket.socket()
                s.settimeout(2)
                s.bind((src, 0))
                s.connect(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            with lock:
                state["done"] += 1
            s.close()

    ts = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(seconds + 5)
    return state["done"]


def test_flood_of_refused_connections(moat, echo, ports):
    port, admin = ports(2)
    m = moat(server(admin) + f'[[deployment]]\nname = "orders"\nlisten = "127.0.0.1:{port}"\n'
             f'upstream = "{echo.address}"\n' + rule("127.0.0.2", "app"))
    rss0 = rss_kb(m.pid)
    done = _hammer(port, "127.0.0.66", total=2000, seconds=20)
    assert done >= 200, f"only {done} connections completed"
    assert m.running()
    start = time.monotonic()
    assert_echoes(port, "127.0.0.2", b"still serving")
    assert time.monotonic() - start < 3.0, "an allowed client was slow to get through after the flood"
    echo.wait_connections(1)
    assert echo.connection_count == 1 and echo.peers[0][0] == "127.0.0.1"
    # every completed handshake is refused and counted (the kernel may drop a few from a full queue)
    m.wait_metric("moat_connections_total", lambda v: v >= done * 0.95, deployment="orders", outcome="denied")
    # the refusal log is rate-limited: a scan cannot flood it
    refusals = m.stderr_text().count("connection refused")
    assert refusals < max(100, done // 4), f"{refusals} refusal log lines for {done} connections"
    assert rss_kb(m.pid) - rss0 < 20_000, "RSS grew by more than 20 MB"


def test_slow_senders_closed_at_handshake_timeout(moat, echo, ports):
    port, admin = ports(2)
    m = moat(pp_config(admin, port, echo.address, handshake="1s"))
    n = 200
    socks, opened = [], []
    try:
        for _ in range(n):
            socks.append(connect_from(LB, port, timeout=5))
            opened.append(time.monotonic())
        # meanwhile a real client behind the balancer is served at once
        pp_echo(port, proxy_v1(CLIENT), b"not blocked by slow senders")
        remaining = {s.fileno(): (s, t) for s, t in zip(socks, opened)}
        closed_at = {}
        deadline = time.monotonic() + 15
        while remaining and time.monotonic() < deadline:
            r, _, _ = select.select([s for s, _ in remaining.values()], [], [], 0.5)
            for s in r:
                try:
                    data = s.recv(16)
                except OSError:
                    data = b""
                assert data == b"", "moat sent bytes to a slow sender"
                fd = s.fileno()
                closed_at[fd] = time.monotonic() - remaining[fd][1]
                del remaining[fd]
        assert not remaining, f"{len(remaining)} of {n} silent connections still open after 15s"
        early = [t for t in closed_at.values() if t < 0.8]
        assert not early, f"{len(early)} connections closed before handshake_timeout"
    finally:
        close_all(socks)
    wait_outcomes(m, "lb", {"proxy_protocol_error": n, "allowed": 1})
    echo.wait_connections(1)
    assert echo.connection_count == 1


def test_random_bytes_to_proxy_and_plain_ports(moat, echo, ports):
    pport, plain, admin = ports(3)
    text = (pp_config(admin, pport, echo.address, handshake="1s")
            + f'[[deployment]]\nname = "plain"\nlisten = "127.0.0.1:{plain}"\nupstream = "{echo.address}"\n'
            + rule("127.0.0.2", "app"))
    m = moat(text)
    rng = __import__("random").Random(1234)
    deadline = time.monotonic() + 30
    sent = 0
    for i in range(40):
        if time.monotonic() > deadline:
            break
        blob = os.urandom(rng.choice([1, 7, 16, 100, 1000, 70000]))
        # trusted balancer sending garbage (no valid header): refused
        if not blob.startswith((b"P", b"\r")):
            assert is_refused(refusal_outcome(pport, LB, send=blob, shutdown_after_send=True))
        # refused source on the plain port: refused without reading
        assert is_refused(refusal_outcome(plain, "127.0.0.66", send=blob[:1000]))
        # allowed source on the plain port: garbage is just bytes, proxied unchanged
        with connect_from("127.0.0.2", plain, timeout=10) as s:
            s.sendall(blob)
            assert recv_exactly(s, len(blob), 10) == blob
        sent += 1
    assert sent >= 10
    assert m.running()
    pp_echo(pport, proxy_v2(CLIENT), b"after the garbage")
    assert_echoes(plain, "127.0.0.2", b"after the garbage")
    assert outcomes(m, "lb")["proxy_protocol_error"] >= 1
    assert outcomes(m, "lb")["allowed"] == 1


def test_resets_mid_transfer(moat, echo, ports):
    port, admin = ports(2)
    m = moat(server(admin) + f'[[deployment]]\nname = "orders"\nlisten = "127.0.0.1:{port}"\n'
             f'upstream = "{echo.address}"\n' + rule("127.0.0.2", "app"))
    chunk = os.urandom(256 * 1024)
    for i in range(20):
        s = connect_from("127.0.0.2", port, timeout=5)
        try:
            s.setblocking(False)
            sent = 0
            t_end = time.monotonic() + 2
            # push until the pipes are full in both directions (the echo is streaming back)
            while sent < 4 * len(chunk) and time.monotonic() < t_end:
                try:
                    sent += s.send(chunk)
                except BlockingIOError:
                    select.select([], [s], [], 0.05)
            set_linger0(s)
        finally:
            s.close()  # RST with unread echoed data pending
    assert m.running()
    assert_echoes(port, "127.0.0.2", b"after the resets")
    m.wait_metric("moat_connections_active", 0, deployment="orders", timeout=15)
    wait_until(lambda: all(c.closed for c in echo.conns), 15, what="upstream connections closed")
    # the upstream side of a reset connection is closed too (no leak)
    assert m.running()


def test_max_connections_cap_and_recovery(moat, echo, ports):
    port, admin = ports(2)
    cap = 50
    m = moat(server(admin) + f'[limits]\nmax_connections = {cap}\nmax_connections_per_ip = {cap}\n\n'
             f'[[deployment]]\nname = "orders"\nlisten = "127.0.0.1:{port}"\n'
             f'upstream = "{echo.address}"\n' + rule("127.0.0.0/24", "loopback"))
    rss0 = rss_kb(m.pid)
    held = []
    try:
        for i in range(cap):
            held.append(echo_conn(port, "127.0.0.2", b"%d" % i))
        m.wait_metric("moat_connections_active", cap, deployment="orders")
        for src in ("127.0.0.2", "127.0.0.3"):
            assert is_refused(refusal_outcome(port, src, send=b"one too many"))
        assert stays_false(lambda: echo.connection_count > cap, 0.3)
        wait_outcomes(m, "orders", {"allowed": cap, "limited": 2})
    finally:
        close_all(held)
    m.wait_metric("moat_connections_active", 0, deployment="orders", timeout=15)
    again = []
    try:
        for i in range(cap):
            again.append(echo_conn(port, "127.0.0.3", b"again %d" % i))
    finally:
        close_all(again)
    wait_outcomes(m, "orders", {"allowed": 2 * cap, "limited": 2})
    m.wait_metric("moat_connections_active", 0, deployment="orders", timeout=15)
    assert rss_kb(m.pid) - rss0 < 20_000, "RSS grew by more than 20 MB"


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_file_descriptors_neither_spins_nor_dies(moat, echo, ports):
    """SPEC 3.2: running out of file descriptors never spins the accept loop
    or kills the daemon. RLIMIT_NOFILE of the running moat is lowered to a
    few descriptors above what it uses, then more clients connect than fit."""
    import resource
    port, admin = ports(2)
    m = moat(server(admin) + f'[[deployment]]\nname = "orders"\nlisten = "127.0.0.1:{port}"\n'
             f'upstream = "{echo.address}"\n' + rule("127.0.0.0/24", "loopback"))
    assert_echoes(port, "127.0.0.2")
    old = resource.prlimit(m.pid, resource.RLIMIT_NOFILE)
    base = len(os.listdir(f"/proc/{m.pid}/fd"))
    resource.prlimit(m.pid, resource.RLIMIT_NOFILE, (base + 12, old[1]))
    socks = []
    try:
        for i in range(40):  # each proxied connection needs 2 descriptors: ~6 fit
            try:
                socks.append(connect_from(f"127.0.0.{2 + i % 4}", port, timeout=5))
                socks[-1].sendall(b"x")
            except OSError:
                pass
        # the accept loop is out of descriptors now: it must back off, not spin
        wait_until(lambda: len(os.listdir(f"/proc/{m.pid}/fd")) >= base + 10, 10, what="fds used up")
        cpu0, t0 = _cpu_seconds(m.pid), time.monotonic()
        wait_until(lambda: time.monotonic() - t0 >= 2.0, 5, what="an observation window")
        used = _cpu_seconds(m.pid) - cpu0
        assert used < 0.6, f"moat used {used:.2f}s of CPU in 2s while out of descriptors (spinning accept loop?)"
        assert m.running()
    finally:
        close_all(socks)
        resource.prlimit(m.pid, resource.RLIMIT_NOFILE, old)
    assert m.running()
    wait_until(lambda: m.metric("moat_connections_active", deployment="orders") == 0, 15, what="active == 0")
    assert_echoes(port, "127.0.0.2", b"recovered")
