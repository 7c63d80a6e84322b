"""The shapes a reading may come in: the PulseBMS battery document, nested by
section, flattened to the model's fields; its time as ``timestamp`` (ISO 8601
with an offset) or ``ts`` (epoch seconds or milliseconds), or none."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

NESTED_SECTIONS = ("measurements", "cell_data", "safety", "metadata")
# The nested PulseBMS document: (section, key) -> flat field.
NESTED_BATTERY: dict[tuple[str, ...], str] = {
    ("measurements", "voltage"): "voltage",
    ("measurements", "current"): "current",
    ("measurements", "power"): "power_w",
    ("measurements", "temperature"): "temperature",
    ("measurements", "soc"): "soc",
    ("measurements", "soh"): "soh",
    ("measurements", "internal_resistance"): "internal_resistance",
    ("cell_data", "voltages"): "cell_voltages",
    ("cell_data", "temperatures"): "cell_temperatures",
    ("cell_data", "balancing_status"): "balancing",
    ("safety", "alarm_flags"): "alarm_flags",
    ("safety", "protection_status", "overvoltage"): "over_voltage",
    ("safety", "protection_status", "undervoltage"): "under_voltage",
    ("safety", "protection_status", "overcurrent"): "over_current",
    ("safety", "protection_status", "overtemperature"): "over_temperature",
    ("metadata", "data_quality"): "data_quality",
    ("metadata", "firmware_version"): "firmware_version",
    ("metadata", "communication_latency"): "communication_latency_ms",
}


def json_type(value: object) -> str:
    names = {str: "a string", int: "a number", float: "a number", bool: "true/false",
             list: "an array", type(None): "null"}
    return names.get(type(value), type(value).__name__)




def flatten_battery(document: Mapping[str, Any]) -> dict[str, Any] | str:
    """Flatten the nested PulseBMS document; unknown nested keys go to extra."""
    flat: dict[str, Any] = {k: v for k, v in document.items() if k not in NESTED_SECTIONS}
    for section in NESTED_SECTIONS:
        if section not in document:
            continue
        content = document[section]
        if not isinstance(content, dict):
            return f"{section}: must be a JSON object"
        for key, value in content.items():
            path: tuple[str, ...] = (section, key)
            if key == "protection_status" and section == "safety":
                if not isinstance(value, dict):
                    return "safety.protection_status: must be a JSON object"
                for flag, state in value.items():
                    field = NESTED_BATTERY.get((*path, flag))
                    if field:
                        flat[field] = state
                    else:
                        flat[f"{section}.{key}.{flag}"] = state
                continue
            field = NESTED_BATTERY.get(path)
            flat[field or f"{section}.{key}"] = value
    return flat


def reading_time(item: dict[str, Any], received_at: datetime) -> tuple[datetime, bool] | str:
    """Pop the reading's time from *item*: ``timestamp`` (ISO 8601) or ``ts`` (epoch).

    Return the time and whether the reading carried one (else: arrival time).
    """
    if "timestamp" in item:
        raw = item.pop("timestamp")
        if not isinstance(raw, str):
            return f"timestamp: expected an ISO 8601 string, got {json_type(raw)}"
        try:
            when = datetime.fromisoformat(raw)
        except ValueError:
            return f"timestamp: {raw!r} is not ISO 8601 (e.g. 2026-05-01T12:00:00Z)"
        if when.tzinfo is None:
            return (f"timestamp: {raw!r} has no UTC offset; add Z or +01:00 so its instant"
                    " is unambiguous")
        return when.astimezone(UTC), True
    if "ts" in item:
        raw = item.pop("ts")
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
            return f"ts: expected epoch seconds or milliseconds as a number, got {raw!r}"
        # Epoch milliseconds are told apart by size: 1e11 s is the year 5138.
        seconds = raw / 1000 if abs(raw) >= 1e11 else raw
        try:
            return datetime.fromtimestamp(seconds, UTC), True
        except (OverflowError, OSError, ValueError):
            return f"ts: {raw!r} is not a representable time"
    return received_at, False
