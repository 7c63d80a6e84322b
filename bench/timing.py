"""Time SQL queries the way every benchmark here reports them."""

from __future__ import annotations

import statistics
import time
from typing import Any

import psycopg


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
