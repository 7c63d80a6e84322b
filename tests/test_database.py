"""The database module: every connection carries bmsd's bounds, and a deadline ends a hang."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry

from bmsd.config import DatabaseConfig
from bmsd.database import Database, connect
from bmsd.errors import DatabaseError
from bmsd.metrics import Metrics
from tests.fix_proxy import ProxyFactory


def test_every_connection_asks_the_server_to_drop_a_dead_peer(db_url: str) -> None:
    config = DatabaseConfig(url=db_url)
    with connect(config, "bmsd-test") as conn:
        shown = {name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                 for name in ("tcp_keepalives_idle", "tcp_keepalives_interval",
                              "tcp_keepalives_count", "tcp_user_timeout", "statement_timeout",
                              "idle_in_transaction_session_timeout", "application_name")}
    assert shown == {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5",
                     "tcp_keepalives_count": "3", "tcp_user_timeout": "30000",
                     "statement_timeout": "30s", "idle_in_transaction_session_timeout": "1min",
                     "application_name": "bmsd-test"}
    assert config.dead_peer_bound_s == 30


def test_an_operation_that_never_answers_is_ended_at_its_deadline(
    db_url: str, tcp_proxy: ProxyFactory
) -> None:
    proxy = tcp_proxy(db_url)
    config = DatabaseConfig(url=proxy.url(db_url), operation_timeout_s=1.5,
                            statement_timeout_ms=1000, connect_timeout_s=1)
    attempts: list[float] = []

    def give_up_after_one_retry(seconds: float) -> None:
        attempts.append(seconds)
        raise TimeoutError

    database = Database(config, Metrics(CollectorRegistry()), sleep=give_up_after_one_retry)
    assert database.run(lambda conn: conn.execute("SELECT 1").fetchone()) == (1,)
    proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        database.run(lambda conn: conn.execute("SELECT 2").fetchone())
    # Ended by the deadline (1.5 s, checked twice a second), not by a TCP timer.
    assert 1.4 < time.monotonic() - started < 3.5
    assert len(attempts) == 1
    assert database.up is False
    database.close()


def test_a_refused_statement_is_not_retried(db_url: str) -> None:
    database = Database(DatabaseConfig(url=db_url), Metrics(CollectorRegistry()))
    with pytest.raises(DatabaseError, match="retrying will not fix"):
        database.run(lambda conn: conn.execute("SELECT * FROM no_such_table"))
    database.close()
