"""The README and config/certs/README.md followed literally: the run step is
one command, the `moat explain` examples are what `moat explain` answers on
the example config, the certificates' "Try them" command reaches moat's TLS
port of the example config and completes a verified handshake, and the
combined certificate-and-key file works as a client certificate (what
mongosh's tlsCertificateKeyFile needs)."""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
import tomllib

import pytest
from _tlslib import client_ctx, tls_echo
from moatlib import REPO, free_ports, run_moat

README = (REPO / "README.md").read_text()
CERTS_README = (REPO / "config" / "certs" / "README.md").read_text()
EXAMPLE = REPO / "config" / "moat.toml"
CERTS = REPO / "config" / "certs"


def test_run_step_is_one_command():
    block = re.search(r"## The two commands.*?```sh\n(.*?)```", README, re.S).group(1)
    assert block.strip() == "cargo run --release -- run -c config/moat.toml"


def explain_examples() -> list[tuple[list[str], str, list[str]]]:
    """(arguments, the stdout line, the indented stderr lines after it)."""
    out = []
    lines = README.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("$ moat explain "):
            notes = []
            for later in lines[i + 2:]:
                if not later.startswith("  "):
                    break
                notes.append(later)
            out.append((line.removeprefix("$ moat ").split(), lines[i + 1], notes))
    return out


def test_explain_examples_match_the_example_config():
    examples = explain_examples()
    assert len(examples) >= 5
    kinds = {want.split(" ", 1)[0] for _, want, _ in examples}
    assert kinds == {"allow", "deny"}
    notes = [n for _, _, ns in examples for n in ns]
    assert any("copied from" in n for n in notes) and any("security group" in n for n in notes)
    for args, want, notes in examples:
        res = run_moat(args, cwd=REPO)
        assert res.stdout.rstrip("\n") == want, f"moat {' '.join(args)}\n{res.output}"
        for n in notes:
            assert n in res.stderr.splitlines(), f"moat {' '.join(args)}: {n!r} not on stderr\n{res.output}"
        assert res.code == (0 if want.startswith("allow") else 1), res.output


def example_listens() -> dict[str, list[str]]:
    doc = tomllib.loads(EXAMPLE.read_text())
    return {d["name"]: ([d["listen"]] if isinstance(d["listen"], str) else d["listen"]) for d in doc["deployment"]}


def test_try_them_targets_the_tls_port_of_the_example_config():
    cmd = next(l for l in CERTS_README.splitlines() if l.startswith("openssl s_client"))
    port = re.search(r"-connect 127\.0\.0\.1:(\d+)", cmd).group(1)
    doc = tomllib.loads(EXAMPLE.read_text())
    tls = [d for d in doc["deployment"] if "tls" in d]
    assert [f"127.0.0.1:{port}"] in [([d["listen"]] if isinstance(d["listen"], str) else d["listen"]) for d in tls]
    assert f"127.0.0.1:{port}" != doc["deployment"][0]["upstream"]
    for line in CERTS_README.splitlines():
        if line.startswith("mongosh "):
            assert ":27017" not in line, line


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_try_them_command_completes_a_verified_handshake(moat, echo, need_ipv6):
    """The example config, moved to free ports (its mongod an echo server),
    run as the README says, and the certificates README's openssl command
    (same port mapping) run as is."""
    text = EXAMPLE.read_text().replace('"127.0.0.1:27017"', f'"{echo.address}"')
    fixed = sorted({int(p) for p in re.findall(r'127\.0\.0\.1:(\d+)"', text) + re.findall(r'\[::1\]:(\d+)"', text)}
                   - {27017})
    mapping = dict(zip(fixed, free_ports(len(fixed))))
    for old, new in mapping.items():
        text = re.sub(rf":{old}\b", f":{new}", text)
    files = {"security-groups.toml": (REPO / "config" / "security-groups.toml").read_text()}
    for f in ("server.pem", "server-key.pem", "ca.pem"):
        files[f"certs/{f}"] = (CERTS / f).read_text()
    m = moat(text, files)
    cmd = next(l for l in CERTS_README.splitlines() if l.startswith("openssl s_client"))
    cmd = re.sub(r":(\d+) ", lambda mm: f":{mapping[int(mm.group(1))]} ", cmd, count=1)
    p = subprocess.run(cmd, shell=True, cwd=REPO, capture_output=True, text=True, timeout=30)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "Verification: OK" in out, out
    assert m.running()


def test_combined_client_file_holds_certificate_and_key():
    combined = (CERTS / "client-cert-and-key.pem").read_text()
    assert combined == (CERTS / "client.pem").read_text() + (CERTS / "client-key.pem").read_text()
    assert "client-cert-and-key.pem" in README and "tlsCertificateKeyFile=client.pem" not in README
    assert "tlsCertificateKeyFile=config/certs/client-cert-and-key.pem" in CERTS_README


def test_combined_client_file_passes_mutual_tls(moat, echo, ports):
    """What mongosh does with tlsCertificateKeyFile: one file for the chain
    and the key, presented to a deployment with client_ca."""
    port = ports()
    files = {f: (CERTS / f).read_text() for f in ("server.pem", "server-key.pem", "ca.pem")}
    moat(f'''
        [[deployment]]
        name = "x509"
        listen = "127.0.0.1:{port}"
        upstream = "{echo.address}"
        [deployment.tls]
        cert = "server.pem"
        key = "server-key.pem"
        client_ca = "ca.pem"
        [[deployment.allow]]
        cidr = "127.0.0.1"
    ''', files)
    ctx = client_ctx(CERTS / "ca.pem")
    ctx.load_cert_chain(str(CERTS / "client-cert-and-key.pem"))
    tls_echo(port, "127.0.0.1", ctx, "localhost").close()
    # and the certificate alone is not enough to load, as mongosh finds
    bare = client_ctx(CERTS / "ca.pem")
    with pytest.raises(ssl.SSLError):
        bare.load_cert_chain(str(CERTS / "client.pem"))


def test_server_names_note():
    assert "ignored on an address that only one deployment listens on" in README
