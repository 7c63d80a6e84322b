"""The words of a refusal: where in a payload, what was wrong, by how much.

A dead letter's reason must let a gateway's developer fix the gateway
without reading bmsd's code: the field's path as sent, the value and the
bound it broke, a span of time in the unit a person would say.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from bmsd.ingest.shapes import NESTED_BATTERY

_NESTED_PATH = {flat: ".".join(path) for path, flat in NESTED_BATTERY.items()}


def span(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def location(loc: tuple[int | str, ...], nested: bool) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = _NESTED_PATH.get(part, part) if nested and not out else part
            out += f".{name}" if out else name
    return out or "(reading)"


def explain_error(err: Any) -> str:
    kind, ctx, value = err["type"], err.get("ctx", {}), err.get("input")
    if kind in ("less_than_equal", "less_than"):
        return f"value {_num(value)} above {_num(ctx.get('le', ctx.get('lt')))}"
    if kind in ("greater_than_equal", "greater_than"):
        return f"value {_num(value)} below {_num(ctx.get('ge', ctx.get('gt')))}"
    if kind == "finite_number":
        return "NaN and Infinity are not accepted"
    if kind in ("float_type", "float_parsing", "int_type", "int_parsing", "int_from_float"):
        return f"expected a number, got {value!r}"
    if kind == "too_long":
        return f"{ctx.get('actual_length')} items; at most {ctx.get('max_length')}"
    if kind == "literal_error":
        return f"{value!r} is not one of {ctx.get('expected')}"
    if kind in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {value!r}"
    return str(err["msg"])


def _num(value: object) -> str:
    """Print 100.0 as 100, keep 7.2 as 7.2."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
