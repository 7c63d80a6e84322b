"""The Sparkplug B host's state machine: pure, no broker, no database.

`Host.receive` takes one message (topic, payload, arrival time) and returns
what it means (`Outcome`): readings for bmsd's streams, metrics nobody
mapped, edge nodes and devices born or dead, rebirth requests to send, and
what could not be used, with the reason. `Host.due` returns the rebirth
requests whose reorder timeout ran out. The ingestor stores an outcome in
the batch's transaction (bmsd/ingest/sparkplug.py).

Per edge node, as the specification asks of a host application:

- an NBIRTH starts a session: its ``bdSeq``, its metrics' names, aliases,
  datatypes and units (DBIRTHs add their devices'); a data message names
  metrics by alias, resolved against them;
- ``seq`` (0-255, wrapping) runs over every message of the session but
  NDEATH; a message ahead of the next expected one opens a gap, which the
  missing messages close if they arrive within ``reorder_timeout_s``, else a
  rebirth is requested. Messages are not held back meanwhile: each reading
  carries its own time, and its alerts do not depend on arrival order
  (bmsd/alerts/history.py);
- data before a birth, or an alias the birth did not give, asks for a
  rebirth; requests to one edge node are at most one per
  ``rebirth_min_interval_s``;
- an NDEATH whose ``bdSeq`` is the session's ends it: the node and its
  devices are offline, at bmsd's receive time; a DDEATH, its device. An
  NDEATH of an earlier session (a stale will) changes nothing.

A data message laid out as one read before (the same aliases, encodings and
widths) is read by its shape (shape.py) with one struct.unpack, not metric by
metric through protobuf, to the same outcome (tests/test_sparkplug_shape.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bmsd.config import SparkplugConfig
from bmsd.sparkplug.known import Known
from bmsd.sparkplug.outcome import Change, Outcome, Reading, Target, Unmapped
from bmsd.sparkplug.payload import (
    Metric,
    PayloadError,
    alias_of,
    decode,
    name_of,
    when,
)
from bmsd.sparkplug.shape import LIMIT, Shapes, when_of
from bmsd.sparkplug.values import properties_of, times, value_of

NAMESPACE = "spBv1.0"
_UNIT_KEYS = ("engUnit", "EngUnit", "engUnits", "unit", "Unit", "units")
_SEQ_SPAN = 256
_DATA = ("NDATA", "DDATA")


@dataclass
class _Node:
    born: bool = False
    bdseq: int | None = None
    seq: int | None = None
    aliases: dict[int, Known] = field(default_factory=dict)
    names: dict[tuple[str, str], Known] = field(default_factory=dict)  # (device, name)
    devices: set[str] = field(default_factory=set)  # online
    missing: dict[int, float] = field(default_factory=dict)  # seq -> since (monotonic)
    asked_at: float | None = None  # the last rebirth request

    def follow(self, seq: int | None, clock: Callable[[], float]) -> None:
        """Take a message's *seq*: the next, a missing one come late, or one ahead (those
        between go missing, since *clock*'s now)."""
        if seq is None:
            return
        if self.seq is None:
            self.seq = seq
            return
        expected = (self.seq + 1) % _SEQ_SPAN
        if seq == expected:
            self.seq = seq
        elif seq in self.missing:
            del self.missing[seq]
        else:
            ahead = (seq - expected) % _SEQ_SPAN
            if ahead < _SEQ_SPAN // 2:  # later than expected: the ones between are missing
                now = clock()
                for k in range(ahead):
                    self.missing.setdefault((expected + k) % _SEQ_SPAN, now)
                self.seq = seq


class Host:
    """The births, aliases and sequences of every edge node heard from."""

    def __init__(self, config: SparkplugConfig, clock: Callable[[], float] = time.monotonic,
                 max_shapes: int = LIMIT) -> None:
        self._config = config
        self._clock = clock
        self._nodes: dict[tuple[str, str], _Node] = {}
        self._targets: dict[tuple[str, str, str], Target] = {}
        self._shapes = Shapes(max_shapes)  # of data messages (shape.py)
        self.seq_gaps = 0

    def nodes(self) -> Iterable[tuple[str, str, bool]]:
        """Return (group, edge node, online) of every edge node heard from."""
        return [(g, e, n.born) for (g, e), n in self._nodes.items()]

    def target(self, group: str, edge_node: str, device: str) -> Target:
        """Return where *device* of *edge_node* (or the node itself, "") is stored."""
        key = (group, edge_node, device)
        found = self._targets.get(key)
        if found is None:
            found = self._targets[key] = Target.of(self._config.map, group, edge_node, device)
        return found

    def read(self, topic: str, payload: bytes, received_at: datetime) -> Reading | None:
        """Return a data message of a shape read before (shape.py) as its one reading,
        taken as `receive` would take it; None: `receive` it."""
        parts = topic.split("/")
        if len(parts) not in (4, 5) or parts[2] not in _DATA or parts[0] != NAMESPACE:
            return None
        group, edge, device = parts[1], parts[3], parts[4] if len(parts) == 5 else ""
        node = self._nodes.get((group, edge))
        read = None if node is None or not node.born else self._shapes.read(
            (group, edge), device, payload)
        if read is None or node is None:
            return None
        try:
            at = when_of(read, received_at)
        except PayloadError:
            return None  # (`receive` says why)
        node.follow(read.seq, self._clock)
        return Reading(self.target(group, edge, device), at, read.fields, False)

    def receive(self, topic: str, payload: bytes, received_at: datetime) -> Outcome:
        """Return what a message means, decoded by protobuf (`read` first, for speed)."""
        out = Outcome()
        parts = topic.split("/")
        if len(parts) not in (4, 5) or parts[0] != NAMESPACE:
            out.problems.append(("bad_topic", f"{topic!r} is not a Sparkplug B topic"
                                 f" ({NAMESPACE}/group/type/edge_node[/device])"))
            return out
        group, kind, edge = parts[1], parts[2], parts[3]
        device = parts[4] if len(parts) == 5 else ""
        out.kind = kind
        if kind in ("NCMD", "DCMD"):
            return out  # commands of other hosts
        node = self._nodes.get((group, edge))
        if node is None:
            node = self._nodes[(group, edge)] = _Node()
        try:
            message = decode(payload)
        except PayloadError as exc:
            out.problems.append(("not_sparkplug", str(exc)))
            return out
        if kind == "NBIRTH":
            self._birth(out, node, group, edge, message.seq, message.metrics, received_at,
                        message.timestamp)
        elif kind == "NDEATH":
            self._death(out, node, group, edge, message.metrics, received_at)
        elif kind in ("DBIRTH", "DDEATH", *_DATA):
            born = node.born
            self._session(out, node, group, edge, device, kind, message, received_at)
            if born and kind in _DATA and len(out.readings) == 1 and not (
                    out.unmapped or out.problems or out.rebirths or out.historical):
                reading = out.readings[0]
                self._shapes.learn((group, edge), device, payload, node.aliases, lambda read: (
                    read.fields == reading.fields
                    and when_of(read, received_at) == reading.time))
        else:
            out.problems.append(("bad_topic", f"{topic!r}: unknown message type {kind!r}"))
        return out

    def due(self) -> list[str]:
        """Return the rebirth requests of edge nodes whose sequence gap outlived the reorder
        timeout (counted in ``seq_gaps``)."""
        now = self._clock()
        topics = []
        for (group, edge), node in self._nodes.items():
            if node.missing and now - min(node.missing.values()) >= \
                    self._config.reorder_timeout_s:
                node.missing.clear()
                self.seq_gaps += 1
                topics += self._ask(node, group, edge)
        return topics

    # --- messages ------------------------------------------------------------------

    def _birth(self, out: Outcome, node: _Node, group: str, edge: str, seq: int | None,
               metrics: Sequence[Metric], received_at: datetime, sent: int | None) -> None:
        bdseq = _bdseq(metrics)
        node.born, node.bdseq, node.seq = True, bdseq, seq
        node.aliases.clear()
        node.names.clear()  # (and its shapes: `_learn`, next)
        node.devices.clear()
        node.missing.clear()
        self._learn(node, group, edge, "", metrics)
        out.changes.append(Change(self.target(group, edge, ""), True, received_at, bdseq))
        self._data(out, node, group, edge, "", metrics, received_at, sent)

    def _death(self, out: Outcome, node: _Node, group: str, edge: str,
               metrics: Sequence[Metric], received_at: datetime) -> None:
        bdseq = _bdseq(metrics)
        if not node.born or (bdseq is not None and bdseq != node.bdseq):
            return  # an earlier session's will
        node.born = False
        node.aliases.clear()  # the next session's birth gives them again
        node.names.clear()
        self._shapes.forget((group, edge))
        for device in sorted(node.devices):
            out.changes.append(Change(self.target(group, edge, device), False, received_at,
                                      bdseq))
        node.devices.clear()
        node.missing.clear()
        out.changes.append(Change(self.target(group, edge, ""), False, received_at, bdseq))

    def _session(self, out: Outcome, node: _Node, group: str, edge: str, device: str,
                 kind: str, message: Any, received_at: datetime) -> None:
        if not node.born:
            # Metrics that carry their name and datatype are stored all the same;
            # those by alias alone wait for the rebirth asked for.
            out.rebirths += self._ask(node, group, edge)
            if kind in ("NDATA", "DDATA"):
                self._data(out, node, group, edge, device, message.metrics, received_at,
                           message.timestamp, before_birth=True)
            return
        node.follow(message.seq, self._clock)
        if kind == "DBIRTH":
            self._learn(node, group, edge, device, message.metrics)
            node.devices.add(device)
            out.changes.append(Change(self.target(group, edge, device), True, received_at,
                                      node.bdseq))
        elif kind == "DDEATH":
            node.devices.discard(device)
            out.changes.append(Change(self.target(group, edge, device), False, received_at,
                                      node.bdseq))
            return
        self._data(out, node, group, edge, device, message.metrics, received_at,
                   message.timestamp)

    def _learn(self, node: _Node, group: str, edge: str, device: str,
               metrics: Sequence[Metric]) -> None:
        target = self.target(group, edge, device)
        self._shapes.forget((group, edge))
        for metric in metrics:
            try:
                name = name_of(metric)
            except PayloadError:
                continue  # (said by `_data`, next)
            if name is None:
                continue
            try:
                properties = properties_of(metric)
            except PayloadError:
                properties = {}  # (a property that cannot be read: no unit)
            unit = next((str(properties[k]) for k in _UNIT_KEYS
                         if properties.get(k) is not None), None)
            known = Known.of(name, metric.datatype, unit, target)
            node.names[(device, name)] = known
            alias = alias_of(metric)
            if alias is not None:
                node.aliases[alias] = known

    def _data(self, out: Outcome, node: _Node, group: str, edge: str, device: str,
              metrics: Sequence[Metric], received_at: datetime, sent: int | None,
              before_birth: bool = False) -> None:
        """Add the values of *metrics* to *out*: by field for mapped metrics, grouped
        into readings by time; as they are for the others. The usual metric (an alias
        of the birth, its value in its datatype's field) is read with 5 lookups."""
        target = self.target(group, edge, device)
        rows: dict[tuple[int, bool], dict[str, Any]] = {}  # by (ms, historical)
        stamps: dict[int | None, datetime] = {}  # ms -> time
        row: dict[str, Any] = {}
        aliases, last = node.aliases, None  # a message's metrics mostly share a time
        for metric in metrics:
            alias = metric.alias  # given, it names the metric (unique in the session)
            known = aliases.get(alias) if alias else None
            if known is None:
                try:
                    known = _named(node, device, target, metric)
                except PayloadError as exc:
                    out.problems.append(("not_sparkplug", str(exc)))
                    continue
                if known is None:
                    self._unknown(out, node, group, edge, device, metric, before_birth)
                    continue
            if known.skip:
                continue
            kind = metric.WhichOneof("value")
            try:
                if kind == known.sent_in:  # (a null metric has no value set: kind None)
                    value = getattr(metric, kind)
                    if (convert := known.convert) is not None:
                        value = convert(value)
                else:  # sent otherwise than its birth said
                    value = value_of(known.datatype, metric)
                    if known.scale is not None and known.field is not None:
                        value = times(value, known.scale)
            except PayloadError as exc:
                out.problems.append(("not_sparkplug", f"metric {known.name}: {exc}"))
                continue
            key = (metric.timestamp, metric.is_historical)
            if key != last:
                if (ms := key[0] or sent) not in stamps:  # 0: not sent, the message's
                    try:  # time if it has one
                        stamps[ms] = when(ms) if ms else received_at
                    except PayloadError as exc:
                        out.problems.append(("not_sparkplug", f"metric {known.name}: {exc}"))
                        continue
                last = key
                row = rows.get(key) or rows.setdefault(key, {})
            if key[1]:
                out.historical += 1
            if (to := known.field) is not None:
                row[to] = value
            else:
                out.unmapped.append(Unmapped(target, stamps[key[0] or sent], known.name,
                                             known.type_name, known.unit, value, key[1]))
        out.readings += [Reading(target, stamps[ms or sent], values, historical)
                         for (ms, historical), values in rows.items() if values]

    def _unknown(self, out: Outcome, node: _Node, group: str, edge: str, device: str,
                 metric: Metric, before_birth: bool) -> None:
        out.unknown_aliases += not before_birth
        out.rebirths += self._ask(node, group, edge)
        what = f"metric {name_of(metric) or f'alias {alias_of(metric)}'} of {group}/{edge}" + (
            f"/{device}" if device else "")
        out.problems.append(("before_birth", (
            f"{what} came before its edge node's NBIRTH, by alias or without a datatype: it"
            " cannot be named; a rebirth was requested")) if before_birth
            else ("unknown_alias", f"{what} is not in its birth; a rebirth was requested"))

    def _ask(self, node: _Node, group: str, edge: str) -> list[str]:
        now = self._clock()
        if node.asked_at is not None and now - node.asked_at < \
                self._config.rebirth_min_interval_s:
            return []
        node.asked_at = now
        return [f"{NAMESPACE}/{group}/NCMD/{edge}"]


def _named(node: _Node, device: str, target: Target, metric: Metric) -> Known | None:
    """Return what a metric is by its name (or alias 0); None if unknown. A metric
    not in the birth is known if it says what it is (a name and a datatype)."""
    name = name_of(metric)
    if name:
        known = node.names.get((device, name))
        if known is None and metric.datatype:
            known = Known.of(name, metric.datatype, None, target)
        return known
    return node.aliases.get(metric.alias) if metric.HasField("alias") else None


def _bdseq(metrics: Sequence[Metric]) -> int | None:
    """Return the bdSeq a birth or death carries; None if none, or none that is a whole
    number a bigint holds (the specification says 0-255)."""
    for metric in metrics:
        if metric.name == "bdSeq":
            try:
                value = value_of(metric.datatype, metric)
            except PayloadError:
                return None
            return value if isinstance(value, int) and not isinstance(value, bool) \
                and 0 <= value < 2**63 else None
    return None
