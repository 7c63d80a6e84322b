"""Bytes per site reading at rest, for ways of storing it (a benchmark, not a test).

    .venv/bin/python bench/size.py --sites 100 --days 30

The same site readings as bench/seed.py (the BMS seed's 21 columns every 5
minutes, smooth signals plus noise at each sensor's resolution) are copied
into one hypertable per variant, each compressed like site_telemetry
(segment by device, newest first, the unique (device_id, time) index), and
measured with hypertable_compression_stats: compressed bytes (data and
indexes) per reading. Variants: the shipped double precision columns; real;
integers at each column's sensor resolution (value x 10^digits, which a view
would divide back into engineering units); and longer chunks. Needs the
community edition (compression).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from seed import DIGITS, STEP, reading

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's tools/
from tools.localstack import LocalPostgres

COLUMNS = list(DIGITS)
# name: (SQL type of every measure, how a value is stored, chunk interval)
VARIANTS: dict[str, tuple[str, Any, str]] = {
    "double precision (shipped)": ("double precision", None, "1 day"),
    "real": ("real", None, "1 day"),
    "integers at sensor resolution": ("integer", "scaled", "1 day"),
    "double precision, 7-day chunks": ("double precision", None, "7 days"),
    "integers at sensor resolution, 7-day chunks": ("integer", "scaled", "7 days"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args()
    end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = end - timedelta(days=args.days)
    rng = random.Random(1)
    rows = []
    for site in range(args.sites):
        when = start
        while when < end:
            values = reading(site, when, rng)
            rows.append((when, site, [values[c] for c in COLUMNS]))
            when += STEP
    folder = Path(tempfile.mkdtemp(prefix="bmsd-bench-size-"))
    folder.chmod(0o755)
    pg = LocalPostgres(folder / "pg",
                       extra_settings="timescaledb.max_background_workers = 0\n").start()
    try:
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            print(f"{len(rows):,} site readings ({args.sites} sites, {args.days} days,"
                  " every 5 minutes)\n")
            print("| stored as | bytes per reading, compressed | uncompressed | saved |")
            print("|---|--:|--:|--:|")
            for n, (label, (kind, scale, chunk)) in enumerate(VARIANTS.items()):
                table = f"size_{n}"
                columns = ", ".join(f"{c} {kind}" for c in COLUMNS)
                conn.execute(f"CREATE TABLE {table} (time timestamptz NOT NULL,"
                             f" device_id integer NOT NULL, {columns})")
                conn.execute(f"SELECT create_hypertable('{table}',"
                             f" by_range('time', INTERVAL '{chunk}'))")
                conn.execute(f"CREATE UNIQUE INDEX ON {table} (device_id, time DESC)")
                conn.execute(f"ALTER TABLE {table} SET (timescaledb.compress,"
                             " timescaledb.compress_segmentby = 'device_id',"
                             " timescaledb.compress_orderby = 'time DESC')")
                with conn.cursor() as cur, cur.copy(
                        f"COPY {table} (time, device_id, {', '.join(COLUMNS)}) FROM STDIN"
                        " (FORMAT BINARY)") as copy:
                    copy.set_types(["timestamptz", "integer", *[kind] * len(COLUMNS)])
                    for when, site, values in rows:
                        if scale:
                            values = [round(v * 10 ** DIGITS[c])
                                      for c, v in zip(COLUMNS, values, strict=True)]
                        copy.write_row((when, site, *values))
                conn.execute(f"SELECT compress_chunk(c) FROM show_chunks('{table}') c")
                before, after = conn.execute(
                    "SELECT before_compression_total_bytes, after_compression_total_bytes"
                    f" FROM hypertable_compression_stats('{table}')").fetchone() or (0, 0)
                print(f"| {label} | {after / len(rows):.1f} | {before / len(rows):.0f} |"
                      f" {1 - after / before:.0%} |", flush=True)
    finally:
        pg.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
