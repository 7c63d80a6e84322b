"""Define the continuous aggregates, and write them as SQL.

One spec drives both ``sql/100_continuous_aggregates.sql`` (regenerate with
``python -m bmsd.schema.aggregates > sql/100_continuous_aggregates.sql``; a test
checks the committed file matches) and the tests that compare every level
with a direct computation over the raw rows.

Every level keeps, per device and bucket, sums rather than averages: count,
sum and sum of squares of each main measure, so mean and standard deviation
are exact at every level (``bmsd_mean``/``bmsd_stddev`` compute them), and
min/max. Signed energies are kept as two separate non-negative sums (import
and export, charge and discharge). Buckets are in UTC.

Battery energy charged (discharged) in a bucket built from raw rows is the
mean over the bucket's samples of the charging (discharging) part of power,
zero otherwise, times the time the samples cover: n samples spanning
``last - first`` seconds cover ``n * span / (n - 1)`` seconds (each sample
stands for one mean sampling interval). A bucket with one sample has no
measurable interval and counts 0. Upper levels add up the hourly energies.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO


@dataclass(frozen=True)
class Column:
    """One aggregate column: how it is computed from raw rows and rolled up."""

    name: str
    base: str  # SQL aggregate over the raw hypertable
    rollup: str  # SQL aggregate over the level below ({name} is the column)


def stats(measure: str) -> list[Column]:
    """Return count, sum, sum of squares, min and max of a raw column."""
    m = measure
    return [
        Column(f"{m}_n", f"count({m})", "sum({name})::bigint"),
        Column(f"{m}_sum", f"sum({m})", "sum({name})"),
        Column(f"{m}_sumsq", f"sum({m} * {m})", "sum({name})"),
        Column(f"{m}_min", f"min({m})", "min({name})"),
        Column(f"{m}_max", f"max({m})", "max({name})"),
    ]


def total(name: str, measure: str, *, integer: bool = False) -> Column:
    """Return the sum of an interval quantity (energy, units)."""
    cast = "::bigint" if integer else ""
    return Column(name, f"sum({measure}){cast}", "sum({name})" + cast)


def split(positive: str, negative: str, measure: str) -> list[Column]:
    """Return separate sums of the positive and negative parts of a signed quantity."""
    return [
        Column(positive, f"sum(greatest({measure}, 0))", "sum({name})"),
        Column(negative, f"sum(greatest(-({measure}), 0))", "sum({name})"),
    ]


def count_if(name: str, condition: str) -> Column:
    """Return the number of readings meeting a condition."""
    return Column(name, f"sum(CASE WHEN {condition} THEN 1 ELSE 0 END)::bigint",
                  "sum({name})::bigint")


def lowest(name: str, measure: str) -> Column:
    return Column(name, f"min({measure})", "min({name})")


def highest(name: str, measure: str) -> Column:
    return Column(name, f"max({measure})", "max({name})")


def energy_from_power(charged: str, discharged: str, power: str, per_kw: float) -> list[Column]:
    """Return energy charged and discharged (kWh) from sampled power (< 0 charging).

    *per_kw* is how many units of *power* make a kW (1000 for W, 1 for kW).
    """
    def part(sign: str) -> str:
        return (
            f"CASE WHEN count({power}) > 1 THEN sum(greatest({sign}{power}, 0))"
            f" * extract(epoch FROM max(time) - min(time)) / (count({power}) - 1)"
            f" / {3600 * per_kw:g} ELSE 0 END"
        )
    return [
        Column(charged, part("-"), "sum({name})"),
        Column(discharged, part(""), "sum({name})"),
    ]


@dataclass(frozen=True)
class Level:
    """One continuous aggregate: its name, bucket width and source."""

    name: str
    width: str  # an SQL interval literal
    source: str  # raw hypertable or the level below
    from_raw: bool


@dataclass(frozen=True)
class Family:
    """The aggregate levels built over one raw hypertable."""

    table: str
    columns: tuple[Column, ...]
    levels: tuple[Level, ...]


def _levels(table: str, widths: list[tuple[str, str]]) -> tuple[Level, ...]:
    levels = []
    source = table
    for suffix, width in widths:
        name = f"{table}_{suffix}"
        levels.append(Level(name, width, source, from_raw=source == table))
        source = name
    return tuple(levels)


HOURLY_DAILY = [("1h", "1 hour"), ("1d", "1 day")]
STATES = ("running", "idle", "stopped", "fault", "maintenance")

FAMILIES: tuple[Family, ...] = (
    Family(
        "energy_readings",
        (
            *stats("power_kw"),
            total("energy_kwh_sum", "energy_kwh"),
            *stats("voltage"),
            *stats("current"),
            *stats("power_factor"),
            *stats("frequency"),
        ),
        _levels("energy_readings",
                [("1m", "1 minute"), ("15m", "15 minutes"), ("1h", "1 hour"), ("1d", "1 day")]),
    ),
    Family(
        "site_telemetry",
        (
            *[c for m in ("battery_voltage", "battery_current", "battery_charge_level",
                          "battery_temperature", "battery_state_of_health", "battery_power_kw",
                          "solar_power_kw", "solar_efficiency", "inverter1_power_kw",
                          "inverter1_temperature", "inverter2_power_kw", "inverter2_temperature",
                          "grid_voltage", "grid_frequency", "grid_power_kw", "load_power_kw")
              for c in stats(m)],
            total("solar_energy_kwh_sum", "solar_energy_kwh"),
            total("load_energy_kwh_sum", "load_energy_kwh"),
            *split("grid_import_kwh", "grid_export_kwh", "grid_energy_kwh"),
            *energy_from_power("battery_charged_kwh", "battery_discharged_kwh",
                               "battery_power_kw", per_kw=1),
        ),
        _levels("site_telemetry", HOURLY_DAILY),
    ),
    Family(
        "battery_telemetry",
        (
            *[c for m in ("voltage", "current", "power_w", "temperature", "soc", "soh",
                          "internal_resistance", "cell_temperature_spread", "data_quality",
                          "communication_latency_ms")
              for c in stats(m)],
            lowest("cell_voltage_min", "min_cell_voltage"),
            highest("cell_voltage_max", "max_cell_voltage"),
            lowest("cell_temperature_min", "min_cell_temperature"),
            highest("cell_temperature_max", "max_cell_temperature"),
            *energy_from_power("energy_charged_kwh", "energy_discharged_kwh", "power_w",
                               per_kw=1000),
            count_if("alarm_readings", "alarm_count > 0"),
            total("alarm_flags_sum", "alarm_count", integer=True),
            count_if("protection_readings",
                     "(over_voltage OR under_voltage OR over_current OR over_temperature)"),
        ),
        _levels("battery_telemetry", HOURLY_DAILY),
    ),
    Family(
        "production_data",
        (
            total("units_produced_sum", "units_produced", integer=True),
            total("units_rejected_sum", "units_rejected", integer=True),
            *stats("cycle_time_s"),
            *[count_if(f"{state}_readings", f"machine_state = '{state}'") for state in STATES],
        ),
        _levels("production_data", HOURLY_DAILY),
    ),
    Family(
        "environmental_data",
        (
            *stats("temperature"),
            *stats("humidity"),
            *stats("pressure_hpa"),
            *stats("co2_ppm"),
        ),
        _levels("environmental_data", HOURLY_DAILY),
    ),
)

_COMMON = (
    Column("readings", "count(*)", "sum({name})::bigint"),
    Column("first_time", "min(time)", "min({name})"),
    Column("last_time", "max(time)", "max({name})"),
)

# The header names this module's path when the script was first applied; an
# applied script never changes (bmsd_migrations keeps its checksum), so
# neither does it: the module is now bmsd/schema/aggregates.py.
_HEADER = """\
-- requires: timescaledb-community
-- bmsd schema 100: continuous aggregates, hierarchical, UTC buckets.
--
-- GENERATED by `python -m bmsd.aggregates`: edit bmsd/aggregates.py, then
-- regenerate. See that module's docstring for what every column means.
-- Created WITH NO DATA (no materialisation inside a migration transaction);
-- the refresh policies of 110 fill them, and materialized_only = false makes
-- the newest buckets answer from the level below in the meantime.

-- Mean and standard deviation (population) from count, sum, sum of squares.
CREATE FUNCTION bmsd_mean(n numeric, s double precision) RETURNS double precision
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT CASE WHEN n > 0 THEN s / n END';

CREATE FUNCTION bmsd_stddev(n numeric, s double precision, sq double precision)
    RETURNS double precision
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT CASE WHEN n > 0 THEN sqrt(greatest(sq / n - (s / n) ^ 2, 0)) END';
"""


# Per-site levels built over a device level with a join to devices (written by
# hand in sql/180): name -> the level it reads. Refreshed right after it.
SITE_LEVELS = {"energy_site_15m": "energy_readings_15m"}


def refresh_order(family: Family) -> list[str]:
    """Return the family's levels and the site levels over them, each after its source."""
    names = []
    for level in family.levels:
        names.append(level.name)
        names += [site for site, source in SITE_LEVELS.items() if source == level.name]
    return names


def level_sql(family: Family, level: Level) -> str:
    """Return the CREATE MATERIALIZED VIEW statement of one level."""
    columns = (*_COMMON, *family.columns)
    if level.from_raw:
        bucket = f"time_bucket(INTERVAL '{level.width}', time)"
        select = [f"{c.base} AS {c.name}" for c in columns]
    else:
        bucket = f"time_bucket(INTERVAL '{level.width}', bucket)"
        select = [f"{c.rollup.format(name=c.name)} AS {c.name}" for c in columns]
    body = ",\n       ".join([f"{bucket} AS bucket", "device_id", *select])
    return (
        f"CREATE MATERIALIZED VIEW {level.name}\n"
        "WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS\n"
        f"SELECT {body}\n"
        f"  FROM {level.source}\n"
        f" GROUP BY {bucket}, device_id\n"
        "WITH NO DATA;\n"
    )


def write_sql(out: TextIO) -> None:
    """Write the whole aggregates script."""
    out.write(_HEADER)
    for family in FAMILIES:
        for level in family.levels:
            out.write("\n" + level_sql(family, level))
    out.write(
        "\nINSERT INTO bmsd_migrations (name) VALUES ('100_continuous_aggregates.sql')"
        " ON CONFLICT (name) DO NOTHING;\n"
    )


if __name__ == "__main__":
    write_sql(sys.stdout)
