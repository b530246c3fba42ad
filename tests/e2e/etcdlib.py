"""A real etcd for the fleet-store tests (SPEC 7): Debian's `etcd-server`,
started on free loopback ports with a temporary data directory and stopped
by its PID. Keys are written through etcd's own JSON gateway (`/v3/kv/...`),
which speaks the same v3 API as etcdctl, one HTTP connection per call.

Also a cuttable TCP relay (`Relay`) to put a network partition between one
moat and etcd while the test itself still reaches etcd.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from moatlib import free_ports, wait_until


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _prefix_end(prefix: str) -> str:
    b = bytearray(prefix.encode())
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return _b64(bytes(b))
        b.pop()
    return _b64(b"\0")


def etcd_bin() -> str | None:
    return shutil.which("etcd") or (
        "/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None)


class Etcd:
    """One etcd member on 127.0.0.1: `client_url` for moat, the JSON API for the test."""

    def __init__(self, data_dir: Path | None = None, tls=None):
        """`tls`: (CertAuthority, server Issued, client Issued) for https with
        client-certificate authentication; the test's own calls present the
        client certificate too."""
        exe = etcd_bin()
        if exe is None:
            raise FileNotFoundError("etcd is not installed (apt-get install etcd-server); ./test.sh installs it")
        self.exe = exe
        self.dir = Path(data_dir or tempfile.mkdtemp(prefix="moat-etcd-"))
        self.client_port, self.peer_port = free_ports(2)
        self.tls = tls
        scheme = "https" if tls else "http"
        self.client_url = f"{scheme}://127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "etcd.log"

    # -- process ---------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> "Etcd":
        assert self.proc is None or self.proc.poll() is not None, "etcd already running"
        peer = f"http://127.0.0.1:{self.peer_port}"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.exe, "--name", "moat-test", "--data-dir", str(self.dir / "data"),
             "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"moat-test={peer}", "--initial-cluster-state", "new",
             "--logger", "zap", "--log-outputs", "stderr", *self._tls_flags()],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, start_new_session=True,
        )
        wait_until(self._healthy, timeout, interval=0.05, what="etcd to answer")
        return self

    def _tls_flags(self) -> list[str]:
        if not self.tls:
            return []
        ca, server, _ = self.tls
        return ["--cert-file", str(server.cert_path), "--key-file", str(server.key_path),
                "--client-cert-auth", "--trusted-ca-file", str(ca.cert_path)]

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
        try:
            self.revision()
            return True
        except OSError:
            return False

    def kill(self):
        """SIGKILL by PID, as a crash."""
        self._signal(signal.SIGKILL)

    def stop(self):
        self._signal(signal.SIGTERM)

    def _signal(self, sig):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()

    def cleanup(self):
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the v3 JSON API -------------------------------------------------------
    def call(self, path: str, body: dict, timeout: float = 5.0) -> dict:
        if self.tls:
            from moatlib import ssl_client_context
            ca, _, client = self.tls
            conn = http.client.HTTPSConnection("127.0.0.1", self.client_port, timeout=timeout,
                                               context=ssl_client_context(ca, client))
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.client_port, timeout=timeout)
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = json.loads(resp.read() or b"{}")
        finally:
            conn.close()
        if resp.status != 200:
            raise RuntimeError(f"etcd {path} answered {resp.status}: {data}")
        return data

    def put(self, key: str, value: str | bytes | dict) -> int:
        """Puts one key; returns the revision of the write."""
        if isinstance(value, dict):
            value = json.dumps(value)
        r = self.call("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})
        return int(r["header"]["revision"])

    def put_many(self, items: list[tuple[str, str | dict]], per_txn: int = 100) -> int:
        """Puts many keys, `per_txn` to a transaction; returns the last revision."""
        rev = 0
        for i in range(0, len(items), per_txn):
            ops = [{"requestPut": {"key": _b64(k), "value": _b64(v if isinstance(v, str) else json.dumps(v))}}
                   for k, v in items[i:i + per_txn]]
            r = self.call("/v3/kv/txn", {"success": ops}, timeout=30)
            rev = int(r["header"]["revision"])
        return rev

    def delete(self, key: str) -> int:
        r = self.call("/v3/kv/deleterange", {"key": _b64(key)})
        return int(r["header"]["revision"])

    def get(self, key: str) -> bytes | None:
        r = self.call("/v3/kv/range", {"key": _b64(key)})
        kvs = r.get("kvs") or []
        return base64.b64decode(kvs[0].get("value", "")) if kvs else None

    def keys(self, prefix: str) -> dict[str, bytes]:
        r = self.call("/v3/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
                for kv in r.get("kvs") or []}

    def revision(self) -> int:
        r = self.call("/v3/kv/range", {"key": _b64("/"), "count_only": True}, timeout=1.0)
        return int(r["header"]["revision"])

    def compact(self, revision: int | None = None) -> int:
        rev = revision or self.revision()
        self.call("/v3/kv/compaction", {"revision": rev, "physical": True})
        return rev


class Relay:
    """A TCP relay on 127.0.0.1 in front of `target_port`. `cut()` closes every
    relayed connection and refuses new ones (a partition); `heal()` relays again."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.heal()

    def heal(self):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, listener: socket.socket):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        if self._listener is not None:
            try:  # wakes the thread blocked in accept(), which close() alone does not
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.cut()


def wait_admitted(port: int, src: str, timeout: float = 5.0) -> float:
    """Polls until a connection from `src` is proxied (echoed); returns the seconds it took."""
    from moatlib import assert_echoes
    t0 = time.monotonic()

    def ok():
        try:
            assert_echoes(port, src, timeout=1.0)
            return True
        except (OSError, AssertionError, EOFError):
            return False
    wait_until(ok, timeout, interval=0.01, what=f"{src} to be admitted on {port}")
    return time.monotonic() - t0


def wait_refused(port: int, src: str, timeout: float = 5.0) -> float:
    """Polls until a connection from `src` is refused; returns the seconds it took."""
    from moatlib import connect_from, connection_outcome
    t0 = time.monotonic()

    def refused():
        try:
            s = connect_from(src, port, timeout=1.0)
        except ConnectionResetError:
            return True
        try:
            return connection_outcome(s, timeout=1.0, send=b"x") in ("reset", "closed")
        finally:
            s.close()
    wait_until(refused, timeout, interval=0.01, what=f"{src} to be refused on {port}")
    return time.monotonic() - t0


def etcd_server_cert(ca, name: str = "etcd"):
    """A certificate for etcd's client port, usable for both server and client
    authentication: etcd 3.4's JSON gateway dials etcd itself with it."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from moatlib import Issued, _new_key, _san, cert_pem, key_pem
    key = _new_key("ec")
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_san(["localhost", "127.0.0.1"])), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    cert_path, key_path = ca.dir / f"{name}.pem", ca.dir / f"{name}-key.pem"
    cert_path.write_bytes(cert_pem(cert) + cert_pem(ca.cert))
    key_path.write_bytes(key_pem(key))
    key_path.chmod(0o600)
    return Issued(cert, key, cert_path, key_path)
