#!/usr/bin/env python3
"""Fleet-store benchmark (SPEC 7; not part of the test suite).

    .venv/bin/python benches/store_bench.py            # MOAT_BIN overrides the binary

1. Three moat processes share one etcd (Debian's etcd-server, started here on
   loopback with a temporary data directory). 100 writes, one after the
   other: each puts a new source address for deployment "orders"; the time
   from etcd's answer to the moment ALL THREE hosts admit a connection from
   that address (measured from outside, by connecting). Reports p50 and p99.
2. Deployment "big" holds 10,000 store entries; one more entry is put 20
   times. Reports the time to apply one change, as moat logs it (from the
   watch event's arrival to the published snapshot), and the end-to-end
   time from the put to a connection being admitted.

Targets: p99 <= 1 s across hosts; one change to a 10,000-entry list applied
in <= 50 ms.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from etcdlib import Etcd, wait_admitted  # noqa: E402
from moatlib import EchoServer, Moat, free_ports, wait_until  # noqa: E402


def binary() -> str:
    if os.environ.get("MOAT_BIN"):
        return os.environ["MOAT_BIN"]
    release = REPO / "target" / "release" / "moat"
    return str(release if release.exists() else REPO / "target" / "debug" / "moat")


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def config(port: int, admin: int, etcd: Etcd, echo: EchoServer, big_port: int) -> str:
    return textwrap.dedent(f"""
        [server]
        admin_listen = "127.0.0.1:{admin}"

        [store]
        etcd = {{ endpoints = ["{etcd.client_url}"], cache = "store.json" }}

        [[deployment]]
        name = "orders"
        listen = "127.0.0.1:{port}"
        upstream = "{echo.address}"

        [[deployment]]
        name = "big"
        listen = "127.0.0.1:{big_port}"
        upstream = "{echo.address}"
    """)


def main() -> int:
    exe = binary()
    os.environ["MOAT_BIN"] = exe
    print(f"moat binary: {exe}")
    etcd = Etcd().start()
    echo = EchoServer()
    hosts: list[tuple[Moat, int, int]] = []
    try:
        # 10,000 entries for "big", written before the hosts start.
        big = [(f"/moat/deployments/big/accessList/e{i}",
                {"cidrBlock": f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}/32", "comment": f"entry {i}"})
               for i in range(10_000)]
        etcd.put_many(big)
        for _ in range(3):
            port, admin, big_port = free_ports(3)
            m = Moat(config(port, admin, etcd, echo, big_port),
                     directory=tempfile.mkdtemp(prefix="moat-bench-"),
                     env={"RUST_LOG": "info,moat::fleet=debug"})
            m.start(timeout=30)
            hosts.append((m, port, big_port))

        # 1. one write enforced by three hosts
        lat = []
        for i in range(100):
            src = f"127.0.1.{i % 250 + 1}"
            etcd.put("/moat/deployments/orders/accessList/bench", {"cidrBlock": src})
            t0 = time.monotonic()
            for _, port, _ in hosts:
                wait_admitted(port, src, timeout=10)
            lat.append(time.monotonic() - t0)
        print(f"one write enforced by 3 hosts, 100 writes: p50 {pct(lat, 50) * 1000:.1f} ms, "
              f"p99 {pct(lat, 99) * 1000:.1f} ms, max {max(lat) * 1000:.1f} ms")

        # 2. one change to a 10,000-entry list
        m, _, big_port = hosts[0]

        def applied_lines() -> list[str]:
            return re.findall(r"fleet store change applied.*?elapsed_us=(\d+)", m.stderr_text())
        before = len(applied_lines())
        e2e = []
        for i in range(20):
            src = f"127.0.2.{i + 1}"
            etcd.put("/moat/deployments/big/accessList/bench", {"cidrBlock": src})
            t0 = time.monotonic()
            wait_admitted(big_port, src, timeout=10)
            e2e.append(time.monotonic() - t0)
        wait_until(lambda: len(applied_lines()) >= before + 20, 10, what="20 more 'change applied' lines")
        applied = [float(x) for x in applied_lines()][-20:]
        applied_ms = [a / 1000 for a in applied]
        print(f"one change to a 10,000-entry list: applied in p50 {statistics.median(applied_ms):.1f} ms, "
              f"max {max(applied_ms):.1f} ms (moat's log); put to admitted p50 "
              f"{pct(e2e, 50) * 1000:.1f} ms, max {max(e2e) * 1000:.1f} ms")
    finally:
        for m, _, _ in hosts:
            m.kill()
        echo.close()
        etcd.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
