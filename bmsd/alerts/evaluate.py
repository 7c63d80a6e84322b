"""Decide what a batch of readings does to the alerts: pure functions, no I/O.

`evaluate` takes the committed `State`, the batch's readings and the rules,
and returns a `Plan`: alerts to raise and resolve, the new high-water marks
and pending ``for_s`` conditions. `plan_offline` decides which devices went
silent. `apply` makes a committed plan the state. The store (store.py)
writes a plan inside the batch's transaction; the publisher (publish.py)
announces it after the commit.

Semantics, per device and stream in device-time order:

- a reading not newer than the newest one already evaluated (late, or
  redelivered after a crash) changes nothing;
- a condition must hold for the rule's ``for_s`` before it raises one alert
  (``triggered_at`` = the reading that started it); reaching the clear
  threshold resolves it: values oscillating between the two give one alert;
- a protection or alarm flag raises an alert at once, resolved by the first
  later reading without it;
- any reading of a device resolves its DEVICE_OFFLINE;
- within one batch, an alert may be raised and cleared, and a rule may be
  cleared and raised again: resolutions come first.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter, sub
from typing import Any

from bmsd.alerts.rules import DERIVED, OPS, Derived, Rule
from bmsd.streams import SPECS

PROTECTION_FLAGS = {"over_voltage": "PROTECTION_OVER_VOLTAGE",
                    "under_voltage": "PROTECTION_UNDER_VOLTAGE",
                    "over_current": "PROTECTION_OVER_CURRENT",
                    "over_temperature": "PROTECTION_OVER_TEMPERATURE"}
_FLAG_FIELDS = (*PROTECTION_FLAGS, "alarm_flags")
OFFLINE = "DEVICE_OFFLINE"
FLAG_CATEGORIES = ("battery_protection", "device_alarm")
#: The streams whose readings carry protection and alarm flags.
FLAGGED_STREAMS = frozenset(spec.name for spec in SPECS if spec.pack)
_EPOCH = datetime.min.replace(tzinfo=UTC)


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


Pending = dict[str, tuple[datetime, float]]  # rule code -> (since, first value)


@dataclass
class Plan:
    """The alert changes of one batch, decided but not yet committed."""

    triggered: list[Alert] = field(default_factory=list)
    resolved: list[Alert] = field(default_factory=list)
    raised_and_cleared: list[Alert] = field(default_factory=list)  # within this batch
    marks: dict[tuple[int, str], datetime] = field(default_factory=dict)
    pending: dict[tuple[int, str], Pending] = field(default_factory=dict)
    seen: dict[int, datetime] = field(default_factory=dict)
    intervals: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def empty(self) -> bool:
        return not (self.marks or self.triggered or self.resolved)


@dataclass
class State:
    """The committed alert state: what plans are decided against."""

    devices: dict[int, DeviceInfo] = field(default_factory=dict)
    limits: dict[int, dict[str, float]] = field(default_factory=dict)
    open: dict[tuple[int, str], Alert] = field(default_factory=dict)
    marks: dict[tuple[int, str], datetime] = field(default_factory=dict)
    pending: dict[tuple[int, str], Pending] = field(default_factory=dict)
    last_seen: dict[int, datetime] = field(default_factory=dict)
    interval: dict[int, float] = field(default_factory=dict)
    streams_of: dict[int, set[str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Readings:
    """A batch's readings of one stream, as tuples, and where in them their time, their
    device id and each field that evaluating them reads sit (no field: only their
    times matter). No two readings have one device and time.

    Tuples, not a dict per reading: a batch's readings are checked column by
    column, and most of them only that way (see `evaluate`).
    """

    rows: Sequence[Sequence[Any]]
    time: int
    device: int
    fields: Mapping[str, int] = field(default_factory=dict)


def by_stream(rules: Iterable[Rule]) -> dict[str, tuple[Rule, ...]]:
    """Return the rules of each stream."""
    out: dict[str, tuple[Rule, ...]] = {}
    for rule in rules:
        out[rule.stream] = (*out.get(rule.stream, ()), rule)
    return out


def fields_read(stream: str, rules: Mapping[str, tuple[Rule, ...]]) -> tuple[str, ...]:
    """Return the fields of *stream* that evaluating its readings reads (none: only
    their times matter)."""
    names = dict.fromkeys(_prepared(rule).source for rule in rules.get(stream, ()))
    if stream in FLAGGED_STREAMS:
        names.update(dict.fromkeys(_FLAG_FIELDS))
    return tuple(names)


def needs_fields(stream: str, rules: Mapping[str, tuple[Rule, ...]]) -> bool:
    """Return whether evaluating *stream* reads its readings' fields, not just their times."""
    return bool(rules.get(stream)) or stream in FLAGGED_STREAMS


def evaluate(state: State, rules: Mapping[str, tuple[Rule, ...]],
             readings: Mapping[str, Readings], seen: Mapping[int, datetime]) -> Plan:
    """Return what *readings* (by stream) change, against the committed *state* (left
    untouched).

    Every device of *readings* must be in ``state.devices``.
    """
    plan = Plan()
    opened = dict(state.open)  # this batch's view
    # Each device's open flag alerts, in opening order: a reading resolves the
    # ones it no longer carries without scanning every open alert of the fleet.
    flagged_open: dict[int, dict[str, None]] = {}
    for (device_id, code), alert in opened.items():
        if alert.category in FLAG_CATEGORIES:
            flagged_open.setdefault(device_id, {})[code] = None
    for stream, table in readings.items():
        if not table.rows:
            continue
        at = table.time
        if not needs_fields(stream, rules):
            # Nothing to evaluate per reading: only each device's newest one
            # moves its mark and ends a DEVICE_OFFLINE.
            newest: dict[int, datetime] = {}
            for row in table.rows:
                device_id, when = row[table.device], row[at]
                if when > newest.get(device_id, _EPOCH):
                    newest[device_id] = when
            for device_id, when in newest.items():
                key = (device_id, stream)
                mark = state.marks.get(key)
                if mark is None or when > mark:
                    plan.marks[key] = when
                    _offline_resolves(plan, opened, state.devices[device_id], when)
            continue
        flagged = stream in FLAGGED_STREAMS
        flags_at = [i for name in _FLAG_FIELDS
                    if (i := table.fields.get(name)) is not None] if flagged else []
        prepared = [_prepared(rule) for rule in rules.get(stream, ())]
        live: list[tuple[DeviceInfo, list[Sequence[Any]]]] = []  # devices with new readings
        for device_id, series in _series(table):
            key = (device_id, stream)
            mark = state.marks.get(key)  # one series per device and stream
            if mark is not None:
                if series[0][at] <= mark:  # late or redelivered: stored, but changes nothing
                    series = [row for row in series if row[at] > mark]
                    if not series:
                        continue
                if device_id not in plan.intervals:
                    gap = (series[0][at] - mark).total_seconds()
                    old = state.interval.get(device_id)
                    plan.intervals[device_id] = gap if old is None else 0.8 * old + 0.2 * gap
            plan.marks[key] = series[-1][at]
            plan.pending[key] = dict(state.pending.get(key, {}))
            device = state.devices[device_id]
            _offline_resolves(plan, opened, device, series[0][at])
            live.append((device, series))
        # The common case: a device with nothing open or pending, none of whose
        # readings breaches a rule or carries a flag: nothing changes. Decided
        # for all such devices of the stream at once (a batch may hold one
        # reading of each of thousands), else device by device below.
        with_alerts = {device_id for device_id, _ in opened}
        busy: list[tuple[DeviceInfo, list[Sequence[Any]]]] = []
        calm: list[tuple[DeviceInfo, list[Sequence[Any]]]] = []
        for item in live:
            device_id = item[0].id
            (busy if device_id in with_alerts or plan.pending[(device_id, stream)]
             else calm).append(item)
        if calm and _quiet(prepared, calm, state.limits, table.fields, flags_at):
            live = busy
        for device, series in live:
            device_id = device.id
            key = (device_id, stream)
            pending = plan.pending[key]
            facts = {"nominal_grid_frequency_hz": device.nominal_grid_frequency_hz}
            checks = _checks(prepared, device, state.limits.get(device_id))
            own_flags = flagged_open.setdefault(device_id, {}) if flagged else {}
            if (not pending and not own_flags
                    and not any((device_id, check.rule.code) in opened for check in checks)
                    and not _breaches(checks, series, table.fields, facts)
                    and not any(any(map(itemgetter(i), series)) for i in flags_at)):
                continue
            names = table.fields.items()
            for row in series:
                when = row[at]
                fields = {name: row[i] for name, i in names}
                for check in checks:
                    value = check.value(fields, facts)
                    if value is None or value != value:  # absent, or NaN
                        continue
                    _threshold(plan, opened, pending, check, device, value, when)
                if flagged:
                    _flags(plan, opened, own_flags, device, fields, when)
    plan.seen.update(seen)
    return plan


def _quiet(prepared: list[_Check], devices: list[tuple[DeviceInfo, list[Sequence[Any]]]],
           limits: Mapping[int, Mapping[str, float]], fields: Mapping[str, int],
           flags_at: list[int]) -> bool:
    """Return whether no reading of *devices* (each with its new readings) breaches a
    rule at the device's thresholds or carries a flag.

    The readings are checked together, in as few groups as their thresholds
    allow: the rules' own thresholds (every rule of the stream, whether it
    watches the device or not: a breach only sends the devices to the exact
    check) for devices of each nominal grid frequency, a device's own
    thresholds where it has safety limits.
    """
    groups: dict[tuple[int, int | None], list[Sequence[Any]]] = {}
    for device, series in devices:
        own = device.id if limits.get(device.id) else None
        rows = groups.get((device.nominal_grid_frequency_hz, own))
        if rows is None:
            groups[(device.nominal_grid_frequency_hz, own)] = list(series)
        else:
            rows += series
    owners = {device.id: device for device, _ in devices}
    for (nominal, own), rows in groups.items():
        if any(any(map(itemgetter(i), rows)) for i in flags_at):
            return False
        checks = prepared if own is None else _checks(prepared, owners[own], limits[own])
        if _breaches(checks, rows, fields, {"nominal_grid_frequency_hz": nominal}):
            return False
    return True


def _series(table: Readings) -> list[tuple[int, list[Sequence[Any]]]]:
    """Return each device's readings in time order, devices in id order."""
    out: defaultdict[int, list[Sequence[Any]]] = defaultdict(list)
    device = table.device
    for row in table.rows:
        out[row[device]].append(row)
    when = itemgetter(table.time)
    for series in out.values():
        series.sort(key=when)
    return sorted(out.items(), key=_FIRST)


_FIRST = itemgetter(0)


def _breaches(checks: Iterable[_Check], series: Sequence[Sequence[Any]],
              fields: Mapping[str, int], facts: Mapping[str, Any]) -> bool:
    """Return whether any reading of *series* (tuples, with *fields* where in them each
    field sits) breaches the threshold of any of *checks*.

    The operators are monotonic, so comparing the highest value (lowest, for
    ``<`` and ``<=``) decides for all readings at once; a field is read once
    for all the checks that use it (a battery's cell arrays feed five).
    """
    columns: dict[str, list[Any]] = {}  # a field's values in the series
    reductions: dict[tuple[str, Any], list[Any]] = {}  # max, min, ... of each value

    def reduced(name: str, of: Callable[[Any], float]) -> list[Any]:
        values = reductions.get((name, of))
        if values is None:
            values = reductions[(name, of)] = list(map(of, columns[name]))
        return values

    for check in checks:
        name = check.source
        column = columns.get(name)
        if column is None:
            at = fields.get(name)
            column = columns[name] = [] if at is None else [
                v for row in series if (v := row[at]) is not None and v == v and v != []]
        if not column:
            continue
        derive = check.derive
        if derive is None:
            values = column
        elif derive.of is None:
            assert derive.of_device is not None
            values = [derive.of_device(x, facts) for x in column]
        elif derive.less is None:
            values = reduced(name, derive.of)
        else:  # a spread: both reductions are likely wanted by other checks too
            values = list(map(sub, reduced(name, derive.of), reduced(name, derive.less)))
        extreme = _EXTREME[check.upward](values)
        if extreme != extreme:  # a derived NaN: max and min return it only when it comes first
            extreme = _EXTREME[check.upward]((v for v in values if v == v), default=None)
        if extreme is not None and check.breached(extreme, check.threshold):
            return True
    return False


_EXTREME: dict[bool, Any] = {True: max, False: min}  # by check.upward


@dataclass(frozen=True, slots=True)
class _Check:
    """A rule made ready for one device: its value, its operator and thresholds."""

    rule: Rule
    value: Callable[[Mapping[str, Any], Mapping[str, Any]], Any]  # (fields, device facts)
    source: str  # the stored field it reads
    derive: Derived | None  # how the value is computed from that field; None: it is the value
    breached: Callable[[float, float], bool]
    upward: bool  # breached above the threshold (> or >=), else below
    threshold: float
    clear: float


def _prepared(rule: Rule) -> _Check:
    """Return *rule* as a check at its own thresholds (once per rule and batch)."""
    derive = DERIVED.get(rule.stream, {}).get(rule.value)
    value, source = ((_field_reader(rule.value), rule.value) if derive is None
                     else (derive, derive.source))
    return _Check(rule, value, source, derive, OPS[rule.op], rule.op[0] == ">",
                  *rule.thresholds(None))


def _field_reader(name: str) -> Callable[[Mapping[str, Any], Mapping[str, Any]], Any]:
    return lambda fields, _facts: fields.get(name)


def _checks(prepared: Iterable[_Check], device: DeviceInfo,
            limits: Mapping[str, float] | None) -> list[_Check]:
    """Return the *prepared* checks that watch *device*, at its thresholds (once per
    device and batch)."""
    out = []
    for check in prepared:
        rule = check.rule
        if not rule.applies(device.kind, device.site):
            continue
        if limits and rule.limit is not None:  # else: the rule's own thresholds
            check = _Check(rule, check.value, check.source, check.derive, check.breached,
                           check.upward, *rule.thresholds(limits))
        out.append(check)
    return out


def _threshold(plan: Plan, opened: dict[tuple[int, str], Alert], pending: Pending,
               check: _Check, device: DeviceInfo, value: float, when: datetime) -> None:
    rule = check.rule
    key = (device.id, rule.code)
    alert = opened.get(key)
    if alert is not None:
        if rule.cleared(value, check.clear):
            _resolve(plan, opened, alert, when)
        return
    if not check.breached(value, check.threshold):
        pending.pop(rule.code, None)
        return
    since, first_value = pending.get(rule.code, (when, value))
    if (when - since).total_seconds() < rule.for_s:
        pending[rule.code] = (since, first_value)
        return
    pending.pop(rule.code, None)
    message = rule.message.format(value=value, threshold=check.threshold, site=device.site,
                                  device=device.slug, title=rule.title)
    _trigger(plan, opened, Alert(device, rule.code, rule.severity, rule.category, rule.title,
                                 message, float(value), check.threshold, since))


def _flags(plan: Plan, opened: dict[tuple[int, str], Alert], flagged: dict[str, None],
           device: DeviceInfo, values: Mapping[str, Any], when: datetime) -> None:
    """Raise the flags a reading carries and resolve the device's others (*flagged*:
    the codes of its open flag alerts, kept up to date here)."""
    carried: dict[str, tuple[str, str, str]] = {}
    for flag, code in PROTECTION_FLAGS.items():
        if values.get(flag):
            carried[code] = ("critical", "battery_protection",
                             f"protection tripped: {flag.replace('_', '-')}")
    for flag in values.get("alarm_flags") or ():
        carried[flag] = ("warning", "device_alarm", f"device alarm {flag}")
    for code in [c for c in flagged if c not in carried]:
        del flagged[code]
        alert = opened.get((device.id, code))
        if alert is not None and alert.category in FLAG_CATEGORIES:
            _resolve(plan, opened, alert, when)
    for code, (severity, category, title) in carried.items():
        if (device.id, code) not in opened:
            message = f"{device.slug} at {device.site}: {title}"
            _trigger(plan, opened, Alert(device, code, severity, category, title, message,
                                         None, None, when))
            flagged[code] = None


def _offline_resolves(plan: Plan, opened: dict[tuple[int, str], Alert], device: DeviceInfo,
                      when: datetime) -> None:
    alert = opened.get((device.id, OFFLINE))
    if alert is not None:
        _resolve(plan, opened, alert, when)


def _trigger(plan: Plan, opened: dict[tuple[int, str], Alert], alert: Alert) -> None:
    opened[(alert.device.id, alert.code)] = alert
    plan.triggered.append(alert)


def _resolve(plan: Plan, opened: dict[tuple[int, str], Alert], alert: Alert,
             when: datetime) -> None:
    del opened[(alert.device.id, alert.code)]
    if any(a is alert for a in plan.triggered):  # raised and cleared within one batch
        plan.triggered = [a for a in plan.triggered if a is not alert]
        alert.resolved_at, alert.status = max(when, alert.triggered_at), "resolved"
        plan.resolved.append(alert)
        plan.raised_and_cleared.append(alert)
        return
    plan.resolved.append(Alert(alert.device, alert.code, alert.severity, alert.category,
                               alert.title, alert.message, alert.value, alert.threshold,
                               alert.triggered_at, id=alert.id, status="resolved",
                               resolved_at=max(when, alert.triggered_at)))


# --- silence -----------------------------------------------------------------------------


def offline_limit_s(state: State, device_id: int,
                    offline_after: Mapping[str, int | None]) -> float:
    """Return how long a device may stay silent: its routes' setting, else ten
    times its usual interval, at least a minute (five minutes until known)."""
    configured = [limit for stream in state.streams_of.get(device_id, ())
                  if (limit := offline_after.get(stream))]
    if configured:
        return float(max(configured))
    interval = state.interval.get(device_id)
    return 300.0 if interval is None else max(60.0, 10 * interval)


def plan_offline(state: State, now: datetime, watching_since: datetime,
                 offline_after: Mapping[str, int | None]) -> Plan:
    """Raise DEVICE_OFFLINE for devices silent longer than their limit.

    *watching_since* is when bmsd last (re)connected and caught up: no device
    is declared offline for a silence that bmsd itself may have caused.
    """
    plan = Plan()
    for device_id, seen in state.last_seen.items():
        if (device_id, OFFLINE) in state.open or device_id not in state.devices:
            continue
        limit = offline_limit_s(state, device_id, offline_after)
        silent_since = max(seen, watching_since)
        if (now - silent_since).total_seconds() <= limit:
            continue
        device = state.devices[device_id]
        message = (f"{device.slug} at {device.site}: no reading since {seen.isoformat()}"
                   f" (limit {limit:.0f} s)")
        plan.triggered.append(Alert(device, OFFLINE, "warning", "connectivity",
                                    "device offline", message, (now - seen).total_seconds(),
                                    limit, now))
    return plan


# --- after the commit ----------------------------------------------------------------------


def apply(state: State, plan: Plan) -> None:
    """Make a committed *plan* part of *state*."""
    for key, when in plan.marks.items():
        state.marks[key] = when
        state.streams_of.setdefault(key[0], set()).add(key[1])
    state.pending.update(plan.pending)
    state.interval.update(plan.intervals)
    for device_id, when in plan.seen.items():
        if when > state.last_seen.get(device_id, _EPOCH):
            state.last_seen[device_id] = when
    # Resolutions first: a batch may resolve an alert and raise the same rule
    # again; the new one must stay open.
    for alert in plan.resolved:
        state.open.pop((alert.device.id, alert.code), None)
    for alert in plan.triggered:
        state.open[(alert.device.id, alert.code)] = alert
