"""Site readings stored as integers (sql/190): exact round trip, rounding, the migration."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bmsd.batch import Batch, Origin, Row
from bmsd.ingest.writer import Writer
from bmsd.models import SiteTelemetry
from bmsd.schema import scaled
from bmsd.schema.migrate import default_sql_dir, migrate
from tests.fix_daemon import wait_until
from tests.helpers import add_device

Conn = psycopg.Connection[tuple[object, ...]]
COLUMNS = SiteTelemetry.columns
INT_MAX = {"integer": 2**31 - 1, "bigint": 2**63 - 1}


def test_committed_script_matches_its_generator() -> None:
    committed = (default_sql_dir() / scaled.SCRIPT).read_text()
    assert committed == scaled.script_sql(), (
        f"regenerate: python -m bmsd.schema.scaled > sql/{scaled.SCRIPT}")


@pytest.mark.parametrize("name", sorted(SiteTelemetry.digits))
def test_every_value_the_model_accepts_fits_its_integer_column(name: str) -> None:
    field = SiteTelemetry.model_fields[name]
    bounds = [getattr(m, "ge", None) for m in field.metadata] + [
        getattr(m, "le", None) for m in field.metadata]
    largest = max(abs(b) for b in bounds if b is not None)
    assert largest * 10 ** SiteTelemetry.digits[name] <= INT_MAX[scaled.column_type(name)]


def _reading(device: int, when: datetime, values: dict[str, float]) -> Row:
    origin = Origin("site/alpha/ctrl/telemetry", None, b"{}", None, when)
    return Row((when, device, *[values.get(c) for c in COLUMNS], None), origin)


def _stored(db: Conn, device: int, when: datetime, table: str) -> dict[str, Any]:
    row = db.execute(f"SELECT {', '.join(COLUMNS)} FROM {table}"
                     " WHERE device_id = %s AND time = %s", (device, when)).fetchone()
    assert row is not None
    return dict(zip(COLUMNS, row, strict=True))


@pytest.mark.community
def test_values_at_their_resolution_read_back_exactly_and_finer_ones_are_rounded(
    db: Conn,
) -> None:
    device = add_device(db, device="ctrl", kind="site_controller")
    now = datetime.now(UTC).replace(microsecond=0)
    # Every column, negative where it may be, a large counter keeping its last digit.
    sent = {c: round((-1) ** i * (i + 0.1) * 1.7, SiteTelemetry.digits[c])
            for i, c in enumerate(COLUMNS)}
    sent |= {"battery_charge_level": 99.9, "battery_state_of_health": 0.1,
             "battery_temperature": -20.3, "grid_frequency": 49.987,
             "solar_energy_kwh": 987654321.123, "load_energy_kwh": 12.345,
             "grid_voltage": 230.4, "solar_efficiency": 18.5, "inverter1_efficiency": 97.1,
             "inverter2_efficiency": 96.9, "inverter1_temperature": 41.2,
             "inverter2_temperature": -0.1}
    finer = {"battery_voltage": 400.16, "grid_frequency": 50.0004, "solar_energy_kwh": 1.23449}
    batch = Batch()
    batch.add_message("site_telemetry", [_reading(device, now, sent)], lambda rows: None)
    batch.add_message("site_telemetry", [_reading(device, now + timedelta(minutes=5), finer)],
                      lambda rows: None)
    with db.transaction():
        outcome = Writer().write(db, batch)
    assert outcome.written["site_telemetry"] == 2
    assert not outcome.dead
    assert _stored(db, device, now, "site_telemetry") == sent
    back = _stored(db, device, now + timedelta(minutes=5), "site_telemetry")
    assert {c: back[c] for c in finer} == {"battery_voltage": 400.2, "grid_frequency": 50.0,
                                           "solar_energy_kwh": 1.234}
    assert _stored(db, device, now, "site_telemetry_scaled")["grid_frequency"] == 49987

    # A row written by hand into the view is stored the same way as bmsd's.
    later = now + timedelta(minutes=10)
    db.execute(f"INSERT INTO site_telemetry (time, device_id, {', '.join(sent)})"
               f" VALUES (%s, %s, {', '.join(['%s'] * len(sent))})",
               (later, device, *sent.values()))
    assert (_stored(db, device, later, "site_telemetry_scaled")
            == _stored(db, device, now, "site_telemetry_scaled"))


@pytest.fixture
def scripts_before_190() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="bmsd-sql-"))
    for script in default_sql_dir().glob("*.sql"):
        if script.name < scaled.SCRIPT:
            shutil.copy(script, folder)
    yield folder
    shutil.rmtree(folder)


def _snapshot(conn: Conn) -> dict[str, list[tuple[object, ...]]]:
    return {name: conn.execute(f"SELECT * FROM {name} ORDER BY device_id, {key}").fetchall()
            for name, key in (("site_telemetry", "time"), ("site_telemetry_1h", "bucket"),
                              ("site_telemetry_1d", "bucket"))}


def _close(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-12, abs=1e-9)
    return a == b


def _refresh_as_the_policies_would(conn: Conn) -> None:
    jobs = conn.execute(
        "SELECT j.job_id FROM timescaledb_information.jobs j"
        " JOIN timescaledb_information.continuous_aggregates c"
        "   ON c.materialization_hypertable_name = j.hypertable_name"
        " WHERE c.view_name LIKE 'site_telemetry_%' ORDER BY c.view_name DESC").fetchall()
    for (job,) in jobs:  # 1h, then 1d
        conn.execute("CALL run_job(%s)", (job,))


@pytest.mark.community
def test_migration_keeps_every_row_and_the_aggregates_that_outlived_them(
    empty_db_url: str, scripts_before_190: Path,
) -> None:
    migrate(empty_db_url, sql_dir=scripts_before_190)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        # The old schema's jobs would race this setup's drop_chunks (TimescaleDB
        # deadlocks a refresh with it); the migration drops them anyway.
        conn.execute("SELECT alter_job(job_id, scheduled => false)"
                     " FROM timescaledb_information.jobs WHERE job_id >= 1000")
        device = add_device(conn, device="ctrl", kind="site_controller")
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        for day in (today - timedelta(days=45), today - timedelta(days=2)):
            for step in range(36):  # three hours of 5-minute readings
                minute = step * 5
                conn.execute(
                    "INSERT INTO site_telemetry (time, device_id, battery_voltage,"
                    " battery_power_kw, solar_energy_kwh, grid_energy_kwh, grid_frequency)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (day + timedelta(minutes=minute), device, round(400 + step * 0.3, 1),
                     round(-20 + step * 1.37, 2), round(step * 0.417, 3),
                     round(3 - step * 0.211, 3), round(49.95 + step * 0.003, 3)))
        for level in ("site_telemetry_1h", "site_telemetry_1d"):
            conn.execute(f"CALL refresh_continuous_aggregate('{level}', NULL, %s)",
                         (today - timedelta(days=1),))
        # Raw retention has dropped the old day; only its aggregates are left.
        conn.execute("SELECT drop_chunks('site_telemetry', older_than => %s)",
                     (today - timedelta(days=30),))
        before = _snapshot(conn)
        assert len(before["site_telemetry"]) == 36
        assert len(before["site_telemetry_1h"]) == 6
        assert len(before["site_telemetry_1d"]) == 2

        report = migrate(empty_db_url)
        assert report.applied[0] == scaled.SCRIPT  # then the scripts after it
        # The copied buckets show once a refresh set the watermark: the script
        # starts the policies at once (one may be running here already).
        _refresh_as_the_policies_would(conn)

        def complete() -> dict[str, list[tuple[object, ...]]] | None:
            now = _snapshot(conn)
            return now if all(len(now[k]) == len(before[k]) for k in before) else None

        after = wait_until(complete, timeout_s=60,
                           what="every row and bucket back after the migration")
        assert conn.execute("SELECT to_regclass('site_telemetry_double')").fetchone() == (None,)
    assert after["site_telemetry"] == before["site_telemetry"]
    for level in ("site_telemetry_1h", "site_telemetry_1d"):
        assert len(after[level]) == len(before[level]), level
        for old, new in zip(before[level], after[level], strict=True):
            assert all(_close(a, b) for a, b in zip(old, new, strict=True)), (level, old, new)
