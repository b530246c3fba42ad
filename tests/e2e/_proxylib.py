"""Extra helpers for test_proxy.py and test_proxy_protocol.py (on top of
moatlib): config snippets, PROXY protocol headers, socket probes, /proc
memory, metric label checks. Nothing here sleeps to synchronise."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import select
import socket
import struct
import threading
import time
from typing import Iterable

from moatlib import _ephemeral_range, connect_from, connection_outcome, free_ports, recv_exactly, wait_until

OUTCOMES = ("allowed", "denied", "limited", "tls_error", "upstream_error", "proxy_protocol_error")


# --------------------------------------------------------------------------
# Config snippets
# --------------------------------------------------------------------------


def server(admin_port: int, extra: str = "") -> str:
    return f'[server]\nadmin_listen = "127.0.0.1:{admin_port}"\n{extra}\n'


def rule(cidr: str, description: str, extra: str = "") -> str:
    return f'[[deployment.allow]]\ncidr = "{cidr}"\ndescription = "{description}"\n{extra}\n'


def rfc3339_in(seconds: float) -> tuple[str, float]:
    """An RFC 3339 UTC instant about `seconds` from now (whole seconds, rounded
    up) and the same instant as a time.time() value."""
    t = int(time.time() + seconds) + 1
    text = dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return text, float(t)


def free_dual_port() -> int:
    """A port free on both 0.0.0.0 and [::] right now, chosen outside the
    kernel's ephemeral range so that outgoing connections (of this machine's
    other tests) do not grab it before moat binds it."""
    import random
    lo, hi = _ephemeral_range()
    candidates = [p for p in range(20000, 32000) if not lo <= p <= hi] or list(range(20000, 32000))
    rng = random.Random()
    for _ in range(200):
        port = rng.choice(candidates)
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
                s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s6.bind(("::", port))
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s4:
                s4.bind(("0.0.0.0", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no dual-stack free port found")


# Ports outside the kernel's ephemeral range (moatlib chooses them so).
quiet_ports = free_ports

def start_retrying(moat, make_config, attempts: int = 3, **kw):
    """moat(make_config()) retried when a freshly chosen port was taken by
    someone else before moat could bind it ("Address already in use")."""
    for i in range(attempts):
        try:
            return moat(make_config(), **kw)
        except RuntimeError as e:
            if "already in use" not in str(e) or i == attempts - 1:
                raise


# --------------------------------------------------------------------------
# PROXY protocol headers
# --------------------------------------------------------------------------

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v1(src: str, dst: str = "127.0.0.1", sport: int = 5555, dport: int = 27017) -> bytes:
    fam = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {fam} {src} {dst} {sport} {dport}\r\n".encode()


def proxy_v2(src: str | None, dst: str = "127.0.0.1", sport: int = 5555, dport: int = 27017,
             local: bool = False, tlvs: bytes = b"") -> bytes:
    """A binary v2 header; local=True gives the LOCAL command (no addresses)."""
    if local:
        return V2_SIG + struct.pack("!BBH", 0x20, 0x00, len(tlvs)) + tlvs
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if a.version == 4:
        body = a.packed + b.packed + struct.pack("!HH", sport, dport)
        fam = 0x11  # AF_INET, STREAM
    else:
        body = a.packed + b.packed + struct.pack("!HH", sport, dport)
        fam = 0x21  # AF_INET6, STREAM
    body += tlvs
    return V2_SIG + struct.pack("!BBH", 0x21, fam, len(body)) + body


# --------------------------------------------------------------------------
# Sockets
# --------------------------------------------------------------------------


def refusal_outcome(port: int, src: str, send: bytes = b"", timeout: float = 5.0,
                    family=None, dst=None, shutdown_after_send: bool = False) -> str:
    """Connect from `src`, optionally send `send`, and report what the peer
    does: "reset", "closed" (EOF, no data), "data" or "open" (nothing within
    `timeout`)."""
    try:
        s = connect_from(src, port, family=family, dst=dst, timeout=timeout)
    except (ConnectionResetError, ConnectionRefusedError):
        return "reset"
    try:
        s.settimeout(timeout)
        if send:
            try:
                s.sendall(send)
                if shutdown_after_send:
                    s.shutdown(socket.SHUT_WR)
            except OSError:
                return "reset"
        return connection_outcome(s, timeout)
    finally:
        s.close()


def is_refused(outcome: str) -> bool:
    return outcome in ("reset", "closed")


def echo_conn(port: int, src: str, payload: bytes = b"hello moat", prefix: bytes = b"",
              timeout: float = 5.0, family=None, dst=None) -> socket.socket:
    """An open connection through moat, proven to echo `payload`."""
    s = connect_from(src, port, family=family, dst=dst, timeout=timeout)
    try:
        s.sendall(prefix + payload)
        assert recv_exactly(s, len(payload), timeout) == payload
    except BaseException:
        s.close()
        raise
    return s


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Wait up to `timeout` for the peer to close (EOF or reset); data read
    meanwhile is discarded."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        r, _, _ = select.select([sock], [], [], min(left, 0.5))
        if not r:
            continue
        try:
            data = sock.recv(65536)
        except OSError:
            return True
        if not data:
            return True


def set_linger0(sock: socket.socket):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def transfer(port: int, src: str, data: bytes, timeout: float = 60.0) -> bytes:
    """Send `data` through moat with a concurrent reader; return what came
    back (until len(data) bytes or EOF)."""
    s = connect_from(src, port, timeout=timeout)
    got = bytearray()
    err: list[BaseException] = []

    def reader():
        try:
            deadline = time.monotonic() + timeout
            while len(got) < len(data) and time.monotonic() < deadline:
                chunk = s.recv(1 << 20)
                if not chunk:
                    return
                got.extend(chunk)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            err.append(e)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        view = memoryview(data)
        for off in range(0, len(data), 1 << 16):
            s.sendall(view[off:off + (1 << 16)])
        t.join(timeout)
        assert not t.is_alive(), f"reader still running after {timeout}s ({len(got)} of {len(data)} bytes)"
        if err:
            raise err[0]
        return bytes(got)
    finally:
        s.close()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# --------------------------------------------------------------------------
# Metrics and process
# --------------------------------------------------------------------------


def outcomes(m, deployment: str) -> dict[str, float]:
    """moat_connections_total by outcome for one deployment (absent -> 0)."""
    return {o: m.metric("moat_connections_total", deployment=deployment, outcome=o) for o in OUTCOMES}


def wait_outcomes(m, deployment: str, want: dict[str, float], timeout: float = 10.0) -> dict[str, float]:
    """Wait until every outcome of `deployment` equals `want` (missing keys: 0)."""
    full = {o: float(want.get(o, 0)) for o in OUTCOMES}
    last: dict[str, float] = {}

    def probe():
        nonlocal last
        last = outcomes(m, deployment)
        return last == full
    try:
        wait_until(probe, timeout, interval=0.05, what=f"outcomes of {deployment}")
    except TimeoutError:
        raise AssertionError(f"moat_connections_total for {deployment}: {last}, wanted {full}") from None
    return last


def looks_like_ip(value: str) -> bool:
    """True if a label value is (or carries) an IP address or a host:port."""
    v = value.strip()
    candidates = {v, v.strip("[]")}
    if v.startswith("[") and "]:" in v:
        candidates.add(v[1:v.index("]:")])
    if v.count(":") == 1:
        candidates.add(v.split(":")[0])
    for c in candidates:
        try:
            ipaddress.ip_address(c)
            return True
        except ValueError:
            pass
        try:
            ipaddress.ip_network(c, strict=False)
            if "/" in c:
                return True
        except ValueError:
            pass
    return False


def label_values(metrics) -> set[str]:
    return {value for (_name, labels) in metrics for (_label, value) in labels}


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def close_all(socks: Iterable[socket.socket]):
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


class FinFirstUpstream:
    """An upstream that, for each connection, sends `greeting`, half-closes
    (FIN) at once and then keeps reading until the client's FIN, recording the
    bytes: proves an upstream FIN reaches the client while the client's
    direction keeps flowing."""

    def __init__(self, greeting: bytes, host: str = "127.0.0.1"):
        self.greeting = greeting
        self.received: list[bytearray] = []
        self.eof: list[bool] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((host, 0))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self.address = f"{host}:{self._sock.getsockname()[1]}"
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self):
        while not self._stop.is_set():
            try:
                c, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                i = len(self.received)
                self.received.append(bytearray())
                self.eof.append(False)
            threading.Thread(target=self._serve, args=(c, i), daemon=True).start()

    def _serve(self, c: socket.socket, i: int):
        c.settimeout(0.2)
        deadline = time.monotonic() + 30
        try:
            c.sendall(self.greeting)
            c.shutdown(socket.SHUT_WR)
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    data = c.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    with self._lock:
                        self.eof[i] = True
                    return
                with self._lock:
                    self.received[i] += data
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        self._stop.set()
        self._sock.close()
        self._t.join(2)
