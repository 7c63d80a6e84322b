"""The Prometheus metrics bmsd exposes, registered on an injected registry."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from bmsd import __version__, internals

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 20000, 50000)


def observe_many(histogram: Histogram, amounts: Sequence[float]) -> None:
    """``histogram.observe`` each of *amounts*, taking its locks once per bucket, not
    twice per amount (a batch observes one latency per message).

    This reads the client's private layout (``_upper_bounds``, ``_buckets``,
    ``_sum``, kept per bucket, not cumulative): the fast path
    ``prometheus_histogram`` of bmsd/internals.py; without it, one by one.
    """
    if not internals.on("prometheus_histogram") or histogram._labelnames:
        for amount in amounts:
            histogram.observe(amount)
        return
    # bisect_left: the first bound >= amount, as observe's "amount <= bound".
    buckets = histogram._buckets
    for index, count in Tally(bisect_left(histogram._upper_bounds, a) for a in amounts).items():
        buckets[index].inc(count)
    histogram._sum.inc(sum(amounts))


_C, _G, _H = Counter, Gauge, Histogram
#: Every metric: attribute, kind, name, help, labels, histogram buckets.
_TABLE: tuple[tuple[str, type, str, str, tuple[str, ...], tuple[float, ...]], ...] = (
    ("messages_received", _C, "bmsd_messages_received", "MQTT messages received",
     ("route",), ()),
    ("messages_rejected", _C, "bmsd_messages_rejected",
     "Messages or readings dead-lettered to ingest_rejects", ("route", "reason"), ()),
    ("readings_without_time", _C, "bmsd_readings_without_timestamp",
     "Readings stored with their arrival time (they carried none)", ("route",), ()),
    ("rows_written", _C, "bmsd_rows_written", "Rows committed to a hypertable", ("table",), ()),
    ("duplicates", _C, "bmsd_duplicates_ignored",
     "Readings already stored with the same values (redeliveries)", ("table",), ()),
    ("devices_registered", _C, "bmsd_devices_registered", "Devices registered on first sight",
     ("stream",), ()),
    ("batch_rows", _H, "bmsd_batch_rows", "Rows per committed batch", (), _BATCH_BUCKETS),
    ("commit_seconds", _H, "bmsd_commit_seconds", "Time to write and commit one batch", (),
     _LATENCY_BUCKETS),
    ("lag_seconds", _H, "bmsd_publish_to_commit_seconds",
     "From a reading's own timestamp to the commit that stored it", (), _LATENCY_BUCKETS),
    ("inflight", _G, "bmsd_inflight_messages", "Messages received and not yet acknowledged",
     (), ()),
    ("inbox_bytes", _G, "bmsd_inbox_bytes",
     "Payload bytes received and waiting for the ingest loop (at most 16 MiB)", (), ()),
    ("last_commit", _G, "bmsd_last_commit_timestamp_seconds",
     "Unix time of the last commit (the process start until the first)", (), ()),
    ("mqtt_connected", _G, "bmsd_mqtt_connected", "1 while connected to the broker", (), ()),
    ("sessions_lost", _C, "bmsd_mqtt_sessions_lost",
     "Reconnects where the broker had not kept our session", (), ()),
    ("broker_dropped", _G, "bmsd_broker_dropped_messages",
     "Messages the broker dropped (its $SYS count), -1 until known", (), ()),
    ("db_errors", _C, "bmsd_db_errors", "Database operations that failed and were retried",
     ("kind",), ()),
    ("db_up", _G, "bmsd_db_up", "1 while the database answers", (), ()),
    ("alerts_unresolved", _G, "bmsd_alerts_unresolved", "Unresolved alerts", ("severity",), ()),
    ("alert_transitions", _C, "bmsd_alert_transitions", "Alerts raised and resolved",
     ("code", "kind"), ()),
    ("alert_replays", _C, "bmsd_alert_history_replays",
     "Device histories evaluated again for readings that arrived out of time order"
     " (bmsd/alerts/history.py)", ("stream",), ()),
    ("alert_corrections", _C, "bmsd_alert_corrections",
     "Stored alerts changed by readings that arrived late: raised_late, revised,"
     " withdrawn", ("kind",), ()),
    ("readings_not_evaluated", _C, "bmsd_readings_not_evaluated",
     "Readings stored but older than [alerts] reevaluate_window_s behind their device's"
     " newest: no alert was evaluated for them", ("stream",), ()),
    ("notifications_pending", _G, "bmsd_alert_notifications_pending",
     "Alert notifications published and not yet acknowledged by the broker", (), ()),
    ("alert_seconds", _H, "bmsd_alert_evaluation_seconds",
     "Time to evaluate and write one batch's alerts", (), _LATENCY_BUCKETS),
    ("sparkplug_births", _C, "bmsd_sparkplug_births",
     "Sparkplug B births received (NBIRTH: node, DBIRTH: device)", ("kind",), ()),
    ("sparkplug_deaths", _C, "bmsd_sparkplug_deaths",
     "Sparkplug B deaths of the current session (NDEATH: node, DDEATH: device)", ("kind",), ()),
    ("sparkplug_rebirths", _C, "bmsd_sparkplug_rebirth_requests",
     "Rebirth requests sent to edge nodes (NCMD Node Control/Rebirth)", (), ()),
    ("sparkplug_seq_gaps", _C, "bmsd_sparkplug_seq_gaps",
     "Sequence gaps not filled within [sparkplug] reorder_timeout_s", (), ()),
    ("sparkplug_unknown_aliases", _C, "bmsd_sparkplug_unknown_aliases",
     "Metrics whose alias or name their birth did not give", (), ()),
    ("sparkplug_historical", _C, "bmsd_sparkplug_historical_metrics",
     "Metrics edge nodes sent as historical (store and forward), stored", (), ()),
    ("sparkplug_online", _G, "bmsd_sparkplug_host_online",
     "1 while bmsd's STATE says online (primary host: it can store), else 0", (), ()),
    ("sparkplug_standby", _G, "bmsd_sparkplug_standby",
     "1 while another bmsd is the Sparkplug host of this host_id (this one takes over"
     " when it stops), else 0", (), ()),
    ("fast_path", _G, "bmsd_fast_path",
     "1 while a fast path's library internals are there, 0 when bmsd runs without it"
     " (bmsd/internals.py)", ("name",), ()),
)


class Metrics:
    """Every metric of one bmsd process (`_TABLE`), registered on *registry*."""

    messages_received: Counter
    messages_rejected: Counter
    readings_without_time: Counter
    rows_written: Counter
    duplicates: Counter
    devices_registered: Counter
    batch_rows: Histogram
    commit_seconds: Histogram
    lag_seconds: Histogram
    inflight: Gauge
    inbox_bytes: Gauge
    last_commit: Gauge
    mqtt_connected: Gauge
    sessions_lost: Counter
    broker_dropped: Gauge
    db_errors: Counter
    db_up: Gauge
    alerts_unresolved: Gauge
    alert_transitions: Counter
    alert_replays: Counter
    alert_corrections: Counter
    readings_not_evaluated: Counter
    notifications_pending: Gauge
    alert_seconds: Histogram
    sparkplug_births: Counter
    sparkplug_deaths: Counter
    sparkplug_rebirths: Counter
    sparkplug_seq_gaps: Counter
    sparkplug_unknown_aliases: Counter
    sparkplug_historical: Counter
    sparkplug_online: Gauge
    sparkplug_standby: Gauge
    fast_path: Gauge

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        for attribute, kind, name, help_, labels, buckets in _TABLE:
            extra = {"buckets": buckets} if buckets else {}
            setattr(self, attribute, kind(name, help_, labels, registry=registry, **extra))
        self.last_commit.set(time.time())
        self.broker_dropped.set(-1)
        Info("bmsd_build", "The running bmsd", registry=registry).info(
            {"version": __version__})
        self.instance = Info(
            "bmsd_instance", "This process's MQTT client id and shared group ('' for none)",
            registry=registry)
        for path in internals.FAST_PATHS.values():
            self.fast_path.labels(path.name).set(1 if path.on else 0)
