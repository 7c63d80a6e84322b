"""Inline alerts against real Mosquitto and TimescaleDB: lifecycle, persistence, MQTT."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bmsd.alerts.rules import DEFAULT_RULES_PATH, Rule, load_rules
from bmsd.alerts.state import State
from bmsd.alerts.store import AlertStore
from bmsd.errors import ConfigError
from tests.fix_daemon import DaemonFactory, Publisher, wait_until
from tests.fix_proxy import ProxyFactory
from tests.helpers import add_device, battery_low_held_for

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
SITE_TOPIC = "site/north/ctrl-1/telemetry"


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def alerts(db_url: str, code: str | None = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            "SELECT rule_code, status, triggered_at, resolved_at, value, threshold FROM alerts"
            " WHERE %(code)s::text IS NULL OR rule_code = %(code)s ORDER BY id",
            {"code": code}).fetchall()


def publish_levels(publisher: Publisher, levels: list[tuple[float, float]],
                   topic: str = SITE_TOPIC) -> None:
    for second, level in levels:
        publisher.publish(topic, {"timestamp": at(second), "batteryChargeLevel": level})


def stored(db_url: str, table: str = "site_telemetry") -> int:
    with psycopg.connect(db_url) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # type: ignore[index]


# --- rules (pure) -----------------------------------------------------------------------------

def test_shipped_rules_cover_the_background_documents_limits() -> None:
    rules = {r.code: r for r in load_rules()}
    assert (rules["BATTERY_LOW"].threshold, rules["BATTERY_LOW"].clear) == (20, 22)
    assert rules["BATTERY_CRITICAL"].threshold == 10
    assert rules["BATTERY_HIGH_TEMP"].threshold == 50
    assert rules["GRID_FREQUENCY_DEVIATION"].threshold == 0.5
    assert rules["CELL_OVER_VOLTAGE"].threshold == 4.2
    assert rules["CELL_UNDER_VOLTAGE"].threshold == 2.5
    assert rules["CHARGE_OVER_CURRENT"].thresholds(None) == (-50, -48)
    assert rules["CHARGE_OVER_CURRENT"].thresholds({"max_charge_current": 30}) == (-30, -28)
    assert rules["DISCHARGE_OVER_CURRENT"].threshold == 100
    assert all(r.clear is not None for r in rules.values())


@pytest.mark.parametrize(("fields", "message"), [
    ({"value": "nonsense"}, "has no value 'nonsense'"),
    ({"clear": 18}, "must lie on the safe side"),
    ({"message": "{missing}"}, "message template"),
])
def test_a_bad_rule_is_refused_with_its_code(tmp_path: Path, fields: dict[str, Any],
                                             message: str) -> None:
    rule = {"code": "X_LOW", "title": "x", "stream": "site_telemetry",
            "value": "battery_charge_level", "op": "<", "threshold": 20, "clear": 22,
            "severity": "warning", "category": "battery", **fields}
    path = tmp_path / "rules.toml"
    path.write_text("[[rules]]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in rule.items()))
    with pytest.raises(ConfigError, match=message):
        load_rules(path)


def test_clear_threshold_semantics() -> None:
    low = Rule(code="L", title="l", stream="site_telemetry", value="battery_charge_level",
               op="<", threshold=20, clear=22, severity="warning", category="c")
    assert low.breached(19.9, 20)
    assert not low.breached(20, 20)
    assert not low.cleared(21.9, 22)
    assert low.cleared(22, 22)


# --- lifecycle ----------------------------------------------------------------------------------

def test_hysteresis_gives_one_alert_for_a_noisy_value(
    bmsd_daemon: DaemonFactory, publisher: Publisher, db_url: str
) -> None:
    daemon = bmsd_daemon()
    levels = [(0, 50), (10, 19), (20, 21), (30, 19.5), (40, 21.9), (50, 20.5), (60, 22.5),
              (70, 30)]
    publish_levels(publisher, levels)
    wait_until(lambda: stored(db_url) == len(levels))
    wait_until(lambda: alerts(db_url, "BATTERY_LOW") and alerts(db_url)[0][1] == "resolved")
    (code, status, triggered, resolved, value, threshold), = alerts(db_url)
    assert (code, status, value, threshold) == ("BATTERY_LOW", "resolved", 19.0, 20.0)
    assert triggered == T0 + timedelta(seconds=10)
    assert resolved == T0 + timedelta(seconds=60)
    with psycopg.connect(db_url) as conn:
        kinds = [k for (k,) in conn.execute(
            "SELECT kind FROM events WHERE kind LIKE 'alert%' ORDER BY time")]
    assert kinds == ["alert_triggered", "alert_resolved"]
    assert daemon.metric("bmsd_alert_transitions_total", code="BATTERY_LOW") == 2


def test_an_alert_cleared_and_raised_again_in_one_batch_is_two_alerts(
    bmsd_daemon: DaemonFactory, publisher: Publisher, db_url: str
) -> None:
    # One gateway batch: the existing alert clears, the rule fires again, clears,
    # and fires a third time. The database holds one unresolved alert at a time.
    daemon = bmsd_daemon()
    publish_levels(publisher, [(0, 15)])
    wait_until(lambda: len(alerts(db_url)) == 1)
    publisher.publish(SITE_TOPIC, {"readings": [
        {"timestamp": at(s), "batteryChargeLevel": v}
        for s, v in [(10, 30), (20, 15), (30, 30), (40, 15)]]})
    wait_until(lambda: len(alerts(db_url)) == 3)
    assert [a[1] for a in alerts(db_url)] == ["resolved", "resolved", "active"]
    # A later low reading belongs to the open alert: no fourth alert.
    publish_levels(publisher, [(50, 14)])
    wait_until(lambda: stored(db_url) == 6)
    time.sleep(0.5)
    assert [a[1] for a in alerts(db_url)] == ["resolved", "resolved", "active"]
    assert daemon.http("/readyz")[0] == 200


def test_for_s_waits_for_the_condition_to_hold(
    bmsd_daemon: DaemonFactory, publisher: Publisher, db_url: str, tmp_path: Path
) -> None:
    bmsd_daemon(battery_low_held_for(tmp_path, 30))
    publish_levels(publisher, [(0, 19), (10, 19), (20, 25), (30, 19), (45, 18)],
                   topic="site/north/a/telemetry")
    publish_levels(publisher, [(0, 19), (10, 18), (35, 17)], topic="site/north/b/telemetry")
    wait_until(lambda: stored(db_url) == 8)
    wait_until(lambda: len(alerts(db_url)) == 1)
    time.sleep(0.5)
    # Device a never held below 20 for 30 s; device b did, from t=0.
    (code, status, triggered, *_), = alerts(db_url)
    assert (code, status, triggered) == ("BATTERY_LOW", "active", T0)


def test_late_and_redelivered_readings_change_no_alert(
    bmsd_daemon: DaemonFactory, publisher: Publisher, db_url: str
) -> None:
    bmsd_daemon()
    publish_levels(publisher, [(20, 15)])
    wait_until(lambda: len(alerts(db_url)) == 1)
    publish_levels(publisher, [(10, 80)])  # late: older than what was evaluated
    publish_levels(publisher, [(20, 15)])  # redelivered trigger
    wait_until(lambda: stored(db_url) == 2)
    time.sleep(0.5)
    assert [a[:2] for a in alerts(db_url)] == [("BATTERY_LOW", "active")]


def test_after_kill_9_there_is_still_exactly_one_alert_and_it_resolves(
    bmsd_daemon: DaemonFactory, publisher: Publisher, db_url: str, mqtt_broker: Any
) -> None:
    daemon = bmsd_daemon()
    publish_levels(publisher, [(0, 30), (10, 15)])
    wait_until(lambda: len(alerts(db_url)) == 1)
    daemon.kill()
    # The retained notification is lost (say the broker dropped it): the
    # restarted bmsd must announce it again from the database.
    publisher.publish("bmsd/alerts/north/ctrl-1/BATTERY_LOW", b"", retain=True)
    restarted = bmsd_daemon(client_id=daemon.client_id)
    wait_until(lambda: any(e.get("event") == "alerts_republished" and e.get("count") == 1
                           for e in restarted.events()))
    seen = retained(mqtt_broker.publisher_url, "bmsd/alerts/north/ctrl-1/BATTERY_LOW")
    assert seen is not None
    assert seen["status"] == "active"
    publish_levels(publisher, [(10, 15), (20, 14)])  # a redelivery and a new low reading
    publish_levels(publisher, [(30, 40)])
    wait_until(lambda: alerts(db_url)[0][1] == "resolved")
    assert len(alerts(db_url)) == 1
    assert restarted.metric("bmsd_alerts_unresolved", severity="warning") == 0



def test_after_a_restart_a_late_reading_raises_what_its_history_implies_late(
    bmsd_daemon: DaemonFactory, publisher: Publisher, db_url: str
) -> None:
    daemon = bmsd_daemon()
    publish_levels(publisher, [(0, 30), (10, 30)])
    wait_until(lambda: stored(db_url) == 2)
    daemon.kill()
    with psycopg.connect(db_url) as conn:
        # Quiet readings store no mark: a restart reads it from the readings.
        assert conn.execute("SELECT count(*) FROM alert_marks").fetchone() == (0,)
    restarted = bmsd_daemon(client_id=daemon.client_id)
    publish_levels(publisher, [(5, 15)])  # late: older than what was evaluated
    wait_until(lambda: stored(db_url) == 3)
    # In time order 30, 15, 30: BATTERY_LOW from 5 s, cleared at 10 s, stored
    # half an hour after its reading: raised late.
    wait_until(lambda: alerts(db_url), what="the late alert")
    assert alerts(db_url) == [("BATTERY_LOW", "resolved", T0 + timedelta(seconds=5),
                               T0 + timedelta(seconds=10), 15.0, 20.0)]
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT raised_at, raised_late FROM alerts").fetchall() == [
            (T0 + timedelta(seconds=5), True)]
    assert restarted.metric("bmsd_alert_corrections_total", kind="raised_late") == 1
    assert restarted.metric("bmsd_alert_history_replays_total", stream="site_telemetry") == 1


def test_a_for_s_condition_under_way_survives_a_restart(
    bmsd_daemon: DaemonFactory, publisher: Publisher, db_url: str, tmp_path: Path
) -> None:
    config = battery_low_held_for(tmp_path, 30)
    daemon = bmsd_daemon(config)
    publish_levels(publisher, [(0, 19)])  # the condition starts
    wait_until(lambda: stored(db_url) == 1)
    daemon.kill()
    bmsd_daemon(config, client_id=daemon.client_id)
    publish_levels(publisher, [(30, 18)])  # and has held for 30 s
    wait_until(lambda: len(alerts(db_url)) == 1)
    assert alerts(db_url)[0][:3] == ("BATTERY_LOW", "active", T0)


def test_a_shared_group_member_keeps_the_later_of_its_own_and_the_stored_mark(
    db_url: str,
) -> None:
    stream, later = "battery_telemetry", T0 + timedelta(seconds=10)
    with psycopg.connect(db_url, autocommit=True) as conn:
        a, b = add_device(conn, "north", "pack-a"), add_device(conn, "north", "pack-b")
        conn.execute("INSERT INTO alert_marks (device_id, stream, evaluated_until)"
                     " VALUES (%s, %s, %s), (%s, %s, %s)", (a, stream, later, b, stream, T0))
        # a: another member evaluated further; b: this member's own mark is later
        # (read at start from the readings: alone, bmsd stored none since).
        state = State(marks={(a, stream): T0, (b, stream): later})
        AlertStore().refresh(conn, state, [a, b])
    assert state.marks == {(a, stream): later, (b, stream): later}


def retained(url: str, topic: str, wait_s: float = 3.0) -> dict[str, Any] | None:
    """Return the retained message on *topic* (None if there is none)."""
    parts = urlsplit(url)
    got: list[bytes] = []
    done = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{time.monotonic_ns()}")
    if parts.username:
        client.username_pw_set(unquote(parts.username), unquote(parts.password or ""))

    def on_message(c: paho.Client, u: object, m: paho.MQTTMessage) -> None:
        if m.retain:
            got.append(m.payload)
            done.set()

    client.on_message = on_message
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
    client.subscribe(topic, qos=1)
    client.loop_start()
    done.wait(wait_s)
    client.disconnect()
    client.loop_stop()
    return json.loads(got[0]) if got and got[0] else None


def test_alerts_are_published_retained_and_cleared_on_resolution(
    bmsd_daemon: DaemonFactory, publisher: Publisher, db_url: str, mqtt_broker: Any
) -> None:
    bmsd_daemon()
    topic = "bmsd/alerts/north/ctrl-1/BATTERY_CRITICAL"
    live: list[dict[str, Any]] = []
    parts = urlsplit(mqtt_broker.publisher_url)
    watcher = paho.Client(CallbackAPIVersion.VERSION2, client_id="alert-watcher")
    watcher.username_pw_set(unquote(parts.username or ""), unquote(parts.password or ""))
    watcher.on_message = lambda c, u, m: live.append(json.loads(m.payload) if m.payload else {})
    watcher.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
    watcher.subscribe(topic, qos=1)
    watcher.loop_start()
    try:
        publish_levels(publisher, [(0, 8)])
        wait_until(lambda: len(live) >= 1, what="the alert on MQTT")
        assert live[0]["status"] == "active"
        assert live[0]["code"] == "BATTERY_CRITICAL"
        assert live[0]["severity"] == "critical"
        assert live[0]["message"] == "ctrl-1 at north: battery charge 8.0 % below 10 %"
        assert retained(mqtt_broker.publisher_url, topic)["status"] == "active"  # type: ignore[index]
        publish_levels(publisher, [(10, 50)])
        wait_until(lambda: any(m.get("status") == "resolved" for m in live))
        wait_until(lambda: retained(mqtt_broker.publisher_url, topic, wait_s=0.5) is None,
                   what="the retained message cleared")
    finally:
        watcher.disconnect()
        watcher.loop_stop()


def test_notifications_wait_for_their_broker_and_readings_wait_for_the_notifications(
    bmsd_daemon: DaemonFactory, publisher: Publisher, db_url: str, mqtt_broker: Any,
    tcp_proxy: ProxyFactory,
) -> None:
    # Notifications go over a connection of their own, here through a proxy
    # that is then cut: they wait in bmsd, and above the bound it stops
    # taking readings, which wait at the broker; nothing is dropped.
    proxy = tcp_proxy(mqtt_broker.url)
    daemon = bmsd_daemon(f'[alerts]\nmqtt_url = "{proxy.url(mqtt_broker.url)}"\n'
                         "max_pending_notifications = 2\n")
    wait_until(lambda: proxy.connections > 0, what="the notification connection")
    proxy.refuse()
    proxy.cut()
    sites = [f"ctrl-{n}" for n in range(4)]
    for second, device in enumerate(sites):
        publisher.publish(f"site/north/{device}/telemetry",
                          {"timestamp": at(second), "batteryChargeLevel": 8})
    # Each reading raises BATTERY_LOW and BATTERY_CRITICAL.
    wait_until(lambda: daemon.metric("bmsd_alert_notifications_pending") == 2 * len(sites),
               what="eight notifications waiting for their broker")
    before = stored(db_url)
    publish_levels(publisher, [(60 + s, 50) for s in range(10)], topic="site/north/ok/telemetry")
    time.sleep(2)
    assert stored(db_url) == before  # not taken while the notifications wait
    assert "alert_notifications_backlog" in [e.get("event") for e in daemon.events()]
    proxy.heal()
    wait_until(lambda: stored(db_url) == before + 10, timeout_s=60,
               what="the readings taken once the notifications went out")
    assert daemon.metric("bmsd_alert_notifications_pending") == 0
    for device in sites:
        document = retained(mqtt_broker.publisher_url,
                            f"bmsd/alerts/north/{device}/BATTERY_CRITICAL") or {}
        assert document.get("status") == "active", device


def test_an_acknowledged_alert_still_resolves(
    bmsd_daemon: DaemonFactory, publisher: Publisher, db_url: str
) -> None:
    bmsd_daemon()
    publish_levels(publisher, [(0, 15)])
    wait_until(lambda: len(alerts(db_url)) == 1)
    listing = subprocess.run([sys.executable, "-m", "bmsd", "alerts", "--database-url", db_url,
                              "--site", "north"], capture_output=True, text=True, check=True)
    assert "BATTERY_LOW" in listing.stdout
    assert "north/ctrl-1" in listing.stdout
    with psycopg.connect(db_url) as conn:
        (alert_id,), = conn.execute("SELECT id FROM alerts").fetchall()
    ack = subprocess.run([sys.executable, "-m", "bmsd", "alerts", "ack", str(alert_id),
                          "--by", "ann", "--database-url", db_url],
                         capture_output=True, text=True, check=False)
    assert ack.returncode == 0, ack.stderr
    assert f"alert {alert_id} (BATTERY_LOW) acknowledged by ann" in ack.stdout
    again = subprocess.run([sys.executable, "-m", "bmsd", "alerts", "ack", str(alert_id),
                            "--by", "bob", "--database-url", db_url],
                           capture_output=True, text=True, check=False)
    assert again.returncode == 1
    assert "already acknowledged" in again.stderr
    publish_levels(publisher, [(10, 60)])
    wait_until(lambda: alerts(db_url)[0][1] == "resolved")


# --- battery packs: per-device limits, protection and alarm flags --------------------------

def pack(topic: str, second: float, **fields: Any) -> tuple[str, dict[str, Any]]:
    return topic, {"timestamp": at(second), **fields}


def test_per_device_limits_from_safety_constraints_override_the_defaults(
    bmsd_daemon: DaemonFactory, publisher: Publisher, db_url: str
) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO organizations (slug, name) VALUES ('o', 'O')")
        conn.execute("INSERT INTO sites (organization_id, slug, name) VALUES (1, 'north', 'N')")
        conn.execute("INSERT INTO devices (site_id, slug, kind) VALUES (1, 'strict', "
                     "'battery_pack'), (1, 'normal', 'battery_pack')")
        conn.execute("INSERT INTO safety_constraints (device_id, max_cell_voltage,"
                     " effective_from) VALUES (1, 4.0, now() - interval '1 day')")
    bmsd_daemon()
    cells = [3.9, 4.05, 3.95]
    publisher.publish_many([pack("site/north/strict/battery", 0, cell_voltages=cells),
                            pack("site/north/normal/battery", 0, cell_voltages=cells)])
    wait_until(lambda: stored(db_url, "battery_telemetry") == 2)
    wait_until(lambda: len(alerts(db_url)) == 1)
    time.sleep(0.5)
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT d.slug, a.rule_code, a.threshold FROM alerts a"
                            " JOIN devices d ON d.id = a.device_id").fetchall()
    assert rows == [("strict", "CELL_OVER_VOLTAGE", 4.0)]


def test_protection_and_alarm_flags_raise_at_once_and_resolve_when_gone(
    bmsd_daemon: DaemonFactory, publisher: Publisher, db_url: str
) -> None:
    bmsd_daemon()
    topic = "site/north/pack-1/battery"
    publisher.publish_many([pack(topic, 0, soc=50, over_current=True,
                                 alarm_flags=["fan_fault", "door_open"])])
    wait_until(lambda: len(alerts(db_url)) == 3)
    with psycopg.connect(db_url) as conn:
        raised = conn.execute("SELECT rule_code, severity, category FROM alerts"
                              " ORDER BY rule_code").fetchall()
    assert raised == [("PROTECTION_OVER_CURRENT", "critical", "battery_protection"),
                      ("door_open", "warning", "device_alarm"),
                      ("fan_fault", "warning", "device_alarm")]
    publisher.publish_many([pack(topic, 10, soc=50, over_current=False,
                                 alarm_flags=["door_open"])])
    wait_until(lambda: sum(a[1] == "resolved" for a in alerts(db_url)) == 2)
    assert {a[0] for a in alerts(db_url) if a[1] == "active"} == {"door_open"}


@pytest.mark.parametrize(("topic", "field"), [
    ("site/north/pack-9/battery", "soc"),  # a stream rules read
    ("factory/north/press-9/energy", "power_kw"),  # one no rule reads
])
def test_a_silent_device_is_reported_offline_and_recovers(
    bmsd_daemon: DaemonFactory, publisher: Publisher, db_url: str, topic: str, field: str,
) -> None:
    routes = "\n".join(
        f'[[routes]]\ntopic = "{t}"\nstream = "{s}"\ndevice_kind = "{k}"\n{extra}'
        for t, s, k, extra in [
            ("site/{site}/{device}/telemetry", "site_telemetry", "site_controller", ""),
            ("site/{site}/{device}/battery", "battery_telemetry", "battery_pack",
             "offline_after_s = 2\n"),
            ("factory/{site}/{device}/energy", "energy_readings", "machine",
             "offline_after_s = 2\n")])
    bmsd_daemon(f"[alerts]\noffline_check_s = 1\n{routes}")
    now = datetime.now(UTC)
    publisher.publish(topic, {"timestamp": now.isoformat(), field: 50})
    wait_until(lambda: alerts(db_url, "DEVICE_OFFLINE"), timeout_s=15, what="offline alert")
    assert alerts(db_url, "DEVICE_OFFLINE")[0][1] == "active"
    # A batch of two readings: the newer one ends the silence.
    publisher.publish(topic, {"readings": [
        {"timestamp": (datetime.now(UTC) - timedelta(seconds=s)).isoformat(), field: 50}
        for s in (30, 0)]})
    wait_until(lambda: alerts(db_url, "DEVICE_OFFLINE")[0][1] == "resolved")


def test_sighup_reloads_rules_and_refuses_invalid_ones(
    bmsd_daemon: DaemonFactory, publisher: Publisher, db_url: str, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(DEFAULT_RULES_PATH.read_text())
    daemon = bmsd_daemon(f'[alerts]\nrules_file = "{rules}"\n')
    publish_levels(publisher, [(0, 35)])
    wait_until(lambda: stored(db_url) == 1)
    assert alerts(db_url) == []
    rules.write_text(DEFAULT_RULES_PATH.read_text().replace(
        "threshold = 20\nclear = 22", "threshold = 40\nclear = 42"))
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: any(e.get("event") == "alert_rules_reloaded" for e in daemon.events()))
    publish_levels(publisher, [(10, 35)])
    wait_until(lambda: [a[0] for a in alerts(db_url)] == ["BATTERY_LOW"])

    rules.write_text("[[rules]]\ncode = 'broken'\n")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: any(e.get("event") == "alert_rules_refused" for e in daemon.events()))
    publish_levels(publisher, [(20, 50)])  # the old rule set still clears the alert
    wait_until(lambda: alerts(db_url)[0][1] == "resolved")
