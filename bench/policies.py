"""Read policy_health on a generated fleet: its lags, and what a scrape costs (a benchmark).

    .venv/bin/python bench/policies.py --sites 1000 --days 10

Loads --sites sites of tools.fleet over --days days (ending now) into a
throwaway server with the background jobs off, so that no policy has run:
chunks older than 7 days are due for compression and show as behind.
Refreshes the aggregates bottom-up, notes one late day, then times
``SELECT * FROM policy_health`` (what bmsd runs at most every 15 s at scrape
time) and prints every row. Needs the community edition.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import timedelta
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's tools/
from timing import throwaway_postgres, time_query

from bmsd.schema.migrate import migrate
from tools.fleet import Fleet, load_fleet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--days", type=float, default=10)
    parser.add_argument("--step-minutes", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    with throwaway_postgres("policies", jobs=False) as pg:
        migrate(pg.url())
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            started = time.perf_counter()
            load_fleet(conn, Fleet(sites=args.sites, days=args.days,
                                   step=timedelta(minutes=args.step_minutes)))
            conn.execute("ANALYZE")
            rows = conn.execute("SELECT sum(approximate_row_count(format('%I', h)::regclass))"
                                " FROM unnest(ARRAY['site_telemetry_scaled',"
                                " 'battery_telemetry', 'energy_readings', 'production_data',"
                                " 'environmental_data']) h").fetchone()
            print(f"loaded {args.sites} sites, {args.days:g} days, about"
                  f" {int(rows[0] if rows else 0):,} raw rows, aggregates refreshed, in"
                  f" {time.perf_counter() - started:.0f} s")
            conn.execute("INSERT INTO aggregate_backlog (hypertable, day, noted_at) VALUES"
                         " ('energy_readings', current_date - 20, now() - interval '1 minute')")
            count, median, worst = time_query(conn, "SELECT * FROM policy_health", (),
                                              args.repeat)
            print(f"policy_health: {count} rows, median {median:.1f} ms, max {worst:.1f} ms")
            for row in conn.execute("SELECT object, policy, round(behind_s), round(allowed_s),"
                                    " detail FROM policy_health ORDER BY policy, object"):
                print(" | ".join(str(v) for v in row))


if __name__ == "__main__":
    main()
