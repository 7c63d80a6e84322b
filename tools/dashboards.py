"""Define the Grafana dashboards, and write them as the JSON Grafana provisions.

``python -m tools.dashboards grafana/dashboards`` writes one file per
dashboard; a test checks the committed files match, and runs every query.

Time series read the level that suits the range, so a year never scans raw
rows: raw rows up to 2 days, the ``_1h`` aggregates up to 60 days, ``_1d``
beyond. Each level is one arm of a UNION ALL guarded by a condition on the
range alone, which PostgreSQL folds to a constant when it plans the query:
the arms that do not apply are never executed.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bmsd.alerts.rules import SEVERITIES

POSTGRES = {"type": "grafana-postgresql-datasource", "uid": "bmsd-timescaledb"}
PROMETHEUS = {"type": "prometheus", "uid": "bmsd-prometheus"}

_SPAN = "($__timeTo()::timestamptz - $__timeFrom()::timestamptz)"
RAW_RANGE = f"{_SPAN} <= interval '2 days'"
HOURLY_RANGE = f"{_SPAN} > interval '2 days' AND {_SPAN} <= interval '60 days'"
DAILY_RANGE = f"{_SPAN} > interval '60 days'"


@dataclass(frozen=True)
class Measure:
    """One plotted series: its label, from raw rows, and from an aggregate level."""

    label: str
    raw: str
    rollup: str


def mean(label: str, column: str) -> Measure:
    return Measure(label, f"avg({column})", f"sum({column}_sum) / nullif(sum({column}_n), 0)")


def low(label: str, column: str, rollup_column: str | None = None) -> Measure:
    return Measure(label, f"min({column})", f"min({rollup_column or column + '_min'})")


def high(label: str, column: str, rollup_column: str | None = None) -> Measure:
    return Measure(label, f"max({column})", f"max({rollup_column or column + '_max'})")


def tiered(table: str, where: str, measures: list[Measure]) -> str:
    """Return a time-series query reading *table*, its _1h or its _1d level by range."""
    def arm(source: str, time: str, pick: str, guard: str) -> str:
        cols = ", ".join(f'{getattr(m, pick)} AS "{m.label}"' for m in measures)
        return (f"(SELECT $__timeGroupAlias({time}, $__interval), {cols}\n"
                f"   FROM {source}\n  WHERE {where} AND $__timeFilter({time})\n"
                f"    AND {guard}\n  GROUP BY 1)")
    return "\nUNION ALL\n".join([
        arm(table, "time", "raw", RAW_RANGE),
        arm(f"{table}_1h", "bucket", "rollup", HOURLY_RANGE),
        arm(f"{table}_1d", "bucket", "rollup", DAILY_RANGE),
    ]) + "\nORDER BY 1"


# --- panels -------------------------------------------------------------------------


@dataclass
class Panel:
    title: str
    kind: str  # timeseries | stat | table | barchart
    query: str
    unit: str  # Grafana's unit id; "none" for tables whose column names carry their units
    about: str  # the panel's description (Grafana's "i"): what it shows, from where
    datasource: dict[str, str] = field(default_factory=lambda: POSTGRES)
    width: int = 12
    height: int = 8
    legend: str | None = None  # Prometheus series name

    def target(self) -> dict[str, Any]:
        if self.datasource is PROMETHEUS:
            target: dict[str, Any] = {"refId": "A", "datasource": PROMETHEUS,
                                      "expr": self.query, "range": True}
            if self.legend:
                target["legendFormat"] = self.legend
            return target
        return {"refId": "A", "datasource": POSTGRES, "editorMode": "code", "rawQuery": True,
                "format": "time_series" if self.kind == "timeseries" else "table",
                "rawSql": self.query}


def ts(title: str, query: str, unit: str, about: str) -> Panel:
    return Panel(title, "timeseries", query, unit, about)


def stat(title: str, query: str, unit: str, about: str) -> Panel:
    return Panel(title, "stat", query, unit, about, width=6, height=4)


def table(title: str, query: str, about: str, width: int = 24) -> Panel:
    return Panel(title, "table", query, "none", about, width=width)


def prom(title: str, expr: str, unit: str, about: str, legend: str | None = None) -> Panel:
    return Panel(title, "timeseries", expr, unit, about, datasource=PROMETHEUS, legend=legend)


# --- template variables --------------------------------------------------------------

_MOST_SEVERE_FIRST = ("array_position(ARRAY["
                      + ",".join(f"'{s}'" for s in reversed(SEVERITIES)) + "], a.severity)")

# The organization with the freshest readings first, as for sites.
ORGANIZATION = ("organization", "Organization",
                "SELECT o.slug FROM organizations o ORDER BY (SELECT max(d.last_seen_at)"
                " FROM devices d JOIN sites s ON s.id = d.site_id"
                " WHERE s.organization_id = o.id) DESC NULLS LAST, o.slug")


def site_variable(kind: str) -> tuple[str, str, str]:
    # The sites with the freshest readings first: the default (Grafana picks the
    # first row) is a site that shows data, not the first name in the alphabet.
    return ("site", "Site",
            "SELECT s.name AS __text, s.id AS __value FROM sites s"
            " JOIN organizations o ON o.id = s.organization_id"
            f" WHERE o.slug = '$organization' AND s.kind = '{kind}'"
            " ORDER BY (SELECT max(d.last_seen_at) FROM devices d WHERE d.site_id = s.id)"
            " DESC NULLS LAST, s.name")


def device_variable(kinds: str) -> tuple[str, str, str]:
    # A device with unresolved alerts first (what an operator opens the dashboard
    # for), then the freshest.
    return ("device", "Device",
            "SELECT d.slug AS __text, d.id AS __value FROM devices d"
            f" WHERE d.site_id = $site AND {kinds} ORDER BY (SELECT count(*) FROM alerts a"
            " WHERE a.device_id = d.id AND a.status <> 'resolved') DESC,"
            " d.last_seen_at DESC NULLS LAST, d.slug")


@dataclass
class Dashboard:
    uid: str
    title: str
    panels: list[Panel]
    variables: list[tuple[str, str, str]] = field(default_factory=list)
    time_from: str = "now-24h"

    def model(self) -> dict[str, Any]:
        panels, x, y, row_height = [], 0, 0, 0
        for n, panel in enumerate(self.panels, start=1):
            if x + panel.width > 24:
                x, y, row_height = 0, y + row_height, 0
            spec: dict[str, Any] = {
                "id": n, "type": panel.kind, "title": panel.title,
                "description": panel.about, "datasource": panel.datasource,
                "gridPos": {"x": x, "y": y, "w": panel.width, "h": panel.height},
                "targets": [panel.target()],
                "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                "options": {},
            }
            panels.append(spec)
            x += panel.width
            row_height = max(row_height, panel.height)
        variables = [{
            "name": name, "label": label, "type": "query", "datasource": POSTGRES,
            "query": query, "definition": query, "refresh": 1, "multi": False,
            "includeAll": False, "sort": 0,
        } for name, label, query in self.variables]
        return {
            "uid": self.uid, "title": self.title, "tags": ["bmsd"], "schemaVersion": 39,
            "version": 1, "editable": True, "timezone": "browser", "refresh": "30s",
            "time": {"from": self.time_from, "to": "now"},
            "templating": {"list": variables}, "panels": panels,
        }


# --- the dashboards -----------------------------------------------------------------------

_IN_ORG = ("JOIN sites s ON s.id = {alias}.site_id JOIN organizations o"
           " ON o.id = s.organization_id WHERE o.slug = '$organization'")
FLEET = Dashboard("bmsd-fleet", "bmsd / Fleet overview", variables=[ORGANIZATION], panels=[
    stat("Sites in the organization",
         "SELECT count(*) AS sites FROM sites s JOIN organizations o"
         " ON o.id = s.organization_id WHERE o.slug = '$organization'", "short",
         "Sites of the organization chosen above, registered by hand or on first sight"
         " of a topic (table sites)."),
    stat("Devices reporting (15 min)",
         "SELECT sum(devices_reporting) AS reporting FROM v_site_overview v "
         + _IN_ORG.format(alias="v"), "short",
         "Devices that sent a reading in the last 15 minutes (v_site_overview)."),
    stat("Devices silent",
         "SELECT sum(devices_silent) AS silent FROM v_site_overview v "
         + _IN_ORG.format(alias="v"), "short",
         "Registered devices with no reading for 15 minutes or more; the offline alert"
         " fires after the route's offline_after_s."),
    Panel("Rows stored per second", "stat", "sum(rate(bmsd_rows_written_total[5m]))",
          "rowsps", "Rows bmsd committed per second over 5 minutes, all tables"
          " (Prometheus: bmsd_rows_written_total).", datasource=PROMETHEUS, width=6, height=4),
    table("Unresolved alerts by severity",
          "SELECT a.severity, count(*) AS alerts FROM alerts a "
          + _IN_ORG.format(alias="a") + " AND a.status <> 'resolved'"
          " GROUP BY 1 ORDER BY " + _MOST_SEVERE_FIRST,
          "Alerts not yet resolved (open or acknowledged), most severe first.", width=8),
    table("Sites now", "SELECT v.site, v.kind, v.devices_reporting, v.devices_silent,"
                       " v.alerts_critical, v.alerts_error, v.alerts_warning,"
                       " round(v.latest_soc::numeric, 1) AS soc_percent,"
                       " v.solar_power_kw, v.grid_power_kw, v.load_power_kw"
                       " FROM v_site_overview v "
                       + _IN_ORG.format(alias="v") + " ORDER BY v.site",
          "Each site's latest state: devices reporting, unresolved alerts by severity, the"
          " site controller's last state of charge (%) and power flows (kW).", width=16),
])

_SITE_WHERE = "device_id IN (SELECT id FROM devices WHERE site_id = $site)"
SITE = Dashboard("bmsd-site", "bmsd / Site", variables=[ORGANIZATION, site_variable("site")],
                 panels=[
    ts("Power flows", tiered("site_telemetry", _SITE_WHERE, [
        mean("solar", "solar_power_kw"), mean("grid (import > 0)", "grid_power_kw"),
        mean("load", "load_power_kw"), mean("battery (charging < 0)", "battery_power_kw")]),
       "kwatt", "The site controller's power flows, averaged per interval: raw readings up to"
                " 2 days, hourly aggregates to 60 days, daily beyond."),
    ts("State of charge", tiered("site_telemetry", _SITE_WHERE, [
        mean("SoC", "battery_charge_level"),
        low("min", "battery_charge_level"), high("max", "battery_charge_level")]),
       "percent", "The site battery's state of charge: mean, lowest and highest per interval."),
    ts("Grid voltage", tiered("site_telemetry", _SITE_WHERE, [
        mean("voltage", "grid_voltage"), low("min", "grid_voltage"),
        high("max", "grid_voltage")]), "volt",
       "Voltage at the grid connection: mean, lowest and highest per interval."),
    ts("Grid frequency", tiered("site_telemetry", _SITE_WHERE, [
        mean("frequency", "grid_frequency"), low("min", "grid_frequency"),
        high("max", "grid_frequency")]), "hertz",
       "Grid frequency: mean, lowest and highest per interval; the site's nominal frequency"
       " is 50 or 60 Hz."),
    table("Energy flows per day (site-local days)",
          "SELECT * FROM site_energy_flows($site, $__timeFrom(), $__timeTo())",
          "Solar, grid import and export, load and battery energy per day of the site's own"
          " time zone, in kWh (site_energy_flows)."),
])

_PACK = "device_id = $device"
BATTERY = Dashboard("bmsd-battery", "bmsd / Battery pack",
                    variables=[ORGANIZATION, site_variable("site"),
                               device_variable("d.kind = 'battery_pack'")], panels=[
    ts("State of charge", tiered("battery_telemetry", _PACK, [mean("SoC", "soc")]),
       "percent", "The pack's state of charge, averaged per interval."),
    ts("Voltage", tiered("battery_telemetry", _PACK, [mean("voltage", "voltage")]),
       "volt", "The pack's terminal voltage, averaged per interval."),
    ts("Current (charging < 0)", tiered("battery_telemetry", _PACK,
                                        [mean("current", "current")]), "amp",
       "The pack's current, averaged per interval; negative while charging."),
    ts("Temperature", tiered("battery_telemetry", _PACK, [
        mean("pack", "temperature"), high("hottest cell", "max_cell_temperature",
                                          "cell_temperature_max")]), "celsius",
       "The pack's temperature and its hottest cell's, per interval."),
    ts("Cell voltage: lowest, highest", tiered("battery_telemetry", _PACK, [
        low("lowest cell", "min_cell_voltage", "cell_voltage_min"),
        high("highest cell", "max_cell_voltage", "cell_voltage_max")]), "volt",
       "The lowest and highest cell voltage per interval: a widening gap means imbalance."),
    ts("Cell temperature spread", tiered("battery_telemetry", _PACK, [
        mean("spread", "cell_temperature_spread"),
        high("max", "cell_temperature_spread")]), "celsius",
       "Hottest minus coolest cell, mean and highest per interval."),
    Panel("Energy charged and discharged per day", "barchart",
          "SELECT day::text AS day, charged_kwh, discharged_kwh"
          " FROM battery_daily_metrics($device, $__timeFrom(), $__timeTo()) ORDER BY day",
          "kwatth", "Energy into and out of the pack per day (battery_daily_metrics)."),
    table("Daily cycles and flags",
          "SELECT day, round(charged_kwh::numeric, 2) AS charged_kwh,"
          " round(discharged_kwh::numeric, 2) AS discharged_kwh,"
          " round(equivalent_full_cycles::numeric, 3) AS equivalent_full_cycles,"
          " partial_cycles, alarm_readings, protection_readings"
          " FROM battery_daily_metrics($device, $__timeFrom(), $__timeTo()) ORDER BY day",
          "Per day: energy in and out (kWh), equivalent full cycles, partial cycles, and how"
          " many readings carried alarm or protection flags.", width=12),
    table("Alarm flags", "SELECT * FROM battery_alarm_summary($device, $__timeFrom(),"
                         " $__timeTo())",
          "Each alarm or protection flag the pack raised in the range: readings with it,"
          " first and last seen, hours (battery_alarm_summary).", width=12),
    ts("Readings with alarm or protection flags",
       "(SELECT $__timeGroupAlias(bucket, $__interval), sum(alarm_readings) AS \"alarm\","
       " sum(protection_readings) AS \"protection\"\n   FROM battery_telemetry_1h\n"
       "  WHERE device_id = $device AND $__timeFilter(bucket)\n  GROUP BY 1)\nORDER BY 1",
       "short", "Readings per interval whose alarm or protection flags were set (hourly"
                " aggregate)."),
])

# A plant's machines: every device of the site but its meters (a main meter would
# count the machines twice) and its ambient sensors.
_MACHINE_KINDS = "kind NOT IN ('meter', 'sensor')"
_MACHINES = f"device_id IN (SELECT id FROM devices WHERE site_id = $site AND {_MACHINE_KINDS})"
_MACHINE_KINDS_OF_D = "d.kind NOT IN ('meter', 'sensor')"
FACTORY = Dashboard("bmsd-factory", "bmsd / Factory energy", time_from="now-7d",
                    variables=[ORGANIZATION, site_variable("factory"),
                               device_variable(_MACHINE_KINDS_OF_D)], panels=[
    Panel("Energy per 15 minutes (site's machines)", "barchart",
          "SELECT $__timeGroupAlias(bucket, '15m'), sum(energy_kwh_sum) AS kwh"
          f" FROM energy_readings_15m WHERE {_MACHINES} AND $__timeFilter(bucket)"
          " GROUP BY 1 ORDER BY 1", "kwatth",
          "Energy of all the site's machines per 15 minutes, the demand interval tariffs"
          " bill (energy_readings_15m)."),
    table("Summary of the site",
          "SELECT * FROM get_factory_summary($site, $__timeFrom(), $__timeTo())",
          "The site over the range: energy (kWh), cost, emissions (kg CO2), units produced,"
          " specific energy, peak 15-minute demand and devices reporting"
          " (get_factory_summary).", width=12),
    table("Peak demand of the machine",
          "SELECT * FROM calculate_peak_demand($device, $__timeFrom(), $__timeTo())",
          "The machine's highest 15-minute average demand in the range (kW) and when.",
          width=6),
    table("Specific energy (SEC)",
          "SELECT * FROM calculate_sec($device, $__timeFrom(), $__timeTo())",
          "The machine's energy (kWh) over the units its production readings counted:"
          " kWh per unit.", width=6),
    table("Cost by tariff band",
          "SELECT * FROM calculate_energy_cost($device, $__timeFrom(), $__timeTo())",
          "The machine's energy (kWh) and cost per tariff band of the site's time-of-use"
          " tariffs.", width=8),
    table("Carbon", "SELECT * FROM calculate_carbon_intensity($device, $__timeFrom(),"
                    " $__timeTo())",
          "The machine's energy, emissions (kg CO2, from the grid region's carbon factors)"
          " and emissions per unit produced.", width=8),
    table("Operating hours by state",
          "SELECT * FROM get_machine_operating_hours($device, $__timeFrom(), $__timeTo())",
          "Hours the machine spent in each state its production readings report.", width=8),
    table("Machines now", "SELECT device, machine_state, power_kw, last_seen_at,"
                          " unresolved_alerts FROM v_machines_current_status"
                          " WHERE site = (SELECT slug FROM sites WHERE id = $site)"
                          " ORDER BY device",
          "Each machine of the site: its last state, power (kW), when it last reported and"
          " its unresolved alerts (v_machines_current_status)."),
])

ALERTS = Dashboard("bmsd-alerts", "bmsd / Alerts", time_from="now-30d",
                   variables=[ORGANIZATION], panels=[
    table("Unresolved", "SELECT a.id, a.severity, a.status, s.slug AS site, d.slug AS device,"
                        " a.rule_code, a.message, a.value, a.threshold, a.triggered_at"
                        " FROM alerts a JOIN devices d ON d.id = a.device_id "
                        + _IN_ORG.format(alias="a") + " AND a.status <> 'resolved'"
                        " ORDER BY " + _MOST_SEVERE_FIRST + ", a.triggered_at",
          "Open and acknowledged alerts, most severe and oldest first; acknowledge with"
          " `bmsd alerts ack ID --by NAME`."),
    ts("Alerts raised", "SELECT $__timeGroupAlias(a.triggered_at, '1h'), a.severity AS metric,"
                        " count(*) AS alerts FROM alerts a "
                        + _IN_ORG.format(alias="a") + " AND $__timeFilter(a.triggered_at)"
                        " GROUP BY 1, 2 ORDER BY 1", "short",
       "Alerts raised per hour, by severity."),
    table("History", "SELECT a.triggered_at, a.resolved_at, a.severity, a.status,"
                     " s.slug AS site, d.slug AS device, a.rule_code, a.message,"
                     " a.acknowledged_by FROM alerts a JOIN devices d ON d.id = a.device_id "
                     + _IN_ORG.format(alias="a") + " AND $__timeFilter(a.triggered_at)"
                     " ORDER BY a.triggered_at DESC LIMIT 500",
          "The last 500 alerts raised in the range, resolved or not.", width=12),
])

INGEST = Dashboard("bmsd-ingest", "bmsd / Ingest health", time_from="now-6h", panels=[
    prom("Rows stored per second, by table",
         "sum by (table) (rate(bmsd_rows_written_total[5m]))", "rowsps",
         "Rows committed per second, by hypertable.", "{{table}}"),
    prom("Messages received per second",
         "sum(rate(bmsd_messages_received_total[5m])) or vector(0)", "reqps",
         "MQTT messages received per second, all routes.", "received"),
    prom("Dead letters per second, by reason",
         "sum by (reason) (rate(bmsd_messages_rejected_total[5m]))", "reqps",
         "Messages or readings kept in ingest_rejects per second, by reason.", "{{reason}}"),
    prom("Messages waiting for a commit", "bmsd_inflight_messages", "short",
         "Messages received and not yet acknowledged: they wait for their batch's commit.",
         "{{instance}}"),
    prom("Publish to commit, p99",
         "histogram_quantile(0.99, sum by (le) (rate(bmsd_publish_to_commit_seconds_bucket[5m])))",
         "s", "99th percentile of the time from a reading's timestamp to its commit.", "p99"),
    prom("Commit time, p99",
         "histogram_quantile(0.99, sum by (le) (rate(bmsd_commit_seconds_bucket[5m])))",
         "s", "99th percentile of one batch's database transaction.", "p99"),
    prom("Database and broker up", "bmsd_db_up or bmsd_mqtt_connected", "bool",
         "1 while bmsd reaches the database (bmsd_db_up) and the broker"
         " (bmsd_mqtt_connected).", "{{__name__}}"),
    prom("Seconds since the last commit", "time() - bmsd_last_commit_timestamp_seconds",
         "s", "Grows while nothing is committed: idle, or stuck (see the alerts).",
         "{{instance}}"),
    prom("Database errors per second, by kind", "sum by (kind) (rate(bmsd_db_errors_total[5m]))",
         "reqps", "Database errors per second, by kind; each batch is retried.", "{{kind}}"),
    prom("Unresolved fleet alerts, by severity", "sum by (severity) (bmsd_alerts_unresolved)",
         "short", "Alerts not yet resolved, fleet-wide, by severity.", "{{severity}}"),
    # Policies by their effect, not their jobs' status (sql/200; docs/schema.md,
    # "Are the policies working?"): the lag now, from the database, and its history.
    table("TimescaleDB policies: how far behind what they promise",
          "SELECT object, policy, round(behind_s) AS behind_s, round(allowed_s) AS allowed_s,"
          " behind_s > allowed_s AS overdue, detail FROM policy_health"
          " ORDER BY behind_s > allowed_s DESC, behind_s DESC, object, policy",
          "Each compression, retention, refresh and late-data policy: how far behind it is"
          " (s), what its schedule allows (s), overdue first (view policy_health).", width=12),
    table("Sparkplug edge nodes",
          "SELECT group_id, edge_node, bool_or(online) FILTER (WHERE device = '') AS online,"
          " count(*) FILTER (WHERE device <> '' AND online) AS devices_online,"
          " count(*) FILTER (WHERE device <> '') AS devices,"
          " max(last_birth_at) FILTER (WHERE device = '') AS last_birth,"
          " max(last_death_at) FILTER (WHERE device = '') AS last_death"
          " FROM sparkplug_nodes GROUP BY 1, 2 ORDER BY 3, 1, 2",
          "Each Sparkplug B edge node bmsd heard from: online or not, its devices online,"
          " its last birth and death (bmsd's receive times; table sparkplug_nodes,"
          " docs/sparkplug.md). Offline ones first.", width=12),
    prom("Policies behind, past what their schedule allows",
         "max by (object, policy) (bmsd_policy_behind_seconds)"
         " - max by (object, policy) (bmsd_policy_allowed_seconds) > 0 or vector(0)",
         "s", "Seconds past what each policy's schedule allows; 0 when all are on time.",
         "{{policy}} {{object}}"),
])

DASHBOARDS = [FLEET, SITE, BATTERY, FACTORY, ALERTS, INGEST]


# --- what Grafana sends ----------------------------------------------------------------
# The frontend replaces template variables and $__interval; the PostgreSQL
# data source then expands its macros (Grafana's
# pkg/tsdb/grafana-postgresql-datasource/macros.go, TimescaleDB enabled):
# $__timeFilter(c) -> c BETWEEN '<from>' AND '<to>', $__timeFrom() and
# $__timeTo() -> the quoted instants (RFC 3339, UTC), $__timeGroup(c, i) ->
# time_bucket('<seconds>s',c), and $__timeGroupAlias the same AS "time".
# The tests and bench/dashboards.py run every query this way.

# Grafana picks $__interval as range / max data points, rounded to a nice step.
_STEPS = [(s, f"{s}s") for s in (1, 5, 10, 15, 30)] + \
         [(m * 60, f"{m}m") for m in (1, 5, 10, 15, 30)] + \
         [(h * 3600, f"{h}h") for h in (1, 3, 6, 12)] + [(86400, "1d"), (7 * 86400, "7d")]
_MACRO = re.compile(r"\$__(\w+)\(([^)]*)\)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def interval_for(start: datetime, end: datetime, max_points: int = 1000) -> str:
    seconds = (end - start).total_seconds() / max_points
    return next((name for step, name in _STEPS if step >= seconds), "7d")


def _seconds(interval: str) -> float:
    interval = interval.strip().strip("'\"")
    return float(interval[:-1]) * _UNITS[interval[-1]]


def _instant(at: datetime) -> str:
    """Return *at* as Grafana writes it: RFC 3339 in UTC."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def expand(sql: str, start: datetime, end: datetime, variables: dict[str, str]) -> str:
    """Return *sql* as Grafana would send it for the range [start, end]."""
    values = {**variables, "__interval": interval_for(start, end)}
    for name in sorted(values, key=len, reverse=True):
        sql = sql.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    frm, to = _instant(start), _instant(end)

    def macro(match: re.Match[str]) -> str:
        name, args = match.group(1), [a.strip() for a in match.group(2).split(",")]
        if name == "timeFilter":
            return f"{args[0]} BETWEEN '{frm}' AND '{to}'"
        if name == "timeFrom":
            return f"'{frm}'"
        if name == "timeTo":
            return f"'{to}'"
        if name in ("timeGroup", "timeGroupAlias"):
            group = f"time_bucket('{_seconds(args[1]):.3f}s',{args[0]})"
            return group + (' AS "time"' if name == "timeGroupAlias" else "")
        raise AssertionError(f"a macro this test does not know: $__{name}")

    return _MACRO.sub(macro, sql)


def render(dashboard: Dashboard) -> str:
    return json.dumps(dashboard.model(), indent=2, ensure_ascii=False) + "\n"


def main(folder: str) -> None:
    for dashboard in DASHBOARDS:
        (Path(folder) / f"{dashboard.uid}.json").write_text(render(dashboard))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "grafana/dashboards")
