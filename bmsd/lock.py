"""One bmsd per MQTT client id: a session advisory lock in the database.

Two daemons with the same client id would take the broker session from each
other in turn, each receiving part of the stream (Mosquitto closes the older
connection without telling it why). So before connecting to the broker, bmsd
takes an advisory lock named after its client id on a connection of its own,
and holds it while it runs; a second instance stops with a message saying so.
"""

from __future__ import annotations

import time

import psycopg

from bmsd.errors import SessionTakenOver

# The lock's first key: bmsd's own namespace among advisory locks.
_NAMESPACE = 0x626D7364
_TRY_LOCK = "SELECT pg_try_advisory_lock(%s, hashtext(%s))"


class InstanceLock:
    """Hold the advisory lock of one client id for as long as we run."""

    def __init__(self, database_url: str, client_id: str, connect_timeout_s: int) -> None:
        self._url = database_url
        self._client_id = client_id
        self._timeout = connect_timeout_s
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None

    def acquire(self, wait_s: float = 10.0) -> None:
        """Take the lock; raise SessionTakenOver if another instance keeps it.

        Waits up to *wait_s* first: a predecessor killed a moment ago may not
        have been noticed by its server yet.
        """
        deadline = time.monotonic() + wait_s
        while True:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self._url, autocommit=True,
                                             connect_timeout=self._timeout,
                                             application_name="bmsd-instance-lock")
            row = self._conn.execute(_TRY_LOCK, (_NAMESPACE, self._client_id)).fetchone()
            if row is not None and row[0]:
                return
            if time.monotonic() > deadline:
                raise SessionTakenOver(
                    f"another bmsd with MQTT client id {self._client_id!r} is running against"
                    " this database; two instances would steal the broker session from each"
                    " other. Stop the other one, or give this one its own [mqtt] client_id")
            time.sleep(0.5)

    def check(self) -> None:
        """Re-take the lock if its connection was lost (a database restart)."""
        if self._conn is not None and not self._conn.closed:
            try:
                self._conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                self._conn.close()
        self.acquire()

    def release(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
