"""The systemd units, checked by systemd's own tools (systemd-analyze)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bmsd.config import DatabaseConfig, IngestConfig
from bmsd.ingest.lock import InstanceLock

UNITS = Path(__file__).resolve().parent.parent / "systemd"
#: The one message tolerated: the unit names the installed path, absent here.
MISSING_BINARY = re.compile(r"^[\w@.-]+\.service: Command /opt/bmsd/bin/bmsd is not executable:"
                            r" No such file or directory$")

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is not installed (Debian: systemd)")


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True,
                          check=False, timeout=120, cwd=UNITS)


@pytest.mark.parametrize("unit", ["bmsd.service", "bmsd@.service", "bmsd-migrate.service"])
def test_systemd_analyze_verify_finds_nothing_wrong(unit: str) -> None:
    # verify exits 0 even on misspelled directives: read what it says. --man=no:
    # verify would otherwise run man(1) for Documentation=man:..., absent on a
    # minimal system, and count its failure as a complaint about the unit.
    run = analyze("verify", "--man=no", unit)
    complaints = [line for line in run.stderr.splitlines()
                  if line.strip() and not MISSING_BINARY.match(line)]
    assert complaints == [], run.stderr


@pytest.mark.parametrize("unit", ["bmsd.service", "bmsd@.service", "bmsd-migrate.service"])
def test_the_units_are_hardened(unit: str) -> None:
    run = analyze("security", "--offline=true", "--threshold=20", unit)
    assert run.returncode == 0, run.stdout + run.stderr
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", run.stdout)
    assert exposure is not None, run.stdout
    assert float(exposure.group(1)) <= 2.0, run.stdout


@pytest.mark.parametrize("unit", ["bmsd.service", "bmsd@.service"])
def test_the_service_is_what_the_daemon_expects(unit: str) -> None:
    text = (UNITS / unit).read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["Requires"] == "bmsd-migrate.service"
    assert "bmsd-migrate.service" in settings["After"]
    # Stopping must outlast the drain deadline; starting, the wait for the
    # instance lock a dead predecessor held.
    assert int(settings["TimeoutStopSec"].rstrip("s")) > IngestConfig().shutdown_timeout_s
    lock_wait = InstanceLock(DatabaseConfig(), "bmsd").wait_s
    assert int(settings["TimeoutStartSec"].rstrip("s")) > lock_wait + 30


def test_the_template_differs_from_the_service_only_by_its_instance() -> None:
    def settings(unit: str) -> list[str]:
        return [line for line in (UNITS / unit).read_text().splitlines()
                if line and not line.startswith(("#", "Description="))
                and "%i" not in line]

    assert settings("bmsd@.service") == settings("bmsd.service")
    template = (UNITS / "bmsd@.service").read_text()
    assert "Environment=BMSD_INSTANCE=%i" in template.splitlines()
