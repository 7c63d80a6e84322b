"""Faults under load, each with exact accounting: every published reading stored once.

The faults are made by TCP proxies (tests/fix_proxy.py) in front of the
shared servers, or on servers of the test's own, so no other test notices.
Each test records what it published and stored, and how long bmsd took to
notice the fault and to recover, for the reliability report
(tests/fix_report.py); outages last 30 s when the report runs them, 5 s in CI.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bmsd.schema.migrate import migrate
from tests.fix_daemon import DaemonFactory, DaemonProcess, Publisher, wait_until
from tests.fix_mqtt import Broker
from tests.fix_proxy import Proxy, ProxyFactory
from tests.fix_report import Record, Scenario, full_or_short
from tools.localstack import LocalMosquitto, LocalPostgres

N = 2000
OUTAGE_S = full_or_short(30, 5)
QUICK_DB = ("[database]\nconnect_timeout_s = 2\nstatement_timeout_ms = 2000\n"
            "operation_timeout_s = 3.0\nretry_max_backoff_s = 1.0\n")


def load(n: int = N, step_ms: float = 10.0) -> list[tuple[str, dict[str, Any]]]:
    """Return *n* distinct readings of four machines *step_ms* apart from an hour ago
    (readings after now + [ingest] max_future_s would be dead-lettered)."""
    start = datetime.now(UTC) - timedelta(hours=1)
    assert n * step_ms < 3_600_000, "readings in the future: a smaller step_ms"
    return [(f"factory/faults/m{i % 4}/energy",
             {"timestamp": (start + timedelta(milliseconds=step_ms * i)).isoformat(),
              "power_kw": i}) for i in range(n)]


def dead_letters(db_url: str) -> list[tuple[str, int]]:
    with psycopg.connect(db_url) as conn:
        return [(str(r[0]), int(r[1])) for r in conn.execute(
            "SELECT reason, count(*) FROM ingest_rejects GROUP BY reason ORDER BY 2 DESC")]


def stored(db_url: str) -> tuple[int, int]:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT power_kw) FROM energy_readings"
                           ).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)


def exactly(db_url: str, n: int = N, dead: int = 0) -> tuple[int, int, int]:
    """Wait for *n* readings; assert each is stored once and *dead* dead letters.

    A backlog may take long to drain: fail only when nothing new was stored for a
    minute. Return (stored, duplicates, dead letters) for the report."""
    seen, since = -1, time.monotonic()
    while (count := stored(db_url)[0]) < n:
        if count > seen:
            seen, since = count, time.monotonic()
        assert time.monotonic() - since < 60, (
            f"stuck at {count} of {n} readings for 60 s; dead letters: {dead_letters(db_url)}")
        time.sleep(0.2)
    time.sleep(0.5)
    count, distinct = stored(db_url)
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM ingest_rejects").fetchone()
        rejects = int(row[0]) if row else -1
    assert (count, distinct) == (n, n)  # nothing lost, nothing doubled
    assert rejects == dead, dead_letters(db_url)
    return count, count - distinct, rejects


Proxied = tuple[Proxy, DaemonProcess, float]


@pytest.fixture
def proxied(bmsd_daemon: DaemonFactory, db_url: str, tcp_proxy: ProxyFactory) -> Proxied:
    """Return a proxy in front of the database, a bmsd behind it with short database
    timeouts, and bmsd's RSS once ready (MiB)."""
    database = tcp_proxy(db_url)
    daemon = bmsd_daemon(QUICK_DB, database_url=database.url(db_url))
    return database, daemon, daemon.rss_mb()


def test_a_commit_whose_outcome_is_unknown_is_retried_without_doubles(
    proxied: Proxied, db_url: str, publisher: Publisher, reliability: Record,
) -> None:
    database, daemon, rss = proxied
    publisher.publish_many(load(200))
    wait_until(lambda: stored(db_url)[0] == 200, what="a first part")
    database.cut_after_commit()
    publisher.publish_many(load(N)[200:])
    wait_until(lambda: database.commits_cut == 1, what="a COMMIT whose answer was lost")
    cut = time.monotonic()
    wait_until(lambda: daemon.metric("bmsd_db_errors_total") >= 1, what="bmsd to notice")
    noticed = time.monotonic() - cut
    counts = exactly(db_url)
    # The retry found its rows already committed, and stored none twice.
    assert daemon.metric("bmsd_duplicates_ignored_total") >= 1
    reliability(Scenario("commit outcome unknown (COMMIT sent, its answer lost)", N, *counts,
                         noticed_s=noticed, rss_before_mb=rss, rss_after_mb=daemon.rss_mb(),
                         note="the retry found its rows committed"))


BAD = [(f"factory/faults/m{i}/energy", b"{not json %d" % i) for i in range(3)]
BATCH = [("factory/faults/gw/energy",
          [{"timestamp": datetime.now(UTC).isoformat(), "power_kw": 100_000},
           {"timestamp": datetime.now(UTC).isoformat(), "voltage": -5}])]


def test_dead_letters_of_a_commit_whose_outcome_is_unknown_are_stored_once(
    proxied: Proxied, db_url: str, publisher: Publisher,
) -> None:
    database = proxied[0]
    database.cut_after_commit()
    publisher.publish_many(BAD)  # dead letters only: the lost COMMIT is one of theirs
    wait_until(lambda: database.commits_cut == 1, what="a COMMIT whose answer was lost")
    wait_until(lambda: sum(n for _, n in dead_letters(db_url)) >= len(BAD),
               what="the dead letters")
    exactly(db_url, 0, dead=len(BAD))


def test_dead_letters_the_broker_sends_again_are_stored_once(
    bmsd_daemon: DaemonFactory, db_url: str, mqtt_broker: Broker, publisher: Publisher,
    tcp_proxy: ProxyFactory,
) -> None:
    # The commit is slowed, so the broker link can be blackholed between the
    # message's arrival and its acknowledgement: the PUBACK is lost, the broker
    # sends the message again (DUP) on the next connection.
    broker, database = tcp_proxy(mqtt_broker.url), tcp_proxy(db_url)
    daemon = bmsd_daemon(broker_url=broker.url(mqtt_broker.url),
                         database_url=database.url(db_url))
    database.slow(0.3)
    publisher.publish_many([*BAD, *BATCH])
    wait_until(lambda: daemon.metric("bmsd_messages_received_total") == len(BAD) + 1,
               what="the messages received")
    broker.blackhole()
    wait_until(lambda: sum(n for _, n in dead_letters(db_url)) == len(BAD) + 1,
               what="their dead letters")
    database.heal()
    # Cut while still blackholed: the PUBACKs held in the link are dropped with it.
    # Healed first, the proxy could forward them before the cut (it did once, on a
    # loaded machine), and the broker would have nothing to send again.
    broker.cut()
    broker.heal()
    wait_until(lambda: daemon.metric("bmsd_messages_received_total") == 2 * (len(BAD) + 1),
               what="the broker to send them again")
    exactly(db_url, 1, dead=len(BAD) + 1)


def outage_under_load(daemon: DaemonProcess, publisher: Publisher, db_url: str,
                      fault: Callable[[], None], heal: Callable[[], None],
                      ) -> tuple[tuple[int, int, int], float, float]:
    """Publish N readings around a database outage of OUTAGE_S; return the accounting
    and the seconds until bmsd noticed and until it was ready after the heal."""
    messages = load()
    publisher.publish_many(messages[:500])
    fault()
    cut = time.monotonic()
    publisher.publish_many(messages[500:1500])
    wait_until(lambda: daemon.metric("bmsd_db_up") == 0, what="bmsd to notice")
    noticed = time.monotonic() - cut
    assert daemon.http("/readyz")[0] == 503
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - cut)))
    heal()
    healed = time.monotonic()
    wait_until(lambda: daemon.http("/readyz")[0] == 200, what="ready again")
    recovered = time.monotonic() - healed
    publisher.publish_many(messages[1500:])
    return exactly(db_url), noticed, recovered


def test_a_database_cut_for_a_while_under_load(
    proxied: Proxied, db_url: str, publisher: Publisher, reliability: Record,
) -> None:
    database, daemon, rss = proxied

    def cut() -> None:
        database.refuse()  # every connection reset, new ones refused: a server gone
        database.cut()

    counts, noticed, recovered = outage_under_load(daemon, publisher, db_url, cut,
                                                   database.heal)
    reliability(Scenario(f"database cut for {OUTAGE_S:.0f} s", N, *counts, noticed_s=noticed,
                         recovered_s=recovered, rss_before_mb=rss,
                         rss_after_mb=daemon.rss_mb()))


def test_a_blackholed_database_under_load(
    proxied: Proxied, db_url: str, publisher: Publisher, reliability: Record,
) -> None:
    database, daemon, rss = proxied
    counts, noticed, recovered = outage_under_load(daemon, publisher, db_url,
                                                   database.blackhole, database.heal)
    assert noticed < 10  # operation_timeout_s 3 s, plus the connect timeout
    reliability(Scenario(f"database blackholed for {OUTAGE_S:.0f} s (operation_timeout_s 3)",
                         N, *counts, noticed_s=noticed, recovered_s=recovered,
                         rss_before_mb=rss, rss_after_mb=daemon.rss_mb()))


def test_a_slow_database_under_load(
    bmsd_daemon: DaemonFactory, db_url: str, tcp_proxy: ProxyFactory, publisher: Publisher,
    reliability: Record,
) -> None:
    database = tcp_proxy(db_url)
    daemon = bmsd_daemon(database_url=database.url(db_url))
    rss = daemon.rss_mb()
    database.slow(0.2)  # 200 ms each way, per chunk
    started = time.monotonic()
    publisher.publish_many(load())
    counts = exactly(db_url)
    reliability(Scenario("database 200 ms slower per chunk each way", N, *counts,
                         rss_before_mb=rss, rss_after_mb=daemon.rss_mb(),
                         note=f"all stored {time.monotonic() - started:.1f} s after the first"
                              " publish"))


def test_the_broker_connection_cut_under_load(
    bmsd_daemon: DaemonFactory, db_url: str, tcp_proxy: ProxyFactory, mqtt_broker: Broker,
    publisher: Publisher, reliability: Record,
) -> None:
    broker = tcp_proxy(mqtt_broker.url)
    daemon = bmsd_daemon(broker_url=broker.url(mqtt_broker.url))
    rss = daemon.rss_mb()
    messages = load()
    publisher.publish_many(messages[:700])
    broker.cut()
    cut = time.monotonic()
    publisher.publish_many(messages[700:])
    wait_until(lambda: daemon.http("/readyz")[0] == 200 and broker.connections > 0,
               what="reconnected")
    recovered = time.monotonic() - cut
    counts = exactly(db_url)
    assert daemon.metric("bmsd_mqtt_sessions_lost_total") == 0  # the session was kept
    reliability(Scenario("broker connection cut", N, *counts, recovered_s=recovered,
                         rss_before_mb=rss, rss_after_mb=daemon.rss_mb(),
                         note="session kept"))


def test_postgresql_crashing_and_restarting_under_load(
    bmsd_daemon: DaemonFactory, publisher: Publisher, reliability: Record,
) -> None:
    # A server of the test's own, durable as in production, so the shared one
    # goes on for other tests.
    state = Path(tempfile.mkdtemp(prefix="bmsd-test-crash-pg-"))
    pg = LocalPostgres(state).start()
    try:
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE bmsd")
        url = pg.url("bmsd")
        migrate(url, skip_community=True)
        daemon = bmsd_daemon(QUICK_DB, database_url=url)
        rss = daemon.rss_mb()
        messages = load()
        sender = threading.Thread(target=publisher.publish_many, args=(messages,), daemon=True)
        sender.start()
        wait_until(lambda: stored(url)[0] > N // 10, what="a part stored")
        pg.crash()  # pg_ctl stop -m immediate
        crashed = time.monotonic()
        wait_until(lambda: daemon.metric("bmsd_db_up") == 0, what="bmsd to notice")
        noticed = time.monotonic() - crashed
        time.sleep(2)
        pg.start()
        restarted = time.monotonic()
        wait_until(lambda: daemon.http("/readyz")[0] == 200, what="ready again")
        recovered = time.monotonic() - restarted
        sender.join(60)
        counts = exactly(url)
        reliability(Scenario("PostgreSQL immediate stop, restarted 2 s later", N, *counts,
                             noticed_s=noticed, recovered_s=recovered, rss_before_mb=rss,
                             rss_after_mb=daemon.rss_mb()))
    finally:
        pg.stop()
        shutil.rmtree(state, ignore_errors=True)


def test_a_blackholed_broker_is_noticed_by_keepalive(
    bmsd_daemon: DaemonFactory, db_url: str, tcp_proxy: ProxyFactory, mqtt_broker: Broker,
    publisher: Publisher, reliability: Record,
) -> None:
    broker = tcp_proxy(mqtt_broker.url)
    daemon = bmsd_daemon("[mqtt]\nkeepalive_s = 2\n", broker_url=broker.url(mqtt_broker.url))
    rss = daemon.rss_mb()
    messages = load()
    publisher.publish_many(messages[:500])
    broker.blackhole()
    cut = time.monotonic()
    publisher.publish_many(messages[500:])  # the broker queues them for bmsd's session
    wait_until(lambda: daemon.metric("bmsd_mqtt_connected") == 0, what="bmsd to notice")
    noticed = time.monotonic() - cut
    time.sleep(max(0.0, OUTAGE_S - noticed))
    broker.cut()
    broker.heal()
    healed = time.monotonic()
    wait_until(lambda: daemon.http("/readyz")[0] == 200, what="subscribed again")
    recovered = time.monotonic() - healed
    counts = exactly(db_url)
    assert noticed < 2 * 2 + 2  # paho gives up after 1.5 keepalives without an answer
    reliability(Scenario(f"broker blackholed for {OUTAGE_S:.0f} s (keepalive_s 2)", N, *counts,
                         noticed_s=noticed, recovered_s=recovered, rss_before_mb=rss,
                         rss_after_mb=daemon.rss_mb()))


def test_bmsd_killed_at_five_random_points_loses_and_doubles_nothing(
    bmsd_daemon: DaemonFactory, db_url: str, publisher: Publisher, reliability: Record,
) -> None:
    rng = random.Random(15)  # the same five points every run
    messages = load(3000)
    sender = threading.Thread(target=publisher.publish_many, args=(messages,), daemon=True)
    daemon = bmsd_daemon()
    rss = daemon.rss_mb()
    sender.start()
    ready = []
    for _ in range(5):
        time.sleep(rng.uniform(0.1, 1.5))
        daemon.kill()  # SIGKILL: no drain, nothing flushed
        killed = time.monotonic()
        daemon = bmsd_daemon(client_id=daemon.client_id)
        ready.append(time.monotonic() - killed)
    sender.join(120)
    counts = exactly(db_url, 3000)
    reliability(Scenario("bmsd SIGKILLed at 5 seeded random points, restarted at once", 3000,
                         *counts, recovered_s=max(ready), rss_before_mb=rss,
                         rss_after_mb=daemon.rss_mb(),
                         note="recovered: the slowest restart until ready"))


def test_the_broker_killed_and_restarted_from_its_persistence_file(
    bmsd_daemon: DaemonFactory, broker_factory: Callable[[], LocalMosquitto], db_url: str,
    reliability: Record,
) -> None:
    broker = broker_factory()
    first = bmsd_daemon(broker_url=broker.url)
    assert first.stop() == 0  # the session exists; the broker queues for it now
    sender = Publisher(broker.url_as("tester"))
    sender.publish_many(load())
    sender.close()
    saved = broker.state_dir / "mosquitto.db"
    published = time.time()
    # Mosquitto writes its queues every autosave_interval (10 s), not per message.
    wait_until(lambda: saved.exists() and saved.stat().st_mtime > published + 0.1,
               timeout_s=15, what="the broker's next autosave")
    daemon = bmsd_daemon(broker_url=broker.url, client_id=first.client_id)
    rss = daemon.rss_mb()
    wait_until(lambda: stored(db_url)[0] > N // 4, what="a part stored")
    assert broker.proc is not None
    broker.proc.kill()  # SIGKILL: nothing saved after the last autosave
    killed = time.monotonic()
    broker.proc.wait()
    wait_until(lambda: daemon.metric("bmsd_mqtt_connected") == 0, what="bmsd to notice")
    noticed = time.monotonic() - killed
    broker.start()
    restarted = time.monotonic()
    wait_until(lambda: daemon.metric("bmsd_mqtt_connected") == 1, what="connected again")
    recovered = time.monotonic() - restarted
    # The restored queue holds every message again, those bmsd stored since included.
    counts = exactly(db_url)
    assert daemon.metric("bmsd_duplicates_ignored_total") >= 1
    assert daemon.metric("bmsd_mqtt_sessions_lost_total") == 0
    reliability(Scenario("broker SIGKILLed, restarted from its last autosave", N, *counts,
                         noticed_s=noticed, recovered_s=recovered, rss_before_mb=rss,
                         rss_after_mb=daemon.rss_mb(),
                         note="redelivered what bmsd had stored since the save; stored once"))


def test_hostile_messages_mixed_into_the_load_are_exactly_the_dead_letters(
    bmsd_daemon: DaemonFactory, db_url: str, publisher: Publisher, reliability: Record,
) -> None:
    rng = random.Random(4)
    hostile: list[bytes | dict[str, Any]] = [
        b"not json", b"\xff\xfe", b"", b"[]", b"{", {"readings": "x"}, {"readings": [1]},
        {"readings": [{"timestamp": "2026-12-01T00:00:00Z"}]},  # no measurement
        {"timestamp": "1970-01-01T00:00:00Z", "power_kw": 1.0},  # a gateway with no clock
        {"power_kw": "\u0000"}, {"power_kw": 1e400}, {"power_kw": [[[[[]]]]]},
    ]
    daemon = bmsd_daemon()
    rss = daemon.rss_mb()
    messages: list[tuple[str, Any]] = list(load())
    bad = 120
    for k in range(bad):
        messages.insert(rng.randrange(len(messages)),
                        (f"factory/faults/m{k % 4}/energy", hostile[k % len(hostile)]))
    publisher.publish_many(messages)
    wait_until(lambda: stored(db_url)[0] >= N, timeout_s=60, what=f"{N} readings")

    def dead_letters() -> int:
        with psycopg.connect(db_url) as conn:
            row = conn.execute("SELECT count(*) FROM ingest_rejects"
                               " WHERE reason <> '' AND payload IS NOT NULL").fetchone()
            return int(row[0]) if row else 0

    wait_until(lambda: dead_letters() >= bad, what="the dead letters")
    time.sleep(0.5)
    count, distinct = stored(db_url)
    assert (count, distinct, dead_letters()) == (N, N, bad)
    reliability(Scenario(f"{bad} hostile messages of {len(hostile)} kinds among {N} readings",
                         N + bad, count, count - distinct, dead_letters(), rss_before_mb=rss,
                         rss_after_mb=daemon.rss_mb(),
                         note="dead letters: exactly the hostile messages, each with a reason"))
