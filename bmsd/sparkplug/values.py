"""A Sparkplug B metric's value as Python, by its datatype (payload.py decodes the
message): numbers (signed as their datatype says), text, times, arrays,
DataSets and Templates as dicts, bytes as base64 text; and a map's scale.

`reader` gives, at a metric's birth, the value field its datatype is sent in and
the function that turns it into Python (host.py reads data messages with it);
`value_of` reads any metric, sent as its datatype says or otherwise.
"""

from __future__ import annotations

import array
import base64
import struct
import sys
from collections.abc import Callable
from typing import Any

from bmsd.sparkplug.payload import DATATYPES, Metric, PayloadError, text, when


def properties_of(metric: Metric) -> dict[str, Any]:
    return _properties(metric.properties) if metric.HasField("properties") else {}


def _properties(properties: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in zip(properties.keys, properties.values, strict=False):
        if not isinstance(key, str):
            continue  # (a key that is not UTF-8: the property is of no use)
        kind = value.WhichOneof("value")
        if value.is_null or kind is None:
            out[key] = None
        elif kind == "propertyset_value":
            out[key] = _properties(value.propertyset_value)
        elif kind == "propertysets_value":
            out[key] = [_properties(p) for p in value.propertysets_value.propertyset]
        else:
            out[key] = _typed(value.type, getattr(value, kind), kind)
    return out


def value_of(datatype: int | None, metric: Metric) -> Any:
    """Return *metric*'s value as Python, by *datatype* (the birth's, when the metric
    carries none): numbers, text, datetimes, lists; a DataSet or Template as a
    dict; bytes as base64 text. None for a null value."""
    kind = metric.WhichOneof("value")
    if kind is None or metric.is_null:
        return None
    if kind in AS_SENT:
        return getattr(metric, kind)
    return _typed(datatype or metric.datatype, getattr(metric, kind), kind)


#: Values that are what they were sent as, whatever the datatype (text: `_typed`).
AS_SENT = frozenset(("float_value", "double_value", "boolean_value"))


def reader(datatype: int) -> tuple[str, Callable[[Any], Any] | None]:
    """Return the value field a metric of *datatype* is sent in, and what turns that
    field's value into Python (None: nothing, it is as sent); ("", None) for a
    datatype without one. A data message's metrics are read with the reader of their
    birth's datatype (host.py), `value_of` when they are sent otherwise."""
    kind = _FIELD_OF.get(datatype, "")
    if kind == "string_value":
        return kind, _string
    if kind == "bytes_value":
        return kind, _array_reader(datatype)
    if kind == "dataset_value":
        return kind, _dataset
    if kind == "template_value":
        return kind, _template
    return kind, _CONVERT.get(datatype)


def scaled(convert: Callable[[Any], Any] | None, scale: float,
           datatype: int) -> Callable[[Any], Any] | None:
    """Return *convert* then a map's *scale*, for a number or each number of an array;
    *convert* itself for a datatype of no numbers (a scale does not apply)."""
    if datatype in _NUMBER_ARRAYS and convert is not None:
        return lambda raw: [v * scale for v in convert(raw)]
    if datatype in _NUMBERS:
        return (lambda raw: raw * scale) if convert is None else (
            lambda raw: convert(raw) * scale)
    return convert


def times(value: Any, scale: float) -> Any:
    """Return *value* (as `value_of` gives it) multiplied by *scale* where it is a number
    or a list of numbers, as `scaled` does."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return value * scale
    if isinstance(value, list):
        return [v * scale if isinstance(v, int | float) and not isinstance(v, bool) else v
                for v in value]
    return value


_NUMBERS, _NUMBER_ARRAYS = frozenset(range(1, 11)), frozenset(range(22, 32))
_FIELD_OF = {**dict.fromkeys((1, 2, 3, 5, 6, 7), "int_value"),
             **dict.fromkeys((4, 8, 13), "long_value"), 9: "float_value", 10: "double_value",
             11: "boolean_value", **dict.fromkeys((12, 14, 15), "string_value"),
             16: "dataset_value", 19: "template_value",
             **dict.fromkeys((17, 18, *range(22, 35)), "bytes_value")}


def _signed(bits: int) -> Callable[[int], int]:
    wrap, top = 1 << bits, 1 << (bits - 1)

    def signed(value: int) -> int:
        if value >= 1 << 31 and bits < 64:  # sent as a 32-bit two's complement
            value -= 1 << 32
        elif value >= top:
            value -= wrap
        return value
    return signed


# array typecodes; "i"/"I" are 4 bytes and "q"/"Q" 8 on every platform CPython runs on
_ARRAYS = {22: "b", 23: "h", 24: "i", 25: "q", 26: "B", 27: "H", 28: "I", 29: "Q", 30: "f",
           31: "d", 34: "q"}
_BIG_ENDIAN = sys.byteorder == "big"
_CONVERT: dict[int, Callable[[Any], Any]] = {
    1: _signed(8), 2: _signed(16), 3: _signed(32), 4: _signed(64), 13: when}


def _typed(datatype: int, raw: Any, kind: str) -> Any:
    if kind == "string_value":
        return _string(raw)
    convert = _CONVERT.get(datatype)
    if convert is not None and isinstance(raw, int):
        return convert(raw)
    if kind == "bytes_value":
        return _array(datatype, raw)
    if kind == "dataset_value":
        return _dataset(raw)
    if kind == "template_value":
        return _template(raw)
    return raw


def _array_reader(datatype: int) -> Callable[[bytes], Any]:
    code = _ARRAYS.get(datatype)
    if datatype == 33:
        return _strings
    if code is None or datatype == 34 or _BIG_ENDIAN:
        return lambda raw: _array(datatype, raw)

    def read(raw: bytes) -> list[Any]:  # the usual arrays, at C speed
        try:
            values: list[Any] = array.array(code, raw).tolist()
        except ValueError:
            _array(datatype, raw)  # raises PayloadError, saying why
            raise
        return values
    return read


def _array(datatype: int, raw: bytes) -> Any:
    code = _ARRAYS.get(datatype)
    if code is not None:
        try:
            values = array.array(code, raw)
        except ValueError:
            size = array.array(code).itemsize
            raise PayloadError(f"{DATATYPES[datatype]} of {len(raw)} bytes is not a whole"
                               f" number of {size}-byte values") from None
        if _BIG_ENDIAN:  # Sparkplug's arrays are little-endian
            values.byteswap()
        return [when(v) for v in values] if datatype == 34 else values.tolist()
    if datatype == 32:  # BooleanArray: a 4-byte count, then the bits, first in the high bit
        if len(raw) < 4:
            raise PayloadError("BooleanArray shorter than its 4-byte count")
        count = struct.unpack("<I", raw[:4])[0]
        bits = raw[4:]
        if len(bits) * 8 < count:
            raise PayloadError(f"BooleanArray of {count} values has {len(bits)} bytes")
        return [bool(bits[i // 8] & (0x80 >> (i % 8))) for i in range(count)]
    if datatype == 33:
        return _strings(raw)
    return base64.b64encode(raw).decode()  # Bytes, File, or unknown


def _string(raw: str | bytes) -> str:
    return text(raw, "a string value")


def _strings(raw: bytes) -> list[str]:
    """A StringArray: null-terminated UTF-8."""
    try:
        return raw.decode().split("\0")[:-1] if raw else []
    except UnicodeDecodeError as exc:
        raise PayloadError(f"StringArray is not UTF-8 ({exc.reason})") from None


def _dataset(raw: Any) -> dict[str, Any]:
    types = list(raw.types)
    rows = []
    for row in raw.rows:
        values = []
        for i, element in enumerate(row.elements):
            kind = element.WhichOneof("value")
            values.append(None if kind is None else _typed(
                types[i] if i < len(types) else 0, getattr(element, kind), kind))
        rows.append(values)
    return {"columns": [text(c, "a DataSet column") for c in raw.columns],
            "types": [DATATYPES.get(t, str(t)) for t in types],
            "rows": rows}


def _template(raw: Any) -> dict[str, Any]:
    members = {}
    for m in raw.metrics:
        kind = m.WhichOneof("value")
        members[text(m.name, "a Template member's name")] = (
            None if m.is_null or kind is None else _typed(m.datatype, getattr(m, kind), kind))
    parameters = {}
    for p in raw.parameters:
        kind = p.WhichOneof("value")
        parameters[text(p.name, "a Template parameter's name")] = (
            None if kind is None else _typed(p.type, getattr(p, kind), kind))
    out: dict[str, Any] = {"metrics": members}
    if raw.HasField("template_ref"):
        out["template_ref"] = text(raw.template_ref, "a Template's template_ref")
    if raw.HasField("version"):
        out["version"] = text(raw.version, "a Template's version")
    if raw.is_definition:
        out["is_definition"] = True
    if parameters:
        out["parameters"] = parameters
    return out
