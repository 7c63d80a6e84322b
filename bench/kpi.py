"""Time the KPI function and overview views on generated data (a benchmark, not a test).

    .venv/bin/python bench/kpi.py --devices 100 --days 31

Generates energy and production readings at 1-minute resolution for
--devices machines of one factory over --days days (ending now), refreshes
the continuous aggregates bottom-up, then times get_factory_summary over the
last 30 days and the two overview views (median of repeated runs, after one
warm-up). Needs the community edition (aggregates).
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime, timedelta

import psycopg
from timing import throwaway_postgres, time_query

from bmsd.schema.migrate import load_demo_data, migrate

LEVELS = ("energy_readings_1m", "energy_readings_15m", "energy_site_15m", "energy_readings_1h",
          "energy_readings_1d", "production_data_1h", "production_data_1d")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--days", type=int, default=31)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    with throwaway_postgres("kpi", jobs=False) as pg:
        migrate(pg.url())
        load_demo_data(pg.url())
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            (site,), = conn.execute("SELECT id FROM sites WHERE slug = 'europe'").fetchall()
            end = datetime.now(UTC).replace(second=0, microsecond=0)
            start = end - timedelta(days=args.days)
            started = time.perf_counter()
            for n in range(args.devices):
                (device,), = conn.execute(
                    "INSERT INTO devices (site_id, slug, kind) VALUES (%s, %s, 'compressor')"
                    " RETURNING id", (site, f"bench-{n}")).fetchall()
                conn.execute("INSERT INTO device_streams VALUES (%s, 'energy_readings'),"
                             " (%s, 'production_data')", (device, device))
                conn.execute("""
                    INSERT INTO energy_readings (time, device_id, power_kw, energy_kwh)
                    SELECT t, %s, p, p / 60 FROM (
                        SELECT t, 20 + 10 * sin(extract(epoch FROM t) / 3600) + random() * 5 AS p
                          FROM generate_series(%s::timestamptz, %s, interval '1 minute') t) x
                """, (device, start, end))
                conn.execute("""
                    INSERT INTO production_data (time, device_id, units_produced, machine_state)
                    SELECT t, %s, (random() * 3)::int,
                           (ARRAY['running', 'running', 'idle', 'stopped'])[1 + (random() * 3)::int]
                      FROM generate_series(%s::timestamptz, %s, interval '1 minute') t
                """, (device, start, end))
            rows = args.devices * args.days * 1440 * 2
            print(f"loaded {rows:,} rows in {time.perf_counter() - started:.0f} s")
            started = time.perf_counter()
            for level in LEVELS:
                conn.execute(f"CALL refresh_continuous_aggregate('{level}', NULL, NULL)")
            print(f"refreshed the aggregates bottom-up in {time.perf_counter() - started:.0f} s")
            conn.execute("ANALYZE")
            queries = [
                ("get_factory_summary, 30 days",
                 "SELECT * FROM get_factory_summary(%s, %s, %s)",
                 (site, end - timedelta(days=30, minutes=7), end - timedelta(minutes=3))),
                ("v_machines_current_status", "SELECT * FROM v_machines_current_status", ()),
                ("v_site_overview", "SELECT * FROM v_site_overview", ()),
            ]
            for label, query, params in queries:
                rows, median, worst = time_query(conn, query, params, args.repeat)
                print(f"{label:30} {rows:4} rows  median {median:8.1f} ms  max {worst:8.1f} ms")


if __name__ == "__main__":
    main()
