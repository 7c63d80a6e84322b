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

import gc
import threading
import time
from collections.abc import Callable

import structlog
from prometheus_client import CollectorRegistry

from bmsd import internals
from bmsd.alerts.engine import AlertEngine
from bmsd.alerts.rules import load_rules
from bmsd.config import Config
from bmsd.config_text import redact_url
from bmsd.database import Database
from bmsd.errors import BmsdError
from bmsd.ingest.health import HealthServer
from bmsd.ingest.housekeeping import AlertHousekeeping
from bmsd.ingest.inbox import Inbox
from bmsd.ingest.ingestor import Ingestor
from bmsd.ingest.intake import Intake
from bmsd.ingest.lock import InstanceLock
from bmsd.ingest.mqtt import Message, MqttSource
from bmsd.ingest.notices import MqttPublisher
from bmsd.ingest.notify import Notifier
from bmsd.ingest.periodic import Periodic, run_due
from bmsd.ingest.policies import PolicyHealth
from bmsd.ingest.progress import Progress
from bmsd.ingest.signals import Signals, start_watching
from bmsd.ingest.sparkplug_link import SparkplugLink
from bmsd.metrics import Metrics
from bmsd.schema.migrate import require_current_schema

log = structlog.get_logger("bmsd")

_IDLE_PING_S = 10.0
_ALIVE_WITHIN_S = 60.0
_STATUS_EVERY_S = 5.0
# How often a bmsd standing by for the Sparkplug host tries its lock (and the host
# checks it still holds it).
_CLAIM_EVERY_S = 2.0
# Before READY=1, how often to look for the SUBACK and update STATUS.
_STARTING_STATUS_EVERY_S = 0.1
# At exit, how long alert notifications of the last commits may take to be
# acknowledged (a few ms normally); unresolved ones are announced again at start.
_NOTICES_AT_EXIT_S = 2.0


class _GaveUp(Exception):
    """The shutdown deadline passed while the database was failing."""


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
        self._alerts = _alert_engine(config, self.metrics, self._publish)
        # Sparkplug B ([sparkplug] enabled): a connection of its own into the same inbox.
        self._sparkplug = None if not config.sparkplug.enabled else SparkplugLink(
            config.mqtt, config.sparkplug, self._inbox.put, self.metrics, config.database)
        self._ingest = Ingestor(config, self.metrics, ack=self._ack, alerts=self._alerts,
                                command=self._sparkplug.send if self._sparkplug else None)
        self._source = MqttSource(config.mqtt, self._ingest.filters, self._inbox.put,
                                  self.metrics)
        self._notices = _notices(config, self.metrics) if self._alerts is not None else None
        self._db = Database(config.database, self.metrics, sleep=self._sleep,
                            on_change=self._sparkplug.online if self._sparkplug else None)
        self._policies = PolicyHealth(config.database)
        self.metrics.registry.register(self._policies)
        self.metrics.instance.info({"client_id": config.mqtt.client_id,
                                    "shared_group": config.mqtt.shared_group or ""})
        # Read at each scrape, so it tells the truth while the loop is stuck:
        # what is in the batch and what waits in the queue before it.
        self.metrics.inflight.set_function(lambda: self._ingest.pending + self._inbox.qsize())
        self.metrics.inbox_bytes.set_function(lambda: self._inbox.bytes)
        self._lock = InstanceLock(config.database, config.mqtt.client_id)
        self._progress = Progress(self.notifier)
        self._intake = Intake(self._inbox, self._ingest, self._db, self._lock, self._progress,
                              self.notifier, self.metrics)
        self._housekeeping = None if self._alerts is None else AlertHousekeeping(
            self._alerts, config.alerts, self._intake.aside, self.notifier, self._notices)
        self._heartbeat = time.monotonic()
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
        progress = self._progress
        if not ready and progress.waiting_for:
            details["waiting_for"] = (self._backlog_line()
                                      if progress.draining and not subscribed
                                      else progress.waiting_for)
        return ready, details

    # --- running ------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; return the exit code."""
        self.http.start()
        log.info("bmsd_starting", database=redact_url(self.config.database.url),
                 broker=redact_url(self.config.mqtt.url), client_id=self.config.mqtt.client_id,
                 shared_group=self.config.mqtt.shared_group,
                 metrics=f"http://{self.config.metrics.addr}/metrics")
        internals.log_missing()
        start_watching(self.signals, self._begin_shutdown, self._intake.in_hand)
        try:
            self._start_up()
            self._loop()
            self._drain()
            return 0
        except _GaveUp:
            if self._intake.in_hand():
                log.warning("bmsd_shutdown_incomplete", unacknowledged=self._intake.in_hand(),
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
            if self._sparkplug is not None:
                self._sparkplug.close()
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
        self._db.run(require_current_schema)
        self._db.run(self._ingest.prepare)
        self._db.run(lambda conn: self._lock.acquire(on_wait=self._starting))
        if self._alerts is not None:
            self._db.run(self._alerts.load)
        self._starting("the MQTT subscription")
        if self._notices is not None:
            self._notices.start()
        if self._housekeeping is not None:
            self._housekeeping.republish()
        self._source.start()
        if self._sparkplug is not None:  # the Sparkplug host, or standing by for it
            self._sparkplug.claim(self._db.deadline.watch)

    def _check_subscribed(self) -> None:
        """Send READY=1 once the subscription is acknowledged; until then say what we wait
        for, and what we do meanwhile (a resumed session's backlog)."""
        progress = self._progress
        if self._source.subscribed.is_set():
            progress.ready = True
            progress.waiting_for = ""
            self.notifier.ready(self._status_line())
            self.notifier.progress()
            log.info("bmsd_ready", client_id=self.config.mqtt.client_id,
                     backlog_committed=progress.committed)
            return
        refused = self._source.refused
        if refused:
            progress.set_waiting(f"the MQTT subscription (the broker refused us: {refused})")
        elif progress.draining or self._intake.in_hand() or self._inbox.qsize():
            # Logged once; STATUS and /readyz carry the counts as they grow.
            progress.draining = True
            progress.set_waiting("the MQTT subscription (draining a backlog first)",
                                 status=self._backlog_line())
        else:
            progress.set_waiting("the MQTT subscription")

    def _backlog_line(self) -> str:
        return self._progress.backlog_line(self._intake.in_hand(), self._inbox.qsize())

    def _status_line(self) -> str:
        alerts = self._alerts.unresolved if self._alerts is not None else 0
        return self._progress.status_line(self._ingest.pending + self._inbox.qsize(), alerts)

    def _starting(self, what: str) -> None:
        """Say what start-up waits for; give up if a stop signal came meanwhile."""
        if self.stop.is_set():
            raise _GaveUp
        self._progress.set_waiting(what)

    def _begin_shutdown(self) -> None:
        """Stop the loop, and bound by the shutdown deadline whatever it is waiting on."""
        if self._deadline is None:
            self._deadline = time.monotonic() + self.config.ingest.shutdown_timeout_s
            self._db.deadline.cap = self._deadline
        self.stop.set()

    def _jobs(self) -> list[Periodic]:
        """The loop's periodic jobs: STATUS= (before READY=1: looking for the SUBACK),
        and the alert engine's housekeeping."""
        jobs: list[Periodic] = []
        if self._housekeeping is not None:
            source = self._source
            jobs += self._housekeeping.jobs(source.subscribed.is_set,
                                            lambda: source.subscribed_at)
        if self._ingest.sparkplug is not None and (link := self._sparkplug) is not None:
            jobs += [Periodic("sparkplug", 0.25, self._ingest.sparkplug.tick),  # seq gaps
                     Periodic("sparkplug_claim", _CLAIM_EVERY_S,
                              lambda: link.claim(self._db.deadline.watch))]
        return [*jobs, Periodic("status", lambda: _STATUS_EVERY_S if self._progress.ready
                                else _STARTING_STATUS_EVERY_S, self._status_tick)]

    def _status_tick(self) -> None:
        if self._progress.ready:
            self.notifier.status(self._status_line())
        else:  # READY=1 once the SUBACK is in; STATUS says what start-up waits for
            self._check_subscribed()

    def _loop(self) -> None:
        jobs = self._jobs()
        reloads = self.signals.reloads
        ping_every = min(_IDLE_PING_S, self.notifier.watchdog_interval_s or _IDLE_PING_S)
        while not self.stop.is_set():
            now = self._heartbeat = time.monotonic()
            if self._source.fatal is not None:
                raise self._source.fatal
            housekeeping = self._housekeeping
            if housekeeping is not None:
                if self.signals.reloads != reloads:
                    reloads = self.signals.reloads
                    housekeeping.reload(self._status_line)
                housekeeping.watch_backlog(self._ingest.window_flushes, self._inbox.qsize())
            run_due(jobs, now)
            self._intake.step(ping_every, self._holding)

    def _holding(self) -> bool:
        """Whether to take no readings now (too many alert notifications wait)."""
        return self._housekeeping is not None and self._housekeeping.notices_backlogged()

    def _drain(self) -> None:
        """Commit and acknowledge what is in hand, within the shutdown deadline."""
        self.notifier.stopping()
        self._source.stop_intake()
        if self._sparkplug is not None:  # edge nodes buffer from now on
            self._sparkplug.online(False)
            self._sparkplug.stop_intake()
        self._begin_shutdown()
        committed = self._intake.drain()
        if committed:
            log.info("bmsd_drained", committed_messages=committed)

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        if self._notices is not None:
            self._notices.publish(topic, payload, retain)

    def _ack(self, messages: list[Message]) -> int:
        return self._source.ack(messages)

    def _sleep(self, seconds: float) -> None:
        """Wait between database retries; stop waiting on shutdown or a fatal condition."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self._heartbeat = time.monotonic()
            if self._deadline is not None and (time.monotonic() > self._deadline
                                               or not self._intake.in_hand()):
                raise _GaveUp  # past the deadline, or nothing in hand to commit
            if self._source.fatal is not None:
                raise self._source.fatal
            time.sleep(min(left, 0.1))


def _alert_engine(config: Config, metrics: Metrics,
                  publish: Callable[[str, bytes, bool], None]) -> AlertEngine | None:
    """Return the alert engine the configuration asks for, if any."""
    if not config.alerts.enabled:
        return None
    return AlertEngine(load_rules(config.alerts.rules_file), metrics, publish=publish,
                       topic_prefix=config.alerts.mqtt_prefix or None,
                       offline_after_s={r.stream: r.offline_after_s for r in config.routes},
                       shared=config.mqtt.shared_group is not None,
                       reevaluate_window_s=config.alerts.reevaluate_window_s,
                       late_after_s=config.alerts.late_after_s)


def _notices(config: Config, metrics: Metrics) -> MqttPublisher | None:
    """Return the publisher of alert notifications (their own broker session), if any."""
    if not config.alerts.mqtt_prefix:
        return None
    broker = (config.mqtt.model_copy(update={"url": config.alerts.mqtt_url})
              if config.alerts.mqtt_url else config.mqtt)
    return MqttPublisher(broker, metrics)


#: Allocations between the collector's young-generation passes (CPython: 700).
GC_YOUNG_THRESHOLD = 10_000


def settle_collector() -> None:
    """Tune the cyclic garbage collector for the ingest loop; call once, after start-up.

    A batch holds its rows (objects the collector tracks) until it commits,
    so they survive young passes and fill the old generation, whose full
    passes would then walk every object imported at start-up too. Freezing
    what exists now takes the start-up objects out of every later pass, and
    rarer young passes promote fewer rows. Reference counting still frees the
    rows themselves at each commit, so memory stays bounded.
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
