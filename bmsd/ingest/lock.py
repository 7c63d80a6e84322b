"""One bmsd per MQTT client id (and one Sparkplug host per host id): a session advisory
lock in the database.

Two daemons with the same client id would take the broker session from each
other in turn, each receiving part of the stream (Mosquitto closes the older
connection without telling it why). So before connecting to the broker, bmsd
takes an advisory lock named after its client id on a connection of its own,
and holds it while it runs.

A bmsd that died while the network to the database was down leaves its
session - and this lock - on the server until the server notices the peer
is gone. Every bmsd connection asks the server to probe within
`DatabaseConfig.dead_peer_bound_s` (bmsd/database.py), so a restarted bmsd
waits that long, and a little more, before it concludes that the holder is
alive; it then says what it knows of the holder, not what it guesses.

The Sparkplug host lock (bmsd/ingest/sparkplug_link.py) is the same kind of
lock, named after the STATE topic, taken without waiting (`try_take`): the
bmsd that holds it is the Sparkplug host, the others stand by and try again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row

from bmsd.config import DatabaseConfig
from bmsd.database import ADVISORY_NAMESPACE, connect_kwargs
from bmsd.errors import SessionTakenOver

_TRY_LOCK = "SELECT pg_try_advisory_lock(%s, hashtext(%s))"
# A two-key advisory lock shows its keys as classid and objid (an oid, so
# the signed hash is read back unsigned), with objsubid 2.
_HOLDER = """
    SELECT a.pid, host(a.client_addr) AS client_addr, a.application_name, a.state,
           a.state_change
      FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
       AND l.classid = %s AND l.objid::bigint = (hashtext(%s)::bigint & 4294967295)
"""
#: Beyond the server's own bound on a dead peer: time for its probes to run.
_MARGIN_S = 10.0


@dataclass(frozen=True, slots=True)
class Holder:
    """The session that holds the lock, as the server sees it."""

    pid: int
    client_addr: str | None
    application_name: str
    state: str | None
    state_change: datetime | None

    def describe(self) -> str:
        where = f"from {self.client_addr}" if self.client_addr else "over a local socket"
        since = f" since {self.state_change:%Y-%m-%d %H:%M:%S%z}" if self.state_change else ""
        return (f"server session {self.pid} {where} ({self.application_name or 'no name'},"
                f" {self.state or 'state unknown'}{since})")


class InstanceLock:
    """Hold the advisory lock of one client id for as long as we run."""

    def __init__(self, config: DatabaseConfig, client_id: str) -> None:
        self._config = config
        self._client_id = client_id
        self._conn: psycopg.Connection[Any] | None = None
        self._held_on: psycopg.Connection[Any] | None = None  # by `try_take`
        self.wait_s = config.dead_peer_bound_s + _MARGIN_S

    def acquire(self, on_wait: Callable[[str], None] | None = None) -> None:
        """Take the lock; raise SessionTakenOver if its holder outlives our wait.

        *on_wait* is told, about once a second, why we are still waiting.
        """
        deadline = time.monotonic() + self.wait_s
        while True:
            conn = self._conn
            if conn is None or conn.closed:
                # A failure to connect is the caller's to retry (Database.run).
                conn = self._conn = psycopg.connect(
                    self._config.url, autocommit=True,
                    **connect_kwargs(self._config, "bmsd-instance-lock"))
            row = conn.execute(_TRY_LOCK, (ADVISORY_NAMESPACE, self._client_id)).fetchone()
            if row is not None and row[0]:
                return
            with conn.cursor(row_factory=class_row(Holder)) as cur:
                holder = cur.execute(_HOLDER, (ADVISORY_NAMESPACE, self._client_id)).fetchone()
            if time.monotonic() > deadline:
                raise SessionTakenOver(
                    f"the instance lock of MQTT client id {self._client_id!r} is held by"
                    f" {holder.describe() if holder else 'a session that just ended'}, after"
                    f" waiting {self.wait_s:.0f} s, longer than this server takes to drop the"
                    " session of a bmsd that died ([database] keepalives_*). So it is most likely"
                    " another bmsd with this client id; two would steal the broker session from"
                    " each other. Stop it, or give this one its own [mqtt] client_id")
            if on_wait is not None:
                left = max(deadline - time.monotonic(), 0)
                on_wait(f"waiting up to {left:.0f} s for the instance lock of client id"
                        f" {self._client_id!r}, held by "
                        f"{holder.describe() if holder else 'a session that just ended'}")
            time.sleep(1.0)

    def try_take(self) -> Holder | None:
        """Take the lock if it is free, or keep it if ours: return None; else return its
        holder, at once. Failures to reach the database propagate (a lost session has
        lost the lock: the next call takes it again, if it is still free)."""
        conn = self._conn
        if conn is not None and not conn.closed and self._held_on is conn:
            conn.execute("SELECT 1")  # ours while its session lives
            return None
        if conn is None or conn.closed:
            conn = self._conn = psycopg.connect(
                self._config.url, autocommit=True,
                **connect_kwargs(self._config, "bmsd-instance-lock"))
        for _ in range(2):  # (its holder may let go between the two statements)
            row = conn.execute(_TRY_LOCK, (ADVISORY_NAMESPACE, self._client_id)).fetchone()
            if row is not None and row[0]:
                self._held_on = conn
                return None
            with conn.cursor(row_factory=class_row(Holder)) as cur:
                holder = cur.execute(_HOLDER, (ADVISORY_NAMESPACE, self._client_id)).fetchone()
            if holder is not None:
                return holder
        return Holder(0, None, "", "a session that just ended", None)

    @property
    def connection(self) -> psycopg.Connection[Any] | None:
        return self._conn

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
