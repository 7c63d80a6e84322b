"""`bmsd alerts`: list and acknowledge from the command line; a failure is one clear line."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import psycopg

from tests.helpers import add_device


def bmsd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bmsd", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_list_and_acknowledge(db: psycopg.Connection[Any], db_url: str) -> None:
    device = add_device(db, "north", "pack-1")
    for code, severity in (("SOC_LOW", "warning"), ("CELL_OVER_VOLTAGE", "critical")):
        db.execute("INSERT INTO alerts (site_id, device_id, rule_code, severity, category,"
                   " message, triggered_at) SELECT site_id, id, %s, %s, 'battery', 'm', now()"
                   " FROM devices WHERE id = %s", (code, severity, device))
    listed = bmsd("alerts", "--database-url", db_url)
    assert listed.returncode == 0, listed.stderr
    lines = [line.split() for line in listed.stdout.splitlines() if line[:6].strip().isdigit()]
    assert [line[1:3] for line in lines] == [["critical", "CELL_OVER_VOLTAGE"],
                                             ["warning", "SOC_LOW"]]
    alert_id = lines[0][0]
    acked = bmsd("alerts", "ack", alert_id, "--by", "ann", "--database-url", db_url)
    assert acked.returncode == 0, acked.stderr
    assert acked.stdout.strip() == f"alert {alert_id} (CELL_OVER_VOLTAGE) acknowledged by ann"
    only_warnings = bmsd("alerts", "--severity", "warning", "--database-url", db_url)
    assert "CELL_OVER_VOLTAGE" not in only_warnings.stdout


def test_an_unreachable_database_is_one_line_and_exit_1() -> None:
    run = bmsd("alerts", "--database-url", "postgresql://127.0.0.1:1/none")
    assert run.returncode == 1
    assert run.stderr.startswith("bmsd alerts: cannot connect to the database")
    assert len(run.stderr.strip().splitlines()) == 1
    assert "Traceback" not in run.stderr


def test_ack_without_its_id_prints_its_usage_without_connecting() -> None:
    # An unreachable database: the usage must come first, not a connection error.
    run = bmsd("alerts", "ack", "--by", "me", "--database-url", "postgresql://127.0.0.1:1/none")
    assert run.returncode == 2
    assert run.stderr.strip() == "bmsd alerts: usage: bmsd alerts ack ID --by NAME"
