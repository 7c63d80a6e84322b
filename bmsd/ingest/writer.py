"""Write a batch of readings to the hypertables in one transaction.

The fast path is one binary COPY per hypertable. Site readings go, where
sql/190 ran (community edition), to ``site_telemetry_scaled`` as integers
at each field's resolution (``SiteTelemetry.digits``), rounded here. A
reading that is already stored (redelivered after a crash) makes COPY fail
with a unique violation, which aborts it; that hypertable's rows are then
written again through a temporary staging table with INSERT ... ON CONFLICT
DO NOTHING, and every row that was not inserted is compared with the stored
one: the same values count as a duplicate, different values are
dead-lettered. A row the database refuses for its data (a NUL character, a
failed check, a value out of range) is isolated by bisecting the rows and
dead-lettered alone. Each attempt runs in a savepoint, so the rest of the
batch is unaffected.

While a batch fills, its rows are sent early (`EarlyCopy`): the batch's
transaction begins with its first message, and a COPY into that message's
hypertable takes each new message's rows as they are accepted, so that
PostgreSQL, a process of its own, stores them while the next messages are
parsed; the commit then only ends that COPY. It is an optimization only: on
any trouble it is rolled back and the commit writes the whole batch as above.

Everything - rows, dead letters, ``devices.last_seen_at``, the days late
readings fell on (``aggregate_backlog``, which a database job refreshes in
the continuous aggregates), and the alert changes they cause - commits
together or not at all, in the transaction the ingestor opens; only after
the commit are the messages acknowledged.
"""

from __future__ import annotations

import contextlib
import struct
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cache
from typing import Any

import psycopg
from psycopg import sql
from psycopg.abc import Buffer
from psycopg.adapt import Dumper
from psycopg.pq import Format
from psycopg.types.json import Jsonb

from bmsd.batch import Batch, DeadLetter, Row, conflict
from bmsd.errors import DatabaseError
from bmsd.streams import NAMES, SPECS

_COLUMN_TYPES = """
    SELECT a.attname, format_type(a.atttypid, a.atttypmod)
      FROM pg_attribute a
     WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
       AND a.attgenerated = ''
"""
# First in every batch transaction: the batch's devices, in one order for every
# writer, so that members of a shared group take turns per device (and the
# alert engine reads what the previous turn committed) without deadlocks.
_LOCK_DEVICES = "SELECT id FROM devices WHERE id = ANY(%s) ORDER BY id FOR NO KEY UPDATE"
_SEEN = """
    UPDATE devices d SET last_seen_at = v.seen
      FROM unnest(%s::integer[], %s::timestamptz[]) AS v (id, seen)
     WHERE d.id = v.id AND (d.last_seen_at IS NULL OR d.last_seen_at < v.seen)
"""
_BACKLOG = """
    INSERT INTO aggregate_backlog (hypertable, day)
    SELECT * FROM unnest(%s::text[], %s::date[])
    ON CONFLICT (hypertable, day)
    DO UPDATE SET version = aggregate_backlog.version + 1, noted_at = now()
"""
_DEAD_LETTER_COPY = (
    "COPY ingest_rejects (received_at, topic, route, reason, payload, details)"
    " FROM STDIN (FORMAT BINARY)"
)
_DEAD_LETTER_TYPES = ["timestamptz", "text", "text", "text", "bytea", "jsonb"]
# Which of a batch's redelivered dead letters are stored already, by place (from 1):
# the same topic, payload, verdict and place in the message, within the time the
# broker keeps a session (a redelivery cannot be older). The topic's index bounds it.
_ALREADY_DEAD = """
    SELECT d.n FROM unnest(%s::text[], %s::bytea[], %s::text[], %s::jsonb[])
                    WITH ORDINALITY AS d (topic, payload, reason, details, n)
     WHERE EXISTS (SELECT 1 FROM ingest_rejects r
                    WHERE r.topic = d.topic AND r.received_at > now() - %s::interval
                      AND r.payload = d.payload AND r.reason = d.reason
                      AND r.details = d.details)
"""


@dataclass
class Outcome:
    """What a committed batch did."""

    written: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    dead: list[DeadLetter] = field(default_factory=list)


# Errors caused by a row's data (SQLSTATE classes 22 and 23): isolate the row
# rather than retry the batch. Anything else is the database's trouble, not
# the data's, and the whole batch is retried.
_DATA_ERRORS = (psycopg.errors.DataError, psycopg.errors.IntegrityError)
_INTEGERS = ("integer", "bigint")


def _scaler(columns: Sequence[str], digits: Mapping[str, int]) -> tuple[int | None, ...]:
    """Return each column's factor to its stored integer (None: stored as is)."""
    return tuple(10 ** digits[c] if c in digits else None for c in columns)


def _scaled(values: tuple[Any, ...], factors: tuple[int | None, ...]) -> tuple[Any, ...]:
    # round() of the product, not int(): 400.1 * 10 is 4000.9999999999995.
    return tuple(v if f is None or v is None else round(v * f)
                 for v, f in zip(values, factors, strict=True))


class Float8ArrayDumper(Dumper):
    """Binary ``double precision[]`` from a list of floats in one struct call.

    psycopg's general array dumper handles any element type and nesting; at a
    battery pack's two 16-cell arrays per reading it took most of COPY's time.
    A list holding None (our models never send one) is packed element by element.
    """

    format = Format.BINARY
    oid = 1022  # float8[]

    def dump(self, obj: Any) -> Buffer:
        n = len(obj)
        if not n:
            return _EMPTY_FLOAT8_ARRAY
        if None in obj:
            body = b"".join(_NULL if v is None else _FLOAT8.pack(8, v) for v in obj)
            return _ARRAY_HEAD.pack(1, 1, 701, n, 1) + body
        return _float8_array(n).pack(1, 0, 701, n, 1, *[x for v in obj for x in (8, v)])


_ARRAY_HEAD = struct.Struct(">iiIii")  # ndim, has nulls, element oid, length, lower bound
_FLOAT8 = struct.Struct(">id")  # element length, value
_NULL = struct.pack(">i", -1)
_EMPTY_FLOAT8_ARRAY = struct.pack(">iiI", 0, 0, 701)


@cache
def _float8_array(n: int) -> struct.Struct:
    return struct.Struct(_ARRAY_HEAD.format + "id" * n)


class _Abandoned(Exception):
    """Why an early COPY was ended: the server rolls it back."""


@dataclass
class EarlyCopy:
    """A batch's open transaction and its COPY of one stream's rows (see the module).

    *sent* rows of the batch's *stream*, the first ones it holds, are in it,
    or in *waiting*: rows are written to the COPY a few hundred at a time, as
    one call per message cost single readings more than the overlap gained.
    """

    conn: psycopg.Connection[Any]
    transaction: contextlib.AbstractContextManager[Any]  # conn.transaction(), entered
    copy: psycopg.Copy
    stream: str
    sent: int = 0
    waiting: list[Row] = field(default_factory=list)


#: Rows gathered before they are written to an early COPY.
EARLY_CHUNK = 250


class Writer:
    """Write batches to the hypertables; one instance per daemon."""

    def __init__(self, redelivered_within: timedelta = timedelta(days=7)) -> None:
        #: How old a redelivered message's first delivery can be: the broker's session expiry.
        self.redelivered_within = redelivered_within
        self._columns: dict[str, list[str]] = {}
        self._types: dict[str, list[str]] = {}
        self._factors: dict[str, tuple[int | None, ...] | None] = {}
        #: The hypertable each stream is written to (a scaled one where it exists).
        self.tables: dict[str, str] = {s: s for s in NAMES}
        self._backlog = False  # aggregate_backlog exists (community edition)
        self._early: EarlyCopy | None = None
        self._early_off = False  # abandoned in this batch: the rest waits for the commit
        self._committing: EarlyCopy | None = None  # the early COPY `transaction` ended

    def send(self, conn: psycopg.Connection[Any], stream: str, rows: list[Row]) -> None:
        """Send a message's new *rows* of *stream* (`Batch.fresh`) ahead of the commit.

        Call it before the batch takes the rows. What cannot be sent is written
        at the commit; a lost connection raises (a transient error: the caller
        reconnects and tries the message again).
        """
        early = self._early
        if early is None:
            if self._early_off or not rows or not self._columns:
                return
            early = self._begin_early(conn, stream)
            if early is None:
                return
        elif early.stream != stream or early.conn is not conn:
            return
        early.sent += len(rows)
        waiting = early.waiting
        waiting += rows
        if len(waiting) >= EARLY_CHUNK:
            try:
                self._copy_rows(early.copy, stream, waiting)
            except Exception as exc:  # whatever it was, the commit starts over
                self.abandon(exc)
                if conn.broken:
                    raise
                return
            waiting.clear()

    def _begin_early(self, conn: psycopg.Connection[Any], stream: str) -> EarlyCopy | None:
        transaction = conn.transaction()
        try:
            transaction.__enter__()
        except psycopg.Error:
            self._early_off = True
            if conn.broken:
                raise
            return None
        try:
            cur = conn.cursor()
            cur.adapters.register_dumper(None, Float8ArrayDumper)
            # psycopg's public copy() holds the connection's lock until the COPY
            # ends; between messages the lock must be free, so that a statement
            # sent by mistake fails (and the connection is reset) instead of
            # waiting forever for it.
            conn.wait(cur._start_copy_gen(self._copy_statement(
                sql.Identifier(self.tables[stream]), stream)))
            copy = psycopg.Copy(cur)
            copy.set_types(self._types[stream])
        except Exception as exc:
            self._early_off = True
            with contextlib.suppress(psycopg.Error):
                transaction.__exit__(type(exc), exc, exc.__traceback__)
            if conn.broken:
                raise
            return None
        self._early = EarlyCopy(conn, transaction, copy, stream)
        return self._early

    def abandon(self, reason: BaseException | None = None) -> None:
        """Roll back the early COPY, freeing the connection for other statements;
        the batch's rows are all written at its commit."""
        early, self._early = self._early, None
        if early is None:
            return
        self._early_off = True
        exc = reason or _Abandoned("the connection is needed for another statement")
        with contextlib.suppress(psycopg.Error):
            early.copy.finish(exc)
        with contextlib.suppress(psycopg.Error):
            early.transaction.__exit__(type(exc), exc, exc.__traceback__)

    @contextlib.contextmanager
    def transaction(self, conn: psycopg.Connection[Any]) -> Iterator[None]:
        """The batch's transaction: the early COPY's, ended here, or a new one."""
        early, self._early = self._early, None
        self._early_off = False
        if early is not None and early.conn is conn:
            try:
                self._copy_rows(early.copy, early.stream, early.waiting)
                early.copy.finish(None)
            except Exception as exc:  # noqa: BLE001 - a row already stored, a value refused, ...
                early.transaction.__exit__(type(exc), exc, exc.__traceback__)
                early = None
        else:
            early = None  # from a connection since lost: the server rolled it back
        if early is None:
            with conn.transaction():
                yield
            return
        self._committing = early
        try:
            yield
        except BaseException:
            early.transaction.__exit__(*sys.exc_info())
            raise
        else:
            early.transaction.__exit__(None, None, None)
        finally:
            self._committing = None

    def prepare(self, conn: psycopg.Connection[Any]) -> None:
        """Read the hypertables' column types; check they hold every payload field."""
        for spec in SPECS:
            stream = table = spec.name
            scaled = spec.scaled_table
            if scaled:
                with conn.transaction():
                    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (scaled,)).fetchone()
                table = scaled if row and row[0] else stream
            wanted = ["time", "device_id", *spec.model.columns, "extra"]
            try:
                with conn.transaction():
                    found = dict(conn.execute(_COLUMN_TYPES, (table,)).fetchall())
            except psycopg.errors.UndefinedTable as exc:
                raise DatabaseError(
                    f"table {table} does not exist: run `bmsd migrate` first") from exc
            missing = [c for c in wanted if c not in found]
            floats = [c for c in spec.model.digits
                      if table == scaled and found.get(c) not in _INTEGERS]
            if missing or floats:
                raise DatabaseError(f"table {table} lacks {'' if missing else 'integer '}columns"
                                    f" {', '.join(missing or floats)}:"
                                    " run `bmsd migrate` with this version's sql/")
            self._columns[stream] = wanted
            self._types[stream] = [found[c] for c in wanted]
            self._factors[stream] = _scaler(wanted, spec.model.digits) if table == scaled else None
            self.tables[stream] = table
        with conn.transaction():
            row = conn.execute("SELECT to_regclass('aggregate_backlog') IS NOT NULL").fetchone()
        self._backlog = bool(row and row[0])

    def write(self, conn: psycopg.Connection[Any], batch: Batch,
              retry: bool = False) -> Outcome:
        """Write *batch* in the caller's transaction (each attempt in a savepoint).

        *retry*: an earlier attempt of this batch may have committed (its COMMIT's
        answer was lost), so its dead letters may be stored already.
        """
        if not self._columns:
            self.prepare(conn)
        outcome = Outcome()
        outcome.duplicates.update(batch.duplicates)
        if batch.seen:
            conn.execute(_LOCK_DEVICES, (sorted(batch.seen),))
        early = self._committing
        for stream, rows in batch.rows.items():
            if early is not None and early.stream == stream:
                outcome.written[stream] += early.sent
                rows = rows[early.sent:]
            if rows:
                self._write(conn, stream, rows, outcome)
        dead = batch.dead + outcome.dead
        if dead:
            self._dead_letter(conn, dead, retry)
        if batch.seen:
            conn.execute(_SEEN, (list(batch.seen), list(batch.seen.values())))
        if batch.late and self._backlog:
            late = sorted(batch.late)  # one lock order for every writer
            conn.execute(_BACKLOG, ([t for t, _ in late], [d for _, d in late]))
        outcome.dead = dead
        return outcome

    def _write(self, conn: psycopg.Connection[Any], stream: str, rows: list[Row],
               outcome: Outcome) -> None:
        try:
            with conn.transaction():
                self._copy(conn, sql.Identifier(self.tables[stream]), stream, rows)
        except psycopg.errors.UniqueViolation:
            self._write_staged(conn, stream, rows, outcome)
        except _DATA_ERRORS as exc:
            self._isolate(conn, stream, rows, outcome, exc)
        else:
            outcome.written[stream] += len(rows)

    def _copy_statement(self, table: sql.Identifier, stream: str) -> sql.Composed:
        columns = sql.SQL(", ").join(map(sql.Identifier, self._columns[stream]))
        return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(table, columns)

    def _copy(self, conn: psycopg.Connection[Any], table: sql.Identifier, stream: str,
              rows: list[Row]) -> None:
        with conn.cursor() as cur:
            cur.adapters.register_dumper(None, Float8ArrayDumper)
            with cur.copy(self._copy_statement(table, stream)) as copy:
                copy.set_types(self._types[stream])
                self._copy_rows(copy, stream, rows)

    def _copy_rows(self, copy: psycopg.Copy, stream: str, rows: list[Row]) -> None:
        # The COPY's types are set, so the extra fields' dict is dumped as jsonb
        # by the column's type: the row goes as it is, no tuple built per row.
        factors = self._factors[stream]
        write = copy.write_row
        if factors is None:
            for row in rows:
                write(row.values)
        else:
            for row in rows:
                write(_scaled(row.values, factors))

    def _write_staged(self, conn: psycopg.Connection[Any], stream: str, rows: list[Row],
                      outcome: Outcome) -> None:
        stage = sql.Identifier(f"bmsd_stage_{stream}")
        target = sql.Identifier(self.tables[stream])
        names = self._columns[stream]
        columns = sql.SQL(", ").join(map(sql.Identifier, names))
        try:
            with conn.transaction():
                conn.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {})"
                                     " ON COMMIT DELETE ROWS").format(stage, target))
                conn.execute(sql.SQL("TRUNCATE {}").format(stage))
                self._copy(conn, stage, stream, rows)
                inserted = conn.execute(sql.SQL(
                    "INSERT INTO {t} ({c}) SELECT {c} FROM {s} ON CONFLICT DO NOTHING"
                    " RETURNING device_id").format(t=target, c=columns, s=stage)).fetchall()
                differing = conn.execute(sql.SQL(
                    "SELECT s.device_id, s.time FROM {s} s JOIN {t} t"
                    " ON t.device_id = s.device_id AND t.time = s.time"
                    " WHERE ROW({sc}) IS DISTINCT FROM ROW({tc})").format(
                    s=stage, t=target,
                    sc=sql.SQL(", ").join(sql.Identifier("s", n) for n in names),
                    tc=sql.SQL(", ").join(sql.Identifier("t", n) for n in names),
                )).fetchall()
        except _DATA_ERRORS as exc:
            self._isolate(conn, stream, rows, outcome, exc)
            return
        by_key = {r.key: r for r in rows}
        for device_id, when in differing:
            row = by_key[(device_id, when)]
            outcome.dead.append(row.dead("duplicate_conflict", conflict(when)))
        outcome.written[stream] += len(inserted)
        outcome.duplicates[stream] += len(rows) - len(inserted) - len(differing)

    def _isolate(self, conn: psycopg.Connection[Any], stream: str, rows: list[Row],
                 outcome: Outcome, exc: Exception) -> None:
        if len(rows) == 1:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            state = getattr(exc, "sqlstate", None)
            reason = f"the database refused this reading: {message}"
            if state:
                reason += f" (SQLSTATE {state})"
            outcome.dead.append(rows[0].dead("database", reason))
            return
        middle = len(rows) // 2
        self._write(conn, stream, rows[:middle], outcome)
        self._write(conn, stream, rows[middle:], outcome)

    def _dead_letter(self, conn: psycopg.Connection[Any], dead: list[DeadLetter],
                     retry: bool) -> None:
        rows = [(o.received_at, _text(o.topic), o.route, _text(letter.reason), o.payload,
                 Jsonb({"category": letter.category} if o.index is None
                       else {"category": letter.category, "index": o.index}))
                for letter in dead for o in (letter.origin,)]
        again = [i for i, letter in enumerate(dead) if retry or letter.origin.redelivered]
        if again:
            # A retry after a lost COMMIT answer, or a redelivery of a message whose
            # dead letter committed before its acknowledgement was lost (a crash, a
            # dropped connection): each stored once.
            stored = conn.execute(_ALREADY_DEAD, (
                [rows[i][1] for i in again], [rows[i][4] for i in again],
                [rows[i][3] for i in again], [rows[i][5] for i in again],
                self.redelivered_within)).fetchall()
            skip = {again[n - 1] for (n,) in stored}
            rows = [row for i, row in enumerate(rows) if i not in skip]
        with conn.cursor() as cur, cur.copy(_DEAD_LETTER_COPY) as copy:
            copy.set_types(_DEAD_LETTER_TYPES)
            for row in rows:
                copy.write_row(row)


def _text(value: str) -> str:
    # PostgreSQL text cannot hold NUL; a dead letter must never fail to store.
    return value.replace("\x00", "\\u0000")
