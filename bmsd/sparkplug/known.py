"""What the host knows of a metric from its birth (host.py), and where its values go:
a stream's field (scaled) or sparkplug_metrics; read by the value field its
datatype names, with the conversion chosen once, here (values.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bmsd.sparkplug.outcome import Target
from bmsd.sparkplug.payload import DATATYPES, WHOLE
from bmsd.sparkplug.values import reader, scaled

#: Metrics of the protocol itself, not data.
_PROTOCOL = ("bdSeq", "Node Control/", "Device Control/")


@dataclass(frozen=True, slots=True)
class Known:
    """A metric as its birth described it, and where its values go."""

    name: str
    datatype: int
    unit: str | None
    field: str | None  # the stream's field it fills, or None: sparkplug_metrics
    scale: float | None  # its values' factor, None: as sent
    skip: bool  # a metric of the protocol (bdSeq, Node Control/...), not data
    type_name: str
    sent_in: str  # the value field of its datatype (values.reader), "": none
    convert: Callable[[Any], Any] | None  # that field's value into Python and scaled,
    # None: as sent

    @classmethod
    def of(cls, name: str, datatype: int, unit: str | None, target: Target) -> Known:
        to, scale = target.fields.get(name, (None, 1.0)) if datatype not in WHOLE else (
            None, 1.0)
        sent_in, convert = reader(datatype)
        if scale != 1:
            convert = scaled(convert, scale, datatype)
        return cls(name, datatype, unit, to, None if scale == 1 else scale,
                   name.startswith(_PROTOCOL), DATATYPES.get(datatype, "Unknown"), sent_in,
                   convert)
