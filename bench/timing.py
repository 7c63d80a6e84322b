"""Time SQL queries the way every benchmark here reports them, on a throwaway server."""

from __future__ import annotations

import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's tools/
from tools.localstack import LocalPostgres


@contextlib.contextmanager
def throwaway_postgres(name: str, jobs: bool = True) -> Iterator[LocalPostgres]:
    """Start a local PostgreSQL of this benchmark's own, removed afterwards; *jobs*
    False: TimescaleDB's background jobs off, so no policy runs meanwhile."""
    folder = Path(tempfile.mkdtemp(prefix=f"bmsd-bench-{name}-"))
    folder.chmod(0o755)  # the server's user must get through
    settings = "" if jobs else "timescaledb.max_background_workers = 0\n"
    pg = LocalPostgres(folder / "pg", extra_settings=settings)
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(folder, ignore_errors=True)


def time_query(conn: psycopg.Connection[Any], query: str,
               params: tuple[Any, ...] | dict[str, Any],
               repeat: int) -> tuple[int, float, float]:
    """Run *query* once to warm up, then *repeat* times; return (rows, median ms, max ms)."""
    conn.execute(query, params).fetchall()
    times = []
    rows = 0
    for _ in range(repeat):
        started = time.perf_counter()
        rows = len(conn.execute(query, params).fetchall())
        times.append((time.perf_counter() - started) * 1000)
    return rows, statistics.median(times), max(times)
