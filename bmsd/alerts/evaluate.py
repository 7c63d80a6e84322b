"""Decide what a batch of readings does to the alerts: pure functions, no I/O.

`evaluate` takes the committed `State`, the batch's readings and the rules,
and returns a `Plan`: alerts to raise and resolve, the new high-water marks
and pending ``for_s`` conditions. `plan_offline` decides which devices went
silent. `apply` makes a committed plan the state. The store (store.py)
writes a plan inside the batch's transaction; the publisher (publish.py)
announces it after the commit.

Semantics, per device and stream in device-time order:

- a reading not newer than the newest one already evaluated (late, or
  redelivered after a crash) is not evaluated here: the device's history is
  evaluated again from it (`Plan.late`, bmsd/alerts/history.py), so that the
  alerts are those of its readings in time order, however they arrived;
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
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

from bmsd.alerts.checks import Check, breaches, device_checks, prepared, quiet
from bmsd.alerts.rules import Rule
from bmsd.alerts.state import OFFLINE, Alert, DeviceInfo, Pending, Plan, State, StreamRows
from bmsd.streams import SPECS

PROTECTION_FLAGS = {"over_voltage": "PROTECTION_OVER_VOLTAGE",
                    "under_voltage": "PROTECTION_UNDER_VOLTAGE",
                    "over_current": "PROTECTION_OVER_CURRENT",
                    "over_temperature": "PROTECTION_OVER_TEMPERATURE"}
FLAG_FIELDS = (*PROTECTION_FLAGS, "alarm_flags")
FLAG_CATEGORIES = ("battery_protection", "device_alarm")
#: The streams whose readings carry protection and alarm flags.
FLAGGED_STREAMS = frozenset(spec.name for spec in SPECS if spec.pack)
_EPOCH = datetime.min.replace(tzinfo=UTC)


def by_stream(rules: Iterable[Rule]) -> dict[str, tuple[Rule, ...]]:
    """Return the rules of each stream."""
    out: dict[str, tuple[Rule, ...]] = {}
    for rule in rules:
        out[rule.stream] = (*out.get(rule.stream, ()), rule)
    return out


def fields_read(stream: str, rules: Mapping[str, tuple[Rule, ...]]) -> tuple[str, ...]:
    """Return the fields of *stream* that evaluating its readings reads (none: only
    their times matter)."""
    names = dict.fromkeys(prepared(rule).source for rule in rules.get(stream, ()))
    if stream in FLAGGED_STREAMS:
        names.update(dict.fromkeys(FLAG_FIELDS))
    return tuple(names)


def flag_positions(stream: str, fields: Mapping[str, int]) -> list[int]:
    """Return where in *stream*'s rows (*fields*: name -> position) its flags sit."""
    return [i for name in FLAG_FIELDS if (i := fields.get(name)) is not None
            ] if stream in FLAGGED_STREAMS else []


def needs_fields(stream: str, rules: Mapping[str, tuple[Rule, ...]]) -> bool:
    """Return whether evaluating *stream* reads its readings' fields, not just their times."""
    return bool(rules.get(stream)) or stream in FLAGGED_STREAMS


def evaluate(state: State, rules: Mapping[str, tuple[Rule, ...]],
             readings: Mapping[str, StreamRows], seen: Mapping[int, datetime]) -> Plan:
    """Return what *readings* (by stream) change, against the committed *state* (left
    untouched).

    Every device of *readings* must be in ``state.devices``.
    """
    plan = Plan()
    opened = dict(state.open)  # this batch's view
    flagged_open = _flagged_open(opened)
    for stream, table in readings.items():
        if not table.rows:
            continue
        if not needs_fields(stream, rules):
            _move_marks(plan, opened, state, stream, table)
            continue
        late: _Series = []
        live = _new_series(plan, opened, state, stream, table, late)
        _evaluate_stream(plan, opened, flagged_open, state, rules.get(stream, ()), stream,
                         table, live)
        if late:
            _keep_unchanged_histories(plan, state, rules.get(stream, ()), stream, table, late)
    plan.seen.update(seen)
    return plan


def _keep_unchanged_histories(plan: Plan, state: State, rules: tuple[Rule, ...], stream: str,
                              table: StreamRows, late: _Series) -> None:
    """Drop from ``plan.late`` the devices whose late readings cannot change their history:
    all quiet (no rule breached at the device's thresholds, no flag), while the device
    had no open alert, no ``for_s`` condition under way at its mark, and no alert raised
    or resolved since the oldest of them. Such a reading neither clears an alert, nor
    breaks a condition that went on to raise one, nor starts one: evaluated in time
    order, it changes nothing (tests/test_history.py checks it against that)."""
    busy = {device_id for device_id, code in state.open if code != OFFLINE}
    at = table.time
    calm = [(device, series) for device, series in late
            if device.id not in busy and not state.pending.get((device.id, stream))
            and state.changed.get(device.id, _EPOCH) < series[0][at]]
    if not calm:
        return
    checks = [prepared(rule) for rule in rules]
    flags_at = flag_positions(stream, table.fields)
    limits = state.safety_limits
    if not quiet(checks, calm, limits, table.fields, flags_at):  # then device by device
        calm = [item for item in calm if quiet(checks, [item], limits, table.fields, flags_at)]
    for device, _ in calm:
        del plan.late[(device.id, stream)]


_Series = list[tuple[DeviceInfo, list[Sequence[Any]]]]  # devices with their new readings


def _flagged_open(opened: Mapping[tuple[int, str], Alert]) -> dict[int, dict[str, None]]:
    """Each device's open flag alerts, in opening order: a reading resolves the ones it
    no longer carries without scanning every open alert of the fleet."""
    flagged: dict[int, dict[str, None]] = {}
    for (device_id, code), alert in opened.items():
        if alert.category in FLAG_CATEGORIES:
            flagged.setdefault(device_id, {})[code] = None
    return flagged


def _move_marks(plan: Plan, opened: dict[tuple[int, str], Alert], state: State,
                stream: str, table: StreamRows) -> None:
    """A stream no rule reads: only each device's newest reading moves its mark and
    ends a DEVICE_OFFLINE."""
    at = table.time
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


def _new_series(plan: Plan, opened: dict[tuple[int, str], Alert], state: State,
                stream: str, table: StreamRows, late: _Series) -> _Series:
    """Return each device's readings newer than its mark, moving the marks and the
    devices' intervals. A device with a reading not newer than its mark (late, or
    redelivered) is left out, noted in ``plan.late`` and in *late*: its history is
    evaluated again from that reading (bmsd/alerts/history.py)."""
    at = table.time
    live: _Series = []
    for device_id, series in _series(table):
        key = (device_id, stream)
        mark = state.marks.get(key)  # one series per device and stream
        device = state.devices[device_id]
        if mark is not None:
            if series[0][at] <= mark:
                plan.late[key] = series[0][at]
                late.append((device, series))
                plan.marks[key] = max(mark, series[-1][at])
                plan.pending[key] = dict(state.pending.get(key, {}))
                _offline_resolves(plan, opened, device, series[-1][at])
                continue
            if device_id not in plan.intervals:
                gap = (series[0][at] - mark).total_seconds()
                old = state.interval.get(device_id)
                plan.intervals[device_id] = gap if old is None else 0.8 * old + 0.2 * gap
        plan.marks[key] = series[-1][at]
        plan.pending[key] = dict(state.pending.get(key, {}))
        _offline_resolves(plan, opened, device, series[0][at])
        live.append((device, series))
    return live


def _evaluate_stream(plan: Plan, opened: dict[tuple[int, str], Alert],
                     flagged_open: dict[int, dict[str, None]], state: State,
                     rules: tuple[Rule, ...], stream: str, table: StreamRows,
                     live: _Series) -> None:
    """Apply *rules* (and the readings' flags) to each device's new readings."""
    flagged = stream in FLAGGED_STREAMS
    flags_at = flag_positions(stream, table.fields)
    checks = [prepared(rule) for rule in rules]
    # The common case: a device with nothing open or pending, none of whose
    # readings breaches a rule or carries a flag: nothing changes. Decided
    # for all such devices of the stream at once (a batch may hold one
    # reading of each of thousands), else device by device below.
    with_alerts = {device_id for device_id, _ in opened}
    busy: _Series = []
    calm: _Series = []
    for item in live:
        device_id = item[0].id
        (busy if device_id in with_alerts or plan.pending[(device_id, stream)]
         else calm).append(item)
    if calm and quiet(checks, calm, state.safety_limits, table.fields, flags_at):
        live = busy
    for device, series in live:
        own = device_checks(checks, device, state.safety_limits.get(device.id))
        own_flags = flagged_open.setdefault(device.id, {}) if flagged else None
        evaluate_device(plan, opened, plan.pending[(device.id, stream)], device, series,
                         table, own, own_flags, flags_at)


def evaluate_device(plan: Plan, opened: dict[tuple[int, str], Alert],
                     pending: Pending, device: DeviceInfo,
                     series: list[Sequence[Any]], table: StreamRows, checks: list[Check],
                     own_flags: dict[str, None] | None, flags_at: list[int]) -> None:
    """One device's new readings, in time order, against its checks and flags (its
    ``for_s`` conditions in *pending*, its open flag alerts in *own_flags*; both
    kept up to date here)."""
    facts = {"nominal_grid_frequency_hz": device.nominal_grid_frequency_hz}
    if (not pending and not own_flags
            and not any((device.id, check.rule.code) in opened for check in checks)
            and not breaches(checks, series, table.fields, facts)
            and not any(any(map(itemgetter(i), series)) for i in flags_at)):
        return
    at, names = table.time, table.fields.items()
    for row in series:
        when = row[at]
        fields = {name: row[i] for name, i in names}
        for check in checks:
            value = check.value(fields, facts)
            if value is None or value != value:  # absent, or NaN
                continue
            _threshold(plan, opened, pending, check, device, value, when)
        if own_flags is not None:
            _flags(plan, opened, own_flags, device, fields, when)


def _series(table: StreamRows) -> list[tuple[int, list[Sequence[Any]]]]:
    """Return each device's readings in time order, devices in id order."""
    out: defaultdict[int, list[Sequence[Any]]] = defaultdict(list)
    device = table.device
    for row in table.rows:
        out[row[device]].append(row)
    when = itemgetter(table.time)
    for series in out.values():
        series.sort(key=when)
    return sorted(out.items(), key=itemgetter(0))


def _threshold(plan: Plan, opened: dict[tuple[int, str], Alert], pending: Pending,
               check: Check, device: DeviceInfo, value: float, when: datetime) -> None:
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
                                 message, float(value), check.threshold, since,
                                 raised_at=when))


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
                                         None, None, when, raised_at=when))
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
                               resolved_at=max(when, alert.triggered_at),
                               raised_at=alert.raised_at, raised_late=alert.raised_late))


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
        if ((device_id, OFFLINE) in state.open or device_id not in state.devices
                or device_id in state.managed):
            continue
        limit = offline_limit_s(state, device_id, offline_after)
        silent_since = max(seen, watching_since)
        if (now - silent_since).total_seconds() <= limit:
            continue
        device = state.devices[device_id]
        message = (f"{device.slug} at {device.site}: no reading since {seen.isoformat()}"
                   f" (limit {limit:.0f} s)")
        plan.triggered.append(Alert.offline(device, message, (now - seen).total_seconds(),
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
    for alert in (*plan.resolved, *plan.withdrawn,
                  *(a for a in plan.revised if a.resolved_at is not None)):
        key = (alert.device.id, alert.code)
        now_open = state.open.get(key)
        if now_open is not None and now_open.id == alert.id:
            del state.open[key]
    for alert in (*plan.triggered, *(a for a in plan.revised if a.resolved_at is None)):
        state.open[(alert.device.id, alert.code)] = alert
    for alert in (*plan.triggered, *plan.resolved, *plan.revised, *plan.withdrawn):
        if alert.code != OFFLINE:
            changed = max(alert.raised, alert.resolved_at or alert.raised)
            if changed > state.changed.get(alert.device.id, _EPOCH):
                state.changed[alert.device.id] = changed
