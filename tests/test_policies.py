"""Policies told by their effect: the policy_health view (sql/200) and bmsd's gauges.

Each case pauses the policy's job, makes the data break its promise, checks
that the view and /metrics show how far behind it is, then runs the job once
and checks the lag is gone: the measure follows the data, not the job's
status (which on PostgreSQL 15.20 + TimescaleDB 2.28.3 is Failed either way).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from bmsd.config import DatabaseConfig
from bmsd.ingest.policies import MAX_AGE_S, PolicyHealth
from tests.fix_daemon import DaemonFactory, wait_until

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def db(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        yield conn


def job_of(db: psycopg.Connection[Any], proc: str, name: str) -> int:
    row = db.execute("SELECT job_id FROM timescaledb_information.jobs"
                     " WHERE proc_name = %s AND hypertable_name = %s", (proc, name)).fetchone()
    assert row is not None, f"no {proc} job for {name}"
    db.execute("SELECT alter_job(%s, scheduled => false)", (row[0],))
    return int(row[0])


def health(db: psycopg.Connection[Any], name: str, policy: str) -> tuple[float, float]:
    row = db.execute("SELECT behind_s, allowed_s FROM policy_health"
                     " WHERE object = %s AND policy = %s", (name, policy)).fetchone()
    assert row is not None, f"policy_health has no {policy} row for {name}"
    return float(row[0]), float(row[1])


def add_meter(db: psycopg.Connection[Any]) -> int:
    db.execute("INSERT INTO organizations (slug, name) VALUES ('o', 'O') ON CONFLICT DO NOTHING")
    site = db.execute("INSERT INTO sites (organization_id, slug, name) SELECT id, 'plant',"
                      " 'Plant' FROM organizations WHERE slug = 'o' RETURNING id").fetchone()
    assert site is not None
    device = db.execute("INSERT INTO devices (site_id, slug, kind) VALUES (%s, 'meter', 'meter')"
                        " RETURNING id", (site[0],)).fetchone()
    assert device is not None
    return int(device[0])


def readings(db: psycopg.Connection[Any], device: int, start: datetime, end: datetime,
             step: timedelta = timedelta(hours=1)) -> None:
    db.execute("INSERT INTO energy_readings (time, device_id, power_kw)"
               " SELECT t, %s, 1 FROM generate_series(%s::timestamptz, %s, %s) t",
               (device, start, end, step))


@pytest.mark.community
def test_compression_behind_is_measured_from_the_oldest_chunk_due_and_cleared_by_a_run(
    db: psycopg.Connection[Any],
) -> None:
    job = job_of(db, "policy_compression", "energy_readings")
    assert health(db, "energy_readings", "compression")[0] == 0
    readings(db, add_meter(db), NOW - timedelta(days=20), NOW - timedelta(days=8))
    behind, allowed = health(db, "energy_readings", "compression")
    # The oldest chunk ends about 20 - 7 days ago past its due date, give or take a chunk.
    assert timedelta(days=10) < timedelta(seconds=behind) < timedelta(days=14)
    assert allowed > 0
    db.execute("CALL run_job(%s)", (job,))
    assert health(db, "energy_readings", "compression")[0] == 0


@pytest.mark.community
def test_retention_behind_is_measured_and_cleared_by_a_run(db: psycopg.Connection[Any]) -> None:
    job = job_of(db, "policy_retention", "energy_readings")
    readings(db, add_meter(db), NOW - timedelta(days=100), NOW - timedelta(days=95))
    behind, _ = health(db, "energy_readings", "retention")
    assert timedelta(days=3) < timedelta(seconds=behind) < timedelta(days=11)
    db.execute("CALL run_job(%s)", (job,))
    assert health(db, "energy_readings", "retention")[0] == 0


@pytest.mark.community
def test_a_refresh_behind_its_raw_data_is_measured_and_cleared_by_a_run(
    db: psycopg.Connection[Any],
) -> None:
    job = job_of(db, "policy_refresh_continuous_aggregate", "energy_readings_1h")
    for lower in ("energy_readings_1m", "energy_readings_15m"):
        db.execute("CALL run_job(%s)", (job_of(db, "policy_refresh_continuous_aggregate",
                                                   lower),))
    assert health(db, "energy_readings_1h", "refresh")[0] == 0  # no raw data: nothing due
    readings(db, add_meter(db), NOW - timedelta(days=2), NOW, timedelta(minutes=10))
    for lower in ("energy_readings_1m", "energy_readings_15m"):
        db.execute("CALL refresh_continuous_aggregate(%s, NULL, NULL)", (lower,))
    behind, allowed = health(db, "energy_readings_1h", "refresh")
    # Due up to an hour ago (end_offset), one bucket of slack: about a day behind.
    assert timedelta(hours=20) < timedelta(seconds=behind) < timedelta(days=2)
    assert allowed == 5 * 15 * 60 + 3600  # 5 schedules of 15 min, and a bucket
    db.execute("CALL run_job(%s)", (job,))
    assert health(db, "energy_readings_1h", "refresh")[0] == 0


@pytest.mark.community
def test_late_data_behind_is_the_oldest_day_waiting_in_the_backlog(
    db: psycopg.Connection[Any],
) -> None:
    row = db.execute("SELECT job_id, schedule_interval FROM timescaledb_information.jobs"
                     " WHERE proc_name = 'bmsd_refresh_backlog'").fetchone()
    assert row is not None
    assert row[1] == timedelta(seconds=5)  # the bound README states rests on it
    db.execute("SELECT alter_job(%s, scheduled => false)", (row[0],))
    assert health(db, "energy_readings", "late data") == (0, 30)
    db.execute("INSERT INTO aggregate_backlog (hypertable, day, noted_at)"
               " VALUES ('energy_readings', current_date - 40, now() - interval '10 minutes')")
    behind, _ = health(db, "energy_readings", "late data")
    assert 590 < behind < 700
    assert health(db, "site_telemetry", "late data")[0] == 0
    db.execute("CALL run_job(%s)", (row[0],))
    assert health(db, "energy_readings", "late data")[0] == 0


@pytest.mark.community
def test_bmsd_exports_the_view_at_scrape_time(
    bmsd_daemon: DaemonFactory, db: psycopg.Connection[Any],
) -> None:
    job_of(db, "policy_compression", "energy_readings")
    readings(db, add_meter(db), NOW - timedelta(days=20), NOW - timedelta(days=8))
    daemon = bmsd_daemon()
    # The first scrape starts the reading; a later one gets it.
    wait_until(lambda: daemon.metric("bmsd_policy_health_up") == 1, what="a reading")
    behind = daemon.metric("bmsd_policy_behind_seconds", object="energy_readings",
                           policy="compression")
    assert abs(behind - health(db, "energy_readings", "compression")[0]) < 60
    assert daemon.metric("bmsd_policy_allowed_seconds", object="energy_readings",
                         policy="compression") > 0
    assert daemon.metric("bmsd_policy_health_up") == 1
    # One row per object and policy of the view, no more.
    rows = db.execute("SELECT count(*) FROM policy_health").fetchone()
    assert rows is not None
    text = daemon.http("/metrics")[1]
    assert text.count("bmsd_policy_behind_seconds{") == rows[0]


def test_without_policies_only_up_is_exported_and_a_dead_database_says_so(
    db_url: str, pg_template: Any,
) -> None:
    clock = [0.0]

    def up(registry: CollectorRegistry) -> float | None:
        return registry.get_sample_value("bmsd_policy_health_up")

    registry = CollectorRegistry()
    collector = PolicyHealth(DatabaseConfig(url=db_url), clock=lambda: clock[0])
    registry.register(collector)
    # A scrape never waits on the database: the first one starts a reading.
    assert up(registry) is None
    wait_until(lambda: up(registry) == 1, what="the first reading")
    names = {s.name for m in registry.collect() for s in m.samples}
    assert ("bmsd_policy_behind_seconds" in names) == pg_template.community
    collector.close()
    registry.unregister(collector)

    dead = PolicyHealth(DatabaseConfig(url="postgresql://127.0.0.1:1/none", connect_timeout_s=1),
                        clock=lambda: clock[0])
    registry.register(dead)
    with capture_logs() as logs:
        up(registry)
        wait_until(lambda: up(registry) == 0, what="the failed reading")
        clock[0] += MAX_AGE_S  # a later scrape reads again, and does not log again
        up(registry)
        wait_until(lambda: not dead._reading, what="the second reading")
        assert up(registry) == 0
    assert [e["event"] for e in logs] == ["policy_health_unreadable"]
