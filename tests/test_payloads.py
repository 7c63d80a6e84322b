"""Payload parsing and validation: pure functions, no servers."""

from __future__ import annotations

import itertools
import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bmsd.ingest.payloads import Parsed, ReadingBounds, _parse_each, _parse_valid, parse_message
from bmsd.simulate.plan import Options, plan
from bmsd.streams import BY_NAME, NAMES
from tests.fix_report import Record, Scenario

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
LIMITS = ReadingBounds()


def parse(stream: str, payload: Any) -> Parsed:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return parse_message(stream, raw, NOW, LIMITS)


def values(stream: str, parsed: Parsed, index: int = 0) -> dict[str, Any]:
    return dict(zip(BY_NAME[stream].model.columns, parsed.readings[index].values, strict=True))


def reasons(parsed: Parsed) -> list[str]:
    return [r.reason for r in parsed.rejects]


def test_seed_camel_case_site_telemetry_is_accepted_and_unknown_fields_kept() -> None:
    # The BMS background document's ingestion example, as a gateway sends it.
    parsed = parse("site_telemetry", {
        "siteId": 1, "timestamp": "2026-05-01T11:59:00Z", "batteryVoltage": 502.5,
        "batteryCurrent": 45.2, "batteryChargeLevel": 85.5, "batteryTemperature": 25.3,
        "batteryStateOfHealth": 98.5, "solarPowerKw": 18.5, "gridPowerKw": -2.5,
        "loadPowerKw": 16.0, "gridFrequency": 59.98, "inverter1PowerKw": 9.1,
    })
    assert parsed.rejects == []
    reading = parsed.readings[0]
    assert reading.time == datetime(2026, 5, 1, 11, 59, tzinfo=UTC)
    assert reading.timestamped
    got = values("site_telemetry", parsed)
    assert got["battery_voltage"] == 502.5
    assert got["battery_state_of_health"] == 98.5
    assert got["grid_power_kw"] == -2.5
    assert got["grid_frequency"] == 59.98
    assert got["inverter1_power_kw"] == 9.1
    assert reading.extra == {"siteId": 1}


def test_snake_case_names_work_too() -> None:
    parsed = parse("site_telemetry", {"battery_charge_level": 40, "load_energy_kwh": 0.2})
    assert values("site_telemetry", parsed)["battery_charge_level"] == 40
    assert parsed.readings[0].extra is None


def test_nested_pulsebms_document_is_flattened() -> None:
    parsed = parse("battery_telemetry", {
        "site_id": "site_001", "device_id": "battery_pack_001",
        "timestamp": "2026-05-01T11:58:00+02:00",
        "measurements": {"voltage": 400.5, "current": -25.3, "power": -10126.5,
                         "temperature": 23.7, "soc": 67.5, "soh": 87.2,
                         "internal_resistance": 0.045},
        "cell_data": {"voltages": [3.45, 3.46, 3.44], "temperatures": [23.1, 23.9, 22.8],
                      "balancing_status": [0, 1, 0]},
        "safety": {"alarm_flags": ["high_temp_warning"],
                   "protection_status": {"overvoltage": False, "undervoltage": False,
                                         "overcurrent": True, "overtemperature": False}},
        "metadata": {"data_quality": 0.98, "source": "edge_device", "firmware_version": "1.2.3",
                     "communication_latency": 85},
        "day": "2026-05-01", "hour": 9,
    })
    assert reasons(parsed) == []
    got = values("battery_telemetry", parsed)
    assert parsed.readings[0].time == datetime(2026, 5, 1, 9, 58, tzinfo=UTC)
    assert got["voltage"] == 400.5
    assert got["power_w"] == -10126.5
    assert got["cell_voltages"] == [3.45, 3.46, 3.44]
    assert got["balancing"] == [False, True, False]
    assert got["alarm_flags"] == ["high_temp_warning"]
    assert (got["over_voltage"], got["over_current"]) == (False, True)
    assert got["firmware_version"] == "1.2.3"
    assert got["communication_latency_ms"] == 85
    assert parsed.readings[0].extra == {
        "site_id": "site_001", "device_id": "battery_pack_001", "day": "2026-05-01",
        "hour": 9, "metadata.source": "edge_device"}


def test_a_bad_nested_value_is_reported_at_its_nested_path() -> None:
    parsed = parse("battery_telemetry", {"cell_data": {"voltages": [3.4, 3.5, 3.3, 7.2]}})
    assert reasons(parsed) == ["battery.cell_data.voltages[3]: value 7.2 above 5"]


@pytest.mark.parametrize(("stream", "reading", "reason"), [
    ("battery_telemetry", {"soc": 104}, "battery.soc: value 104 above 100"),
    ("battery_telemetry", {"soh": -1}, "battery.soh: value -1 below 0"),
    ("site_telemetry", {"gridFrequency": 80}, "telemetry.gridFrequency: value 80 above 70"),
    ("site_telemetry", {"batteryTemperature": -90},
     "telemetry.batteryTemperature: value -90 below -60"),
    ("energy_readings", {"power_factor": 1.5}, "energy.power_factor: value 1.5 above 1"),
    ("energy_readings", {"energy_kwh": -0.1}, "energy.energy_kwh: value -0.1 below 0"),
    ("energy_readings", {"power_kw": "lots"}, "energy.power_kw: expected a number, got 'lots'"),
    ("production_data", {"units_produced": -3}, "production.units_produced: value -3 below 0"),
    ("production_data", {"machine_state": "broken"},
     "production.machine_state: 'broken' is not one of 'running', 'idle', 'stopped',"
     " 'fault' or 'maintenance'"),
    ("environmental_data", {"humidity": 120}, "environment.humidity: value 120 above 100"),
    ("battery_telemetry", {"cell_voltages": [3.3] * 1025},
     "battery.cell_voltages: 1025 items; at most 1024"),
    ("battery_telemetry", {"cell_voltages": [3.3, 3.4], "cell_temperatures": [20.0]},
     "battery.cell arrays: lengths differ (cell_voltages has 2, cell_temperatures has 1);"
     " send one entry per cell in each"),
    ("battery_telemetry", {"over_voltage": "maybe"},
     "battery.over_voltage: expected true or false, got 'maybe'"),
])
def test_out_of_range_and_ill_typed_values_are_rejected_with_their_field(
    stream: str, reading: dict[str, Any], reason: str
) -> None:
    parsed = parse(stream, reading)
    assert parsed.readings == []
    assert [r.category for r in parsed.rejects] == ["invalid"]
    assert reasons(parsed) == [reason]


@pytest.mark.parametrize(("payload", "category", "fragment"), [
    (b"\xff\xfe{}", "not_utf8", "not UTF-8 text: byte 0xff at offset 0"),
    (b"{not json", "not_json", "payload is not JSON"),
    (b'{"power_kw": NaN}', "not_json", "NaN is not a JSON number"),
    (b'{"power_kw": Infinity}', "not_json", "Infinity is not a JSON number"),
    (b'"just a string"', "bad_shape", "payload is a JSON str"),
    (b"[]", "bad_shape", "no readings"),
    (b"[1, 2]", "bad_shape", "energy[0]: a reading must be a JSON object, not a number"),
])
def test_unreadable_payloads_are_rejected_whole(payload: bytes, category: str,
                                                fragment: str) -> None:
    parsed = parse_message("energy_readings", payload, NOW, LIMITS)
    assert parsed.readings == []
    assert parsed.rejects[0].category == category
    assert fragment in parsed.rejects[0].reason
    if category != "bad_shape" or b"[1" not in payload:
        assert parsed.rejects[0].payload == payload


def test_oversized_messages_are_rejected_without_parsing() -> None:
    payload = b'{"power_kw": 1, "pad": "' + b"x" * (LIMITS.max_message_bytes) + b'"}'
    parsed = parse_message("energy_readings", payload, NOW, LIMITS)
    assert [r.category for r in parsed.rejects] == ["too_large"]
    assert "larger than ingest.max_message_bytes (262144)" in parsed.rejects[0].reason


def test_in_an_array_only_the_bad_readings_are_rejected() -> None:
    for payload in ([{"soc": 10}, {"soc": 101}, {"soc": 30}],
                    {"readings": [{"soc": 10}, {"soc": 101}, {"soc": 30}]}):
        parsed = parse("battery_telemetry", payload)
        assert [values("battery_telemetry", parsed, i)["soc"] for i in range(2)] == [10, 30]
        assert reasons(parsed) == ["battery[1].soc: value 101 above 100"]
        assert parsed.rejects[0].index == 1
        assert json.loads(parsed.rejects[0].payload) == {"soc": 101}


@pytest.mark.parametrize(("stamp", "expected"), [
    ({"timestamp": "2026-05-01T11:00:00Z"}, datetime(2026, 5, 1, 11, tzinfo=UTC)),
    ({"timestamp": "2026-05-01T13:00:00+02:00"}, datetime(2026, 5, 1, 11, tzinfo=UTC)),
    ({"ts": 1777633200}, datetime(2026, 5, 1, 11, tzinfo=UTC)),
    ({"ts": 1777633200500}, datetime(2026, 5, 1, 11, 0, 0, 500000, tzinfo=UTC)),
    ({"ts": 1777633200.25}, datetime(2026, 5, 1, 11, 0, 0, 250000, tzinfo=UTC)),
])
def test_timestamps_in_every_accepted_form(stamp: dict[str, Any], expected: datetime) -> None:
    parsed = parse("environmental_data", {**stamp, "temperature": 20})
    assert parsed.readings[0].time == expected


def test_a_reading_without_time_gets_the_arrival_time() -> None:
    parsed = parse("environmental_data", {"temperature": 20})
    assert parsed.readings[0].time == NOW
    assert not parsed.readings[0].timestamped


@pytest.mark.parametrize(("stamp", "category", "fragment"), [
    ({"timestamp": "2026-05-01T11:00:00"}, "invalid", "has no UTC offset"),
    ({"timestamp": "yesterday"}, "invalid", "is not ISO 8601"),
    ({"timestamp": 1777633200}, "invalid", "expected an ISO 8601 string"),
    ({"ts": "1777633200"}, "invalid", "expected epoch seconds or milliseconds"),
    ({"ts": 0}, "too_old", "(ingest.max_reading_age_s) are not accepted"),
    ({"timestamp": "2026-01-31T11:00:00Z"}, "too_old", "is 90.0 days old"),
    ({"timestamp": "2026-05-01T12:06:00Z"}, "in_future", "is 6 min in the future"),
])
def test_bad_and_implausible_times_are_rejected(stamp: dict[str, Any], category: str,
                                                fragment: str) -> None:
    parsed = parse("environmental_data", {**stamp, "temperature": 20})
    assert parsed.readings == []
    assert parsed.rejects[0].category == category
    assert fragment in parsed.rejects[0].reason


def test_readings_within_the_limits_are_accepted() -> None:
    almost_old = NOW - LIMITS.max_reading_age + timedelta(minutes=1)
    almost_future = NOW + LIMITS.max_future - timedelta(seconds=1)
    for when in (almost_old, almost_future):
        parsed = parse("environmental_data", {"timestamp": when.isoformat(), "humidity": 40})
        assert parsed.rejects == []


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(stream=st.sampled_from(NAMES), document=json_values)
def test_any_json_document_gives_readings_or_reasons_never_an_exception(
    stream: str, document: Any
) -> None:
    payload = json.dumps(document).encode()
    parsed = parse_message(stream, payload, NOW, LIMITS)
    assert parsed.readings or parsed.rejects
    assert all(r.reason for r in parsed.rejects)
    assert parsed == _parse_each(BY_NAME[stream], payload, NOW, LIMITS)


@settings(max_examples=300, deadline=None)
@given(stream=st.sampled_from(NAMES), payload=st.binary(max_size=200))
def test_any_bytes_give_readings_or_reasons_never_an_exception(stream: str,
                                                               payload: bytes) -> None:
    parsed = parse_message(stream, payload, NOW, LIMITS)
    assert parsed.readings or parsed.rejects


@pytest.mark.parametrize(("document", "category", "fragment"), [
    ({"readings": "x"}, "bad_shape", "readings is a string; a gateway batch is"),
    ({"readings": {"soc": 1}}, "bad_shape", "readings is"),
    ({"readings": [{"soc": 50}], "gateway": "gw-1"}, "bad_shape", "also gateway"),
    ({"timestamp": "2026-05-01T12:00:00Z"}, "no_measurement", "no measurement"),
    ({"timestamp": "2026-05-01T12:00:00Z", "colour": "red"}, "no_measurement",
     "it carried only colour"),
])
def test_a_message_that_would_store_an_empty_row_is_a_dead_letter(
    document: dict[str, Any], category: str, fragment: str
) -> None:
    parsed = parse("battery_telemetry", document)
    assert parsed.readings == []
    assert [r.category for r in parsed.rejects] == [category]
    assert fragment in parsed.rejects[0].reason


def test_in_a_batch_an_empty_reading_or_a_non_object_is_rejected_alone() -> None:
    parsed = parse("battery_telemetry", {"readings": [
        {"timestamp": "2026-05-01T12:00:00Z", "soc": 50}, "x",
        {"timestamp": "2026-05-01T12:00:01Z"}, {"timestamp": "2026-05-01T12:00:02Z", "soc": 51}]})
    assert [r.index for r in parsed.readings] == [0, 3]
    assert [(r.index, r.category) for r in parsed.rejects] == [(1, "bad_shape"),
                                                               (2, "no_measurement")]


_ODD_NUMBERS = ["1e308", "-1e308", "1e309", "-0", "0.0000000001", "12345678901234567890123",
                "NaN", "Infinity", "-Infinity", "1.7976931348623157e308", "5e-324"]
_ODD_TEXT = ["", "\u0000", "\ud7ff", "💥", "é" * 300, "\\u0000", '"', "\u202e"]


def _random_document(rng: random.Random, depth: int = 0) -> str:
    """Return JSON text (sometimes not quite JSON) with what gateways get wrong."""
    roll = rng.random()
    if depth > 3 or roll < 0.3:
        return rng.choice([rng.choice(_ODD_NUMBERS), json.dumps(rng.choice(_ODD_TEXT)),
                           "true", "null", str(rng.randint(-10**6, 10**6)),
                           json.dumps(rng.uniform(-1e6, 1e6))])
    if roll < 0.5:
        items = [_random_document(rng, depth + 1) for _ in range(rng.randint(0, 6))]
        return "[" + ",".join(items) + "]"
    fields = [*BY_NAME[rng.choice(NAMES)].model.columns,
              "timestamp", "ts", "readings", "measurements", "cell_data", "safety", "x"]
    keys = [rng.choice(fields) for _ in range(rng.randint(0, 8))]  # duplicates too
    pairs = []
    for key in keys:
        if key == "timestamp":
            value = json.dumps(rng.choice(["2026-05-01T11:59:00Z", "2026-05-01", "x", None,
                                           1777636740]))
        elif key == "ts":
            value = rng.choice(["1777636740", "1777636740000", "-1", "1e30"])
        else:
            value = _random_document(rng, depth + 1)
        pairs.append(f"{json.dumps(key)}:{value}")
    return "{" + ",".join(pairs) + "}"


def test_a_hundred_thousand_hostile_payloads_end_as_readings_or_reasons(
    reliability: Record,
) -> None:
    rng = random.Random(100_000)  # the same inputs every run
    limits = ReadingBounds(max_message_bytes=64 * 1024)
    readings = rejects = one_pass = 0
    for n in range(100_000):
        stream = NAMES[n % len(NAMES)]
        if n % 10 == 0:
            payload = rng.randbytes(rng.randint(0, 300))
        else:
            payload = _random_document(rng).encode("utf-8", "surrogatepass")
            if n % 1000 == 0:  # a large array within the byte limit
                payload = b"[" + b",".join([b'{"soc": 50}'] * 2000) + b"]"
            elif n % 1000 == 1:  # nesting deeper than the JSON parser recurses
                payload = b'{"readings": ' + b"[" * 30000 + b"]" * 30000 + b"}"
        parsed = parse_message(stream, payload, NOW, limits)
        assert parsed.readings or parsed.rejects, payload
        # The one-pass validation and the reading by reading path agree.
        if len(payload) <= limits.max_message_bytes:
            assert parsed == _parse_each(BY_NAME[stream], payload, NOW, limits), payload
            one_pass += _parse_valid(BY_NAME[stream], payload, NOW, limits) is not None
        readings += len(parsed.readings)
        rejects += len(parsed.rejects)
        for reject in parsed.rejects:
            assert reject.reason, payload
            assert reject.category, payload
            # The raw bytes: the whole message, or the one reading of an array.
            if reject.index is None:
                assert reject.payload == payload
            else:
                assert reject.payload
    assert one_pass > 100  # the one-pass path was taken too, not only the other
    reliability(Scenario("10^5 hostile payloads (parser only, no servers)", 100_000, readings,
                         0, rejects, note="no unhandled exception; every reject has a category,"
                                          " a reason and its raw bytes; published: inputs,"
                                          " stored: readings parsed"))


@pytest.mark.parametrize("per_message", [1, 3])
def test_what_gateways_send_is_validated_in_one_pass(per_message: int) -> None:
    """The fast path takes every stream's valid messages, returning what the other would."""
    start = NOW - timedelta(hours=1)
    messages = list(itertools.islice(plan(Options(messages=2000, start=start, alerts=0.1,
                                                  per_message=per_message)), 2000))
    assert {m.stream for m in messages} == set(NAMES)
    for m in messages:
        spec = BY_NAME[m.stream]
        one_pass = _parse_valid(spec, m.payload, m.at, LIMITS)
        assert one_pass is not None, m.payload
        assert one_pass == _parse_each(spec, m.payload, m.at, LIMITS)
        assert len(one_pass.readings) == m.valid
        assert not one_pass.rejects


@pytest.mark.parametrize("payload", [
    b'{"power_kw": 1, "power_kw": 2, "timestamp": "2026-05-01T11:59:00Z"}',  # last wins
    b'{"readings": [{"power_kw": 1}], "readings": [{"power_kw": 2}]}',
    b'{"timestamp": "2026-05-01T11:58:00Z", "timestamp": "2026-05-01T11:59:00Z", "power_kw": 3}',
    b'{"note": "\\ud800", "power_kw": 3}',  # a lone surrogate
    b'{"note": "\\u0000", "power_kw": 3}',
    b'{"n": 123456789012345678901234567890, "power_kw": 1.0000000000000002}',
    b'{"n": -0.0, "power_kw": -0.0}',
    b'{"\\u0072eadings": [{"power_kw": 1}], "power_kw": 5}',  # "readings", escaped
    b'\xef\xbb\xbf{"power_kw": 1}',  # a byte order mark
    b'[]',
    b'{"timestamp": null, "power_kw": 1}',  # not absent: refused, not given the arrival time
    b'{"timestamp": 1777636740, "power_kw": 1}',
    b'{"timestamp": "2026-05-01T11:59:00+02:00", "ts": 1, "power_kw": 1}',  # ts: extra
])
def test_odd_but_decodable_json_gives_the_same_from_either_path(payload: bytes) -> None:
    spec = BY_NAME["energy_readings"]
    assert parse_message(spec.name, payload, NOW, LIMITS) == _parse_each(spec, payload, NOW,
                                                                         LIMITS)


@pytest.mark.parametrize(("stream", "payload"), [
    # a field by its camelCase name, by its own, or by both
    ("site_telemetry", b'{"batteryVoltage": 400.1, "timestamp": "2026-05-01T11:59:00Z"}'),
    ("site_telemetry", b'{"batteryVoltage": 400.1, "battery_voltage": 400.2}'),
    ("site_telemetry", b'{"battery_voltage": 400.2, "batteryVoltage": 400.1}'),
    ("site_telemetry", b'[{"gridFrequency": 50.01}, {"grid_frequency": 80}]'),
    # a pack's cell arrays, of one length or not, and its nested form
    ("battery_telemetry", b'{"cell_voltages": [3.3, 3.4], "cell_temperatures": [20, 21]}'),
    ("battery_telemetry", b'{"cell_voltages": [3.3], "balancing": [true, false]}'),
    ("battery_telemetry", b'{"readings": [{"soc": 5}, {"measurements": {"soc": 6}}]}'),
    ("battery_telemetry", b'{"soc": 5, "cell_data": 1}'),
    # NaN and Infinity, which are not JSON, in a field, a cell, an extra field, or a string
    ("battery_telemetry", b'{"soc": 5, "cell_voltages": [3.3, NaN]}'),
    ("production_data", b'{"units_produced": Infinity}'),
    ("energy_readings", b'{"readings": [{"power_kw": 1}, {"power_kw": 2, "x": [-Infinity]}]}'),
    ("energy_readings", b'[{"power_kw": 1, "note": {"v": NaN}}]'),
    ("energy_readings", b'{"power_kw": 1, "note": "NaN"}'),
])
def test_each_streams_odd_fields_give_the_same_from_either_path(stream: str,
                                                                payload: bytes) -> None:
    spec = BY_NAME[stream]
    assert parse_message(stream, payload, NOW, LIMITS) == _parse_each(spec, payload, NOW, LIMITS)
