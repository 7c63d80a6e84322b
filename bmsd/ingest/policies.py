"""Are the database's policies working? Their lag, exported at scrape time.

Compression, retention, the aggregates' refresh and the late-data job are
TimescaleDB background jobs. Their status cannot tell a working job from a
failing one (on PostgreSQL 15.20 with TimescaleDB 2.28.3 every run ends as
Failed after its work committed), so the ``policy_health`` view (sql/200)
measures each by its effect, and this collector turns its rows into

- ``bmsd_policy_behind_seconds{object, policy}``: how far the data is behind
  what the policy promises (0: kept);
- ``bmsd_policy_allowed_seconds{object, policy}``: how far behind it may be
  between two runs;
- ``bmsd_policy_health_up``: 1 if the view was read, 0 if the query failed.

A scrape never waits on the database: it gets the last reading, and when
that is older than `MAX_AGE_S` it starts a new one in a thread of its own, on
a connection of its own (not the ingest loop's), with a short statement
timeout. So the first scrapes after start export nothing until the first
reading is in. On the Apache-only edition there are no policies and no view:
only ``bmsd_policy_health_up`` is exported.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import structlog
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from bmsd.config import DatabaseConfig
from bmsd.database import connect_kwargs

log = structlog.get_logger("bmsd.ingest.policies")

#: How long one reading of the view is served to scrapes.
MAX_AGE_S = 15.0
_TIMEOUT_MS = 5000
_HAS_VIEW = "SELECT to_regclass('policy_health') IS NOT NULL"
_READ = "SELECT object, policy, behind_s, allowed_s FROM policy_health ORDER BY 1, 2"

Row = tuple[str, str, float, float]


class PolicyHealth(Collector):
    """A Prometheus collector over the ``policy_health`` view (see the module's docstring)."""

    def __init__(self, config: DatabaseConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._read_at: float | None = None
        self._rows: list[Row] = []
        self._up: bool | None = None  # None: not read yet
        self._reading = False
        self._failed = False

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """Name the metrics without reading the database (called at registration)."""
        yield from self._families([], up=False)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            now = self._clock()
            if not self._reading and (self._read_at is None or now - self._read_at >= MAX_AGE_S):
                self._reading = True
                self._read_at = now
                threading.Thread(target=self._refresh, name="bmsd-policy-health",
                                 daemon=True).start()
            rows, up = self._rows, self._up
        if up is not None:
            yield from self._families(rows, up)

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _refresh(self) -> None:
        rows, up = self._read()
        with self._lock:
            self._rows, self._up, self._reading = rows, up, False

    def _read(self) -> tuple[list[Row], bool]:
        try:
            conn = self._conn
            if conn is None or conn.closed:
                conn = self._conn = psycopg.connect(
                    self._config.url, autocommit=True,
                    **connect_kwargs(self._config, "bmsd-policy-health",
                                     statement_timeout_ms=_TIMEOUT_MS))
            has_view = conn.execute(_HAS_VIEW).fetchone()
            rows = conn.execute(_READ).fetchall() if has_view and has_view[0] else []
        except psycopg.Error as exc:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if not self._failed:  # once per outage, not at every scrape
                log.warning("policy_health_unreadable", error=str(exc).strip(),
                            meaning="bmsd_policy_behind_seconds is not exported until the"
                                    " policy_health view can be read again")
            self._failed = True
            return [], False
        self._failed = False
        return [(str(o), str(p), float(b), float(a)) for o, p, b, a in rows], True

    @staticmethod
    def _families(rows: list[Row], up: bool) -> Iterator[GaugeMetricFamily]:
        behind = GaugeMetricFamily(
            "bmsd_policy_behind_seconds",
            "How far the data is behind what a TimescaleDB policy promises (policy_health).",
            labels=["object", "policy"])
        allowed = GaugeMetricFamily(
            "bmsd_policy_allowed_seconds",
            "How far behind a policy may legitimately be between two of its runs.",
            labels=["object", "policy"])
        for name, policy, behind_s, allowed_s in rows:
            behind.add_metric([name, policy], behind_s)
            allowed.add_metric([name, policy], allowed_s)
        yield behind
        yield allowed
        yield GaugeMetricFamily("bmsd_policy_health_up",
                                "1 if the policy_health view was read at the last look.",
                                value=1.0 if up else 0.0)
