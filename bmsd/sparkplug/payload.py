"""Sparkplug B payloads: decoded with Google's protobuf runtime, from a schema stated here.

The schema is the ``Payload`` message of the Sparkplug 3.0 specification
(eclipse-sparkplug/sparkplug, chapter "Payloads", section "Google Protocol
Buffer Schema"), built at import as a descriptor: no generated code, no
.proto file in the repository. Extension fields are left out (unknown fields
are skipped by the parser). protobuf's C implementation (upb) parses.

`decode` returns what a message carries, values still as sent;
`value_of` turns a metric's value into Python by its datatype (which a data
message may leave out: the host takes it from the birth, host.py).
"""

from __future__ import annotations

import array
import base64
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

_F = descriptor_pb2.FieldDescriptorProto
_U32, _U64, _FLOAT, _DOUBLE = _F.TYPE_UINT32, _F.TYPE_UINT64, _F.TYPE_FLOAT, _F.TYPE_DOUBLE
_BOOL, _STRING, _BYTES, _MSG = _F.TYPE_BOOL, _F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_MESSAGE
_PACKAGE = "bmsd.sparkplug_b"
# The value oneofs: (name, number, type) in the specification's order.
_SCALARS = (("int_value", _U32), ("long_value", _U64), ("float_value", _FLOAT),
            ("double_value", _DOUBLE), ("boolean_value", _BOOL), ("string_value", _STRING))


def _message(parent: Any, name: str,
             fields: list[tuple[str, int, int, str | None, bool, str | None]]) -> Any:
    """Add message *name* to *parent*; fields: (name, number, type, message type,
    repeated, oneof)."""
    message = parent.add(name=name)
    oneofs: dict[str, int] = {}
    for field_name, number, kind, type_name, repeated, oneof in fields:
        field = message.field.add(
            name=field_name, number=number, type=kind,
            label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
        if type_name:
            field.type_name = f".{_PACKAGE}.Payload.{type_name}"
        if oneof:
            if oneof not in oneofs:
                oneofs[oneof] = len(message.oneof_decl)
                message.oneof_decl.add(name=oneof)
            field.oneof_index = oneofs[oneof]
    return message


def _oneof(first: int, *extra: tuple[str, int, str | None]) -> list[Any]:
    """The value oneof: the scalars numbered from *first*, then *extra* (name, number,
    message type; None: bytes)."""
    scalars = [(n, first + i, t, None, False, "value") for i, (n, t) in enumerate(_SCALARS)]
    return scalars + [(n, number, _MSG if t else _BYTES, t, False, "value")
                      for n, number, t in extra]


def _schema() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(name="bmsd/sparkplug_b.proto",
                                              package=_PACKAGE, syntax="proto2")
    payload = file.message_type.add(name="Payload")
    nested = payload.nested_type
    template = _message(nested, "Template", [
        ("version", 1, _STRING, None, False, None),
        ("metrics", 2, _MSG, "Metric", True, None),
        ("parameters", 3, _MSG, "Template.Parameter", True, None),
        ("template_ref", 4, _STRING, None, False, None),
        ("is_definition", 5, _BOOL, None, False, None)])
    _message(template.nested_type, "Parameter", [
        ("name", 1, _STRING, None, False, None), ("type", 2, _U32, None, False, None),
        *_oneof(3)])
    dataset = _message(nested, "DataSet", [
        ("num_of_columns", 1, _U64, None, False, None),
        ("columns", 2, _STRING, None, True, None), ("types", 3, _U32, None, True, None),
        ("rows", 4, _MSG, "DataSet.Row", True, None)])
    _message(dataset.nested_type, "DataSetValue", _oneof(1))
    _message(dataset.nested_type, "Row", [
        ("elements", 1, _MSG, "DataSet.DataSetValue", True, None)])
    _message(nested, "PropertyValue", [
        ("type", 1, _U32, None, False, None), ("is_null", 2, _BOOL, None, False, None),
        *_oneof(3, ("propertyset_value", 9, "PropertySet"),
                ("propertysets_value", 10, "PropertySetList"))])
    _message(nested, "PropertySet", [
        ("keys", 1, _STRING, None, True, None),
        ("values", 2, _MSG, "PropertyValue", True, None)])
    _message(nested, "PropertySetList", [
        ("propertyset", 1, _MSG, "PropertySet", True, None)])
    _message(nested, "MetaData", [
        ("is_multi_part", 1, _BOOL, None, False, None),
        ("content_type", 2, _STRING, None, False, None), ("size", 3, _U64, None, False, None),
        ("seq", 4, _U64, None, False, None), ("file_name", 5, _STRING, None, False, None),
        ("file_type", 6, _STRING, None, False, None), ("md5", 7, _STRING, None, False, None),
        ("description", 8, _STRING, None, False, None)])
    _message(nested, "Metric", [
        ("name", 1, _STRING, None, False, None), ("alias", 2, _U64, None, False, None),
        ("timestamp", 3, _U64, None, False, None), ("datatype", 4, _U32, None, False, None),
        ("is_historical", 5, _BOOL, None, False, None),
        ("is_transient", 6, _BOOL, None, False, None),
        ("is_null", 7, _BOOL, None, False, None),
        ("metadata", 8, _MSG, "MetaData", False, None),
        ("properties", 9, _MSG, "PropertySet", False, None),
        *_oneof(10, ("bytes_value", 16, None), ("dataset_value", 17, "DataSet"),
                ("template_value", 18, "Template"))])
    for name, number, kind, repeated in (("timestamp", 1, _U64, False),
                                         ("seq", 3, _U64, False), ("uuid", 4, _STRING, False),
                                         ("body", 5, _BYTES, False)):
        payload.field.add(name=name, number=number, type=kind,
                          label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
    payload.field.add(name="metrics", number=2, type=_MSG, label=_F.LABEL_REPEATED,
                      type_name=f".{_PACKAGE}.Payload.Metric")
    return file


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_schema())
#: The Sparkplug B Payload message class (tests and the bench build payloads with it).
PayloadMessage: type[Message] = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName(f"{_PACKAGE}.Payload"))

#: The datatypes of the specification, by number.
DATATYPES = {
    0: "Unknown", 1: "Int8", 2: "Int16", 3: "Int32", 4: "Int64", 5: "UInt8", 6: "UInt16",
    7: "UInt32", 8: "UInt64", 9: "Float", 10: "Double", 11: "Boolean", 12: "String",
    13: "DateTime", 14: "Text", 15: "UUID", 16: "DataSet", 17: "Bytes", 18: "File",
    19: "Template", 20: "PropertySet", 21: "PropertySetList", 22: "Int8Array",
    23: "Int16Array", 24: "Int32Array", 25: "Int64Array", 26: "UInt8Array",
    27: "UInt16Array", 28: "UInt32Array", 29: "UInt64Array", 30: "FloatArray",
    31: "DoubleArray", 32: "BooleanArray", 33: "StringArray", 34: "DateTimeArray"}
BY_NAME = {name: number for number, name in DATATYPES.items()}
#: Datatypes kept whole (as JSON), never mapped to a field: DataSet, Template,
#: PropertySet, PropertySetList.
WHOLE = frozenset((16, 19, 20, 21))


class PayloadError(ValueError):
    """A payload that cannot be decoded, with the reason."""


#: A decoded metric: the protobuf message itself (fields name, alias, timestamp,
#: datatype, is_historical, is_null, properties, and the value oneof). Read
#: through `name_of`, `alias_of`, `properties_of` and `value_of`: a data
#: message's metrics are read field by field, no object built per metric.
Metric = Any


@dataclass(slots=True)
class Payload:
    timestamp: int | None  # ms since the epoch (`when`)
    seq: int | None
    metrics: Sequence[Metric]


def when(ms: int) -> datetime:
    """Return a Sparkplug timestamp (ms since the epoch, UTC) as a datetime."""
    return datetime.fromtimestamp(ms / 1000, UTC)


def decode(data: bytes) -> Payload:
    """Decode a Sparkplug B payload; raise PayloadError if it is not one."""
    message: Any = PayloadMessage()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise PayloadError(f"not a Sparkplug B payload (protobuf: {exc})") from exc
    return Payload(message.timestamp or None, message.seq if message.HasField("seq") else None,
                   message.metrics)


def name_of(metric: Metric) -> str | None:
    return metric.name or None  # "" is proto2's default: not sent


def alias_of(metric: Metric) -> int | None:
    return int(metric.alias) if metric.HasField("alias") else None


def properties_of(metric: Metric) -> dict[str, Any]:
    return _properties(metric.properties) if metric.HasField("properties") else {}


def _properties(properties: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in zip(properties.keys, properties.values, strict=False):
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


#: Values that are what they were sent as, whatever the datatype.
AS_SENT = frozenset(("float_value", "double_value", "boolean_value", "string_value"))


def reader(datatype: int) -> tuple[str | None, Callable[[Any], Any] | None]:
    """Return the value field a metric of *datatype* is sent in, and what turns that
    field's value into Python (None: nothing, it is as sent); (None, None) for a
    datatype without one. A data message's metrics are read with the reader of their
    birth's datatype (host.py), `value_of` when they are sent otherwise."""
    kind = _FIELD_OF.get(datatype)
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
    return {"columns": list(raw.columns), "types": [DATATYPES.get(t, str(t)) for t in types],
            "rows": rows}


def _template(raw: Any) -> dict[str, Any]:
    members = {}
    for m in raw.metrics:
        kind = m.WhichOneof("value")
        members[m.name] = None if m.is_null or kind is None else _typed(
            m.datatype, getattr(m, kind), kind)
    parameters = {}
    for p in raw.parameters:
        kind = p.WhichOneof("value")
        parameters[p.name] = None if kind is None else _typed(p.type, getattr(p, kind), kind)
    out: dict[str, Any] = {"metrics": members}
    if raw.HasField("template_ref"):
        out["template_ref"] = raw.template_ref
    if raw.HasField("version"):
        out["version"] = raw.version
    if raw.is_definition:
        out["is_definition"] = True
    if parameters:
        out["parameters"] = parameters
    return out


def rebirth_request() -> bytes:
    """Return the NCMD payload asking an edge node for a rebirth (``Node
    Control/Rebirth`` = true)."""
    message: Any = PayloadMessage()
    message.timestamp = int(time.time() * 1000)
    metric = message.metrics.add()
    metric.name = "Node Control/Rebirth"
    metric.datatype = BY_NAME["Boolean"]
    metric.boolean_value = True
    return bytes(message.SerializeToString())
