"""The Prometheus metrics bmsd exposes, registered on an injected registry."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 20000, 50000)


def observe_many(histogram: Histogram, amounts: Sequence[float]) -> None:
    """``histogram.observe`` each of *amounts*, taking its locks once per bucket, not
    twice per amount (a batch observes one latency per message).

    This reads the client's private layout (``_upper_bounds``, ``_buckets``,
    ``_sum``, kept per bucket, not cumulative); without it, it observes one by one.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or histogram._labelnames:
        for amount in amounts:
            histogram.observe(amount)
        return
    # bisect_left: the first bound >= amount, as observe's "amount <= bound".
    for index, count in Tally(bisect_left(bounds, a) for a in amounts).items():
        buckets[index].inc(count)
    total.inc(sum(amounts))


class Metrics:
    """Every metric of one bmsd process."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.messages_received = Counter(
            "bmsd_messages_received", "MQTT messages received", ["route"], registry=r)
        self.messages_rejected = Counter(
            "bmsd_messages_rejected",
            "Messages or readings dead-lettered to ingest_rejects", ["route", "reason"],
            registry=r)
        self.readings_without_time = Counter(
            "bmsd_readings_without_timestamp",
            "Readings stored with their arrival time (they carried none)", ["route"],
            registry=r)
        self.rows_written = Counter(
            "bmsd_rows_written", "Rows committed to a hypertable", ["table"], registry=r)
        self.duplicates = Counter(
            "bmsd_duplicates_ignored",
            "Readings already stored with the same values (redeliveries)", ["table"],
            registry=r)
        self.devices_registered = Counter(
            "bmsd_devices_registered", "Devices registered on first sight", ["stream"],
            registry=r)
        self.batch_rows = Histogram(
            "bmsd_batch_rows", "Rows per committed batch", buckets=_BATCH_BUCKETS, registry=r)
        self.commit_seconds = Histogram(
            "bmsd_commit_seconds", "Time to write and commit one batch",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.lag_seconds = Histogram(
            "bmsd_publish_to_commit_seconds",
            "From a reading's own timestamp to the commit that stored it",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge(
            "bmsd_inflight_messages", "Messages received and not yet acknowledged", registry=r)
        self.inbox_bytes = Gauge(
            "bmsd_inbox_bytes",
            "Payload bytes received and waiting for the ingest loop (at most 16 MiB)",
            registry=r)
        self.last_commit = Gauge(
            "bmsd_last_commit_timestamp_seconds",
            "Unix time of the last commit (the process start until the first)", registry=r)
        self.last_commit.set(time.time())
        self.build = Info("bmsd_build", "The running bmsd", registry=r)
        self.instance = Info(
            "bmsd_instance", "This process's MQTT client id and shared group ('' for none)",
            registry=r)
        try:
            self.build.info({"version": version("bmsd")})
        except PackageNotFoundError:  # a clone that was never installed
            self.build.info({"version": "unknown"})
        self.mqtt_connected = Gauge(
            "bmsd_mqtt_connected", "1 while connected to the broker", registry=r)
        self.sessions_lost = Counter(
            "bmsd_mqtt_sessions_lost",
            "Reconnects where the broker had not kept our session", registry=r)
        self.broker_dropped = Gauge(
            "bmsd_broker_dropped_messages",
            "Messages the broker dropped (its $SYS count), -1 until known", registry=r)
        self.db_errors = Counter(
            "bmsd_db_errors", "Database operations that failed and were retried", ["kind"],
            registry=r)
        self.db_up = Gauge("bmsd_db_up", "1 while the database answers", registry=r)
        self.alerts_unresolved = Gauge(
            "bmsd_alerts_unresolved", "Unresolved alerts", ["severity"], registry=r)
        self.alert_transitions = Counter(
            "bmsd_alert_transitions", "Alerts raised and resolved", ["code", "kind"],
            registry=r)
        self.notifications_pending = Gauge(
            "bmsd_alert_notifications_pending",
            "Alert notifications published and not yet acknowledged by the broker", registry=r)
        self.alert_seconds = Histogram(
            "bmsd_alert_evaluation_seconds", "Time to evaluate and write one batch's alerts",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.broker_dropped.set(-1)
