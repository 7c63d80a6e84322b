"""On the real stack: the alert table is that of each device's readings in time order,
whoever stored them and whenever they arrived (bmsd/alerts/history.py).

Each case publishes a sequence unpaced (as a gateway flushing its buffer does)
to one bmsd, two or three members of a shared group, or a member killed with
kill -9 mid-sequence, and compares the alert table with that of one bmsd
given the same readings in time order. tests/test_history.py draws the same
without a database, by the hundred.
"""

from __future__ import annotations

import itertools
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.fix_daemon import DaemonFactory, Publisher, wait_until

SITES = 7
SECONDS = 180
_groups = itertools.count()
RULES = """
[[rules]]
code = "BATTERY_LOW"
title = "battery charge low"
stream = "site_telemetry"
value = "battery_charge_level"
op = "<"
threshold = 20
clear = 22
severity = "warning"
category = "battery"

[[rules]]
code = "BATTERY_CRITICAL"
title = "battery charge critical"
stream = "site_telemetry"
value = "battery_charge_level"
op = "<"
threshold = 10
clear = 12
severity = "critical"
category = "battery"

[[rules]]
code = "BATTERY_HOT"
title = "battery hot"
stream = "site_telemetry"
value = "battery_temperature"
op = ">"
threshold = 45
clear = 43
for_s = 20
severity = "error"
category = "battery"
"""


def config(folder: Path, members: int, late_after_s: int) -> str:
    rules = folder / "alerts.toml"
    rules.write_text(RULES)
    text = f'[alerts]\nrules_file = "{rules}"\nlate_after_s = {late_after_s}\n'
    if members > 1:
        text += f'[mqtt]\nshared_group = "history-{os.getpid()}-{next(_groups)}"\n'
    return text


def charge(second: int) -> float:
    """State of charge crossing 20/22 % and 10/12 %, dwelling inside both bands."""
    if second < 20:
        return 30 - second * 0.55
    if second < 40:
        return (19.0, 21.0, 21.5)[second % 3]  # LOW, then inside its band
    if second < 50:
        return 23.0  # clears LOW
    if second < 70:
        return 23 - (second - 50) * 0.7
    if second < 90:
        return (9.5, 11.0, 11.5)[second % 3]  # CRITICAL, then inside its band
    if second < 100:
        return 13.0  # clears CRITICAL, LOW holds
    if second < 120:
        return 21.0  # inside LOW's band
    if 150 <= second < 155:
        return 18.0
    return 25.0


def temperature(second: int, site: int) -> float:
    """Hot for 15 s (against for_s = 20: no alert), then for 30 s."""
    if 30 + site <= second < 45 + site or 100 + site <= second < 130 + site:
        return 50.0
    return 40.0


def sequence(prefix: str, start: datetime, seconds: range = range(SECONDS)
             ) -> list[tuple[str, dict[str, Any]]]:
    """The readings of SITES sites' controllers, in time order."""
    return [(f"site/{prefix}-{site}/ctl-{site}/telemetry", {
        "timestamp": (start + timedelta(seconds=second)).isoformat(),
        "batteryChargeLevel": charge(second),
        "batteryTemperature": temperature(second, site)})
        for second in seconds for site in range(SITES)]


def stored(db_url: str, prefix: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM site_telemetry t JOIN devices d"
                           " ON d.id = t.device_id JOIN sites s ON s.id = d.site_id"
                           " WHERE s.slug LIKE %s", (f"{prefix}-%",)).fetchone()
    return int(row[0]) if row else 0


def alert_table(db_url: str, prefix: str) -> list[tuple[Any, ...]]:
    """The alerts of the sites of *prefix*, as an operator compares them."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT s.slug, a.rule_code, a.triggered_at, a.resolved_at, a.status,"
            "       a.raised_late FROM alerts a JOIN sites s ON s.id = a.site_id"
            " WHERE s.slug LIKE %s", (f"{prefix}-%",)).fetchall()
    return sorted((slug.removeprefix(prefix), *rest) for slug, *rest in rows)


@pytest.fixture
def run(bmsd_daemon: DaemonFactory, publisher: Publisher, db_url: str, tmp_path: Path
        ) -> Any:
    prefixes = (f"p{n}" for n in itertools.count())

    def play(messages_of: Any, members: int = 1, late_after_s: int = 3600,
             kill_after: int | None = None) -> list[tuple[Any, ...]]:
        """Publish *messages_of(prefix)* unpaced to *members*; return the alert table once
        every reading is stored. *kill_after*: kill -9 the first member once that
        many are stored, and start it again."""
        prefix = next(prefixes)
        text = config(tmp_path, members, late_after_s)
        team = [bmsd_daemon(text) for _ in range(members)]
        messages = messages_of(prefix)
        publisher.publish_many(messages)
        if kill_after is not None:
            wait_until(lambda: stored(db_url, prefix) >= kill_after, what="half the readings")
            team[0].kill()
            team[0] = bmsd_daemon(text, client_id=team[0].client_id)
        wait_until(lambda: stored(db_url, prefix) == len(messages), timeout_s=120,
                   what=f"{len(messages)} readings")
        table = alert_table(db_url, prefix)
        for daemon in team:
            assert daemon.stop() == 0
        return table

    return play


def test_one_bmsd_given_a_burst_raises_the_alerts_of_the_readings_in_time_order(
    run: Any, db_url: str
) -> None:
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=SECONDS + 20)
    table = run(lambda prefix: sequence(prefix, start))
    # Per site: LOW three times (from 19 s, cleared at 40 s; from 55 s, held
    # through CRITICAL; from 150 s), CRITICAL once, HOT once (the 15 s spell
    # is shorter than for_s).
    codes = sorted(code for _, code, *_ in table)
    assert codes == sorted(["BATTERY_LOW"] * 3 * SITES + ["BATTERY_CRITICAL"] * SITES
                           + ["BATTERY_HOT"] * SITES)
    hot = [row for row in table if row[0] == "-0" and row[1] == "BATTERY_HOT"]
    assert hot == [("-0", "BATTERY_HOT", start + timedelta(seconds=100),
                    start + timedelta(seconds=130), "resolved", False)]


@pytest.mark.parametrize("members", [2, 3])
def test_members_of_a_shared_group_given_a_burst_store_one_bmsd_s_alerts(
    run: Any, members: int
) -> None:
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=SECONDS + 20)
    expected = run(lambda prefix: sequence(prefix, start))
    assert run(lambda prefix: sequence(prefix, start), members=members) == expected


def test_a_member_killed_mid_burst_and_restarted_stores_one_bmsd_s_alerts(run: Any) -> None:
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=SECONDS + 20)
    expected = run(lambda prefix: sequence(prefix, start))
    assert run(lambda prefix: sequence(prefix, start), members=2,
               kill_after=SITES * SECONDS // 2) == expected


def test_a_gateway_buffer_flushed_after_live_readings_stores_its_alerts_raised_late(
    run: Any,
) -> None:
    # A gateway back from a 30-minute outage: its live readings first, then
    # the buffer, oldest first. The alerts of the outage are stored, marked
    # raised late (stored more than late_after_s after their readings).
    now = datetime.now(UTC).replace(microsecond=0)
    outage = now - timedelta(minutes=30)

    def flushed(prefix: str) -> list[tuple[str, dict[str, Any]]]:
        buffered = (sequence(prefix, outage, range(SECONDS))  # the sequence, in the outage
                    + sequence(prefix, outage, range(SECONDS, 1780, 10)))  # then quiet
        live = sequence(prefix, outage, range(1780, 1800))
        return live + buffered

    def in_order(prefix: str) -> list[tuple[str, dict[str, Any]]]:
        return sorted(flushed(prefix), key=lambda m: m[1]["timestamp"])

    expected = run(in_order, late_after_s=300)
    assert {late for *_, late in expected} == {True}
    assert run(flushed, late_after_s=300) == expected
    assert run(flushed, members=2, late_after_s=300) == expected
