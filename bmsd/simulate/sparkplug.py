"""Simulated sites whose battery packs speak Sparkplug B (``bmsd simulate --sparkplug``).

A chosen share of the sites are edge nodes of group ``demo`` (DEMO_MAP, the
map bmsd needs to store them as battery packs, is shipped in
compose/bmsd.toml and written by scripts/demo): the same readings the JSON
simulation makes, as an NBIRTH per site, a DBIRTH per pack (names, aliases,
datatypes, units), then DDATA by alias, seq running over 0-255. Other streams
stay JSON.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from bmsd.simulate.plan import Outgoing
from bmsd.sparkplug.payload import BY_NAME, PayloadMessage

GROUP = "demo"
#: Sparkplug metric -> (battery_telemetry field, datatype, unit).
METRICS: dict[str, tuple[str, str, str | None]] = {
    "Battery/Voltage": ("voltage", "Double", "V"),
    "Battery/Current": ("current", "Double", "A"),
    "Battery/Power": ("power_w", "Double", "W"),
    "Battery/Temperature": ("temperature", "Double", "°C"),
    "Battery/SOC": ("soc", "Double", "%"),
    "Battery/SOH": ("soh", "Double", "%"),
    "Cells/Voltages": ("cell_voltages", "DoubleArray", "V"),
    "Cells/Temperatures": ("cell_temperatures", "DoubleArray", "°C"),
    "Protection/OverVoltage": ("over_voltage", "Boolean", None),
    "Protection/OverTemperature": ("over_temperature", "Boolean", None),
    "Alarms": ("alarm_flags", "StringArray", None),
}
#: Metrics no map names: stored in sparkplug_metrics with their datatype and unit.
UNMAPPED = {"Firmware": "String", "Cabinet/DoorOpen": "Boolean"}
#: The [[sparkplug.map]] that stores these edge nodes' packs (compose/bmsd.toml).
DEMO_MAP: dict[str, Any] = {"group": GROUP, "device": "pack-*", "stream": "battery_telemetry",
            "device_kind": "battery_pack",
            "metrics": {name: spec[0] for name, spec in METRICS.items()}}
_ALIASES = {name: n for n, name in enumerate([*METRICS, *UNMAPPED], start=1)}


@dataclass
class _Node:
    seq: int = 0
    born: set[str] = field(default_factory=set)


def edge_nodes(messages: Iterable[Outgoing], share: float) -> Iterator[Outgoing]:
    """Return *messages* with the battery readings of *share* of the sites (the first
    ones, by name) as Sparkplug B messages."""
    nodes: dict[str, _Node] = {}
    sites: dict[str, bool] = {}
    for message in messages:
        parts = message.topic.split("/")
        if message.stream != "battery_telemetry" or not message.valid or len(parts) != 4:
            yield message
            continue
        site, device = parts[1], parts[2]
        n = len(sites)  # sites spread evenly: with 0.5, every second one
        chosen = sites.setdefault(site, share >= 1 or int((n + 1) * share) > int(n * share))
        if not chosen:
            yield message
            continue
        reading = json.loads(message.payload)
        node = nodes.get(site)
        if node is None:
            node = nodes[site] = _Node()
            yield _message(message, f"spBv1.0/{GROUP}/NBIRTH/{site}", _birth_of_node(message.at))
        if device not in node.born:
            node.born.add(device)
            node.seq = (node.seq + 1) % 256
            yield _message(message, f"spBv1.0/{GROUP}/DBIRTH/{site}/{device}",
                           _payload(reading, message.at, node.seq, birth=True))
        node.seq = (node.seq + 1) % 256
        yield _message(message, f"spBv1.0/{GROUP}/DDATA/{site}/{device}",
                       _payload(reading, message.at, node.seq, birth=False))


def _message(like: Outgoing, topic: str, payload: bytes) -> Outgoing:
    return replace(like, topic=topic, payload=payload)


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _birth_of_node(at: datetime) -> bytes:
    message: Any = PayloadMessage()
    message.timestamp, message.seq = _ms(at), 0
    message.metrics.add(name="bdSeq", datatype=BY_NAME["Int64"], long_value=0)
    message.metrics.add(name="Node Control/Rebirth", datatype=BY_NAME["Boolean"],
                        boolean_value=False)
    return bytes(message.SerializeToString())


def _payload(reading: dict[str, Any], at: datetime, seq: int, birth: bool) -> bytes:
    message: Any = PayloadMessage()
    message.timestamp, message.seq = _ms(at), seq
    values = {name: reading.get(spec[0]) for name, spec in METRICS.items()}
    values["Firmware"] = reading.get("firmware_version") or "1.0.0"
    values["Cabinet/DoorOpen"] = False
    for name, value in values.items():
        datatype = METRICS[name][1] if name in METRICS else UNMAPPED[name]
        metric = message.metrics.add(alias=_ALIASES[name], timestamp=_ms(at))
        if birth:
            metric.name, metric.datatype = name, BY_NAME[datatype]
            unit = METRICS[name][2] if name in METRICS else None
            if unit:
                metric.properties.keys.append("engUnit")
                metric.properties.values.add(type=BY_NAME["String"], string_value=unit)
        _set(metric, datatype, value)
    return bytes(message.SerializeToString())


def _set(metric: Any, datatype: str, value: Any) -> None:
    if value is None:
        metric.is_null = True
    elif datatype == "Double":
        metric.double_value = float(value)
    elif datatype == "Float":
        metric.float_value = float(value)
    elif datatype == "Boolean":
        metric.boolean_value = bool(value)
    elif datatype == "String":
        metric.string_value = str(value)
    elif datatype == "DoubleArray":
        metric.bytes_value = struct.pack(f"<{len(value)}d", *value)
    elif datatype == "StringArray":
        metric.bytes_value = b"".join(s.encode() + b"\0" for s in value)
