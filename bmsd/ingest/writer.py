"""Write a batch of readings to the hypertables in one transaction.

The fast path is one binary COPY per hypertable (bmsd/ingest/copy_format.py),
much of it sent while the batch fills (bmsd/ingest/early_copy.py). A reading
that is already stored (redelivered after a crash) makes COPY fail with a
unique violation, which aborts it; that hypertable's rows are then written
again through a temporary staging table with INSERT ... ON CONFLICT DO
NOTHING, and every row that was not inserted is compared with the stored
one: the same values count as a duplicate, different values are
dead-lettered. A row the database refuses for its data (a NUL character, a
failed check, a value out of range) is isolated by bisecting the rows and
dead-lettered alone; so is a Sparkplug metric of ``sparkplug_metrics``. Each
attempt runs in a savepoint, so the rest of the batch is unaffected.

Everything - rows, dead letters, ``devices.last_seen_at``, the days late
readings fell on (``aggregate_backlog``, which a database job refreshes in
the continuous aggregates), and the alert changes they cause - commits
together or not at all, in the transaction the ingestor opens; only after
the commit are the messages acknowledged.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql

from bmsd.batch import Batch, DeadLetter, Row, conflict
from bmsd.errors import DatabaseError
from bmsd.ingest.copy_format import (
    INTEGERS,
    Float8ArrayDumper,
    copy_statement,
    scaler,
    write_rows,
)
from bmsd.ingest.dead_letters import store
from bmsd.ingest.early_copy import EarlyCopy
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
# Sparkplug B (bmsd/ingest/sparkplug.py): metrics no map names, and births and
# deaths of edge nodes and devices.
_SPARKPLUG_METRICS = """
    INSERT INTO sparkplug_metrics (time, device_id, name, datatype, unit, value, value_text,
                                   value_json, historical)
    SELECT * FROM unnest(%s::timestamptz[], %s::integer[], %s::text[], %s::text[], %s::text[],
                         %s::float8[], %s::text[], %s::jsonb[], %s::boolean[])
    ON CONFLICT DO NOTHING
"""
_SPARKPLUG_NODES = """
    INSERT INTO sparkplug_nodes AS n (group_id, edge_node, device, device_id, online, bdseq,
                                      last_birth_at, last_death_at)
    SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::integer[], %s::boolean[],
                         %s::bigint[], %s::timestamptz[], %s::timestamptz[])
    ON CONFLICT (group_id, edge_node, device) DO UPDATE
       SET device_id = excluded.device_id, online = excluded.online, bdseq = excluded.bdseq,
           last_birth_at = coalesce(excluded.last_birth_at, n.last_birth_at),
           last_death_at = coalesce(excluded.last_death_at, n.last_death_at)
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
        """Send a message's new *rows* of *stream* (`Batch.new_rows`) ahead of the commit.

        Call it before the batch takes the rows. What cannot be sent is written
        at the commit; a lost connection raises (a transient error: the caller
        reconnects and tries the message again).
        """
        early = self._early
        if early is None:
            if self._early_off or not rows or not self._columns:
                return
            early = self._early = EarlyCopy.begin(
                conn, stream, copy_statement(sql.Identifier(self.tables[stream]),
                                             self._columns[stream]),
                self._types[stream], self._factors[stream])
            if early is None:
                self._early_off = True
                return
        elif early.stream != stream or early.conn is not conn:
            return
        try:
            early.add(rows)
        except Exception as exc:  # whatever it was, the commit starts over
            self.abandon(exc)
            if conn.broken:
                raise

    def abandon(self, reason: BaseException | None = None) -> None:
        """Roll back the early COPY, freeing the connection for other statements;
        the batch's rows are all written at its commit."""
        early, self._early = self._early, None
        if early is not None:
            self._early_off = True
            early.abandon(reason)

    @contextlib.contextmanager
    def transaction(self, conn: psycopg.Connection[Any]) -> Iterator[None]:
        """The batch's transaction: the early COPY's, ended here, or a new one."""
        early, self._early = self._early, None
        self._early_off = False
        # From a connection since lost, the server rolled it back.
        if early is None or early.conn is not conn or not early.finish():
            with conn.transaction():
                yield
            return
        self._committing = early
        try:
            with early.committing():
                yield
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
                      if table == scaled and found.get(c) not in INTEGERS]
            if missing or floats:
                raise DatabaseError(f"table {table} lacks {'' if missing else 'integer '}columns"
                                    f" {', '.join(missing or floats)}:"
                                    " run `bmsd migrate` with this version's sql/")
            self._columns[stream] = wanted
            self._types[stream] = [found[c] for c in wanted]
            self._factors[stream] = scaler(wanted, spec.model.digits) if table == scaled else None
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
        if batch.metrics:
            self._write_metrics(conn, batch.metrics, outcome)
        dead = batch.dead + outcome.dead
        if dead:
            store(conn, dead, retry=retry, redelivered_within=self.redelivered_within)
        if batch.seen:
            conn.execute(_SEEN, (list(batch.seen), list(batch.seen.values())))
        if batch.nodes:
            keys = sorted(batch.nodes)  # one lock order for every writer
            conn.execute(_SPARKPLUG_NODES, [list(c) for c in zip(
                *[(*key, *batch.nodes[key]) for key in keys], strict=True)])
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

    def _copy(self, conn: psycopg.Connection[Any], table: sql.Identifier, stream: str,
              rows: list[Row]) -> None:
        with conn.cursor() as cur:
            cur.adapters.register_dumper(None, Float8ArrayDumper)
            with cur.copy(copy_statement(table, self._columns[stream])) as copy:
                copy.set_types(self._types[stream])
                write_rows(copy, rows, self._factors[stream])

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

    def _write_metrics(self, conn: psycopg.Connection[Any], metrics: list[tuple[Any, ...]],
                       outcome: Outcome) -> None:
        """Insert sparkplug_metrics rows (each with its message last); a row the database
        refuses for its data is isolated, as readings are, and dead-lettered."""
        try:
            with conn.transaction():
                conn.execute(_SPARKPLUG_METRICS,
                             [list(c) for c in zip(*(m[:-1] for m in metrics), strict=True)])
        except _DATA_ERRORS as exc:
            if len(metrics) == 1:
                outcome.dead.append(DeadLetter(metrics[0][-1], "database", _refused(
                    exc, f"this message's metric {metrics[0][2]!r}")))
                return
            middle = len(metrics) // 2
            self._write_metrics(conn, metrics[:middle], outcome)
            self._write_metrics(conn, metrics[middle:], outcome)

    def _isolate(self, conn: psycopg.Connection[Any], stream: str, rows: list[Row],
                 outcome: Outcome, exc: Exception) -> None:
        if len(rows) == 1:
            outcome.dead.append(rows[0].dead("database", _refused(exc, "this reading")))
            return
        middle = len(rows) // 2
        self._write(conn, stream, rows[:middle], outcome)
        self._write(conn, stream, rows[middle:], outcome)


def _refused(exc: Exception, what: str) -> str:
    """Say that the database refused *what*, and why."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
    state = getattr(exc, "sqlstate", None)
    return f"the database refused {what}: {message}" + (f" (SQLSTATE {state})" if state else "")
