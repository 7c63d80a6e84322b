"""A gateway back from a long outage: its buffer is stored once and reaches every aggregate."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from bmsd.schema.aggregates import FAMILIES, Family, refresh_order
from tests.fix_daemon import DaemonFactory, Publisher, wait_until
from tests.fix_report import Record, Scenario

pytestmark = pytest.mark.community

NOW = datetime.now(UTC).replace(second=0, microsecond=0)
# (stream, topic, device, a measured column, its sum in the aggregates, outage, step)
GATEWAYS = [
    ("energy_readings", "factory/north/meter-b/energy", "meter-b", "energy_kwh",
     "energy_kwh_sum", timedelta(days=30, hours=12), timedelta(minutes=15)),
    ("site_telemetry", "site/north/ctrl/telemetry", "ctrl", "solar_energy_kwh",
     "solar_energy_kwh_sum", timedelta(days=10, hours=6), timedelta(minutes=10)),
]
HISTORY = timedelta(days=10)  # stored and aggregated before each outage began
# The bound README states (sql/200): the backlog job runs every 5 s, and after a
# failed run - every run, on PostgreSQL 15.20 with TimescaleDB 2.28.3 - at most 5
# retry periods of 5 s later, +13 % jitter. A day noted while a run is under way
# waits for that run to end, the backoff, and the run that refreshes it.
BACKOFF_S = 5 * 5 * 1.13
# Only how long the test waits before it fails: the bound is checked after, from
# the durations of the job's own runs.
GIVE_UP_S = 300.0


def times(start: datetime, end: datetime, step: timedelta) -> list[datetime]:
    out = []
    while start < end:
        out.append(start)
        start += step
    return out


def energy(when: datetime) -> float:
    return round(1 + (when.timestamp() // 60) % 37 / 10, 1)  # sensor resolution, 0.1 kWh


def family_of(stream: str) -> Family:
    return next(f for f in FAMILIES if f.table == stream)


def levels(stream: str) -> list[tuple[str, str]]:
    return [(level.name, level.width) for level in family_of(stream).levels]


def disagreements(db: psycopg.Connection[Any], stream: str, device: int, column: str,
                  total: str) -> list[str]:
    """Return each aggregate level whose buckets differ from the raw rows'."""
    wrong = []
    for name, width in levels(stream):
        since = NOW - timedelta(days=29) if name.endswith("_1m") else NOW - timedelta(days=60)
        stored = db.execute(sql.SQL(
            "SELECT bucket, readings, round({t}::numeric, 3) FROM {v}"
            " WHERE device_id = %s AND bucket >= %s ORDER BY 1").format(
            t=sql.Identifier(total), v=sql.Identifier(name)), (device, since)).fetchall()
        raw = db.execute(sql.SQL(
            "SELECT time_bucket(%s::interval, time) AS b, count(*), round(sum({c})::numeric, 3)"
            " FROM {s} WHERE device_id = %s AND time_bucket(%s::interval, time) >= %s"
            " GROUP BY 1 ORDER BY 1").format(c=sql.Identifier(column), s=sql.Identifier(stream)),
            (width, device, width, since)).fetchall()
        if stored != raw:
            wrong.append(f"{name}: {len(stored)} buckets vs {len(raw)} from raw rows")
    return wrong


def test_a_buffer_sent_twice_after_10_and_30_days_offline_is_stored_once_and_aggregated(
    bmsd_daemon: DaemonFactory, publisher: Publisher, db_url: str, ingest_login: str,
    reliability: Record,
) -> None:
    # bmsd would take readings 200 days old; the 90-day raw retention caps it.
    daemon = bmsd_daemon("[ingest]\nmax_reading_age_s = 17280000\n", database_url=ingest_login)
    for _, topic, _slug, column, *_ in GATEWAYS:
        publisher.publish(topic, {"timestamp": NOW.isoformat(), column: energy(NOW)})
    with psycopg.connect(db_url, autocommit=True) as db:
        def device(slug: str) -> int:
            row = db.execute("SELECT id FROM devices WHERE slug = %s", (slug,)).fetchone()
            return int(row[0]) if row else 0

        wait_until(lambda: all(device(g[2]) for g in GATEWAYS), what="devices registered")
        expected = {}
        buffers = {}
        for stream, _topic, slug, column, _total, outage, step in GATEWAYS:
            went = NOW - outage
            history = times(went - HISTORY, went, timedelta(minutes=30))
            device_id = device(slug)
            with db.cursor() as cur, cur.copy(sql.SQL("COPY {} (time, device_id, {}) FROM STDIN")
                                              .format(sql.Identifier(stream),
                                                      sql.Identifier(column))) as copy:
                for when in history:
                    copy.write_row((when, device_id, energy(when)))
            # The buffer starts a day before the outage, between the stored readings.
            buffers[slug] = times(went - timedelta(days=1, minutes=-5), NOW - timedelta(hours=1),
                                  step)
            expected[slug] = 1 + len(history) + len(buffers[slug])
        # What the policies would have done before the outage ended: every level
        # materialised, old raw chunks compressed, the 1-minute level's 30 days kept
        # (in day-long chunks here, so that the day before the outage is surely gone).
        db.execute("SELECT set_chunk_time_interval(format('%I.%I',"
                   " materialization_hypertable_schema, materialization_hypertable_name),"
                   " INTERVAL '1 day')"
                   " FROM timescaledb_information.continuous_aggregates"
                   " WHERE view_name = 'energy_readings_1m'")
        for stream, *_ in GATEWAYS:
            for name, _width in levels(stream):
                db.execute("CALL refresh_continuous_aggregate(%s, NULL, %s)",
                           (name, NOW - timedelta(days=1)))
            # The hypertable behind the stream (site readings: integers, sql/190).
            db.execute("SELECT compress_chunk(c, if_not_compressed => true)"
                       " FROM show_chunks(coalesce(to_regclass(%s), %s::regclass),"
                       " older_than => INTERVAL '7 days') c", (f"{stream}_scaled", stream))
        row = db.execute("SELECT job_id FROM timescaledb_information.jobs WHERE"
                         " proc_name = 'policy_retention' AND hypertable_name ="
                         " 'energy_readings_1m'").fetchone()
        assert row is not None
        def old_1m_chunks() -> int:
            # The materialisation itself: the view would answer dropped buckets in real time.
            row = db.execute("SELECT count(*) FROM show_chunks('energy_readings_1m',"
                             " older_than => %s)", (NOW - timedelta(days=31),)).fetchone()
            return int(row[0]) if row else 0

        assert old_1m_chunks() > 0
        db.execute(f"CALL run_job({int(row[0])})")
        assert old_1m_chunks() == 0, "the 1-minute level's retention dropped the oldest days"

        for _attempt in range(2):
            for _stream, topic, slug, column, _total, _outage, _step in GATEWAYS:
                buffer = buffers[slug]
                for first in range(0, len(buffer), 200):
                    publisher.publish(topic, {"readings": [
                        {"timestamp": when.isoformat(), column: energy(when)}
                        for when in buffer[first:first + 200]]})
        too_old = NOW - timedelta(days=91)
        publisher.publish("factory/north/meter-b/energy",
                          {"timestamp": too_old.isoformat(), "energy_kwh": 1.0})

        def stored() -> dict[str, int]:
            return {g[2]: int(db.execute(sql.SQL("SELECT count(*) FROM {} WHERE device_id = %s")
                                         .format(sql.Identifier(g[0])),
                                         (device(g[2]),)).fetchone()[0])  # type: ignore[index]
                    for g in GATEWAYS}

        def rejected() -> list[tuple[str, dict[str, str]]]:
            return db.execute("SELECT reason, details FROM ingest_rejects").fetchall()

        # The too-old reading was published last, but its dead letter may commit
        # in a later batch than the buffers' last readings: wait for both.
        wait_until(lambda: stored() == expected and rejected(), timeout_s=60,
                   what="both buffers stored once and the too-old reading rejected")
        rejects = rejected()
        assert len(rejects) == 1, rejects
        assert "(the table's retention: older data is dropped)" in rejects[0][0]
        assert rejects[0][1]["category"] == "too_old"

        def wrong() -> list[str]:
            return [f"{g[0]} {line}" for g in GATEWAYS
                    for line in disagreements(db, g[0], device(g[2]), g[3], g[4])]

        # Readings newer than 3 days reach the aggregates through the refresh
        # policies, on their schedules (up to an hour for the daily level): run
        # each once, in level order, as the schedules would. Waiting for the
        # scheduler instead made the test depend on when this database's first
        # policy runs happened (a policy that ran just before the buffer came
        # next runs a schedule later). Older days are the backlog job's (every
        # 15 s), which this test is about.
        buffered = time.monotonic()
        buffered_at = db.execute("SELECT now()").fetchone()
        for stream, *_ in GATEWAYS:
            for name in refresh_order(family_of(stream)):
                job = db.execute("SELECT job_id FROM timescaledb_information.jobs"
                                 " WHERE proc_name = 'policy_refresh_continuous_aggregate'"
                                 " AND hypertable_name = %s", (name,)).fetchone()
                assert job is not None, f"{name} has no refresh policy"
                db.execute("CALL run_job(%s)", (job[0],))
        def caught_up() -> bool:
            return not wrong()

        try:
            wait_until(caught_up, timeout_s=GIVE_UP_S,
                       what="every aggregate level equal to the raw rows")
        except AssertionError as late:
            # Say which levels, and what the backlog job ran into (the portal
            # error that ends every job on PG 15.20 + TimescaleDB 2.28 aside).
            errors = db.execute(
                "SELECT start_time::text, err_message FROM timescaledb_information.job_errors"
                " WHERE proc_name = 'bmsd_refresh_backlog' AND err_message NOT LIKE"
                " 'cannot drop portal%%' ORDER BY start_time DESC LIMIT 5").fetchall()
            backlog = db.execute("SELECT * FROM aggregate_backlog").fetchall()
            jobs = db.execute(
                "SELECT j.proc_name, j.hypertable_name, s.last_run_status, s.total_runs,"
                " s.total_failures, s.last_run_started_at::text, s.next_start::text"
                " FROM timescaledb_information.jobs j"
                " JOIN timescaledb_information.job_stats s USING (job_id)"
                " WHERE j.proc_name IN ('bmsd_refresh_backlog',"
                " 'policy_refresh_continuous_aggregate') ORDER BY j.job_id").fetchall()
            raise AssertionError(f"{late}; still wrong: {wrong()[:6]}; backlog: {backlog};"
                                 f" backlog job errors: {errors}; jobs: {jobs}") from None
        aggregated = time.monotonic() - buffered
        # The bound: a run under way, the backoff, a run; runs as long as this
        # job's longest since the buffers were stored (failed runs are in job_errors;
        # job_stats has the last one, for a TimescaleDB whose runs succeed).
        run = db.execute(
            "SELECT greatest(max(extract(epoch FROM e.finish_time - e.start_time)),"
            "                max(extract(epoch FROM s.last_run_duration)))"
            "  FROM timescaledb_information.job_stats s"
            "  JOIN timescaledb_information.jobs j USING (job_id)"
            "  LEFT JOIN timescaledb_information.job_errors e"
            "    ON e.job_id = j.job_id AND e.finish_time > %s"
            " WHERE j.proc_name = 'bmsd_refresh_backlog'", buffered_at).fetchone()
        assert run is not None
        assert run[0] is not None
        bound = BACKOFF_S + 2 * float(run[0])
        assert aggregated <= bound + 5, (
            f"aggregates caught up {aggregated:.0f} s after the buffers were stored, past the"
            f" bound of {bound:.0f} s (backoff {BACKOFF_S:.0f} s, runs of up to {run[0]:.0f} s)")
        assert db.execute("SELECT count(*) FROM aggregate_backlog").fetchone() == (0,)
        compressed = db.execute(
            "SELECT count(*) FROM timescaledb_information.chunks"
            " WHERE hypertable_name = 'energy_readings' AND is_compressed").fetchone()
        assert compressed is not None
        assert compressed[0] > 0
    assert json.loads(daemon.http("/readyz")[1])["ok"] is True
    sent = sum(len(b) for b in buffers.values())
    reliability(Scenario(
        "gateways back after 10 and 30 days offline, each buffer sent twice", 2 * sent + 1,
        sent, 0, 1, recovered_s=aggregated,
        note=(f"bound {bound:.0f} s: the job's backoff and two of its runs, {run[0]:.0f} s at"
              " most here; published: both copies and one reading 91 days old; stored: each"
              " buffered"
              " reading once (into compressed chunks too); dead letter: the 91-day-old"
              " reading, past the raw retention; recovered: every aggregate level equal"
              " to the raw rows after the buffers were stored")))
