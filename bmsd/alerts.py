"""Evaluate alert rules on every reading as it is written, and keep the alert lifecycle.

Readings are evaluated per device and stream in device-time order. A reading
not newer than the newest one already evaluated (late, or redelivered after
a crash) is stored but changes no alert: that high-water mark is kept in
``alert_marks`` with the batch, so it survives a restart.

`AlertEngine.plan` runs inside the batch's transaction: it decides the
changes against the committed state, writes them (alerts, events, marks)
with the readings, and returns them; `AlertEngine.apply` makes them the
committed state once the transaction has committed, and publishes them on
MQTT. If the transaction rolls back, the plan is simply dropped.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog
from psycopg.types.json import Jsonb

from bmsd.metrics import Metrics
from bmsd.payloads import MODELS
from bmsd.rules import DERIVED, LIMITS, SEVERITIES, Rule
from bmsd.writer import Batch

log = structlog.get_logger("bmsd.alerts")

PROTECTION_FLAGS = {"over_voltage": "PROTECTION_OVER_VOLTAGE",
                    "under_voltage": "PROTECTION_UNDER_VOLTAGE",
                    "over_current": "PROTECTION_OVER_CURRENT",
                    "over_temperature": "PROTECTION_OVER_TEMPERATURE"}
OFFLINE = "DEVICE_OFFLINE"
FLAG_CATEGORIES = ("battery_protection", "device_alarm")

_DEVICES = """
    SELECT d.id, d.site_id, s.slug, d.slug, d.kind, s.nominal_grid_frequency_hz
      FROM devices d JOIN sites s ON s.id = d.site_id WHERE d.id = ANY(%s)
"""
_LIMITS = f"""
    SELECT DISTINCT ON (device_id) device_id, {", ".join(LIMITS)}
      FROM safety_constraints
     WHERE active AND effective_from <= now()
       AND (effective_until IS NULL OR effective_until > now())
     ORDER BY device_id, effective_from DESC
"""
_OPEN_ALERTS = """
    SELECT a.id, a.device_id, a.rule_code, a.severity, a.category, a.title, a.message, a.value,
           a.threshold, a.triggered_at, a.status
      FROM alerts a WHERE a.status <> 'resolved'
"""
_MARKS = "SELECT device_id, stream, evaluated_until, pending FROM alert_marks"
_LAST_SEEN = "SELECT id, last_seen_at FROM devices WHERE last_seen_at IS NOT NULL"
_INSERT_ALERT = """
    INSERT INTO alerts (site_id, device_id, rule_code, severity, category, title, message,
                        value, threshold, triggered_at)
    VALUES (%(site_id)s, %(device_id)s, %(code)s, %(severity)s, %(category)s, %(title)s,
            %(message)s, %(value)s, %(threshold)s, %(at)s)
    RETURNING id
"""
_RESOLVE_ALERT = """
    UPDATE alerts SET status = 'resolved', resolved_at = %(at)s
     WHERE device_id = %(device_id)s AND rule_code = %(code)s AND status <> 'resolved'
    RETURNING id, status
"""
_EVENT = """
    INSERT INTO events (time, site_id, device_id, kind, message, details)
    VALUES (%(at)s, %(site_id)s, %(device_id)s, %(kind)s, %(message)s, %(details)s)
"""
_UPSERT_MARKS = """
    INSERT INTO alert_marks (device_id, stream, evaluated_until, pending)
    SELECT * FROM unnest(%s::integer[], %s::text[], %s::timestamptz[], %s::jsonb[])
    ON CONFLICT (device_id, stream) DO UPDATE
       SET evaluated_until = excluded.evaluated_until, pending = excluded.pending
"""


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What rules and messages need to know about a device."""

    id: int
    site_id: int
    site: str
    slug: str
    kind: str
    nominal_grid_frequency_hz: int


@dataclass(slots=True)
class Alert:
    """An unresolved alert, or one changing state."""

    device: DeviceInfo
    code: str
    severity: str
    category: str
    title: str
    message: str
    value: float | None
    threshold: float | None
    triggered_at: datetime
    id: int | None = None
    status: str = "active"
    resolved_at: datetime | None = None

    def document(self) -> dict[str, Any]:
        """Return the JSON document published on MQTT."""
        return {
            "id": self.id, "site": self.device.site, "device": self.device.slug,
            "code": self.code, "severity": self.severity, "category": self.category,
            "status": self.status, "title": self.title, "message": self.message,
            "value": self.value, "threshold": self.threshold,
            "triggered_at": self.triggered_at.isoformat(),
            "resolved_at": self.resolved_at.isoformat() if self.resolved_at else None,
        }


@dataclass
class Plan:
    """The alert changes of one batch, written but not yet committed."""

    triggered: list[Alert] = field(default_factory=list)
    resolved: list[Alert] = field(default_factory=list)
    raised_and_cleared: list[Alert] = field(default_factory=list)  # within this batch
    marks: dict[tuple[int, str], datetime] = field(default_factory=dict)
    pending: dict[tuple[int, str], dict[str, tuple[datetime, float]]] = field(
        default_factory=dict)
    seen: dict[int, datetime] = field(default_factory=dict)
    intervals: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0


class AlertEngine:
    """The alert state of all devices, and the rules that change it."""

    def __init__(self, rules: Iterable[Rule], metrics: Metrics,
                 publish: Callable[[str, bytes, bool], None] | None = None,
                 topic_prefix: str | None = "bmsd/alerts",
                 offline_after_s: Mapping[str, int | None] | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.set_rules(rules)
        self._metrics = metrics
        self._publish = publish
        self._prefix = topic_prefix
        self._offline_after = dict(offline_after_s or {})
        self._clock = clock
        self._devices: dict[int, DeviceInfo] = {}
        self._limits: dict[int, dict[str, float]] = {}
        self._open: dict[tuple[int, str], Alert] = {}
        self._marks: dict[tuple[int, str], datetime] = {}
        self._pending: dict[tuple[int, str], dict[str, tuple[datetime, float]]] = {}
        self._last_seen: dict[int, datetime] = {}
        self._interval: dict[int, float] = {}
        self._streams_of: dict[int, set[str]] = {}

    # --- configuration --------------------------------------------------------------

    def set_rules(self, rules: Iterable[Rule]) -> None:
        """Use these rules from now on; state of unchanged codes is kept."""
        self.rules = tuple(rules)
        self._by_stream: dict[str, tuple[Rule, ...]] = {}
        for rule in self.rules:
            self._by_stream[rule.stream] = (*self._by_stream.get(rule.stream, ()), rule)

    def load(self, conn: psycopg.Connection[Any]) -> None:
        """Rebuild the state from the database (at start)."""
        with conn.transaction():
            self.load_limits(conn)
            rows = conn.execute(_OPEN_ALERTS).fetchall()
            self._remember_devices(conn, {int(r[1]) for r in rows})
            self._open = {}
            for (id_, device_id, code, severity, category, title, message, value, threshold,
                 triggered_at, status) in rows:
                self._open[(device_id, code)] = Alert(
                    self._devices[device_id], code, severity, category, title or code,
                    message, value, threshold, triggered_at, id=id_, status=status)
            self._marks, self._pending = {}, {}
            for device_id, stream, until, pending in conn.execute(_MARKS):
                self._marks[(device_id, stream)] = until
                self._pending[(device_id, stream)] = {
                    code: (datetime.fromisoformat(p["since"]), float(p["value"]))
                    for code, p in (pending or {}).items()}
            self._last_seen = dict(conn.execute(_LAST_SEEN).fetchall())
        self._update_gauges()
        log.info("alerts_loaded", unresolved=len(self._open), rules=len(self.rules),
                 devices_with_limits=len(self._limits))

    def load_limits(self, conn: psycopg.Connection[Any]) -> None:
        """Read the active per-device safety limits."""
        self._limits = {
            int(row[0]): {name: float(v) for name, v in zip(LIMITS, row[1:], strict=True)
                          if v is not None}
            for row in conn.execute(_LIMITS)}

    def _remember_devices(self, conn: psycopg.Connection[Any], ids: set[int]) -> None:
        missing = [i for i in ids if i not in self._devices]
        if missing:
            for row in conn.execute(_DEVICES, (missing,)):
                self._devices[row[0]] = DeviceInfo(*row)

    # --- evaluation (inside the batch's transaction) ----------------------------------------

    def plan(self, conn: psycopg.Connection[Any], batch: Batch) -> Plan:
        """Evaluate *batch*, write the alert changes it causes, and return them."""
        started = time.perf_counter()
        plan = Plan()
        device_ids = {key[0] for rows in batch.rows.values() for key in rows}
        self._remember_devices(conn, device_ids)
        opened = dict(self._open)  # this batch's view; committed state stays untouched
        for stream, rows in batch.rows.items():
            if not rows:
                continue
            rules = self._by_stream.get(stream, ())
            if not rules and stream != "battery_telemetry":
                # Nothing to evaluate per reading: only each device's newest one
                # moves its mark and ends a DEVICE_OFFLINE.
                newest: dict[int, datetime] = {}
                for device_id, when in rows:
                    if when > newest.get(device_id, when.min.replace(tzinfo=UTC)):
                        newest[device_id] = when
                for device_id, when in newest.items():
                    key = (device_id, stream)
                    mark = self._marks.get(key)
                    if mark is None or when > mark:
                        plan.marks[key] = when
                        self._offline_resolves(plan, opened, self._devices[device_id], when)
                continue
            columns = MODELS[stream].columns
            for (device_id, when), row in sorted(rows.items(), key=lambda kv: kv[0]):
                key = (device_id, stream)
                mark = plan.marks.get(key) or self._marks.get(key)
                if mark is not None and when <= mark:
                    continue  # late or redelivered: stored, but changes nothing
                if mark is not None and device_id not in plan.intervals:
                    gap = (when - mark).total_seconds()
                    old = self._interval.get(device_id)
                    plan.intervals[device_id] = gap if old is None else 0.8 * old + 0.2 * gap
                plan.marks[key] = when
                device = self._devices[device_id]
                values = dict(zip(columns, row.values[2:-1], strict=True))
                pending = plan.pending.setdefault(key, dict(self._pending.get(key, {})))
                self._offline_resolves(plan, opened, device, when)
                for rule in rules:
                    if rule.applies(device.kind, device.site):
                        self._threshold(plan, opened, pending, rule, device, values, when)
                if stream == "battery_telemetry":
                    self._flags(plan, opened, device, values, when)
        for device_id, when in batch.seen.items():
            plan.seen[device_id] = when
        self._write(conn, plan)
        plan.seconds = time.perf_counter() - started
        return plan

    def _threshold(self, plan: Plan, opened: dict[tuple[int, str], Alert],
                   pending: dict[str, tuple[datetime, float]], rule: Rule, device: DeviceInfo,
                   values: Mapping[str, Any], when: datetime) -> None:
        derive = DERIVED.get(rule.stream, {}).get(rule.value)
        value = derive(values, {"nominal_grid_frequency_hz": device.nominal_grid_frequency_hz}
                       ) if derive else values.get(rule.value)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        threshold, clear = rule.thresholds(self._limits.get(device.id))
        key = (device.id, rule.code)
        alert = opened.get(key)
        if alert is not None:
            if rule.cleared(value, clear):
                self._resolve(plan, opened, alert, when)
            return
        if not rule.breached(value, threshold):
            pending.pop(rule.code, None)
            return
        since, first_value = pending.get(rule.code, (when, value))
        if (when - since).total_seconds() < rule.for_s:
            pending[rule.code] = (since, first_value)
            return
        pending.pop(rule.code, None)
        message = rule.message.format(value=value, threshold=threshold, site=device.site,
                                      device=device.slug, title=rule.title)
        self._trigger(plan, opened, Alert(device, rule.code, rule.severity, rule.category,
                                          rule.title, message, float(value), threshold, since))

    def _flags(self, plan: Plan, opened: dict[tuple[int, str], Alert], device: DeviceInfo,
               values: Mapping[str, Any], when: datetime) -> None:
        carried: dict[str, tuple[str, str, str]] = {}
        for flag, code in PROTECTION_FLAGS.items():
            if values.get(flag):
                carried[code] = ("critical", "battery_protection",
                                 f"protection tripped: {flag.replace('_', '-')}")
        for flag in values.get("alarm_flags") or ():
            carried[flag] = ("warning", "device_alarm", f"device alarm {flag}")
        for (device_id, code), alert in list(opened.items()):
            if device_id == device.id and alert.category in FLAG_CATEGORIES \
                    and code not in carried:
                self._resolve(plan, opened, alert, when)
        for code, (severity, category, title) in carried.items():
            if (device.id, code) not in opened:
                message = f"{device.slug} at {device.site}: {title}"
                self._trigger(plan, opened, Alert(device, code, severity, category, title,
                                                  message, None, None, when))

    def _offline_resolves(self, plan: Plan, opened: dict[tuple[int, str], Alert],
                          device: DeviceInfo, when: datetime) -> None:
        alert = opened.get((device.id, OFFLINE))
        if alert is not None:
            self._resolve(plan, opened, alert, when)

    def _trigger(self, plan: Plan, opened: dict[tuple[int, str], Alert], alert: Alert) -> None:
        opened[(alert.device.id, alert.code)] = alert
        plan.triggered.append(alert)

    def _resolve(self, plan: Plan, opened: dict[tuple[int, str], Alert], alert: Alert,
                 when: datetime) -> None:
        del opened[(alert.device.id, alert.code)]
        if any(a is alert for a in plan.triggered):  # raised and cleared within one batch
            plan.triggered = [a for a in plan.triggered if a is not alert]
            alert.resolved_at, alert.status = max(when, alert.triggered_at), "resolved"
            plan.resolved.append(alert)
            plan.raised_and_cleared.append(alert)
            return
        resolved = Alert(alert.device, alert.code, alert.severity, alert.category,
                         alert.title, alert.message, alert.value, alert.threshold,
                         alert.triggered_at, id=alert.id, status="resolved",
                         resolved_at=max(when, alert.triggered_at))
        plan.resolved.append(resolved)

    # --- offline detection ---------------------------------------------------------------

    def plan_offline(self, conn: psycopg.Connection[Any], now: datetime,
                     watching_since: datetime) -> Plan:
        """Raise DEVICE_OFFLINE for devices silent longer than their limit.

        *watching_since* is when bmsd last (re)connected and caught up: no device
        is declared offline for a silence that bmsd itself may have caused.
        """
        plan = Plan()
        self._remember_devices(conn, set(self._last_seen))
        for device_id, seen in self._last_seen.items():
            if (device_id, OFFLINE) in self._open or device_id not in self._devices:
                continue
            limit = self.offline_limit_s(device_id)
            silent_since = max(seen, watching_since)
            if (now - silent_since).total_seconds() <= limit:
                continue
            device = self._devices[device_id]
            message = (f"{device.slug} at {device.site}: no reading since {seen.isoformat()}"
                       f" (limit {limit:.0f} s)")
            plan.triggered.append(Alert(device, OFFLINE, "warning", "connectivity",
                                        "device offline", message,
                                        (now - seen).total_seconds(), limit, now))
        self._write(conn, plan)
        return plan

    def offline_limit_s(self, device_id: int) -> float:
        """Return how long a device may stay silent: the route's setting, else ten
        times its usual interval, at least a minute (five minutes until known)."""
        configured = [limit for stream in self._streams_of.get(device_id, ())
                      if (limit := self._offline_after.get(stream))]
        if configured:
            return float(max(configured))
        interval = self._interval.get(device_id)
        return 300.0 if interval is None else max(60.0, 10 * interval)

    # --- writing and applying -------------------------------------------------------------

    def _insert(self, conn: psycopg.Connection[Any], alert: Alert) -> None:
        row = conn.execute(_INSERT_ALERT, {
            "site_id": alert.device.site_id, "device_id": alert.device.id,
            "code": alert.code, "severity": alert.severity, "category": alert.category,
            "title": alert.title, "message": alert.message, "value": alert.value,
            "threshold": alert.threshold, "at": alert.triggered_at}).fetchone()
        assert row is not None
        alert.id = int(row[0])
        self._event(conn, alert, "alert_triggered", alert.triggered_at)

    def _write(self, conn: psycopg.Connection[Any], plan: Plan) -> None:
        # Resolutions first: a batch may clear an alert and raise the same rule
        # again, and at most one unresolved alert per device and rule may exist.
        for alert in plan.resolved:
            if alert.id is None:  # raised and cleared within this batch
                self._insert(conn, alert)
            conn.execute(_RESOLVE_ALERT, {"device_id": alert.device.id, "code": alert.code,
                                          "at": alert.resolved_at})
            self._event(conn, alert, "alert_resolved", alert.resolved_at or alert.triggered_at)
        for alert in plan.triggered:
            self._insert(conn, alert)
        if plan.marks:
            keys = list(plan.marks)
            conn.execute(_UPSERT_MARKS, (
                [k[0] for k in keys], [k[1] for k in keys], [plan.marks[k] for k in keys],
                [Jsonb({code: {"since": since.isoformat(), "value": value}
                        for code, (since, value) in plan.pending.get(k, {}).items()})
                 for k in keys]))

    def _event(self, conn: psycopg.Connection[Any], alert: Alert, kind: str,
               at: datetime) -> None:
        verb = "raised" if kind == "alert_triggered" else "resolved"
        conn.execute(_EVENT, {
            "at": at, "site_id": alert.device.site_id, "device_id": alert.device.id,
            "kind": kind, "message": f"{alert.code} {verb}: {alert.message}",
            "details": Jsonb({"alert_id": alert.id, "rule_code": alert.code,
                              "severity": alert.severity, "value": alert.value})})

    def apply(self, plan: Plan) -> None:
        """Make a committed plan the current state, and publish its changes."""
        for key, when in plan.marks.items():
            self._marks[key] = when
            self._streams_of.setdefault(key[0], set()).add(key[1])
        for key, pending in plan.pending.items():
            self._pending[key] = pending
        self._interval.update(plan.intervals)
        for device_id, when in plan.seen.items():
            if when > self._last_seen.get(device_id, when.min.replace(tzinfo=UTC)):
                self._last_seen[device_id] = when
        # Resolutions first, as in _write: a batch may resolve an alert and raise
        # the same rule again; the new one must stay open.
        for alert in plan.resolved:
            self._open.pop((alert.device.id, alert.code), None)
            self._metrics.alert_transitions.labels(alert.code, "resolved").inc()
            log.info("alert_resolved", code=alert.code, site=alert.device.site,
                     device=alert.device.slug, id=alert.id)
            self._announce(alert)
        for alert in plan.raised_and_cleared:
            self._metrics.alert_transitions.labels(alert.code, "triggered").inc()
        for alert in plan.triggered:
            self._open[(alert.device.id, alert.code)] = alert
            self._metrics.alert_transitions.labels(alert.code, "triggered").inc()
            log.warning("alert_triggered", code=alert.code, site=alert.device.site,
                        device=alert.device.slug, severity=alert.severity, id=alert.id,
                        message=alert.message)
            self._announce(alert)
        if plan.marks or plan.triggered or plan.resolved:
            self._metrics.alert_seconds.observe(plan.seconds)
        self._update_gauges()

    def republish(self) -> int:
        """Publish the retained message of every unresolved alert (after a restart)."""
        for alert in self._open.values():
            self._announce(alert)
        return len(self._open)

    def _announce(self, alert: Alert) -> None:
        if self._publish is None or self._prefix is None:
            return
        topic = f"{self._prefix}/{alert.device.site}/{alert.device.slug}/{alert.code}"
        payload = json.dumps(alert.document()).encode()
        if alert.status == "resolved":
            self._publish(topic, payload, False)
            self._publish(topic, b"", True)  # clears the retained message
        else:
            self._publish(topic, payload, True)

    def _update_gauges(self) -> None:
        counts = dict.fromkeys(SEVERITIES, 0)
        for alert in self._open.values():
            counts[alert.severity] = counts.get(alert.severity, 0) + 1
        for severity, n in counts.items():
            self._metrics.alerts_unresolved.labels(severity).set(n)

    @property
    def unresolved(self) -> int:
        return len(self._open)

