"""A publisher five times faster than bmsd can store: memory stays flat, nothing is lost.

The report names the multiple the publisher reached (it aims at 5x); the
test asserts on what that shows at any multiple past 2x.

bmsd's rate is held down by a database slowed through a proxy, so the ratio is
the same on any machine. Back-pressure must reach the broker: bmsd holds at most
its in-flight window of messages waiting for a commit plus an inbox of
``[ingest] max_waiting_messages`` (two windows) and at most 16 MiB of payloads
(a full inbox stops the MQTT thread reading, so TCP pushes back), and the broker
queues the rest in bmsd's session until it catches up. 60 s of overload when the
reliability report runs it, 12 s in CI.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from bmsd.ingest.inbox import MAX_WAITING_BYTES
from tests.fix_daemon import DaemonFactory, Publisher, wait_until
from tests.fix_mqtt import Broker
from tests.fix_proxy import ProxyFactory
from tests.fix_report import Record, Scenario, full_or_short
from tests.test_faults import exactly, load, stored

OVERLOAD_S = full_or_short(60, 12)
WINDOW = 1000  # [mqtt] receive_maximum, the broker's max_inflight_messages
# Each way through the proxy; long enough that five times bmsd's rate is well
# within what one test publisher sends (bmsd's early COPY overlaps a round trip).
DELAY_S = 0.05


class Paced(threading.Thread):
    """Publish messages at a rate from a thread of its own; count what the broker took."""

    def __init__(self, publisher: Publisher, messages: list[tuple[str, Any]],
                 rate: float) -> None:
        super().__init__(daemon=True)
        self.publisher, self.messages, self.rate = publisher, messages, rate
        self.published = 0
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        started = time.monotonic()
        step = max(1, int(self.rate / 20))
        try:
            for first in range(0, len(self.messages), step):
                due = started + first / self.rate
                time.sleep(max(0.0, due - time.monotonic()))
                chunk = self.messages[first:first + step]
                self.publisher.publish_many(chunk)
                self.published += len(chunk)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error


def test_five_times_faster_than_bmsd_for_a_minute(
    bmsd_daemon: DaemonFactory, db_url: str, tcp_proxy: ProxyFactory, mqtt_broker: Broker,
    reliability: Record,
) -> None:
    database = tcp_proxy(db_url)
    daemon = bmsd_daemon(database_url=database.url(db_url))
    database.slow(DELAY_S)  # every round trip 2 x DELAY_S longer: the database is the ceiling
    publisher = Publisher(mqtt_broker.publisher_url)
    try:
        # bmsd's own rate, draining a backlog at this database's speed
        warm = 4000
        publisher.publish_many(load(warm, step_ms=1))
        wait_until(lambda: stored(db_url)[0] >= warm // 4, timeout_s=60, what="a first part")
        started, first = time.monotonic(), stored(db_url)[0]
        wait_until(lambda: stored(db_url)[0] >= warm, timeout_s=60, what="the backlog drained")
        rate = (warm - first) / (time.monotonic() - started)
        baseline = daemon.rss_mb()

        total = warm + int(5 * rate * OVERLOAD_S)
        begun = time.monotonic()
        sender = Paced(publisher, load(total, step_ms=1)[warm:], 5 * rate)
        peak_rss, peak_inflight = baseline, 0.0
        while sender.is_alive():
            peak_rss = max(peak_rss, daemon.rss_mb())
            peak_inflight = max(peak_inflight, daemon.metric("bmsd_inflight_messages"))
            time.sleep(0.25)
        sent_rate = (total - warm) / (time.monotonic() - begun)
        assert sender.error is None, f"the publisher failed: {sender.error!r}"
        assert sender.published == total - warm
        behind = total - stored(db_url)[0]
        database.heal()
        healed = time.monotonic()
        try:
            counts = exactly(db_url, total)
        except AssertionError as stuck:
            events = [e for e in daemon.events() if e.get("level") != "info"][-15:]
            raise AssertionError(
                f"{stuck}; bmsd holds {daemon.metric('bmsd_inflight_messages'):.0f}, mqtt"
                f" connected {daemon.metric('bmsd_mqtt_connected'):.0f}, broker dropped"
                f" {daemon.metric('bmsd_broker_dropped_messages'):.0f} (its log:"
                f" {mqtt_broker.local.dropped_messages() if mqtt_broker.local else '?'});"
                " last warnings:"
                f" {events}") from None
        drained = time.monotonic() - healed
    finally:
        publisher.close()
    reliability(Scenario(
        f"overload: {sent_rate / rate:.1f}x bmsd's rate for {OVERLOAD_S:.0f} s", total, *counts,
        recovered_s=drained, rss_before_mb=baseline, rss_after_mb=peak_rss,
        note=(f"bmsd {rate:.0f} msg/s against a database {2 * DELAY_S * 1000:.0f} ms away,"
              f" published"
              f" {sent_rate:.0f} msg/s; {behind} queued in the broker at the end, at most"
              f" {peak_inflight:.0f} held by bmsd; recovered: drained after the database"
              " was fast again; RSS after: the peak")))
    # The publisher aims at 5x; on a slow machine it may reach less (it shares the
    # cores with bmsd and the broker), and the report says what it reached. What
    # the test is about holds at any multiple past 2x: the backlog, many times
    # what bmsd may hold, waits in the broker.
    assert sent_rate >= 2 * rate, f"the publisher reached {sent_rate / rate:.1f}x bmsd's rate"
    assert behind > 10 * 3 * WINDOW, "the broker, not bmsd, holds the backlog"
    assert peak_inflight <= 3 * WINDOW  # the batch and the inbox
    assert peak_rss <= 1.2 * baseline, f"RSS grew from {baseline:.1f} to {peak_rss:.1f} MiB"


def test_large_gateway_batches_wait_in_the_broker_not_in_bmsd(
    bmsd_daemon: DaemonFactory, db_url: str, tcp_proxy: ProxyFactory, mqtt_broker: Broker,
) -> None:
    # 250 batches of 1,100 readings (about 100 kB each): the in-flight window
    # (1000 messages) alone would let bmsd hold all 25 MB while the database lags.
    database = tcp_proxy(db_url)
    daemon = bmsd_daemon(database_url=database.url(db_url))
    database.slow(0.02)
    readings = load(250 * 1100, step_ms=10)
    # Each batch goes to its first reading's machine (m0: 1100 is a multiple of 4);
    # the readings' times are distinct across the whole load.
    batches = [(readings[i][0], {"readings": [r for _, r in readings[i:i + 1100]]})
               for i in range(0, len(readings), 1100)]
    publisher = Publisher(mqtt_broker.publisher_url)
    try:
        baseline = daemon.rss_mb()
        publisher.publish_many(batches)
        peak_bytes, peak_rss = 0.0, baseline
        while stored(db_url)[0] < len(readings) // 2:
            peak_bytes = max(peak_bytes, daemon.metric("bmsd_inbox_bytes"))
            peak_rss = max(peak_rss, daemon.rss_mb())
            time.sleep(0.1)
        database.heal()
        exactly(db_url, len(readings))
    finally:
        publisher.close()
    assert peak_bytes > 8 * 2**20, "the inbox filled up (else this test shows nothing)"
    assert peak_bytes <= MAX_WAITING_BYTES + 200_000
    assert peak_rss - baseline < 100, f"RSS grew from {baseline:.0f} to {peak_rss:.0f} MiB"
