"""The shipped systemd unit is hardened: `systemd-analyze security` rates its
exposure 2.0 or less, and it is the Type=notify unit the SPEC describes."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from moatlib import REPO

UNIT = REPO / "systemd" / "moat.service"
MAX_EXPOSURE = 2.0


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_exposure_score_at_most_2():
    p = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
                       capture_output=True, text=True, timeout=60)
    text = p.stdout + p.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", text)
    assert m, f"no exposure score in systemd-analyze output (exit {p.returncode}):\n{text}"
    score = float(m.group(1))
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}:\n{text}"


def test_unit_contract():
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["ExecStartPre"] == ["/usr/bin/moat check -c /etc/moat/moat.toml"]
    assert s["ExecStart"] == ["/usr/bin/moat run -c /etc/moat/moat.toml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert "WatchdogSec" in s and "Restart" in s
    assert s["LimitNOFILE"] == ["1048576"]
    assert s["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    stop = s["TimeoutStopSec"][0]
    assert int(stop.rstrip("s")) > 30, "TimeoutStopSec must exceed shutdown_grace (30s)"


def test_runs_as_the_packaged_system_user():
    """The Debian package's postinst creates the system user `moat`; the unit
    runs as it (not a dynamic user) so keys can be 0640 root:moat."""
    s = unit_settings()
    assert s["User"] == ["moat"] and s["Group"] == ["moat"]
    assert "DynamicUser" not in s
    assert s["ReadOnlyPaths"] == ["/etc/moat"]
