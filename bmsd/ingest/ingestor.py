"""Turn received messages into a batch, and commit and acknowledge it when due.

A message goes: topic → route (routing) → readings or rejects (payloads) →
device id (registry) → the batch (bmsd/batch.py). A batch is flushed - all
hypertables in one transaction - when a hypertable holds ``max_batch_rows``,
when as many messages are unacknowledged as the broker will send us (the
in-flight window; waiting longer would stall the broker), when the held
payloads pass ``MAX_PENDING_BYTES``, or ``flush_interval_ms`` after its first
message; and, when no message waits (the caller says so), once it is
``idle_flush_ms`` old. Only after the commit are its messages acknowledged,
in order.

A reading may be as old as ``ingest.max_reading_age_s``, but never older
than its hypertable's retention (its chunk would be dropped again): older
ones are dead-lettered. One older than ``LATE_AFTER``, which the refresh
policies no longer reach, has its day noted for the backlog job (sql/170).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from bmsd.alerts.engine import AlertEngine
from bmsd.batch import Batch, DeadLetter, Origin, Row
from bmsd.config import Config
from bmsd.ingest.mqtt import Message
from bmsd.ingest.payloads import ReadingBounds, parse_message
from bmsd.ingest.registry import Registry, Unresolved
from bmsd.ingest.routing import Router
from bmsd.ingest.sparkplug import METRICS_TABLE as SPARKPLUG_METRICS_TABLE
from bmsd.ingest.sparkplug import ROUTE as SPARKPLUG_ROUTE
from bmsd.ingest.sparkplug import SparkplugIntake
from bmsd.ingest.writer import Outcome, Writer
from bmsd.metrics import Metrics, observe_many
from bmsd.sparkplug.host import NAMESPACE
from bmsd.streams import NAMES

SPARKPLUG_PREFIX = NAMESPACE + "/"
#: Payload bytes held before a flush is forced, whatever the other limits.
MAX_PENDING_BYTES = 64 * 1024 * 1024
#: StreamRows older than this lie before the refresh policies' windows (sql/110).
LATE_AFTER = timedelta(days=3)

_RETENTION = """
    SELECT hypertable_name, extract(epoch FROM (config ->> 'drop_after')::interval)::float8
      FROM timescaledb_information.jobs
     WHERE proc_name = 'policy_retention' AND hypertable_name = ANY(%s)
"""


class Ingestor:
    """Gather messages into a batch; flush and acknowledge it when due."""

    def __init__(self, config: Config, metrics: Metrics,
                 ack: Callable[[list[Message]], int],
                 alerts: AlertEngine | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 command: Callable[[str, bytes], None] | None = None) -> None:
        ingest = config.ingest
        self._ingest = ingest
        self._bounds = {stream: self._stream_bounds(None) for stream in NAMES}
        self._router = Router(config.routes)
        self._registry = Registry(
            ingest, on_register=lambda device: metrics.devices_registered.labels(
                device.stream or SPARKPLUG_METRICS_TABLE).inc())
        self._writer = Writer(redelivered_within=timedelta(seconds=config.mqtt.session_expiry_s))
        self._metrics = metrics
        self._ack = ack
        self._alerts = alerts
        self.window_flushes = 0  # flushes forced by a full in-flight window: a backlog
        self._clock = clock
        self._max_rows = ingest.max_batch_rows
        self._interval_s = ingest.flush_interval_ms / 1000
        self._idle_s = ingest.idle_flush_ms / 1000
        self._window = config.mqtt.receive_maximum
        self._batch = Batch()
        self._flushing = False  # a flush of this batch began (and failed, if still set)
        self._pending: list[Message] = []
        self._pending_bytes = 0
        self._first_at: float | None = None
        self._lag_times: list[datetime] = []
        self._received: dict[str, Any] = {}  # messages_received by route, labelled once
        #: Sparkplug B messages ([sparkplug] enabled); *command* sends its rebirth requests.
        self.sparkplug = None if not config.sparkplug.enabled else SparkplugIntake(
            config.sparkplug, self._registry, metrics, self.add_rows,
            command or (lambda topic, payload: None), self._writer.abandon)

    @property
    def filters(self) -> list[str]:
        return self._router.filters

    @property
    def pending(self) -> int:
        """Return how many messages wait for a commit."""
        return len(self._pending)

    def _stream_bounds(self, retention_s: float | None) -> ReadingBounds:
        ingest = self._ingest
        age_s, source = float(ingest.max_reading_age_s), "ingest.max_reading_age_s"
        if retention_s is not None and retention_s < age_s:
            age_s, source = retention_s, "the table's retention: older data is dropped"
        return ReadingBounds(max_message_bytes=ingest.max_message_bytes,
                      max_reading_age=timedelta(seconds=age_s), age_source=source,
                      max_future=timedelta(seconds=ingest.max_future_s))

    def prepare(self, conn: psycopg.Connection[Any]) -> None:
        """Check the schema this writer needs (raises DatabaseError if absent).

        Also reads each hypertable's retention, which caps the reading age.
        """
        self._writer.prepare(conn)
        if self._alerts is not None:
            self._alerts.stored_as(self._writer.tables)
        with conn.transaction():
            kept = dict(conn.execute(_RETENTION, (list(self._writer.tables.values()),)).fetchall())
        self._bounds = {stream: self._stream_bounds(kept.get(table))
                        for stream, table in self._writer.tables.items()}

    def accept(self, conn: psycopg.Connection[Any], message: Message) -> None:
        """Add *message* to the batch; database errors leave the batch unchanged."""
        if self.sparkplug is not None and message.topic.startswith(SPARKPLUG_PREFIX):
            self._counted(SPARKPLUG_ROUTE).inc()
            self._hold(message, self.sparkplug.accept(conn, message, self._batch,
                                                      self._bounds))
            return
        match = self._router.match(message.topic)
        if isinstance(match, str):
            origin = Origin(message.topic, None, message.payload, None, message.received_at,
                            message.dup)
            self._hold(message, [DeadLetter(origin, "no_route", match)])
            return
        route = match.route
        self._counted(route.template).inc()
        parsed = parse_message(route.stream, message.payload, message.received_at,
                               self._bounds[route.stream])
        dead = [DeadLetter(Origin(message.topic, route.template, r.payload, r.index,
                                  message.received_at, message.dup), r.category, r.reason)
                for r in parsed.rejects]
        if not parsed.readings:
            self._hold(message, dead)
            return
        device: int | Unresolved | None = self._registry.cached(match)
        if device is None:
            self._writer.abandon()  # the lookup needs the connection
            device = self._registry.resolve(conn, match)  # may raise: nothing changed yet
        origin = Origin(message.topic, route.template, message.payload, None,
                        message.received_at, message.dup)
        if isinstance(device, Unresolved):
            self._hold(message, [*dead, DeadLetter(origin, device.category, device.reason)])
            return
        rows = [Row((r.time, device, *r.values, r.extra), origin, r.index)
                for r in parsed.readings]
        latest = self.add_rows(conn, route.stream, rows, message.received_at)  # may raise
        undated = sum(not r.timestamped for r in parsed.readings)
        if undated:
            self._metrics.readings_without_time.labels(route.template).inc(undated)
        else:
            self._lag_times.append(latest)
        self._hold(message, dead)

    def add_rows(self, conn: psycopg.Connection[Any], stream: str, rows: list[Row],
                 received_at: datetime) -> datetime:
        """Add one device's rows of *stream*, of one message, to the batch; return the
        newest reading's time. Database errors leave the batch unchanged."""
        self._batch.add_message(stream, rows, lambda fresh: self._writer.send(conn, stream, fresh))
        times: list[datetime] = [row.values[0] for row in rows]
        latest, late_before = max(times), received_at - LATE_AFTER
        if min(times) < late_before:
            self._batch.late.update((stream, t.astimezone(UTC).date()) for t in times
                                    if t < late_before)
        self._batch.note_seen(rows[0].values[1], latest, received_at)
        return latest

    def _counted(self, route: str) -> Any:
        """Return the messages_received counter of *route* (labelled once)."""
        received = self._received.get(route)
        if received is None:
            received = self._received[route] = self._metrics.messages_received.labels(route)
        return received

    def release(self) -> None:
        """Free the connection for a statement of another kind than the batch's
        (the batch's early COPY is rolled back; the commit writes its rows)."""
        self._writer.abandon()

    def _hold(self, message: Message, dead: list[DeadLetter]) -> None:
        self._batch.dead.extend(dead)
        for letter in dead:
            self._metrics.messages_rejected.labels(letter.origin.route or "",
                                                   letter.category).inc()
        if self._first_at is None:
            self._first_at = self._clock()
        self._pending.append(message)
        self._pending_bytes += len(message.payload)

    def due(self, idle: bool = False) -> bool:
        """Return whether the batch should be flushed now; *idle*: no message waits."""
        if not self._pending:
            return False
        return (self._batch.largest >= self._max_rows
                or len(self._pending) >= self._window
                or self._pending_bytes >= MAX_PENDING_BYTES
                or self.seconds_to_due(idle) <= 0)

    def seconds_to_due(self, idle: bool = False) -> float:
        """Return the seconds until the flush interval of the batch runs out, or, if
        *idle*, until the batch is ``idle_flush_ms`` old, whichever comes first."""
        if self._first_at is None:
            return self._interval_s
        limit = min(self._interval_s, self._idle_s) if idle else self._interval_s
        return self._first_at + limit - self._clock()

    def flush(self, conn: psycopg.Connection[Any]) -> Outcome:
        """Commit the batch, then acknowledge its messages; errors leave it for a retry."""
        started = time.perf_counter()
        engine = self._alerts
        plan = None
        retry, self._flushing = self._flushing, True  # True: an attempt failed before
        with self._writer.transaction(conn):
            outcome = self._writer.write(conn, self._batch, retry)
            if engine is not None:
                plan = engine.plan(conn, self._batch)
        committed = datetime.now(UTC)
        if engine is not None and plan is not None:
            engine.apply(plan)
        if len(self._pending) >= self._window:
            self.window_flushes += 1
        self._metrics.commit_seconds.observe(time.perf_counter() - started)
        self._metrics.batch_rows.observe(sum(outcome.written.values()))
        for table, count in outcome.written.items():
            self._metrics.rows_written.labels(table).inc(count)
        for table, count in outcome.duplicates.items():
            self._metrics.duplicates.labels(table).inc(count)
        for letter in outcome.dead[len(self._batch.dead):]:
            self._metrics.messages_rejected.labels(letter.origin.route or "",
                                                   letter.category).inc()
        observe_many(self._metrics.lag_seconds,
                     [max((committed - when).total_seconds(), 0.0) for when in self._lag_times])
        self._ack(self._pending)
        self._flushing = False
        self._batch = Batch()
        self._pending = []
        self._pending_bytes = 0
        self._first_at = None
        self._lag_times = []
        return outcome
