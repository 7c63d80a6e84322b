"""The schema a migrated database has: tables, hypertables, aggregates, policies, roles."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from bmsd.ingest.ingestor import LATE_AFTER
from bmsd.schema import aggregates
from bmsd.schema.migrate import default_sql_dir
from tests.helpers import add_device

Conn = psycopg.Connection[tuple[object, ...]]

TELEMETRY = ["site_telemetry", "battery_telemetry", "energy_readings", "production_data",
             "environmental_data"]

AGGREGATES = [
    "energy_readings_1m", "energy_readings_15m", "energy_readings_1h", "energy_readings_1d",
    "energy_site_15m",
    *[f"{t}_{lvl}" for t in TELEMETRY if t != "energy_readings" for lvl in ("1h", "1d")],
]
DAY = timedelta(days=1)


def hypertables(db: Conn) -> list[str]:
    """Return the hypertables holding the streams (integers of sql/190 where it ran)."""
    return [db.execute("SELECT coalesce(to_regclass(%s)::text, %s)",
                       (f"{t}_scaled", t)).fetchone()[0] for t in TELEMETRY]  # type: ignore[index]


def test_committed_aggregate_script_matches_its_generator() -> None:
    out = io.StringIO()
    aggregates.write_sql(out)
    committed = (default_sql_dir() / "100_continuous_aggregates.sql").read_text()
    assert committed == out.getvalue(), (
        "regenerate: python -m bmsd.schema.aggregates > sql/100_continuous_aggregates.sql")


def test_every_script_records_itself_for_container_init() -> None:
    for script in sorted(default_sql_dir().glob("*.sql")):
        last = [line for line in script.read_text().splitlines() if line.strip()][-1]
        assert f"VALUES ('{script.name}')" in last, script.name


def test_hypertables_are_partitioned_by_time_only_in_day_chunks(db: Conn) -> None:
    rows = db.execute("""
        SELECT h.hypertable_name, h.num_dimensions, d.column_name, d.time_interval
          FROM timescaledb_information.hypertables h
          JOIN timescaledb_information.dimensions d USING (hypertable_schema, hypertable_name)
    """).fetchall()
    found = {r[0]: r[1:] for r in rows}
    for table in hypertables(db):
        assert found[table] == (1, "time", DAY)
    assert found["events"] == (1, "time", timedelta(days=7))
    assert found["ingest_rejects"] == (1, "received_at", DAY)


@pytest.mark.parametrize("table", TELEMETRY)
def test_a_second_reading_at_the_same_time_is_refused(db: Conn, table: str) -> None:
    device = add_device(db)
    now = datetime.now(UTC)
    db.execute(f"INSERT INTO {table} (time, device_id) VALUES (%s, %s)", (now, device))
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute(f"INSERT INTO {table} (time, device_id) VALUES (%s, %s)", (now, device))


def test_unknown_fields_column_and_derived_battery_columns(db: Conn) -> None:
    device = add_device(db)
    db.execute("""
        INSERT INTO battery_telemetry (time, device_id, cell_voltages, cell_temperatures,
                                       alarm_flags, extra)
        VALUES (now(), %s, '{3.41, 3.52, 3.38}', '{21.5, 30.0, 24.0}',
                '{high_temp_warning, imbalance}', '{"vendor_field": 7}')
    """, (device,))
    row = db.execute("""
        SELECT min_cell_voltage, max_cell_voltage, min_cell_temperature,
               max_cell_temperature, cell_temperature_spread, alarm_count, extra
          FROM battery_telemetry""").fetchone()
    assert row == (3.38, 3.52, 21.5, 30.0, 8.5, 2, {"vendor_field": 7})


def test_safety_constraints_default_to_the_pulsebms_limits(db: Conn) -> None:
    device = add_device(db)
    row = db.execute("""
        INSERT INTO safety_constraints (device_id) VALUES (%s)
        RETURNING min_cell_voltage, max_cell_voltage, min_cell_temperature,
                  max_cell_temperature, max_temperature_delta, min_soc, max_soc,
                  max_charge_current, max_discharge_current, active
    """, (device,)).fetchone()
    assert row == (2.5, 4.2, -20.0, 60.0, 10.0, 5.0, 95.0, 50.0, 100.0, True)
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("INSERT INTO safety_constraints (device_id, min_soc, max_soc)"
                   " VALUES (%s, 50, 40)", (device,))


def test_sites_refuse_an_unknown_timezone_and_odd_grid_frequency(db: Conn) -> None:
    add_device(db)
    org = "(SELECT id FROM organizations WHERE slug = 'org')"
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        db.execute(f"INSERT INTO sites (organization_id, slug, name, timezone)"
                   f" VALUES ({org}, 'x', 'X', 'Mars/Olympus')")
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute(f"INSERT INTO sites (organization_id, slug, name, nominal_grid_frequency_hz)"
                   f" VALUES ({org}, 'y', 'Y', 55)")


def _alert(db: Conn, device: int, code: str = "BATTERY_LOW") -> int:
    row = db.execute("""
        INSERT INTO alerts (site_id, device_id, rule_code, severity, category, message,
                            triggered_at)
        SELECT site_id, id, %s, 'warning', 'battery', 'low', now() FROM devices WHERE id = %s
        RETURNING id""", (code, device)).fetchone()
    assert row is not None
    return int(str(row[0]))


def test_at_most_one_unresolved_alert_per_device_and_rule(db: Conn) -> None:
    device = add_device(db)
    first = _alert(db, device)
    with pytest.raises(psycopg.errors.UniqueViolation):
        _alert(db, device)
    _alert(db, device, "BATTERY_HIGH_TEMP")  # another rule is fine
    db.execute("UPDATE alerts SET status = 'acknowledged', acknowledged_at = now(),"
               " acknowledged_by = 'ann' WHERE id = %s", (first,))
    with pytest.raises(psycopg.errors.UniqueViolation):
        _alert(db, device)  # acknowledged is still unresolved
    db.execute("UPDATE alerts SET status = 'resolved', resolved_at = now() WHERE id = %s",
               (first,))
    _alert(db, device)


def test_reader_role_reads_and_acknowledges_but_cannot_write(db: Conn) -> None:
    device = add_device(db)
    alert = _alert(db, device)
    db.execute("SET ROLE bmsd_reader")
    assert db.execute("SELECT count(*) FROM alerts").fetchone() == (1,)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        db.execute("INSERT INTO energy_readings (time, device_id) VALUES (now(), %s)", (device,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        db.execute("UPDATE alerts SET status = 'resolved', resolved_at = now()")
    row = db.execute("SELECT status, acknowledged_by FROM acknowledge_alert(%s, 'ops-ann')",
                     (alert,)).fetchone()
    assert row == ("acknowledged", "ops-ann")
    with pytest.raises(psycopg.errors.RaiseException, match="already acknowledged"):
        db.execute("SELECT acknowledge_alert(%s, 'ops-bob')", (alert,))
    with pytest.raises(psycopg.errors.RaiseException, match="there is no alert 999"):
        db.execute("SELECT acknowledge_alert(999, 'ops-bob')")
    db.execute("RESET ROLE")
    assert db.execute("SELECT kind FROM events").fetchall() == [("alert_acknowledged",)]


def test_ingest_role_writes_telemetry_but_no_ddl(db: Conn) -> None:
    device = add_device(db)
    db.execute("SET ROLE bmsd_ingest")
    with db.cursor() as cur, cur.copy(
        "COPY energy_readings (time, device_id, power_kw) FROM STDIN"
    ) as copy:
        copy.write_row((datetime.now(UTC), device, 12.5))
    db.execute("CREATE TEMP TABLE staging (LIKE energy_readings)")
    db.execute("UPDATE devices SET last_seen_at = now() WHERE id = %s", (device,))
    db.execute("INSERT INTO ingest_rejects (topic, reason, payload) VALUES ('t', 'r', 'x')")
    for statement in (
        "UPDATE devices SET slug = 'renamed'",
        "DELETE FROM energy_readings",
        "TRUNCATE energy_readings",
        "DROP TABLE energy_readings",
        "CREATE TABLE intruder (id int)",
        "ALTER TABLE devices ADD COLUMN x int",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            db.execute(statement)
    db.execute("RESET ROLE")


def test_latest_reading_views_return_each_devices_newest_row(db: Conn) -> None:
    pack = add_device(db, "alpha", "pack-1")
    other = add_device(db, "alpha", "pack-2")
    elsewhere = add_device(db, "beta", "pack-9")
    silent = add_device(db, "alpha", "meter-1", kind="meter")
    now = datetime.now(UTC).replace(microsecond=0)
    for device, soc_by_age in ((pack, {3: 50.0, 2: 51.0, 1: 52.0}),
                               (other, {40: 70.0, 30: 71.0}),
                               (elsewhere, {1: 90.0})):
        db.execute("INSERT INTO device_streams (device_id, stream)"
                   " VALUES (%s, 'battery_telemetry')", (device,))
        for age_days, soc in soc_by_age.items():
            db.execute("INSERT INTO battery_telemetry (time, device_id, soc) VALUES (%s, %s, %s)",
                       (now - age_days * DAY, device, soc))
    db.execute("INSERT INTO device_streams (device_id, stream) VALUES (%s, 'energy_readings')",
               (silent,))

    rows = db.execute("SELECT device, time, soc FROM latest_battery_telemetry"
                      " WHERE site = 'alpha' ORDER BY device").fetchall()
    assert rows == [("pack-1", now - DAY, 52.0), ("pack-2", now - 30 * DAY, 71.0)]

    every = db.execute("SELECT site, device, stream, time, reading->>'soc'"
                       " FROM latest_readings('alpha') ORDER BY device").fetchall()
    assert every == [("alpha", "pack-1", "battery_telemetry", now - DAY, "52"),
                     ("alpha", "pack-2", "battery_telemetry", now - 30 * DAY, "71")]
    assert len(db.execute("SELECT * FROM latest_readings()").fetchall()) == 3


# --- community edition: aggregates, compression, policies ---------------------

@pytest.mark.community
def test_continuous_aggregates_are_hierarchical_and_real_time(db: Conn) -> None:
    rows = db.execute("""
        SELECT view_name, materialized_only, view_definition
          FROM timescaledb_information.continuous_aggregates""").fetchall()
    found = {r[0]: (r[1], r[2]) for r in rows}
    assert sorted(found) == sorted(AGGREGATES)
    for family in aggregates.FAMILIES:
        for level in family.levels:
            materialized_only, definition = found[level.name]
            assert materialized_only is False
            assert f"FROM {level.source}" in " ".join(str(definition).split())
    for site_level, source in aggregates.SITE_LEVELS.items():
        materialized_only, definition = found[site_level]
        assert materialized_only is False
        assert f"FROM ({source} q JOIN devices d" in " ".join(str(definition).split())


def jobs(db: Conn, proc: str) -> dict[str, dict[str, object]]:
    rows = db.execute("""
        SELECT hypertable_name, config, schedule_interval
          FROM timescaledb_information.jobs WHERE proc_name = %s""", (proc,)).fetchall()
    return {str(r[0]): {**dict(r[1] or {}), "schedule": r[2]} for r in rows}  # type: ignore[call-overload]


def _materialization_names(db: Conn) -> dict[str, str]:
    rows = db.execute("""
        SELECT materialization_hypertable_name, view_name
          FROM timescaledb_information.continuous_aggregates""").fetchall()
    return {str(m): str(v) for m, v in rows}


def _interval(value: object) -> timedelta:
    text = str(value)
    units = {"day": 1, "days": 1, "year": 365, "years": 365, "mon": 30, "mons": 30}
    if ":" in text and " " not in text:
        h, m, s = (int(x) for x in text.split(":"))
        return timedelta(hours=h, minutes=m, seconds=s)
    parts = text.split()
    total = timedelta()
    for number, unit in zip(parts[::2], parts[1::2], strict=True):
        total += timedelta(days=int(number) * units[unit])
    return total


@pytest.mark.community
def test_compression_and_retention_policies_have_the_documented_intervals(db: Conn) -> None:
    names = _materialization_names(db)
    compression = jobs(db, "policy_compression")
    assert {t: _interval(c["compress_after"]) for t, c in compression.items()} == {
        t: timedelta(days=7) for t in hypertables(db)}
    retention = {names.get(t, t): _interval(c["drop_after"])
                 for t, c in jobs(db, "policy_retention").items()}
    expected = {t: timedelta(days=90) for t in hypertables(db)}
    expected |= {"energy_readings_1m": timedelta(days=30), "events": timedelta(days=365),
                 "ingest_rejects": timedelta(days=30)}
    expected |= {a: timedelta(days=730) for a in AGGREGATES if a.endswith(("_15m", "_1h"))}
    expected |= {a: timedelta(days=3650) for a in AGGREGATES if a.endswith("_1d")}
    assert retention == expected


@pytest.mark.community
def test_refresh_windows_reach_every_reading_not_late_and_never_past_source_retention(
    db: Conn,
) -> None:
    names = _materialization_names(db)
    refresh = {names.get(t, t): c
               for t, c in jobs(db, "policy_refresh_continuous_aggregate").items()}
    assert sorted(refresh) == sorted(AGGREGATES)
    retention = {names.get(t, t): _interval(c["drop_after"])
                 for t, c in jobs(db, "policy_retention").items()}
    max_age = LATE_AFTER  # older readings reach the aggregates through sql/170's job
    stored = dict(zip(TELEMETRY, hypertables(db), strict=True))
    for family in aggregates.FAMILIES:
        reach = max_age  # how old the oldest accepted reading can be when it arrives
        for level in family.levels:
            config = refresh[level.name]
            start = _interval(config["start_offset"])
            # The level below refreshes within its schedule; the window must
            # still cover the oldest accepted reading by then.
            assert start > reach, level.name
            source = stored.get(level.source, level.source)
            assert start < retention[source], level.name
            reach = start
            assert _interval(config["end_offset"]) <= DAY


@pytest.mark.community
def test_compressed_chunks_keep_derived_columns_and_refuse_duplicates(db: Conn) -> None:
    device = add_device(db)
    old = datetime.now(UTC).replace(microsecond=0) - 10 * DAY
    db.execute("INSERT INTO battery_telemetry (time, device_id, cell_voltages)"
               " VALUES (%s, %s, '{3.3, 3.5}')", (old, device))
    # if_not_compressed: the server's own compression policy may get there first.
    db.execute("SELECT compress_chunk(c, if_not_compressed => true)"
               " FROM show_chunks('battery_telemetry') c")
    assert db.execute("SELECT count(*) FROM timescaledb_information.chunks WHERE"
                      " hypertable_name = 'battery_telemetry' AND is_compressed").fetchone() == (1,)
    assert db.execute("SELECT max_cell_voltage FROM battery_telemetry").fetchone() == (3.5,)
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute("INSERT INTO battery_telemetry (time, device_id) VALUES (%s, %s)",
                   (old, device))


def test_sql_folder_holds_only_numbered_scripts() -> None:
    names = [p.name for p in Path(default_sql_dir()).iterdir() if p.is_file()]
    assert names
    assert all(n[:3].isdigit() and n.endswith(".sql") for n in names)


def test_overview_views_show_latest_state_alerts_and_flows(db: Conn) -> None:
    machine = add_device(db, "plant", "press-1", kind="injection_molding")
    db.execute("UPDATE sites SET kind = 'factory' WHERE slug = 'plant'")
    pack = add_device(db, "solar", "pack-1")
    ctrl = add_device(db, "solar", "ctrl-1", kind="site_controller")
    now = datetime.now(UTC).replace(microsecond=0)
    db.execute("INSERT INTO device_streams VALUES (%s, 'production_data'),"
               " (%s, 'energy_readings'), (%s, 'battery_telemetry'), (%s, 'site_telemetry')",
               (machine, machine, pack, ctrl))
    db.execute("INSERT INTO production_data (time, device_id, machine_state) VALUES"
               " (%s, %s, 'idle'), (%s, %s, 'running')",
               (now - 2 * DAY, machine, now - DAY, machine))
    db.execute("INSERT INTO energy_readings (time, device_id, power_kw) VALUES (%s, %s, 42.5)",
               (now, machine))
    db.execute("INSERT INTO battery_telemetry (time, device_id, soc) VALUES (%s, %s, 61.5)",
               (now, pack))
    db.execute("INSERT INTO site_telemetry (time, device_id, solar_power_kw, grid_power_kw,"
               " load_power_kw, battery_power_kw) VALUES (%s, %s, 10, -2, 7, -1)", (now, ctrl))
    db.execute("UPDATE devices SET last_seen_at = now() WHERE id IN (%s, %s)", (machine, pack))
    _alert(db, machine)
    db.execute("""INSERT INTO alerts (site_id, device_id, rule_code, severity, category,
                  message, triggered_at)
                  SELECT site_id, id, 'X', 'critical', 'c', 'm', now() FROM devices
                   WHERE id = %s""", (pack,))
    assert db.execute("SELECT site, device, machine_state, power_kw, unresolved_alerts"
                      " FROM v_machines_current_status").fetchall() == [
        ("plant", "press-1", "running", 42.5, 1)]
    rows = {r[0]: r[1:] for r in db.execute(
        "SELECT site, devices_reporting, devices_silent, alerts_critical, alerts_warning,"
        " latest_soc, solar_power_kw, grid_power_kw, load_power_kw, battery_power_kw"
        " FROM v_site_overview")}
    assert rows["plant"] == (1, 0, 0, 1, None, None, None, None, None)
    assert rows["solar"] == (1, 1, 1, 0, 61.5, 10.0, -2.0, 7.0, -1.0)


@pytest.mark.community
def test_the_backlog_job_refreshes_every_level_of_every_stream_bottom_up(db: Conn) -> None:
    row = db.execute("SELECT config, schedule_interval FROM timescaledb_information.jobs"
                     " WHERE proc_name = 'bmsd_refresh_backlog'").fetchone()
    assert row is not None, "sql/170 schedules the backlog job"
    config, every = row
    assert isinstance(config, dict)
    assert isinstance(every, timedelta)
    assert config["levels"] == {family.table: aggregates.refresh_order(family)
                                for family in aggregates.FAMILIES}
    assert config["levels"]["energy_readings"][1:3] == ["energy_readings_15m", "energy_site_15m"]
    assert every <= timedelta(minutes=1)
