"""Extra helpers for test_tls.py and test_reload.py (TLS clients, served
certificates, config-file writers, probes). Polls with deadlines, never
sleeps to synchronise."""

from __future__ import annotations

import errno
import os
import socket
import ssl
import statistics
import time
from pathlib import Path

from moatlib import connect_from, recv_exactly, ssl_client_context

# --------------------------------------------------------------------------
# TLS clients
# --------------------------------------------------------------------------


def client_ctx(ca_path=None, *, client=None, min_version=None, max_version=None,
               verify: bool = True) -> ssl.SSLContext:
    """moatlib.ssl_client_context (trusting `ca_path`, optionally presenting
    `client`), or with verify=False one that checks no certificate."""
    ctx = ssl_client_context(ca_path if verify else None, client, min_version, max_version)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_connect(port: int, src_ip: str, ctx: ssl.SSLContext, server_hostname: str | None,
                timeout: float = 5.0) -> ssl.SSLSocket:
    """TCP from `src_ip`, then a full TLS handshake (raises on failure)."""
    raw = connect_from(src_ip, port, timeout=timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname=server_hostname)
    except BaseException:
        raw.close()
        raise


def tls_echo(port: int, src_ip: str, ctx: ssl.SSLContext, server_hostname: str | None,
             payload: bytes = b"hello through tls\n", timeout: float = 5.0) -> ssl.SSLSocket:
    """Handshake, send `payload`, get it back; returns the (open) socket."""
    s = tls_connect(port, src_ip, ctx, server_hostname, timeout)
    try:
        s.sendall(payload)
        got = recv_exactly(s, len(payload), timeout)
        assert got == payload, f"echo mismatch: {got!r} != {payload!r}"
    except BaseException:
        s.close()
        raise
    return s


HANDSHAKE_FAILURES = (ssl.SSLError, ConnectionResetError, ConnectionAbortedError,
                      BrokenPipeError, EOFError, socket.timeout, TimeoutError)


def tls_fails(port: int, src_ip: str, ctx: ssl.SSLContext, server_hostname: str | None,
              payload: bytes = b"must not pass\n", timeout: float = 5.0) -> str:
    """Assert the TLS session cannot carry data: the handshake fails, or
    (TLS 1.3, client certificate rejected after the client's Finished) the
    first read fails / sees EOF. Returns a description of how it failed."""
    try:
        s = tls_connect(port, src_ip, ctx, server_hostname, timeout)
    except HANDSHAKE_FAILURES as e:
        return f"handshake: {type(e).__name__}: {e}"
    except OSError as e:
        if e.errno in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, 0, None):
            return f"handshake: {e!r}"
        raise
    try:
        try:
            s.sendall(payload)
            data = s.recv(len(payload))
        except HANDSHAKE_FAILURES as e:
            return f"after handshake: {type(e).__name__}: {e}"
        except OSError as e:
            return f"after handshake: {e!r}"
        assert not data, f"TLS session unexpectedly carried data: {data!r}"
        return "after handshake: EOF"
    finally:
        s.close()


def served_cert(sock: ssl.SSLSocket):
    """The leaf certificate the server presented, as a cryptography object."""
    from cryptography import x509
    der = sock.getpeercert(binary_form=True)
    assert der, "no peer certificate"
    return x509.load_der_x509_certificate(der)


def fetch_served_cert(port: int, src_ip: str, server_hostname: str | None, timeout: float = 5.0):
    """Handshake without verification and return the served leaf certificate."""
    ctx = client_ctx(verify=False)
    with tls_connect(port, src_ip, ctx, server_hostname, timeout) as s:
        return served_cert(s)


def cert_dns_names(cert) -> list[str]:
    from cryptography import x509
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return ext.value.get_values_for_type(x509.DNSName)


def cert_cn(cert) -> str:
    from cryptography.x509.oid import NameOID
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def client_hello(server_hostname: str | None = "localhost") -> bytes:
    """The bytes of a real ClientHello (produced by ssl over MemoryBIOs)."""
    ctx = client_ctx(verify=False)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_side=False, server_hostname=server_hostname)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    data = out.read()
    assert data[:1] == b"\x16", data[:8]
    return data


# --------------------------------------------------------------------------
# Plain probes
# --------------------------------------------------------------------------


def try_echo(port: int, src_ip: str, payload: bytes = b"probe\n", timeout: float = 2.0) -> bool:
    """True when a plaintext connection from `src_ip` echoes; False when it is
    refused (connection refused / reset / EOF)."""
    try:
        with connect_from(src_ip, port, timeout=timeout) as s:
            s.sendall(payload)
            return recv_exactly(s, len(payload), timeout) == payload
    except (OSError, EOFError):
        return False


def try_tls_echo(port: int, src_ip: str, ctx, server_hostname, timeout: float = 2.0) -> bool:
    try:
        tls_echo(port, src_ip, ctx, server_hostname, timeout=timeout).close()
        return True
    except (OSError, EOFError, AssertionError):
        return False


def connect_refused(port: int, src_ip: str = "127.0.0.2", timeout: float = 2.0) -> bool:
    """True when nothing listens on the port (ECONNREFUSED)."""
    try:
        connect_from(src_ip, port, timeout=timeout).close()
        return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def wait_closed(sock: socket.socket, timeout: float) -> str:
    """Read until the peer closes (EOF -> "eof", RST -> "reset"); raise
    TimeoutError if it is still open after `timeout`. Bytes read are
    returned only if the peer sends data ("data:...")."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("connection still open")
        sock.settimeout(min(left, 0.5))
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except ssl.SSLError:
            return "reset"
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            return "reset"
        if not data:
            return "eof"
        return f"data:{data[:32]!r}"


# --------------------------------------------------------------------------
# Writing files the ways operators' tools do
# --------------------------------------------------------------------------


def write_in_place(path: Path, text: str | bytes):
    """open(path, 'w') + write: same inode, truncated then filled."""
    mode = "wb" if isinstance(text, bytes) else "w"
    with open(path, mode) as f:
        f.write(text)


def write_rename(path: Path, text: str | bytes):
    """Write a temp file in the same directory and rename it over `path`
    (vim with backupcopy=no, sed -i, most config managers)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text)
    os.replace(tmp, path)


class ConfigMapDir:
    """The layout kubelet gives a ConfigMap/Secret volume:

        DIR/..2026_01_01_00_00_00.000/moat.toml
        DIR/..data -> ..2026_01_01_00_00_00.000
        DIR/moat.toml -> ..data/moat.toml

    `update(files)` writes a new timestamped dir, points `..data_tmp` at it
    and renames `..data_tmp` over `..data` (atomic symlink swap), then
    removes the old timestamped dir, as kubelet does."""

    def __init__(self, directory: Path, files: dict[str, str | bytes]):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n = 0
        self.current = self._write_version(files, "..2026_01_01_00_00_00.000")
        os.symlink(self.current, self.dir / "..data")
        for name in files:
            os.symlink(f"..data/{name}", self.dir / name)

    def _write_version(self, files, name=None) -> str:
        self.n += 1
        name = name or f"..2026_01_01_00_00_{self.n:02d}.{self.n:03d}"
        d = self.dir / name
        d.mkdir()
        for rel, content in files.items():
            p = d / rel
            if isinstance(content, bytes):
                p.write_bytes(content)
            else:
                p.write_text(content)
        return name

    def update(self, files: dict[str, str | bytes]):
        old = self.current
        new = self._write_version(files)
        tmp = self.dir / "..data_tmp"
        os.symlink(new, tmp)
        os.rename(tmp, self.dir / "..data")
        self.current = new
        import shutil
        shutil.rmtree(self.dir / old)

    def path(self, name: str) -> Path:
        return self.dir / name


# --------------------------------------------------------------------------
# Latency bookkeeping
# --------------------------------------------------------------------------


def summarize(samples: dict[str, float]) -> str:
    if not samples:
        return "no reload latency samples"
    vals = sorted(samples.values())
    lines = [f"reload latency (file write -> enforcement) over {len(vals)} triggers: "
             f"median {statistics.median(vals) * 1000:.0f} ms, worst {vals[-1] * 1000:.0f} ms"]
    for k, v in sorted(samples.items(), key=lambda kv: kv[1]):
        lines.append(f"  {k:<28} {v * 1000:7.0f} ms")
    return "\n".join(lines)
