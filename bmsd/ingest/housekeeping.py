"""The alert engine's housekeeping, apart from the readings it evaluates.

- **Republish** at start-up what is unresolved, before any new reading can
  change it: a crash between a commit and its publish loses no notification.
- **Reload** the rules on SIGHUP (`systemctl reload`); invalid new rules are
  refused and the old ones stay.
- **Safety limits**: re-read the devices' safety constraints every
  ``[alerts] limits_refresh_s``.
- **Offline**: look for silent devices every ``[alerts] offline_check_s``,
  once subscribed, counting silence only from after the last backlog seen
  (while a backlog drains every device would look silent).
- **Notices**: take no readings while too many alert notifications wait for
  the broker (``[alerts] max_pending_notifications``): the readings wait at
  the broker meanwhile, unacknowledged, so memory stays bounded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
import structlog

from bmsd.alerts.engine import AlertEngine
from bmsd.alerts.rules import load_rules
from bmsd.alerts.state import Plan
from bmsd.config import AlertsConfig
from bmsd.errors import ConfigError
from bmsd.ingest.notices import MqttPublisher
from bmsd.ingest.notify import Notifier
from bmsd.ingest.periodic import Periodic

T = TypeVar("T")
Aside = Callable[[Callable[[psycopg.Connection[Any]], T]], T]
log = structlog.get_logger("bmsd")


class AlertHousekeeping:
    """What the daemon does for its alert engine besides evaluating readings."""

    def __init__(self, engine: AlertEngine, config: AlertsConfig, aside: Aside[Any],
                 notifier: Notifier, notices: MqttPublisher | None) -> None:
        self.engine = engine
        self._config = config
        self._aside = aside
        self._notifier = notifier
        self._notices = notices
        self._backlog_seen = datetime.now(UTC)
        self._window_flushes = 0
        self._paused = False

    def republish(self) -> None:
        log.info("alerts_republished", count=self.engine.republish())

    def jobs(self, subscribed: Callable[[], bool],
             subscribed_at: Callable[[], datetime]) -> list[Periodic]:
        """Return the periodic jobs: the limits, and the offline check once subscribed."""
        return [
            Periodic("alert limits", self._config.limits_refresh_s, self.read_limits),
            Periodic("offline devices", self._config.offline_check_s,
                     lambda: self._offline(subscribed_at()), guard=subscribed),
        ]

    def watch_backlog(self, window_flushes: int, waiting: int) -> None:
        """Note a backlog draining (a full window flushed, messages waiting)."""
        if window_flushes != self._window_flushes or waiting > 0:
            self._window_flushes = window_flushes
            self._backlog_seen = datetime.now(UTC)

    def read_limits(self) -> None:
        self._aside(self._load_limits)

    def reload(self, status_line: Callable[[], str]) -> None:
        """Read the rules file again; keep the old rules if the new ones are invalid."""
        self._notifier.reloading()
        try:
            rules = load_rules(self._config.rules_file)
        except ConfigError as exc:
            log.error("alert_rules_refused", error=str(exc),
                      meaning="the new rules are invalid; the old ones stay in force")
        else:
            self.engine.set_rules(rules)
            self.read_limits()
            log.info("alert_rules_reloaded", rules=len(rules))
        self._notifier.ready(status_line())

    def notices_backlogged(self) -> bool:
        """Whether too many alert notifications wait for the broker to take readings."""
        pending = self._notices.pending if self._notices is not None else 0
        over = pending > self._config.max_pending_notifications
        if over != self._paused:
            self._paused = over
            if over:
                log.warning("alert_notifications_backlog", pending=pending,
                            meaning="taking no readings until the broker acknowledges more"
                                    " alert notifications ([alerts] max_pending_notifications)")
            else:
                log.info("alert_notifications_backlog_cleared")
        return over

    def _offline(self, subscribed_at: datetime) -> None:
        since = max(subscribed_at, self._backlog_seen)
        self.engine.apply(self._aside(functools.partial(self._plan_offline, since=since)))

    def _plan_offline(self, conn: psycopg.Connection[Any], since: datetime) -> Plan:
        with conn.transaction():
            return self.engine.plan_offline(conn, datetime.now(UTC), since)

    def _load_limits(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            self.engine.load_limits(conn)
