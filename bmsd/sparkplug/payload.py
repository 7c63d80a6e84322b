"""Sparkplug B payloads: decoded with Google's protobuf runtime, from a schema stated here.

The schema is the ``Payload`` message of the Sparkplug 3.0 specification
(eclipse-sparkplug/sparkplug, chapter "Payloads", section "Google Protocol
Buffer Schema"), built at import as a descriptor: no generated code, no
.proto file in the repository. Extension fields are left out (unknown fields
are skipped by the parser). protobuf's C implementation (upb) parses.

`decode` returns what a message carries, values still as sent; values.py
turns a metric's value into Python by its datatype (which a data message may
leave out: the host takes it from the birth, host.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
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
#: through `name_of`, `alias_of` and values.py: a data
#: message's metrics are read field by field, no object built per metric.
Metric = Any


@dataclass(slots=True)
class Payload:
    timestamp: int | None  # ms since the epoch (`when`)
    seq: int | None
    metrics: Sequence[Metric]


def when(ms: int) -> datetime:
    """Return a Sparkplug timestamp (ms since the epoch, UTC) as a datetime; raise
    PayloadError if it is past what a datetime holds."""
    try:
        return datetime.fromtimestamp(ms / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        raise PayloadError(f"timestamp {ms} ms is not a time (past year 9999)") from None


def decode(data: bytes) -> Payload:
    """Decode a Sparkplug B payload; raise PayloadError if it is not one."""
    message: Any = PayloadMessage()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise PayloadError(f"not a Sparkplug B payload (protobuf: {exc})") from exc
    return Payload(message.timestamp or None, message.seq if message.HasField("seq") else None,
                   message.metrics)


def text(raw: str | bytes, what: str) -> str:
    """Return a string field as text; raise PayloadError if it is not UTF-8 (protobuf
    gives such a proto2 string as bytes)."""
    if isinstance(raw, str):
        return raw
    raise PayloadError(f"{what} is not UTF-8")


def name_of(metric: Metric) -> str | None:
    return text(metric.name, "a metric's name") or None  # "": proto2's default, not sent


def alias_of(metric: Metric) -> int | None:
    return int(metric.alias) if metric.HasField("alias") else None


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
