"""The alert engine: evaluate (pure), store (in the batch's transaction), publish (after it).

The ingestor calls `AlertEngine.plan` inside the transaction that writes a
batch's readings, and `AlertEngine.apply` once that transaction committed;
if it rolled back, the plan is simply dropped. The daemon calls the offline
check, the limits refresh, the rules reload and the republication at start.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import psycopg
import structlog

from bmsd.alerts import evaluate
from bmsd.alerts.publish import AlertPublisher, Publish
from bmsd.alerts.rules import Rule
from bmsd.alerts.state import Plan, State, StreamRows
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
                 shared: bool = False) -> None:
        self.set_rules(rules)
        # A member of a shared group: other members change the same devices.
        self._shared = shared
        self.state = State()
        self._store = AlertStore()
        self._publisher = AlertPublisher(metrics, publish, topic_prefix)
        self._offline_after = dict(offline_after_s or {})

    def set_rules(self, rules: Iterable[Rule]) -> None:
        """Use these rules from now on; state of unchanged codes is kept."""
        self.rules = tuple(rules)
        self._by_stream = evaluate.by_stream(self.rules)
        # Where in each stream's rows sit the fields its rules and flags read.
        self._fields = {
            spec.name: Row.positions(spec.model.columns, names) for spec in SPECS
            if (names := evaluate.fields_read(spec.name, self._by_stream))}

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
        self._store.remember_devices(conn, self.state, devices)
        plan = evaluate.evaluate(self.state, self._by_stream, readings, batch.seen)
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
            readings[stream] = (
                StreamRows([row.values for row in rows], Row.TIME, Row.DEVICE, fields) if fields
                else StreamRows(list(newest.items()), time=1, device=0))
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
