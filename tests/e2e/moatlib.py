"""Helpers for the end-to-end tests: they drive the real `moat` binary over real
loopback sockets.

Nothing here sleeps to synchronise: every wait polls a condition against a
deadline (`wait_until`). The only timed windows are "quiet periods" used to
assert that something did NOT happen (an upstream saw no connection), which by
nature need a bounded observation window.

Fixture networks for rules that must never match the loopback clients:
192.0.2.0/24, 198.51.100.0/24 (TEST-NET-1/2) and 2001:db8::/32.
"""

from __future__ import annotations

import datetime as _dt
import errno
import http.client
import ipaddress
import os
import re
import signal
import socket
import sys
import subprocess
import tempfile
import textwrap
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

REPO = Path(__file__).resolve().parents[2]

# Networks that the loopback clients are never in.
TEST_NET_1 = "192.0.2.0/24"
TEST_NET_2 = "198.51.100.0/24"
TEST_NET_V6 = "2001:db8::/32"

DEFAULT_TIMEOUT = 10.0


# --------------------------------------------------------------------------
# Binary, polling
# --------------------------------------------------------------------------


def moat_bin() -> str:
    """Path of the moat executable: $MOAT_BIN (relative to the cwd or the
    repository root), default target/debug/moat."""
    raw = os.environ.get("MOAT_BIN", "target/debug/moat")
    p = Path(raw)
    if not p.is_absolute():
        p = p if p.exists() else REPO / p
    return str(p.resolve())


def wait_until(cond: Callable[[], object], timeout: float = DEFAULT_TIMEOUT,
               interval: float = 0.01, what: str = "condition"):
    """Poll `cond` until it returns a truthy value (returned) or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stays_false(cond: Callable[[], object], period: float = 0.3,
                interval: float = 0.01) -> bool:
    """True if `cond` stays falsy for the whole observation `period`."""
    deadline = time.monotonic() + period
    while time.monotonic() < deadline:
        if cond():
            return False
        time.sleep(interval)
    return not cond()


# --------------------------------------------------------------------------
# Addresses and sockets
# --------------------------------------------------------------------------


def family_of(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def fmt_addr(host: str, port: int) -> str:
    """`host:port` with brackets around IPv6 hosts, as in a moat config."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_addr(addr: str) -> tuple[str, int]:
    """Inverse of `fmt_addr`."""
    if addr.startswith("["):
        host, _, port = addr[1:].partition("]:")
        return host, int(port)
    host, _, port = addr.rpartition(":")
    return host, int(port)


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free on `host` right now, chosen outside the
    kernel's ephemeral range: a port the kernel hands to outgoing connections
    could be taken between choosing it and moat binding it."""
    import random
    lo, hi = _ephemeral_range()
    rng = random.Random()
    out: list[int] = []
    for _ in range(2000):
        if len(out) == n:
            return out
        port = rng.randrange(20000, 32000)
        if lo <= port <= hi or port in out:
            continue
        try:
            with socket.socket(family_of(host), socket.SOCK_STREAM) as s:
                s.bind((host, port))
        except OSError:
            continue
        out.append(port)
    raise RuntimeError(f"could not find {n} free ports on {host}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    return free_ports(1, host)[0]


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def connect_from(src_ip: str, port: int, family: socket.AddressFamily | None = None,
                 dst: str | None = None, timeout: float = 5.0) -> socket.socket:
    """A TCP connection to `dst:port` whose source address is `src_ip`.

    All of 127.0.0.0/8 is loopback, so 127.0.0.2, 127.0.0.3, ... give distinct
    client addresses; ::1 is the IPv6 client. `dst` defaults to 127.0.0.1 for
    IPv4 and ::1 for IPv6. To reach an IPv6 (dual-stack) listener from an IPv4
    source, pass family=AF_INET6 and src_ip="::ffff:127.0.0.2".
    """
    family = family or family_of(src_ip)
    if dst is None:
        dst = "::1" if family == socket.AF_INET6 and not src_ip.startswith("::ffff:") else (
            "::ffff:127.0.0.1" if family == socket.AF_INET6 else "127.0.0.1")
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.bind((src_ip, 0))
        s.connect((dst, port))
    except BaseException:
        s.close()
        raise
    return s


def recv_exactly(sock: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def recv_until_eof(sock: socket.socket, timeout: float = 5.0, limit: int = 1 << 26) -> bytes:
    sock.settimeout(timeout)
    buf = b""
    while len(buf) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            return buf
        buf += chunk
    raise AssertionError("peer sent more than the limit without closing")


def connection_outcome(sock: socket.socket, timeout: float = 5.0, send: bytes = b"") -> str:
    """What the peer does with a fresh connection: "reset", "closed" (EOF
    without data), "data" (it sent bytes) or "open" (nothing within timeout)."""
    sock.settimeout(timeout)
    if send:
        try:
            sock.sendall(send)
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        return "reset"
    except socket.timeout:
        return "open"
    except OSError as e:
        if e.errno in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED):
            return "reset"
        raise
    return "data" if data else "closed"


# --------------------------------------------------------------------------
# Upstreams
# --------------------------------------------------------------------------


@dataclass
class UpstreamConn:
    peer: tuple
    received: bytearray = field(default_factory=bytearray)
    eof: bool = False  # the client side (moat) sent FIN
    closed: bool = False


class EchoServer:
    """Threaded TCP upstream that records every accepted peer and every byte.

    Modes:
      * default: echo bytes as they arrive; on client FIN send FIN
        (shutdown(SHUT_WR)) and close.
      * hold_until_eof=True: echo nothing until the client's FIN, then send
        everything received back, then FIN -- proves that a client half-close
        reaches the upstream while the other direction keeps flowing.
      * echo=False: swallow bytes (a sink), FIN on FIN.
      * greeting=b"...": send these bytes first, on accept.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, echo: bool = True,
                 hold_until_eof: bool = False, greeting: bytes = b""):
        self.echo = echo
        self.hold_until_eof = hold_until_eof
        self.greeting = greeting
        self.conns: list[UpstreamConn] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._sock = socket.socket(family_of(host), socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(1024)
        self._sock.settimeout(0.1)
        self.host, self.port = self._sock.getsockname()[:2]
        self._threads: list[threading.Thread] = []
        self._clients: list[socket.socket] = []
        t = threading.Thread(target=self._accept_loop, daemon=True, name="echo-accept")
        t.start()
        self._threads.append(t)

    @property
    def address(self) -> str:
        return fmt_addr(self.host, self.port)

    # -- observations --------------------------------------------------------
    @property
    def peers(self) -> list[tuple]:
        with self._lock:
            return [c.peer for c in self.conns]

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self.conns)

    @property
    def bytes_received(self) -> bytes:
        with self._lock:
            return b"".join(bytes(c.received) for c in self.conns)

    def saw_anything(self) -> bool:
        with self._lock:
            return bool(self.conns)

    def assert_untouched(self, quiet_period: float = 0.3):
        """The upstream never saw a connection (nor, so, a byte)."""
        assert stays_false(self.saw_anything, quiet_period), (
            f"upstream saw {self.connection_count} connection(s) from {self.peers}, "
            f"bytes={self.bytes_received[:64]!r}")

    def wait_connections(self, n: int, timeout: float = DEFAULT_TIMEOUT):
        wait_until(lambda: self.connection_count >= n, timeout, what=f"{n} upstream connection(s)")

    # -- serving -------------------------------------------------------------
    def _accept_loop(self):
        while not self._stopped.is_set():
            try:
                client, peer = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn = UpstreamConn(peer=peer)
            with self._lock:
                self.conns.append(conn)
                self._clients.append(client)
            t = threading.Thread(target=self._serve, args=(client, conn), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, client: socket.socket, conn: UpstreamConn):
        client.settimeout(0.2)
        try:
            if self.greeting:
                client.sendall(self.greeting)
            while not self._stopped.is_set():
                try:
                    data = client.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    with self._lock:
                        conn.eof = True
                    if self.hold_until_eof:
                        client.sendall(bytes(conn.received))
                    client.shutdown(socket.SHUT_WR)
                    break
                with self._lock:
                    conn.received += data
                if self.echo and not self.hold_until_eof:
                    client.sendall(data)
            # Let the peer close first so that our FIN is not followed by a RST.
            client.settimeout(2.0)
            try:
                while client.recv(65536):
                    pass
            except OSError:
                pass
        except OSError:
            pass
        finally:
            with self._lock:
                conn.closed = True
            client.close()

    def close(self):
        self._stopped.set()
        try:
            self._sock.close()
        except OSError:
            pass
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class MongoUpstream:
    """A MongoDB wire-protocol upstream built on mockupdb, answering by itself.

    mockupdb's own `auto_ismaster` advertises a wire version pymongo 4 rejects
    and does not answer `hello`, so it is off; one handler answers
    hello/isMaster, ping, buildInfo, insert (stores documents), find (returns
    stored documents), endSessions, and an error for anything else.
    """

    MAX_WIRE_VERSION = 17  # MongoDB 6.0

    def __init__(self, host: str = "127.0.0.1", port: int | None = None):
        from mockupdb import MockupDB  # imported lazily: only Mongo tests need it

        outer = self

        class _RecordingMockupDB(MockupDB):
            def _server_loop(self, client, client_addr):  # noqa: D401 - mockupdb hook
                with outer._lock:
                    outer.accepted.append(client_addr)
                    outer._connection_ids.setdefault(client_addr[1], len(outer._connection_ids) + 1)
                return super()._server_loop(client, client_addr)

        self._lock = threading.Lock()
        self.accepted: list[tuple] = []
        self.commands: list[str] = []
        self.collections: dict[tuple[str, str], list[dict]] = {}
        self._connection_ids: dict[int, int] = {}
        self.server = _RecordingMockupDB(port=port, auto_ismaster=False, request_timeout=10)
        self.server._address = (host, port or 0)  # mockupdb binds to localhost by default
        self.server.run()
        self.server.autoresponds(self._handle)

    # -- observations --------------------------------------------------------
    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return fmt_addr(self.host, self.port)

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self.accepted)

    def saw_anything(self) -> bool:
        with self._lock:
            return bool(self.accepted)

    def assert_untouched(self, quiet_period: float = 0.3):
        assert stays_false(self.saw_anything, quiet_period), (
            f"mongo upstream saw connections from {self.accepted}")

    # -- handler ---------------------------------------------------------------
    def _handle(self, request) -> bool:
        from bson import ObjectId
        from bson.int64 import Int64

        name = getattr(request, "command_name", None)
        if not name:
            return request.command_err(code=59, errmsg="moat tests: not a command")
        cmd = name.lower()
        doc = request.doc
        with self._lock:
            self.commands.append(name)
        db = request.namespace or "admin"
        if db.endswith(".$cmd"):
            db = db[: -len(".$cmd")]

        if cmd in ("hello", "ismaster"):
            try:
                port = request.client_port
            except OSError:
                port = 0
            with self._lock:
                conn_id = self._connection_ids.get(port, 0)
            return request.ok(
                isWritablePrimary=True,
                ismaster=True,
                maxWireVersion=self.MAX_WIRE_VERSION,
                minWireVersion=0,
                maxBsonObjectSize=16 * 1024 * 1024,
                maxMessageSizeBytes=48_000_000,
                maxWriteBatchSize=100_000,
                localTime=_dt.datetime.now(_dt.timezone.utc),
                logicalSessionTimeoutMinutes=30,
                connectionId=conn_id,
                readOnly=False,
            )
        if cmd == "ping":
            return request.ok()
        if cmd == "buildinfo":
            return request.ok(version="6.0.0", versionArray=[6, 0, 0, 0], gitVersion="mockupdb",
                              maxBsonObjectSize=16 * 1024 * 1024)
        if cmd == "endsessions":
            return request.ok()
        if cmd == "insert":
            coll = doc[name]
            docs = list(doc.get("documents", []))
            for d in docs:
                d.setdefault("_id", ObjectId())
            with self._lock:
                self.collections.setdefault((db, coll), []).extend(docs)
            return request.ok(n=len(docs))
        if cmd == "find":
            coll = doc[name]
            flt = doc.get("filter") or {}
            with self._lock:
                stored = list(self.collections.get((db, coll), []))
            batch = [d for d in stored if all(d.get(k) == v for k, v in flt.items())]
            limit = doc.get("limit") or 0
            if limit:
                batch = batch[: abs(limit)]
            return request.ok(cursor={"id": Int64(0), "ns": f"{db}.{coll}", "firstBatch": batch})
        return request.command_err(code=59, errmsg=f"no such command: '{name}'")

    def close(self):
        self.server.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------
# Refusal
# --------------------------------------------------------------------------


def assert_refused(port: int, src_ip: str = "127.0.0.1", *, upstream=None,
                   family: socket.AddressFamily | None = None, dst: str | None = None,
                   send: bytes = b"\x16\x03\x01\x00\x05hello", timeout: float = 5.0,
                   quiet_period: float = 0.3) -> str:
    """Connect from `src_ip` and assert moat refuses: the connection is reset or
    closed without a single byte, and `upstream` (EchoServer/MongoUpstream)
    never saw a connection. Returns "reset" or "closed"."""
    try:
        sock = connect_from(src_ip, port, family=family, dst=dst, timeout=timeout)
    except ConnectionResetError:
        # On loopback the RST can land before connect() has read SO_ERROR.
        outcome = "reset"
    else:
        try:
            outcome = connection_outcome(sock, timeout=timeout, send=send)
        finally:
            sock.close()
    assert outcome in ("reset", "closed"), (
        f"connection from {src_ip} to port {port} was not refused: {outcome}")
    if upstream is not None:
        upstream.assert_untouched(quiet_period)
    return outcome


def assert_echoes(port: int, src_ip: str = "127.0.0.1", payload: bytes = b"ping moat\n",
                  family: socket.AddressFamily | None = None, dst: str | None = None,
                  timeout: float = 5.0):
    """Connect from `src_ip` through moat to an EchoServer and get `payload` back."""
    with connect_from(src_ip, port, family=family, dst=dst, timeout=timeout) as s:
        s.sendall(payload)
        assert recv_exactly(s, len(payload), timeout) == payload


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def _unescape(v: str) -> str:
    return v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")


def parse_prometheus(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text exposition -> {(name, frozenset({(label, value), ...})): value}."""
    out: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise ValueError(f"unparsable metrics line: {line!r}")
        name, labels_text, value = m.groups()
        labels = {}
        if labels_text:
            pos = 0
            while pos < len(labels_text):
                lm = _LABEL.match(labels_text, pos)
                if not lm:
                    raise ValueError(f"unparsable labels in: {line!r}")
                labels[lm.group(1)] = _unescape(lm.group(2))
                pos = lm.end()
        out[(name, frozenset(labels.items()))] = float(value)
    return out


def metric(metrics: Mapping, name: str, default: float = 0.0, **labels) -> float:
    """One sample by exact name and label set (absent -> default)."""
    return metrics.get((name, frozenset(labels.items())), default)


def metric_sum(metrics: Mapping, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= set(ls))


def http_get(addr: str, path: str, timeout: float = 5.0) -> tuple[int, str]:
    host, port = parse_addr(addr)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


# --------------------------------------------------------------------------
# The moat process
# --------------------------------------------------------------------------


def write_files(directory: Path, files: Mapping[str, str | bytes] | None):
    for rel, content in (files or {}).items():
        p = directory / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)


def _probe_addrs(listen: str) -> tuple[str, int]:
    host, port = parse_addr(listen)
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, port


class Moat:
    """`moat run -c DIR/moat.toml` as a child process.

    The config is written to `directory` (a fresh temp dir by default) along
    with `extra_files` ({relative path: content}). stderr goes to
    DIR/moat.stderr. `start()` waits until moat is ready: GET /readyz == 200
    when `[server] admin_listen` is set, else until every listen address
    accepts a TCP connection (such a probe comes from 127.0.0.1 and may be
    counted by moat as a refused connection).
    """

    def __init__(self, config_text: str, extra_files: Mapping[str, str | bytes] | None = None,
                 directory: Path | str | None = None, config_name: str = "moat.toml",
                 env: Mapping[str, str] | None = None, args: Iterable[str] = ()):
        self.dir = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="moat-e2e-"))
        self.config_path = self.dir / config_name
        self.stderr_path = self.dir / "moat.stderr"
        self.stdout_path = self.dir / "moat.stdout"
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("RUST_LOG", "info")
        self.env.setdefault("RUST_BACKTRACE", "1")
        self.env.pop("NOTIFY_SOCKET", None)
        self.args = list(args)
        self.proc: subprocess.Popen | None = None
        self.write_config(config_text, extra_files)

    # -- files -----------------------------------------------------------------
    def write_config(self, config_text: str, extra_files=None, atomic: bool = True):
        """(Re)write the config; with `atomic` via rename, as editors do."""
        write_files(self.dir, extra_files)
        if atomic:
            tmp = self.config_path.with_name(self.config_path.name + ".tmp")
            tmp.write_text(config_text)
            os.replace(tmp, self.config_path)
        else:
            self.config_path.write_text(config_text)
        self.config_text = config_text
        self.config = tomllib.loads(config_text)

    @property
    def admin(self) -> str | None:
        return self.config.get("server", {}).get("admin_listen")

    def listen_addrs(self, deployment: str | None = None) -> list[str]:
        out = []
        for d in self.config.get("deployment", []):
            if deployment and d.get("name") != deployment:
                continue
            listen = d.get("listen", [])
            out.extend([listen] if isinstance(listen, str) else listen)
        return out

    # -- process ---------------------------------------------------------------
    def start(self, wait: bool = True, timeout: float = DEFAULT_TIMEOUT) -> "Moat":
        assert self.proc is None, "already started"
        exe = moat_bin()
        if not os.access(exe, os.X_OK):
            raise FileNotFoundError(f"moat binary not found at {exe} (set MOAT_BIN or run cargo build)")
        self._stderr = open(self.stderr_path, "wb")
        self._stdout = open(self.stdout_path, "wb")
        self.proc = subprocess.Popen(
            [exe, "run", "-c", str(self.config_path), *self.args],
            cwd="/", env=self.env, stdin=subprocess.DEVNULL,  # config paths are relative to its dir
            stdout=self._stdout, stderr=self._stderr, start_new_session=True,
        )
        if wait:
            self.wait_ready(timeout)
        return self

    def _check_alive(self):
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"moat exited with {self.proc.returncode} before it was ready; stderr:\n"
                + self.stderr_text())

    def _ready(self) -> bool:
        self._check_alive()
        if self.admin:
            try:
                status, _ = http_get(self.admin, "/readyz", timeout=1)
                return status == 200
            except OSError:
                return False
        for addr in self.listen_addrs():
            host, port = _probe_addrs(addr)
            try:
                socket.create_connection((host, port), timeout=1).close()
            except OSError:
                return False
        return True

    def wait_ready(self, timeout: float = DEFAULT_TIMEOUT):
        try:
            wait_until(self._ready, timeout, interval=0.02, what="moat to become ready")
        except TimeoutError as e:
            how = f"GET http://{self.admin}/readyz" if self.admin else f"connect to {self.listen_addrs()}"
            raise TimeoutError(f"{e} ({how}); stderr:\n{self.stderr_text()[-5000:]}") from None

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int = signal.SIGHUP):
        self.proc.send_signal(sig)

    def reload(self):
        """SIGHUP."""
        self.send_signal(signal.SIGHUP)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 45.0) -> int:
        """Send SIGTERM (by default), wait for the exit, return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for f in (getattr(self, "_stderr", None), getattr(self, "_stdout", None)):
            if f and not f.closed:
                f.close()

    # -- observations ----------------------------------------------------------
    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_stderr(self, pattern: str, timeout: float = DEFAULT_TIMEOUT) -> re.Match:
        """Wait until stderr matches the regex `pattern`."""
        rx = re.compile(pattern)
        return wait_until(lambda: rx.search(self.stderr_text()), timeout, what=f"stderr =~ {pattern!r}")

    def http(self, path: str) -> tuple[int, str]:
        assert self.admin, "config has no [server] admin_listen"
        return http_get(self.admin, path)

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        status, body = self.http("/metrics")
        assert status == 200, f"/metrics answered {status}"
        return parse_prometheus(body)

    def metric(self, name: str, default: float = 0.0, **labels) -> float:
        return metric(self.metrics(), name, default, **labels)

    def wait_metric(self, name: str, value: float | Callable[[float], bool],
                    timeout: float = DEFAULT_TIMEOUT, **labels) -> float:
        """Wait until the sample reaches `value` (or satisfies the predicate)."""
        check = value if callable(value) else (lambda v: v == value)

        def probe():
            v = self.metric(name, **labels)
            return (True, v) if check(v) else None
        try:
            return wait_until(probe, timeout, what=f"{name}{labels} == {value}")[1]
        except TimeoutError:
            raise AssertionError(f"{name}{labels} is {self.metric(name, **labels)}, wanted {value}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def stop_all(started: list[Moat], request) -> None:
    """Fixture teardown: kill every moat started; when the test failed, print
    each one's stderr (the last 20,000 characters)."""
    for m in started:
        m.kill()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for m in started:
            sys.stderr.write(f"\n----- moat stderr ({m.stderr_path}) -----\n{m.stderr_text()[-20000:]}\n")


# --------------------------------------------------------------------------
# moat check / moat explain
# --------------------------------------------------------------------------


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def __iter__(self):  # (code, stdout, stderr) = run_check(...)
        return iter((self.code, self.stdout, self.stderr))


def run_moat(args: Iterable[str], cwd: Path | str | None = None,
             env: Mapping[str, str] | None = None, timeout: float = 30.0) -> Result:
    e = {**os.environ, **(env or {})}
    e.pop("NOTIFY_SOCKET", None)
    p = subprocess.run([moat_bin(), *args], cwd=cwd, env=e, stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=timeout)
    return Result(p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))


def _config_dir(config_text: str, extra_files, directory, config_name) -> Path:
    d = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="moat-e2e-"))
    d.mkdir(parents=True, exist_ok=True)
    write_files(d, extra_files)
    (d / config_name).write_text(textwrap.dedent(config_text))
    return d


def run_check(config_text: str, extra_files: Mapping[str, str | bytes] | None = None, *,
              directory: Path | str | None = None, config_name: str = "moat.toml") -> Result:
    """`moat check -c DIR/moat.toml` -> Result(code, stdout, stderr)."""
    d = _config_dir(config_text, extra_files, directory, config_name)
    # cwd is "/" on purpose: paths in the config are relative to its directory.
    return run_moat(["check", "-c", str(d / config_name)], cwd="/")


def run_explain(config_text: str, deployment: str, ip: str,
                extra_files: Mapping[str, str | bytes] | None = None, *,
                directory: Path | str | None = None, config_name: str = "moat.toml") -> Result:
    """`moat explain -c DIR/moat.toml --deployment NAME IP` -> Result(code, stdout, stderr)."""
    d = _config_dir(config_text, extra_files, directory, config_name)
    return run_moat(["explain", "-c", str(d / config_name), "--deployment", deployment, ip], cwd="/")


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based line number of the `occurrence`-th line containing `needle`."""
    seen = 0
    for i, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            seen += 1
            if seen == occurrence:
                return i
    raise ValueError(f"{needle!r} not in text")


def col_of(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based column where `needle` starts on the line `line_of` finds."""
    line = text.splitlines()[line_of(text, needle, occurrence) - 1]
    return line.index(needle) + 1


# --------------------------------------------------------------------------
# Throwaway certificates (cryptography)
# --------------------------------------------------------------------------


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


def _new_key(key_type: str):
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(key_type)


def key_pem(key, fmt: str = "pkcs8") -> bytes:
    """PEM of a private key: "pkcs8", or "traditional" (PKCS#1 for RSA, SEC1 for EC)."""
    from cryptography.hazmat.primitives import serialization as ser
    f = ser.PrivateFormat.PKCS8 if fmt == "pkcs8" else ser.PrivateFormat.TraditionalOpenSSL
    return key.private_bytes(ser.Encoding.PEM, f, ser.NoEncryption())


def cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization as ser
    return cert.public_bytes(ser.Encoding.PEM)


def _san(names: Iterable[str]):
    from cryptography import x509
    out = []
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


@dataclass
class Issued:
    """A certificate written to disk: `cert_path` (chain PEM) and `key_path`."""
    cert: object
    key: object
    cert_path: Path
    key_path: Path

    @property
    def combined_path(self) -> Path:
        """cert + key in one file, as pymongo's tlsCertificateKeyFile wants."""
        p = self.cert_path.with_name(self.cert_path.stem + "-combined.pem")
        if not p.exists():
            p.write_bytes(self.cert_path.read_bytes() + key_pem(self.key))
            p.chmod(0o600)
        return p


class CertAuthority:
    """A throwaway CA that writes PEM files into `directory`.

        ca = CertAuthority(tmp_path)                      # ca.pem, ca-key.pem
        srv = ca.issue("orders", ["orders.db.test", "127.0.0.1"])
        old = ca.issue("old", ["localhost"], not_after=now - 1 day)   # expired
        cli = ca.issue("client", client=True, cn="app")
        other = CertAuthority(tmp_path, name="other-ca")  # a second, unrelated CA
    """

    def __init__(self, directory: Path | str, name: str = "ca", cn: str | None = None,
                 key_type: str = "ec", days: int = 3650):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import NameOID

        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.key = _new_key(key_type)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn or f"moat test CA {name}")])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(days=1))
            .not_valid_after(now + _dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = self.dir / f"{name}.pem"
        self.key_path = self.dir / f"{name}-key.pem"
        self.cert_path.write_bytes(cert_pem(self.cert))
        self.key_path.write_bytes(key_pem(self.key))
        self.key_path.chmod(0o600)

    def issue(self, name: str, sans: Iterable[str] = ("localhost", "127.0.0.1", "::1"), *,
              client: bool = False, cn: str | None = None, key_type: str = "ec",
              key_format: str = "pkcs8", not_before: _dt.datetime | None = None,
              not_after: _dt.datetime | None = None, chain: bool = True,
              key_mode: int = 0o600) -> Issued:
        """Sign a server (default) or client certificate, write NAME.pem
        (leaf, plus the CA when `chain`) and NAME-key.pem; return `Issued`."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        sans = list(sans)
        key = _new_key(key_type)
        now = _now()
        not_before = not_before or now - _dt.timedelta(hours=1)
        not_after = not_after or now + _dt.timedelta(days=365)
        if not_before >= not_after:
            not_before = not_after - _dt.timedelta(days=30)
        common = cn or (sans[0] if sans else name)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(_san(sans)), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path = self.dir / f"{name}.pem"
        key_path = self.dir / f"{name}-key.pem"
        cert_path.write_bytes(cert_pem(cert) + (cert_pem(self.cert) if chain else b""))
        key_path.write_bytes(key_pem(key, key_format))
        key_path.chmod(key_mode)
        return Issued(cert, key, cert_path, key_path)


def ssl_client_context(ca: CertAuthority | Path | str | None, client: Issued | None = None,
                       min_version=None, max_version=None):
    """An ssl.SSLContext that trusts `ca` and optionally presents `client`."""
    import ssl
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca is not None:
        ctx.load_verify_locations(str(ca.cert_path if isinstance(ca, CertAuthority) else ca))
    if client is not None:
        ctx.load_cert_chain(str(client.cert_path), str(client.key_path))
    if min_version is not None:
        ctx.minimum_version = min_version
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx
