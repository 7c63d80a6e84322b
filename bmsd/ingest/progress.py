"""What start-up waits for and what ingest has done: for STATUS=, /readyz and logs."""

from __future__ import annotations

import time

import structlog

from bmsd.ingest.notify import Notifier

log = structlog.get_logger("bmsd")


class Progress:
    """The daemon's account of itself: what it waits for, and what it committed."""

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier
        self.waiting_for = "the database"
        self.ready = False  # READY=1 sent: the subscription was acknowledged
        self.draining = False  # taking a resumed session's queue before the SUBACK
        self.committed = 0  # messages committed since start
        self.rows = 0  # rows committed since start
        self.last_commit: float | None = None
        self.started = time.monotonic()

    def commit(self, messages: int, rows: int) -> None:
        self.committed += messages
        self.rows += rows
        self.last_commit = time.monotonic()

    def set_waiting(self, what: str, status: str | None = None) -> None:
        """Say what start-up waits for: logged when it changes, in STATUS= always."""
        if what != self.waiting_for:
            self.waiting_for = what
            log.info("bmsd_waiting", waiting_for=what)
        self._notifier.status(status or f"starting: waiting for {what}")

    def backlog_line(self, in_hand: int, waiting: int) -> str:
        """Return what a drain before the SUBACK has done so far, for STATUS and /readyz."""
        return (f"starting: draining a backlog of {self.committed + in_hand}"
                f" messages so far ({self.committed} committed,"
                f" {in_hand + waiting} in hand); the broker sends the"
                " session's queue before it acknowledges the subscription")

    def status_line(self, waiting: int, unresolved_alerts: int) -> str:
        """Return the one line `systemctl status` shows."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        since = ("no commit yet" if self.last_commit is None
                 else f"last commit {time.monotonic() - self.last_commit:.0f} s ago")
        return (f"ingesting: {self.rows / elapsed:.0f} rows/s since start,"
                f" {waiting} messages waiting, {since}, {unresolved_alerts} unresolved alerts")
