"""What a rule compares: each rule prepared once (`prepared`), fitted to a device's
own limits (`device_checks`), and the batch-wide shortcuts that find nothing to
do without looking at every reading (`quiet`, `breaches`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter, sub
from typing import Any

from bmsd.alerts.rules import DERIVED, OPS, Derived, Rule
from bmsd.alerts.state import DeviceInfo


def quiet(prepared: list[Check], devices: list[tuple[DeviceInfo, list[Sequence[Any]]]],
           limits: Mapping[int, Mapping[str, float]], fields: Mapping[str, int],
           flags_at: list[int]) -> bool:
    """Return whether no reading of *devices* (each with its new readings) breaches a
    rule at the device's thresholds or carries a flag.

    The readings are checked together, in as few groups as their thresholds
    allow: the rules' own thresholds (every rule of the stream, whether it
    watches the device or not: a breach only sends the devices to the exact
    check) for devices of each nominal grid frequency, a device's own
    thresholds where it has safety limits.
    """
    groups: dict[tuple[int, int | None], list[Sequence[Any]]] = {}
    for device, series in devices:
        own = device.id if limits.get(device.id) else None
        rows = groups.get((device.nominal_grid_frequency_hz, own))
        if rows is None:
            groups[(device.nominal_grid_frequency_hz, own)] = list(series)
        else:
            rows += series
    owners = {device.id: device for device, _ in devices}
    for (nominal, own), rows in groups.items():
        if any(any(map(itemgetter(i), rows)) for i in flags_at):
            return False
        checks = prepared if own is None else device_checks(prepared, owners[own], limits[own])
        if breaches(checks, rows, fields, {"nominal_grid_frequency_hz": nominal}):
            return False
    return True


def breaches(checks: Iterable[Check], series: Sequence[Sequence[Any]],
              fields: Mapping[str, int], facts: Mapping[str, Any]) -> bool:
    """Return whether any reading of *series* (tuples, with *fields* where in them each
    field sits) breaches the threshold of any of *checks*.

    The operators are monotonic, so comparing the highest value (lowest, for
    ``<`` and ``<=``) decides for all readings at once; a field is read once
    for all the checks that use it (a battery's cell arrays feed five).
    """
    columns: dict[str, list[Any]] = {}  # a field's values in the series
    reductions: dict[tuple[str, Any], list[Any]] = {}  # max, min, ... of each value

    def reduced(name: str, of: Callable[[Any], float]) -> list[Any]:
        values = reductions.get((name, of))
        if values is None:
            values = reductions[(name, of)] = list(map(of, columns[name]))
        return values

    for check in checks:
        name = check.source
        column = columns.get(name)
        if column is None:
            at = fields.get(name)
            column = columns[name] = [] if at is None else [
                v for row in series if (v := row[at]) is not None and v == v and v != []]
        if not column:
            continue
        derive = check.derive
        if derive is None:
            values = column
        elif derive.of is None:
            assert derive.of_device is not None
            values = [derive.of_device(x, facts) for x in column]
        elif derive.less is None:
            values = reduced(name, derive.of)
        else:  # a spread: both reductions are likely wanted by other checks too
            values = list(map(sub, reduced(name, derive.of), reduced(name, derive.less)))
        extreme = _EXTREME[check.upward](values)
        if extreme != extreme:  # a derived NaN: max and min return it only when it comes first
            extreme = _EXTREME[check.upward]((v for v in values if v == v), default=None)
        if extreme is not None and check.breached(extreme, check.threshold):
            return True
    return False


_EXTREME: dict[bool, Any] = {True: max, False: min}  # by check.upward


@dataclass(frozen=True, slots=True)
class Check:
    """A rule made ready for one device: its value, its operator and thresholds."""

    rule: Rule
    value: Callable[[Mapping[str, Any], Mapping[str, Any]], Any]  # (fields, device facts)
    source: str  # the stored field it reads
    derive: Derived | None  # how the value is computed from that field; None: it is the value
    breached: Callable[[float, float], bool]
    upward: bool  # breached above the threshold (> or >=), else below
    threshold: float
    clear: float


def prepared(rule: Rule) -> Check:
    """Return *rule* as a check at its own thresholds (once per rule and batch)."""
    derive = DERIVED.get(rule.stream, {}).get(rule.value)
    value, source = ((_field_reader(rule.value), rule.value) if derive is None
                     else (derive, derive.source))
    return Check(rule, value, source, derive, OPS[rule.op], rule.op[0] == ">",
                  *rule.thresholds(None))


def _field_reader(name: str) -> Callable[[Mapping[str, Any], Mapping[str, Any]], Any]:
    return lambda fields, _facts: fields.get(name)


def device_checks(prepared: Iterable[Check], device: DeviceInfo,
            limits: Mapping[str, float] | None) -> list[Check]:
    """Return the *prepared* checks that watch *device*, at its thresholds (once per
    device and batch)."""
    out = []
    for check in prepared:
        rule = check.rule
        if not rule.applies(device.kind, device.site):
            continue
        if limits and rule.limit is not None:  # else: the rule's own thresholds
            check = Check(rule, check.value, check.source, check.derive, check.breached,
                           check.upward, *rule.thresholds(limits))
        out.append(check)
    return out
