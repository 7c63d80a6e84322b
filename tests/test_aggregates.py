"""Every continuous-aggregate level agrees with a direct computation over the raw rows.

A seeded data set with irregular sampling, gaps, NULLs and sign changes,
spanning hour and day boundaries, is written to every raw hypertable. For
each level the test computes in Python, from the raw rows alone: count,
first/last time, mean, population standard deviation, min, max, sums,
import/export and charge/discharge splits, state and alarm counts, and
battery energy charged/discharged as documented in bmsd.schema.aggregates (mean
charging power times the time the samples cover, hourly; daily = sum of
hours). It compares them first with what the aggregates answer in real time
(nothing materialised yet), then after refreshing every level bottom-up.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from bmsd.schema import aggregates
from tests.helpers import add_device, pause_refresh_policies
from tools.fleet import refresh

Row = dict[str, Any]
Check = Callable[[list[Row]], Any]
pytestmark = pytest.mark.community

WIDTHS = {"1 minute": 60, "15 minutes": 900, "1 hour": 3600, "1 day": 86400}
STATES = ["running", "idle", "stopped", "fault", "maintenance"]


def bucket_of(t: datetime, width_s: int) -> datetime:
    epoch = int(t.timestamp())
    return datetime.fromtimestamp(epoch - epoch % width_s, UTC)


def values(rows: list[Row], column: str) -> list[float]:
    return [r[column] for r in rows if r[column] is not None]


def sum_or_none(numbers: list[float]) -> float | None:
    """Sum like SQL: no values at all is "no data" (NULL), not 0."""
    return sum(numbers) if numbers else None


def total(column: str) -> Check:
    return lambda rows: sum_or_none(values(rows, column))


def positive(column: str) -> Check:
    return lambda rows: sum_or_none([max(v, 0.0) for v in values(rows, column)])


def negative(column: str) -> Check:
    return lambda rows: sum_or_none([max(-v, 0.0) for v in values(rows, column)])


def count_where(predicate: Callable[[Row], bool]) -> Check:
    return lambda rows: sum(1 for r in rows if predicate(r))


def lowest(column: str) -> Check:
    return lambda rows: min(values(rows, column), default=None)


def highest(column: str) -> Check:
    return lambda rows: max(values(rows, column), default=None)


def hourly_energy(column: str, charging: bool, per_kw: float) -> Check:
    """Energy (kWh) as documented: per hour, the mean charging (discharging)
    power over the samples times the time they cover; summed over hours."""
    def energy(rows: list[Row]) -> float:
        hours: dict[datetime, list[Row]] = defaultdict(list)
        for r in rows:
            hours[bucket_of(r["time"], 3600)].append(r)
        kwh = 0.0
        for hour_rows in hours.values():
            powers = values(hour_rows, column)
            if len(powers) < 2:
                continue
            parts = [max(-p if charging else p, 0.0) for p in powers]
            times = [r["time"] for r in hour_rows]
            span_s = (max(times) - min(times)).total_seconds()
            covered_s = len(powers) * span_s / (len(powers) - 1)
            kwh += statistics.fmean(parts) / per_kw * covered_s / 3600
        return kwh
    return energy


EXTRA_CHECKS: dict[str, dict[str, Check]] = {
    "energy_readings": {"energy_kwh_sum": total("energy_kwh")},
    "site_telemetry": {
        "solar_energy_kwh_sum": total("solar_energy_kwh"),
        "load_energy_kwh_sum": total("load_energy_kwh"),
        "grid_import_kwh": positive("grid_energy_kwh"),
        "grid_export_kwh": negative("grid_energy_kwh"),
        "battery_charged_kwh": hourly_energy("battery_power_kw", True, 1),
        "battery_discharged_kwh": hourly_energy("battery_power_kw", False, 1),
    },
    "battery_telemetry": {
        "cell_voltage_min": lowest("min_cell_voltage"),
        "cell_voltage_max": highest("max_cell_voltage"),
        "cell_temperature_min": lowest("min_cell_temperature"),
        "cell_temperature_max": highest("max_cell_temperature"),
        "energy_charged_kwh": hourly_energy("power_w", True, 1000),
        "energy_discharged_kwh": hourly_energy("power_w", False, 1000),
        "alarm_readings": count_where(lambda r: bool(r["alarm_flags"])),
        "alarm_flags_sum": lambda rows: sum(len(r["alarm_flags"] or []) for r in rows),
        "protection_readings": count_where(lambda r: any(
            r[k] for k in ("over_voltage", "under_voltage", "over_current", "over_temperature"))),
    },
    "production_data": {
        "units_produced_sum": total("units_produced"),
        "units_rejected_sum": total("units_rejected"),
        **{f"{s}_readings": count_where(lambda r, s=s: r["machine_state"] == s) for s in STATES},
    },
    "environmental_data": {},
}


def maybe(rng: random.Random, value: float, null_share: float = 0.05) -> float | None:
    return None if rng.random() < null_share else value


def generate(rng: random.Random, table: str, t: datetime) -> dict[str, Any]:
    """Return one raw reading of *table* at time *t*."""
    u = rng.uniform
    if table == "energy_readings":
        return {"power_kw": maybe(rng, u(0, 80)), "energy_kwh": maybe(rng, u(0, 1.5)),
                "voltage": maybe(rng, u(380, 420)), "current": maybe(rng, u(0, 120)),
                "power_factor": maybe(rng, u(0.7, 1)), "frequency": maybe(rng, u(49.8, 50.2))}
    if table == "site_telemetry":
        row = {m: maybe(rng, u(-50, 100)) for m in (
            "battery_voltage", "battery_current", "battery_temperature", "solar_efficiency",
            "inverter1_power_kw", "inverter1_temperature", "inverter2_power_kw",
            "inverter2_temperature", "grid_voltage", "load_power_kw", "solar_power_kw")}
        return row | {
            "battery_charge_level": maybe(rng, u(0, 100)),
            "battery_state_of_health": maybe(rng, u(80, 100)),
            "battery_power_kw": maybe(rng, u(-30, 30)), "grid_frequency": maybe(rng, u(49, 51)),
            "grid_power_kw": maybe(rng, u(-20, 20)), "grid_energy_kwh": maybe(rng, u(-1, 1)),
            "solar_energy_kwh": maybe(rng, u(0, 2)), "load_energy_kwh": maybe(rng, u(0, 2)),
        }
    if table == "battery_telemetry":
        cells = rng.randint(4, 8)
        return {
            "voltage": maybe(rng, u(380, 410)), "current": maybe(rng, u(-60, 60)),
            "power_w": maybe(rng, u(-20000, 20000)), "temperature": maybe(rng, u(15, 45)),
            "soc": maybe(rng, u(5, 95)), "soh": maybe(rng, u(80, 100)),
            "internal_resistance": maybe(rng, u(0.01, 0.09)),
            "cell_voltages": [round(u(3.0, 4.1), 3) for _ in range(cells)],
            "cell_temperatures": [round(u(15, 40), 2) for _ in range(cells)],
            "alarm_flags": rng.choice([None, [], ["high_temp_warning"], ["a", "b"]]),
            "over_voltage": rng.random() < 0.05, "under_voltage": False,
            "over_current": rng.random() < 0.03, "over_temperature": None,
            "data_quality": maybe(rng, u(0.8, 1)),
            "communication_latency_ms": maybe(rng, u(5, 200)),
        }
    if table == "production_data":
        return {"units_produced": rng.randint(0, 20), "units_rejected": rng.randint(0, 2),
                "machine_state": rng.choice(STATES), "cycle_time_s": maybe(rng, u(5, 60))}
    return {"temperature": maybe(rng, u(-5, 35)), "humidity": maybe(rng, u(10, 90)),
            "pressure_hpa": maybe(rng, u(980, 1040)), "co2_ppm": maybe(rng, u(400, 1500))}


def load(db: psycopg.Connection[Any], table: str, devices: list[int],
         start: datetime, seed: int) -> None:
    rng = random.Random(seed)
    rows = []
    for device in devices:
        t = start + timedelta(seconds=rng.uniform(0, 30))
        end = start + timedelta(hours=27)
        while t < end:
            rows.append({"time": t, "device_id": device, **generate(rng, table, t)})
            # Irregular sampling with an occasional long gap.
            t += timedelta(seconds=rng.choice([20, 45, 60, 90, 2400]) * rng.uniform(0.8, 1.2))
    columns = list(rows[0])
    with db.cursor() as cur, cur.copy(
        f"COPY {table} ({', '.join(columns)}) FROM STDIN"
    ) as copy:
        for row in rows:
            copy.write_row([row[c] for c in columns])


def close(actual: Any, expected: Any, what: str) -> None:
    if expected is None or actual is None or isinstance(expected, datetime):
        assert actual == expected, what
    else:
        assert math.isclose(float(actual), float(expected), rel_tol=1e-9, abs_tol=1e-9), (
            f"{what}: aggregate {actual} != direct {expected}")


def check_level(db: psycopg.Connection[Any], family: aggregates.Family,
                level: aggregates.Level, raw: list[Row], phase: str) -> int:
    width = WIDTHS[level.width]
    expected: dict[tuple[int, datetime], list[Row]] = defaultdict(list)
    for r in raw:
        expected[(r["device_id"], bucket_of(r["time"], width))].append(r)
    got = {(r["device_id"], r["bucket"]): r
           for r in db.execute(f"SELECT * FROM {level.name}").fetchall()}
    assert sorted(got) == sorted(expected), f"{phase} {level.name}: buckets differ"

    stats = [c.name.removesuffix("_sumsq") for c in family.columns if c.name.endswith("_sumsq")]
    extra = EXTRA_CHECKS[family.table]
    covered = {f"{m}_{s}" for m in stats for s in ("n", "sum", "sumsq", "min", "max")}
    assert {c.name for c in family.columns} == covered | set(extra), "a column has no check"

    for key, rows in expected.items():
        agg = got[key]
        where = f"{phase} {level.name} {key}"
        assert agg["readings"] == len(rows), where
        close(agg["first_time"], min(r["time"] for r in rows), f"{where} first_time")
        close(agg["last_time"], max(r["time"] for r in rows), f"{where} last_time")
        for m in stats:
            vs = values(rows, m)
            n = agg[f"{m}_n"]
            assert n == len(vs), f"{where} {m}_n"
            mean = agg[f"{m}_sum"] / n if n else None
            close(mean, statistics.fmean(vs) if vs else None, f"{where} mean({m})")
            if vs:
                std = math.sqrt(max(agg[f"{m}_sumsq"] / n - mean**2, 0.0))  # type: ignore[operator]
                assert math.isclose(std, statistics.pstdev(vs), rel_tol=1e-6, abs_tol=1e-6), (
                    f"{where} std({m}): {std} != {statistics.pstdev(vs)}")
            close(agg[f"{m}_min"], min(vs, default=None), f"{where} min({m})")
            close(agg[f"{m}_max"], max(vs, default=None), f"{where} max({m})")
        for name, check in extra.items():
            close(agg[name], check(rows), f"{where} {name}")
    return len(expected)


def test_every_level_agrees_with_the_raw_rows_before_and_after_refresh(db_url: str) -> None:
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start -= timedelta(days=2, hours=3)  # crosses a day boundary
    with psycopg.connect(db_url, autocommit=True) as plain:
        pause_refresh_policies(plain)  # the test refreshes, and compares what it made
        devices = [add_device(plain, "alpha", f"dev-{i}") for i in range(2)]
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as db:
        raw: dict[str, list[Row]] = {}
        for seed, family in enumerate(aggregates.FAMILIES):
            load(db, family.table, devices, start, seed)
            raw[family.table] = db.execute(f"SELECT * FROM {family.table}").fetchall()

        for phase in ("real-time", "materialised"):
            if phase == "materialised":
                for family in aggregates.FAMILIES:
                    refresh(db, *(level.name for level in family.levels))
                assert db.execute(
                    "SELECT count(*) AS n FROM energy_readings_1d WHERE readings > 0"
                ).fetchone() == {"n": 4}
            for family in aggregates.FAMILIES:
                for level in family.levels:
                    buckets = check_level(db, family, level, raw[family.table], phase)
                    assert buckets >= 2 * len(devices)


def test_helper_functions_give_mean_and_standard_deviation(
    db: psycopg.Connection[Any],
) -> None:
    row = db.execute("SELECT bmsd_mean(4, 10.0), bmsd_stddev(4, 10.0, 30.0),"
                     " bmsd_mean(0, NULL)").fetchone()
    assert row == (2.5, statistics.pstdev([1.0, 2.0, 3.0, 4.0]), None)


