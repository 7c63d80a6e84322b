"""Commit batches on a thread of their own while the ingest loop gathers the next.

The loop hands a full or due batch over (`Committer.submit`) and goes back
to parsing messages; the committer writes it in one transaction on its own
connection (`Database.run`: transient failures retried) and only after the
commit acknowledges its messages. One batch commits at a time, in the order
handed over, so acknowledgements leave in order, and at most two batches are
in hand: the one committing and the one gathered. While the database waits
on its disk, Python parses: the wait no longer adds to each message's cost.

An error the retries do not cure (a refused schema, the shutdown deadline)
ends the thread; the loop raises it at its next look (`check`), as it would
have raised it itself.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import psycopg

from bmsd.ingest.database import Database
from bmsd.ingest.ingestor import Held
from bmsd.ingest.writer import Outcome

#: How often a wait for the committer calls back (the loop's heartbeat, shutdown).
_TICK_S = 0.1


def _commit_on(commit: Callable[[psycopg.Connection[Any], Held], Outcome], held: Held,
               conn: psycopg.Connection[Any]) -> Outcome:
    return commit(conn, held)


class Committer:
    """Commit handed-over batches, one at a time, on a thread of their own.

    *done* is called on that thread after each commit (with its outcome) or
    after the error that ends it (with None).
    """

    def __init__(self, db: Database,
                 commit: Callable[[psycopg.Connection[Any], Held], Outcome],
                 done: Callable[[Held, Outcome | None], None]) -> None:
        self.db = db
        self._commit = commit
        self._done = done
        self._held: Held | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="bmsd-commit", daemon=True)
        self._thread.start()

    @property
    def holding(self) -> int:
        """Return how many messages the batch being committed acknowledges."""
        held = self._held
        return len(held.messages) if held is not None else 0

    @property
    def busy(self) -> bool:
        return self._held is not None

    def check(self) -> None:
        """Raise the error that ended the committer, if one did."""
        if self._error is not None:
            raise self._error

    def submit(self, held: Held, tick: Callable[[], None]) -> None:
        """Hand *held* over once the previous batch is committed; call *tick* while waiting."""
        self.wait(tick)
        with self._changed:
            self._held = held
            self._changed.notify_all()

    def wait(self, tick: Callable[[], None]) -> None:
        """Return once no batch is committing; call *tick* while waiting."""
        while True:
            self.check()
            with self._changed:
                if self._held is None:
                    return
                self._changed.wait(_TICK_S)
            tick()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _run(self) -> None:
        while True:
            with self._changed:
                while self._held is None and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                held = self._held
            assert held is not None
            try:
                outcome = self.db.run(functools.partial(_commit_on, self._commit, held))
            except BaseException as exc:  # noqa: BLE001 - the loop raises it (check)
                with self._changed:
                    self._error = exc
                    self._changed.notify_all()
                self._done(held, None)
                return
            with self._changed:
                self._held = None
                self._changed.notify_all()
            self._done(held, outcome)
