"""bmsd under a real systemd: a Debian 12 tree booted with systemd-nspawn.

The wheel is installed (into a virtualenv made with the tree's own Python
version, mounted at the same path inside), the units from systemd/ are
placed in /etc/systemd/system, and `systemctl` drives them. The container
shares the host's network, so the service reaches this session's test
database and broker, through TCP proxies the test can break.

Needs root, systemd-nspawn (Debian: systemd-container) and debootstrap; the
Debian tree is made once per machine under /var/cache/bmsd-test (a few
minutes, from the package archive this machine's apt already uses) and is
booted read-only with a volatile overlay, so every run starts clean.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from bmsd.schema.migrate import Edition
from tests.fix_capabilities import BOOT, record, require
from tests.fix_daemon import Publisher, wait_until
from tests.fix_db import PgServer
from tests.fix_mqtt import Broker
from tests.fix_proxy import Proxy, ProxyFactory
from tools.localstack import free_port

REPO = Path(__file__).resolve().parent.parent
CACHE = Path("/var/cache/bmsd-test")
# procps: /bin/kill, which the unit's ExecReload= runs (Debian installs it by default).
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,ca-certificates,procps"
#: The tree is made again when the package list changes.
TREE = CACHE / f"debian-bookworm-{hashlib.sha256(PACKAGES.encode()).hexdigest()[:8]}"


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root to boot a container"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian: systemd-container, debootstrap, util-linux)"
    if not Path("/usr/bin/python3").exists():
        return "needs Debian's /usr/bin/python3 to build the tree's virtualenv"
    return None


pytestmark = [pytest.mark.skipif(_missing() is not None, reason=_missing() or ""),
              pytest.mark.needs(BOOT)]


def _archive() -> str:
    """Return the Debian archive this machine's apt uses (as scripts/install.sh does)."""
    texts = [p.read_text() for p in Path("/etc/apt/sources.list.d").glob("*.sources")]
    for text in texts:
        for uri in re.findall(r"^URIs:\s*(\S+)", text, re.M):
            if "security" not in uri:
                return str(uri)
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        for line in sources.read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[0] == "deb" and "security" not in parts[2]:
                return parts[1]
    pytest.fail("cannot tell which Debian archive this machine's apt uses")


def _tree() -> Path:
    if (TREE / "usr/lib/systemd/systemd").exists():
        return TREE
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = TREE.with_suffix(".partial")
    shutil.rmtree(partial, ignore_errors=True)
    run = subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}",
                          "bookworm", str(partial), _archive()],
                         capture_output=True, text=True, timeout=1800, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    partial.rename(TREE)
    return TREE


@dataclass
class Container:
    """A booted systemd and how to run commands in it."""

    proc: subprocess.Popen[bytes]
    pid: int
    log: Path

    def sh(self, script: str, check: bool = True,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
        run = subprocess.run(["nsenter", "-t", str(self.pid), "-a", "/bin/sh", "-c", script],
                             capture_output=True, text=True, timeout=timeout, check=False)
        if check:
            assert run.returncode == 0, f"{script}\n{run.stdout}\n{run.stderr}"
        return run

    def show(self, unit: str, prop: str) -> str:
        return self.sh(f"systemctl show -P {prop} {unit}").stdout.strip()

    def journal(self, unit: str, *args: str) -> str:
        return self.sh(f"journalctl --no-pager -o cat -u {unit} {' '.join(args)}").stdout


def _init_pid(nspawn: subprocess.Popen[bytes]) -> int | None:
    for task in Path(f"/proc/{nspawn.pid}/task").glob("*"):
        for child in (task / "children").read_text().split():
            if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                return int(child)
    return None


@pytest.fixture(scope="module")
def installed_venv() -> Iterator[Path]:
    """The wheel, installed in a virtualenv of Debian's Python, at a path to mount as is."""
    # Not under /tmp: the unit's PrivateTmp= would hide it from the service.
    CACHE.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE))
    folder.chmod(0o755)  # the service's dynamic user must get through
    try:
        subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir",
                        str(folder / "dist"), str(REPO)], check=True, capture_output=True,
                       timeout=600)
        venv = folder / "venv"
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True, timeout=300)
        wheel = next((folder / "dist").glob("bmsd-*.whl"))
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True,
                       capture_output=True, timeout=900)
        yield venv
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def container(installed_venv: Path) -> Iterator[Container]:
    tree = _tree()
    log = installed_venv.parent / "nspawn.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["systemd-nspawn", "-D", str(tree), "-b", "--register=no", "--keep-unit",
             "--console=pipe", "--volatile=overlay", "--machine=bmsd-test",
             f"--bind-ro={installed_venv}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        # The boot is the probe: a machine that cannot boot a container (a chroot, a
        # container without the privileges) skips the test, saying what it saw.
        try:
            pid = wait_until(lambda: proc.poll() is None and _init_pid(proc), timeout_s=60,
                             what="the container's systemd")
            box = Container(proc, pid, log)
            wait_until(lambda: box.sh("systemctl is-system-running",
                                      check=False).stdout.strip() in ("running", "degraded"),
                       timeout_s=90, what="the container's boot to 'running'")
        except AssertionError as exc:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            record(BOOT, f"{exc}; systemd-nspawn said: {' | '.join(tail) or 'nothing'}")
        else:
            record(BOOT, None)
        require(BOOT)
        yield box
    finally:
        proc.terminate()  # nspawn shuts the container down
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _stored(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM battery_telemetry").fetchone()
        return int(row[0]) if row else 0


@dataclass
class Logins:
    """README's two logins: the schema's owner (migrate) and the daemon's (ingest)."""

    database: str
    owner: str
    app: str
    url: str  # the admin's URL of the database, for the test's own checks


@pytest.fixture
def logins(pg_server: PgServer) -> Iterator[Logins]:
    """What the database admin does first (docs/operations.md, "Install as a service"): a login
    that owns an empty database and may create roles. The daemon's login is made
    later, by `bmsd create-login`, once the schema's roles exist."""
    suffix = f"{os.getpid()}_{int(time.monotonic() * 1000) % 100000}"
    found = Logins(database=f"bmsd_nspawn_{suffix}", owner=f"bmsd_owner_{suffix}",
                   app=f"bmsd_app_{suffix}", url="")
    with pg_server.connect() as conn:
        conn.execute(f'CREATE ROLE "{found.owner}" LOGIN CREATEROLE PASSWORD \'{OWNER_PW}\'')
    found.url = pg_server.create_database(found.database)
    with pg_server.connect() as conn:
        conn.execute(f'ALTER DATABASE "{found.database}" OWNER TO "{found.owner}"')
    try:
        yield found
    finally:
        pg_server.drop_database(found.database)
        with pg_server.connect() as conn:
            conn.execute(f'DROP ROLE IF EXISTS "{found.app}"')
            conn.execute(f'DROP ROLE IF EXISTS "{found.owner}"')


OWNER_PW = "owner-pw-nspawn"
APP_PW = "app-pw-nspawn"


def test_bmsd_as_a_systemd_service(
    container: Container, installed_venv: Path, logins: Logins, pg_template: Edition,
    mqtt_broker: Broker, tcp_proxy: ProxyFactory, publisher: Publisher,
) -> None:
    database: Proxy = tcp_proxy(logins.url)
    broker: Proxy = tcp_proxy(mqtt_broker.url)
    port = free_port()
    db_url = urlsplit(database.url(logins.url))
    app_url = db_url._replace(netloc=f"{logins.app}@{db_url.hostname}:{db_url.port}").geturl()
    # Installed as README's "Install as a service" says, with quicker
    # timeouts so that the watchdog fires within the test: the daemon runs as a
    # login whose only grant is bmsd_ingest, migrate as the schema's owner.
    config = (f'[database]\nurl = "{app_url}"\n'
              'password_file = "credentials/database-password"\n'
              "connect_timeout_s = 2\nstatement_timeout_ms = 1000\noperation_timeout_s = 2.0\n"
              f'[migrate]\nuser = "{logins.owner}"\n'
              'password_file = "credentials/migrate-password"\n'
              f'[mqtt]\nurl = "{broker.url(mqtt_broker.url)}"\n'
              f'client_id = "bmsd-nspawn-{os.getpid()}"\n'
              f'[metrics]\naddr = "127.0.0.1:{port}"\n')
    skip = "" if pg_template.community else " --skip-community-features"
    container.sh(f"""set -e
        ln -s {installed_venv} /opt/bmsd
        units=$(/opt/bmsd/bin/python -c \
            'import bmsd.resources as r; print(r.package_file("systemd"))')
        install -m 644 "$units/bmsd.service" "$units/bmsd-migrate.service" /etc/systemd/system/
        install -d -m 0755 /etc/bmsd
        install -d -m 0700 /etc/bmsd/credentials
        (umask 077; printf '%s\\n' '{APP_PW}' > /etc/bmsd/credentials/database-password
         printf '%s\\n' '{OWNER_PW}' > /etc/bmsd/credentials/migrate-password
         : > /etc/bmsd/credentials/mqtt-password)
        cat > /etc/bmsd/bmsd.toml <<'EOF'
{config}EOF
        mkdir -p /etc/systemd/system/bmsd.service.d /etc/systemd/system/bmsd-migrate.service.d
        printf '[Service]\\nWatchdogSec=6s\\nRestartSec=1s\\n' \
            > /etc/systemd/system/bmsd.service.d/test.conf
        printf '[Service]\\nExecStart=\\nExecStart=/opt/bmsd/bin/bmsd migrate\
 --wait-for-database{skip}\\n' > /etc/systemd/system/bmsd-migrate.service.d/test.conf
        systemctl daemon-reload
        systemctl start bmsd-migrate.service
        /opt/bmsd/bin/bmsd create-login {logins.app} --member-of bmsd_ingest \
            --password-file /etc/bmsd/credentials/database-password
    """)
    with psycopg.connect(logins.url) as conn:
        # The schema belongs to the owner; the daemon's login has bmsd_ingest only.
        owner = conn.execute("SELECT tableowner FROM pg_tables"
                             " WHERE tablename = 'battery_telemetry'").fetchone()
        assert owner == (logins.owner,)
        grants = conn.execute(
            "SELECT r.rolsuper, r.rolcreaterole, array_agg(g.rolname::text)"
            "  FROM pg_roles r JOIN pg_auth_members m ON m.member = r.oid"
            "  JOIN pg_roles g ON g.oid = m.roleid WHERE r.rolname = %s"
            " GROUP BY r.rolsuper, r.rolcreaterole", (logins.app,)).fetchone()
        assert grants == (False, False, ["bmsd_ingest"])

    # 1. Not active before READY: READY waits for the subscription.
    broker.refuse()
    container.sh("systemctl enable --now --no-block bmsd.service")
    wait_until(lambda: container.show("bmsd-migrate.service", "Result") == "success"
               and "bmsd_waiting" in container.journal("bmsd.service"),
               timeout_s=90, what="migration done and bmsd waiting for the broker")
    time.sleep(3)
    assert container.show("bmsd.service", "ActiveState") == "activating"
    assert "waiting for the MQTT subscription" in container.show("bmsd.service", "StatusText")
    broker.heal()
    wait_until(lambda: container.show("bmsd.service", "ActiveState") == "active",
               timeout_s=60, what="bmsd active once subscribed")
    assert container.show("bmsd.service", "StatusText").startswith("ingesting:")

    # 2. The hardened service ingests (psycopg's binary build, MemoryDenyWriteExecute).
    topic = "site/nspawn/pack-1/battery"
    publisher.publish(topic, {"timestamp": "2026-12-03T10:00:00Z", "soc": 50.0, "voltage": 1.0})
    wait_until(lambda: _stored(logins.url) == 1, what="the reading stored by the service")
    with psycopg.connect(logins.url) as conn:
        users = conn.execute("SELECT DISTINCT usename::text FROM pg_stat_activity"
                             " WHERE datname = %s AND application_name LIKE 'bmsd%%'",
                             (logins.database,)).fetchall()
    assert users == [(logins.app,)]
    assert "MemoryDenyWriteExecute=yes" in container.sh(
        "systemctl cat bmsd.service").stdout

    # 3. Journal priorities: the ready line is info, not warning.
    assert "bmsd_ready" in container.journal("bmsd.service", "-p", "info")
    assert "bmsd_ready" not in container.journal("bmsd.service", "-p", "warning")

    # 4. systemctl reload re-reads the rules.
    container.sh("systemctl reload bmsd.service")
    wait_until(lambda: "alert_rules_reloaded" in container.journal("bmsd.service"),
               what="the reload")
    assert container.show("bmsd.service", "ActiveState") == "active"

    # 5. A database that stops answering stops the watchdog: systemd kills
    #    and restarts bmsd; once the database is back, it runs again and
    #    what was published meanwhile is stored once.
    database.blackhole()
    publisher.publish(topic, {"timestamp": "2026-12-03T10:00:01Z", "soc": 51.0, "voltage": 1.0})
    wait_until(lambda: "Watchdog timeout" in container.journal("bmsd.service"),
               timeout_s=60, what="the watchdog to fire")
    database.heal()
    wait_until(lambda: int(container.show("bmsd.service", "NRestarts")) >= 1
               and container.show("bmsd.service", "ActiveState") == "active",
               timeout_s=90, what="bmsd restarted and active again")
    wait_until(lambda: _stored(logins.url) == 2, what="the reading published meanwhile")

    # 6. systemctl stop drains and exits 0.
    container.sh("systemctl stop bmsd.service")
    assert container.show("bmsd.service", "Result") == "success"
    assert container.show("bmsd.service", "ExecMainStatus") == "0"
    assert "bmsd_stopped" in container.journal("bmsd.service")
