"""The writer's own binary dumper: the same bytes psycopg would send, read back the same."""

from __future__ import annotations

import math
from typing import Any

import psycopg
import pytest
from psycopg.pq import Format

from bmsd.ingest.copy_format import Float8ArrayDumper

ARRAYS = [[], [3.3], [3.3 + i / 1000 for i in range(16)], [1e308, -0.0, 5e-324, 2.0],
          [1.5, None, 2.5], [None], [math.inf, -math.inf], [3, 4.0]]


@pytest.mark.parametrize("values", ARRAYS, ids=repr)
def test_float8_arrays_are_dumped_as_psycopg_dumps_them(db: psycopg.Connection[Any],
                                                        values: list[float | None]) -> None:
    theirs = db.adapters.get_dumper_by_oid(Float8ArrayDumper.oid, Format.BINARY)
    ours = Float8ArrayDumper(list)
    assert bytes(ours.dump(values)) == bytes(theirs(list, db).dump(values))


def test_float8_arrays_read_back_equal(db: psycopg.Connection[Any]) -> None:
    db.execute("CREATE TEMP TABLE cells (n int, v double precision[])")
    with db.cursor() as cur:
        cur.adapters.register_dumper(None, Float8ArrayDumper)
        with cur.copy("COPY cells (n, v) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["integer", "double precision[]"])
            for n, values in enumerate(ARRAYS):
                copy.write_row((n, values))
    back = dict(db.execute("SELECT n, v FROM cells").fetchall())
    assert [back[n] for n in range(len(ARRAYS))] == [[float(v) if v is not None else None
                                                      for v in a] for a in ARRAYS]


def test_a_sparkplug_metric_the_database_refuses_is_dead_lettered_alone(
        db: psycopg.Connection[Any]) -> None:
    # Text with a NUL reaches the database only if something let it through; the
    # batch must commit all the same, that metric dead-lettered with its message.
    from datetime import UTC, datetime

    from bmsd.batch import Batch, Origin
    from bmsd.ingest.writer import Writer

    db.execute("INSERT INTO organizations (slug, name) VALUES ('o', 'o')")
    db.execute("INSERT INTO sites (organization_id, slug, name, kind, timezone)"
               " SELECT id, 's', 's', 'factory', 'UTC' FROM organizations")
    [(device,)] = db.execute("INSERT INTO devices (site_id, slug, kind) SELECT id, 'd',"
                             " 'sparkplug' FROM sites RETURNING id").fetchall()
    at = datetime(2026, 12, 1, tzinfo=UTC)
    origin = Origin("spBv1.0/g/NDATA/e", "sparkplug", b"\x12\x00", None, at)
    batch = Batch()
    batch.metrics += [(at, device, name, "String", None, None, text, None, False, origin)
                      for name, text in (("a", "ok"), ("b", "not\x00ok"), ("c", "ok"))]
    writer = Writer()
    with db.transaction():
        outcome = writer.write(db, batch)
    stored = db.execute("SELECT name, value_text FROM sparkplug_metrics ORDER BY 1").fetchall()
    assert stored == [("a", "ok"), ("c", "ok")]
    [dead] = outcome.dead
    assert (dead.origin, dead.category) == (origin, "database")
    assert dead.reason.startswith("the database refused this message's metric 'b':")
