"""A batch's rows sent to PostgreSQL while the batch fills.

The batch's transaction begins with its first message, and a COPY into that
message's hypertable takes each new message's rows as they are accepted, so
that PostgreSQL, a process of its own, stores them while the next messages
are parsed; the commit then only ends that COPY. It is an optimization only:
on any trouble it is rolled back and the commit writes the whole batch.

`EarlyCopy` owns its transaction: it begins it (``BEGIN``), and ends it in
`committing` (``COMMIT``, or ``ROLLBACK`` when the block raises) or in
`abandon` (``ROLLBACK``). Its COPY is started through psycopg's COPY
generator (bmsd/internals.py, ``psycopg_copy_gen``): psycopg's public
``copy()`` holds the connection's lock until the COPY ends, and between
messages the lock must be free, so that a statement sent by mistake fails
(and the connection is reset) instead of waiting forever for it. Without
that generator there is no early COPY.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from bmsd import internals
from bmsd.batch import Row
from bmsd.ingest.copy_format import Float8ArrayDumper, write_rows

#: Rows gathered before they are written to the COPY: one call per message
#: cost single readings more than the overlap gained.
CHUNK = 250


class Abandoned(Exception):
    """Why an early COPY was ended: the server rolls it back."""


@dataclass
class EarlyCopy:
    """The open transaction of a batch and its COPY of one stream's rows.

    *sent* rows of the batch's *stream*, the first ones it holds, are in the
    COPY or in *waiting*.
    """

    conn: psycopg.Connection[Any]
    copy: psycopg.Copy
    stream: str
    factors: tuple[int | None, ...] | None
    sent: int = 0
    waiting: list[Row] = field(default_factory=list)

    @classmethod
    def begin(cls, conn: psycopg.Connection[Any], stream: str, statement: sql.Composed,
              types: list[str], factors: tuple[int | None, ...] | None) -> EarlyCopy | None:
        """Begin the transaction and its COPY; None where it cannot (the batch is then
        written at its commit). A lost connection raises."""
        if not internals.on("psycopg_copy_gen"):
            return None
        try:
            conn.execute("BEGIN")
        except psycopg.Error:
            if conn.broken:
                raise
            return None
        try:
            cur = conn.cursor()
            cur.adapters.register_dumper(None, Float8ArrayDumper)
            conn.wait(internals.start_copy(cur, statement))
            copy = psycopg.Copy(cur)
            copy.set_types(types)
        except Exception:
            _rollback(conn)
            if conn.broken:
                raise
            return None
        return cls(conn, copy, stream, factors)

    def add(self, rows: list[Row]) -> None:
        """Take a message's new rows; write them once CHUNK are waiting."""
        self.sent += len(rows)
        self.waiting += rows
        if len(self.waiting) >= CHUNK:
            write_rows(self.copy, self.waiting, self.factors)
            self.waiting.clear()

    def abandon(self, reason: BaseException | None = None) -> None:
        """End the COPY and roll the transaction back, freeing the connection."""
        with contextlib.suppress(psycopg.Error):
            self.copy.finish(reason or Abandoned("the connection is needed for another"
                                                 " statement"))
        _rollback(self.conn)

    def finish(self) -> bool:
        """End the COPY with its last rows; False if that failed (the transaction is
        then rolled back: the batch is written whole at the commit)."""
        try:
            write_rows(self.copy, self.waiting, self.factors)
            self.copy.finish(None)
        except Exception:  # noqa: BLE001 - a row already stored, a value refused, ...
            _rollback(self.conn)
            return False
        return True

    @contextlib.contextmanager
    def committing(self) -> Iterator[None]:
        """The rest of the batch's statements, in this transaction: committed if the
        block ends, rolled back if it raises. Call `finish` first."""
        try:
            yield
        except BaseException:
            _rollback(self.conn)
            raise
        self.conn.execute("COMMIT")


def _rollback(conn: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(psycopg.Error):
        conn.execute("ROLLBACK")
