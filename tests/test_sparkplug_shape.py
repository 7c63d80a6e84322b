"""Data messages read by their shape (bmsd/sparkplug/shape.py) mean what protobuf reads.

A host that reads by shape and one that never does (max_shapes=0) are given
the same random messages: births, then data messages that mostly repeat their
layout and sometimes do not (values of another width, a metric left out, null
or sent in another value field, times that differ, history, an unknown alias,
a seq gap) and, in one message in ten, a byte changed anywhere. Every outcome
must be the same, and most data messages must have been read by shape.
"""

from __future__ import annotations

import random
import struct
from datetime import UTC, datetime
from typing import Any

import pytest

from bmsd.config import SparkplugConfig
from bmsd.sparkplug import shape
from bmsd.sparkplug.host import Host
from bmsd.sparkplug.outcome import Outcome
from bmsd.sparkplug.payload import BY_NAME, PayloadMessage

T0 = datetime(2026, 12, 1, tzinfo=UTC)
MS = int(T0.timestamp() * 1000)
# metric -> (datatype, value field)
METRICS = {"d": ("Double", "double_value"), "f": ("Float", "float_value"),
           "i8": ("Int8", "int_value"), "i32": ("Int32", "int_value"),
           "i64": ("Int64", "long_value"), "u16": ("UInt16", "int_value"),
           "u64": ("UInt64", "long_value"), "b": ("Boolean", "boolean_value"),
           "s": ("String", "string_value"), "t": ("DateTime", "long_value"),
           "da": ("DoubleArray", "bytes_value"), "ia": ("Int16Array", "bytes_value"),
           "sa": ("StringArray", "bytes_value")}
# (the host maps names; what a field takes is checked later, by the ingestor)
FIELDS = ["voltage", "current", "power_w", "temperature", "soc", "soh", "internal_resistance",
          "cell_voltages", "cell_temperatures", "balancing", "alarm_flags", "over_voltage",
          "under_voltage"]
CONFIG = SparkplugConfig.model_validate({"enabled": True, "map": [{
    "group": "g", "device": "dev-*", "stream": "battery_telemetry",
    "metrics": {name: {"field": field, "scale": 0.5} if name in ("d", "i8", "da", "s")
                else field for name, field in zip(METRICS, FIELDS, strict=True)}}]})


def value(rng: random.Random, name: str) -> Any:
    datatype = METRICS[name][0]
    if datatype in ("Double", "Float"):
        return rng.choice([0.0, 1.5, -2.25, 1e300 if datatype == "Double" else 3.0])
    if datatype == "Boolean":
        return rng.random() < 0.5
    if datatype == "String":
        return rng.choice(["", "ok", "héllo"])
    if datatype == "DoubleArray":
        return struct.pack("<3d", rng.random(), 2.0, 3.0)
    if datatype == "Int16Array":
        return struct.pack("<2h", rng.randint(-5, 5), 7)
    if datatype == "StringArray":
        return rng.choice([b"", b"a\0", b"ab\0c\0"])
    if datatype == "DateTime":
        return MS + rng.randint(0, 10**6)
    bits = 64 if datatype in ("Int64", "UInt64") else 32
    return rng.choice([0, 1, 127, 128, 300, 2**bits - 1, rng.getrandbits(bits)])


USUAL = {name: value(random.Random(1), name) for name in METRICS}


def message(rng: random.Random, seq: int, names: list[str], aliases: dict[str, int],
            birth: bool) -> bytes:
    payload: Any = PayloadMessage()
    payload.timestamp = MS + rng.randint(0, 10**5)
    payload.seq = seq % 256
    stamp = MS + rng.randint(0, 10**7)
    for name in names:
        datatype, field = METRICS[name]
        metric = payload.metrics.add(alias=aliases.get(name, 999))
        if birth:
            metric.name, metric.datatype = name, BY_NAME[datatype]
        roll = rng.random()
        if not birth and roll < 0.01:
            metric.is_null = True
            continue
        if not birth and roll < 0.02 and field == "double_value":
            metric.float_value = 1.0
            continue
        if roll < 0.97 or birth:
            metric.timestamp = stamp
        elif roll < 0.985:
            metric.timestamp = stamp + 1
        else:
            metric.is_historical = True
            metric.timestamp = stamp
        # mostly a value of the usual width (the layout repeats), now and then any
        setattr(metric, field, value(rng, name) if rng.random() < 0.05 else USUAL[name])
    return bytes(payload.SerializeToString())


def take(host: Host, topic: str, payload: bytes) -> Outcome:
    """What a message means, as the ingestor takes it: by its shape, else decoded."""
    reading = host.read(topic, payload, T0)
    return Outcome(readings=[reading]) if reading else host.receive(topic, payload, T0)


def summary(out: Outcome) -> str:
    return repr((
        [(r.target.name, r.time, sorted(r.fields.items()), r.historical) for r in out.readings],
        [(u.name, u.datatype, u.value, u.time, u.historical) for u in out.unmapped],
        [(c.target.name, c.online) for c in out.changes], out.problems, out.rebirths,
        out.unknown_aliases, out.historical))


@pytest.mark.parametrize("seed", range(12))
def test_reading_by_shape_gives_what_protobuf_gives(seed: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    reads = {"shape": 0}
    read = shape.Shape.read

    def counted(self: shape.Shape, payload: bytes) -> shape.Read | None:
        got = read(self, payload)
        reads["shape"] += got is not None
        return got
    monkeypatch.setattr(shape.Shape, "read", counted)
    by_shape, by_protobuf = Host(CONFIG, lambda: 0.0), Host(CONFIG, lambda: 0.0, max_shapes=0)
    birth: Any = PayloadMessage()
    birth.seq = 0
    birth.metrics.add(name="bdSeq", datatype=BY_NAME["Int64"], long_value=0)
    sent = [("spBv1.0/g/NBIRTH/edge", bytes(birth.SerializeToString()))]
    devices = {f"dev-{n}": rng.sample(sorted(METRICS), rng.randint(1, 6)) for n in range(3)}
    aliases = {(device, name): 100 * n + i for n, (device, names) in enumerate(devices.items())
               for i, name in enumerate(names)}
    seq = 1
    for device, names in devices.items():
        mine = {name: aliases[(device, name)] for name in names}
        sent.append((f"spBv1.0/g/DBIRTH/edge/{device}", message(rng, seq, names, mine, True)))
        seq += 1
    data = 0
    for _ in range(300):
        device = rng.choice(list(devices))
        names = devices[device]
        mine = {name: aliases[(device, name)] for name in names}
        if rng.random() < 0.03:
            mine.pop(rng.choice(names))  # an alias the birth did not give
        if rng.random() < 0.05:
            names = names[:-1]  # a metric not sent
        payload = message(rng, seq, names, mine, False)
        if rng.random() < 0.1:
            at = rng.randrange(len(payload))
            payload = payload[:at] + bytes([rng.randrange(256)]) + payload[at + 1:]
        seq += 1 if rng.random() < 0.97 else 3  # a gap, now and then
        sent.append((f"spBv1.0/g/DDATA/edge/{device}", payload))
        data += 1
    for topic, payload in sent:
        assert summary(take(by_shape, topic, payload)) == \
            summary(take(by_protobuf, topic, payload)), (topic, payload)
    assert by_shape.due() == by_protobuf.due()
    assert by_shape.seq_gaps == by_protobuf.seq_gaps
    assert reads["shape"] > data // 3, f"only {reads['shape']} of {data} read by shape"


def test_shapes_kept_are_bounded_and_forgotten_at_a_birth(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = []
    read = shape.Shape.read
    monkeypatch.setattr(shape.Shape, "read", lambda self, payload: reads.append(1) or read(
        self, payload))
    host = Host(CONFIG, lambda: 0.0, max_shapes=2)
    rng = random.Random(7)
    names = ["d", "i32", "da"]

    def session(seq: int) -> int:
        birth: Any = PayloadMessage()
        birth.seq = seq % 256
        birth.metrics.add(name="bdSeq", datatype=BY_NAME["Int64"], long_value=0)
        host.receive("spBv1.0/g/NBIRTH/edge", bytes(birth.SerializeToString()), T0)
        for n in range(4):
            mine = {name: 10 * n + i for i, name in enumerate(names)}
            host.receive(f"spBv1.0/g/DBIRTH/edge/dev-{n}",
                         message(rng, seq + 1 + n, names, mine, True), T0)
        return seq + 5

    seq = session(0)
    for _ in range(3):
        for n in range(4):
            mine = {name: 10 * n + i for i, name in enumerate(names)}
            out = take(host, f"spBv1.0/g/DDATA/edge/dev-{n}",
                       message(random.Random(1), seq, names, mine, False))
            assert len(out.readings) == 1
            seq += 1
    assert len(reads) == 2 * 2 + 2  # two devices' shapes (the first message learns)
    seq = session(seq)  # a new session: its aliases may differ, the shapes are forgotten
    reads.clear()
    for _ in range(2):  # so the last device, which had none, has one now
        take(host, "spBv1.0/g/DDATA/edge/dev-3", message(
            random.Random(1), seq, names, {"d": 30, "i32": 31, "da": 32}, False))
        seq += 1
    assert len(reads) == 2  # learned (and read back), then read by shape


@pytest.mark.parametrize("seed", range(4))
def test_no_message_however_damaged_makes_the_host_raise(seed: int) -> None:
    # Births with every kind of value (a DataSet, a Template, properties), data
    # and deaths, each with bytes changed, cut or added: whatever the host cannot
    # use it must say (a problem, dead-lettered), not raise: a message that
    # raised would stop bmsd, and its gateway would send it again.
    rng = random.Random(seed)
    host = Host(CONFIG, lambda: 0.0)
    names = sorted(METRICS)
    aliases = {name: i + 1 for i, name in enumerate(names)}
    birth: Any = PayloadMessage()
    birth.seq = 0
    birth.metrics.add(name="bdSeq", datatype=BY_NAME["Int64"], long_value=0)
    table = birth.metrics.add(name="table", datatype=BY_NAME["DataSet"])
    table.dataset_value.columns.append("a")
    table.dataset_value.types.append(BY_NAME["Int32"])
    table.dataset_value.rows.add().elements.add(int_value=5)
    motor = birth.metrics.add(name="motor", datatype=BY_NAME["Template"])
    motor.template_value.metrics.add(name="rpm", datatype=BY_NAME["Int8"], int_value=200)
    volts = birth.metrics.add(name="volts", datatype=BY_NAME["Double"], double_value=1.0)
    volts.properties.keys.append("engUnit")
    volts.properties.values.add(type=BY_NAME["String"], string_value="V")
    sound = [("spBv1.0/g/NBIRTH/edge", bytes(birth.SerializeToString())),
             ("spBv1.0/g/DBIRTH/edge/dev-1", message(rng, 1, names, aliases, True)),
             *[("spBv1.0/g/DDATA/edge/dev-1", message(rng, 2 + k, names, aliases, False))
               for k in range(10)],
             ("spBv1.0/g/NDATA/edge", message(rng, 12, names[:3], {}, True)),
             ("spBv1.0/g/DDEATH/edge/dev-1", bytes(PayloadMessage(seq=13).SerializeToString())),
             ("spBv1.0/g/NDEATH/edge", bytes(birth.SerializeToString()))]
    problems = 0
    for _ in range(2500):
        topic, payload = rng.choice(sound)
        damaged = bytearray(payload)
        for _ in range(rng.choice([0, 1, 1, 2, 5])):
            at = rng.randrange(len(damaged) + 1)
            if rng.random() < 0.7 and at < len(damaged):
                damaged[at] = rng.randrange(256)
            elif rng.random() < 0.5 and at < len(damaged):
                del damaged[at]
            else:
                damaged.insert(at, rng.randrange(256))
        problems += len(take(host, topic, bytes(damaged)).problems)
        host.due()
    assert problems > 100  # the damage was seen, and said
