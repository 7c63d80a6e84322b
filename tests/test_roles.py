"""bmsd runs as a login role that has bmsd_ingest and nothing else."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests.fix_daemon import DaemonFactory, Publisher, wait_until


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
        # A late reading that clears both earlier than the one stored: the
        # alerts are revised (bmsd/alerts/history.py) by the same login.
        for second, level in ((9, 30.0), (4, 30.0)):
            publisher.publish("site/north/ctrl-1/telemetry", {
                "timestamp": f"2026-12-03T10:00:0{second}Z", "battery_charge_level": level})
        wait_until(lambda: conn.execute(
            "SELECT DISTINCT extract(second FROM resolved_at) FROM alerts").fetchall()
            == [(4,)], what="the alerts' resolution revised")
    with psycopg.connect(ingest_login, autocommit=True) as conn:
        for statement in ("CREATE TABLE intruder (x int)", "DROP TABLE alerts",
                          "TRUNCATE battery_telemetry", "ALTER TABLE devices ADD COLUMN x int",
                          "DELETE FROM site_telemetry", "SELECT * FROM pg_authid"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
