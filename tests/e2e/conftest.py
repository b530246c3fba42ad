"""pytest fixtures for the end-to-end tests (the real moat binary, real sockets).

    def test_x(moat, echo, ports):
        port = ports()
        m = moat(f'''
            [[deployment]]
            name = "d"
            listen = "127.0.0.1:{port}"
            upstream = "{echo.address}"
            [[deployment.allow]]
            cidr = "127.0.0.2"
        ''')
        assert_echoes(port, "127.0.0.2")
        assert_refused(port, "127.0.0.3", upstream=echo)

Every process, upstream and temp dir a test starts is stopped at teardown.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import moatlib  # noqa: E402
from moatlib import CertAuthority, EchoServer, Moat, MongoUpstream  # noqa: E402


def pytest_report_header(config):
    exe = moatlib.moat_bin()
    return f"moat binary: {exe} ({'present' if os.access(exe, os.X_OK) else 'MISSING'})"


@pytest.fixture
def ports():
    """ports() -> one free port on 127.0.0.1; ports(n) -> a list of n;
    ports(host="::1") for IPv6."""
    def alloc(n: int | None = None, host: str = "127.0.0.1"):
        return moatlib.free_ports(n, host) if n else moatlib.free_port(host)
    return alloc


@pytest.fixture
def moat_dir(tmp_path) -> Path:
    """Directory holding the config, the extra files and moat's stderr."""
    d = tmp_path / "moat"
    d.mkdir()
    return d


@pytest.fixture
def moat(moat_dir, request):
    """Factory: moat(config_text, extra_files=None, wait=True, env=None) -> Moat.

    The config is dedented, written to moat_dir/moat.toml and `moat run -c`
    started; with wait=True it returns once moat is ready. All started
    processes are killed at teardown; a failing test gets moat's stderr
    printed."""
    started: list[Moat] = []

    def start(config_text: str, extra_files=None, wait: bool = True, env=None, directory=None,
              timeout: float = moatlib.DEFAULT_TIMEOUT) -> Moat:
        d = directory or (moat_dir if not started else moat_dir.parent / f"moat{len(started)}")
        Path(d).mkdir(parents=True, exist_ok=True)
        m = Moat(textwrap.dedent(config_text), extra_files, directory=d, env=env)
        started.append(m)
        m.start(wait=wait, timeout=timeout)
        return m

    yield start
    moatlib.stop_all(started, request)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def echo():
    """An EchoServer upstream on 127.0.0.1."""
    with EchoServer() as e:
        yield e


@pytest.fixture
def echo_factory():
    """echo_factory(**EchoServer options) -> another EchoServer (closed at teardown)."""
    servers: list[EchoServer] = []

    def make(**kw) -> EchoServer:
        s = EchoServer(**kw)
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.close()


@pytest.fixture
def mongo():
    """A MongoUpstream (mockupdb) on 127.0.0.1 that answers by itself."""
    m = MongoUpstream()
    yield m
    m.close()


@pytest.fixture
def certs(tmp_path) -> CertAuthority:
    """A throwaway CA writing into tmp_path/certs; .issue(...) more certs."""
    return CertAuthority(tmp_path / "certs")


@pytest.fixture(scope="session")
def has_ipv6() -> bool:
    return moatlib.ipv6_available()


@pytest.fixture
def need_ipv6(has_ipv6):
    if not has_ipv6:
        pytest.skip("no IPv6 loopback (::1) on this machine")


@pytest.fixture
def check(tmp_path):
    """check(config_text, extra_files=None) -> moatlib.Result of `moat check -c`
    (config dedented, written to a fresh directory under tmp_path)."""
    n = [0]

    def run(config_text: str, extra_files=None) -> moatlib.Result:
        n[0] += 1
        return moatlib.run_check(config_text, extra_files, directory=tmp_path / f"check{n[0]}")
    return run


@pytest.fixture
def explain(tmp_path):
    """explain(config_text, deployment, ip, extra_files=None) -> moatlib.Result
    of `moat explain -c F --deployment NAME IP`."""
    n = [0]

    def run(config_text: str, deployment: str, ip: str, extra_files=None) -> moatlib.Result:
        n[0] += 1
        return moatlib.run_explain(config_text, deployment, ip, extra_files,
                                   directory=tmp_path / f"explain{n[0]}")
    return run
