"""The alert rules' semantics, on the pure evaluator: no database, no broker, no sleeps.

tests/test_alerts.py checks the same end to end, through a running bmsd.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from bmsd.alerts import checks as rule_checks
from bmsd.alerts import evaluate
from bmsd.alerts.evaluate import OFFLINE, DeviceInfo, Plan, State, StreamRows
from bmsd.alerts.rules import Rule, load_rules

T0 = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
CTRL = DeviceInfo(1, 10, "north", "ctrl-1", "site_controller", 50)
PACK = DeviceInfo(2, 10, "north", "pack-1", "battery_pack", 50)
LOW = Rule(code="BATTERY_LOW", title="battery low", stream="site_telemetry",
           value="battery_charge_level", op="<", threshold=20, clear=22, severity="warning",
           category="battery")
HOT = Rule(code="HOT_FOR_A_MINUTE", title="hot", stream="site_telemetry",
           value="battery_temperature", op=">", threshold=50, clear=48, for_s=60,
           severity="error", category="battery")
CELL = Rule(code="CELL_OVER_VOLTAGE", title="cell over voltage", stream="battery_telemetry",
            value="max_cell_voltage", op=">", threshold=4.2, clear=4.15, severity="critical",
            category="battery", limit="max_cell_voltage")
RULES = evaluate.by_stream([LOW, HOT, CELL])


def new_state() -> State:
    return State(devices={CTRL.id: CTRL, PACK.id: PACK})


def site(seconds: float, **fields: Any) -> tuple[str, int, datetime, dict[str, Any]]:
    return "site_telemetry", CTRL.id, T0 + timedelta(seconds=seconds), fields


def pack(seconds: float, **fields: Any) -> tuple[str, int, datetime, dict[str, Any]]:
    return "battery_telemetry", PACK.id, T0 + timedelta(seconds=seconds), fields


def table(readings: Iterable[tuple[int, datetime, Mapping[str, Any]]]) -> StreamRows:
    """Return (device, time, fields) readings as a batch's readings of one stream: tuples
    of (time, device, *fields), every field any reading has in each (absent: None)."""
    readings = list(readings)
    names = list(dict.fromkeys(name for _, _, fields in readings for name in fields))
    rows = [(when, device, *[fields.get(name) for name in names])
            for device, when, fields in readings]
    return StreamRows(rows, 0, 1, {name: 2 + i for i, name in enumerate(names)})


def batch(state: State, readings: Iterable[tuple[str, int, datetime, dict[str, Any]]],
          rules: Mapping[str, tuple[Rule, ...]] = RULES) -> Plan:
    """Evaluate one batch, commit it (apply), and return its plan."""
    streams: dict[str, list[tuple[int, datetime, dict[str, Any]]]] = {}
    seen: dict[int, datetime] = {}
    for stream, device, when, fields in readings:
        streams.setdefault(stream, []).append((device, when, fields))
        seen[device] = max(when, seen.get(device, when))
    plan = evaluate.evaluate(state, rules, {s: table(r) for s, r in streams.items()}, seen)
    evaluate.apply(state, plan)
    return plan


def codes(alerts: Iterable[evaluate.Alert]) -> list[str]:
    return [a.code for a in alerts]


def test_hysteresis_gives_one_alert_for_values_oscillating_between_the_thresholds() -> None:
    state = new_state()
    plans = [batch(state, [site(i, battery_charge_level=v)])
             for i, v in enumerate([30, 19, 21, 19.5, 21.9, 18, 22])]
    assert [codes(p.triggered) for p in plans] == [[], ["BATTERY_LOW"], [], [], [], [], []]
    assert [codes(p.resolved) for p in plans][-1] == ["BATTERY_LOW"]
    assert sum(len(p.resolved) for p in plans) == 1
    assert state.open == {}


def test_for_s_waits_and_the_alert_starts_when_the_condition_did() -> None:
    state = new_state()
    assert batch(state, [site(0, battery_temperature=55)]).triggered == []
    assert batch(state, [site(30, battery_temperature=56)]).triggered == []
    plan = batch(state, [site(60, battery_temperature=57)])
    assert codes(plan.triggered) == ["HOT_FOR_A_MINUTE"]
    assert plan.triggered[0].triggered_at == T0
    # A dip below the threshold restarts the clock.
    state = new_state()
    for seconds, value in ((0, 55), (30, 49), (60, 55), (100, 55)):
        assert batch(state, [site(seconds, battery_temperature=value)]).triggered == []
    assert codes(batch(state, [site(120, battery_temperature=55)]).triggered) == [
        "HOT_FOR_A_MINUTE"]


def test_a_late_or_redelivered_reading_is_left_to_the_history() -> None:
    # Evaluated again from the stored readings (tests/test_history.py), not here.
    state = new_state()
    batch(state, [site(10, battery_charge_level=50)])
    key = (CTRL.id, "site_telemetry")
    plan = batch(state, [site(5, battery_charge_level=5), site(10, battery_charge_level=5)])
    assert (plan.triggered, plan.late, plan.marks) == ([], {key: T0 + timedelta(seconds=5)},
                                                       {key: T0 + timedelta(seconds=10)})
    alone = batch(state, [site(10, battery_charge_level=5)])  # the newest one's time
    assert (alone.triggered, alone.late, alone.intervals) == (
        [], {key: T0 + timedelta(seconds=10)}, {})
    later = batch(state, [site(4, battery_charge_level=5), site(12, battery_charge_level=5)])
    assert (later.late, later.marks) == ({key: T0 + timedelta(seconds=4)},
                                         {key: T0 + timedelta(seconds=12)})


def test_a_device_limit_replaces_the_rule_threshold_and_keeps_its_gap() -> None:
    state = new_state()
    state.safety_limits[PACK.id] = {"max_cell_voltage": 3.65}
    plan = batch(state, [pack(0, cell_voltages=[3.5, 3.7])])
    assert codes(plan.triggered) == ["CELL_OVER_VOLTAGE"]
    assert plan.triggered[0].threshold == 3.65
    assert batch(state, [pack(1, cell_voltages=[3.5, 3.62])]).resolved == []  # clear at 3.60
    assert codes(batch(state, [pack(2, cell_voltages=[3.5, 3.6])]).resolved) == [
        "CELL_OVER_VOLTAGE"]


def test_flags_raise_at_once_and_resolve_when_a_reading_no_longer_carries_them() -> None:
    state = new_state()
    plan = batch(state, [pack(0, over_temperature=True, alarm_flags=["FAN_FAILURE"])])
    assert sorted(codes(plan.triggered)) == ["FAN_FAILURE", "PROTECTION_OVER_TEMPERATURE"]
    assert {a.severity for a in plan.triggered} == {"critical", "warning"}
    plan = batch(state, [pack(1, alarm_flags=["FAN_FAILURE"])])
    assert codes(plan.resolved) == ["PROTECTION_OVER_TEMPERATURE"]
    assert codes(batch(state, [pack(2)]).resolved) == ["FAN_FAILURE"]


def test_a_reading_resolves_only_its_own_devices_flags_even_within_one_batch() -> None:
    other = DeviceInfo(3, 10, "north", "pack-2", "battery_pack", 50)
    state = State(devices={CTRL.id: CTRL, PACK.id: PACK, other.id: other})
    batch(state, [pack(0, alarm_flags=["FAN"]),
                  ("battery_telemetry", other.id, T0, {"alarm_flags": ["FAN"]})])
    plan = batch(state, [pack(1)])
    assert [(a.device.id, a.code) for a in plan.resolved] == [(PACK.id, "FAN")]
    assert (other.id, "FAN") in state.open
    plan = batch(state, [pack(2, alarm_flags=["FAN"]), pack(3), pack(4, alarm_flags=["FAN"])])
    assert codes(plan.raised_and_cleared) == ["FAN"]
    assert (PACK.id, "FAN") in state.open
    assert codes(batch(state, [pack(5)]).resolved) == ["FAN"]


def test_silence_raises_offline_and_the_next_reading_resolves_it() -> None:
    state = new_state()
    batch(state, [site(0, battery_charge_level=50)])
    now = T0 + timedelta(seconds=299)
    assert evaluate.plan_offline(state, now, T0, {}).triggered == []
    plan = evaluate.plan_offline(state, T0 + timedelta(seconds=301), T0, {})
    assert codes(plan.triggered) == [OFFLINE]
    evaluate.apply(state, plan)
    # Not twice; and a silence bmsd caused itself (it was away) does not count.
    assert evaluate.plan_offline(state, T0 + timedelta(hours=1), T0, {}).triggered == []
    assert evaluate.plan_offline(new_state(), T0 + timedelta(hours=1), T0, {}).triggered == []
    assert codes(batch(state, [site(400, battery_charge_level=50)]).resolved) == [OFFLINE]


def test_the_offline_limit_follows_the_route_else_the_device_interval() -> None:
    state = new_state()
    for seconds in (0, 10, 20, 30):
        batch(state, [site(seconds, battery_charge_level=50)])
    assert evaluate.offline_limit_s(state, CTRL.id, {}) == 100.0  # 10 x 10 s interval
    assert evaluate.offline_limit_s(state, CTRL.id, {"site_telemetry": 900}) == 900.0
    assert evaluate.offline_limit_s(new_state(), CTRL.id, {}) == 300.0


def test_one_batch_may_clear_an_alert_and_raise_the_same_rule_again() -> None:
    state = new_state()
    batch(state, [site(0, battery_charge_level=10)])
    plan = batch(state, [site(1, battery_charge_level=30), site(2, battery_charge_level=10)])
    assert codes(plan.resolved) == ["BATTERY_LOW"]
    assert codes(plan.triggered) == ["BATTERY_LOW"]
    assert plan.triggered[0].triggered_at == T0 + timedelta(seconds=2)
    assert len(state.open) == 1


def test_one_batch_may_raise_and_clear_an_alert() -> None:
    state = new_state()
    plan = batch(state, [site(0, battery_charge_level=10), site(1, battery_charge_level=30)])
    assert plan.triggered == []
    assert codes(plan.raised_and_cleared) == ["BATTERY_LOW"]
    assert plan.resolved[0].resolved_at == T0 + timedelta(seconds=1)
    assert state.open == {}


def test_streams_without_rules_only_move_marks_and_end_offline() -> None:
    state = new_state()
    state.devices[3] = DeviceInfo(3, 10, "north", "meter-1", "meter", 50)
    rows = {"energy_readings": table([(3, T0, {}), (3, T0 + timedelta(seconds=5), {})])}
    plan = evaluate.evaluate(state, RULES, rows, {})
    assert plan.marks == {(3, "energy_readings"): T0 + timedelta(seconds=5)}


# --- properties ----------------------------------------------------------------------------

levels = st.lists(st.tuples(st.integers(1, 120), st.floats(0, 100, allow_nan=False),
                            st.floats(20, 70, allow_nan=False)), min_size=1, max_size=40)


def in_batches(state: State, readings: list[tuple[str, int, datetime, dict[str, Any]]],
               cuts: list[int], rules: Mapping[str, tuple[Rule, ...]] = RULES,
               backwards: bool = False) -> Iterator[Plan]:
    """Evaluate and commit *readings* in batches cut at *cuts*; yield each plan.
    *backwards*: each batch holds its readings in the reverse order of their times."""
    start = 0
    for end in [*sorted(set(cuts)), len(readings)]:
        if end > start:
            yield batch(state, readings[start:end][::-1] if backwards else readings[start:end],
                        rules)
            start = end


def transitions(readings: list[tuple[int, float, float]], cuts: list[int]) -> list[Any]:
    """Evaluate *readings* in batches cut at *cuts*; return every alert transition."""
    state = new_state()
    seconds, stream = 0, []
    for gap, charge, temperature in readings:
        seconds += gap
        stream.append(site(seconds, battery_charge_level=charge,
                           battery_temperature=temperature))
    out: list[Any] = []
    for plan in in_batches(state, stream, cuts):
        out += [("raised", a.code, a.triggered_at) for a in plan.triggered]
        out += [("raised", a.code, a.triggered_at) for a in plan.raised_and_cleared]
        out += [("resolved", a.code, a.triggered_at, a.resolved_at) for a in plan.resolved]
    return sorted(out, key=repr)


@settings(max_examples=100, deadline=None)
@given(levels, st.lists(st.integers(0, 40), max_size=10))
def test_how_readings_are_batched_changes_no_alert(
    readings: list[tuple[int, float, float]], cuts: list[int]
) -> None:
    one_by_one = transitions(readings, list(range(len(readings))))
    assert transitions(readings, cuts) == one_by_one
    assert transitions(readings, []) == one_by_one


@settings(max_examples=200, deadline=None)
@given(levels, st.lists(st.integers(0, 40), max_size=10))
def test_never_two_unresolved_alerts_for_one_device_and_rule(
    readings: list[tuple[int, float, float]], cuts: list[int]
) -> None:
    # Replay the plans as the database would see them (resolutions, then
    # inserts): the partial unique index must never be violated.
    state = new_state()
    unresolved: set[tuple[int, str]] = set()
    seconds, start = 0, 0
    stream = []
    for gap, charge, temperature in readings:
        seconds += gap
        stream.append(site(seconds, battery_charge_level=charge,
                           battery_temperature=temperature))
    for end in [*sorted(set(cuts)), len(stream)]:
        if end <= start:
            continue
        plan = batch(state, stream[start:end])
        for alert in plan.resolved:
            key = (alert.device.id, alert.code)
            if any(a is alert for a in plan.raised_and_cleared):
                assert key not in unresolved  # inserted resolved, never open
            else:
                unresolved.discard(key)
        for alert in plan.triggered:
            key = (alert.device.id, alert.code)
            assert key not in unresolved
            unresolved.add(key)
        start = end
    assert unresolved == set(state.open)


# Readings of two packs and two site controllers, in any order of arrival:
# values around the thresholds, sometimes absent or NaN, sometimes carrying
# flags. The sites' grids run at 50 and 60 Hz, and one pack has safety limits
# of its own: a batch decides its quiet devices together, grouped by both.
PACK_2 = DeviceInfo(3, 10, "north", "pack-2", "battery_pack", 50)
CTRL_60 = DeviceInfo(4, 11, "south", "ctrl-2", "site_controller", 60)
FREQUENCY = Rule(code="GRID_FREQUENCY_DEVIATION", title="grid frequency",
                 stream="site_telemetry", value="grid_frequency_deviation", op=">",
                 threshold=0.5, clear=0.4, severity="warning", category="grid")
FLEET_RULES = evaluate.by_stream([LOW, HOT, CELL, FREQUENCY])
maybe_value = st.one_of(st.none(), st.just(float("nan")), st.floats(0, 100, allow_nan=False))
site_fields = st.fixed_dictionaries({
    "battery_charge_level": maybe_value, "battery_temperature": maybe_value,
    "grid_frequency": st.sampled_from([None, 49.3, 50.0, 50.45, 50.6, 59.4, 60.0, 60.7])})
fleet_readings = st.lists(st.one_of(
    st.tuples(st.sampled_from([CTRL.id, CTRL_60.id]), st.integers(1, 90), site_fields),
    st.tuples(st.sampled_from([PACK.id, PACK_2.id]), st.integers(1, 90),
              st.builds(lambda cells, flags: {"cell_voltages": cells, **flags},
                        st.lists(st.floats(4.0, 4.3, allow_nan=False), max_size=4),
                        st.sampled_from([{}, {}, {}, {"over_voltage": True},
                                         {"alarm_flags": ["FAN"]}, {"alarm_flags": []}])))),
    min_size=1, max_size=40)


def fleet_transitions(drawn: list[tuple[int, int, dict[str, Any]]], cuts: list[int],
                      backwards: bool = False) -> list[Any]:
    """Evaluate *drawn* readings in batches cut at *cuts* (see `in_batches`); return
    every transition."""
    state = State(devices={d.id: d for d in (CTRL, CTRL_60, PACK, PACK_2)},
                  safety_limits={PACK_2.id: {"max_cell_voltage": 4.1}})
    readings: list[tuple[str, int, datetime, dict[str, Any]]] = []
    clock = dict.fromkeys(state.devices, 0)
    for who, gap, fields in drawn:
        clock[who] += gap
        stream = "battery_telemetry" if who in (PACK.id, PACK_2.id) else "site_telemetry"
        readings.append((stream, who, T0 + timedelta(seconds=clock[who]), fields))
    out: list[Any] = []
    for plan in in_batches(state, readings, cuts, FLEET_RULES, backwards):
        for alert in (*plan.triggered, *plan.raised_and_cleared):
            out.append(("raised", alert.device.id, alert.code, alert.triggered_at, alert.value))
        for alert in plan.resolved:
            out.append(("resolved", alert.device.id, alert.code, alert.triggered_at,
                        alert.resolved_at))
    out.append(("open", sorted(state.open), sorted(state.pending.items())))
    return sorted(out, key=repr)


@settings(max_examples=300, deadline=None)
@given(fleet_readings, st.lists(st.integers(0, 40), max_size=10))
def test_a_batch_of_several_devices_and_streams_decides_as_its_readings_one_by_one(
    drawn: list[tuple[int, int, dict[str, Any]]], cuts: list[int]
) -> None:
    one_by_one = fleet_transitions(drawn, list(range(len(drawn))))
    assert fleet_transitions(drawn, cuts) == one_by_one
    assert fleet_transitions(drawn, []) == one_by_one
    assert fleet_transitions(drawn, cuts, backwards=True) == one_by_one


# The shipped battery rules read five values from two cell arrays; a batch's
# quick check (is anything breached at all?) reads each array once for them.
SHIPPED = evaluate.by_stream(load_rules())
some_floats = st.lists(st.one_of(st.floats(-30, 75, allow_nan=False), st.just(float("nan"))),
                       max_size=4)
pack_fields = st.fixed_dictionaries({}, optional={
    "cell_voltages": st.lists(st.floats(2.0, 4.5, allow_nan=False), max_size=4),
    "cell_temperatures": some_floats, "soc": maybe_value,
    "current": st.floats(-100, 150, allow_nan=False)})


@settings(max_examples=500, deadline=None)
@given(st.lists(pack_fields, min_size=1, max_size=8))
def test_the_quick_breach_check_agrees_with_every_rule_read_on_every_reading(
    readings: list[dict[str, Any]],
) -> None:
    checks = [rule_checks.prepared(rule) for rule in SHIPPED["battery_telemetry"]]
    assert len({c.source for c in checks}) < len(checks)  # fields shared by several rules
    series = table((PACK.id, T0 + timedelta(seconds=i), fields)
                   for i, fields in enumerate(readings))
    facts = {"nominal_grid_frequency_hz": 50}
    one_by_one = any(
        (value := check.value(fields, facts)) is not None and value == value
        and check.breached(value, check.threshold)
        for fields in readings for check in checks)
    assert rule_checks.breaches(checks, series.rows, series.fields, facts) == one_by_one


# A batch's devices with nothing open or pending are first checked together:
# the verdict must be the one each reading gets at its own device's thresholds.
LIMITED_PACK = DeviceInfo(5, 10, "north", "pack-3", "battery_pack", 50)
LIMITS = {LIMITED_PACK.id: {"max_cell_voltage": 3.9, "min_soc": 30.0}}
pack_fields_flags = st.builds(
    lambda fields, flags: {**fields, **flags}, pack_fields,
    st.sampled_from([{}, {}, {"over_voltage": True}, {"alarm_flags": ["FAN"]},
                     {"alarm_flags": []}, {"under_voltage": False}]))
site_readings = st.fixed_dictionaries({}, optional={
    "battery_charge_level": maybe_value,
    "grid_frequency": st.floats(49, 61, allow_nan=False)})


def quiet_verdicts(stream: str, readings: list[tuple[DeviceInfo, dict[str, Any]]],
                   ) -> tuple[bool, bool]:
    """Return (all readings checked together, each at its own device) for *readings*."""
    prepared = [rule_checks.prepared(rule) for rule in SHIPPED[stream]]
    flagged = stream in evaluate.FLAGGED_STREAMS
    alone = True
    for device, fields in readings:
        facts = {"nominal_grid_frequency_hz": device.nominal_grid_frequency_hz}
        for check in rule_checks.device_checks(prepared, device, LIMITS.get(device.id)):
            value = check.value(fields, facts)
            if value is not None and value == value and check.breached(value, check.threshold):
                alone = False
        if flagged and any(fields.get(name) for name in evaluate.FLAG_FIELDS):
            alone = False
    names = evaluate.fields_read(stream, SHIPPED)
    rows = table((device.id, T0 + timedelta(seconds=i), {n: fields.get(n) for n in names})
                 for i, (device, fields) in enumerate(readings))
    devices = {device.id: device for device, _ in readings}
    by_device = [(devices[device_id], series) for device_id, series in evaluate._series(rows)]
    flags_at = [rows.fields[name] for name in evaluate.FLAG_FIELDS] if flagged else []
    together = rule_checks.quiet(prepared, by_device, LIMITS, rows.fields, flags_at)
    return together, alone


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([PACK, PACK_2, LIMITED_PACK]), pack_fields_flags),
                min_size=1, max_size=10))
def test_packs_checked_together_get_each_reading_s_own_verdict(
    readings: list[tuple[DeviceInfo, dict[str, Any]]],
) -> None:
    together, alone = quiet_verdicts("battery_telemetry", readings)
    assert together == alone


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([CTRL, CTRL_60]), site_readings),
                min_size=1, max_size=10))
def test_sites_of_50_and_60_hz_checked_together_get_each_reading_s_own_verdict(
    readings: list[tuple[DeviceInfo, dict[str, Any]]],
) -> None:
    together, alone = quiet_verdicts("site_telemetry", readings)
    assert together == alone
