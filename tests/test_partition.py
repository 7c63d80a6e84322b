"""A real network partition between bmsd and PostgreSQL, and a bmsd killed during it.

bmsd runs in a network namespace of the test's own, linked to the host by a
veth pair (link-local addresses); a PostgreSQL of the test's own listens on
the host side. ``iptables -j DROP`` inside the namespace cuts the database
traffic without a reset, as a failed link does. The namespace's
``tcp_orphan_retries`` is lowered so the killed process's sockets are gone
from its kernel in seconds rather than the ~2 minutes of the default (the
test checks with ``ss`` that none is left), which is the state in which
only the server's own keepalives can free the dead sessions.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from bmsd.config import DatabaseConfig
from bmsd.schema.migrate import migrate
from tests.fix_capabilities import NETNS, probe_netns, require
from tests.fix_daemon import Publisher, wait_until
from tests.fix_mqtt import Broker
from tests.fix_proxy import ProxyFactory
from tests.fix_report import Record, Scenario
from tools.localstack import LocalPostgres, free_port

HOST_IP, NS_IP = "169.254.213.1", "169.254.213.2"
#: What the server takes to drop a dead peer's session with bmsd's default
#: settings, plus the time its probes need to be scheduled.
BOUND_S = DatabaseConfig().dead_peer_bound_s + 10


pytestmark = pytest.mark.needs(NETNS)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout


@dataclass
class Namespace:
    name: str

    def run(self, *argv: str) -> str:
        return sh("ip", "netns", "exec", self.name, *argv)

    def partition(self, port: int) -> None:
        for chain, direction in (("OUTPUT", "--dport"), ("INPUT", "--sport")):
            self.run("iptables", "-A", chain, "-p", "tcp", direction, str(port), "-j", "DROP")

    def heal(self) -> None:
        self.run("iptables", "-F")

    def sockets_to(self, port: int) -> list[str]:
        lines = self.run("ss", "-tan", "dst", f"{HOST_IP}:{port}").splitlines()[1:]
        return [line for line in lines if line.strip()]


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    require(NETNS, probe_netns)
    _remove_stale()
    ns = Namespace(f"bmsdp{os.getpid() % 100000}")
    veth = f"vbp{os.getpid() % 100000}"
    sh("ip", "netns", "add", ns.name)
    try:
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
        sh("ip", "addr", "add", f"{HOST_IP}/30", "dev", veth)
        sh("ip", "link", "set", veth, "up")
        ns.run("ip", "addr", "add", f"{NS_IP}/30", "dev", "eth0")
        ns.run("ip", "link", "set", "eth0", "up")
        ns.run("ip", "link", "set", "lo", "up")
        ns.run("sysctl", "-q", "net.ipv4.tcp_orphan_retries=1")
        yield ns
    finally:
        subprocess.run(["ip", "link", "del", veth], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", ns.name], check=False, capture_output=True)


def _remove_stale() -> None:
    """Remove the link and namespace a killed test run left (its process is gone): the
    link holds HOST_IP, and a second link with it would take this test's traffic."""
    names = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                           check=False).stdout
    for pid in {int(m) for m in re.findall(r"\bvbp(\d+)@", names)}:
        if not Path(f"/proc/{pid}").exists():
            subprocess.run(["ip", "link", "del", f"vbp{pid}"], check=False, capture_output=True)
            subprocess.run(["ip", "netns", "del", f"bmsdp{pid}"], check=False,
                           capture_output=True)


@pytest.fixture
def host_postgres(namespace: Namespace) -> Iterator[LocalPostgres]:
    """A PostgreSQL of this test's own, listening on the host side of the link too."""
    state = Path(tempfile.mkdtemp(prefix="bmsd-test-partition-pg-"))
    pg = LocalPostgres(state, durable=False,
                       extra_settings=f"listen_addresses = '127.0.0.1,{HOST_IP}'\n")
    pg.start()
    try:
        with (pg.data_dir / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {NS_IP}/32 trust\n")
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
            conn.execute("CREATE DATABASE bmsd")
        migrate(pg.url("bmsd"), skip_community=True)
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(state, ignore_errors=True)


def _sessions(pg: LocalPostgres) -> list[tuple[str, str]]:
    """Return the (application, state) of every session from the namespace."""
    with psycopg.connect(pg.url("bmsd")) as conn:
        return [(str(r[0]), str(r[1])) for r in conn.execute(
            "SELECT application_name, state FROM pg_stat_activity WHERE client_addr = %s",
            (NS_IP,))]


def _count(pg: LocalPostgres) -> tuple[int, int]:
    with psycopg.connect(pg.url("bmsd")) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT power_kw) FROM energy_readings"
                           ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])


def test_a_bmsd_killed_during_a_database_partition_is_replaced_within_the_bound(
    namespace: Namespace, host_postgres: LocalPostgres, mqtt_broker: Broker,
    tcp_proxy: ProxyFactory, tmp_path: Path, reliability: Record,
) -> None:
    broker = tcp_proxy(mqtt_broker.url, listen_host=HOST_IP)  # the broker is not partitioned
    database_url = f"postgresql://postgres@{HOST_IP}:{host_postgres.port}/bmsd"
    config = tmp_path / "bmsd.toml"
    config.write_text(f'log_format = "json"\n[mqtt]\nclient_id = "bmsd-partition-{os.getpid()}"\n')
    metrics = f"{NS_IP}:{free_port()}"
    env = {**os.environ, "BMSD_DATABASE_URL": database_url,
           "BMSD_MQTT_URL": broker.url(mqtt_broker.url), "BMSD_METRICS_ADDR": metrics}
    logs = [tmp_path / "first.log", tmp_path / "second.log"]

    def start(log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen(
                ["ip", "netns", "exec", namespace.name, sys.executable, "-m", "bmsd", "run",
                 "--config", str(config)], env=env, stdout=out, stderr=subprocess.STDOUT)

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://{metrics}/readyz", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    n = 3000
    first = start(logs[0])
    try:
        wait_until(ready, what=f"the first bmsd\n{logs[0].read_text()}")
        publisher = Publisher(mqtt_broker.publisher_url)
        messages = [(f"factory/part/m{i % 5}/energy",
                     {"timestamp": f"2026-12-03T09:{(i // 5) // 60:02d}:{(i // 5) % 60:02d}Z",
                      "power_kw": i}) for i in range(n)]
        sender = threading.Thread(target=publisher.publish_many, args=(messages,), daemon=True)
        sender.start()
        wait_until(lambda: _count(host_postgres)[0] > n // 10, what="a part stored")

        namespace.partition(host_postgres.port)
        time.sleep(1.0)
        first.send_signal(signal.SIGKILL)  # what systemd's watchdog does to a stuck bmsd
        first.wait(10)
        killed = time.monotonic()
        stale = _sessions(host_postgres)
        assert stale, "the dead bmsd's sessions should still be on the server"
        wait_until(lambda: not namespace.sockets_to(host_postgres.port), timeout_s=60,
                   what="the dead process's sockets to leave its kernel")

        # Only the server's keepalives can free the sessions now.
        wait_until(lambda: not _sessions(host_postgres), timeout_s=BOUND_S + 30,
                   what="the server to drop the dead bmsd's sessions")
        freed_after = time.monotonic() - killed
        assert freed_after <= BOUND_S, f"{stale} freed only after {freed_after:.1f} s"
        namespace.heal()

        healed = time.monotonic()
        second = start(logs[1])
        wait_until(ready, timeout_s=BOUND_S, what=f"the new bmsd\n{logs[1].read_text()}")
        ready_after = time.monotonic() - healed
        sender.join(120)
        wait_until(lambda: _count(host_postgres) == (n, n), timeout_s=120,
                   what=f"all {n} readings, each once")
        assert ready_after < 15  # the old lock was already gone
        reliability(Scenario(
            "network partition (packets dropped), bmsd SIGKILLed during it and restarted", n,
            n, 0, 0, noticed_s=freed_after, recovered_s=ready_after,
            note=f"noticed: the server dropped the dead bmsd's sessions (bound {BOUND_S:.0f} s);"
                 " recovered: the new bmsd ready after the heal"))
        print(f"\nleft by the dead bmsd: {stale}")
        print(f"sessions freed {freed_after:.1f} s after the kill (bound {BOUND_S:.0f} s);"
              f" new bmsd ready {ready_after:.1f} s after the heal")
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
        publisher.close()
    finally:
        for proc in (first, locals().get("second")):
            if isinstance(proc, subprocess.Popen) and proc.poll() is None:
                proc.kill()
                proc.wait()
