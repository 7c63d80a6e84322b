"""bmsd under a service manager: sd_notify, the watchdog, signals, the schema check.

The daemon runs as a real process with ``$NOTIFY_SOCKET`` pointing at a
socket the test reads, as systemd would set it; faults come from TCP proxies
in front of the database and the broker (tests/fix_proxy.py).
"""

from __future__ import annotations

import signal
import time

import psycopg

from tests.fix_daemon import DaemonFactory, Publisher, wait_until
from tests.fix_mqtt import Broker
from tests.fix_notify import NotifySocket
from tests.fix_proxy import ProxyFactory

# Fail fast on a dead database, so a test sees the consequences in seconds.
QUICK_DB = ("[database]\nconnect_timeout_s = 2\nstatement_timeout_ms = 1000\n"
            "operation_timeout_s = 2.0\nretry_max_backoff_s = 1.0\n")


def _count(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM battery_telemetry").fetchone()
        return int(row[0]) if row else 0


def test_ready_only_once_subscribed_then_status_reload_and_stop(
    bmsd_daemon: DaemonFactory, mqtt_broker: Broker, tcp_proxy: ProxyFactory,
    notify_socket: NotifySocket,
) -> None:
    broker = tcp_proxy(mqtt_broker.url)
    broker.refuse()
    daemon = bmsd_daemon(broker_url=broker.url(mqtt_broker.url), wait_ready=False,
                         env=notify_socket.env())
    wait_until(lambda: any("waiting for the MQTT subscription" in s
                           for s in notify_socket.statuses()), what="STATUS while waiting")
    time.sleep(1.0)
    assert "READY" not in notify_socket.sent()
    status, body = daemon.http("/readyz")
    assert status == 503
    assert "the MQTT subscription" in body

    broker.heal()
    wait_until(lambda: "READY" in notify_socket.sent(), what="READY=1")
    assert daemon.http("/readyz")[0] == 200  # subscribed before READY was sent
    assert any(s.startswith("ingesting:") and "rows/s" in s and "unresolved alerts" in s
               for s in notify_socket.statuses())

    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: notify_socket.sent()[-2:] == ["RELOADING", "READY"],
               what="RELOADING=1 then READY=1")
    assert "alert_rules_reloaded" in daemon.output()

    assert daemon.stop() == 0
    assert notify_socket.sent()[-1] == "STOPPING"


def test_the_watchdog_is_fed_only_while_the_database_answers(
    bmsd_daemon: DaemonFactory, db_url: str, tcp_proxy: ProxyFactory,
    notify_socket: NotifySocket, publisher: Publisher,
) -> None:
    database = tcp_proxy(db_url)
    daemon = bmsd_daemon(QUICK_DB, database_url=database.url(db_url),
                         env=notify_socket.env(watchdog_usec=1_000_000))
    wait_until(lambda: "READY" in notify_socket.sent(), what="READY=1")
    start = time.monotonic()
    wait_until(lambda: len(notify_socket.times("WATCHDOG", since=start)) >= 3,
               timeout_s=10, what="watchdog pings while healthy")

    # Blackholed: connections stay open, nothing comes back. A ping under
    # way may still land; after that, silence.
    database.blackhole()
    cut = time.monotonic()
    time.sleep(6.0)
    assert notify_socket.times("WATCHDOG", since=cut + 1.5) == []
    assert daemon.proc is not None
    assert daemon.proc.poll() is None
    assert "db_operation_timed_out" in daemon.output()

    publisher.publish("site/wd/pack-1/battery",
                      {"timestamp": "2026-12-03T10:00:00Z", "soc": 50.0, "voltage": 400.0})
    database.heal()
    healed = time.monotonic()
    wait_until(lambda: len(notify_socket.times("WATCHDOG", since=healed)) >= 2,
               timeout_s=20, what="watchdog pings once the database answers again")
    wait_until(lambda: _count(db_url) == 1, what="the reading published meanwhile")


def test_a_second_signal_exits_at_once_while_the_drain_is_stuck(
    bmsd_daemon: DaemonFactory, db_url: str, tcp_proxy: ProxyFactory, publisher: Publisher,
) -> None:
    database = tcp_proxy(db_url)
    daemon = bmsd_daemon("[database]\noperation_timeout_s = 120.0\n"
                         "[ingest]\nshutdown_timeout_s = 60.0\n",
                         database_url=database.url(db_url))
    database.blackhole()
    publisher.publish("site/sig/pack-1/battery",
                      {"timestamp": "2026-12-03T10:00:00Z", "soc": 50.0, "voltage": 400.0})
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "bmsd_stopping" in daemon.output(), what="the first signal's effect")
    time.sleep(1.0)
    assert daemon.proc.poll() is None  # draining, stuck on the database

    second = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(10) == 1
    assert time.monotonic() - second < 3
    assert "bmsd_forced_exit" in daemon.output()

    # Nothing was acknowledged: the next bmsd gets the reading.
    database.heal()
    bmsd_daemon(client_id=daemon.client_id)
    wait_until(lambda: _count(db_url) == 1, what="the redelivered reading")


def test_one_signal_ends_a_drain_stuck_on_the_database_at_its_deadline(
    bmsd_daemon: DaemonFactory, db_url: str, tcp_proxy: ProxyFactory, publisher: Publisher,
) -> None:
    database = tcp_proxy(db_url)
    daemon = bmsd_daemon("[database]\noperation_timeout_s = 120.0\n"
                         "[ingest]\nshutdown_timeout_s = 2.0\n",
                         database_url=database.url(db_url))
    topic = "site/sig/pack-1/battery"
    publisher.publish(topic, {"timestamp": "2026-12-03T10:00:00Z", "soc": 50.0, "voltage": 1.0})
    wait_until(lambda: _count(db_url) == 1, what="the device known to bmsd")
    database.blackhole()
    # The device is known, so this one is held, and its commit hangs.
    publisher.publish(topic, {"timestamp": "2026-12-03T10:00:01Z", "soc": 50.0, "voltage": 1.0})
    time.sleep(1.0)
    started = time.monotonic()
    assert daemon.stop(timeout_s=15) == 0
    assert time.monotonic() - started < 6
    assert '"unacknowledged": 1' in daemon.output()  # bmsd_shutdown_incomplete

    database.heal()
    bmsd_daemon(client_id=daemon.client_id)
    wait_until(lambda: _count(db_url) == 2, what="the redelivered reading")


def test_an_older_schema_stops_bmsd_with_advice(bmsd_daemon: DaemonFactory,
                                               db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DELETE FROM bmsd_migrations WHERE name = '150_overview_views.sql'")
    daemon = bmsd_daemon(wait_ready=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(30) == 1
    out = daemon.output()
    assert "schema is older than this bmsd" in out
    assert "150_overview_views.sql" in out
    assert "run `bmsd migrate` first" in out
