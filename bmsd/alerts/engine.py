"""The alert engine: evaluate (pure), store (in the batch's transaction), publish (after it).

The ingestor calls `AlertEngine.plan` inside the transaction that writes a
batch's readings, and `AlertEngine.apply` once that transaction committed;
if it rolled back, the plan is simply dropped. The daemon calls the offline
check, the limits refresh, the rules reload and the republication at start.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog

from bmsd.alerts import evaluate, history
from bmsd.alerts.publish import AlertPublisher, Publish
from bmsd.alerts.rules import Rule
from bmsd.alerts.state import OFFLINE, Alert, Plan, State, StreamRows
from bmsd.alerts.store import AlertStore
from bmsd.batch import Batch, Row
from bmsd.metrics import Metrics
from bmsd.streams import SPECS

log = structlog.get_logger("bmsd.alerts")


class AlertEngine:
    """The alert state of all devices, the rules that change it, and where changes go."""

    def __init__(self, rules: Iterable[Rule], metrics: Metrics, publish: Publish | None = None,
                 topic_prefix: str | None = "bmsd/alerts",
                 offline_after_s: Mapping[str, int | None] | None = None,
                 shared: bool = False, reevaluate_window_s: float = 21_600.0,
                 late_after_s: float = 300.0) -> None:
        self._digits: dict[str, Mapping[str, int]] = {}
        self.set_rules(rules)
        self._window_s = reevaluate_window_s
        self._late_after_s = late_after_s
        # A member of a shared group: other members change the same devices.
        self._shared = shared
        self.state = State()
        self._store = AlertStore()
        self._publisher = AlertPublisher(metrics, publish, topic_prefix)
        self._offline_after = dict(offline_after_s or {})

    def stored_as(self, tables: Mapping[str, str]) -> None:
        """Evaluate readings as they are stored in *tables* (by stream): a stream kept
        as integers (sql/190) at the precision kept, which is what a later pass over
        its stored history reads (bmsd/alerts/history.py)."""
        self._digits = {spec.name: spec.model.digits for spec in SPECS
                        if tables.get(spec.name) == spec.scaled_table}
        self.set_rules(self.rules)

    def set_rules(self, rules: Iterable[Rule]) -> None:
        """Use these rules from now on; state of unchanged codes is kept."""
        self.rules = tuple(rules)
        self._by_stream = evaluate.by_stream(self.rules)
        # Where in each stream's rows sit the fields its rules and flags read.
        self._fields = {
            spec.name: Row.positions(spec.model.columns, names) for spec in SPECS
            if (names := evaluate.fields_read(spec.name, self._by_stream))}
        digits = self._digits
        self._rounding = {
            stream: rounding for stream, at in self._fields.items()
            if (rounding := tuple((i, 10 ** digits[stream][name]) for name, i in at.items()
                                  if name in digits.get(stream, {})))}

    @property
    def unresolved(self) -> int:
        return len(self.state.open)

    def load(self, conn: psycopg.Connection[Any]) -> None:
        """Rebuild the state from the database (at start)."""
        self.state = self._store.load(conn)
        self._publisher.count(self.state)
        log.info("alerts_loaded", unresolved=len(self.state.open), rules=len(self.rules),
                 devices_with_limits=len(self.state.safety_limits))

    def load_limits(self, conn: psycopg.Connection[Any]) -> None:
        """Read the active per-device safety limits again."""
        self.state.safety_limits = self._store.safety_limits(conn)

    def plan(self, conn: psycopg.Connection[Any], batch: Batch) -> Plan:
        """Decide and write, in the caller's transaction, what *batch* changes."""
        started = time.perf_counter()
        readings, devices = self.readings(batch)
        if self._shared:
            self._store.refresh(conn, self.state, devices)
        self._store.remember_devices(conn, self.state, devices | set(batch.gone))
        plan = history.decide(self.state, self._by_stream, readings, batch.seen,
                              self._store.history(conn, self.state), datetime.now(UTC),
                              self._window_s, self._late_after_s)
        if batch.gone:
            _declared_gone(plan, self.state, batch.gone)
        self.state.managed |= batch.managed
        # Marks are read again at start from the stored readings: only changed
        # `for_s` conditions need storing, except in a shared group, whose
        # members read each other's marks with every batch (store.py).
        pending = self.state.pending
        self._store.write(conn, plan, None if self._shared else [
            key for key, now in plan.pending.items() if now != pending.get(key, {})])
        plan.seconds = time.perf_counter() - started
        return plan

    def readings(self, batch: Batch) -> tuple[dict[str, StreamRows], set[int]]:
        """Return *batch*'s readings as `evaluate` takes them, by stream, and their
        devices."""
        readings: dict[str, StreamRows] = {}
        devices: set[int] = set()
        for stream, rows in batch.rows.items():
            if not rows:
                continue
            newest = batch.newest(stream)
            devices.update(newest)
            fields = self._fields.get(stream)
            # A stream no rule reads needs only each device's newest reading
            # (its mark, the end of a DEVICE_OFFLINE): one per device, not per row.
            if not fields:
                readings[stream] = StreamRows(list(newest.items()), time=1, device=0)
                continue
            rounding = self._rounding.get(stream)
            readings[stream] = StreamRows(
                [row.values for row in rows] if rounding is None
                else [_rounded(row.values, rounding) for row in rows],
                Row.TIME, Row.DEVICE, fields)
        return readings, devices

    def plan_offline(self, conn: psycopg.Connection[Any], now: datetime,
                     watching_since: datetime) -> Plan:
        """Decide and write which devices went silent (see `evaluate.plan_offline`).

        In a shared group one member at a time decides, from what all committed.
        """
        if self._shared and not self._store.offline_turn(conn, self.state):
            return Plan()
        self._store.remember_devices(conn, self.state, self.state.last_seen)
        plan = evaluate.plan_offline(self.state, now, watching_since, self._offline_after)
        self._store.write(conn, plan)
        return plan

    def apply(self, plan: Plan) -> None:
        """Make a committed plan the current state, and announce it."""
        evaluate.apply(self.state, plan)
        self._publisher.committed(plan, self.state)

    def republish(self) -> int:
        """Publish the retained message of every unresolved alert (after a restart)."""
        return self._publisher.republish(self.state)


def _rounded(values: Sequence[Any], rounding: tuple[tuple[int, int], ...]) -> list[Any]:
    """Return *values* with those at the positions of *rounding* kept to its factor, as
    the database keeps them (bmsd/ingest/copy_format.py)."""
    out = list(values)
    for i, factor in rounding:
        value = out[i]
        if value is not None and value == value:
            out[i] = round(value * factor) / factor
    return out


def _declared_gone(plan: Plan, state: State, devices: Mapping[int, datetime]) -> None:
    """Raise DEVICE_OFFLINE at once for *devices* their gateway declared dead (a
    Sparkplug NDEATH or DDEATH, at bmsd's receive time)."""
    raised = {(a.device.id, a.code) for a in plan.triggered}
    for device_id, at in devices.items():
        key = (device_id, OFFLINE)
        if key in state.open or key in raised or device_id not in state.devices:
            continue
        device = state.devices[device_id]
        plan.triggered.append(Alert.offline(
            device, f"{device.slug} at {device.site}: its gateway declared it offline"
            " (Sparkplug death)", None, None, at))
