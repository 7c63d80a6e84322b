"""Alerts are a function of each device's readings in time order, and of nothing else:
not the member that stored a reading, the batch it came in, the order batches
committed in, or how late it arrived (bmsd/alerts/history.py). Pure: the
database is tests/alert_memory.py.

tests/test_shared_alerts.py checks the same on the real stack.
"""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from bmsd.alerts import evaluate
from bmsd.alerts.rules import Rule
from tests.alert_memory import Member, Memory, Reading, table_of
from tests.test_evaluate import CELL, CTRL, HOT, LOW, PACK, T0

SOON = Rule(code="HOT_SOON", title="warm", stream="site_telemetry",
            value="battery_temperature", op=">", threshold=49, clear=46, for_s=20,
            severity="warning", category="battery")
RULES = evaluate.by_stream([LOW, HOT, SOON, CELL])
DEVICES = {CTRL.id: CTRL, PACK.id: PACK}
NOW = T0 + timedelta(hours=2)

site_values = st.fixed_dictionaries({
    "battery_charge_level": st.sampled_from([None, 10.0, 19.0, 21.0, 23.0, 30.0]),
    "battery_temperature": st.sampled_from([None, 45.0, 47.0, 49.5, 51.0, 60.0])})
pack_values = st.builds(
    lambda cells, flags: {"cell_voltages": cells, **flags},
    st.sampled_from([[], [4.1, 4.0], [4.18, 4.1], [4.25, 4.1]]),
    st.sampled_from([{}, {}, {}, {"over_voltage": True}, {"alarm_flags": ["FAN"]},
                     {"alarm_flags": []}]))
# Gaps from dense to longer than every for_s, so that runs of breaching
# readings start long before the reading that arrives out of order.
gaps = st.sampled_from([1, 2, 5, 10, 15, 30, 70, 200])
sequences = st.lists(st.one_of(st.tuples(st.just(CTRL.id), gaps, site_values),
                               st.tuples(st.just(PACK.id), gaps, pack_values)),
                     min_size=1, max_size=45)


def timed(drawn: list[tuple[int, int, dict[str, Any]]]) -> list[Reading]:
    """Give each device's readings increasing times."""
    clock = {CTRL.id: T0, PACK.id: T0}
    out: list[Reading] = []
    for device, gap, fields in drawn:
        clock[device] += timedelta(seconds=gap)
        stream = "site_telemetry" if device == CTRL.id else "battery_telemetry"
        out.append((stream, device, clock[device], fields))
    return out


def in_time_order(readings: list[Reading]) -> list[Any]:
    """The reference: one bmsd, one reading per batch, in time order."""
    memory = Memory()
    member = Member(memory, DEVICES, RULES, shared=False, now=NOW)
    for reading in sorted(readings, key=lambda r: r[2]):
        member.commit([reading])
    return table_of(memory)


def as_arrived(readings: list[Reading], seed: int, members: int) -> list[Any]:
    """*readings* arriving in an order drawn from *seed* (some held back, as a gateway's
    buffer; duplicates, as a broker's redelivery), split over *members*, cut into
    batches, committed in a drawn order."""
    rnd = random.Random(seed)
    arrival = sorted(readings, key=lambda r: (r[2] + timedelta(
        seconds=rnd.choice([0, 0, 0, 0, 100, 3000]))))
    arrival += rnd.sample(arrival, k=min(len(arrival), rnd.choice([0, 0, 2])))
    queues: list[list[Reading]] = [[] for _ in range(members)]
    for reading in arrival:
        queues[rnd.randrange(members)].append(reading)
    batches: list[list[list[Reading]]] = []
    for queue in queues:
        cut, own = 0, []
        while cut < len(queue):
            size = rnd.choice([1, 1, 2, 3, 7, 50])
            own.append(queue[cut:cut + size])
            cut += size
        batches.append(own)
    memory = Memory()
    team = [Member(memory, DEVICES, RULES, shared=members > 1, now=NOW)
            for _ in range(members)]
    while any(batches):
        turn = rnd.choice([i for i, own in enumerate(batches) if own])
        team[turn].commit(batches[turn].pop(0))
    return table_of(memory)


@settings(max_examples=300, deadline=None)
@given(sequences, st.integers(0, 2**32), st.integers(1, 3))
def test_alerts_do_not_depend_on_members_batches_commit_order_or_arrival(
    drawn: list[tuple[int, int, dict[str, Any]]], seed: int, members: int
) -> None:
    readings = timed(drawn)
    assert as_arrived(readings, seed, members) == in_time_order(readings)


def test_a_gateway_buffer_flushed_after_live_readings_raises_its_alerts_late() -> None:
    # Live readings of a cool battery; then the buffer of the outage before
    # them, in which it ran hot for 90 s: the alert it implies is stored, late.
    live = [("site_telemetry", CTRL.id, T0 + timedelta(seconds=600 + s),
             {"battery_temperature": 40.0}) for s in range(0, 60, 5)]
    buffered = [("site_telemetry", CTRL.id, T0 + timedelta(seconds=s),
                 {"battery_temperature": 55.0 if 100 <= s < 190 else 40.0})
                for s in range(0, 600, 5)]
    memory = Memory()
    member = Member(memory, DEVICES, RULES, shared=False, now=T0 + timedelta(hours=1),
                    late_after_s=600)
    member.commit(live)
    plans = [member.commit(buffered[i:i + 20]) for i in range(0, len(buffered), 20)]
    stored = {a.code: a for a in memory.alerts.values()}
    assert set(stored) == {"HOT_FOR_A_MINUTE", "HOT_SOON"}
    hot = stored["HOT_FOR_A_MINUTE"]
    assert (hot.triggered_at, hot.raised, hot.resolved_at, hot.raised_late) == (
        T0 + timedelta(seconds=100), T0 + timedelta(seconds=160),
        T0 + timedelta(seconds=190), True)
    # Only the chunk with the hot spell is replayed: the quiet ones cannot change
    # the history (no alert open, none changed since, no condition under way).
    assert [sum(p.replays.values()) for p in plans] == [0, 1] + [0] * (len(plans) - 2)


def test_an_alert_the_readings_no_longer_imply_is_withdrawn_and_kept() -> None:
    # Two readings 30 s apart, both hot: with for_s = 20 they raise HOT_SOON.
    # A reading between them, arriving later, is cool: the condition never
    # held for 20 s, and the alert is withdrawn.
    memory = Memory()
    member = Member(memory, DEVICES, RULES, shared=False, now=NOW)
    at = [T0 + timedelta(seconds=s) for s in (0, 30, 15)]
    member.commit([("site_telemetry", CTRL.id, at[0], {"battery_temperature": 50.0})])
    member.commit([("site_telemetry", CTRL.id, at[1], {"battery_temperature": 50.0})])
    assert [a.code for a in memory.alerts.values()] == ["HOT_SOON"]
    plan = member.commit([("site_telemetry", CTRL.id, at[2], {"battery_temperature": 45.0})])
    assert [a.code for a in plan.withdrawn] == ["HOT_SOON"]
    assert memory.alerts == {}
    assert [a.code for a in memory.withdrawn] == ["HOT_SOON"]
    assert member.state.open == {}


def test_a_reading_beyond_the_window_is_stored_and_counted_not_evaluated() -> None:
    memory = Memory()
    member = Member(memory, DEVICES, RULES, shared=False, now=NOW, window_s=1700)
    member.commit([("site_telemetry", CTRL.id, T0 + timedelta(seconds=3600),
                    {"battery_charge_level": 50.0})])
    plan = member.commit([("site_telemetry", CTRL.id, T0 + timedelta(seconds=s),
                           {"battery_charge_level": 5.0}) for s in (0, 2000, 3000)])
    assert plan.unevaluated == {"site_telemetry": 1}
    # The two within the window raised BATTERY_LOW, which the reading at
    # 3600 s had cleared; the one before the window did not.
    assert [(a.code, a.triggered_at, a.resolved_at) for a in memory.alerts.values()] == [
        ("BATTERY_LOW", T0 + timedelta(seconds=2000), T0 + timedelta(seconds=3600))]


def test_a_for_s_condition_begun_before_the_readings_first_fetched_is_found() -> None:
    # Hot at 0 s, then a reading without a temperature at 100 s: the history
    # fetched for a late reading at 110 s starts 60 s (the longest for_s)
    # before 100 s, after the condition began. It must look further back: the
    # late reading, still hot, completes the minute and raises at once.
    readings = [("site_telemetry", CTRL.id, T0 + timedelta(seconds=s), fields) for s, fields in (
        (0, {"battery_temperature": 51.0}), (100, {"battery_charge_level": 50.0}),
        (200, {"battery_temperature": 40.0}), (110, {"battery_temperature": 51.0}))]
    memory = Memory()
    member = Member(memory, DEVICES, RULES, shared=False, now=NOW)
    for reading in readings:
        member.commit([reading])
    assert table_of(memory) == in_time_order(readings)
    assert {(a.code, a.triggered_at) for a in memory.alerts.values()} == {
        ("HOT_FOR_A_MINUTE", T0), ("HOT_SOON", T0)}


def test_a_quiet_late_reading_inside_a_for_s_condition_under_way_restarts_it() -> None:
    # Hot at 0 and 10 s (HOT_SOON needs 20 s); a cool reading of 5 s arrives
    # late, then hot at 25 s. In time order the condition restarts at 10 s and
    # has held 15 s at 25 s: no alert, though the late reading alone is quiet.
    readings = [("site_telemetry", CTRL.id, T0 + timedelta(seconds=s), {"battery_temperature": t})
                for s, t in ((0, 50.0), (10, 50.0), (5, 40.0), (25, 50.0))]
    memory = Memory()
    member = Member(memory, DEVICES, RULES, shared=False, now=NOW)
    for reading in readings:
        member.commit([reading])
    assert table_of(memory) == in_time_order(readings) == []
