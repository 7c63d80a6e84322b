"""The alert tables and readings as the database keeps them, in memory: the history's
`Source`, `AlertStore.write` and `AlertStore.refresh` as plain Python, so that
members of a shared group, batches and commit orders can be drawn by the
hundred without a database (tests/test_history.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from bmsd.alerts import evaluate, history
from bmsd.alerts.rules import Rule
from bmsd.alerts.state import Alert, DeviceInfo, Pending, State, StreamRows

Reading = tuple[str, int, datetime, dict[str, Any]]  # stream, device, time, fields


@dataclass
class Memory:
    """Stored readings, alerts and marks."""

    readings: dict[tuple[int, str], dict[datetime, dict[str, Any]]] = field(default_factory=dict)
    alerts: dict[int, Alert] = field(default_factory=dict)
    marks: dict[tuple[int, str], tuple[datetime, Pending]] = field(default_factory=dict)
    withdrawn: list[Alert] = field(default_factory=list)
    next_id: int = 1

    # --- the history's Source --------------------------------------------------------

    def readings_of(self, stream: str, fields: Sequence[str],
                    wanted: Mapping[int, tuple[datetime, datetime, float]]
                    ) -> dict[int, history.Fetched]:
        out = {}
        for device_id, (start, floor, back_s) in wanted.items():
            stored = sorted(self.readings.get((device_id, stream), {}).items())
            before = [t for t, _ in stored if floor <= t < start]
            since = None if not before else before[-1] - timedelta(seconds=back_s)
            out[device_id] = history.Fetched(
                [(t, device_id, *[f.get(n) for n in fields]) for t, f in stored
                 if t >= (start if since is None else since)], since)
        return out

    def alerts_of(self, device_ids: Sequence[int], since: datetime) -> list[Alert]:
        return [replace(a) for a in self.alerts.values()
                if a.device.id in device_ids and a.code != evaluate.OFFLINE
                and (a.resolved_at is None or a.resolved_at >= since)]

    # --- AlertStore.write and refresh ---------------------------------------------------

    def write(self, plan: evaluate.Plan) -> None:
        for alert in plan.withdrawn:
            self.withdrawn.append(self.alerts.pop(_id(alert)))
        for alert in plan.revised:
            if alert.resolved_at is not None:
                self.alerts[_id(alert)] = replace(alert)
        for alert in plan.resolved:
            if alert.id is None:
                self._insert(alert)
            else:
                stored = self.alerts[alert.id]
                assert stored.status != "resolved", "resolved twice"
                self.alerts[alert.id] = replace(stored, status="resolved",
                                                resolved_at=alert.resolved_at)
        for alert in plan.triggered:
            self._insert(alert)
        for alert in plan.revised:
            if alert.resolved_at is None:
                self.alerts[_id(alert)] = replace(alert)
        unresolved = [(a.device.id, a.code) for a in self.alerts.values()
                      if a.status != "resolved"]
        assert len(unresolved) == len(set(unresolved)), "two unresolved alerts of one rule"
        for key, mark in plan.marks.items():
            self.marks[key] = (mark, dict(plan.pending.get(key, {})))

    def _insert(self, alert: Alert) -> None:
        alert.id = self.next_id
        self.next_id += 1
        self.alerts[alert.id] = replace(alert)

    def refresh(self, state: State, ids: set[int]) -> None:
        for table in (state.open, state.pending):
            for key in [k for k in table if k[0] in ids]:
                del table[key]
        for alert in self.alerts.values():
            if alert.device.id in ids and alert.status != "resolved":
                state.open[(alert.device.id, alert.code)] = replace(alert)
            if alert.device.id in ids:
                changed = max(alert.raised, alert.resolved_at or alert.raised)
                if changed > state.changed.get(alert.device.id, changed - timedelta(1)):
                    state.changed[alert.device.id] = changed
        for key, (mark, pending) in self.marks.items():
            if key[0] in ids:
                if key not in state.marks or mark > state.marks[key]:
                    state.marks[key] = mark
                state.pending[key] = dict(pending)


class _Bound:
    """A `Memory` seen as a `history.Source`."""

    def __init__(self, memory: Memory) -> None:
        self._memory = memory

    def readings(self, stream: str, fields: Sequence[str],
                 wanted: Mapping[int, tuple[datetime, datetime, float]]
                 ) -> dict[int, history.Fetched]:
        return self._memory.readings_of(stream, fields, wanted)

    def alerts(self, device_ids: Sequence[int], since: datetime) -> list[Alert]:
        return self._memory.alerts_of(device_ids, since)


def _id(alert: Alert) -> int:
    assert alert.id is not None
    return alert.id


@dataclass
class Member:
    """One bmsd: its own state, over the shared memory."""

    memory: Memory
    devices: Mapping[int, DeviceInfo]
    rules: Mapping[str, tuple[Rule, ...]]
    shared: bool
    now: datetime
    window_s: float = 86_400.0
    late_after_s: float = 1_800.0
    state: State = field(init=False)

    def __post_init__(self) -> None:
        self.state = State(devices=dict(self.devices))

    def commit(self, readings: Sequence[Reading]) -> evaluate.Plan:
        """Store, evaluate and commit one batch (as Ingestor.flush with AlertEngine.plan)."""
        for stream, device, when, fields in readings:
            self.memory.readings.setdefault((device, stream), {}).setdefault(when, fields)
        if self.shared:
            self.memory.refresh(self.state, {device for _, device, _, _ in readings})
        streams: dict[str, list[tuple[int, datetime, dict[str, Any]]]] = {}
        seen: dict[int, datetime] = {}
        for stream, device, when, fields in readings:
            streams.setdefault(stream, []).append((device, when, fields))
            seen[device] = max(when, seen.get(device, when))
        tables = {stream: _table(rows) for stream, rows in streams.items()}
        plan = history.decide(self.state, self.rules, tables, seen, _Bound(self.memory),
                              self.now, self.window_s, self.late_after_s)
        self.memory.write(plan)
        evaluate.apply(self.state, plan)
        return plan


def _table(readings: list[tuple[int, datetime, dict[str, Any]]]) -> StreamRows:
    names = list(dict.fromkeys(name for _, _, fields in readings for name in fields))
    rows = [(when, device, *[fields.get(name) for name in names])
            for device, when, fields in readings]
    return StreamRows(rows, 0, 1, {name: 2 + i for i, name in enumerate(names)})


def table_of(memory: Memory) -> list[tuple[Any, ...]]:
    """Return the stored alerts as a user compares them."""
    return sorted((a.device.id, a.code, a.triggered_at, a.raised, a.resolved_at, a.status,
                   a.value, a.raised_late) for a in memory.alerts.values())
