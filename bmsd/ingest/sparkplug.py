"""A Sparkplug B message into the batch: the host's outcome (bmsd/sparkplug/host.py)
stored in the batch's transaction, like any other message's rows.

- mapped metrics become readings of their stream, validated as JSON readings
  are (bmsd/ingest/payloads.py), on the device their map names (registered
  on first sight, like a route's);
- other metrics go to ``sparkplug_metrics`` with their datatype and unit;
- births and deaths update ``sparkplug_nodes``; a death declares its devices
  offline at once (DEVICE_OFFLINE, bmsd/alerts/engine.py), and devices of an
  edge node are not declared offline by silence (report by exception);
- what cannot be used is dead-lettered with its reason; rebirth requests are
  returned to be sent (bmsd/ingest/sparkplug_link.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from bmsd.batch import Batch, DeadLetter, Origin, Row
from bmsd.config import SparkplugConfig
from bmsd.ingest.dead_letters import storable_text
from bmsd.ingest.mqtt import Message
from bmsd.ingest.payloads import Reading, ReadingBounds, parse_fields
from bmsd.ingest.registry import Registry, Unresolved
from bmsd.metrics import Metrics
from bmsd.sparkplug.host import Host
from bmsd.sparkplug.outcome import Outcome, Target, Unmapped
from bmsd.sparkplug.outcome import Reading as SparkplugReading
from bmsd.sparkplug.payload import rebirth_request
from bmsd.streams import BY_NAME

ROUTE = "sparkplug"  # the route label of Sparkplug messages in metrics and dead letters
#: Where metrics no map names go, and the stream label of devices that send only those.
METRICS_TABLE = "sparkplug_metrics"
_EXACT = 2 ** 53  # integers a double holds exactly
#: Add a device's rows of one stream to the batch: (conn, stream, rows, received at).
AddRows = Callable[[psycopg.Connection[Any], str, list[Row], datetime], datetime]


class SparkplugIntake:
    """Sparkplug messages into the batch."""

    def __init__(self, config: SparkplugConfig, registry: Registry, metrics: Metrics,
                 add_rows: AddRows, send: Callable[[str, bytes], None],
                 release: Callable[[], None]) -> None:
        self.host = Host(config)
        self._release = release  # frees the connection of the batch's early COPY
        self._registry = registry
        self._metrics = metrics
        self._add_rows = add_rows
        self._send = send
        self._registrants: dict[Target, _Registrant] = {}
        self._ids: dict[Target, int] = {}  # devices found or registered

    def accept(self, conn: psycopg.Connection[Any], message: Message, batch: Batch,
               bounds: Mapping[str, ReadingBounds]) -> list[DeadLetter]:
        """Add what *message* means to *batch*; return its dead letters. Database errors
        propagate before anything is added (the caller retries the message)."""
        received_at = message.received_at
        origin = Origin(message.topic, ROUTE, message.payload, None, received_at, message.dup)
        reading = self.host.read(message.topic, message.payload, received_at)
        if reading is not None:  # the usual data message: one reading, of a known device
            device = self._ids.get(reading.target)
            if device is not None:
                dead: list[DeadLetter] = []
                row = self._row(reading, device, origin, bounds, dead, received_at)
                if row is not None:
                    self._add_rows(conn, row[0], [row[1]], received_at)
                batch.managed.add(device)
                return dead
            out = Outcome(readings=[reading])
        else:
            out = self.host.receive(message.topic, message.payload, received_at)
        dead = [DeadLetter(origin, category, reason) for category, reason in out.problems]
        ids = self._devices(conn, out, origin, dead)
        if out.readings:
            self._readings(conn, out, ids, origin, bounds, dead, message.received_at)
        if out.unmapped:
            self._unmapped(out.unmapped, ids, batch, origin)
        if out.changes:
            self._changes(out, ids, batch)
        if out.unknown_aliases or out.historical:
            self._count(out)
        batch.managed.update(ids.values())
        for topic in out.rebirths:
            self.request_rebirth(topic)
        return dead

    def tick(self) -> None:
        """Ask for a rebirth where a sequence gap outlived the reorder timeout."""
        gaps = self.host.seq_gaps
        for topic in self.host.due():
            self.request_rebirth(topic)
        if self.host.seq_gaps > gaps:
            self._metrics.sparkplug_seq_gaps.inc(self.host.seq_gaps - gaps)

    def request_rebirth(self, topic: str) -> None:
        self._metrics.sparkplug_rebirths.inc()
        self._send(topic, rebirth_request())

    def _devices(self, conn: psycopg.Connection[Any], out: Outcome, origin: Origin,
                 dead: list[DeadLetter]) -> dict[Target, int]:
        """Return the device ids of the targets of *out* (registering new ones); those
        that cannot be had are dead-lettered."""
        known = self._ids
        if len(out.readings) == 1 and not (out.unmapped or out.changes):  # a data message
            target = out.readings[0].target
            if (found := known.get(target)) is not None:
                return {target: found}
        targets = {r.target: None for r in out.readings}
        if out.unmapped or out.changes:
            targets.update(dict.fromkeys([*(u.target for u in out.unmapped),
                                          *(c.target for c in out.changes)]))
        ids: dict[Target, int] = {}
        for target in targets:
            found = known.get(target)
            if found is None:
                resolved = self._device(conn, target)
                if isinstance(resolved, Unresolved):
                    dead.append(DeadLetter(origin, resolved.category, resolved.reason))
                    continue
                found = known[target] = resolved
            ids[target] = found
        return ids

    def _device(self, conn: psycopg.Connection[Any], target: Target) -> int | Unresolved:
        device = self._registrants.get(target)
        if device is None:
            device = self._registrants[target] = _Registrant.of(target)
        found = self._registry.cached(device)
        if found is not None:
            return found
        self._release()  # the lookup needs the connection
        return self._registry.resolve(conn, device)

    def _readings(self, conn: psycopg.Connection[Any], out: Outcome, ids: dict[Target, int],
                  origin: Origin, bounds: Mapping[str, ReadingBounds],
                  dead: list[DeadLetter], received_at: datetime) -> None:
        groups: dict[tuple[str, int], list[Row]] = {}  # (stream, device): rows
        for reading in out.readings:
            device = ids.get(reading.target)
            if device is None:
                continue
            row = self._row(reading, device, origin, bounds, dead, received_at)
            if row is not None:
                groups.setdefault((row[0], device), []).append(row[1])
        for (stream, _), rows in groups.items():
            if len(rows) > 1:
                rows.sort(key=_time)
            self._add_rows(conn, stream, rows, received_at)

    def _row(self, reading: SparkplugReading, device: int, origin: Origin,
             bounds: Mapping[str, ReadingBounds], dead: list[DeadLetter],
             received_at: datetime) -> tuple[str, Row] | None:
        """Return a reading of *device* validated, as its stream and row; None if it has
        no stream or is dead-lettered."""
        stream = reading.target.stream
        if stream is None:
            return None
        parsed = parse_fields(BY_NAME[stream], reading.fields, reading.time, received_at,
                              bounds[stream])
        if not isinstance(parsed, Reading):
            dead.append(DeadLetter(origin, *parsed))
            return None
        return stream, Row((parsed.time, device, *parsed.values, parsed.extra), origin, None)

    def _unmapped(self, unmapped: list[Unmapped], ids: dict[Target, int], batch: Batch,
                  origin: Origin) -> None:
        for metric in unmapped:
            device = ids.get(metric.target)
            if device is not None:
                batch.metrics.append((metric.time, device, storable_text(metric.name),
                                      metric.datatype, metric.unit and storable_text(metric.unit),
                                      *_columns(metric.value), metric.historical, origin))

    def _changes(self, out: Outcome, ids: dict[Target, int], batch: Batch) -> None:
        for change in out.changes:
            target = change.target
            device = ids.get(target)
            batch.nodes[(target.group, target.edge_node, target.device)] = (
                device, change.online, change.bdseq, change.at if change.online else None,
                None if change.online else change.at)
            kind = "node" if not target.device else "device"
            if change.online:
                self._metrics.sparkplug_births.labels(kind).inc()
                if device is not None:
                    batch.gone.pop(device, None)
            else:
                self._metrics.sparkplug_deaths.labels(kind).inc()
                if device is not None:
                    batch.gone[device] = change.at

    def _count(self, out: Outcome) -> None:
        if out.unknown_aliases:
            self._metrics.sparkplug_unknown_aliases.inc(out.unknown_aliases)
        if out.historical:
            self._metrics.sparkplug_historical.inc(out.historical)


@dataclass(frozen=True, slots=True)
class _Registrant:
    """A Sparkplug edge node or device as the registry takes it (registry.Registrant)."""

    site: str
    device: str
    stream: str | None
    device_kind: str
    site_kind: str
    source: tuple[str, dict[str, str]]

    @classmethod
    def of(cls, target: Target) -> _Registrant:
        path = "/".join(p for p in (target.group, target.edge_node, target.device) if p)
        return cls(target.site, target.name, target.stream, target.kind, target.site_kind,
                   (f"Sparkplug B {path}", {"sparkplug": path}))


def _time(row: Row) -> datetime:
    return row.values[Row.TIME]  # type: ignore[no-any-return]


def _columns(value: Any) -> tuple[float | None, str | None, Jsonb | None]:
    """Return (value, value_text, value_json) of a metric's value: the column it fits."""
    if value is None:
        return None, None, None
    if isinstance(value, bool):
        return float(value), None, None
    if isinstance(value, int):
        return (float(value), None, None) if abs(value) <= _EXACT else (
            None, None, Jsonb(value))
    if isinstance(value, float):
        return (value, None, None) if math.isfinite(value) else (None, str(value), None)
    if isinstance(value, str):
        return None, storable_text(value), None
    if isinstance(value, datetime):
        return None, value.isoformat(), None
    return None, None, Jsonb(_json(value), dumps=_dumps)


def _json(value: Any) -> Any:
    """Return *value* as jsonb takes it: text without NUL, NaN and infinities as text
    (JSON has no such numbers), times as ISO 8601."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {storable_text(str(k)): _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=False, default=str)
