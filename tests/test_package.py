"""bmsd as its users get it: the built wheel in a fresh virtualenv, run from another folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bmsd.schema.migrate import Edition
from tests.fix_daemon import Publisher, wait_until
from tests.fix_mqtt import Broker
from tools.localstack import free_port

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """Build the wheel from the checkout; install it into a new virtualenv outside it."""
    folder = Path(tempfile.mkdtemp(prefix="bmsd-wheel-"))
    try:
        # An sdist first, and the wheel built from it, as a release is: nothing a
        # checkout's own build/ folder holds from earlier builds can slip in.
        subprocess.run([sys.executable, "-m", "build", "--outdir", str(folder / "dist"),
                        str(REPO)], check=True, capture_output=True, timeout=600)
        wheels = list((folder / "dist").glob("bmsd-*.whl"))
        assert len(wheels) == 1, wheels
        with zipfile.ZipFile(wheels[0]) as wheel:
            WHEEL_FILES.extend(wheel.namelist())
        subprocess.run([sys.executable, "-m", "venv", str(folder / "venv")], check=True,
                       timeout=300)
        subprocess.run([str(folder / "venv" / "bin" / "pip"), "install", "-q", str(wheels[0])],
                       check=True, capture_output=True, timeout=600)
        yield folder / "venv" / "bin" / "bmsd"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


WHEEL_FILES: list[str] = []


def test_the_wheel_holds_the_daemon_and_not_the_tools(installed: Path) -> None:
    modules = {n for n in WHEEL_FILES if n.endswith(".py")}
    assert "bmsd/ingest/daemon.py" in modules
    assert "bmsd/simulate/publish.py" in modules  # the demo's publisher, `bmsd simulate`
    assert sorted(n for n in modules if not n.startswith("bmsd/")
                  or n.startswith(("bmsd/dev/", "bmsd/tools/"))) == []


def run(bmsd: Path, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("BMSD_", "PYTHON", "VIRTUAL_ENV"))}
    return subprocess.run([str(bmsd), *args], capture_output=True, text=True, check=False,
                          timeout=120, cwd=cwd, env={**clean, **env})


def test_the_installed_wheel_works_from_any_folder(
    installed: Path, tmp_path: Path, empty_db_url: str, pg_template: Edition,
    mqtt_broker: Broker,
) -> None:
    version = run(installed, "--version", cwd=tmp_path)
    assert version.returncode == 0
    assert version.stdout.startswith("bmsd 0.")

    check = run(installed, "check-config", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert "configuration is valid (5 routes)" in check.stdout

    # The schema scripts come from inside the package.
    args = [] if pg_template.community else ["--skip-community-features"]
    migrate = run(installed, "migrate", "--database-url", empty_db_url, *args, cwd=tmp_path)
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    assert "applying 030_hypertables.sql" in migrate.stdout

    port = free_port()
    config = tmp_path / "bmsd.toml"
    config.write_text(f'[mqtt]\nclient_id = "bmsd-wheel-{os.getpid()}"\n')
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("BMSD_", "PYTHON", "VIRTUAL_ENV"))}
    daemon = subprocess.Popen(
        [str(installed), "run"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**clean, "BMSD_CONFIG": str(config), "BMSD_DATABASE_URL": empty_db_url,
             "BMSD_MQTT_URL": mqtt_broker.url, "BMSD_METRICS_ADDR": f"127.0.0.1:{port}"})
    publisher = Publisher(mqtt_broker.publisher_url)
    try:
        wait_until(lambda: _ready(port) or daemon.poll() is not None, what="bmsd ready")
        assert daemon.poll() is None
        publisher.publish("site/wheel/pack-1/battery",
                          {"timestamp": "2026-12-03T10:00:00Z", "soc": 61.5, "voltage": 402.0})
        wait_until(lambda: _soc(empty_db_url) == [61.5], what="the reading stored")
    finally:
        publisher.close()
        daemon.terminate()
        out = daemon.communicate(timeout=30)[0].decode()
    assert daemon.returncode == 0, out
    assert f'"path": "{config}"' in out  # it says which file it used


def _ready(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        time.sleep(0.1)
        return False


def _soc(url: str) -> list[float]:
    with psycopg.connect(url) as conn:
        return [float(r[0]) for r in conn.execute("SELECT soc FROM battery_telemetry")]
