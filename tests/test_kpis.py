"""KPI functions on a known data set; every expected value is computed here from the data.

The site is in a fixed UTC+2 zone (no daylight saving), so its local hours
are the UTC hours plus two. Energy readings every 15 minutes; the range
starts and ends inside an hour (and inside a quarter), so the edges come
from raw rows and the middle from the aggregates.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from tools.fleet import refresh

pytestmark = pytest.mark.community

D = (datetime.now(UTC) - timedelta(days=5)).replace(hour=0, minute=0, second=0, microsecond=0)
START = D + timedelta(minutes=10)
END = D + timedelta(days=1, hours=23, minutes=50)
PRICE_CHANGE = D + timedelta(days=1, hours=12)
FACTOR_CHANGE = D + timedelta(days=1)
SPIKES = {D + timedelta(days=1, hours=10): 9.0, D + timedelta(days=1, hours=23, minutes=45): 12.0}


def local_hour(t: datetime) -> int:
    return (t.hour + 2) % 24


def power_at(t: datetime) -> float:
    return SPIKES.get(t, 4.0 if 8 <= local_hour(t) < 18 else 2.0)


READINGS = [D - timedelta(hours=2) + timedelta(minutes=15 * i) for i in range(4 * 52)]
ENERGY = {t: power_at(t) * 0.25 for t in READINGS}  # kWh in each 15-minute interval


def in_range(t: datetime, start: datetime = START, end: datetime = END) -> bool:
    return start <= t < end


def price(hour_start: datetime) -> Decimal:
    peak = 8 <= local_hour(hour_start) < 18
    if peak:
        return Decimal("0.40") if hour_start >= PRICE_CHANGE else Decimal("0.30")
    return Decimal("0.10")


def factor(hour_start: datetime) -> float:
    return 0.3 if hour_start >= FACTOR_CHANGE else 0.4


def hour_of(t: datetime) -> datetime:
    return t.replace(minute=0)


STATES = [(D - timedelta(hours=1), "running"), (D + timedelta(hours=6), "idle"),
          (D + timedelta(hours=7), "running"), (D + timedelta(days=1, hours=20), "fault"),
          (D + timedelta(days=1, hours=21, minutes=30), "running")]
UNITS = [D + timedelta(hours=h, minutes=20) for h in range(-2, 50)]  # 5 units each


@pytest.fixture
def plant(db: psycopg.Connection[Any]) -> dict[str, int]:
    db.execute("INSERT INTO organizations (slug, name) VALUES ('o', 'O')")
    (site,), = db.execute("INSERT INTO sites (organization_id, slug, name, kind, timezone)"
                          " VALUES (1, 'plant', 'Plant', 'factory', 'Etc/GMT-2')"
                          " RETURNING id").fetchall()
    ids = {}
    for slug in ("m1", "m2", "m3"):
        (ids[slug],), = db.execute("INSERT INTO devices (site_id, slug, kind) VALUES (%s, %s,"
                                   " 'compressor') RETURNING id", (site, slug)).fetchall()
    ids["site"] = site
    with db.cursor() as cur, cur.copy(
            "COPY energy_readings (time, device_id, power_kw, energy_kwh) FROM STDIN") as copy:
        for t in READINGS:
            copy.write_row((t, ids["m1"], power_at(t), ENERGY[t]))
            copy.write_row((t, ids["m2"], 1.0, 0.25))  # m2 produces nothing
    for t, state in STATES:
        db.execute("INSERT INTO production_data (time, device_id, machine_state)"
                   " VALUES (%s, %s, %s)", (t, ids["m1"], state))
    for t in UNITS:
        db.execute("INSERT INTO production_data (time, device_id, units_produced,"
                   " units_rejected) VALUES (%s, %s, 5, 1)", (t, ids["m1"]))
    db.execute("""
        INSERT INTO energy_tariffs (site_id, band, price_per_kwh, start_hour, end_hour,
                                    valid_from, valid_until)
        VALUES (%(s)s, 'peak', 0.30, 8, 18, %(d)s, %(change)s),
               (%(s)s, 'peak', 0.40, 8, 18, %(change)s, NULL),
               (%(s)s, 'off_peak', 0.10, 0, 8, %(d)s, NULL),
               (%(s)s, 'off_peak', 0.10, 18, 24, %(d)s, NULL)""",
               {"s": site, "d": D - timedelta(days=1), "change": PRICE_CHANGE})
    db.execute("INSERT INTO carbon_factors (site_id, kg_co2_per_kwh, valid_from, valid_until)"
               " VALUES (%(s)s, 0.4, %(d)s, %(c)s), (%(s)s, 0.3, %(c)s, NULL)",
               {"s": site, "d": D - timedelta(days=1), "c": FACTOR_CHANGE})
    refresh(db, "energy_readings_1m", "energy_readings_15m", "energy_readings_1h",
            "energy_readings_1d", "production_data_1h", "production_data_1d")
    return ids


def close(a: Any, b: Any) -> bool:
    return a is not None and math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)


def test_sec_is_energy_over_units_and_null_without_production(
    db: psycopg.Connection[Any], plant: dict[str, int]
) -> None:
    energy = sum(e for t, e in ENERGY.items() if in_range(t))
    units = 5 * sum(1 for t in UNITS if in_range(t))
    (kwh, produced, sec), = db.execute("SELECT * FROM calculate_sec(%s, %s, %s)",
                                       (plant["m1"], START, END)).fetchall()
    assert close(kwh, energy)
    assert produced == units
    assert close(sec, energy / units)
    (kwh2, produced2, sec2), = db.execute("SELECT * FROM calculate_sec(%s, %s, %s)",
                                          (plant["m2"], START, END)).fetchall()
    assert close(kwh2, 0.25 * sum(1 for t in READINGS if in_range(t)))
    assert (produced2, sec2) == (None, None)
    assert db.execute("SELECT * FROM calculate_sec(%s, %s, %s)",
                      (plant["m3"], START, END)).fetchall() == [(None, None, None)]


def test_peak_demand_uses_whole_quarters_and_the_partial_edges(
    db: psycopg.Connection[Any], plant: dict[str, int]
) -> None:
    # The 12 kW reading opens the last, partial quarter (23:45-23:50).
    assert db.execute("SELECT * FROM calculate_peak_demand(%s, %s, %s)",
                      (plant["m1"], START, END)).fetchall() == [(12.0, max(SPIKES))]
    earlier = END - timedelta(minutes=10)
    assert db.execute("SELECT * FROM calculate_peak_demand(%s, %s, %s)",
                      (plant["m1"], START, earlier)).fetchall() == [(9.0, min(SPIKES))]


def test_load_factor_is_mean_power_over_peak(db: psycopg.Connection[Any],
                                             plant: dict[str, int]) -> None:
    mean = sum(power_at(t) for t in READINGS if in_range(t)) / sum(
        1 for t in READINGS if in_range(t))
    (average, peak, factor_), = db.execute("SELECT * FROM calculate_load_factor(%s, %s, %s)",
                                           (plant["m1"], START, END)).fetchall()
    assert close(average, mean)
    assert peak == 12.0
    assert close(factor_, mean / 12.0)


def test_energy_cost_follows_bands_hours_and_a_price_change(
    db: psycopg.Connection[Any], plant: dict[str, int]
) -> None:
    bands: dict[str, list[Decimal]] = {"peak": [Decimal(0), Decimal(0)],
                                       "off_peak": [Decimal(0), Decimal(0)]}
    for t, e in ENERGY.items():
        if in_range(t):
            band = "peak" if 8 <= local_hour(t) < 18 else "off_peak"
            bands[band][0] += Decimal(str(e))
            bands[band][1] += Decimal(str(e)) * price(hour_of(t))
    rows = {band: (kwh, cost, currency) for band, kwh, cost, currency in db.execute(
        "SELECT * FROM calculate_energy_cost(%s, %s, %s)", (plant["m1"], START, END))}
    assert set(rows) == {"peak", "off_peak", "total"}
    for band, (kwh, cost) in bands.items():
        assert close(rows[band][0], kwh)
        assert rows[band][1] == cost.quantize(Decimal("0.0001"))
        assert rows[band][2] == "EUR"
    assert rows["total"][1] == sum(c for _, c in bands.values()).quantize(Decimal("0.0001"))


def test_carbon_uses_the_factor_in_force_each_hour(db: psycopg.Connection[Any],
                                                    plant: dict[str, int]) -> None:
    kg = sum(e * factor(hour_of(t)) for t, e in ENERGY.items() if in_range(t))
    units = 5 * sum(1 for t in UNITS if in_range(t))
    (kwh, co2, produced, per_unit), = db.execute(
        "SELECT * FROM calculate_carbon_intensity(%s, %s, %s)",
        (plant["m1"], START, END)).fetchall()
    assert close(kwh, sum(e for t, e in ENERGY.items() if in_range(t)))
    assert close(co2, kg)
    assert produced == units
    assert close(per_unit, kg / units)


def test_operating_hours_follow_states_across_the_range_edges(
    db: psycopg.Connection[Any], plant: dict[str, int]
) -> None:
    hours = dict(db.execute("SELECT * FROM get_machine_operating_hours(%s, %s, %s)",
                            (plant["m1"], START, END)).fetchall())
    running = ((STATES[1][0] - START) + (STATES[3][0] - STATES[2][0])
               + (END - STATES[4][0])).total_seconds() / 3600
    assert close(hours["running"], running)
    assert close(hours["idle"], 1.0)
    assert close(hours["fault"], 1.5)
    assert hours["stopped"] == 0
    assert hours["maintenance"] == 0
    assert close(sum(hours.values()), (END - START).total_seconds() / 3600)


def test_all_kpis_and_the_factory_summary_agree(db: psycopg.Connection[Any],
                                                plant: dict[str, int]) -> None:
    row = db.execute("SELECT * FROM calculate_all_kpis(%s, %s, %s)",
                     (plant["m1"], START, END)).fetchone()
    sec = db.execute("SELECT * FROM calculate_sec(%s, %s, %s)",
                     (plant["m1"], START, END)).fetchone()
    assert row is not None
    assert sec is not None
    assert row[:3] == sec
    assert row[3:5] == (12.0, max(SPIKES))
    summary = db.execute("SELECT * FROM get_factory_summary(%s, %s, %s)",
                         (plant["site"], START, END)).fetchone()
    assert summary is not None
    site_id, slug, energy, cost, currency, kg, units, site_sec, peak, peak_at, reporting = summary
    both = sum(e + 0.25 for t, e in ENERGY.items() if in_range(t))
    assert (site_id, slug, currency, reporting) == (plant["site"], "plant", "EUR", 2)
    assert close(energy, both)
    assert units == sec[1]
    assert close(site_sec, both / sec[1])
    # m2 draws 1 kW all the time: the site's peak quarter is m1's plus 1 kW.
    assert (peak, peak_at) == (13.0, max(SPIKES))
    assert cost > 0
    assert kg > 0


def test_the_site_demand_level_sums_the_machines_quarter_averages(
    db: psycopg.Connection[Any], plant: dict[str, int]
) -> None:
    # Materialised (the other tests read it in real time from the level below).
    refresh(db, "energy_readings_1m", "energy_readings_15m", "energy_site_15m")
    stored = dict(db.execute("SELECT bucket, demand_kw FROM energy_site_15m"
                             " WHERE site_id = %s", (plant["site"],)).fetchall())
    # One reading per machine and quarter: m1's power plus m2's 1 kW.
    assert stored.keys() == set(READINGS)
    assert all(close(stored[t], power_at(t) + 1.0) for t in READINGS)
    summary = db.execute("SELECT peak_kw, peak_at FROM get_factory_summary(%s, %s, %s)",
                         (plant["site"], START, END)).fetchone()
    # The 12 kW spike's quarter is cut by END: it comes from raw rows and wins.
    assert summary == (13.0, max(SPIKES))
    inner = db.execute("SELECT peak_kw, peak_at FROM get_factory_summary(%s, %s, %s)",
                       (plant["site"], START, max(SPIKES))).fetchone()
    assert inner == (10.0, min(SPIKES))


def test_no_data_gives_nulls_not_errors(db: psycopg.Connection[Any],
                                        plant: dict[str, int]) -> None:
    far = D - timedelta(days=20)
    assert db.execute("SELECT * FROM calculate_peak_demand(%s, %s, %s)",
                      (plant["m1"], far, far + timedelta(hours=5))).fetchall() == []
    assert db.execute("SELECT * FROM calculate_energy_cost(%s, %s, %s)",
                      (plant["m3"], START, END)).fetchall() == []
    row = db.execute("SELECT energy_kwh, sec_kwh_per_unit, load_factor, cost"
                     " FROM calculate_all_kpis(%s, %s, %s)",
                     (plant["m3"], START, END)).fetchone()
    assert row == (None, None, None, None)


def test_battery_and_site_flows_per_local_day(db: psycopg.Connection[Any]) -> None:
    db.execute("INSERT INTO organizations (slug, name) VALUES ('o', 'O')")
    db.execute("INSERT INTO sites (organization_id, slug, name, timezone)"
               " VALUES (1, 'solar', 'Solar', 'Etc/GMT-2')")
    (pack,), = db.execute("INSERT INTO devices (site_id, slug, kind, nominal_capacity_kwh)"
                          " VALUES (1, 'pack', 'battery_pack', 10) RETURNING id").fetchall()
    (ctrl,), = db.execute("INSERT INTO devices (site_id, slug, kind)"
                          " VALUES (1, 'ctrl', 'site_controller') RETURNING id").fetchall()
    # Local day L = UTC [D-2h, D+22h). Charge 2 kW for UTC hours 0-2, discharge
    # 4 kW for hours 5-6, then charge again at 10 and discharge at 12: two
    # discharge runs. Samples every 15 min (4 per hour: 2 kWh per charging hour).
    plan = {0: -2000, 1: -2000, 2: -2000, 5: 4000, 6: 4000, 10: -2000, 12: 4000}
    for hour, watts in plan.items():
        for q in range(4):
            t = D + timedelta(hours=hour, minutes=15 * q)
            db.execute("INSERT INTO battery_telemetry (time, device_id, power_w, alarm_flags)"
                       " VALUES (%s, %s, %s, %s)",
                       (t, pack, watts, ["hot"] if hour == 12 and q == 0 else None))
            db.execute("INSERT INTO site_telemetry (time, device_id, solar_energy_kwh,"
                       " grid_energy_kwh, load_energy_kwh) VALUES (%s, %s, 1.0, %s, 0.5)",
                       (t, ctrl, -0.25 if hour == 12 else 0.1))
    refresh(db, "battery_telemetry_1h", "site_telemetry_1h")
    day = (D + timedelta(hours=2)).date()
    rows = db.execute("SELECT * FROM battery_daily_metrics(%s, %s, %s)",
                      (pack, D - timedelta(days=1), D + timedelta(days=1))).fetchall()
    assert len(rows) == 1
    d, charged, discharged, net, efc, partial, alarms, _ = rows[0]
    assert d == day
    assert close(charged, 4 * 2.0)  # four charging hours at 2 kW
    assert close(discharged, 3 * 4.0)
    assert close(net, 8.0 - 12.0)
    assert close(efc, 12.0 / 10)
    assert partial == 2
    assert alarms == 1
    assert db.execute("SELECT flag, readings, hours FROM battery_alarm_summary(%s, %s, %s)",
                      (pack, D, D + timedelta(days=1))).fetchall() == [("hot", 1, 0.25)]
    flows = db.execute("SELECT * FROM site_energy_flows(1, %s, %s)",
                       (D - timedelta(days=1), D + timedelta(days=1))).fetchall()
    samples = 4 * len(plan)
    assert len(flows) == 1
    _, solar, imported, exported, load, _, _, ratio = flows[0]
    assert close(solar, samples * 1.0)
    assert close(imported, 0.1 * 4 * (len(plan) - 1))
    assert close(exported, 0.25 * 4)
    assert close(load, samples * 0.5)
    assert close(ratio, (samples - 1.0) / samples)


def test_site_peak_search_looks_past_an_hour_with_a_brief_spike(
    db: psycopg.Connection[Any],
) -> None:
    # Hour 1: one 100 kW sample among zeros (its quarter averages 25 kW) gives
    # that hour the highest upper bound; hour 3 holds 50 kW all along. The peak
    # is hour 3's, so the search must not stop at hour 1.
    db.execute("INSERT INTO organizations (slug, name) VALUES ('o', 'O')")
    db.execute("INSERT INTO sites (organization_id, slug, name, kind)"
               " VALUES (1, 'p', 'P', 'factory')")
    (m,), = db.execute("INSERT INTO devices (site_id, slug, kind) VALUES (1, 'm', 'pump')"
                       " RETURNING id").fetchall()
    samples = []
    for minute in range(0, 4 * 60, 5):
        t = D + timedelta(minutes=minute)
        kw = 50.0 if 180 <= minute < 240 else (100.0 if minute == 70 else 0.0)
        samples.append((t, m, kw, kw / 12))
    with db.cursor() as cur, cur.copy(
            "COPY energy_readings (time, device_id, power_kw, energy_kwh) FROM STDIN") as copy:
        for row in samples:
            copy.write_row(row)
    refresh(db, "energy_readings_1m", "energy_readings_15m", "energy_readings_1h")
    row = db.execute("SELECT peak_kw, peak_at FROM get_factory_summary(1, %s, %s)",
                     (D, D + timedelta(hours=4))).fetchone()
    assert row == (50.0, D + timedelta(hours=3))
    assert db.execute("SELECT * FROM calculate_peak_demand(%s, %s, %s)",
                      (m, D, D + timedelta(hours=4))).fetchone() == (50.0, D + timedelta(hours=3))
