"""What a reading of each stream may hold: the pydantic models payloads are validated against.

One model per stream (bmsd/streams.py says which); its fields are the
hypertable's columns after ``time`` and ``device_id``, in COPY order
(`ReadingModel.columns`). Bounds here are physical plausibility, not alert
thresholds: a value outside them is a broken sensor or payload, and the
reading goes to the dead letter with the field named.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

Percent = Annotated[float | None, Field(ge=0, le=100)]
Temperature = Annotated[float | None, Field(ge=-60, le=150)]
GridFrequency = Annotated[float | None, Field(ge=40, le=70)]
NonNegative = Annotated[float | None, Field(ge=0)]
Number = float | None
# Site readings are stored as integers (sql/190), so their bounds must be finite:
# 10^12 (a petawatt, a terawatt-hour) times 10^3 still fits a bigint.
Signed = Annotated[float | None, Field(ge=-1e12, le=1e12)]
Amount = Annotated[float | None, Field(ge=0, le=1e12)]
MAX_CELLS = 1024
CellVoltage = Annotated[float, Field(ge=0, le=5.0)]
CellTemperature = Annotated[float, Field(ge=-60, le=150)]


class ReadingModel(BaseModel):
    """Fields shared by every stream's reading model."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, frozen=True,
                              str_max_length=256)
    #: Columns of the hypertable written by COPY, after time and device_id.
    columns: ClassVar[tuple[str, ...]]
    #: Fields stored as integers at this many decimal digits (the resolution
    #: kept: 1 stores 400.1 V as 4001); empty when the hypertable holds floats.
    digits: ClassVar[Mapping[str, int]] = {}


class SiteTelemetry(ReadingModel):
    """Site-level telemetry (BMS design); also accepts its camelCase names."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)
    #: Stored as integers at a sensor's usual resolution (sql/190): 0.1 V, A, %
    #: and degC, 0.01 kW, 0.001 kWh and Hz. A finer value is rounded to it.
    digits: ClassVar[Mapping[str, int]] = {
        "battery_voltage": 1, "battery_current": 1, "battery_charge_level": 1,
        "battery_temperature": 1, "battery_state_of_health": 1, "battery_power_kw": 2,
        "solar_power_kw": 2, "solar_energy_kwh": 3, "solar_efficiency": 1,
        "inverter1_power_kw": 2, "inverter1_efficiency": 1, "inverter1_temperature": 1,
        "inverter2_power_kw": 2, "inverter2_efficiency": 1, "inverter2_temperature": 1,
        "grid_voltage": 1, "grid_frequency": 3, "grid_power_kw": 2, "grid_energy_kwh": 3,
        "load_power_kw": 2, "load_energy_kwh": 3,
    }
    battery_voltage: Signed = None
    battery_current: Signed = None
    battery_charge_level: Percent = None
    battery_temperature: Temperature = None
    battery_state_of_health: Percent = None
    battery_power_kw: Signed = None
    solar_power_kw: Signed = None
    solar_energy_kwh: Amount = None
    solar_efficiency: Percent = None
    inverter1_power_kw: Signed = None
    inverter1_efficiency: Percent = None
    inverter1_temperature: Temperature = None
    inverter2_power_kw: Signed = None
    inverter2_efficiency: Percent = None
    inverter2_temperature: Temperature = None
    grid_voltage: Amount = None
    grid_frequency: GridFrequency = None
    grid_power_kw: Signed = None
    grid_energy_kwh: Signed = None
    load_power_kw: Signed = None
    load_energy_kwh: Amount = None


class BatteryTelemetry(ReadingModel):
    """Pack- and cell-level battery telemetry (PulseBMS design)."""

    voltage: NonNegative = None
    current: Number = None
    power_w: Number = None
    temperature: Temperature = None
    soc: Percent = None
    soh: Percent = None
    internal_resistance: NonNegative = None
    cell_voltages: Annotated[list[CellVoltage] | None, Field(max_length=MAX_CELLS)] = None
    cell_temperatures: Annotated[list[CellTemperature] | None, Field(max_length=MAX_CELLS)] = None
    balancing: Annotated[list[bool] | None, Field(max_length=MAX_CELLS)] = None
    alarm_flags: Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]] | None,
                           Field(max_length=64)] = None
    over_voltage: bool | None = None
    under_voltage: bool | None = None
    over_current: bool | None = None
    over_temperature: bool | None = None
    data_quality: Annotated[float | None, Field(ge=0, le=1)] = None
    firmware_version: Annotated[str | None, Field(max_length=64)] = None
    communication_latency_ms: NonNegative = None


class EnergyReading(ReadingModel):
    """Machine energy (EnMS design); energy_kwh is the interval's, not a total."""

    power_kw: Number = None
    energy_kwh: NonNegative = None
    voltage: NonNegative = None
    current: Number = None
    power_factor: Annotated[float | None, Field(ge=-1, le=1)] = None
    frequency: GridFrequency = None


class ProductionReading(ReadingModel):
    """Machine production (EnMS design); units counted since the previous reading."""

    units_produced: Annotated[int | None, Field(ge=0)] = None
    units_rejected: Annotated[int | None, Field(ge=0)] = None
    machine_state: Literal["running", "idle", "stopped", "fault", "maintenance"] | None = None
    cycle_time_s: NonNegative = None


class EnvironmentReading(ReadingModel):
    """Ambient conditions (EnMS design)."""

    temperature: Temperature = None
    humidity: Percent = None
    pressure_hpa: Annotated[float | None, Field(gt=0, le=2000)] = None
    co2_ppm: Annotated[float | None, Field(ge=0, le=100_000)] = None




for _model in ReadingModel.__subclasses__():
    _model.columns = tuple(_model.model_fields)
