"""Several bmsd in one MQTT shared group: the load split, nothing lost or doubled,
alerts as one instance would raise them."""

from __future__ import annotations

import itertools
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.fix_daemon import DaemonFactory, DaemonProcess, Publisher, wait_until
from tests.helpers import battery_low_held_for

_groups = itertools.count()
N = 3000


def shared(extra: str = "") -> str:
    """Return a config joining a shared group of this test's own."""
    return f'[mqtt]\nshared_group = "fleet-{os.getpid()}-{next(_groups)}"\n{extra}'


def load(n: int, devices: int) -> list[tuple[str, dict[str, Any]]]:
    start = datetime.now(UTC) - timedelta(hours=1)
    return [(f"factory/shared/m{i % devices}/energy",
             {"timestamp": (start + timedelta(milliseconds=10 * i)).isoformat(),
              "power_kw": i}) for i in range(n)]


def counts(db_url: str) -> tuple[int, int, int, int]:
    """Return readings, distinct readings, devices and dead letters."""
    with psycopg.connect(db_url) as conn:
        row = conn.execute("""
            SELECT (SELECT count(*) FROM energy_readings),
                   (SELECT count(DISTINCT power_kw) FROM energy_readings),
                   (SELECT count(*) FROM devices WHERE slug LIKE 'm%%'),
                   (SELECT count(*) FROM ingest_rejects)""").fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2]), int(row[3])


def received(daemon: DaemonProcess) -> float:
    return daemon.metric("bmsd_messages_received_total")


@pytest.mark.parametrize("members", [2, 3])
def test_members_of_a_shared_group_split_the_load_and_store_it_once(
    bmsd_daemon: DaemonFactory, publisher: Publisher, db_url: str, members: int,
) -> None:
    config = shared()
    daemons = [bmsd_daemon(config) for _ in range(members)]
    # 60 devices none of which exists yet: every member registers some, racing.
    publisher.publish_many(load(N, 60))
    wait_until(lambda: counts(db_url)[0] >= N, timeout_s=60, what=f"{N} readings")
    time.sleep(0.5)
    assert counts(db_url) == (N, N, 60, 0)
    shares = [received(d) for d in daemons]
    assert sum(shares) == N  # each message went to exactly one member
    assert min(shares) > N / members / 3, shares
    ready = daemons[0].http("/readyz")[1]
    assert '"shared_group": "fleet-' in ready
    assert daemons[0].metric("bmsd_instance_info", client_id=daemons[0].client_id) == 1


def test_a_member_killed_mid_load_comes_back_and_nothing_is_lost(
    bmsd_daemon: DaemonFactory, publisher: Publisher, db_url: str,
) -> None:
    config = shared()
    first, second = bmsd_daemon(config), bmsd_daemon(config)
    sender = threading.Thread(target=publisher.publish_many, args=(load(N, 8),), daemon=True)
    sender.start()
    wait_until(lambda: counts(db_url)[0] > N // 5, what="a part stored")
    second.kill()  # SIGKILL; its unacknowledged messages stay in its session
    time.sleep(1)
    # As systemd restarts it: the same client id, so the same session.
    bmsd_daemon(config, client_id=second.client_id)
    sender.join(60)
    wait_until(lambda: counts(db_url)[0] >= N, timeout_s=60, what=f"{N} readings")
    time.sleep(0.5)
    assert counts(db_url) == (N, N, 8, 0)
    assert first.proc is not None
    assert first.proc.poll() is None


# A sequence that crosses BATTERY_LOW's hysteresis (20 / 22) and its for_s
# (30 s here), and BATTERY_CRITICAL (10 / 12): (seconds after T0, charge %).
LEVELS = [(0, 50), (10, 19), (20, 19.5), (30, 21), (40, 19), (50, 18), (80, 17), (90, 21.9),
          (100, 22.5), (110, 15), (150, 9), (160, 11), (170, 13), (180, 30)]
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=20)


def alerts_of(db_url: str, slug: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            "SELECT a.rule_code, a.status, a.triggered_at, a.resolved_at, a.value"
            "  FROM alerts a JOIN devices d ON d.id = a.device_id"
            " WHERE d.slug = %s AND a.rule_code LIKE 'BATTERY%%'"
            " ORDER BY a.triggered_at, a.rule_code", (slug,)).fetchall()


def readings_of(db_url: str, slug: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM site_telemetry t JOIN devices d"
                           " ON d.id = t.device_id WHERE d.slug = %s", (slug,)).fetchone()
    return int(row[0]) if row else 0


def play(publisher: Publisher, db_url: str, slug: str) -> None:
    """Publish LEVELS for one device, each reading once the one before is stored."""
    for n, (second, level) in enumerate(LEVELS, 1):
        publisher.publish(f"site/north/{slug}/telemetry", {
            "timestamp": (T0 + timedelta(seconds=second)).isoformat(),
            "batteryChargeLevel": level})
        wait_until(lambda n=n: readings_of(db_url, slug) == n, what=f"reading {n} of {slug}")


def test_alerts_from_readings_split_across_members_equal_one_instance_s(
    bmsd_daemon: DaemonFactory, publisher: Publisher, db_url: str, tmp_path: Path,
) -> None:
    alerts = battery_low_held_for(tmp_path, 30)
    alone = bmsd_daemon(alerts)
    play(publisher, db_url, "alone")
    assert alone.stop() == 0
    expected = alerts_of(db_url, "alone")
    assert {(code, status) for code, status, *_ in expected} == {
        ("BATTERY_LOW", "resolved"), ("BATTERY_CRITICAL", "resolved")}

    config = shared(alerts)
    members = [bmsd_daemon(config) for _ in range(2)]
    play(publisher, db_url, "split")
    # Round robin: consecutive readings went to different members.
    assert [received(d) for d in members] == [len(LEVELS) / 2] * 2
    wait_until(lambda: len(alerts_of(db_url, "split")) == len(expected), what="the alerts")
    assert alerts_of(db_url, "split") == expected


def test_a_late_reading_raises_its_alert_when_an_instance_joins_a_shared_group(
    bmsd_daemon: DaemonFactory, publisher: Publisher, db_url: str,
) -> None:
    # Alone, bmsd stores no mark for quiet readings; members of a group read
    # each other's from alert_marks with every batch: the mark read at start
    # from the readings must survive that, and the late reading's history is
    # evaluated again.
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)

    def level(seconds: int, value: float) -> None:
        publisher.publish("site/north/ctrl-1/telemetry", {
            "timestamp": (start + timedelta(seconds=seconds)).isoformat(),
            "batteryChargeLevel": value})

    alone = bmsd_daemon()
    level(0, 30)
    level(10, 30)
    wait_until(lambda: stored_levels(db_url) == 2)
    assert alone.stop() == 0
    bmsd_daemon(shared())
    level(5, 15)  # late: older than what was evaluated
    wait_until(lambda: stored_levels(db_url) == 3)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT rule_code, triggered_at, resolved_at, raised_late"
                            " FROM alerts").fetchall() == [
            ("BATTERY_LOW", start + timedelta(seconds=5), start + timedelta(seconds=10),
             True)]


def stored_levels(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM site_telemetry").fetchone()
    assert row is not None
    return int(row[0])
