"""Read the alert state from the database, and write plans inside the caller's transaction.

Alert changes commit with the readings that caused them, or not at all:
`AlertStore.write` runs in the batch's transaction, which the ingestor owns.
A restart resumes where the last commit left: each device's high-water mark
per stream is its newest stored reading (every stored reading was evaluated
in the transaction that stored it), read at start; ``alert_marks`` holds the
pending ``for_s`` conditions, written when they change, and the marks that
members of a shared group write with every batch for each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from bmsd.alerts.history import Fetched
from bmsd.alerts.rules import SAFETY_LIMITS
from bmsd.alerts.state import Alert, DeviceInfo, Plan, State
from bmsd.errors import DatabaseError
from bmsd.streams import SPECS

_DEVICES = """
    SELECT d.id, d.site_id, s.slug AS site, d.slug, d.kind, s.nominal_grid_frequency_hz
      FROM devices d JOIN sites s ON s.id = d.site_id WHERE d.id = ANY(%s)
"""
_LIMITS = f"""
    SELECT DISTINCT ON (device_id) device_id, {", ".join(SAFETY_LIMITS)}
      FROM safety_constraints
     WHERE active AND effective_from <= now()
       AND (effective_until IS NULL OR effective_until > now())
     ORDER BY device_id, effective_from DESC
"""
_ALERT_COLUMNS = """
    SELECT a.id, a.device_id, a.rule_code, a.severity, a.category, a.title, a.message, a.value,
           a.threshold, a.triggered_at, a.status, a.resolved_at, a.raised_at, a.raised_late
      FROM alerts a"""
_OPEN_ALERTS = _ALERT_COLUMNS + " WHERE a.status <> 'resolved'"
# What a device's history is compared with (bmsd/alerts/history.py).
_HISTORY_ALERTS = _ALERT_COLUMNS + """
     WHERE a.device_id = ANY(%s) AND a.rule_code <> 'DEVICE_OFFLINE'
       AND (a.resolved_at IS NULL OR a.resolved_at >= %s)
"""
# Each device's stored readings from back_s before its last reading before
# start (none since floor: from start), with the fields the rules read.
_HISTORY_READINGS = """
    SELECT w.device_id, b.last - make_interval(secs => w.back_s), r.*
      FROM unnest(%s::integer[], %s::timestamptz[], %s::timestamptz[], %s::float8[])
           AS w (device_id, start, floor, back_s)
     CROSS JOIN LATERAL (SELECT (SELECT p.time FROM {table} p
                                  WHERE p.device_id = w.device_id AND p.time < w.start
                                    AND p.time >= w.floor
                                  ORDER BY p.time DESC LIMIT 1) AS last) b
     CROSS JOIN LATERAL (
           SELECT t.time, t.device_id{fields} FROM {table} t
            WHERE t.device_id = w.device_id
              AND t.time >= coalesce(b.last - make_interval(secs => w.back_s), w.start)
            ORDER BY t.time) r
"""
_MARKS = "SELECT device_id, stream, evaluated_until, pending FROM alert_marks"
# Each device's latest alert change (bmsd/alerts/evaluate.py: a late reading before
# it may change the device's history).
_CHANGED = """
    SELECT device_id, max(greatest(coalesce(raised_at, triggered_at), resolved_at))
      FROM alerts WHERE rule_code <> 'DEVICE_OFFLINE'{only} GROUP BY device_id
"""
_LAST_SEEN = "SELECT id, last_seen_at FROM devices WHERE last_seen_at IS NOT NULL"
# Each device's newest stored reading of a stream: one backward index scan of
# the newest chunk that has the device (as the latest_* views, sql/050).
_NEWEST = """
    SELECT ds.device_id, r.time FROM device_streams ds
     CROSS JOIN LATERAL (SELECT t.time FROM {table} t WHERE t.device_id = ds.device_id
                          ORDER BY t.time DESC LIMIT 1) r
     WHERE ds.stream = %s
"""
# Another member of a shared group may have committed since: read a batch's
# devices again, after the writer locked their rows.
_OPEN_ALERTS_OF = _OPEN_ALERTS + " AND a.device_id = ANY(%s)"
_MARKS_OF = _MARKS + " WHERE device_id = ANY(%s)"
_LAST_SEEN_OF = ("SELECT id, last_seen_at FROM devices"
                 " WHERE id = ANY(%s) AND last_seen_at IS NOT NULL")
# One member of a shared group runs the offline check at a time.
_OFFLINE_TURN = "SELECT pg_try_advisory_xact_lock(hashtext('bmsd-offline-check'))"
_INSERT_ALERT = """
    INSERT INTO alerts (site_id, device_id, rule_code, severity, category, title, message,
                        value, threshold, triggered_at, status, resolved_at, raised_at,
                        raised_late)
    VALUES (%(site_id)s, %(device_id)s, %(code)s, %(severity)s, %(category)s, %(title)s,
            %(message)s, %(value)s, %(threshold)s, %(at)s, %(status)s, %(resolved_at)s,
            %(raised_at)s, %(raised_late)s)
    RETURNING id
"""
_RESOLVE_ALERT = """
    UPDATE alerts SET status = 'resolved', resolved_at = %(at)s
     WHERE id = %(id)s AND status <> 'resolved'
"""
_REVISE_ALERT = """
    UPDATE alerts SET status = %(status)s, resolved_at = %(resolved_at)s,
                      raised_at = %(raised_at)s, value = %(value)s,
                      threshold = %(threshold)s, message = %(message)s
     WHERE id = %(id)s
"""
_WITHDRAW_ALERT = "DELETE FROM alerts WHERE id = %s"
_EVENT = """
    INSERT INTO events (time, site_id, device_id, kind, message, details)
    VALUES (%(at)s, %(site_id)s, %(device_id)s, %(kind)s, %(message)s, %(details)s)
"""
_UPSERT_MARKS = """
    INSERT INTO alert_marks (device_id, stream, evaluated_until, pending)
    SELECT * FROM unnest(%s::integer[], %s::text[], %s::timestamptz[], %s::jsonb[])
    ON CONFLICT (device_id, stream) DO UPDATE
       SET evaluated_until = excluded.evaluated_until, pending = excluded.pending
"""


class AlertStore:
    """The alert tables: read into a `State`, written from a `Plan`."""

    def load(self, conn: psycopg.Connection[Any]) -> State:
        """Return the committed state (at start)."""
        state = State()
        with conn.transaction():
            state.safety_limits = self.safety_limits(conn)
            self._read(conn, state, _OPEN_ALERTS, _MARKS, ())
            state.last_seen = dict(conn.execute(_LAST_SEEN).fetchall())
            state.changed = dict(conn.execute(_CHANGED.format(only="")).fetchall())
            for spec in SPECS:
                query = sql.SQL(_NEWEST).format(table=sql.Identifier(spec.name))
                for device_id, newest in conn.execute(query, (spec.name,)):
                    _raise_mark(state, (device_id, spec.name), newest)
        return state

    def refresh(self, conn: psycopg.Connection[Any], state: State, ids: Iterable[int]) -> None:
        """Replace what *state* knows of devices *ids* with what is committed.

        For members of a shared group, in the batch's transaction after the
        writer locked the devices' rows: another member may have raised,
        resolved or moved a mark for them since this one last looked.
        """
        wanted = sorted(set(ids))
        if not wanted:
            return
        chosen = set(wanted)
        # A mark only moves forward: the one known here (read at start from
        # the stored readings, or this member's own) stands unless later.
        known = {k: state.marks.pop(k) for k in [k for k in state.marks if k[0] in chosen]}
        for table in (state.open, state.pending):
            for key in [k for k in table if k[0] in chosen]:
                del table[key]
        self._read(conn, state, _OPEN_ALERTS_OF, _MARKS_OF, (wanted,))
        for key, mark in known.items():
            _raise_mark(state, key, mark)
        state.last_seen.update(conn.execute(_LAST_SEEN_OF, (wanted,)).fetchall())
        state.changed.update(conn.execute(_CHANGED.format(only=" AND device_id = ANY(%s)"),
                                          (wanted,)).fetchall())

    def offline_turn(self, conn: psycopg.Connection[Any], state: State) -> bool:
        """Return whether this member runs the offline check now, and if so read
        every device's last reading and open alerts as committed by all members."""
        row = conn.execute(_OFFLINE_TURN).fetchone()
        if not (row and row[0]):
            return False
        state.open.clear()
        state.last_seen = dict(conn.execute(_LAST_SEEN).fetchall())
        with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            self._open(conn, state, cur.execute(_OPEN_ALERTS).fetchall())
        return True

    def _read(self, conn: psycopg.Connection[Any], state: State, open_sql: str,
              marks_sql: str, params: tuple[Any, ...]) -> None:
        with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            self._open(conn, state, cur.execute(open_sql, params).fetchall())
            for r in cur.execute(marks_sql, params):
                key = (r["device_id"], r["stream"])
                state.marks[key] = r["evaluated_until"]
                state.pending[key] = {
                    code: (datetime.fromisoformat(p["since"]), float(p["value"]))
                    for code, p in (r["pending"] or {}).items()}

    def _open(self, conn: psycopg.Connection[Any], state: State,
              rows: list[dict[str, Any]]) -> None:
        for alert in self.alerts_of(conn, state, rows):
            state.open[(alert.device.id, alert.code)] = alert

    def alerts_of(self, conn: psycopg.Connection[Any], state: State,
                  rows: list[dict[str, Any]]) -> list[Alert]:
        """Return stored alert *rows* as alerts, their devices known to *state*."""
        self.remember_devices(conn, state, {int(r["device_id"]) for r in rows})
        return [Alert(state.devices[r["device_id"]], r["rule_code"], r["severity"],
                      r["category"], r["title"] or r["rule_code"], r["message"], r["value"],
                      r["threshold"], r["triggered_at"], id=r["id"], status=r["status"],
                      resolved_at=r["resolved_at"], raised_at=r["raised_at"],
                      raised_late=r["raised_late"]) for r in rows]

    def history(self, conn: psycopg.Connection[Any], state: State) -> StoredHistory:
        """Return the stored history as bmsd/alerts/history.py reads it, in the caller's
        transaction (which sees the batch's own readings)."""
        return StoredHistory(self, conn, state)

    def safety_limits(self, conn: psycopg.Connection[Any]) -> dict[int, dict[str, float]]:
        """Return the active per-device safety limits."""
        with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            return {int(row["device_id"]): {name: float(row[name]) for name in SAFETY_LIMITS
                                            if row[name] is not None}
                    for row in cur.execute(_LIMITS)}

    def remember_devices(self, conn: psycopg.Connection[Any], state: State,
                         ids: Iterable[int]) -> None:
        """Read the devices of *ids* that *state* does not know yet."""
        missing = [i for i in ids if i not in state.devices]
        if missing:
            with conn.cursor(row_factory=class_row(DeviceInfo)) as cur:
                for device in cur.execute(_DEVICES, (missing,)):
                    state.devices[device.id] = device

    def write(self, conn: psycopg.Connection[Any], plan: Plan,
              marks: Iterable[tuple[int, str]] | None = None) -> None:
        """Write *plan* in the caller's transaction; new alerts get their ids. *marks*:
        the (device, stream) marks and pending conditions to store (default: all
        the plan's)."""
        # What ends an unresolved alert first (at most one unresolved alert per
        # device and rule may exist): a batch may clear an alert and raise the
        # same rule again, a late reading replace one alert by another.
        for alert in plan.withdrawn:
            conn.execute(_WITHDRAW_ALERT, (alert.id,))
            self._event(conn, alert, "alert_withdrawn", alert.triggered_at, alert.document())
        ending = [a for a in plan.revised if a.resolved_at is not None]
        for alert in ending:
            self._revise(conn, alert)
        for alert in plan.resolved:
            if alert.id is None:  # raised and cleared within this batch, or its history
                self._insert(conn, alert)
            else:
                conn.execute(_RESOLVE_ALERT, {"id": alert.id, "at": alert.resolved_at})
            self._event(conn, alert, "alert_resolved", alert.resolved_at or alert.triggered_at)
        for alert in plan.triggered:
            self._insert(conn, alert)
        for alert in plan.revised:
            if alert.resolved_at is None:
                self._revise(conn, alert)
        keys = list(plan.marks if marks is None else marks)
        if keys:
            conn.execute(_UPSERT_MARKS, (
                [k[0] for k in keys], [k[1] for k in keys], [plan.marks[k] for k in keys],
                [Jsonb({code: {"since": since.isoformat(), "value": value}
                        for code, (since, value) in plan.pending.get(k, {}).items()})
                 for k in keys]))

    def _insert(self, conn: psycopg.Connection[Any], alert: Alert) -> None:
        row = conn.execute(_INSERT_ALERT, {
            "site_id": alert.device.site_id, "device_id": alert.device.id,
            "code": alert.code, "severity": alert.severity, "category": alert.category,
            "title": alert.title, "message": alert.message, "value": alert.value,
            "threshold": alert.threshold, "at": alert.triggered_at, "status": alert.status,
            "resolved_at": alert.resolved_at, "raised_at": alert.raised,
            "raised_late": alert.raised_late}).fetchone()
        if row is None:  # INSERT ... RETURNING always returns its row
            raise DatabaseError(f"inserting alert {alert.code} returned no id")
        alert.id = int(row[0])
        self._event(conn, alert, "alert_triggered", alert.raised)

    def _revise(self, conn: psycopg.Connection[Any], alert: Alert) -> None:
        conn.execute(_REVISE_ALERT, {
            "id": alert.id, "status": alert.status, "resolved_at": alert.resolved_at,
            "raised_at": alert.raised, "value": alert.value, "threshold": alert.threshold,
            "message": alert.message})
        self._event(conn, alert, "alert_revised", alert.resolved_at or alert.raised,
                    alert.document())

    def _event(self, conn: psycopg.Connection[Any], alert: Alert, kind: str,
               at: datetime, document: dict[str, Any] | None = None) -> None:
        verb = kind.removeprefix("alert_").replace("triggered", "raised")
        details: dict[str, Any] = {"alert_id": alert.id, "rule_code": alert.code,
                   "severity": alert.severity, "value": alert.value}
        if document is not None:
            details["alert"] = document
        conn.execute(_EVENT, {
            "at": at, "site_id": alert.device.site_id, "device_id": alert.device.id,
            "kind": kind, "message": f"{alert.code} {verb}: {alert.message}",
            "details": Jsonb(details)})


class StoredHistory:
    """The stored readings and alerts a device's history is evaluated again from
    (the `Source` of bmsd/alerts/history.py)."""

    def __init__(self, store: AlertStore, conn: psycopg.Connection[Any], state: State) -> None:
        self._store, self._conn, self._state = store, conn, state

    def readings(self, stream: str, fields: Sequence[str],
                 wanted: Mapping[int, tuple[datetime, datetime, float]]) -> dict[int, Fetched]:
        query = sql.SQL(_HISTORY_READINGS).format(
            table=sql.Identifier(stream),
            fields=sql.SQL("").join(sql.SQL(", t.") + sql.Identifier(f) for f in fields))
        ids = list(wanted)
        out: dict[int, tuple[list[Any], datetime | None]] = {i: ([], None) for i in ids}
        with self._conn.cursor() as cur:
            for device_id, since, *row in cur.execute(query, (
                    ids, [wanted[i][0] for i in ids], [wanted[i][1] for i in ids],
                    [wanted[i][2] for i in ids])):
                out[device_id] = (out[device_id][0], since)
                out[device_id][0].append(row)
        return {i: Fetched(rows, since) for i, (rows, since) in out.items()}

    def alerts(self, device_ids: Sequence[int], since: datetime) -> list[Alert]:
        with self._conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            rows = cur.execute(_HISTORY_ALERTS, (list(device_ids), since)).fetchall()
        return self._store.alerts_of(self._conn, self._state, rows)


def _raise_mark(state: State, key: tuple[int, str], mark: datetime) -> None:
    """Move *state*'s mark of *key* to *mark* if that is later."""
    known = state.marks.get(key)
    if known is None or mark > known:
        state.marks[key] = mark
