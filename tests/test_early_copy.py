"""A batch's rows go to the database while it fills (the writer's early COPY).

Whatever happens before the commit - a reading already stored, one the
database refuses, a new device to look up, another statement on the
connection, a lost connection - every reading is stored exactly once and the
messages are acknowledged only after the commit.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry

from bmsd.batch import Batch, Origin, Row
from bmsd.config_load import load_config
from bmsd.ingest.daemon import Daemon
from bmsd.ingest.ingestor import Ingestor
from bmsd.ingest.mqtt import Message
from bmsd.ingest.writer import Outcome
from bmsd.metrics import Metrics

START = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


class Harness:
    """An ingestor on its own connection, as the daemon's main loop drives it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.acked: list[int] = []
        self.ingestor = Ingestor(load_config(None, {"BMSD_DATABASE_URL": url}),
                                 Metrics(CollectorRegistry()), ack=self._ack)
        self.conn = psycopg.connect(url, autocommit=True)
        self.ingestor.prepare(self.conn)
        self._mid = 0

    def _ack(self, messages: list[Message]) -> int:
        self.acked.extend(m.mid for m in messages)
        return len(messages)

    def accept(self, device: str, first: int, count: int = 10,
               extra: dict[str, Any] | None = None) -> None:
        readings = [{"timestamp": (START + timedelta(seconds=first + i)).isoformat(),
                     "power_kw": float(first + i), **(extra or {})} for i in range(count)]
        self._mid += 1
        self.last = Message(0, self._mid, 1, f"factory/f1/{device}/energy",
                            json.dumps(readings).encode(), datetime.now(UTC))
        self.ingestor.accept(self.conn, self.last)

    def reconnect_and_retry(self) -> None:
        """Do what `Database.run` does after a transient error: a new connection, the
        same message again."""
        self.conn = psycopg.connect(self.url, autocommit=True)
        self.ingestor.accept(self.conn, self.last)

    def copying(self) -> bool:
        """Whether this connection's session is running a COPY now (seen from another)."""
        with psycopg.connect(self.url, autocommit=True) as other:
            row = other.execute("SELECT state, query FROM pg_stat_activity WHERE pid = %s",
                                (self.conn.info.backend_pid,)).fetchone()
        return row is not None and row[0] == "active" and row[1].startswith("COPY")

    def flush(self) -> Outcome:
        return self.ingestor.flush(self.conn)


@pytest.fixture
def harness(db_url: str) -> Iterator[Harness]:
    h = Harness(db_url)
    h.accept("m1", 0)  # the devices are known: no lookup ends a batch's early COPY
    h.accept("m2", 0)
    h.flush()
    yield h
    h.conn.close()


def stored(db: psycopg.Connection[Any]) -> list[tuple[str, float]]:
    return db.execute("SELECT d.slug, e.power_kw FROM energy_readings e"
                      " JOIN devices d ON d.id = e.device_id ORDER BY 1, 2").fetchall()


def expected(*parts: tuple[str, int, int]) -> list[tuple[str, float]]:
    return sorted((device, float(v)) for device, first, count in parts
                  for v in range(first, first + count))


def test_a_batch_is_stored_while_it_fills_and_seen_at_its_commit(
        harness: Harness, db: psycopg.Connection[Any]) -> None:
    harness.accept("m1", 100)
    harness.accept("m2", 100)
    assert harness.copying(), "the rows were not sent before the commit"
    assert stored(db) == expected(("m1", 0, 10), ("m2", 0, 10)), "seen before the commit"
    assert harness.acked == [1, 2]
    outcome = harness.flush()
    assert outcome.written["energy_readings"] == 20
    assert stored(db) == expected(("m1", 0, 10), ("m2", 0, 10), ("m1", 100, 10),
                                  ("m2", 100, 10))
    assert harness.acked == [1, 2, 3, 4]


def test_readings_already_stored_are_counted_as_duplicates_once(
        harness: Harness, db: psycopg.Connection[Any]) -> None:
    harness.accept("m1", 0)  # redelivered: stored by the first batch
    harness.accept("m1", 5)  # half of it stored, half new
    assert harness.copying()
    outcome = harness.flush()
    assert outcome.written["energy_readings"] == 5
    assert outcome.duplicates["energy_readings"] == 15
    assert stored(db) == expected(("m1", 0, 15), ("m2", 0, 10))


def test_a_reading_the_database_refuses_is_dead_lettered_alone(
        harness: Harness, db: psycopg.Connection[Any]) -> None:
    harness.accept("m1", 100)
    harness.accept("m2", 100, count=1, extra={"note": "a NUL \u0000 jsonb cannot hold"})
    harness.accept("m2", 200)
    outcome = harness.flush()
    assert [d.category for d in outcome.dead] == ["database"]
    assert stored(db) == expected(("m1", 0, 10), ("m2", 0, 10), ("m1", 100, 10),
                                  ("m2", 200, 10))
    assert harness.acked == [1, 2, 3, 4, 5]


def test_a_new_device_and_a_statement_aside_mid_batch_lose_nothing(
        harness: Harness, db: psycopg.Connection[Any]) -> None:
    harness.accept("m1", 100)
    harness.accept("m3", 100)  # unknown: looked up (and registered) mid-batch
    harness.accept("m1", 200)
    harness.ingestor.release()
    assert harness.conn.execute("SELECT 1").fetchone() == (1,)
    harness.accept("m2", 100)
    harness.flush()
    assert stored(db) == expected(("m1", 0, 10), ("m2", 0, 10), ("m1", 100, 10),
                                  ("m3", 100, 10), ("m1", 200, 10), ("m2", 100, 10))


def test_a_connection_lost_mid_batch_loses_nothing(
        harness: Harness, db: psycopg.Connection[Any]) -> None:
    harness.accept("m1", 100)
    assert harness.copying()
    db.execute("SELECT pg_terminate_backend(%s)", (harness.conn.info.backend_pid,))
    harness.accept("m2", 100, count=2000)  # libpq reports a failed write at the next read
    with pytest.raises(psycopg.OperationalError):
        harness.flush()
    assert harness.acked == [1, 2]
    harness.conn = psycopg.connect(harness.url, autocommit=True)  # as Database.run retries
    outcome = harness.flush()
    assert outcome.written["energy_readings"] == 2010
    assert stored(db) == expected(("m1", 0, 10), ("m2", 0, 10), ("m1", 100, 10),
                                  ("m2", 100, 2000))
    assert harness.acked == [1, 2, 3, 4]


def test_a_batch_that_cannot_begin_leaves_the_message_to_be_tried_again(
        harness: Harness, db: psycopg.Connection[Any]) -> None:
    db.execute("SELECT pg_terminate_backend(%s)", (harness.conn.info.backend_pid,))
    with pytest.raises(psycopg.OperationalError):  # transient: Database.run tries it again
        harness.accept("m1", 100)
    harness.reconnect_and_retry()
    outcome = harness.flush()
    assert outcome.written["energy_readings"] == 10
    assert not outcome.duplicates, "the failed attempt left its rows in the batch"
    assert stored(db) == expected(("m1", 0, 10), ("m2", 0, 10), ("m1", 100, 10))
    assert harness.acked == [1, 2, 3]


def test_the_rows_sent_early_are_those_the_batch_takes() -> None:
    origin = Origin("factory/f1/m1/energy", "factory/+/+/energy", b"{}", None, START)

    def row(device: int, second: int, power: float) -> Row:
        return Row((START + timedelta(seconds=second), device, power, None, None, None, None,
                    None, None), origin)

    def refuse(rows: list[Row]) -> None:
        raise psycopg.OperationalError("the connection was lost")

    batch = Batch()
    batch.add_by_key("energy_readings", [row(1, 0, 1.0), row(1, 1, 1.0)])
    for message in ([row(1, 2, 1.0)], [row(1, 1, 1.0)], [row(2, 0, 1.0), row(2, 1, 1.0)],
                    [row(2, 1, 7.0)],  # against a row added by time alone, unindexed
                    [row(1, 0, 9.0), row(1, 3, 1.0), row(1, 3, 2.0), row(1, 4, 1.0)],
                    [row(3, 0, 1.0), row(3, 0, 1.0)], [row(3, 2, 1.0), row(3, 1, 1.0)]):
        before = (list(batch.rows["energy_readings"]), list(batch.dead),
                  Counter(batch.duplicates), batch.largest, batch.newest("energy_readings"))
        with pytest.raises(psycopg.OperationalError):
            batch.add_message("energy_readings", message, refuse)
        assert (batch.rows["energy_readings"], batch.dead, batch.duplicates, batch.largest,
                batch.newest("energy_readings")) == before, "a failed send changed the batch"
        sent: list[Row] = []
        batch.add_message("energy_readings", message, sent.extend)
        assert sent == batch.rows["energy_readings"][len(before[0]):]
        assert batch.largest == max(len(batch.rows[s]) for s in batch.rows)
    held = batch.rows["energy_readings"]
    assert [r.key for r in held] == [
        (1, START), (1, START + timedelta(seconds=1)), (1, START + timedelta(seconds=2)),
        (2, START), (2, START + timedelta(seconds=1)),
        (1, START + timedelta(seconds=3)), (1, START + timedelta(seconds=4)),
        (3, START), (3, START + timedelta(seconds=2)), (3, START + timedelta(seconds=1))]
    assert len(batch.dead) == 3  # (2, 1) and (1, 0) resent with other values; (1, 3) twice
    assert batch.duplicates["energy_readings"] == 2  # (1, 1) resent as it was; (3, 0) twice


def test_a_batch_finds_repeats_among_a_devices_interleaved_runs_of_readings() -> None:
    # A gateway's live readings and its backlog after an outage, interleaved; then
    # readings in the gaps between them, beyond MAX_SPANS runs, and repeats of each.
    origin = Origin("factory/f1/m1/energy", "factory/+/+/energy", b"{}", None, START)
    batch = Batch()

    def take(power: float, *seconds: int) -> None:
        batch.add_message("energy_readings", [
            Row((START + timedelta(seconds=s), 1, power, None, None, None, None, None, None),
                origin) for s in seconds], lambda rows: None)

    for seconds in ([100, 101], [0, 1], [102], [2, 3], [50], *([s] for s in range(-2, -22, -2))):
        take(1.0, *seconds)
    held = {r.key[1] - START: r for r in batch.rows["energy_readings"]}
    assert len(held) == 18
    assert not batch.dead
    assert not batch.duplicates
    for seconds in ([102], [1], [3, 4], [49, 51], [101, 103],
                    *([s] for s in range(-2, -22, -2))):
        take(1.0, *seconds)  # some again
    take(2.0, 102)  # another value: refused
    take(1.0, 40, 30)  # new, out of order
    take(1.0, 40)
    added = [r.key[1] - START for r in batch.rows["energy_readings"]][18:]
    assert added == [timedelta(seconds=s) for s in (4, 49, 51, 103, 40, 30)]
    assert batch.duplicates["energy_readings"] == 15  # 102, 1, 3, 101, 40, the ten below 0
    assert [d.category for d in batch.dead] == ["duplicate_conflict"]
    assert batch.newest("energy_readings") == {1: START + timedelta(seconds=103)}


def test_a_batch_keeps_each_devices_newest_reading_and_when_it_was_last_heard() -> None:
    # The alert engine reads `newest` instead of every row of a stream no rule reads.
    origin = Origin("factory/f1/m1/energy", "factory/+/+/energy", b"{}", None, START)

    def take(stream: str, device: int, *times: datetime) -> None:
        batch.add_message(stream, [Row((when, device), origin) for when in times],
                          lambda rows: None)
        batch.note_seen(device, max(times), heard)

    batch = Batch()
    heard = START + timedelta(minutes=5)
    take("energy_readings", 1, START + timedelta(seconds=20))
    take("energy_readings", 1, START + timedelta(seconds=10))  # a late message
    take("energy_readings", 2, heard, heard + timedelta(seconds=1))
    take("battery_telemetry", 1, START + timedelta(seconds=30), START)  # out of order
    assert batch.newest("energy_readings") == {1: START + timedelta(seconds=20),
                                                2: heard + timedelta(seconds=1)}
    assert batch.newest("battery_telemetry") == {1: START + timedelta(seconds=30)}
    assert batch.seen == {1: heard, 2: heard + timedelta(seconds=1)}


def test_a_run_of_waiting_messages_is_retried_from_the_one_the_database_failed_on(
        db_url: str, db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon accepts what waits in its inbox in one `Database.run`; a lost
    connection mid-run retries the message it failed on, not those before it."""
    daemon = Daemon(load_config(None, {"BMSD_DATABASE_URL": db_url,
                                       "BMSD_METRICS_ADDR": "127.0.0.1:0"}))
    acked: list[int] = []

    def ack(messages: list[Message]) -> int:
        acked.extend(m.mid for m in messages)
        return len(messages)

    monkeypatch.setattr(daemon._source, "ack", ack)
    accepted: list[int] = []
    accept = daemon._ingest.accept

    def failing_once(conn: psycopg.Connection[Any], message: Message) -> None:
        accepted.append(message.mid)
        if accepted.count(3) == 1 and message.mid == 3:
            conn.close()
            raise psycopg.OperationalError("the connection was lost")
        accept(conn, message)

    monkeypatch.setattr(daemon._ingest, "accept", failing_once)
    daemon._db.run(daemon._ingest.prepare)
    for mid in range(1, 6):
        readings = [{"timestamp": (START + timedelta(seconds=10 * mid + i)).isoformat(),
                     "power_kw": float(10 * mid + i)} for i in range(10)]
        daemon._inbox.put(Message(0, mid, 1, "factory/f1/m1/energy",
                                  json.dumps(readings).encode(), datetime.now(UTC)))
    while daemon._inbox.qsize():
        daemon._intake.accept_waiting(daemon._inbox.get_nowait())
        if daemon._ingest.due():
            daemon._intake.flush()
    daemon._intake.flush()
    daemon._db.close()
    daemon.http._server.server_close()
    assert accepted == [1, 2, 3, 3, 4, 5]
    assert sorted(acked) == [1, 2, 3, 4, 5]
    assert stored(db) == expected(("m1", 10, 50))
