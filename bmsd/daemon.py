"""`bmsd run`: the long-running process, from start-up to an orderly shutdown.

The main thread runs the ingest loop; paho's thread receives messages into a
bounded queue (bounded twice over: the broker sends no more than the
in-flight window until we acknowledge). Signal handlers only set a flag. On
SIGTERM/SIGINT bmsd stops taking messages, commits and acknowledges what it
holds, disconnects and exits 0 within ``shutdown_timeout_s``; what it could
not commit by then stays unacknowledged and the broker redelivers it. A
second signal exits at once. A fatal condition exits 1 with its reason.
"""

from __future__ import annotations

import functools
import os
import queue
import random
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
from psycopg_pool import ConnectionPool, PoolTimeout

from bmsd.alerts import AlertEngine, Plan
from bmsd.config import Config, redact_url
from bmsd.errors import BmsdError, ConfigError, DatabaseError
from bmsd.health import HealthServer
from bmsd.ingest import Ingestor
from bmsd.lock import InstanceLock
from bmsd.metrics import Metrics
from bmsd.mqtt import Message, MqttSource
from bmsd.rules import load_rules

log = structlog.get_logger("bmsd")
T = TypeVar("T")

# Errors after which retrying may succeed: the connection, the server, a timeout.
_TRANSIENT = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)
_IDLE_PING_S = 10.0
_ALIVE_WITHIN_S = 60.0


class _GaveUp(Exception):
    """The shutdown deadline passed while the database was failing."""


class Daemon:
    """One bmsd process: broker session, ingest loop, database pool, metrics."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.metrics = Metrics(registry or CollectorRegistry())
        self.stop = threading.Event()
        self._deadline: float | None = None
        self._inbox: queue.Queue[Message] = queue.Queue(maxsize=2 * config.mqtt.receive_maximum)
        self._alerts: AlertEngine | None = None
        if config.alerts.enabled:
            self._alerts = AlertEngine(
                load_rules(config.alerts.rules_file), self.metrics, publish=self._publish,
                topic_prefix=config.alerts.mqtt_prefix or None,
                offline_after_s={r.stream: r.offline_after_s for r in config.routes})
        self._ingest = Ingestor(config, self.metrics, ack=self._ack, alerts=self._alerts)
        self._source = MqttSource(config.mqtt, self._ingest.filters, self._inbox.put,
                                  self.metrics)
        self.reload = threading.Event()
        db = config.database
        self._pool = ConnectionPool(
            db.url, min_size=db.pool_min_size, max_size=db.pool_max_size, open=False,
            name="bmsd", timeout=db.connect_timeout_s, reconnect_timeout=0,
            check=ConnectionPool.check_connection,
            kwargs={
                "autocommit": True, "application_name": "bmsd",
                "connect_timeout": db.connect_timeout_s,
                "options": f"-c statement_timeout={db.statement_timeout_ms}",
                "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                "keepalives_count": 3,
                # A write hung on a dead peer fails instead of stalling for ever.
                "tcp_user_timeout": db.statement_timeout_ms + 10_000,
            },
        )
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = InstanceLock(db.url, config.mqtt.client_id, db.connect_timeout_s)
        self._last_db_ok = 0.0
        self._db_ok = False
        self._heartbeat = time.monotonic()
        host, port = config.metrics.host, config.metrics.port
        self.http = HealthServer(host, port, self.metrics.registry, self._alive, self._ready)

    # --- probes -----------------------------------------------------------------

    def _alive(self) -> tuple[bool, dict[str, object]]:
        age = time.monotonic() - self._heartbeat
        return age < _ALIVE_WITHIN_S, {"loop_seconds_ago": round(age, 3)}

    def _ready(self) -> tuple[bool, dict[str, object]]:
        subscribed = self._source.subscribed.is_set()
        db = self._db_ok
        return subscribed and db and not self.stop.is_set(), {
            "mqtt_subscribed": subscribed, "database": db, "stopping": self.stop.is_set()}

    # --- running ------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; return the exit code."""
        self.http.start()
        log.info("bmsd_starting", database=redact_url(self.config.database.url),
                 broker=redact_url(self.config.mqtt.url), client_id=self.config.mqtt.client_id,
                 metrics=f"http://{self.config.metrics.addr}/metrics")
        self._pool.open(wait=False)
        try:
            self._with_db(self._ingest.prepare)
            self._with_db(lambda conn: self._lock.acquire())
            if self._alerts is not None:
                self._with_db(self._alerts.load)
            self._source.start()
            self._loop()
            self._drain()
            return 0
        except _GaveUp:
            log.warning("bmsd_shutdown_incomplete", unacknowledged=self._ingest.pending,
                        meaning="the database did not answer before shutdown_timeout_s; the"
                                " broker redelivers these messages to the next bmsd")
            return 0
        except BmsdError as exc:
            log.error("bmsd_fatal", error=str(exc))
            return 1
        finally:
            self._source.close()
            self._release()
            self._lock.release()
            self._pool.close(timeout=2)
            self.http.stop()
            log.info("bmsd_stopped")

    def _loop(self) -> None:
        inbox, ingest = self._inbox, self._ingest
        republished = False
        next_offline = next_limits = time.monotonic()
        backlog_seen = datetime.now(UTC)
        window_flushes = 0
        while not self.stop.is_set():
            self._heartbeat = time.monotonic()
            if self._source.fatal is not None:
                raise self._source.fatal
            engine = self._alerts
            if engine is not None:
                if not republished and self._source.subscribed.is_set():
                    # Re-announce what is unresolved: a crash between a commit and
                    # its publish must lose no notification.
                    republished = True
                    log.info("alerts_republished", count=engine.republish())
                if self.reload.is_set():
                    self.reload.clear()
                    self._reload_rules(engine)
                now = time.monotonic()
                if now >= next_limits:
                    next_limits = now + self.config.alerts.limits_refresh_s
                    self._with_db(functools.partial(self._read_limits, engine))
                if ingest.window_flushes != window_flushes or inbox.qsize() > 0:
                    # Draining a backlog: every device would look silent.
                    window_flushes = ingest.window_flushes
                    backlog_seen = datetime.now(UTC)
                if now >= next_offline and self._source.subscribed.is_set():
                    next_offline = now + self.config.alerts.offline_check_s
                    since = max(self._source.subscribed_at, backlog_seen)
                    engine.apply(self._with_db(functools.partial(self._offline, engine,
                                                                 since=since)))
            try:
                message = inbox.get(timeout=min(max(ingest.seconds_to_due(), 0.001), 0.5))
            except queue.Empty:
                message = None
            if message is not None:
                self._accept(message)
                # Take what is already waiting before looking at the clock again.
                while not ingest.due():
                    try:
                        self._accept(inbox.get_nowait())
                    except queue.Empty:
                        break
            if ingest.due():
                self._with_db(ingest.flush)
            elif not ingest.pending and time.monotonic() - self._last_db_ok > _IDLE_PING_S:
                self._with_db(self._ping)

    def _drain(self) -> None:
        """Commit and acknowledge what is in hand, within the shutdown deadline."""
        self._source.stop_intake()
        self._deadline = time.monotonic() + self.config.ingest.shutdown_timeout_s
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._accept(message)
            if self._ingest.due():
                self._with_db(self._ingest.flush)
        if self._ingest.pending:
            pending = self._ingest.pending
            self._with_db(self._ingest.flush)
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
        path = self.config.alerts.rules_file
        try:
            rules = load_rules(path)
        except ConfigError as exc:
            log.error("alert_rules_refused", error=str(exc),
                      meaning="the new rules are invalid; the old ones stay in force")
            return
        engine.set_rules(rules)
        self._with_db(functools.partial(self._read_limits, engine))
        log.info("alert_rules_reloaded", rules=len(rules))

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self._source.publish(topic, payload, retain)

    def _ping(self, conn: psycopg.Connection[Any]) -> None:
        """Check the database while idle, and that we still hold our instance lock."""
        conn.execute("SELECT 1")
        self._lock.check()

    def _accept(self, message: Message) -> None:
        self._with_db(lambda conn: self._ingest.accept(conn, message))

    def _ack(self, messages: list[Message]) -> int:
        return self._source.ack(messages)

    # --- the database, with retries ------------------------------------------------

    def _with_db(self, action: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run *action* on our connection; retry transient failures with backoff."""
        backoff = 0.5
        cap = self.config.database.retry_max_backoff_s
        while True:
            try:
                if self._conn is None:
                    self._conn = self._pool.getconn()
                result = action(self._conn)
            except _TRANSIENT as exc:
                self._release()
                self.metrics.db_errors.labels(type(exc).__name__).inc()
                self.metrics.db_up.set(0)
                self._db_ok = False
                log.warning("db_unavailable", error=str(exc).strip().splitlines()[0:1],
                            retry_in_s=round(backoff, 2),
                            meaning="nothing is acknowledged meanwhile; the broker keeps it")
                self._sleep(backoff)
                backoff = min(cap, backoff * 2) * random.uniform(0.8, 1.2)  # noqa: S311
                continue
            except psycopg.Error as exc:
                raise DatabaseError(
                    f"the database refused an operation that retrying will not fix: {exc}"
                    " (is the schema migrated and are the role's grants in place?)") from exc
            self._last_db_ok = time.monotonic()
            self.metrics.db_up.set(1)
            self._db_ok = True
            return result

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self._heartbeat = time.monotonic()
            if self._deadline is not None and time.monotonic() > self._deadline:
                raise _GaveUp
            if self._source.fatal is not None:
                raise self._source.fatal
            time.sleep(min(left, 0.1))

    def _release(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                self._pool.putconn(conn)
            except Exception:  # noqa: BLE001 - a broken connection is simply dropped
                log.debug("db_connection_dropped")


def install_signal_handlers(daemon: Daemon) -> None:
    """First SIGTERM/SIGINT: orderly shutdown. Second: exit at once."""
    def handle(signum: int, frame: FrameType | None) -> None:
        if daemon.stop.is_set():
            log.warning("bmsd_forced_exit", signal=signal.Signals(signum).name,
                        meaning="unacknowledged messages will be redelivered by the broker")
            os._exit(1)
        log.info("bmsd_stopping", signal=signal.Signals(signum).name)
        daemon.stop.set()

    def hangup(signum: int, frame: FrameType | None) -> None:
        daemon.reload.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGHUP, hangup)


def run(config: Config) -> int:
    """Run the daemon in this (main) thread; return its exit code."""
    daemon = Daemon(config)
    install_signal_handlers(daemon)
    return daemon.run()
