"""Alert rules: what a reading is compared with, and the shipped defaults.

A rule watches one value of one stream - a stored field, or a derived one
such as ``grid_frequency_deviation`` - with an operator and a threshold,
clears at its own clear threshold (hysteresis), and may need the condition
to hold for ``for_s`` seconds. A rule that names a ``limit`` takes its
threshold, per device, from the active ``safety_constraints`` row, keeping
the rule's gap between threshold and clear threshold.
"""

from __future__ import annotations

import fnmatch
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bmsd.config_text import explain, read_toml
from bmsd.errors import ConfigError
from bmsd.resources import package_file
from bmsd.streams import BY_NAME, Stream

Severity = Literal["info", "warning", "error", "critical"]
#: From the least to the most severe.
SEVERITIES: tuple[str, ...] = get_args(Severity)
OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


@dataclass(frozen=True, slots=True)
class Derived:
    """A value computed from one field of a reading, its *source*: *of* the
    source's value (less *less* of it, for a spread), or *of_device* that value
    and the device's facts. A reading whose source is unset (or an empty array)
    has no such value."""

    source: str
    of: Callable[[Any], float] | None = None
    less: Callable[[Any], float] | None = None
    of_device: Callable[[Any, Mapping[str, Any]], float] | None = None

    def __call__(self, fields: Mapping[str, Any], facts: Mapping[str, Any]) -> float | None:
        value = fields.get(self.source)
        if value is None or value == []:
            return None
        if self.of is None:
            assert self.of_device is not None
            return self.of_device(value, facts)
        return self.of(value) - self.less(value) if self.less else self.of(value)


#: Values computed from a reading rather than stored as such.
DERIVED: dict[str, dict[str, Derived]] = {
    "battery_telemetry": {
        "max_cell_voltage": Derived("cell_voltages", max),
        "min_cell_voltage": Derived("cell_voltages", min),
        "max_cell_temperature": Derived("cell_temperatures", max),
        "min_cell_temperature": Derived("cell_temperatures", min),
        "cell_temperature_spread": Derived("cell_temperatures", max, less=min),
    },
    "site_telemetry": {
        "grid_frequency_deviation": Derived(
            "grid_frequency", of_device=lambda f, d: abs(f - d["nominal_grid_frequency_hz"])),
    },
}
#: safety_constraints columns a rule may take its threshold from.
SAFETY_LIMITS = ("max_cell_voltage", "min_cell_voltage", "max_charge_current",
          "max_discharge_current", "max_cell_temperature", "min_cell_temperature",
          "max_temperature_delta", "max_soc", "min_soc")


class Rule(BaseModel):
    """One threshold rule."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    code: Annotated[str, Field(pattern=r"^[A-Z][A-Z0-9_]*$", max_length=64)]
    title: str
    stream: Stream
    value: str
    op: Literal["<", "<=", ">", ">="]
    threshold: float
    clear: float | None = None  # default: the threshold
    for_s: Annotated[float, Field(ge=0)] = 0
    severity: Severity
    category: str
    message: str = "{device} at {site}: {title} ({value} against {threshold})"
    device_kind: str | None = None
    site: str | None = None  # a shell-style pattern of site slugs
    limit: Literal[SAFETY_LIMITS] | None = None  # type: ignore[valid-type]
    limit_sign: Literal[1, -1] = 1  # -1: the limit is a magnitude, the value negative

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        known = set(BY_NAME[self.stream].model.columns) | set(DERIVED.get(self.stream, {}))
        if self.value not in known:
            raise ValueError(f"rule {self.code}: {self.stream} has no value {self.value!r};"
                             f" known: {', '.join(sorted(known))}")
        clear = self.threshold if self.clear is None else self.clear
        if (self.op in ("<", "<=") and clear < self.threshold) or (
                self.op in (">", ">=") and clear > self.threshold):
            raise ValueError(f"rule {self.code}: the clear threshold {clear} must lie on the"
                             f" safe side of the threshold {self.threshold}")
        try:
            self.message.format(value=0.0, threshold=0.0, site="s", device="d", title="t")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"rule {self.code}: message template: {exc}; use {{value}},"
                             " {threshold}, {site}, {device}, {title}") from exc
        return self

    def applies(self, kind: str, site: str) -> bool:
        """Return whether the rule watches devices of *kind* at *site*."""
        if self.device_kind is not None and kind != self.device_kind:
            return False
        return self.site is None or fnmatch.fnmatchcase(site, self.site)

    def thresholds(self, limits: Mapping[str, float] | None) -> tuple[float, float]:
        """Return (threshold, clear) for a device with these safety limits."""
        clear = self.threshold if self.clear is None else self.clear
        if self.limit is not None and limits and limits.get(self.limit) is not None:
            threshold = float(limits[self.limit]) * self.limit_sign
            return threshold, threshold + (clear - self.threshold)
        return self.threshold, clear

    def breached(self, value: float, threshold: float) -> bool:
        return OPS[self.op](value, threshold)

    def cleared(self, value: float, clear: float) -> bool:
        """Return whether *value* reached the clear threshold from the unsafe side."""
        return value >= clear if self.op in ("<", "<=") else value <= clear


class RuleSet(BaseModel):
    """The rules file: a list of ``[[rules]]`` tables."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    rules: tuple[Rule, ...]

    @model_validator(mode="after")
    def _distinct(self) -> RuleSet:
        codes = [r.code for r in self.rules]
        doubled = sorted({c for c in codes if codes.count(c) > 1})
        if doubled:
            raise ValueError(f"rule codes must be unique; twice: {', '.join(doubled)}")
        return self


DEFAULT_RULES_PATH = package_file("defaults", "alerts.toml")


def load_rules(path: Path | None = None) -> tuple[Rule, ...]:
    """Read and validate a rules file (default: the shipped config/alerts.toml)."""
    path = path or DEFAULT_RULES_PATH
    raw = read_toml(path, "no such rules file ([alerts] rules_file)")
    try:
        return RuleSet.model_validate(raw).rules
    except ValidationError as exc:
        raise ConfigError(explain(str(path), "the alert rules", exc, "config/alerts.toml")
                          ) from exc
