"""The ingest step the daemon's loop repeats: messages from the inbox into the
batch, a due batch into the database, a ping while idle.

One `Database.run` takes a run of messages, not one each (its deadline watch
and retry frame cost a single-reading message a tenth of its time). A
database error retries from the message it failed on: those before it are
in the batch already.
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg

from bmsd.database import Database
from bmsd.ingest.inbox import Inbox
from bmsd.ingest.ingestor import Ingestor
from bmsd.ingest.lock import InstanceLock
from bmsd.ingest.mqtt import Message
from bmsd.ingest.notify import Notifier
from bmsd.ingest.progress import Progress
from bmsd.metrics import Metrics

T = TypeVar("T")


class Intake:
    """The inbox, the batch and the database, as the loop drives them."""

    def __init__(self, inbox: Inbox, ingest: Ingestor, db: Database, lock: InstanceLock,
                 progress: Progress, notifier: Notifier, metrics: Metrics) -> None:
        self._inbox = inbox
        self._ingest = ingest
        self._db = db
        self._lock = lock
        self._progress = progress
        self._notifier = notifier
        self._metrics = metrics
        self.accepting: Message | None = None  # taken from the inbox, not yet in the batch

    def in_hand(self) -> int:
        """Return how many received messages wait for a commit (the batch's, and the one
        being added to it)."""
        return self._ingest.pending + (self.accepting is not None)

    def step(self, ping_every: float, hold: Callable[[], bool]) -> None:
        """Take what waits (or wait for it), commit a batch that is due, or ping while idle;
        while *hold* says so, take nothing (the readings wait at the broker)."""
        ingest = self._ingest
        # A batch held here found the inbox empty while it was too young to
        # commit: wait for its idle age, the flush interval or a message.
        wait = min(max(ingest.seconds_to_due(idle=True), 0.001), 0.5)
        message = None
        if hold():
            time.sleep(min(wait, 0.05))
        else:
            with contextlib.suppress(queue.Empty):
                message = self._inbox.get(timeout=wait)
        idle = True if message is None else self.accept_waiting(message)
        if ingest.due(idle):
            self.flush()
        elif not ingest.pending and time.monotonic() - self._db.last_ok > ping_every:
            self.aside(self._ping)
            self._notifier.progress()

    def accept_waiting(self, message: Message) -> bool:
        """Add *message* to the batch, then what already waits in the inbox, until the
        batch is due; return whether the inbox ran empty."""
        def accept_run(conn: psycopg.Connection[Any]) -> bool:
            nonlocal message
            while True:
                self.accepting = message  # in hand while a database error has it tried again
                self._ingest.accept(conn, message)
                self.accepting = None
                if self._ingest.due():
                    return False
                try:
                    message = self._inbox.get_nowait()
                except queue.Empty:
                    return True

        return self._db.run(accept_run)

    def flush(self) -> None:
        """Commit the batch; say so to systemd (before READY=1: extend the start)."""
        messages = self._ingest.pending
        outcome = self._db.run(self._ingest.flush)
        self._progress.commit(messages, sum(outcome.written.values()))
        self._metrics.last_commit.set(time.time())
        if self._progress.ready:
            self._notifier.progress()
        else:  # a drain before the SUBACK: progress, not a start that hangs
            self._notifier.extend_start()

    def drain(self) -> int:
        """Take and commit everything in the inbox and in hand; return how many
        messages the last commit held (0: nothing was left)."""
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
            self.accept_waiting(message)
            if self._ingest.due():
                self.flush()
        pending = self._ingest.pending
        if pending:
            self.flush()
        return pending

    def aside(self, action: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run a statement that is not the batch's: its early COPY gives way first."""
        self._ingest.release()
        return self._db.run(action)

    def _ping(self, conn: psycopg.Connection[Any]) -> None:
        """Check the database while idle, and that we still hold our instance lock."""
        conn.execute("SELECT 1")
        lock_conn = self._lock.connection
        with self._db.deadline.watch(lock_conn) if lock_conn else contextlib.nullcontext():
            self._lock.check()
