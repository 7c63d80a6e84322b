"""`bmsd run`: the long-running process, from start-up to an orderly shutdown.

The main thread runs the ingest loop; paho's thread receives messages into a
bounded queue (bounded twice over: the broker sends no more than the
in-flight window until we acknowledge). Signal handlers only record what
was asked (`Signals`); the loop acts on it. On SIGTERM/SIGINT bmsd stops
taking messages, commits and acknowledges what it holds, disconnects and
exits 0 within ``shutdown_timeout_s``; what it could not commit by then
stays unacknowledged and the broker redelivers it. A second signal exits 1
at once, even while the loop is blocked on the database. A fatal condition
exits 1 with its reason.

Under systemd (bmsd/ingest/notify.py) the daemon says READY=1 once the database
answers with the schema this bmsd expects, the instance lock is held and the
subscription is acknowledged; STATUS= every few seconds; WATCHDOG=1 only
from the loop, after a commit or a database round trip. Ingest does not wait
for READY: a resumed session's queue, which the broker sends before the
SUBACK, is stored as it comes, each commit extending the start timeout
(EXTEND_TIMEOUT_USEC) and STATUS= and /readyz saying "draining a backlog".
bmsd/ingest/mqtt.py draws which thread may wait on which.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType
from typing import Any, TypeVar

import psycopg
import structlog
from prometheus_client import CollectorRegistry

from bmsd import internals
from bmsd.alerts.engine import AlertEngine
from bmsd.alerts.evaluate import Plan
from bmsd.alerts.rules import load_rules
from bmsd.config import Config, redact_url
from bmsd.database import Database
from bmsd.errors import BmsdError, ConfigError
from bmsd.ingest.health import HealthServer
from bmsd.ingest.inbox import Inbox
from bmsd.ingest.ingestor import Ingestor
from bmsd.ingest.lock import InstanceLock
from bmsd.ingest.mqtt import Message, MqttPublisher, MqttSource
from bmsd.ingest.notify import Notifier
from bmsd.ingest.policies import PolicyHealth
from bmsd.metrics import Metrics
from bmsd.schema.migrate import all_scripts, missing_scripts

T = TypeVar("T")
log = structlog.get_logger("bmsd")

_IDLE_PING_S = 10.0
_ALIVE_WITHIN_S = 60.0
_STATUS_EVERY_S = 5.0
# Before READY=1, how often to look for the SUBACK and update STATUS.
_STARTING_STATUS_EVERY_S = 0.1
# At exit, how long alert notifications of the last commits may take to be
# acknowledged (a few ms normally); unresolved ones are announced again at start.
_NOTICES_AT_EXIT_S = 2.0


class _GaveUp(Exception):
    """The shutdown deadline passed while the database was failing."""


class Signals:
    """What the signal handlers asked for; the handlers do nothing else.

    A handler that logged, or took a lock, could deadlock against the very
    code it interrupted (structlog's and logging's locks are not
    re-entrant). Plain attribute writes cannot.
    """

    def __init__(self) -> None:
        self.stops = 0
        self.reloads = 0

    def install(self) -> None:
        """Route SIGTERM/SIGINT to `stops` and SIGHUP to `reloads`."""
        def stop(signum: int, frame: FrameType | None) -> None:
            self.stops += 1

        def reload(signum: int, frame: FrameType | None) -> None:
            self.reloads += 1

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)


class Daemon:
    """One bmsd process: broker session, ingest loop, database, metrics."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None,
                 notifier: Notifier | None = None) -> None:
        self.config = config
        self.metrics = Metrics(registry or CollectorRegistry())
        self.signals = Signals()
        self.stop = threading.Event()
        self.notifier = notifier or Notifier()
        self._deadline: float | None = None
        self._inbox = Inbox(max_messages=config.ingest.max_waiting_messages)
        self._alerts: AlertEngine | None = None
        if config.alerts.enabled:
            self._alerts = AlertEngine(
                load_rules(config.alerts.rules_file), self.metrics, publish=self._publish,
                topic_prefix=config.alerts.mqtt_prefix or None,
                offline_after_s={r.stream: r.offline_after_s for r in config.routes},
                shared=config.mqtt.shared_group is not None)
        self._ingest = Ingestor(config, self.metrics, ack=self._ack, alerts=self._alerts)
        self._accepting: Message | None = None
        self._source = MqttSource(config.mqtt, self._ingest.filters, self._inbox.put,
                                  self.metrics)
        self._notices: MqttPublisher | None = None
        if self._alerts is not None and config.alerts.mqtt_prefix:
            broker = config.mqtt.model_copy(update={"url": config.alerts.mqtt_url}) \
                if config.alerts.mqtt_url else config.mqtt
            self._notices = MqttPublisher(broker, self.metrics)
        self._db = Database(config.database, self.metrics, sleep=self._sleep)
        self._policies = PolicyHealth(config.database)
        self.metrics.registry.register(self._policies)
        self.metrics.instance.info({"client_id": config.mqtt.client_id,
                                    "shared_group": config.mqtt.shared_group or ""})
        # Read at each scrape, so it tells the truth while the loop is stuck:
        # what is in the batch and what waits in the queue before it.
        self.metrics.inflight.set_function(lambda: self._ingest.pending + self._inbox.qsize())
        self.metrics.inbox_bytes.set_function(lambda: self._inbox.bytes)
        self._lock = InstanceLock(config.database, config.mqtt.client_id)
        self._waiting_for = "the database"
        self._is_ready = False  # READY=1 sent: the subscription was acknowledged
        self._draining = False  # taking a resumed session's queue before the SUBACK
        self._committed = 0  # messages committed since start
        self._paused_for_notices = False
        self._heartbeat = time.monotonic()
        self._rows = 0  # committed since start, for STATUS
        self._last_commit: float | None = None
        self._started = time.monotonic()
        host, port = config.metrics.host, config.metrics.port
        self.http = HealthServer(host, port, self.metrics.registry, self._alive, self._ready)

    # --- probes -----------------------------------------------------------------

    def _alive(self) -> tuple[bool, dict[str, object]]:
        age = time.monotonic() - self._heartbeat
        return age < _ALIVE_WITHIN_S, {"loop_seconds_ago": round(age, 3)}

    def _ready(self) -> tuple[bool, dict[str, object]]:
        subscribed = self._source.subscribed.is_set()
        db = self._db.up
        ready = subscribed and db and not self.stop.is_set()
        details: dict[str, object] = {
            "client_id": self.config.mqtt.client_id,
            "shared_group": self.config.mqtt.shared_group,
            "mqtt_subscribed": subscribed, "database": db, "stopping": self.stop.is_set()}
        if not ready and self._waiting_for:
            details["waiting_for"] = (self._backlog_line() if self._draining and not subscribed
                                      else self._waiting_for)
        return ready, details

    # --- running ------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; return the exit code."""
        self.http.start()
        log.info("bmsd_starting", database=redact_url(self.config.database.url),
                 broker=redact_url(self.config.mqtt.url), client_id=self.config.mqtt.client_id,
                 shared_group=self.config.mqtt.shared_group,
                 metrics=f"http://{self.config.metrics.addr}/metrics")
        for path in internals.FAST_PATHS.values():
            if not path.on:  # a library upgrade took what it needs: slower, not wrong
                log.warning("fast_path_off", name=path.name, needs=path.needs,
                            missing=list(path.missing), meaning=path.without)
        watcher = threading.Thread(target=self._watch_signals, name="bmsd-signals",
                                   daemon=True)
        watcher.start()
        try:
            self._start_up()
            self._loop()
            self._drain()
            return 0
        except _GaveUp:
            if self._in_hand():
                log.warning("bmsd_shutdown_incomplete", unacknowledged=self._in_hand(),
                            meaning="the database did not answer before shutdown_timeout_s;"
                                    " the broker redelivers these messages to the next bmsd")
            return 0
        except BmsdError as exc:
            log.error("bmsd_fatal", error=str(exc))
            self.notifier.status(f"failed: {exc}")
            return 1
        finally:
            # First, so that paho's thread, if it waits for room in the inbox, returns
            # (what it held stays unacknowledged) and close() can join it.
            self._inbox.close()
            self._source.close()
            if self._notices is not None:
                self._notices.wait_sent(_NOTICES_AT_EXIT_S)
                self._notices.close()
            self._lock.release()
            self._db.close()
            self.http.stop()
            self._policies.close()
            log.info("bmsd_stopped")

    def _start_up(self) -> None:
        """Check the schema, take the instance lock, load alerts, connect to the broker.

        Ingest starts here, before the broker acknowledges the subscription: on a
        resumed session the broker sends its queue first, as many messages as its
        window allows, and the SUBACK after them. READY=1 waits for the SUBACK
        (`_check_subscribed`, from the loop), which needs those messages taken.
        """
        self._starting("the database")
        self._db.run(self._check_schema)
        self._db.run(self._ingest.prepare)
        self._db.run(lambda conn: self._lock.acquire(on_wait=self._starting))
        if self._alerts is not None:
            self._db.run(self._alerts.load)
        self._starting("the MQTT subscription")
        if self._notices is not None:
            self._notices.start()
        if self._alerts is not None:
            # Re-announce what is unresolved, before any new reading can change it:
            # a crash between a commit and its publish must lose no notification.
            log.info("alerts_republished", count=self._alerts.republish())
        self._source.start()

    def _check_subscribed(self) -> None:
        """Send READY=1 once the subscription is acknowledged; until then say what we wait
        for, and what we do meanwhile (a resumed session's backlog)."""
        if self._source.subscribed.is_set():
            self._is_ready = True
            self._waiting_for = ""
            self.notifier.ready(self._status_line())
            self.notifier.progress()
            log.info("bmsd_ready", client_id=self.config.mqtt.client_id,
                     backlog_committed=self._committed)
            return
        refused = self._source.refused
        if refused:
            self._set_waiting(f"the MQTT subscription (the broker refused us: {refused})")
        elif self._draining or self._in_hand() or self._inbox.qsize():
            # Logged once; STATUS and /readyz carry the counts as they grow.
            self._draining = True
            self._set_waiting("the MQTT subscription (draining a backlog first)",
                              status=self._backlog_line())
        else:
            self._set_waiting("the MQTT subscription")

    def _backlog_line(self) -> str:
        """Return what a drain before the SUBACK has done so far, for STATUS and /readyz."""
        return (f"starting: draining a backlog of {self._committed + self._in_hand()}"
                f" messages so far ({self._committed} committed,"
                f" {self._in_hand() + self._inbox.qsize()} in hand); the broker sends the"
                " session's queue before it acknowledges the subscription")

    def _starting(self, what: str) -> None:
        """Say what start-up waits for; give up if a stop signal came meanwhile."""
        if self.stop.is_set():
            raise _GaveUp
        self._set_waiting(what)

    def _set_waiting(self, what: str, status: str | None = None) -> None:
        if what != self._waiting_for:
            self._waiting_for = what
            log.info("bmsd_waiting", waiting_for=what)
        self.notifier.status(status or f"starting: waiting for {what}")

    def _check_schema(self, conn: psycopg.Connection[Any]) -> None:
        missing = missing_scripts(conn)
        if missing and missing == all_scripts():
            raise ConfigError("the database has no bmsd schema: run `bmsd migrate` first")
        if missing:
            raise ConfigError(
                f"the database schema is older than this bmsd: {len(missing)} script(s) not"
                f" applied ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''});"
                " run `bmsd migrate` first (with this version), then start bmsd again")

    def _watch_signals(self) -> None:
        """Act on signals outside the handlers: start the drain, or force an exit."""
        seen = 0
        while True:
            time.sleep(0.05)
            stops = self.signals.stops
            if stops == seen:
                continue
            seen = stops
            if stops == 1:
                log.info("bmsd_stopping", meaning="committing what is in hand; a second"
                                                  " signal exits at once")
                self._begin_shutdown()
            else:
                log.warning("bmsd_forced_exit", unacknowledged=self._in_hand(),
                            meaning="unacknowledged messages will be redelivered by the broker")
                os._exit(1)

    def _begin_shutdown(self) -> None:
        """Stop the loop, and bound by the shutdown deadline whatever it is waiting on."""
        if self._deadline is None:
            self._deadline = time.monotonic() + self.config.ingest.shutdown_timeout_s
            self._db.deadline.cap = self._deadline
        self.stop.set()

    def _loop(self) -> None:
        inbox, ingest, db = self._inbox, self._ingest, self._db
        next_offline = next_limits = next_status = time.monotonic()
        backlog_seen = datetime.now(UTC)
        window_flushes = 0
        reloads = self.signals.reloads
        ping_every = min(_IDLE_PING_S, self.notifier.watchdog_interval_s or _IDLE_PING_S)
        while not self.stop.is_set():
            now = self._heartbeat = time.monotonic()
            if self._source.fatal is not None:
                raise self._source.fatal
            engine = self._alerts
            if engine is not None:
                if self.signals.reloads != reloads:
                    reloads = self.signals.reloads
                    self._reload_rules(engine)
                if now >= next_limits:
                    next_limits = now + self.config.alerts.limits_refresh_s
                    self._aside(functools.partial(self._read_limits, engine))
                if ingest.window_flushes != window_flushes or inbox.qsize() > 0:
                    # Draining a backlog: every device would look silent.
                    window_flushes = ingest.window_flushes
                    backlog_seen = datetime.now(UTC)
                if now >= next_offline and self._source.subscribed.is_set():
                    next_offline = now + self.config.alerts.offline_check_s
                    since = max(self._source.subscribed_at, backlog_seen)
                    engine.apply(self._aside(functools.partial(self._offline, engine,
                                                          since=since)))
            if now >= next_status:
                if self._is_ready:
                    next_status = now + _STATUS_EVERY_S
                    self.notifier.status(self._status_line())
                else:  # READY=1 once the SUBACK is in; STATUS says what start-up waits for
                    next_status = now + _STARTING_STATUS_EVERY_S
                    self._check_subscribed()
            try:
                # A batch held here found the inbox empty while it was too young to
                # commit: wait for its idle age, the flush interval or a message.
                wait = min(max(ingest.seconds_to_due(idle=True), 0.001), 0.5)
                if self._notices_backlogged():
                    time.sleep(min(wait, 0.05))
                    raise queue.Empty
                message = inbox.get(timeout=wait)
            except queue.Empty:
                message = None
            idle = message is None
            if message is not None:
                idle = self._accept_waiting(message)
            if ingest.due(idle):
                self._flush()
            elif not ingest.pending and time.monotonic() - db.last_ok > ping_every:
                self._aside(self._ping)
                self.notifier.progress()

    def _notices_backlogged(self) -> bool:
        """Whether too many alert notifications wait for the broker to take readings.

        The readings wait at the broker meanwhile (unacknowledged), so memory
        stays bounded and nothing is dropped; the network thread that sends
        the notifications does not depend on this loop.
        """
        pending = self._notices.pending if self._notices is not None else 0
        over = pending > self.config.alerts.max_pending_notifications
        if over != self._paused_for_notices:
            self._paused_for_notices = over
            if over:
                log.warning("alert_notifications_backlog", pending=pending,
                            meaning="taking no readings until the broker acknowledges more"
                                    " alert notifications ([alerts] max_pending_notifications)")
            else:
                log.info("alert_notifications_backlog_cleared")
        return over

    def _flush(self) -> None:
        messages = self._ingest.pending
        outcome = self._db.run(self._ingest.flush)
        self._committed += messages
        self._rows += sum(outcome.written.values())
        self._last_commit = time.monotonic()
        self.metrics.last_commit.set(time.time())
        if self._is_ready:
            self.notifier.progress()
        else:  # a drain before the SUBACK: progress, not a start that hangs
            self.notifier.extend_start()

    def _status_line(self) -> str:
        """Return the one line `systemctl status` shows."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        since = ("no commit yet" if self._last_commit is None
                 else f"last commit {time.monotonic() - self._last_commit:.0f} s ago")
        alerts = self._alerts.unresolved if self._alerts is not None else 0
        return (f"ingesting: {self._rows / elapsed:.0f} rows/s since start,"
                f" {self._ingest.pending + self._inbox.qsize()} messages waiting, {since},"
                f" {alerts} unresolved alerts")

    def _drain(self) -> None:
        """Commit and acknowledge what is in hand, within the shutdown deadline."""
        self.notifier.stopping()
        self._source.stop_intake()
        self._begin_shutdown()
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._accept_waiting(message)
            if self._ingest.due():
                self._flush()
        if self._ingest.pending:
            pending = self._ingest.pending
            self._flush()
            log.info("bmsd_drained", committed_messages=pending)

    @staticmethod
    def _offline(engine: AlertEngine, conn: psycopg.Connection[Any], since: datetime) -> Plan:
        with conn.transaction():
            return engine.plan_offline(conn, datetime.now(UTC), since)

    @staticmethod
    def _read_limits(engine: AlertEngine, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            engine.load_limits(conn)

    def _reload_rules(self, engine: AlertEngine) -> None:
        self.notifier.reloading()
        path = self.config.alerts.rules_file
        try:
            rules = load_rules(path)
        except ConfigError as exc:
            log.error("alert_rules_refused", error=str(exc),
                      meaning="the new rules are invalid; the old ones stay in force")
        else:
            engine.set_rules(rules)
            self._aside(functools.partial(self._read_limits, engine))
            log.info("alert_rules_reloaded", rules=len(rules))
        self.notifier.ready(self._status_line())

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        if self._notices is not None:
            self._notices.publish(topic, payload, retain)

    def _ping(self, conn: psycopg.Connection[Any]) -> None:
        """Check the database while idle, and that we still hold our instance lock."""
        conn.execute("SELECT 1")
        lock_conn = self._lock.connection
        with self._db.deadline.watch(lock_conn) if lock_conn else contextlib.nullcontext():
            self._lock.check()

    def _aside(self, action: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run a statement that is not the batch's: its early COPY gives way first."""
        self._ingest.release()
        return self._db.run(action)

    def _accept_waiting(self, message: Message) -> bool:
        """Add *message* to the batch, then what already waits in the inbox, until the
        batch is due; return whether the inbox ran empty.

        One `Database.run` for the run of messages, not one each (its deadline
        watch and retry frame cost a single-reading message a tenth of its
        time). A database error retries from the message it failed on: those
        before it are in the batch.
        """
        def accept_run(conn: psycopg.Connection[Any]) -> bool:
            nonlocal message
            while True:
                self._accepting = message  # in hand while a database error has it tried again
                self._ingest.accept(conn, message)
                self._accepting = None
                if self._ingest.due():
                    return False
                try:
                    message = self._inbox.get_nowait()
                except queue.Empty:
                    return True

        return self._db.run(accept_run)

    def _in_hand(self) -> int:
        """Return how many received messages wait for a commit (the batch's, and the one
        being added to it)."""
        return self._ingest.pending + (self._accepting is not None)

    def _ack(self, messages: list[Message]) -> int:
        return self._source.ack(messages)

    def _sleep(self, seconds: float) -> None:
        """Wait between database retries; stop waiting on shutdown or a fatal condition."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self._heartbeat = time.monotonic()
            if self._deadline is not None and (time.monotonic() > self._deadline
                                               or not self._in_hand()):
                raise _GaveUp  # past the deadline, or nothing in hand to commit
            if self._source.fatal is not None:
                raise self._source.fatal
            time.sleep(min(left, 0.1))


#: Allocations between the collector's young-generation passes (CPython: 700).
GC_YOUNG_THRESHOLD = 10_000


def settle_collector() -> None:
    """Tune the cyclic garbage collector for the ingest loop; call once, after start-up.

    A batch holds its rows (objects the collector tracks) until it commits,
    so they survive young passes and fill the old generation, whose full
    passes then walked every object imported at start-up too: about 15 % of
    the CPU of 100-reading messages (bench/RESULTS.md, step 9). Freezing what
    exists now takes the start-up objects out of every later pass, and rarer
    young passes promote fewer rows. Reference counting still frees the rows
    themselves at each commit, so memory stays bounded as before.
    """
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def run(config: Config) -> int:
    """Run the daemon in this (main) thread; return its exit code."""
    daemon = Daemon(config)
    daemon.signals.install()
    settle_collector()
    return daemon.run()
