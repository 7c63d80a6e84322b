"""Define the Grafana dashboards, and write them as the JSON Grafana provisions.

``python -m bmsd.dev.dashboards grafana/dashboards`` writes one file per
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
    datasource: dict[str, str] = field(default_factory=lambda: POSTGRES)
    unit: str | None = None
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


def ts(title: str, query: str, unit: str | None = None) -> Panel:
    return Panel(title, "timeseries", query, unit=unit)


def stat(title: str, query: str, unit: str | None = None) -> Panel:
    return Panel(title, "stat", query, unit=unit, width=6, height=4)


def table(title: str, query: str, width: int = 24) -> Panel:
    return Panel(title, "table", query, width=width)


def prom(title: str, expr: str, unit: str | None = None, legend: str | None = None) -> Panel:
    return Panel(title, "timeseries", expr, datasource=PROMETHEUS, unit=unit, legend=legend)


# --- template variables --------------------------------------------------------------

_MOST_SEVERE_FIRST = ("array_position(ARRAY["
                      + ",".join(f"'{s}'" for s in reversed(SEVERITIES)) + "], a.severity)")

ORGANIZATION = ("organization", "Organization", "SELECT slug FROM organizations ORDER BY slug")


def site_variable(kind: str | None) -> tuple[str, str, str]:
    only = f" AND s.kind = '{kind}'" if kind else ""
    return ("site", "Site",
            "SELECT s.name AS __text, s.id AS __value FROM sites s"
            " JOIN organizations o ON o.id = s.organization_id"
            f" WHERE o.slug = '$organization'{only} ORDER BY s.name")


def device_variable(kinds: str) -> tuple[str, str, str]:
    return ("device", "Device",
            "SELECT slug AS __text, id AS __value FROM devices"
            f" WHERE site_id = $site AND kind IN ({kinds}) ORDER BY slug")


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
                "datasource": panel.datasource,
                "gridPos": {"x": x, "y": y, "w": panel.width, "h": panel.height},
                "targets": [panel.target()],
                "fieldConfig": {"defaults": {"unit": panel.unit} if panel.unit else {},
                                "overrides": []},
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

FLEET = Dashboard("bmsd-fleet", "bmsd / Fleet overview", variables=[ORGANIZATION], panels=[
    stat("Sites", "SELECT count(*) AS sites FROM sites s JOIN organizations o"
                  " ON o.id = s.organization_id WHERE o.slug = '$organization'"),
    stat("Devices reporting (15 min)",
         "SELECT sum(devices_reporting) AS reporting FROM v_site_overview v"
         " JOIN sites s ON s.id = v.site_id JOIN organizations o ON o.id = s.organization_id"
         " WHERE o.slug = '$organization'"),
    stat("Devices silent",
         "SELECT sum(devices_silent) AS silent FROM v_site_overview v"
         " JOIN sites s ON s.id = v.site_id JOIN organizations o ON o.id = s.organization_id"
         " WHERE o.slug = '$organization'"),
    Panel("Rows stored per second", "stat", "sum(rate(bmsd_rows_written_total[5m]))",
          datasource=PROMETHEUS, unit="rowsps", width=6, height=4),
    table("Unresolved alerts by severity",
          "SELECT a.severity, count(*) AS alerts FROM alerts a"
          " JOIN sites s ON s.id = a.site_id JOIN organizations o ON o.id = s.organization_id"
          " WHERE o.slug = '$organization' AND a.status <> 'resolved'"
          " GROUP BY 1 ORDER BY " + _MOST_SEVERE_FIRST, width=8),
    table("Sites", "SELECT v.site, v.kind, v.devices_reporting, v.devices_silent,"
                   " v.alerts_critical, v.alerts_error, v.alerts_warning,"
                   " round(v.latest_soc::numeric, 1) AS soc, v.solar_power_kw,"
                   " v.grid_power_kw, v.load_power_kw FROM v_site_overview v"
                   " JOIN sites s ON s.id = v.site_id"
                   " JOIN organizations o ON o.id = s.organization_id"
                   " WHERE o.slug = '$organization' ORDER BY v.site", width=16),
])

_SITE_WHERE = "device_id IN (SELECT id FROM devices WHERE site_id = $site)"
SITE = Dashboard("bmsd-site", "bmsd / Site", variables=[ORGANIZATION, site_variable("site")],
                 panels=[
    ts("Power flows", tiered("site_telemetry", _SITE_WHERE, [
        mean("solar", "solar_power_kw"), mean("grid (import > 0)", "grid_power_kw"),
        mean("load", "load_power_kw"), mean("battery (charging < 0)", "battery_power_kw")]),
       unit="kwatt"),
    ts("State of charge", tiered("site_telemetry", _SITE_WHERE, [
        mean("SoC", "battery_charge_level"),
        low("min", "battery_charge_level"), high("max", "battery_charge_level")]),
       unit="percent"),
    ts("Grid voltage", tiered("site_telemetry", _SITE_WHERE, [
        mean("voltage", "grid_voltage"), low("min", "grid_voltage"),
        high("max", "grid_voltage")]), unit="volt"),
    ts("Grid frequency", tiered("site_telemetry", _SITE_WHERE, [
        mean("frequency", "grid_frequency"), low("min", "grid_frequency"),
        high("max", "grid_frequency")]), unit="hertz"),
    table("Energy flows per day (site-local days)",
          "SELECT * FROM site_energy_flows($site, $__timeFrom(), $__timeTo())"),
])

_PACK = "device_id = $device"
BATTERY = Dashboard("bmsd-battery", "bmsd / Battery pack",
                    variables=[ORGANIZATION, site_variable("site"),
                               device_variable("'battery_pack'")], panels=[
    ts("State of charge", tiered("battery_telemetry", _PACK, [mean("SoC", "soc")]),
       unit="percent"),
    ts("Voltage", tiered("battery_telemetry", _PACK, [mean("voltage", "voltage")]),
       unit="volt"),
    ts("Current (charging < 0)", tiered("battery_telemetry", _PACK,
                                        [mean("current", "current")]), unit="amp"),
    ts("Temperature", tiered("battery_telemetry", _PACK, [
        mean("pack", "temperature"), high("hottest cell", "max_cell_temperature",
                                          "cell_temperature_max")]), unit="celsius"),
    ts("Cell voltage: lowest, highest", tiered("battery_telemetry", _PACK, [
        low("lowest cell", "min_cell_voltage", "cell_voltage_min"),
        high("highest cell", "max_cell_voltage", "cell_voltage_max")]), unit="volt"),
    ts("Cell temperature spread", tiered("battery_telemetry", _PACK, [
        mean("spread", "cell_temperature_spread"),
        high("max", "cell_temperature_spread")]), unit="celsius"),
    Panel("Energy charged and discharged per day", "barchart",
          "SELECT day::text AS day, charged_kwh, discharged_kwh"
          " FROM battery_daily_metrics($device, $__timeFrom(), $__timeTo()) ORDER BY day",
          unit="kwatth"),
    table("Daily cycles and flags",
          "SELECT day, round(charged_kwh::numeric, 2) AS charged_kwh,"
          " round(discharged_kwh::numeric, 2) AS discharged_kwh,"
          " round(equivalent_full_cycles::numeric, 3) AS equivalent_full_cycles,"
          " partial_cycles, alarm_readings, protection_readings"
          " FROM battery_daily_metrics($device, $__timeFrom(), $__timeTo()) ORDER BY day",
          width=12),
    table("Alarm flags", "SELECT * FROM battery_alarm_summary($device, $__timeFrom(),"
                         " $__timeTo())", width=12),
    ts("Readings with alarm or protection flags",
       "(SELECT $__timeGroupAlias(bucket, $__interval), sum(alarm_readings) AS \"alarm\","
       " sum(protection_readings) AS \"protection\"\n   FROM battery_telemetry_1h\n"
       "  WHERE device_id = $device AND $__timeFilter(bucket)\n  GROUP BY 1)\nORDER BY 1"),
])

_MACHINES = "device_id IN (SELECT id FROM devices WHERE site_id = $site AND kind <> 'meter')"
FACTORY = Dashboard("bmsd-factory", "bmsd / Factory energy", time_from="now-7d",
                    variables=[ORGANIZATION, site_variable("factory"),
                               device_variable("'machine'")], panels=[
    Panel("Energy per 15 minutes (site's machines)", "barchart",
          "SELECT $__timeGroupAlias(bucket, '15m'), sum(energy_kwh_sum) AS kwh"
          f" FROM energy_readings_15m WHERE {_MACHINES} AND $__timeFilter(bucket)"
          " GROUP BY 1 ORDER BY 1", unit="kwatth"),
    table("Summary of the site",
          "SELECT * FROM get_factory_summary($site, $__timeFrom(), $__timeTo())", width=12),
    table("Peak demand of the machine",
          "SELECT * FROM calculate_peak_demand($device, $__timeFrom(), $__timeTo())", width=6),
    table("Specific energy (SEC)",
          "SELECT * FROM calculate_sec($device, $__timeFrom(), $__timeTo())", width=6),
    table("Cost by tariff band",
          "SELECT * FROM calculate_energy_cost($device, $__timeFrom(), $__timeTo())", width=8),
    table("Carbon", "SELECT * FROM calculate_carbon_intensity($device, $__timeFrom(),"
                    " $__timeTo())", width=8),
    table("Operating hours by state",
          "SELECT * FROM get_machine_operating_hours($device, $__timeFrom(), $__timeTo())",
          width=8),
    table("Machines now", "SELECT device, machine_state, power_kw, last_seen_at,"
                          " unresolved_alerts FROM v_machines_current_status"
                          " WHERE site = (SELECT slug FROM sites WHERE id = $site)"
                          " ORDER BY device"),
])

ALERTS = Dashboard("bmsd-alerts", "bmsd / Alerts", time_from="now-30d",
                   variables=[ORGANIZATION], panels=[
    table("Unresolved", "SELECT a.id, a.severity, a.status, s.slug AS site, d.slug AS device,"
                        " a.rule_code, a.message, a.value, a.threshold, a.triggered_at"
                        " FROM alerts a JOIN devices d ON d.id = a.device_id"
                        " JOIN sites s ON s.id = a.site_id"
                        " JOIN organizations o ON o.id = s.organization_id"
                        " WHERE o.slug = '$organization' AND a.status <> 'resolved'"
                        " ORDER BY " + _MOST_SEVERE_FIRST + ", a.triggered_at"),
    ts("Alerts raised", "SELECT $__timeGroupAlias(a.triggered_at, '1h'), a.severity AS metric,"
                        " count(*) AS alerts FROM alerts a JOIN sites s ON s.id = a.site_id"
                        " JOIN organizations o ON o.id = s.organization_id"
                        " WHERE o.slug = '$organization' AND $__timeFilter(a.triggered_at)"
                        " GROUP BY 1, 2 ORDER BY 1"),
    table("History", "SELECT a.triggered_at, a.resolved_at, a.severity, a.status,"
                     " s.slug AS site, d.slug AS device, a.rule_code, a.message,"
                     " a.acknowledged_by FROM alerts a JOIN devices d ON d.id = a.device_id"
                     " JOIN sites s ON s.id = a.site_id"
                     " JOIN organizations o ON o.id = s.organization_id"
                     " WHERE o.slug = '$organization' AND $__timeFilter(a.triggered_at)"
                     " ORDER BY a.triggered_at DESC LIMIT 500", width=12),
])

INGEST = Dashboard("bmsd-ingest", "bmsd / Ingest health", time_from="now-6h", panels=[
    prom("Rows stored per second, by table",
         "sum by (table) (rate(bmsd_rows_written_total[5m]))", "rowsps", "{{table}}"),
    prom("Messages received per second",
         "sum(rate(bmsd_messages_received_total[5m])) or vector(0)", "reqps", "received"),
    prom("Dead letters per second, by reason",
         "sum by (reason) (rate(bmsd_messages_rejected_total[5m]))", "reqps", "{{reason}}"),
    prom("Messages waiting for a commit", "bmsd_inflight_messages", None, "{{instance}}"),
    prom("Publish to commit, p99",
         "histogram_quantile(0.99, sum by (le) (rate(bmsd_publish_to_commit_seconds_bucket[5m])))",
         "s", "p99"),
    prom("Commit time, p99",
         "histogram_quantile(0.99, sum by (le) (rate(bmsd_commit_seconds_bucket[5m])))",
         "s", "p99"),
    prom("Database and broker up", "bmsd_db_up or bmsd_mqtt_connected", None, "{{__name__}}"),
    prom("Seconds since the last commit", "time() - bmsd_last_commit_timestamp_seconds",
         "s", "{{instance}}"),
    prom("Database errors per second, by kind", "sum by (kind) (rate(bmsd_db_errors_total[5m]))",
         "reqps", "{{kind}}"),
    prom("Unresolved fleet alerts, by severity", "sum by (severity) (bmsd_alerts_unresolved)",
         None, "{{severity}}"),
    # Policies by their effect, not their jobs' status (sql/200; README, "Are the
    # policies working?"): the lag now, from the database, and its history.
    table("TimescaleDB policies: how far behind what they promise",
          "SELECT object, policy, round(behind_s) AS behind_s, round(allowed_s) AS allowed_s,"
          " behind_s > allowed_s AS overdue, detail FROM policy_health"
          " ORDER BY behind_s > allowed_s DESC, behind_s DESC, object, policy", width=12),
    prom("Policies behind, past what their schedule allows",
         "max by (object, policy) (bmsd_policy_behind_seconds)"
         " - max by (object, policy) (bmsd_policy_allowed_seconds) > 0 or vector(0)",
         "s", "{{policy}} {{object}}"),
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
