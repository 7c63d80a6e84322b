"""A restart into a backlog, under any broker window: bmsd becomes ready, stores every
message once, and stops on SIGTERM in time, whatever the broker sends before it
acknowledges the subscription.

What bmsd does not control is varied: Mosquitto's ``max_inflight_messages`` (0, no
limit; 20; 1000) with MQTT 3.1.1; MQTT 5 with a ``receive_maximum`` below and above the
inbox's count bound; backlogs of 0.5x, 1x and 10x that bound, and of 90 kB gateway
batches past its byte bound; a restart after kill -9 mid-stream and after a clean
stop; a shared-group member restarted into its own backlog while the other member keeps
going; SIGTERM while the backlog arrives, and with a full inbox and a database that
does not answer. Every case accounts exactly: each reading published is stored once,
and the dead letters are the bad payloads injected, no more.

These are the short forms, for CI: an inbox of 100 messages. bench/reliability.py
runs the long forms at the shipped default (an inbox of 2,000: backlogs up to 20,000
messages) and reports the matrix's times to ready, to drain and to stop.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from bmsd.ingest.inbox import MAX_WAITING_BYTES
from tests.fix_daemon import DaemonFactory, DaemonProcess, Publisher, wait_until
from tests.fix_notify import NotifySocket
from tests.fix_proxy import Proxy, ProxyFactory
from tests.fix_report import Record, Scenario, full_or_short
from tools.localstack import LocalMosquitto

# [ingest] max_waiting_messages here, the inbox's count bound: the shipped default
# in the report's long forms, a twentieth of it in CI's short ones.
INBOX = int(full_or_short(2000, 100))
SHUTDOWN_S = 3.0  # [ingest] shutdown_timeout_s here
# Ready within: a Python process's start, the schema check and the lock (1-2 s),
# plus draining what the broker sends before its SUBACK (up to 1,000 small
# messages here: well under a second), on a slow CI machine.
READY_WITHIN_S = 20.0
BAD_EVERY = 40  # one payload in 40 is not JSON: the dead letters to account for
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)

BrokerFactory = Callable[..., LocalMosquitto]


@dataclass(frozen=True)
class Window:
    """What decides how many unacknowledged messages the broker sends at once."""

    protocol: str
    max_inflight_messages: int  # the broker's (0: no limit); MQTT 5 uses receive_maximum
    receive_maximum: int  # bmsd's [mqtt] receive_maximum

    def config(self, mqtt: str = "", inbox: int = INBOX) -> str:
        """Return bmsd's configuration for this window; *mqtt*: more [mqtt] lines."""
        return (f'[mqtt]\nprotocol = "{self.protocol}"\n'
                f"receive_maximum = {self.receive_maximum}\n{mqtt}"
                f"[ingest]\nmax_waiting_messages = {inbox}\n"
                f"shutdown_timeout_s = {SHUTDOWN_S}\n")


WINDOWS = {
    "3.1.1-no-limit": Window("3.1.1", 0, 1000),
    "3.1.1-20": Window("3.1.1", 20, 1000),
    "3.1.1-1000": Window("3.1.1", 1000, 1000),
    "5-below-inbox": Window("5", 0, INBOX // 5),
    "5-above-inbox": Window("5", 0, 10 * INBOX),
}


def messages(first: int, n: int, device: str = "m1") -> list[tuple[str, bytes]]:
    """Return *n* readings of one device, 10 ms apart, numbered from *first*; one in
    BAD_EVERY is not JSON."""
    out = []
    for i in range(first, first + n):
        topic = f"factory/backlog/{device}/energy"
        if i % BAD_EVERY == BAD_EVERY - 1:
            out.append((topic, b"{not json %d" % i))
        else:
            stamp = (T0 + timedelta(milliseconds=10 * i)).isoformat()
            out.append((topic, json.dumps({"timestamp": stamp, "power_kw": i}).encode()))
    return out


def expected(n: int) -> tuple[int, int]:
    """Return the (readings, dead letters) of messages 0 .. n-1."""
    bad = sum(1 for i in range(n) if i % BAD_EVERY == BAD_EVERY - 1)
    return n - bad, bad


def stored(db_url: str) -> tuple[int, int, float, int]:
    """Return the readings (rows, distinct values, sum of values) and the dead letters."""
    with psycopg.connect(db_url) as conn:
        rows, distinct, total = conn.execute(
            "SELECT count(*), count(DISTINCT power_kw), coalesce(sum(power_kw), 0)"
            " FROM energy_readings").fetchone() or (0, 0, 0)
        rejects = conn.execute("SELECT count(*) FROM ingest_rejects").fetchone()
        return int(rows), int(distinct), float(total), int(rejects[0] if rejects else 0)


def assert_exactly(db_url: str, n: int, timeout_s: float = 120) -> float:
    """Assert every reading of messages 0 .. n-1 stored once and every bad one
    dead-lettered once; return when the last one was seen (time.monotonic())."""
    readings, bad = expected(n)
    total = float(sum(i for i in range(n) if i % BAD_EVERY != BAD_EVERY - 1))
    wait_until(lambda: stored(db_url)[0] >= readings and stored(db_url)[3] >= bad,
               timeout_s=timeout_s, what=f"{readings} readings and {bad} dead letters")
    done = time.monotonic()
    time.sleep(0.3)  # anything doubled would land now
    assert stored(db_url) == (readings, readings, total, bad)
    return done


def publish(broker: LocalMosquitto, batch: list[tuple[str, bytes]]) -> None:
    publisher = Publisher(broker.url_as("tester"))
    try:
        publisher.publish_many(batch)
    finally:
        publisher.close()


def restart_and_time(daemon: DaemonProcess) -> float:
    """Start *daemon* again (same client id and config); return the seconds to ready."""
    started = time.monotonic()
    daemon.start(wait_ready=False)
    daemon.wait_ready(READY_WITHIN_S)
    return time.monotonic() - started


def assert_stops_in_time(daemon: DaemonProcess) -> float:
    """Assert that SIGTERM ends *daemon* with 0 within shutdown_timeout_s + 2 s; return
    the seconds it took."""
    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM, timeout_s=SHUTDOWN_S + 10) == 0, daemon.output()
    took = time.monotonic() - started
    assert took <= SHUTDOWN_S + 2
    return took


# --- the matrix: broker windows x backlog sizes x how bmsd stopped ----------------

CASES = [(window, size, how) for window in WINDOWS
         for size, how in ((0.5, "clean"), (1, "kill-9"), (10, "clean"), (10, "kill-9"))]


@pytest.mark.parametrize(("window", "size", "how"), CASES,
                         ids=[f"{w}-{s}x-{h}" for w, s, h in CASES])
def test_a_restart_into_a_backlog_is_ready_in_time_and_stores_everything_once(
    bmsd_daemon: DaemonFactory, broker_factory: BrokerFactory, db_url: str,
    reliability: Record, window: str, size: float, how: str,
) -> None:
    w = WINDOWS[window]
    broker = broker_factory(f"max_inflight_messages {w.max_inflight_messages}\n")
    daemon = bmsd_daemon(w.config(), broker_url=broker.url)
    live = 0
    if how == "kill-9":
        # Killed mid-stream: some messages committed and not yet acknowledged.
        live = 300
        sender = threading.Thread(target=publish, args=(broker, messages(0, live)))
        sender.start()
        wait_until(lambda: stored(db_url)[0] > 20, what="a part stored")
        daemon.kill()
        sender.join(60)
    else:
        assert daemon.stop() == 0
    backlog = int(size * INBOX)
    publish(broker, messages(live, backlog))  # queued by the broker for bmsd's session

    restarted = time.monotonic()
    ready_s = restart_and_time(daemon)
    assert ready_s <= READY_WITHIN_S
    drained_s = assert_exactly(db_url, live + backlog) - restarted
    stop_s = assert_stops_in_time(daemon)
    readings, bad = expected(live + backlog)
    reliability(Scenario(
        f"restart into a backlog of {backlog:,} ({size}x the inbox), {window}"
        f" (broker max_inflight_messages {w.max_inflight_messages}, bmsd receive_maximum"
        f" {w.receive_maximum}), after {'kill -9 mid-stream' if live else 'a clean stop'}",
        live + backlog, readings, 0, bad, recovered_s=ready_s,
        note=f"ready {ready_s:.1f} s, all stored {drained_s:.1f} s after the restart;"
             f" SIGTERM exit 0 in {stop_s:.1f} s"))


# --- past the byte bound: gateway batches ------------------------------------------

READINGS_PER_BATCH = 730  # about 90 kB of JSON: a gateway's buffer, flushed


def gateway_batches(n: int) -> list[tuple[str, bytes]]:
    """Return *n* gateway batches of one meter, READINGS_PER_BATCH readings each,
    numbered on from 0; one batch in BAD_EVERY is not JSON."""
    out = []
    for b in range(n):
        topic = "factory/backlog/gw/energy"
        if b % BAD_EVERY == BAD_EVERY - 1:
            out.append((topic, b"{not json %d" % b))
            continue
        first = b * READINGS_PER_BATCH
        out.append((topic, json.dumps({"readings": [
            {"timestamp": (T0 + timedelta(milliseconds=i)).isoformat(), "power_kw": i,
             "energy_kwh": 0.25, "voltage": 400.5, "current": 31.2}
            for i in range(first, first + READINGS_PER_BATCH)]}).encode()))
    return out


def test_a_backlog_of_gateway_batches_past_the_byte_bound_is_stored_once_in_bounded_memory(
    bmsd_daemon: DaemonFactory, broker_factory: BrokerFactory, db_url: str,
) -> None:
    broker = broker_factory("max_inflight_messages 0\n")
    batches = gateway_batches(int(2 * MAX_WAITING_BYTES / 90_000))
    size = len(batches[0][1])
    assert 85_000 < size < 95_000
    # The count bound well above the backlog: the byte bound is the one that holds.
    config = WINDOWS["3.1.1-no-limit"].config(inbox=5000)
    daemon = bmsd_daemon(config, broker_url=broker.url)
    assert daemon.stop() == 0
    publish(broker, batches)

    started = time.monotonic()
    daemon.start(wait_ready=False)
    peak = 0.0
    while daemon.http_or_none("/readyz") != 200:
        assert time.monotonic() - started < READY_WITHIN_S, daemon.output()
        peak = max(peak, daemon.metric_or_zero("bmsd_inbox_bytes"))
        time.sleep(0.02)
    good = [b for b in range(len(batches)) if b % BAD_EVERY != BAD_EVERY - 1]
    readings = len(good) * READINGS_PER_BATCH
    total = float(sum(sum(range(b * READINGS_PER_BATCH, (b + 1) * READINGS_PER_BATCH))
                      for b in good))
    wait_until(lambda: stored(db_url)[0] >= readings, timeout_s=120, what=f"{readings} readings")
    assert stored(db_url) == (readings, readings, total, len(batches) - len(good))
    # One message past the bound at most (taken after the inbox's max_wait_s).
    assert peak <= MAX_WAITING_BYTES + size
    assert_stops_in_time(daemon)


# --- a shared group: one member restarted into its own backlog -----------------------

def test_a_shared_member_restarted_into_its_backlog_drains_it_while_the_other_goes_on(
    bmsd_daemon: DaemonFactory, broker_factory: BrokerFactory, db_url: str,
) -> None:
    broker = broker_factory("max_inflight_messages 0\n")
    config = WINDOWS["3.1.1-no-limit"].config(mqtt=f'shared_group = "fleet-{os.getpid()}"\n')
    first = bmsd_daemon(config, broker_url=broker.url)
    second = bmsd_daemon(config, broker_url=broker.url)
    n = 3000
    sender = threading.Thread(target=publish, args=(broker, messages(0, n)))
    sender.start()
    wait_until(lambda: stored(db_url)[0] > n // 10, what="a part stored")
    first.kill()  # its share is queued for its session meanwhile
    time.sleep(1.0)
    ready_s = restart_and_time(first)
    assert ready_s <= READY_WITHIN_S
    sender.join(60)
    assert_exactly(db_url, n)
    assert first.metric("bmsd_messages_received_total") > 0, "the restarted member took nothing"
    assert_stops_in_time(first)
    assert_stops_in_time(second)


# --- SIGTERM in every state --------------------------------------------------------

@dataclass
class Unlimited:
    """A broker with no in-flight limit, a database behind a proxy, a ready bmsd on both."""

    broker: LocalMosquitto
    database: Proxy
    daemon: DaemonProcess


@pytest.fixture
def unlimited(bmsd_daemon: DaemonFactory, broker_factory: BrokerFactory, db_url: str,
              tcp_proxy: ProxyFactory) -> Unlimited:
    broker = broker_factory("max_inflight_messages 0\n")
    database = tcp_proxy(db_url)
    daemon = bmsd_daemon(WINDOWS["3.1.1-no-limit"].config(), broker_url=broker.url,
                         database_url=database.url(db_url))
    return Unlimited(broker, database, daemon)


def test_sigterm_while_the_backlog_arrives_exits_in_time_and_loses_nothing(
    unlimited: Unlimited, db_url: str,
) -> None:
    broker, database, daemon = unlimited.broker, unlimited.database, unlimited.daemon
    assert daemon.stop() == 0
    backlog = 10 * INBOX
    publish(broker, messages(0, backlog))
    database.slow(0.02)  # a drain of a few seconds, so the signal lands in it
    daemon.start(wait_ready=False)
    wait_until(lambda: stored(db_url)[0] > 0, what="the drain to begin")
    assert stored(db_url)[0] < expected(backlog)[0]
    assert_stops_in_time(daemon)
    database.heal()
    restart_and_time(daemon)
    assert_exactly(db_url, backlog)


def test_sigterm_with_a_full_inbox_and_a_database_that_does_not_answer_exits_in_time(
    unlimited: Unlimited, db_url: str,
) -> None:
    broker, database, daemon = unlimited.broker, unlimited.database, unlimited.daemon
    database.blackhole()  # after start-up: the first batch's commit never returns
    backlog = 10 * INBOX
    publish(broker, messages(0, backlog))
    # The batch and the inbox fill; paho's thread then waits for room in the inbox.
    wait_until(lambda: daemon.metric("bmsd_inflight_messages") >= INBOX,
               what="a full inbox")
    assert_stops_in_time(daemon)
    database.heal()
    restart_and_time(daemon)
    assert_exactly(db_url, backlog)


STARTUP_STATES = ["the database", "the instance lock", "the MQTT subscription"]


@pytest.mark.parametrize("state", STARTUP_STATES)
def test_sigterm_during_start_up_exits_0_in_time(
    bmsd_daemon: DaemonFactory, broker_factory: BrokerFactory, db_url: str,
    tcp_proxy: ProxyFactory, state: str,
) -> None:
    broker = broker_factory()
    database = tcp_proxy(db_url)
    mqtt = tcp_proxy(broker.url)
    config = WINDOWS["3.1.1-1000"].config()
    client_id = None
    if state == "the database":
        database.refuse()
    elif state == "the instance lock":
        client_id = bmsd_daemon(config, broker_url=broker.url).client_id
    else:
        mqtt.refuse()
    daemon = bmsd_daemon(config, broker_url=mqtt.url(broker.url),
                         database_url=database.url(db_url), client_id=client_id,
                         wait_ready=False)
    wait_until(lambda: state in (daemon.http_or_none("/readyz", body=True) or ""),
               what=f"waiting for {state}")
    assert_stops_in_time(daemon)


# --- what a drain before READY looks like to a service manager ------------------------

def test_a_drain_before_the_suback_extends_the_start_and_says_so(
    unlimited: Unlimited, db_url: str, notify_socket: NotifySocket,
) -> None:
    broker, database, daemon = unlimited.broker, unlimited.database, unlimited.daemon
    assert daemon.stop() == 0
    backlog = 10 * INBOX
    publish(broker, messages(0, backlog))
    notify_socket.messages.clear()
    database.slow(0.01)
    daemon.env.update(notify_socket.env())
    daemon.start(wait_ready=False)
    body = wait_until(lambda: (b := daemon.http_or_none("/readyz", body=True))
                      and "draining a backlog" in b and b, what="/readyz saying so")
    assert '"ok": false' in body
    database.heal()
    wait_until(lambda: "READY" in notify_socket.sent(), timeout_s=READY_WITHIN_S,
               what="READY=1")
    sent = notify_socket.sent()
    assert "EXTEND_TIMEOUT_USEC" in sent
    assert sent.index("EXTEND_TIMEOUT_USEC") < sent.index("READY")
    assert any(s.startswith("starting: draining a backlog of ") for s in notify_socket.statuses())
    assert_exactly(db_url, backlog)
    assert_stops_in_time(daemon)
