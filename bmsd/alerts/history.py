"""Evaluate a device's history again when its readings arrive out of time order.

The alerts stored for a device are those of its readings taken in time order,
however they arrived: a gateway flushing its buffer after an outage, two
members of a shared group committing one device's burst in either order, a
broker redelivering after a crash. `evaluate` sends every reading newer than
its device's mark down the quick path; a batch that holds a reading not newer
(``Plan.late``) has that device's history evaluated again here, from the
stored readings, in the batch's transaction:

1. *start*: the oldest such reading, no earlier than the mark less
   ``[alerts] reevaluate_window_s`` (older readings are stored and counted in
   ``bmsd_readings_not_evaluated_total``, not evaluated);
2. *the state just before it*, from what is stored, which is right for all
   readings before *start* (they were evaluated in order, or by an earlier
   pass of this): the alerts raised before it and not resolved before it, and
   each rule's ``for_s`` condition, which is the run of breaching readings
   just before *start* (a run shorter than ``for_s``: the readings from the
   one before *start* less the longest ``for_s`` hold it);
3. *the replay*: the stored readings from *start* on (this batch's among
   them, and other members' committed ones: the batch holds its devices' row
   locks, so members take turns and the last sees every reading) through the
   same `evaluate_device` as the quick path;
4. *the difference* between the alerts the replay implies and those stored
   from *start* on, matched by rule and ``triggered_at``: an alert missing
   is inserted (``raised_late`` when it is stored more than ``late_after_s``
   after the reading that raised it); one whose raise or resolution moved is
   revised; one the readings no longer imply is withdrawn (deleted, with an
   ``alert_withdrawn`` event keeping it). Each is announced (publish.py).

What this leaves as it was: DEVICE_OFFLINE, which is about when bmsd heard
from a device, not about its readings' times; and the thresholds used for
the replay are today's (a safety limit changed since is applied to the
history replayed).

Everything here is pure but for `Source`, which the store (store.py) answers
from the database and the tests from memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from bmsd.alerts import evaluate
from bmsd.alerts.checks import Check, device_checks, prepared
from bmsd.alerts.evaluate import FLAG_CATEGORIES, FLAGGED_STREAMS
from bmsd.alerts.rules import Rule
from bmsd.alerts.state import OFFLINE, Alert, DeviceInfo, Pending, Plan, State, StreamRows


@dataclass(frozen=True, slots=True)
class Fetched:
    """A device's stored readings of one stream from *since* on, in time order, as
    (time, device, *fields) tuples; *since* None: from its first reading (none
    is stored before the start asked for)."""

    rows: Sequence[Sequence[Any]]
    since: datetime | None


class Source(Protocol):
    """Where the history comes from: the database (store.py), or memory in tests."""

    def readings(self, stream: str, fields: Sequence[str],
                 wanted: Mapping[int, tuple[datetime, datetime, float]]) -> dict[int, Fetched]:
        """Return, for each device of *wanted* (start, floor, back_s), its stored readings
        from back_s seconds before its last reading before start (none at or after
        floor: from its first reading)."""
        ...  # pragma: no cover

    def alerts(self, device_ids: Sequence[int], since: datetime) -> list[Alert]:
        """Return the stored alerts of these devices (but DEVICE_OFFLINE) not resolved
        before *since*."""
        ...  # pragma: no cover


@dataclass
class Replayed:
    """What replaying one device's stream from a start changes."""

    raised: list[Alert] = field(default_factory=list)  # new, open at the end
    closed: list[Alert] = field(default_factory=list)  # new, resolved already
    revised: list[Alert] = field(default_factory=list)
    withdrawn: list[Alert] = field(default_factory=list)
    pending: Pending = field(default_factory=dict)


def decide(state: State, rules: Mapping[str, tuple[Rule, ...]],
           readings: Mapping[str, StreamRows], seen: Mapping[int, datetime], source: Source,
           now: datetime, window_s: float, late_after_s: float) -> Plan:
    """Return what a batch changes: `evaluate.evaluate`, then the history of each device
    with a reading out of order evaluated again, and new alerts stamped late or not."""
    plan = evaluate.evaluate(state, rules, readings, seen)
    if plan.late:
        revise(plan, state, rules, readings, source, window_s)
    late_after = timedelta(seconds=late_after_s)
    for alert in (*plan.triggered, *plan.raised_and_cleared):
        alert.raised_late = now - alert.raised > late_after
    return plan


def revise(plan: Plan, state: State, rules: Mapping[str, tuple[Rule, ...]],
           readings: Mapping[str, StreamRows], source: Source, window_s: float) -> None:
    """Evaluate again, from *source*, the history of each device and stream in
    ``plan.late``, and add what changes to *plan*."""
    window = timedelta(seconds=window_s)
    starts: dict[str, dict[int, tuple[datetime, datetime, float]]] = {}
    for (device_id, stream), oldest in plan.late.items():
        floor = plan.marks[(device_id, stream)] - window
        if oldest < floor:
            table = readings[stream]
            plan.unevaluated[stream] = plan.unevaluated.get(stream, 0) + sum(
                1 for row in table.rows if row[table.device] == device_id
                and row[table.time] < floor)
        back = max((rule.for_s for rule in rules.get(stream, ())), default=0.0)
        starts.setdefault(stream, {})[device_id] = (max(oldest, floor), floor, back)
    for stream, wanted in starts.items():
        fields = evaluate.fields_read(stream, rules)
        fetched = source.readings(stream, fields, wanted)
        stored: dict[int, list[Alert]] = {}
        for alert in source.alerts(sorted(wanted), min(s for s, _, _ in wanted.values())):
            stored.setdefault(alert.device.id, []).append(alert)
        prepared_checks = [prepared(rule) for rule in rules.get(stream, ())]
        for device_id, (start, floor, _) in wanted.items():
            device = state.devices[device_id]
            checks = device_checks(prepared_checks, device, state.safety_limits.get(device_id))
            args = (device, stream, checks, fields, start, stored.get(device_id, []))
            got = replay(*args, fetched[device_id], complete=False)
            if got is None:  # the for_s conditions at start lie further back
                again = source.readings(stream, fields, {device_id: (start, floor, window_s)})
                got = replay(*args, again[device_id], complete=True)
            assert got is not None  # complete: what is unknown is taken as absent
            _merge(plan, (device_id, stream), got)
    plan.replays = {stream: len(wanted) for stream, wanted in starts.items()}


def _merge(plan: Plan, key: tuple[int, str], got: Replayed) -> None:
    plan.triggered.extend(got.raised)
    plan.resolved.extend(got.closed)
    plan.raised_and_cleared.extend(got.closed)
    plan.revised.extend(got.revised)
    plan.withdrawn.extend(got.withdrawn)
    plan.pending[key] = got.pending


def replay(device: DeviceInfo, stream: str, checks: list[Check], fields: Sequence[str],
           start: datetime, stored: Iterable[Alert], fetched: Fetched,
           complete: bool) -> Replayed | None:
    """Return what replaying *device*'s *fetched* readings from *start* changes in its
    *stored* alerts, or None if the ``for_s`` conditions at *start* lie before the
    readings fetched (unless *complete*: they are then taken as absent)."""
    table = StreamRows(fetched.rows, 0, 1, {name: 2 + i for i, name in enumerate(fields)})
    flagged = stream in FLAGGED_STREAMS
    codes = {check.rule.code for check in checks}
    mine = [a for a in stored if a.code != OFFLINE and (
        a.code in codes or (flagged and a.category in FLAG_CATEGORIES))]
    # Open just before start: raised before it, not resolved before it.
    opened = {(device.id, a.code): replace(a) for a in mine if a.raised < start
              and (a.resolved_at is None or a.resolved_at >= start)}
    before = [row for row in table.rows if row[0] < start]
    pending = _pending_at(before, checks, {code for _, code in opened}, device,
                          table.fields, None if complete else fetched.since)
    if pending is None:
        return None
    own_flags = ({code: None for (_, code), a in opened.items()
                  if a.category in FLAG_CATEGORIES} if flagged else None)
    sub = Plan()
    series = [row for row in table.rows if row[0] >= start]
    if series:
        flags_at = evaluate.flag_positions(stream, table.fields)
        evaluate.evaluate_device(sub, opened, pending, device, series, table, checks,
                                 own_flags, flags_at)
    implied = {(a.code, a.triggered_at): a for a in (*sub.resolved, *opened.values())}
    out = Replayed(pending=pending)
    for alert in mine:
        if alert.resolved_at is not None and alert.resolved_at < start:
            continue
        now = implied.pop((alert.code, alert.triggered_at), None)
        if now is None:
            out.withdrawn.append(alert)
        elif (now.raised, now.resolved_at, now.value, now.threshold) != (
                alert.raised, alert.resolved_at, alert.value, alert.threshold):
            status = "resolved" if now.resolved_at else (
                "active" if alert.status == "resolved" else alert.status)
            out.revised.append(replace(now, id=alert.id, status=status,
                                       raised_late=alert.raised_late))
    for alert in implied.values():
        (out.raised if alert.resolved_at is None else out.closed).append(alert)
    return out


def _pending_at(before: Sequence[Sequence[Any]], checks: list[Check], open_codes: set[str],
                device: DeviceInfo, fields: Mapping[str, int],
                since: datetime | None) -> Pending | None:
    """Return each rule's ``for_s`` condition after the readings *before* (in time order,
    fetched from *since*; None: from as far back as needed), or None if one may
    have begun before them."""
    facts = {"nominal_grid_frequency_hz": device.nominal_grid_frequency_hz}
    named = fields.items()
    values = [{name: row[i] for name, i in named} for row in reversed(before)]
    pending: Pending = {}
    for check in checks:
        code = check.rule.code
        if code in open_codes:
            continue
        run: tuple[datetime, float] | None = None
        last: datetime | None = None
        for row, got in zip(reversed(before), values, strict=True):
            value = check.value(got, facts)
            if value is None or value != value:
                continue
            if last is None:
                last = row[0]
            if not check.breached(value, check.threshold):
                break
            run = (row[0], float(value))
        else:
            # No reading before start ended the run: it began within the readings
            # fetched if they go back ``for_s`` from its last one (a run that long
            # would have raised an alert).
            if since is not None and (
                    last is None or since > last - timedelta(seconds=check.rule.for_s)):
                return None
        if run is not None:
            pending[code] = run
    return pending
