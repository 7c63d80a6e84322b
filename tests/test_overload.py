"""A publisher five times faster than bmsd can store: memory stays flat, nothing is lost.

bmsd's rate is held down by a database slowed through a proxy, so the ratio is
the same on any machine. Back-pressure must reach the broker: bmsd holds at most
its in-flight window of messages waiting for a commit plus an inbox of two
windows (a full inbox stops the MQTT thread reading, so TCP pushes back), and
the broker queues the rest in bmsd's session until it catches up. 60 s of overload when the
reliability report runs it, 12 s in CI.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from tests.fix_daemon import DaemonFactory, Publisher, wait_until
from tests.fix_mqtt import Broker
from tests.fix_proxy import ProxyFactory
from tests.fix_report import Record, Scenario, full_or_short
from tests.test_faults import exactly, load, stored

OVERLOAD_S = full_or_short(60, 12)
WINDOW = 1000  # [mqtt] receive_maximum, the broker's max_inflight_messages


def paced(publisher: Publisher, messages: list[tuple[str, Any]], rate: float) -> threading.Thread:
    """Publish *messages* at *rate* per second from a thread of its own."""

    def run() -> None:
        started = time.monotonic()
        step = max(1, int(rate / 20))
        for first in range(0, len(messages), step):
            due = started + first / rate
            time.sleep(max(0.0, due - time.monotonic()))
            publisher.publish_many(messages[first:first + step])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_five_times_faster_than_bmsd_for_a_minute(
    bmsd_daemon: DaemonFactory, db_url: str, tcp_proxy: ProxyFactory, mqtt_broker: Broker,
    reliability: Record,
) -> None:
    database = tcp_proxy(db_url)
    daemon = bmsd_daemon(database_url=database.url(db_url))
    database.slow(0.02)  # every answer 40 ms later: the database is the ceiling
    publisher = Publisher(mqtt_broker.publisher_url)
    try:
        # bmsd's own rate, draining a backlog at this database's speed
        warm = 4000
        publisher.publish_many(load(warm))
        wait_until(lambda: stored(db_url)[0] >= warm // 4, timeout_s=60, what="a first part")
        started, first = time.monotonic(), stored(db_url)[0]
        wait_until(lambda: stored(db_url)[0] >= warm, timeout_s=60, what="the backlog drained")
        rate = (warm - first) / (time.monotonic() - started)
        baseline = daemon.rss_mb()

        total = warm + int(5 * rate * OVERLOAD_S)
        begun = time.monotonic()
        sender = paced(publisher, load(total)[warm:], 5 * rate)
        peak_rss, peak_inflight = baseline, 0.0
        while sender.is_alive():
            peak_rss = max(peak_rss, daemon.rss_mb())
            peak_inflight = max(peak_inflight, daemon.metric("bmsd_inflight_messages"))
            time.sleep(0.25)
        sent_rate = (total - warm) / (time.monotonic() - begun)
        behind = total - stored(db_url)[0]
        database.heal()
        healed = time.monotonic()
        counts = exactly(db_url, total)
        drained = time.monotonic() - healed
    finally:
        publisher.close()
    reliability(Scenario(
        f"overload: {sent_rate / rate:.1f}x bmsd's rate for {OVERLOAD_S:.0f} s", total, *counts,
        recovered_s=drained, rss_before_mb=baseline, rss_after_mb=peak_rss,
        note=(f"bmsd {rate:.0f} msg/s against a database 40 ms away, published"
              f" {sent_rate:.0f} msg/s; {behind} queued in the broker at the end, at most"
              f" {peak_inflight:.0f} held by bmsd; recovered: drained after the database"
              " was fast again; RSS after: the peak")))
    assert sent_rate >= 4 * rate, "the publisher did not outrun bmsd"
    assert behind > 2 * rate * OVERLOAD_S, "the broker, not bmsd, holds the backlog"
    assert peak_inflight <= 3 * WINDOW  # the batch and the inbox
    assert peak_rss <= 1.2 * baseline, f"RSS grew from {baseline:.1f} to {peak_rss:.1f} MiB"
