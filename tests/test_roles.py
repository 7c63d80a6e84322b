"""bmsd runs as a login role that has bmsd_ingest and nothing else."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from bmsd.schema.migrate import ensure_login
from tests.fix_daemon import DaemonFactory, Publisher, wait_until


@pytest.fixture
def ingest_login(db_url: str, pg_server: Any) -> Iterator[str]:
    """The URL of a fresh login role whose only grant is bmsd_ingest."""
    name = f"bmsd_app_{os.getpid()}"
    ensure_login(db_url, name, "bmsd_ingest", "ingest-test-password")
    parts = urlsplit(db_url)
    yield urlunsplit(parts._replace(netloc=f"{name}@{parts.hostname}:{parts.port}"))
    with pg_server.connect() as conn:
        conn.execute(f'DROP ROLE IF EXISTS "{name}"')


def test_ingest_alerts_and_redelivery_need_no_more_than_bmsd_ingest(
    bmsd_daemon: DaemonFactory, publisher: Publisher, db_url: str, ingest_login: str,
) -> None:
    bmsd_daemon(database_url=ingest_login)
    reading = {"timestamp": "2026-12-03T10:00:00Z", "battery_charge_level": 8.0}
    publisher.publish("site/north/ctrl-1/telemetry", reading)
    publisher.publish("site/north/ctrl-1/telemetry", reading)  # a redelivery
    with psycopg.connect(db_url) as conn:
        def state() -> tuple[Any, ...]:
            return (conn.execute("SELECT count(*) FROM site_telemetry").fetchone(),
                    conn.execute("SELECT rule_code FROM alerts ORDER BY 1").fetchall())

        wait_until(lambda: state() == ((1,), [("BATTERY_CRITICAL",), ("BATTERY_LOW",)]),
                   what="the reading stored once and its alerts raised")
    with psycopg.connect(ingest_login, autocommit=True) as conn:
        for statement in ("CREATE TABLE intruder (x int)", "DROP TABLE alerts",
                          "TRUNCATE site_telemetry", "ALTER TABLE devices ADD COLUMN x int",
                          "DELETE FROM alerts", "SELECT * FROM pg_authid"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
