"""Store a batch's dead letters in ``ingest_rejects``, each once.

A dead letter keeps the message as it was sent (topic, payload), where it
came in (route, time received) and why it was refused (reason, category, its
place in the message). A retry after a lost COMMIT answer, or a redelivery
of a message whose dead letter committed before its acknowledgement was
lost (a crash, a dropped connection), finds it stored already and stores it
no second time.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, NamedTuple

import psycopg
from psycopg.types.json import Jsonb

from bmsd.batch import DeadLetter

_COPY = ("COPY ingest_rejects (received_at, topic, route, reason, payload, details)"
         " FROM STDIN (FORMAT BINARY)")
_TYPES = ["timestamptz", "text", "text", "text", "bytea", "jsonb"]
# Which of a batch's redelivered dead letters are stored already, by place (from 1):
# the same topic, payload, verdict and place in the message, within the time the
# broker keeps a session (a redelivery cannot be older). The topic's index bounds it.
_ALREADY_STORED = """
    SELECT d.n FROM unnest(%s::text[], %s::bytea[], %s::text[], %s::jsonb[])
                    WITH ORDINALITY AS d (topic, payload, reason, details, n)
     WHERE EXISTS (SELECT 1 FROM ingest_rejects r
                    WHERE r.topic = d.topic AND r.received_at > now() - %s::interval
                      AND r.payload = d.payload AND r.reason = d.reason
                      AND r.details = d.details)
"""


class _Rejected(NamedTuple):
    """One ``ingest_rejects`` row, in the COPY's column order."""

    received_at: datetime
    topic: str
    route: str | None
    reason: str
    payload: bytes
    details: Jsonb


def _row(letter: DeadLetter) -> _Rejected:
    origin = letter.origin
    details: dict[str, Any] = {"category": letter.category}
    if origin.index is not None:
        details["index"] = origin.index
    return _Rejected(origin.received_at, storable_text(origin.topic), origin.route,
                     storable_text(letter.reason), origin.payload, Jsonb(details))


def store(conn: psycopg.Connection[Any], dead: list[DeadLetter], *, retry: bool,
          redelivered_within: timedelta) -> None:
    """Store *dead*; *retry*: this batch may have committed before (its COMMIT's answer
    was lost), so every dead letter is looked for first, not only redelivered ones."""
    rows = [_row(letter) for letter in dead]
    again = [i for i, letter in enumerate(dead) if retry or letter.origin.redelivered]
    if again:
        stored = conn.execute(_ALREADY_STORED, (
            [rows[i].topic for i in again], [rows[i].payload for i in again],
            [rows[i].reason for i in again], [rows[i].details for i in again],
            redelivered_within)).fetchall()
        skip = {again[n - 1] for (n,) in stored}
        rows = [row for i, row in enumerate(rows) if i not in skip]
    with conn.cursor() as cur, cur.copy(_COPY) as copy:
        copy.set_types(_TYPES)
        for row in rows:
            copy.write_row(row)


def storable_text(value: str) -> str:
    """Return *value* as PostgreSQL text holds it: a NUL as the 6 characters \\u0000
    (a dead letter, or a Sparkplug metric, must never fail to store)."""
    return value.replace("\x00", "\\u0000") if "\x00" in value else value
