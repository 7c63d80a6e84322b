"""Time every Grafana panel query on a fleet's history (a benchmark, not a test).

    .venv/bin/python bench/dashboards.py --sites 100 --days 30

Loads the fleet (tools.fleet: half battery sites, a site reading and two
pack readings every 5 minutes; half factories) into a throwaway TimescaleDB,
refreshes the aggregates, then runs each PostgreSQL panel of grafana/
dashboards as Grafana would send it (macros expanded, variables at their
first value) for the dashboard's own default range and for 30 days, as a
reader login. Prints the median and worst of repeated runs per panel and
flags those over the 300 ms target.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's tools/
from timing import time_query

from bmsd.schema.migrate import ensure_login, migrate
from tools.dashboards import POSTGRES, expand
from tools.fleet import Fleet, load_fleet
from tools.localstack import LocalPostgres

REPO = Path(__file__).resolve().parent.parent
TARGET_MS = 300.0
RANGES = {"now-6h": timedelta(hours=6), "now-24h": timedelta(hours=24),
          "now-7d": timedelta(days=7), "now-30d": timedelta(days=30)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--days", type=float, default=30)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bmsd-bench-dashboards-"))
    folder.chmod(0o755)
    pg = LocalPostgres(folder / "pg").start()
    try:
        migrate(pg.url(), skip_community=True)
        end = datetime.now().astimezone().replace(second=0, microsecond=0)
        started = time.perf_counter()
        with psycopg.connect(pg.url()) as conn:
            load_fleet(conn, Fleet(sites=args.sites, days=args.days, end=end))
            conn.execute("ANALYZE")
            sizes = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # type: ignore[index]
                     for t in ("site_telemetry", "battery_telemetry", "energy_readings")}
        print(f"{args.sites} sites, {args.days:g} days: {sizes} rows,"
              f" loaded and aggregated in {time.perf_counter() - started:.0f} s")
        ensure_login(pg.url(), "grafana", "bmsd_reader", "bench")
        reader = pg.url().replace("postgres@", "grafana@")
        over = 0
        with psycopg.connect(reader, autocommit=True) as conn:
            for path in sorted((REPO / "grafana" / "dashboards").glob("*.json")):
                dashboard = json.loads(path.read_text())
                values: dict[str, str] = {}
                for variable in dashboard["templating"]["list"]:
                    with conn.cursor() as cur:
                        rows = cur.execute(expand(variable["query"], end, end, values)).fetchall()
                        names = [c.name for c in cur.description or []]
                    values[variable["name"]] = str(
                        rows[0][names.index("__value") if "__value" in names else 0])
                windows = {dashboard["time"]["from"], "now-30d"}
                for panel in dashboard["panels"]:
                    for target in panel["targets"]:
                        if target["datasource"]["uid"] != POSTGRES["uid"]:
                            continue
                        for window in sorted(windows):
                            sql = expand(target["rawSql"], end - RANGES[window], end, values)
                            n, median, worst = time_query(conn, sql, (), args.repeat)
                            flag = "  OVER" if median > TARGET_MS else ""
                            over += median > TARGET_MS
                            print(f"{dashboard['uid']:13} {panel['title'][:44]:44} {window:8}"
                                  f" {n:5} rows  median {median:7.1f} ms  max {worst:7.1f} ms"
                                  f"{flag}")
        print(f"{over} panel queries over {TARGET_MS:.0f} ms (median)")
    finally:
        pg.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
