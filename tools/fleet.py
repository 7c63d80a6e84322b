"""Load a fleet's history straight into the database, for dashboards and benchmarks.

Sites alternate: battery sites (a site controller every ``step``, two packs of
16 cells) and factories (a meter and machines with energy and production
readings, an environment sensor). Signals are smooth, at sensor resolution:
a day curve for sun and load, state of charge that cycles, small noise. It
writes with ``generate_series`` in the server, which is how 30 days of a
fleet load in seconds; bmsd's ingest path has tests of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg

from bmsd.schema.aggregates import FAMILIES, refresh_order

_ORG = """
    INSERT INTO organizations (slug, name) VALUES ('fleet', 'Fleet Energy')
    ON CONFLICT (slug) DO UPDATE SET name = excluded.name RETURNING id
"""
_SITES = """
    INSERT INTO sites (organization_id, slug, kind, name, timezone, grid_region)
    SELECT %(org)s, 'site-' || lpad(i::text, 4, '0'),
           CASE WHEN i %% 2 = 0 THEN 'site' ELSE 'factory' END,
           'Site ' || i, 'Europe/Berlin', 'DE'
      FROM generate_series(0, %(sites)s - 1) AS i
    ON CONFLICT (slug) DO NOTHING
"""
_DEVICES = """
    INSERT INTO devices (site_id, slug, kind, nominal_capacity_kwh, last_seen_at)
    SELECT s.id, d.slug, d.kind, d.kwh, %(end)s
      FROM sites s
      JOIN LATERAL (VALUES ('ctrl', 'site_controller', NULL::double precision, 'site'),
                           ('pack-1', 'battery_pack', 100.0, 'site'),
                           ('pack-2', 'battery_pack', 100.0, 'site'),
                           ('meter', 'meter', NULL, 'factory'),
                           ('press-1', 'machine', NULL, 'factory'),
                           ('press-2', 'machine', NULL, 'factory'),
                           ('env', 'sensor', NULL, 'factory')) AS d (slug, kind, kwh, site_kind)
        ON d.site_kind = s.kind
     WHERE s.slug LIKE 'site-%%'
    ON CONFLICT (site_id, slug) DO NOTHING
"""
_STREAMS = """
    INSERT INTO device_streams (device_id, stream)
    SELECT d.id, st.stream FROM devices d
      JOIN (VALUES ('site_controller', 'site_telemetry'), ('battery_pack', 'battery_telemetry'),
                   ('meter', 'energy_readings'), ('machine', 'energy_readings'),
                   ('machine', 'production_data'), ('sensor', 'environmental_data'))
           AS st (kind, stream) ON st.kind = d.kind
    ON CONFLICT DO NOTHING
"""
_TARIFFS = """
    INSERT INTO energy_tariffs (site_id, band, price_per_kwh, start_hour, end_hour, valid_from)
    SELECT s.id, b.band, b.price, b.lo, b.hi, %(start)s
      FROM sites s,
           (VALUES ('off_peak', 0.18, 0, 7), ('peak', 0.32, 7, 20), ('off_peak', 0.18, 20, 24))
           AS b (band, price, lo, hi)
     WHERE s.kind = 'factory' AND s.slug LIKE 'site-%%'
       AND NOT EXISTS (SELECT 1 FROM energy_tariffs t WHERE t.site_id = s.id)
"""
_CARBON = """
    INSERT INTO carbon_factors (region, kg_co2_per_kwh, source, valid_from)
    SELECT 'DE', 0.38, 'fleet loader', %(start)s
     WHERE NOT EXISTS (SELECT 1 FROM carbon_factors WHERE region = 'DE')
"""
# Hours of the day as a phase: x = position in the day, 0..2π.
_SITE_TELEMETRY = """
    INSERT INTO site_telemetry
        (time, device_id, battery_voltage, battery_current, battery_charge_level,
         battery_temperature, battery_state_of_health, battery_power_kw, solar_power_kw,
         solar_energy_kwh, grid_voltage, grid_frequency, grid_power_kw, grid_energy_kwh,
         load_power_kw, load_energy_kwh)
    SELECT t, d.id, round((400 + 20 * sin(x))::numeric, 1), round((30 * cos(x))::numeric, 2),
           round((50 + 40 * sin(x))::numeric, 1), round((25 + 5 * sin(x))::numeric, 1), 97.5,
           round((-30 * cos(x))::numeric, 2), round(greatest(0, 80 * sin(x - 1.5))::numeric, 2),
           round((greatest(0, 80 * sin(x - 1.5)) * %(hours)s)::numeric, 3),
           round((230 + 2 * sin(7 * x))::numeric, 1),
           round((50 + 0.05 * sin(13 * x + d.id))::numeric, 3),
           round((40 - 60 * sin(x - 1.5))::numeric, 2),
           round(((40 - 60 * sin(x - 1.5)) * %(hours)s)::numeric, 3),
           round((60 + 20 * sin(x))::numeric, 2),
           round(((60 + 20 * sin(x)) * %(hours)s)::numeric, 3)
      FROM devices d
      CROSS JOIN generate_series(%(start)s, %(end)s, %(step)s) AS t
      CROSS JOIN LATERAL (SELECT 2 * pi() * (extract(epoch FROM t)::bigint %% 86400) / 86400.0
                          + d.id AS x) AS p
     WHERE d.kind = 'site_controller'
    ON CONFLICT DO NOTHING
"""
_BATTERY = """
    INSERT INTO battery_telemetry
        (time, device_id, voltage, current, power_w, temperature, soc, soh, cell_voltages,
         cell_temperatures, alarm_flags, over_voltage, under_voltage, over_current,
         over_temperature)
    SELECT t, d.id, round((51 + 3 * sin(x))::numeric, 2), round((40 * cos(x))::numeric, 2),
           round((2000 * cos(x))::numeric, 1), round((26 + 4 * sin(x))::numeric, 1),
           round((50 + 40 * sin(x))::numeric, 1), 96.0,
           ARRAY(SELECT round((3.2 + 0.15 * sin(x) + c * 0.002)::numeric, 3)::float8
                   FROM generate_series(1, 16) AS c),
           ARRAY(SELECT round((25 + 4 * sin(x) + c * 0.1)::numeric, 1)::float8
                   FROM generate_series(1, 16) AS c),
           CASE WHEN (extract(epoch FROM t)::bigint %% 10800) = 0 THEN ARRAY['CELL_IMBALANCE']
                ELSE NULL END,
           false, false, false, (extract(epoch FROM t)::bigint %% 604800) = 0
      FROM devices d
      CROSS JOIN generate_series(%(start)s, %(end)s, %(step)s) AS t
      CROSS JOIN LATERAL (SELECT 2 * pi() * (extract(epoch FROM t)::bigint %% 86400) / 86400.0
                          + d.id AS x) AS p
     WHERE d.kind = 'battery_pack'
    ON CONFLICT DO NOTHING
"""
_ENERGY = """
    INSERT INTO energy_readings (time, device_id, power_kw, energy_kwh, voltage, current,
                                 power_factor, frequency)
    SELECT t, d.id, round(kw::numeric, 2), round((kw * %(hours)s)::numeric, 4),
           400, round((kw * 1000 / 400 / 1.732)::numeric, 2), 0.92, 50.0
      FROM devices d
      CROSS JOIN generate_series(%(start)s, %(end)s, %(step)s) AS t
      CROSS JOIN LATERAL (SELECT greatest(0.5, (CASE WHEN d.kind = 'meter' THEN 120 ELSE 35 END)
                          * (0.6 + 0.4 * sin(2 * pi() * (extract(epoch FROM t)::bigint %% 86400)
                                            / 86400.0 + d.id))) AS kw) AS p
     WHERE d.kind IN ('meter', 'machine')
    ON CONFLICT DO NOTHING
"""
_PRODUCTION = """
    INSERT INTO production_data (time, device_id, units_produced, units_rejected, machine_state,
                                 cycle_time_s)
    SELECT t, d.id, CASE WHEN running THEN 12 ELSE 0 END, CASE WHEN running THEN 1 ELSE 0 END,
           CASE WHEN running THEN 'running' ELSE 'idle' END, 25.0
      FROM devices d
      CROSS JOIN generate_series(%(start)s, %(end)s, %(step)s) AS t
      CROSS JOIN LATERAL (SELECT extract(hour FROM t) BETWEEN 6 AND 21 AS running) AS p
     WHERE d.kind = 'machine'
    ON CONFLICT DO NOTHING
"""
_ENVIRONMENT = """
    INSERT INTO environmental_data (time, device_id, temperature, humidity, pressure_hpa, co2_ppm)
    SELECT t, d.id, round((21 + 3 * sin(x))::numeric, 1), round((45 + 10 * cos(x))::numeric, 1),
           1013, round((600 + 200 * sin(x))::numeric, 0)
      FROM devices d
      CROSS JOIN generate_series(%(start)s, %(end)s, %(step)s) AS t
      CROSS JOIN LATERAL (SELECT 2 * pi() * (extract(epoch FROM t)::bigint %% 86400) / 86400.0
                          AS x) AS p
     WHERE d.kind = 'sensor'
    ON CONFLICT DO NOTHING
"""
_ALERTS = """
    INSERT INTO alerts (site_id, device_id, rule_code, severity, category, status, title, message,
                        value, threshold, triggered_at, resolved_at)
    SELECT d.site_id, d.id, a.code, a.severity, 'battery', a.status, a.code, a.code || ' on ' ||
           d.slug, 4.25, 4.2, %(end)s - a.ago,
           CASE WHEN a.status = 'resolved' THEN %(end)s - a.ago + interval '20 minutes' END
      FROM devices d
      CROSS JOIN (VALUES ('CELL_OVER_VOLTAGE', 'critical', 'active', interval '2 hours'),
                         ('SOC_LOW', 'warning', 'resolved', interval '3 days'),
                         ('BATTERY_HIGH_TEMP', 'error', 'resolved', interval '10 days'))
           AS a (code, severity, status, ago)
     WHERE d.kind = 'battery_pack' AND d.slug = 'pack-1'
       AND NOT EXISTS (SELECT 1 FROM alerts x WHERE x.device_id = d.id AND x.rule_code = a.code)
"""
# Every battery site's controller as a Sparkplug B edge node, its packs as its
# devices: one edge node offline (its death an hour ago), the others online.
_SPARKPLUG_NODES = """
    INSERT INTO sparkplug_nodes (group_id, edge_node, device, device_id, online, bdseq,
                                 last_birth_at, last_death_at)
    SELECT 'fleet', s.slug, CASE WHEN d.kind = 'battery_pack' THEN d.slug ELSE '' END, d.id,
           s.slug <> min(s.slug) OVER (), 0, %(end)s - interval '2 days',
           CASE WHEN s.slug = min(s.slug) OVER () THEN %(end)s - interval '1 hour' END
      FROM devices d JOIN sites s ON s.id = d.site_id
     WHERE d.kind IN ('battery_pack', 'site_controller')
    ON CONFLICT DO NOTHING
"""
_EVENTS = """
    INSERT INTO events (time, site_id, device_id, kind, message)
    SELECT triggered_at, site_id, device_id, 'alert_triggered', message FROM alerts
"""
#: Every continuous aggregate, each level after the one it is built on.
_AGGREGATES = tuple(name for family in FAMILIES for name in refresh_order(family))


@dataclass(frozen=True)
class Fleet:
    """What to load: how many sites, over which span, at which sampling step."""

    sites: int = 4
    end: datetime | None = None  # default: now, on the step
    days: float = 30
    step: timedelta = timedelta(minutes=5)

    def span(self) -> tuple[datetime, datetime]:
        end = self.end or datetime.now().astimezone()
        seconds = int(self.step.total_seconds())
        end = datetime.fromtimestamp(int(end.timestamp()) // seconds * seconds, end.tzinfo)
        return end - timedelta(days=self.days), end


def load_fleet(conn: psycopg.Connection[Any], fleet: Fleet, refresh: bool = True) -> None:
    """Load *fleet*'s history (idempotent), then refresh the aggregates bottom-up."""
    start, end = fleet.span()
    params = {"start": start, "end": end, "step": fleet.step,
              "hours": fleet.step.total_seconds() / 3600, "sites": fleet.sites}
    row = conn.execute(_ORG).fetchone()
    params["org"] = row[0] if row else None
    for statement in (_SITES, _DEVICES, _STREAMS, _TARIFFS, _CARBON, _SITE_TELEMETRY,
                      _BATTERY, _ENERGY, _PRODUCTION, _ENVIRONMENT, _ALERTS, _SPARKPLUG_NODES):
        conn.execute(statement, params)
    if not conn.execute("SELECT 1 FROM events LIMIT 1").fetchone():
        conn.execute(_EVENTS)
    conn.commit()
    if refresh:
        refresh_aggregates(conn)


def refresh_aggregates(conn: psycopg.Connection[Any]) -> None:
    """Refresh every continuous aggregate over all time, lower levels first."""
    autocommit = conn.autocommit
    conn.autocommit = True  # refresh_continuous_aggregate cannot run in a transaction
    try:
        refresh(conn, *_AGGREGATES)
    finally:
        conn.autocommit = autocommit


def refresh(conn: psycopg.Connection[Any], *views: str) -> None:
    """Refresh continuous aggregates fully, in order, waiting out a policy job.

    The server's own refresh policies may be refreshing the same aggregate at
    that moment, which makes a manual refresh fail with LockNotAvailable.
    *conn* must be in autocommit mode.
    """
    for view in views:
        for attempt in range(50):
            try:
                conn.execute(f"CALL refresh_continuous_aggregate('{view}', NULL, NULL)")
                break
            except psycopg.errors.LockNotAvailable:
                if attempt == 49:
                    raise
                time.sleep(0.2)
