"""The database side of bmsd: connections with timeouts, retries, and a client deadline.

Every connection bmsd opens takes its settings from `connect_kwargs`: through
`connect` (``bmsd migrate``, ``bmsd alerts``, ``create-login``), or directly
where its owner handles the errors itself (the daemon's `Database`, the
instance lock, the policy-health reader). They set the same bounds on both
ends of the socket:

- the client: a connect timeout, TCP keepalives and ``tcp_user_timeout``, so
  a peer that stops answering is noticed by the kernel;
- the server (``options``, per session, any role may set them): the same
  keepalives and ``tcp_user_timeout``, so the server frees the session - and
  the advisory lock and row locks it holds - of a bmsd that died while the
  network was down, within `DatabaseConfig.dead_peer_bound_s`, instead of the
  operating system's two hours; ``statement_timeout`` and
  ``idle_in_transaction_session_timeout`` bound what one session may hold.

Keepalives do not help when the peer's kernel still answers but the server
never replies (a proxy that stops forwarding, a server wedged on I/O), so
`Deadline` closes the socket of an operation that outlasts
``operation_timeout_s``: the blocked call then fails like a lost connection
and is retried, and nothing it held is acknowledged.

`Database` is the daemon's one connection, used from its main thread, with
transient failures retried under jittered, capped backoff.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psycopg
import structlog

from bmsd.config import DatabaseConfig
from bmsd.errors import DatabaseError
from bmsd.metrics import Metrics

#: bmsd's own number among the database's advisory locks ("bmsd" in ASCII): the
#: migration's lock (one key) and each client id's instance lock (this, and the
#: client id's hash) are told apart from other applications' by it.
ADVISORY_NAMESPACE = 0x626D7364

log = structlog.get_logger("bmsd.database")
T = TypeVar("T")

#: Errors after which retrying may succeed: the connection, the server, a timeout.
TRANSIENT = (psycopg.OperationalError, psycopg.InterfaceError)


def connect_kwargs(config: DatabaseConfig, application_name: str,
                   statement_timeout_ms: int | None = None) -> dict[str, Any]:
    """Return the libpq parameters every bmsd connection uses (see the module's docstring).

    *statement_timeout_ms* overrides the configured one (0: none, for migrations).
    """
    idle, interval, count = (config.keepalives_idle_s, config.keepalives_interval_s,
                             config.keepalives_count)
    if statement_timeout_ms is None:
        statement_timeout_ms = config.statement_timeout_ms
    server = {
        "statement_timeout": statement_timeout_ms,
        "idle_in_transaction_session_timeout": config.idle_in_transaction_timeout_ms,
        "tcp_keepalives_idle": idle,
        "tcp_keepalives_interval": interval,
        "tcp_keepalives_count": count,
        "tcp_user_timeout": config.tcp_user_timeout_ms,
    }
    kwargs: dict[str, Any] = {
        "application_name": application_name,
        "connect_timeout": config.connect_timeout_s,
        "keepalives": 1, "keepalives_idle": idle, "keepalives_interval": interval,
        "keepalives_count": count, "tcp_user_timeout": config.tcp_user_timeout_ms,
        "options": " ".join(f"-c {name}={value}" for name, value in server.items()),
    }
    if config.password is not None:
        kwargs["password"] = config.password.get_secret_value()
    return kwargs


def connect(config: DatabaseConfig, application_name: str,
            statement_timeout_ms: int | None = None) -> psycopg.Connection[Any]:
    """Open an autocommit connection with bmsd's timeouts; raise DatabaseError if it cannot."""
    try:
        return psycopg.connect(config.url, autocommit=True,
                               **connect_kwargs(config, application_name, statement_timeout_ms))
    except psycopg.OperationalError as exc:
        raise DatabaseError(f"cannot connect to the database: {first_line(exc)}") from exc


def first_line(exc: BaseException) -> str:
    """Return the first line of an error's text (libpq's come with hints below)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class Deadline:
    """Close a connection's socket when one operation on it outlasts *limit_s*.

    A background thread looks twice a second; an operation is what runs in
    ``with deadline.watch(conn):``. `cap` ends every operation at a fixed
    time, whatever its start (the shutdown deadline). Closing the socket (shutdown, not close:
    libpq still owns the descriptor) wakes the blocked call with an error.
    """

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.cap: float | None = None  # time.monotonic() past which nothing may run
        self._watched: dict[int, tuple[psycopg.Connection[Any], float]] = {}
        self._mutex = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, conn: psycopg.Connection[Any]) -> Iterator[None]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="bmsd-db-deadline",
                                            daemon=True)
            self._thread.start()
        key = id(conn)
        with self._mutex:
            self._watched[key] = (conn, time.monotonic())
        try:
            yield
        finally:
            with self._mutex:
                self._watched.pop(key, None)

    def close(self) -> None:
        self._closed.set()

    def _run(self) -> None:
        while not self._closed.wait(0.5):
            now = time.monotonic()
            cap = self.cap if self.cap is not None else now + 1
            with self._mutex:
                late = [conn for conn, started in self._watched.values()
                        if now > min(started + self.limit_s, cap)]
            for conn in late:
                self._abort(conn)

    def _abort(self, conn: psycopg.Connection[Any]) -> None:
        try:
            fd = conn.pgconn.socket
            with socket.socket(fileno=socket.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except (OSError, psycopg.Error):
            return  # already gone
        log.warning("db_operation_timed_out", limit_s=self.limit_s,
                    meaning="the database did not answer in time; the connection is closed"
                            " and the operation retried; nothing it held was acknowledged")


class Database:
    """The daemon's database connection: run actions on it, retrying transient failures.

    *sleep* waits between retries; the daemon's raises to stop retrying (a
    shutdown deadline, a fatal broker condition).
    """

    def __init__(self, config: DatabaseConfig, metrics: Metrics,
                 sleep: Callable[[float], None] = time.sleep,
                 application_name: str = "bmsd",
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.config = config
        self._metrics = metrics
        self._sleep = sleep
        self._application_name = application_name
        self._conn: psycopg.Connection[Any] | None = None
        self.deadline = Deadline(config.operation_timeout_s)
        self.up = False
        self.last_ok = 0.0  # time.monotonic() of the last success
        self._on_change = on_change  # told when the database stops or starts answering

    def run(self, action: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run *action* on the connection; retry transient failures with backoff.

        A failure retrying will not fix (a missing table, a refused grant)
        raises DatabaseError.
        """
        backoff = 0.5
        cap = self.config.retry_max_backoff_s
        while True:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(
                        self.config.url, autocommit=True,
                        **connect_kwargs(self.config, self._application_name))
                with self.deadline.watch(self._conn):
                    result = action(self._conn)
            except TRANSIENT as exc:
                self._drop()
                self._metrics.db_errors.labels(type(exc).__name__).inc()
                self._metrics.db_up.set(0)
                if self.up and self._on_change is not None:
                    self._on_change(False)
                self.up = False
                log.warning("db_unavailable", error=first_line(exc), retry_in_s=round(backoff, 2),
                            meaning="nothing is acknowledged meanwhile; the broker keeps it")
                self._sleep(backoff)
                backoff = min(cap, backoff * 2) * random.uniform(0.8, 1.2)  # noqa: S311
                continue
            except psycopg.Error as exc:
                raise DatabaseError(
                    f"the database refused an operation that retrying will not fix: {exc}"
                    " (is the schema migrated and are the role's grants in place?)") from exc
            self.last_ok = time.monotonic()
            if not self.up:
                self._metrics.db_up.set(1)
                self.up = True
                if self._on_change is not None:
                    self._on_change(True)
            return result

    def close(self) -> None:
        self._drop()
        self.deadline.close()

    def _drop(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                conn.close()
