"""Time the latest-reading views on generated data (a benchmark, not a test).

    .venv/bin/python bench/latest.py --sites 10 --devices-per-site 20 --days 7

Loads every device's readings at 1-minute resolution into the hypertable of
its stream (battery packs, site controllers, meters), then times
`latest_readings(site)` for one site and `latest_readings()` for all sites
(median of repeated runs, after one warm-up).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's tools/
from timing import time_query

from bmsd.schema.migrate import migrate
from tools.localstack import LocalPostgres

STREAMS = [("battery_telemetry", "battery_pack", "soc"), ("site_telemetry", "site_controller",
           "battery_charge_level"), ("energy_readings", "meter", "power_kw")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--devices-per-site", type=int, default=20)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bmsd-bench-latest-"))
    folder.chmod(0o755)
    pg = LocalPostgres(folder / "pg").start()
    try:
        migrate(pg.url(), skip_community=True)
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            conn.execute("INSERT INTO organizations (slug, name) VALUES ('o', 'O')")
            for s in range(args.sites):
                conn.execute("INSERT INTO sites (organization_id, slug, name) VALUES (1, %s, %s)",
                             (f"site-{s}", f"Site {s}"))
                for d in range(args.devices_per_site):
                    table, kind, column = STREAMS[d % len(STREAMS)]
                    (device,), = conn.execute(
                        "INSERT INTO devices (site_id, slug, kind) VALUES (%s, %s, %s)"
                        " RETURNING id", (s + 1, f"dev-{d}", kind)).fetchall()
                    conn.execute("INSERT INTO device_streams VALUES (%s, %s)", (device, table))
                    conn.execute(
                        f"INSERT INTO {table} (time, device_id, {column})"
                        " SELECT t, %s, random() * 100 FROM generate_series("
                        " %s::timestamptz, %s::timestamptz, interval '1 minute') t",
                        (device, datetime.now(UTC) - timedelta(days=args.days),
                         datetime.now(UTC)))
            conn.execute("ANALYZE")
            rows = sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                       for t, _, _ in STREAMS)
            print(f"{args.sites} sites x {args.devices_per_site} devices, {rows} rows")
            for label, query, params in (
                ("one site", "SELECT * FROM latest_readings(%s)", ("site-3",)),
                ("all sites", "SELECT * FROM latest_readings()", ()),
            ):
                rows, median, worst = time_query(conn, query, params, args.repeat)
                print(f"latest_readings, {label:9}: {rows:5} rows, median {median:7.2f} ms,"
                      f" max {worst:7.2f} ms")
    finally:
        pg.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
