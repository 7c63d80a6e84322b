"""The BMS seed's query table, loaded through bmsd (a benchmark, not a test).

    .venv/bin/python bench/seed.py --sites 1000 --days 7

Starts a throwaway TimescaleDB (community edition: aggregates, compression)
and Mosquitto, runs `bmsd run` with the shipped defaults, and publishes every
site controller's readings (one every 5 minutes over --days, the BMS seed's
21-column site reading) as gateway batches of half a day. Values are
realistic: smooth day curves plus small noise, at each sensor's resolution
(0.1 V, 0.01 kW, 0.001 kWh, 0.001 Hz, ...), as a gateway sends them.

Then: the no-loss count (published readings against stored rows), the
aggregates refreshed, every whole day compressed, the bytes per reading at
rest, and the seed's six queries with their targets (median of repeated runs
after a warm-up):

| seed query | here | target |
|---|---|---|
| latest reading, one site | `latest_readings(site)` | < 50 ms |
| latest readings, all sites | `latest_readings()` | < 200 ms |
| hourly data, 24 h | `site_telemetry_1h`, one site | < 100 ms |
| daily data, 30 d | `site_telemetry_1d`, one site | < 50 ms |
| active alerts | unresolved `alerts`, newest first | < 100 ms |
| dashboard metrics | `v_site_overview` | < 300 ms |
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's tools/
from stack import Bmsd, Stack, _publisher, stored
from timing import time_query

from bmsd.models import SiteTelemetry
from bmsd.schema.migrate import migrate
from tools.fleet import refresh_aggregates

STEP = timedelta(minutes=5)
PER_MESSAGE = 144  # half a day of 5-minute readings: about 90 kB of JSON
BACKLOG = 300_000  # readings published and not yet stored: about 200 MB in the broker

QUERIES = [
    ("latest reading, one site", "SELECT * FROM latest_readings(%(site)s)", 50),
    ("latest readings, all sites", "SELECT * FROM latest_readings()", 200),
    ("hourly data, 24 h, one site", """
        SELECT h.* FROM site_telemetry_1h h
          JOIN devices d ON d.id = h.device_id JOIN sites s ON s.id = d.site_id
         WHERE s.slug = %(site)s AND h.bucket >= now() - INTERVAL '24 hours'
         ORDER BY h.bucket""", 100),
    ("daily data, 30 d, one site", """
        SELECT h.* FROM site_telemetry_1d h
          JOIN devices d ON d.id = h.device_id JOIN sites s ON s.id = d.site_id
         WHERE s.slug = %(site)s AND h.bucket >= now() - INTERVAL '30 days'
         ORDER BY h.bucket""", 50),
    ("active alerts", """
        SELECT a.id, s.slug, d.slug, a.rule_code, a.severity, a.status, a.triggered_at,
               a.message
          FROM alerts a JOIN devices d ON d.id = a.device_id JOIN sites s ON s.id = d.site_id
         WHERE a.status <> 'resolved' ORDER BY a.triggered_at DESC""", 100),
    ("dashboard metrics", "SELECT * FROM v_site_overview", 300),
]


#: Each column's sensor resolution, in decimal digits (0.1 V, 0.01 kW, 0.001 kWh, ...):
#: the resolution bmsd stores them at.
DIGITS = SiteTelemetry.digits


def reading(site: int, when: datetime, rng: random.Random) -> dict[str, Any]:
    """One site reading: day curves with a per-site phase, noise, sensor resolution."""
    x = 2 * math.pi * (when.timestamp() % 86400) / 86400 + site * 0.37
    hours = STEP.total_seconds() / 3600
    sun = max(0.0, 80 * math.sin(x - 1.5))
    smooth = {
        "battery_voltage": (400 + 20 * math.sin(x), 0.3),
        "battery_current": (30 * math.cos(x), 0.2),
        "battery_charge_level": (50 + 40 * math.sin(x), 0.1),
        "battery_temperature": (25 + 5 * math.sin(x), 0.1),
        "battery_state_of_health": (97.5 - site % 7 * 0.3, 0.02),
        "battery_power_kw": (-30 * math.cos(x), 0.05),
        "solar_power_kw": (sun, 0.05 if sun else 0.0),
        "solar_efficiency": (18.5 if sun else 0.0, 0.1 if sun else 0.0),
        "inverter1_efficiency": (97.0, 0.1),
        "inverter1_temperature": (35 + 10 * math.sin(x), 0.1),
        "inverter2_efficiency": (96.8, 0.1),
        "inverter2_temperature": (34 + 10 * math.sin(x), 0.1),
        "grid_voltage": (230 + 2 * math.sin(7 * x), 0.3),
        "grid_frequency": (50.0, 0.02),
        "grid_power_kw": (40 - 60 * math.sin(x - 1.5), 0.3),
        "load_power_kw": (60 + 20 * math.sin(x), 0.3),
    }
    out: dict[str, Any] = {"timestamp": when.isoformat()}
    for name, (centre, noise) in smooth.items():
        out[name] = round(centre + rng.gauss(0, noise), DIGITS[name]) if noise else centre
    out["battery_charge_level"] = min(100.0, max(0.0, out["battery_charge_level"]))
    solar = out["solar_power_kw"] = max(0.0, out["solar_power_kw"])
    out["inverter1_power_kw"] = round(solar / 2, 2)
    out["inverter2_power_kw"] = round(solar - out["inverter1_power_kw"], 2)
    out["solar_energy_kwh"] = round(solar * hours, 3)
    out["grid_energy_kwh"] = round(out["grid_power_kw"] * hours, 3)
    out["load_energy_kwh"] = round(max(0.0, out["load_power_kw"]) * hours, 3)
    return out


def stored_by_bmsd(metrics: str) -> int:
    """Rows bmsd committed, from its /metrics (a count(*) a second would load the database)."""
    text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("bmsd_rows_written_total{")))


def publish(port: int, sites: range, start: datetime, end: datetime, metrics: str,
            publishers: int) -> None:
    """Publish these sites' readings as gateway batches, QoS 1 (a process of its own).

    Publishing waits while bmsd is more than BACKLOG readings behind (counting
    the other publishers as going at this one's pace): past the broker's
    max_queued_bytes (1 GiB) Mosquitto would drop messages for bmsd's session.
    """
    client = _publisher(port, f"bench-seed-{sites.start}")
    rng = random.Random(sites.start)
    infos = []
    sent = 0
    for site in sites:
        while sent * publishers - stored_by_bmsd(metrics) > BACKLOG:
            time.sleep(0.5)
        sent += _publish_site(client, site, start, end, rng, infos)
    for info in infos:
        info.wait_for_publish(300)
    client.disconnect()
    client.loop_stop()


def _publish_site(client: Any, site: int, start: datetime, end: datetime,
                  rng: random.Random, infos: list[Any]) -> int:
    """Publish one site's readings; return how many."""
    sent = 0
    when = start
    while when < end:
        batch = []
        for _ in range(PER_MESSAGE):
            if when >= end:
                break
            batch.append(reading(site, when, rng))
            when += STEP
        infos.append(client.publish(f"site/site-{site:04d}/ctrl/telemetry",
                                    json.dumps({"readings": batch}), qos=1))
        sent += len(batch)
    while len(infos) > 2000:  # bounded memory: wait for the oldest acks
        infos.pop(0).wait_for_publish(300)
    return sent


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--publishers", type=int, default=2)
    args = parser.parse_args()

    stack = Stack()
    try:
        with psycopg.connect(stack.pg.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE seed")
        url = stack.pg.url("seed")
        migrate(url)
        end = datetime.now(UTC).replace(second=0, microsecond=0)
        end -= timedelta(minutes=end.minute % 5)
        start = end - timedelta(days=args.days)
        expected = args.sites * math.ceil((end - start) / STEP)
        # A fleet's first minute registers every site: above the default cap on new
        # sites per minute (flood protection), which would dead-letter the rest.
        daemon = Bmsd(stack, url, "bench-seed", "[ingest]\nmax_new_devices_per_site_per_minute"
                      f" = {max(100, args.sites)}\n")
        daemon.start()
        time.sleep(2.5)  # subscribed
        started = time.perf_counter()
        per = math.ceil(args.sites / args.publishers)
        procs = [multiprocessing.Process(target=publish, args=(
            stack.broker.port, range(i * per, min(args.sites, (i + 1) * per)), start, end,
            daemon.env["BMSD_METRICS_ADDR"], args.publishers))
            for i in range(args.publishers)]
        for proc in procs:
            proc.start()
        with psycopg.connect(url, autocommit=True) as conn:
            last, last_change = -1, time.monotonic()
            metrics = daemon.env["BMSD_METRICS_ADDR"]
            while (count := stored_by_bmsd(metrics)) < expected or any(p.is_alive()
                                                                       for p in procs):
                daemon.check_alive()
                if count != last:
                    last, last_change = count, time.monotonic()
                elif time.monotonic() - last_change > 60:
                    break  # nothing new for a minute: report what was stored
                time.sleep(1)
            loaded = time.perf_counter() - started
            for proc in procs:
                proc.join()
            cpu, rss = daemon.usage()
            daemon.stop()
            # the unique index on (device_id, time): no row twice
            count = stored(url, "site_telemetry")
            rejects = conn.execute("SELECT reason, count(*) FROM ingest_rejects GROUP BY 1"
                                   " ORDER BY 2 DESC LIMIT 3").fetchall()
            print(f"published {expected:,} readings of {args.sites} sites over {args.days} days;"
                  f" stored {count:,} once each, dead letters {rejects or 0}:"
                  f" {'no loss' if count == expected and not rejects else 'NOT ALL STORED'}")
            print(f"loaded through bmsd in {loaded:.0f} s ({count / loaded:,.0f} readings/s;"
                  f" bmsd {cpu / count * 1e6:.0f} us CPU per reading, peak RSS {rss:.0f} MB)")

            began = time.perf_counter()
            refresh_aggregates(conn)
            cutoff = end.replace(hour=0, minute=0)
            # The hypertable behind the site_telemetry view (integers, sql/190).
            (table,), = conn.execute("SELECT coalesce(to_regclass('site_telemetry_scaled'),"
                                     " 'site_telemetry')::text").fetchall()
            (chunks,), = conn.execute(
                "SELECT count(compress_chunk(c, if_not_compressed => true))"
                " FROM show_chunks(%s::regclass, older_than => %s) c", (table, cutoff)).fetchall()
            (old,), = conn.execute("SELECT count(*) FROM site_telemetry WHERE time < %s",
                                   (cutoff,)).fetchall()
            before, after = conn.execute(
                "SELECT before_compression_total_bytes, after_compression_total_bytes"
                " FROM hypertable_compression_stats(%s::regclass)", (table,)).fetchone() or (0, 0)
            conn.execute("ANALYZE")
            print(f"aggregated and compressed {chunks} daily chunks in"
                  f" {time.perf_counter() - began:.0f} s: {before / old:.0f} -> {after / old:.1f}"
                  f" bytes per site reading in {table} ({1 - after / before:.0%} saved;"
                  " target <= 30)")

            print("\n| seed query | rows | median | max | target |\n|---|--:|--:|--:|--:|")
            params = {"site": f"site-{args.sites // 2:04d}"}
            for label, query, target in QUERIES:
                rows, median, worst = time_query(conn, query, params, args.repeat)
                print(f"| {label} | {rows} | {median:.1f} ms | {worst:.1f} ms | < {target} ms"
                      f"{'' if median < target else ' MISSED'} |")
    finally:
        stack.close()


if __name__ == "__main__":
    main()
