"""Data messages of a shape seen before, read with one `struct.unpack` instead of protobuf.

An edge node sends a device's metrics by the same aliases, in the same
encoding, message after message: only values and times change. So the host
(host.py) decodes the first data message of each length with protobuf, as
always, and `learn` walks the same bytes field by field for their *shape*:
which bytes are structure (tags, aliases, datatypes, lengths) and which are
values. A later message of that length is read by `Shape.read` only if each
structural byte is the same and each variable-length integer (a time, a seq,
an integer value) has the same width: then protobuf would parse it field for
field as it parsed the first, and the values are where the shape says. Any
other message, and any value that does not read as its datatype, goes to
protobuf. A shape is learned only for a message whose metrics all map, each
to its own field, at one time (one reading), and only if it reads that
message back as protobuf did.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bmsd.sparkplug.known import Known
from bmsd.sparkplug.payload import PayloadError, when

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
#: The value fields of a Metric: number -> (name, wire type).
_VALUES = {10: ("int_value", _VARINT), 11: ("long_value", _VARINT),
           12: ("float_value", _FIXED32), 13: ("double_value", _FIXED64),
           14: ("boolean_value", _VARINT), 15: ("string_value", _LEN),
           16: ("bytes_value", _LEN)}
_MASKS = {"int_value": 0xFFFF_FFFF, "long_value": 0xFFFF_FFFF_FFFF_FFFF}
_ALIAS, _TIMESTAMP, _DATATYPE = 2, 3, 4


@dataclass(frozen=True, slots=True)
class Read:
    """A data message read by its shape: one reading's fields at one time."""

    seq: int | None
    ms: int  # the metrics' time, else the message's (ms since the epoch); 0: neither
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Shape:
    unpack: Callable[[bytes], tuple[Any, ...]]
    structure: Callable[[tuple[Any, ...]], tuple[Any, ...]]
    expected: tuple[Any, ...]  # the structural slots' bytes
    seq: int | None  # the slot of the message's seq
    sent: int | None  # the slot of the message's time
    stamps: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None  # every metric's time
    plain: Callable[[tuple[Any, ...]], tuple[Any, ...]]  # floats and doubles as they are
    plain_fields: tuple[str, ...]
    arrays: tuple[tuple[int, Callable[[Any], Any], str], ...]  # (slot, convert, field)
    other: tuple[tuple[int, str, Callable[[Any], Any] | None, str], ...]
    # ^ (slot, value field, convert, field) of the other values

    def read(self, payload: bytes) -> Read | None:
        """Return what *payload* (of this shape's length) holds; None: ask protobuf."""
        parts = self.unpack(payload)
        if self.structure(parts) != self.expected:
            return None
        seq: int | None = None
        if self.seq is not None and (seq := _varint(parts[self.seq])) is None:
            return None
        ms: int | None = 0
        if self.stamps is not None:
            stamps = set(self.stamps(parts))
            if len(stamps) != 1 or (ms := _varint(stamps.pop())) is None:
                return None
        sent = None if self.sent is None else parts[self.sent]
        if sent is not None and not _is_varint(sent):
            return None
        fields = dict(zip(self.plain_fields, self.plain(parts), strict=True))
        try:
            for slot, convert, to in self.arrays:
                fields[to] = convert(parts[slot])
            for slot, kind, into, to in self.other:
                value = parts[slot]
                if kind == "string_value":
                    value = value.decode()
                elif kind in _MASKS or kind == "boolean_value":  # a varint
                    if (value := _varint(value)) is None:
                        return None
                    value = value != 0 if kind == "boolean_value" else value & _MASKS[kind]
                fields[to] = value if into is None else into(value)
        except (PayloadError, UnicodeDecodeError):
            return None  # protobuf's path says why
        return Read(seq, ms or (sent and _varint(sent)) or 0, fields)


#: Shapes kept: lengths per device, and in all (`Shapes`): about 3 kB each for a
#: message of 7 metrics, so at most about 12 MB.
PER_DEVICE, LIMIT = 4, 4_000


class Shapes:
    """The shapes learned, by edge node, device and length: at most `PER_DEVICE` lengths
    of a device and *limit* in all, so memory stays bounded. An edge node's are
    forgotten at each of its births and deaths, which may give aliases anew."""

    def __init__(self, limit: int = LIMIT) -> None:
        self._known: dict[tuple[str, str], dict[str, dict[int, Shape | None]]] = {}
        self._count, self._limit = 0, limit

    def read(self, node: tuple[str, str], device: str, payload: bytes) -> Read | None:
        """Return *payload* read by its shape; None: ask protobuf."""
        devices = self._known.get(node)
        shapes = None if devices is None else devices.get(device)
        shape = None if shapes is None else shapes.get(len(payload))
        return None if shape is None else shape.read(payload)

    def learn(self, node: tuple[str, str], device: str, payload: bytes,
              aliases: Mapping[int, Known], check: Callable[[Read], bool]) -> None:
        """Learn the shape of a data message that protobuf read as one reading, unless
        one of its length is known: kept if it reads the message back so that *check*
        holds (as protobuf read it), else None (that length goes to protobuf)."""
        shapes = self._known.setdefault(node, {}).setdefault(device, {})
        if len(payload) in shapes or len(shapes) >= PER_DEVICE or self._count >= self._limit:
            return
        shape = learn(payload, aliases)
        read = None if shape is None else shape.read(payload)
        shapes[len(payload)] = shape if read is not None and check(read) else None
        self._count += 1

    def forget(self, node: tuple[str, str]) -> None:
        self._count -= sum(map(len, self._known.pop(node, {}).values()))


def learn(payload: bytes, aliases: Mapping[int, Known]) -> Shape | None:
    """Return the shape of a data message, or None if it has none worth having: a field
    other than a time, a seq and metrics by alias with a time, a datatype and a value
    sent as their birth said, mapped each to its own field."""
    slots: list[tuple[str, Any]] = []  # ("const", bytes), (role, width), ("d"|"f", None)
    values: list[tuple[int, Known]] = []  # (slot, known) of each metric's value
    fields = _fields(payload, 0, len(payload))
    if fields is None:
        return None
    for number, wire, tag, start, content, end in fields:
        if number in (1, 3) and wire == _VARINT:  # the time, the seq
            slots += [("const", payload[tag:start]),
                      ("sent" if number == 1 else "seq", payload[start:end])]
        elif number == 2 and wire == _LEN:
            slots.append(("const", payload[tag:content]))
            if not _metric(payload, content, end, aliases, slots, values):
                return None
        else:
            return None
    roles = [role for role, _ in slots]
    stamped = roles.count("stamp")
    if roles.count("seq") > 1 or roles.count("sent") > 1 or stamped not in (0, len(values)):
        return None
    targets = [known.field for _, known in values]
    if not values or len(set(targets)) < len(targets):
        return None
    return _compile(slots, values)


def _metric(payload: bytes, start: int, end: int, aliases: Mapping[int, Known],
            slots: list[tuple[str, Any]], values: list[tuple[int, Known]]) -> bool:
    fields = _fields(payload, start, end)
    if fields is None or len({f[0] for f in fields}) < len(fields):
        return False
    numbers = {f[0]: f for f in fields}
    alias = numbers.get(_ALIAS)
    value = [f for f in fields if f[0] in _VALUES]
    if alias is None or alias[1] != _VARINT or len(value) != 1 or not set(numbers) <= {
            _ALIAS, _TIMESTAMP, _DATATYPE, *_VALUES}:
        return False
    known = aliases.get(_varint(payload[alias[3]:alias[5]]) or 0)
    kind, wire = _VALUES[value[0][0]]
    if known is None or known.skip or known.field is None or known.sent_in != kind \
            or value[0][1] != wire:
        return False
    for number, wire, tag, at, content, after in fields:
        if number in (_ALIAS, _DATATYPE):
            if wire != _VARINT:
                return False
            slots.append(("const", payload[tag:after]))
        elif number == _TIMESTAMP:
            if wire != _VARINT:
                return False
            slots += [("const", payload[tag:at]), ("stamp", payload[at:after])]
        else:
            slots.append(("const", payload[tag:content]))
            values.append((len(slots), known))
            slots.append(("d", None) if wire == _FIXED64 else ("f", None) if wire == _FIXED32
                         else ("value", payload[content:after]))
    return True


def _compile(slots: list[tuple[str, Any]], values: list[tuple[int, Known]]) -> Shape:
    merged: list[tuple[str, Any]] = []  # adjacent structure in one slot
    index: dict[int, int] = {}  # a slot's place before merging -> after
    for i, (role, data) in enumerate(slots):
        if role == "const" and merged and merged[-1][0] == "const":
            merged[-1] = ("const", merged[-1][1] + data)
        else:
            merged.append((role, data))
        index[i] = len(merged) - 1
    layout = "<" + "".join(role if role in ("d", "f") else f"{len(data)}s"
                           for role, data in merged)
    where = {role: [i for i, (r, _) in enumerate(merged) if r == role]
             for role in ("const", "seq", "sent", "stamp")}
    plain: list[tuple[int, str]] = []  # (slot, field): floats and doubles as sent
    arrays: list[tuple[int, Callable[[Any], Any], str]] = []  # (slot, convert, field)
    other: list[tuple[int, str, Callable[[Any], Any] | None, str]] = []
    for slot, known in values:
        at, to, convert = index[slot], known.field or "", known.convert
        if merged[at][0] in ("d", "f") and convert is None:
            plain.append((at, to))
        elif known.sent_in == "bytes_value" and convert is not None:
            arrays.append((at, convert, to))
        else:
            other.append((at, known.sent_in, convert, to))
    return Shape(struct.Struct(layout).unpack, _getter(where["const"]),
                 tuple(data for role, data in merged if role == "const"),
                 where["seq"][0] if where["seq"] else None,
                 where["sent"][0] if where["sent"] else None,
                 _getter(where["stamp"]) if where["stamp"] else None,
                 _getter([at for at, _ in plain]), tuple(to for _, to in plain),
                 tuple(arrays), tuple(other))


def _getter(slots: Sequence[int]) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    if len(slots) == 1:
        only = slots[0]
        return lambda parts: (parts[only],)
    if not slots:
        return lambda parts: ()
    return operator.itemgetter(*slots)


def _fields(buf: bytes, start: int,
            end: int) -> list[tuple[int, int, int, int, int, int]] | None:
    """Return (number, wire type, tag's offset, value's offset, content's offset, end)
    of each field of the message in buf[start:end] (the content of a length-delimited
    field follows its length; of any other, it is the value); None if it is not a
    well-formed message."""
    out = []
    at = start
    while at < end:
        tag = _read(buf, at, end)
        if tag is None:
            return None
        number, wire, value = tag[0] >> 3, tag[0] & 7, tag[1]
        content = value
        if wire in (_VARINT, _LEN):
            read = _read(buf, value, end)
            if read is None:
                return None
            after = read[1] if wire == _VARINT else read[1] + read[0]
            if wire == _LEN:
                content = read[1]
        else:
            after = value + (8 if wire == _FIXED64 else 4 if wire == _FIXED32 else end + 1)
        if after > end or number == 0:
            return None
        out.append((number, wire, at, value, content, after))
        at = after
    return out


def _read(buf: bytes, at: int, end: int) -> tuple[int, int] | None:
    """Return (the varint at *at*, the offset after it)."""
    value = shift = 0
    while at < end and shift < 70:
        byte = buf[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if byte < 0x80:
            return value, at
        shift += 7
    return None


def _is_varint(raw: bytes) -> bool:
    """Return whether *raw* is exactly one varint."""
    return bool(raw) and raw[-1] < 0x80 and (len(raw) == 1 or min(raw[:-1]) >= 0x80)


def _varint(raw: bytes) -> int | None:
    """Return the varint that is all of *raw*, or None if *raw* is not exactly one."""
    size = len(raw)
    if size == 1:
        return raw[0] if raw[0] < 0x80 else None
    if size == 2:  # (a seq from 128 on)
        return (raw[0] & 0x7F) | raw[1] << 7 if raw[0] >= 0x80 > raw[1] else None
    if not _is_varint(raw):
        return None
    packed = int.from_bytes(raw.translate(_LOW_BITS), "little")  # 8 bits a byte: to 7
    value = 0
    for shift, mask in _SEVENS[:len(raw)]:
        value |= (packed >> shift) & mask
    return value


_LOW_BITS = bytes(b & 0x7F for b in range(256))
_SEVENS = tuple((i, 0x7F << (7 * i)) for i in range(10))


def when_of(read: Read, received_at: datetime) -> datetime:
    """Return a read message's reading time as the host gives it (host._data); raise
    PayloadError if it is past year 9999."""
    return when(read.ms) if read.ms else received_at
