"""The Debian package (`cargo deb`, [package.metadata.deb] in Cargo.toml):
built from the binary under test (`--no-build`, the dist profile's path in
a scratch target dir, so CI does not spend a fat-LTO build on it), then its
control fields, contents, conffiles and maintainer scripts are checked, and
it is installed into and purged from a scratch root with dpkg
(`--root --force-script-chrootless`). In that root the commands that would
touch this machine (adduser, chown to moat, systemd helpers) are stubs that
record their calls and keep a small user database of their own."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
from moatlib import REPO, moat_bin, run_moat

pytestmark = [
    pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed"),
    pytest.mark.skipif(shutil.which("cargo-deb") is None,
                       reason="cargo-deb is not installed (cargo install cargo-deb; ./test.sh does)"),
]

VERSION = tomllib.loads((REPO / "Cargo.toml").read_text())["package"]["version"]
DEB_NAME = f"moat_{VERSION}_amd64.deb"
UNIT = "usr/lib/systemd/system/moat.service"


def sh(*args, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, **kw)
    assert p.returncode == 0, f"{' '.join(map(str, args))} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("deb")
    target = d / "target"
    (target / "dist").mkdir(parents=True)
    binary = target / "dist" / "moat"
    if shutil.which("strip"):  # a debug binary is ~200 MB: compressing it would take most of the test
        sh("strip", "--strip-debug", "-o", binary, moat_bin())
    else:
        shutil.copy2(moat_bin(), binary)
    env = {**os.environ, "CARGO_TARGET_DIR": str(target)}
    sh("cargo", "deb", "--no-build", "--fast", "-o", d / "out", cwd=REPO, env=env)
    path = d / "out" / DEB_NAME
    assert path.exists(), sorted(p.name for p in (d / "out").iterdir())
    return path


@pytest.fixture(scope="module")
def control(deb, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("control")
    sh("dpkg-deb", "-e", deb, d / "DEBIAN")
    return d / "DEBIAN"


@pytest.fixture(scope="module")
def files(deb, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("files")
    sh("dpkg-deb", "-x", deb, d)
    return d


def field(deb: Path, name: str) -> str:
    return sh("dpkg-deb", "-f", deb, name).stdout.strip()


def test_control_fields(deb):
    assert field(deb, "Package") == "moat"
    assert field(deb, "Version") == VERSION
    assert field(deb, "Architecture") == "amd64"
    depends = field(deb, "Depends")
    assert "adduser" in depends and "libc6" in depends, depends


def test_contents(deb):
    listing = sh("dpkg-deb", "-c", deb).stdout
    entries = {}
    for line in listing.splitlines():
        parts = line.split()
        entries[parts[5].removeprefix("./")] = (parts[0], parts[1])
    assert entries["usr/bin/moat"] == ("-rwxr-xr-x", "0/0")
    assert entries["etc/moat/moat.toml"] == ("-rw-r-----", "0/0")  # group moat: set by postinst
    assert entries[UNIT] == ("-rw-r--r--", "0/0")
    for f in ("usr/share/doc/moat/README.md", "usr/share/doc/moat/copyright",
              "usr/share/moat/grafana/moat.json", "usr/share/moat/prometheus/moat-alerts.yml"):
        assert f in entries, f"{f} missing from\n{listing}"
    assert not [e for e in entries if e.startswith("usr/local")], listing


def test_files_are_the_repository_ones(deb, files):
    assert (files / UNIT).read_text() == (REPO / "systemd" / "moat.service").read_text()
    assert (files / "etc/moat/moat.toml").read_text() == (REPO / "deploy/debian/moat.toml").read_text()
    # the binary under test, stripped by cargo-deb (its debug info goes to /usr/lib/debug)
    packaged = subprocess.run([str(files / "usr/bin/moat"), "--version"], capture_output=True, text=True, timeout=30)
    built = subprocess.run([moat_bin(), "--version"], capture_output=True, text=True, timeout=30)
    assert packaged.returncode == 0 and packaged.stdout == built.stdout, packaged
    assert list((files / "usr/lib/debug/.build-id").glob("*/*.debug")), "no separate debug symbols"
    unit = (files / UNIT).read_text()
    assert "ExecStart=/usr/bin/moat run -c /etc/moat/moat.toml" in unit
    assert "User=moat" in unit and "Group=moat" in unit and "DynamicUser" not in unit


def test_packaged_config_is_valid_and_loopback_only(files):
    conf = files / "etc/moat/moat.toml"
    res = run_moat(["check", "-c", str(conf)], cwd="/")
    assert res.code == 0, res.output
    doc = tomllib.loads(conf.read_text())
    addrs = [doc["server"]["admin_listen"]]
    for d in doc["deployment"]:
        addrs += [d["listen"]] if isinstance(d["listen"], str) else d["listen"]
        for r in d.get("allow", []):
            assert r["cidr"] in ("127.0.0.1", "::1", "127.0.0.0/8"), r
    assert addrs and all(a.startswith(("127.", "[::1]:")) for a in addrs), addrs


def test_conffiles(control):
    assert (control / "conffiles").read_text().split() == ["/etc/moat/moat.toml"]


def test_maintainer_scripts(control):
    for name in ("postinst", "postrm", "prerm"):
        script = control / name
        assert script.stat().st_mode & stat.S_IXUSR, f"{name} is not executable"
        sh("sh", "-n", script)
    postinst = (control / "postinst").read_text()
    assert "adduser --system --group" in postinst
    assert "chown root:moat" in postinst and "chmod 0640" in postinst
    assert "deb-systemd-helper enable moat.service" in postinst  # the #DEBHELPER# snippets
    assert "#DEBHELPER#" not in postinst
    postrm = (control / "postrm").read_text()
    assert "purge)" in postrm and "deluser --system" in postrm
    assert "deb-systemd-helper purge moat.service" in postrm


STUB = """#!/bin/sh
# stub of {name}: records the call; adduser/addgroup/deluser/getent keep users in $STUBS/users
echo "{name} $*" >> "$STUBS/calls"
case "{name}" in
getent) grep -q "^$1:$2$" "$STUBS/users" 2>/dev/null ;;
adduser) [ "$1" = --system ] && {{ echo "passwd:$(eval echo \\${{$#}})" >> "$STUBS/users"; echo "group:$(eval echo \\${{$#}})" >> "$STUBS/users"; }}; exit 0 ;;
deluser) sed -i "/^passwd:moat$/d" "$STUBS/users" ;;
delgroup) sed -i "/^group:moat$/d" "$STUBS/users" ;;
dpkg-statoverride) exit 1 ;;
*) exit 0 ;;
esac
"""
STUBBED = ("adduser", "addgroup", "deluser", "delgroup", "getent", "chown", "dpkg-statoverride",
           "deb-systemd-helper", "deb-systemd-invoke", "systemctl")


@pytest.fixture
def scratch(tmp_path) -> tuple[Path, dict[str, str], Path]:
    root, stubs = tmp_path / "root", tmp_path / "stubs"
    admin = root / "var/lib/dpkg"
    for d in (admin / "info", admin / "updates", admin / "triggers", stubs / "bin"):
        d.mkdir(parents=True)
    (admin / "status").write_text("")
    (admin / "available").write_text("")
    for name in STUBBED:
        p = stubs / "bin" / name
        p.write_text(STUB.format(name=name))
        p.chmod(0o755)
    env = {**os.environ, "STUBS": str(stubs), "PATH": f"{stubs / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin"}
    return root, env, stubs


def dpkg(root: Path, env, *args) -> subprocess.CompletedProcess:
    return sh("dpkg", f"--root={root}", "--force-script-chrootless", "--force-depends",
              "--force-not-root", "--force-unsafe-io", "--log=/dev/null", *args, env=env)


def test_install_and_purge_in_a_scratch_root(deb, scratch):
    root, env, stubs = scratch
    dpkg(root, env, "-i", deb)
    calls = (stubs / "calls").read_text()
    assert "adduser --system --group --quiet --no-create-home --home /nonexistent" in calls, calls
    assert "passwd:moat" in (stubs / "users").read_text()
    assert f"chown root:moat {root}/etc/moat/moat.toml" in calls, calls
    assert f"chown root:moat {root}/etc/moat" in calls, calls
    assert "deb-systemd-helper enable moat.service" in calls, calls
    assert (root / "usr/bin/moat").stat().st_mode & 0o777 == 0o755
    assert (root / "etc/moat/moat.toml").stat().st_mode & 0o777 == 0o640
    assert (root / "etc/moat").stat().st_mode & 0o777 == 0o750
    assert (root / UNIT).exists()
    status = sh("dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f=${Status} ${Version}", "moat").stdout
    assert status == f"install ok installed {VERSION}", status

    # an upgrade (reinstall) keeps the administrator's edits of the conffile
    conf = root / "etc/moat/moat.toml"
    conf.write_text(conf.read_text() + "\n# edited by the administrator\n")
    dpkg(root, env, "--force-confold", "-i", deb)
    assert conf.read_text().endswith("# edited by the administrator\n")

    # remove keeps the config, purge removes it, the directory and the user
    dpkg(root, env, "--remove", "moat")
    assert not (root / "usr/bin/moat").exists() and conf.exists()
    dpkg(root, env, "--purge", "moat")
    assert not (root / "etc/moat").exists()
    calls = (stubs / "calls").read_text()
    assert "deluser --system --quiet moat" in calls, calls
    assert "passwd:moat" not in (stubs / "users").read_text()
