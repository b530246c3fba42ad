"""The operations files under deploy/: the Prometheus alert rules (checked
and unit-tested with promtool, every alert tested) and the Grafana dashboard
(valid JSON whose queries name only metrics a running moat exports, read
from the live /metrics of the real binary after traffic of every kind)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from _proxylib import echo_conn, server
from _tlslib import client_ctx, tls_echo
from moatlib import REPO, assert_echoes, assert_refused

PROM = REPO / "deploy" / "prometheus"
RULES = PROM / "moat-alerts.yml"
RULE_TESTS = PROM / "moat-alerts.test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "moat.json"
SPEC = REPO.parent / "shared" / "SPEC.md"

# Metrics of the access-list API and the fleet store: exported only when
# those are configured (SPEC.md section 4). They are checked against SPEC's
# table here, and against the live /metrics when the binary exports them.
API_AND_STORE = {
    "moat_api_requests_total",
    "moat_store_connected",
    "moat_store_revision",
    "moat_store_entries",
    "moat_store_invalid_entries",
}
# Prometheus' own series the files may use.
NOT_MOAT = {"up"}

METRIC = re.compile(r"\b(moat_[a-z0-9_]+|up)\b(?!\s*\()")

promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                              reason="promtool is not installed (apt-get install prometheus; ./test.sh does)")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, cwd=PROM)


def alert_names() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r]


@promtool
def test_promtool_checks_rules():
    p = run("promtool", "check", "rules", RULES.name)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in p.stdout + p.stderr


@promtool
def test_promtool_unit_tests_pass():
    p = run("promtool", "test", "rules", RULE_TESTS.name)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout + p.stderr


def test_every_alert_is_unit_tested_firing_and_silent():
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == [RULES.name]
    fired: set[str] = set()
    silent: set[str] = set()
    for t in tests["tests"]:
        for case in t.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    names = alert_names()
    assert len(names) == len(set(names)), names
    for required in ("MoatReloadFailing", "MoatCertificateExpiresSoon", "MoatRefusalSpike",
                     "MoatUpstreamErrors", "MoatStoreDisconnected", "MoatSecurityGroupRefreshFailing"):
        assert required in names
    assert set(names) - fired == set(), "alerts never tested firing"
    assert set(names) - silent == set(), "alerts never tested staying silent"
    for g in yaml.safe_load(RULES.read_text())["groups"]:
        for r in g["rules"]:
            assert r.get("labels", {}).get("severity") in ("warning", "critical"), r["alert"]
            assert r.get("annotations", {}).get("summary"), r["alert"]


def dashboard_exprs() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    out = []
    panels = list(d["panels"])
    while panels:
        p = panels.pop()
        panels.extend(p.get("panels", []))
        out.extend(t["expr"] for t in p.get("targets", []))
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            out.append(v["definition"])
    return out


def named_metrics(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in METRIC.findall(e)}


def test_dashboard_covers_the_issue_list():
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] == "moat-overview"
    names = [v["name"] for v in d["templating"]["list"]]
    assert names == ["datasource", "instance", "deployment"]
    named = named_metrics(dashboard_exprs())
    for m in ("moat_connections_total", "moat_connections_active", "moat_bytes_total",
              "moat_tls_handshake_seconds_bucket", "moat_upstream_connect_seconds_bucket",
              "moat_revoked_connections_total", "moat_config_last_reload_successful",
              "moat_tls_certificate_expiry_timestamp_seconds", "moat_security_group_members",
              "moat_api_requests_total", "moat_store_connected"):
        assert m in named, f"the dashboard shows nothing of {m}"
    exprs = "\n".join(dashboard_exprs())
    assert "histogram_quantile(0.99" in exprs
    # every per-deployment query follows the deployment selector
    for e in dashboard_exprs():
        if "deployment" in e and "moat_connections_active{instance" not in e:
            assert 'deployment=~"$deployment"' in e or "by (" in e, e


def spec_metrics() -> set[str]:
    if not SPEC.exists():
        pytest.skip(f"{SPEC} is not beside this repository")
    return set(re.findall(r"^\| `(moat_[a-z0-9_]+)` \|", SPEC.read_text(), re.M))


def test_api_and_store_metrics_are_in_the_spec():
    assert API_AND_STORE <= spec_metrics()


def live_metric_names(moat, echo, ports, tmp_path) -> set[str]:
    """Runs moat with a plaintext and a TLS deployment, a security group and
    an (unreachable) EC2 resolver, makes every kind of event happen, and
    returns the metric names of its /metrics."""
    plain, tls, admin, dead = ports(4)
    certs = REPO / "config" / "certs"
    files = {
        "server.pem": (certs / "server.pem").read_text(),
        "server-key.pem": (certs / "server-key.pem").read_text(),
        "sg.toml": '[[group]]\naws_account = "123456789012"\nid = "sg-0a1b2c3d"\nmembers = ["127.0.0.9"]\n',
    }

    def config(revocable: bool) -> str:
        extra = '[[deployment.allow]]\ncidr = "127.0.0.3"\ndescription = "revoked by a reload"\n' if revocable else ""
        return (server(admin, 'on_revoke = "close"')
                + "[security_groups]\nfile = \"sg.toml\"\n"
                + f'aws = {{ region = "us-east-1", refresh = "5s", endpoint = "http://127.0.0.1:{dead}" }}\n\n'
                + f'[[deployment]]\nname = "plain"\nlisten = "127.0.0.1:{plain}"\nupstream = "{echo.address}"\n'
                + '[[deployment.allow]]\ncidr = "127.0.0.1"\ndescription = "here"\n'
                + '[[deployment.allow]]\naws_account = "123456789012"\nsecurity_group = "sg-0a1b2c3d"\n'
                + 'description = "group"\n' + extra + "\n"
                + f'[[deployment]]\nname = "secure"\nlisten = "127.0.0.1:{tls}"\nupstream = "{echo.address}"\n'
                + '[deployment.tls]\nmode = "require"\ncert = "server.pem"\nkey = "server-key.pem"\n'
                + '[[deployment.allow]]\ncidr = "127.0.0.1"\ndescription = "here"\n')

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    m = moat(config(True), files, env=env)
    assert_echoes(plain, "127.0.0.1", b"allowed")
    assert_refused(plain, "127.0.0.2")
    tls_echo(tls, "127.0.0.1", client_ctx(verify=False), "localhost").close()
    doomed = echo_conn(plain, "127.0.0.3", b"to be revoked")
    try:
        m.write_config(config(False))
        m.wait_metric("moat_revoked_connections_total", 1, deployment="plain")
    finally:
        doomed.close()
    m.wait_metric("moat_security_group_refreshes_total", lambda v: v >= 1, timeout=30, result="failure")
    names = {name for name, _labels in m.metrics()}
    return names


def test_dashboard_and_alerts_name_only_exported_metrics(moat, echo, ports, tmp_path):
    exported = live_metric_names(moat, echo, ports, tmp_path)
    named = named_metrics(dashboard_exprs())
    for g in yaml.safe_load(RULES.read_text())["groups"]:
        named |= named_metrics([r["expr"] for r in g["rules"]])
    later = {n for n in named - exported if n in API_AND_STORE}
    unknown = named - exported - later - NOT_MOAT
    assert not unknown, f"named by deploy/ but not exported by moat: {sorted(unknown)}\nexported: {sorted(exported)}"
    # what the binary does not export yet must at least be SPEC's
    if SPEC.exists():
        assert later <= spec_metrics()
    # and nothing the binary exports for operators is left off the dashboard
    # (histograms through their buckets)
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in named_metrics(dashboard_exprs())}
    missing = {re.sub(r"_(bucket|sum|count)$", "", n) for n in exported if n.startswith("moat_")} - shown
    assert not missing, f"exported but not on the dashboard: {sorted(missing)}"
