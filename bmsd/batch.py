"""What a batch holds until its commit: rows, where they came from, dead letters.

A `Batch` gathers the readings and dead letters of the messages taken since
the last commit. It keeps no two readings of one device at one time, and
proves a reading new cheaply (see `Batch`). The writer (bmsd/ingest/writer.py)
stores a batch; the alert engine (bmsd/alerts/engine.py) reads one. Neither
owns these types: both import them from here.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from operator import itemgetter, lt
from typing import Any, ClassVar

from bmsd.streams import NAMES


@dataclass(slots=True)  # not frozen: one per message, and frozen costs 3x to build
class Origin:
    """Where a row came from, so it can be dead-lettered as it was sent."""

    topic: str
    route: str | None
    payload: bytes
    index: int | None
    received_at: datetime
    # The broker sent it again (MQTT DUP): its dead letter may be stored already.
    redelivered: bool = False


@dataclass(slots=True)
class Row:
    """One reading ready for COPY: (time, device_id, *fields, extra).

    *index* is its place in its message's array (None for a lone reading);
    the origin is shared by every reading of a message.
    """

    values: tuple[Any, ...]
    origin: Origin
    index: int | None = None

    # The layout above is read back only through these, so it is said once.
    TIME: ClassVar[int] = 0  # where the reading's time sits in `values`
    DEVICE: ClassVar[int] = 1  # where its device id does

    @property
    def key(self) -> tuple[int, datetime]:
        """Return (device_id, time): the hypertable's unique key."""
        return self.values[1], self.values[0]

    @staticmethod
    def positions(columns: Sequence[str], names: Sequence[str]) -> dict[str, int]:
        """Return where each field of *names* sits in `values` (*columns*: its payload
        model's)."""
        return {name: 2 + columns.index(name) for name in names}

    def dead(self, category: str, reason: str) -> DeadLetter:
        """Return this row's dead letter."""
        origin = self.origin
        if self.index is not None:
            origin = dataclasses.replace(origin, index=self.index)
        return DeadLetter(origin, category, reason)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One ``ingest_rejects`` row."""

    origin: Origin
    category: str
    reason: str


#: Time ranges kept per device and stream (a gateway's live readings and its
#: backlog after an outage make two runs; the closest ranges are joined).
MAX_SPANS = 4


@dataclass
class Batch:
    """Readings and dead letters gathered since the last commit.

    A stream's rows are held in the order they came (`rows`), no two with one
    key (device, time). Most messages prove that by time alone: for each
    device the batch keeps a few disjoint time ranges its readings lie in
    (`_spans`, the closest two joined when there are more than MAX_SPANS); a
    message whose readings are in time order, in a range that meets none of
    them, holds only new rows, and they are added without a look at any key.
    That is how gateways send: each message later than the last, a backlog
    after an outage in order too. Any other message is checked key by key,
    against an index of the stream's rows made when first needed and brought
    up to date at each use (`_index`).
    """

    rows: dict[str, list[Row]] = field(default_factory=lambda: {s: [] for s in NAMES})
    dead: list[DeadLetter] = field(default_factory=list)
    seen: dict[int, datetime] = field(default_factory=dict)
    late: set[tuple[str, date]] = field(default_factory=set)  # (hypertable, UTC day)
    duplicates: Counter[str] = field(default_factory=Counter)
    largest: int = 0  # rows in the fullest hypertable
    #: Sparkplug B (bmsd/ingest/sparkplug.py): metrics no map names a field for,
    #: as sparkplug_metrics rows and each one's message (`Origin`, last); edge
    #: nodes' and devices' births and deaths, as
    #: sparkplug_nodes rows by (group, edge node, device); devices their gateway
    #: declared dead (DEVICE_OFFLINE at once), and those whose gateway tells
    #: their liveness (no offline-by-silence).
    metrics: list[tuple[Any, ...]] = field(default_factory=list)
    nodes: dict[tuple[str, str, str], tuple[Any, ...]] = field(default_factory=dict)
    gone: dict[int, datetime] = field(default_factory=dict)
    managed: set[int] = field(default_factory=set)
    #: Per stream and device, sorted disjoint [first, last] times that every
    #: reading offered lies in; each bound is a reading's time.
    _spans: dict[str, dict[int, list[list[datetime]]]] = field(
        default_factory=lambda: {s: {} for s in NAMES})
    #: Per stream, its first rows by key (see the class).
    _keyed: dict[str, dict[tuple[int, datetime], Row]] = field(
        default_factory=lambda: {s: {} for s in NAMES})

    def newest(self, stream: str) -> dict[int, datetime]:
        """Return each device's newest reading time of *stream* in the batch (what the
        alert engine needs of a stream no rule reads, without walking its rows)."""
        return {device: spans[-1][1] for device, spans in self._spans[stream].items()}

    def _index(self, stream: str) -> dict[tuple[int, datetime], Row]:
        """Return the stream's rows by key, indexing those added since the last use."""
        keyed, rows = self._keyed[stream], self.rows[stream]
        if len(keyed) < len(rows):  # rows are unique: the index holds the first ones
            keyed.update({row.key: row for row in rows[len(keyed):]})
        return keyed

    def add_message(self, stream: str, rows: list[Row],
                    send: Callable[[list[Row]], None]) -> None:
        """Add the rows of one message, readings of one device, first giving *send*
        the ones that are new (`new_rows`); if *send* raises, the batch is left unchanged."""
        device = rows[0].values[1]
        times = [row.values[0] for row in rows]
        first, last = times[0], times[-1]
        spans = self._spans[stream].get(device) or []
        held = self.rows[stream]
        if len(times) == 1 or all(map(lt, times, times[1:])):
            n = len(spans)
            place = n if not n or first > spans[-1][1] else _gap(spans, first, last)
            if place is not None:
                send(rows)  # the usual case: all new, by their times alone
                held += rows
                if place == n > 1 and first - spans[-1][1] <= 2 * (spans[-1][0] - spans[-2][1]):
                    spans[-1][1] = last  # the newest run goes on, at about its pace
                else:
                    spans.insert(place, [first, last])
                    if n == MAX_SPANS:
                        _join_closest(spans)
                    self._spans[stream][device] = spans
                if len(held) > self.largest:
                    self.largest = len(held)
                return
        keyed = self._index(stream)
        if len(rows) > 1:
            new = {row.key: row for row in rows}
            # (not new.keys().isdisjoint(keyed): that walks the whole batch)
            if len(new) == len(rows) and not any(map(keyed.__contains__, new)):
                send(rows)  # all new, by their keys: added in one C-level pass
                keyed.update(new)
                held += rows
                self._cover(stream, device, min(times), max(times))
                if len(held) > self.largest:
                    self.largest = len(held)
                return
        send(self.new_rows(stream, rows))
        self.add_by_key(stream, rows)

    def new_rows(self, stream: str, rows: list[Row]) -> list[Row]:
        """Return the rows of one message that `add_by_key` would add (changing nothing)."""
        held = self._index(stream)
        if len(rows) == 1:
            return [] if rows[0].key in held else rows
        out: dict[tuple[int, datetime], Row] = {}
        for row in rows:
            key = row.key
            if key not in held and key not in out:
                out[key] = row
        return list(out.values())

    def add_by_key(self, stream: str, rows: list[Row]) -> None:
        """Add the rows of one message, key by key: a second reading of a device at
        the same time is not added, but counted as a duplicate if its values are the
        same, else dead-lettered."""
        keyed, held = self._index(stream), self.rows[stream]
        for row in rows:
            key = row.key
            kept = keyed.get(key)
            if kept is None:
                keyed[key] = row
                held.append(row)
            elif kept.values == row.values:
                self.duplicates[stream] += 1
            else:
                self.dead.append(row.dead("duplicate_conflict", conflict(key[1])))
        if len(held) > self.largest:
            self.largest = len(held)
        for device, times in _times_by_device(rows).items():
            self._cover(stream, device, min(times), max(times))

    def _cover(self, stream: str, device: int, first: datetime, last: datetime) -> None:
        """Make the device's spans cover [first, last], merging those it meets."""
        kept = []
        for span in self._spans[stream].get(device, ()):
            if span[1] < first or span[0] > last:
                kept.append(span)
            else:
                first, last = min(first, span[0]), max(last, span[1])
        kept.append([first, last])
        kept.sort(key=itemgetter(0))
        while len(kept) > MAX_SPANS:
            _join_closest(kept)
        self._spans[stream][device] = kept

    def note_seen(self, device_id: int, latest: datetime, received_at: datetime) -> None:
        """Note that *device_id* sent readings up to *latest*, heard at *received_at*
        (the device was seen at the later of the two)."""
        when = max(latest, received_at)
        seen = self.seen.get(device_id)
        if seen is None or when > seen:
            self.seen[device_id] = when


def _gap(spans: list[list[datetime]], first: datetime, last: datetime) -> int | None:
    """Return the place among *spans* (sorted, disjoint) of the range [first, last]:
    the index of the first span after it; None if it meets one."""
    for place, (low, high) in enumerate(spans):
        if last < low:
            return place
        if first <= high:
            return None
    return len(spans)


def _join_closest(spans: list[list[datetime]]) -> None:
    """Join the two neighbouring spans with the shortest time between them: the
    joined span covers that time too, where a device's runs of readings (its live
    ones, its backlog) are least likely to meet."""
    at = min(range(len(spans) - 1), key=lambda i: spans[i + 1][0] - spans[i][1])
    spans[at:at + 2] = [[spans[at][0], spans[at + 1][1]]]


def _times_by_device(rows: list[Row]) -> dict[int, list[datetime]]:
    out: dict[int, list[datetime]] = {}
    for row in rows:
        device, when = row.key
        out.setdefault(device, []).append(when)
    return out


def conflict(when: datetime) -> str:
    """Return why a reading that differs from the stored one at *when* is refused."""
    return (f"a different reading of this device at {when.isoformat()} is already stored;"
            " the stored one is kept (a corrected resend, or two devices on one topic?)")
