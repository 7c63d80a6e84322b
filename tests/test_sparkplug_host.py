"""The Sparkplug B host's state machine, without a broker: births, aliases, datatypes,
bdSeq, seq gaps and the reorder timeout, rebirth requests, deaths
(bmsd/sparkplug/host.py). tests/test_sparkplug.py runs an edge node of another
library against a running bmsd."""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bmsd.config import SparkplugConfig
from bmsd.sparkplug.host import Host
from bmsd.sparkplug.payload import BY_NAME, PayloadMessage

T0 = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
MS = int(T0.timestamp() * 1000)
CONFIG = SparkplugConfig.model_validate({"enabled": True, "reorder_timeout_s": 2,
                                         "rebirth_min_interval_s": 10, "map": [{
    "group": "plant", "device": "bms-*", "site": "{edge_node}", "name": "{device}",
    "stream": "battery_telemetry", "device_kind": "battery_pack",
    "metrics": {"Battery/SOC": "soc", "Battery/Voltage": {"field": "voltage",
                                                          "scale": 0.001}}}]})


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def payload(seq: int | None, *metrics: dict[str, Any], at: int = MS) -> bytes:
    message: Any = PayloadMessage()
    message.timestamp = at
    if seq is not None:
        message.seq = seq
    for spec in metrics:
        metric = message.metrics.add()
        for key, value in spec.items():
            if key == "datatype" and isinstance(value, str):
                value = BY_NAME[value]
            setattr(metric, key, value)
    return bytes(message.SerializeToString())


def birth(host: Host, bdseq: int = 0) -> None:
    out = host.receive("spBv1.0/plant/NBIRTH/edge-1", payload(
        0, {"name": "bdSeq", "datatype": "Int64", "long_value": bdseq},
        {"name": "Node Control/Rebirth", "datatype": "Boolean", "boolean_value": False},
        {"name": "Uptime", "alias": 1, "datatype": "Int64", "long_value": 5}), T0)
    assert [c.online for c in out.changes] == [True]
    out = host.receive("spBv1.0/plant/DBIRTH/edge-1/bms-1", payload(
        1, {"name": "Battery/SOC", "alias": 10, "datatype": "Float", "float_value": 50.0},
        {"name": "Battery/Voltage", "alias": 11, "datatype": "Int32", "int_value": 52000},
        {"name": "Cabinet/Door", "alias": 12, "datatype": "Boolean",
         "boolean_value": False}), T0)
    assert [(c.target.name, c.online) for c in out.changes] == [("bms-1", True)]


def test_data_by_alias_is_resolved_mapped_and_scaled_and_the_rest_kept_with_its_type() -> None:
    host = Host(CONFIG, Clock())
    birth(host)
    out = host.receive("spBv1.0/plant/DDATA/edge-1/bms-1", payload(
        2, {"alias": 10, "float_value": 48.5, "timestamp": MS + 1000},
        {"alias": 11, "int_value": 51000, "timestamp": MS + 1000},
        {"alias": 12, "boolean_value": True, "timestamp": MS + 2000}), T0)
    assert out.problems == []
    [reading] = out.readings
    assert (reading.target.site, reading.target.name, reading.target.stream) == (
        "edge-1", "bms-1", "battery_telemetry")
    assert (reading.time, reading.fields) == (T0 + timedelta(seconds=1),
                                              {"soc": 48.5, "voltage": 51.0})
    [door] = out.unmapped
    assert (door.name, door.datatype, door.value, door.time) == (
        "Cabinet/Door", "Boolean", True, T0 + timedelta(seconds=2))


ARRAYS = [("Int8Array", b"\xef\x7b", [-17, 123]),
          ("Int16Array", struct.pack("<2h", -30000, 30000), [-30000, 30000]),
          ("UInt32Array", struct.pack("<2I", 52, 3293969225), [52, 3293969225]),
          ("DoubleArray", struct.pack("<2d", 12.5, -1.25), [12.5, -1.25]),
          ("BooleanArray", b"\x0c\x00\x00\x00\x34\xd0",
           [False, False, True, True, False, True, False, False, True, True, False, True]),
          ("StringArray", b"ABC\x00hello\x00", ["ABC", "hello"]),
          ("DateTimeArray", struct.pack("<q", MS), [T0])]


@pytest.mark.parametrize(("datatype", "field", "sent", "expected"), [
    ("Int8", "int_value", 2**32 - 3, -3), ("Int8", "int_value", 253, -3),
    ("Int16", "int_value", 2**32 - 300, -300), ("Int32", "int_value", 2**32 - 1, -1),
    ("Int64", "long_value", 2**64 - 2, -2), ("UInt32", "int_value", 2**32 - 1, 2**32 - 1),
    ("UInt64", "long_value", 2**64 - 1, 2**64 - 1), ("Float", "float_value", 1.5, 1.5),
    ("Double", "double_value", 0.1, 0.1), ("Boolean", "boolean_value", True, True),
    ("String", "string_value", "ok", "ok"), ("Text", "string_value", "long", "long"),
    ("UUID", "string_value", "0b5e", "0b5e"), ("DateTime", "long_value", MS, T0),
    ("Bytes", "bytes_value", b"\x00\x01", "AAE="), ("File", "bytes_value", b"x", "eA=="),
    *[(name, "bytes_value", raw, values) for name, raw, values in ARRAYS],
])
def test_every_datatype_is_decoded(datatype: str, field: str, sent: Any, expected: Any) -> None:
    host = Host(CONFIG, Clock())
    out = host.receive("spBv1.0/plant/NBIRTH/edge-2", payload(
        0, {"name": "bdSeq", "datatype": "Int64", "long_value": 0},
        {"name": "m", "alias": 1, "datatype": datatype, field: sent}), T0)
    assert [(u.name, u.datatype, u.value) for u in out.unmapped] == [("m", datatype, expected)]
    data = host.receive("spBv1.0/plant/NDATA/edge-2", payload(1, {"alias": 1, field: sent}), T0)
    assert [u.value for u in data.unmapped] == [expected]  # the datatype from the birth


def test_null_values_datasets_and_templates_are_kept_whole() -> None:
    host = Host(CONFIG, Clock())
    message: Any = PayloadMessage()
    message.seq = 0
    message.metrics.add(name="bdSeq", datatype=BY_NAME["Int64"], long_value=0)
    message.metrics.add(name="nothing", datatype=BY_NAME["Double"], is_null=True)
    table = message.metrics.add(name="table", datatype=BY_NAME["DataSet"])
    table.dataset_value.num_of_columns = 2
    table.dataset_value.columns.extend(["a", "b"])
    table.dataset_value.types.extend([BY_NAME["Int32"], BY_NAME["String"]])
    row = table.dataset_value.rows.add()
    row.elements.add(int_value=2**32 - 1)
    row.elements.add(string_value="x")
    motor = message.metrics.add(name="motor", datatype=BY_NAME["Template"])
    motor.template_value.template_ref = "Motor"
    motor.template_value.metrics.add(name="rpm", datatype=BY_NAME["Int32"], int_value=1500)
    out = host.receive("spBv1.0/plant/NBIRTH/edge-3", message.SerializeToString(), T0)
    assert {u.name: u.value for u in out.unmapped} == {
        "nothing": None,
        "table": {"columns": ["a", "b"], "types": ["Int32", "String"], "rows": [[-1, "x"]]},
        "motor": {"template_ref": "Motor", "metrics": {"rpm": 1500}}}


def test_what_cannot_be_decoded_is_refused_with_its_reason() -> None:
    out = Host(CONFIG, Clock()).receive("spBv1.0/plant/NDATA/edge-1", b"\xff\xff\xff", T0)
    assert out.problems
    assert out.problems[0][0] == "not_sparkplug"
    out = Host(CONFIG, Clock()).receive("spBv1.0/plant", b"", T0)
    assert out.problems[0][0] == "bad_topic"


def test_a_data_message_off_its_birth_is_read_as_sent_or_refused_metric_by_metric() -> None:
    host = Host(CONFIG, Clock())
    host.receive("spBv1.0/plant/NBIRTH/edge-4", payload(
        0, {"name": "bdSeq", "datatype": "Int64", "long_value": 0},
        {"name": "cells", "alias": 1, "datatype": "DoubleArray", "bytes_value": b""},
        {"name": "flags", "alias": 2, "datatype": "StringArray", "bytes_value": b""},
        {"name": "temp", "alias": 3, "datatype": "Double", "double_value": 0.0},
        {"name": "count", "alias": 4, "datatype": "Int16", "int_value": 0}), T0)
    out = host.receive("spBv1.0/plant/NDATA/edge-4", payload(
        1, {"alias": 1, "bytes_value": b"\x00" * 7},  # not whole 8-byte values
        {"alias": 2, "bytes_value": b"\xff\x00"},  # not UTF-8
        {"alias": 3, "float_value": 1.5},  # another value field than the birth's
        {"alias": 4, "is_null": True}, {"alias": 4, "int_value": 2**16 - 3}), T0)
    assert [reason for _, reason in out.problems] == [
        "metric cells: DoubleArray of 7 bytes is not a whole number of 8-byte values",
        "metric flags: StringArray is not UTF-8 (invalid start byte)"]
    assert [(u.name, u.value) for u in out.unmapped] == [
        ("temp", 1.5), ("count", None), ("count", -3)]


def test_text_not_utf8_and_times_past_year_9999_are_refused_not_raised() -> None:
    host = Host(CONFIG, Clock())
    birth(host)
    out = host.receive("spBv1.0/plant/DDATA/edge-1/bms-1", payload(
        3, {"alias": 10, "float_value": 51.0, "timestamp": 2**62},
        {"name": "Caf\xe9", "datatype": "String", "string_value": "x"},
        {"name": "Cabinet/Door", "alias": 12, "boolean_value": True}), T0)
    assert [reason for _, reason in out.problems] == [
        "metric Battery/SOC: timestamp 4611686018427387904 ms is not a time (past year 9999)"]
    assert [(u.name, u.value) for u in out.unmapped] == [("Café", "x"), ("Cabinet/Door", True)]
    message: Any = PayloadMessage()
    message.seq = 4
    message.metrics.add(alias=12, boolean_value=False)
    raw = bytes(message.SerializeToString()) + b"\x12\x05\x0a\x03\xff\xfe\x00"  # a name
    out = host.receive("spBv1.0/plant/DDATA/edge-1/bms-1", raw, T0)
    assert out.problems == [("not_sparkplug", "a metric's name is not UTF-8")]
    assert [u.value for u in out.unmapped] == [False]


@pytest.mark.parametrize("bdseq", [{"datatype": "UInt64", "long_value": 2**64 - 1},
                                   {"datatype": "String", "string_value": "1"},
                                   {"datatype": "DateTime", "long_value": 2**62}])
def test_a_bdseq_that_is_no_bigint_counts_as_none(bdseq: dict[str, Any]) -> None:
    host = Host(CONFIG, Clock())
    out = host.receive("spBv1.0/plant/NBIRTH/edge-6", payload(0, {"name": "bdSeq", **bdseq}),
                       T0)
    assert [(c.online, c.bdseq) for c in out.changes] == [(True, None)]
    out = host.receive("spBv1.0/plant/NDEATH/edge-6", payload(None, {"name": "bdSeq", **bdseq}),
                       T0)
    assert [(c.online, c.bdseq) for c in out.changes] == [(False, None)]


def test_a_map_s_scale_applies_to_numbers_and_arrays_of_numbers_only() -> None:
    config = SparkplugConfig.model_validate({"enabled": True, "map": [{
        "device": "bms-*", "stream": "battery_telemetry", "metrics": {
            name: {"field": field, "scale": 0.001} for name, field in (
                ("mV", "voltage"), ("cells", "cell_voltages"), ("raw", "current"),
                ("fw", "firmware_version"), ("ok", "over_voltage"))}}]})
    host = Host(config, Clock())
    host.receive("spBv1.0/plant/NBIRTH/edge-5", payload(
        0, {"name": "bdSeq", "datatype": "Int64", "long_value": 0}), T0)
    host.receive("spBv1.0/plant/DBIRTH/edge-5/bms-1", payload(
        1, {"name": "mV", "alias": 1, "datatype": "Int32", "int_value": 2**32 - 52000},
        {"name": "cells", "alias": 2, "datatype": "DoubleArray",
         "bytes_value": struct.pack("<2d", 3300.0, 3310.0)},
        {"name": "raw", "alias": 3, "datatype": "Float", "float_value": 0.0},
        {"name": "fw", "alias": 4, "datatype": "String", "string_value": "1.2"},
        {"name": "ok", "alias": 5, "datatype": "Boolean", "boolean_value": True}), T0)
    out = host.receive("spBv1.0/plant/DDATA/edge-5/bms-1", payload(
        2, {"alias": 1, "int_value": 2**32 - 52000},
        {"alias": 2, "bytes_value": struct.pack("<2d", 3300.0, 3310.0)},
        {"alias": 3, "double_value": 2000.0},  # sent in another field than its birth's
        {"alias": 4, "string_value": "1.2"}, {"alias": 5, "boolean_value": True}), T0)
    [reading] = out.readings
    cells = reading.fields.pop("cell_voltages")
    assert cells == pytest.approx([3.3, 3.31])
    assert reading.fields == pytest.approx({
        "voltage": -52.0, "current": 2.0, "firmware_version": "1.2", "over_voltage": True})


def test_data_before_a_birth_or_an_unknown_alias_asks_for_a_rebirth_at_most_so_often() -> None:
    clock = Clock()
    host = Host(CONFIG, clock)
    out = host.receive("spBv1.0/plant/NDATA/edge-1", payload(5, {"alias": 10,
                                                                 "float_value": 1.0}), T0)
    assert (out.rebirths, [p[0] for p in out.problems]) == (
        ["spBv1.0/plant/NCMD/edge-1"], ["before_birth"])
    again = host.receive("spBv1.0/plant/NDATA/edge-1", payload(6), T0)
    assert again.rebirths == []  # within rebirth_min_interval_s
    clock.now = 11
    birth(host)
    out = host.receive("spBv1.0/plant/DDATA/edge-1/bms-1", payload(
        2, {"alias": 99, "float_value": 1.0}), T0)
    assert (out.rebirths, out.unknown_aliases) == (["spBv1.0/plant/NCMD/edge-1"], 1)


def test_a_seq_gap_not_filled_within_the_reorder_timeout_asks_for_a_rebirth() -> None:
    clock = Clock()
    host = Host(CONFIG, clock)
    birth(host)  # seq 0, 1
    for seq in (3, 2, 4):  # 2 late, within the timeout: no gap
        host.receive("spBv1.0/plant/DDATA/edge-1/bms-1", payload(seq), T0)
    clock.now = 5
    assert host.due() == []
    host.receive("spBv1.0/plant/DDATA/edge-1/bms-1", payload(6), T0)  # 5 never comes
    clock.now = 6
    assert host.due() == []
    clock.now = 7.5
    assert (host.due(), host.seq_gaps) == (["spBv1.0/plant/NCMD/edge-1"], 1)
    for seq in range(7, 256):  # seq wraps to 0 without a gap
        host.receive("spBv1.0/plant/DDATA/edge-1/bms-1", payload(seq), T0)
    host.receive("spBv1.0/plant/DDATA/edge-1/bms-1", payload(0), T0)
    clock.now = 100
    assert (host.due(), host.seq_gaps) == ([], 1)


def test_a_death_of_the_session_takes_node_and_devices_offline_an_older_one_nothing() -> None:
    host = Host(CONFIG, Clock())
    birth(host, bdseq=4)
    stale = host.receive("spBv1.0/plant/NDEATH/edge-1", payload(
        None, {"name": "bdSeq", "datatype": "Int64", "long_value": 3}), T0)
    assert stale.changes == []
    later = T0 + timedelta(minutes=1)
    out = host.receive("spBv1.0/plant/NDEATH/edge-1", payload(
        None, {"name": "bdSeq", "datatype": "Int64", "long_value": 4}), later)
    assert [(c.target.name, c.online, c.at) for c in out.changes] == [
        ("bms-1", False, later), ("edge-1", False, later)]
    # After the death, data by alias cannot be named; by name and datatype it can.
    data = host.receive("spBv1.0/plant/DDATA/edge-1/bms-1", payload(
        3, {"alias": 10, "float_value": 1.0},
        {"name": "Battery/SOC", "datatype": "Float", "float_value": 2.0}), later)
    assert [p[0] for p in data.problems] == ["before_birth"]
    assert [r.fields for r in data.readings] == [{"soc": 2.0}]


def test_historical_metrics_are_stored_and_counted() -> None:
    host = Host(CONFIG, Clock())
    birth(host)
    out = host.receive("spBv1.0/plant/DDATA/edge-1/bms-1", payload(
        2, {"alias": 10, "float_value": 40.0, "timestamp": MS - 60_000, "is_historical": True},
        {"alias": 10, "float_value": 41.0, "timestamp": MS}), T0)
    assert out.historical == 1
    assert sorted((r.time, r.fields["soc"], r.historical) for r in out.readings) == [
        (T0 - timedelta(minutes=1), 40.0, True), (T0, 41.0, False)]
