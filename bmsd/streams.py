"""What a stream is, in one table: every module that needs to know reads it here.

A stream is one hypertable fed by one kind of reading. Its spec says which
payload model validates it (bmsd/models.py), its default topic and
the kind given to devices registered through it, and whether its readings
are a battery pack's (the nested PulseBMS form, cell arrays, protection and
alarm flags). Its continuous aggregates are defined by
bmsd/schema/aggregates.py under the same name. A sixth stream is one entry
here, its model, and its SQL (a hypertable, and ``device_streams``' check).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator

from bmsd.models import (
    BatteryTelemetry,
    EnergyReading,
    EnvironmentReading,
    ProductionReading,
    ReadingModel,
    SiteTelemetry,
)


@dataclass(frozen=True)
class StreamSpec:
    """One stream: its hypertable, payload model, default route and nature."""

    name: str  # the table or view of its readings, and its name in routes and rules
    label: str  # short name in reasons; the default topic's last level
    model: type[ReadingModel]
    topic: str  # the default route
    device_kind: str  # given to devices first seen through the default route
    pack: bool = False  # a battery pack's readings: nested form, cells, flags

    @property
    def site_kind(self) -> str:
        """Return the kind of site whose devices send this stream (a factory's topics
        start with factory/)."""
        return "factory" if self.topic.startswith("factory/") else "site"

    @property
    def scaled_table(self) -> str | None:
        """Return the hypertable of integers this stream is stored in, if any.

        A stream whose model declares ``digits`` is stored, on the community
        edition (sql/190), in ``<name>_scaled`` as integers; *name* is then
        a view giving engineering units, which every reader uses.
        """
        return f"{self.name}_scaled" if self.model.digits else None


SPECS: tuple[StreamSpec, ...] = (
    StreamSpec("site_telemetry", "telemetry", SiteTelemetry,
               "site/{site}/{device}/telemetry", "site_controller"),
    StreamSpec("battery_telemetry", "battery", BatteryTelemetry,
               "site/{site}/{device}/battery", "battery_pack", pack=True),
    StreamSpec("energy_readings", "energy", EnergyReading,
               "factory/{site}/{device}/energy", "machine"),
    StreamSpec("production_data", "production", ProductionReading,
               "factory/{site}/{device}/production", "machine"),
    StreamSpec("environmental_data", "environment", EnvironmentReading,
               "factory/{site}/{device}/environment", "sensor"),
)
BY_NAME: dict[str, StreamSpec] = {spec.name: spec for spec in SPECS}
NAMES: tuple[str, ...] = tuple(BY_NAME)

def _known(name: str) -> str:
    if name not in BY_NAME:
        quoted = [f"'{n}'" for n in NAMES]
        raise ValueError(f"Input should be {', '.join(quoted[:-1])} or {quoted[-1]}")
    return name


#: A stream's name, as configuration and rules give it: one of the table's.
Stream = Annotated[str, AfterValidator(_known)]
