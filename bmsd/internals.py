"""The libraries' internals bmsd's fast paths use: named here, checked once.

Three fast paths lean on what a library does not promise:

``psycopg_copy_gen``
    psycopg's ``Cursor._start_copy_gen``: the early COPY (ingest/early_copy.py)
    starts a COPY without holding the connection's lock until it ends, so a
    batch's rows stream to PostgreSQL while the next messages are parsed.
    Without it, each batch is written at its commit.
``paho_socket_buffer``
    paho-mqtt 2's ``_sock_recv``, ``_sock_close``, ``_packet_read``,
    ``_loop_rc_handle`` and ``_packet_queue``: the buffered reader and the
    PUBACKs sent together (ingest/buffered_client.py). Without them, paho's
    own client, one system call per packet piece and per PUBACK.
``prometheus_histogram``
    prometheus_client's histogram fields ``_upper_bounds``, ``_buckets`` and
    ``_sum``: a batch's latencies observed in one pass (metrics.observe_many).
    Without them, one ``observe`` per message.

Each is checked once, when this module is imported, against the library
installed. The daemon logs the ones missing at start-up (``fast_path_off``,
once each) and exports ``bmsd_fast_path{name}`` (1 on, 0 off), so a library
upgrade that halves throughput is seen, not guessed. Nothing else in bmsd
touches a library's private names.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
import psycopg
import structlog
from prometheus_client import Histogram

log = structlog.get_logger("bmsd.ingest.daemon")


@dataclass(frozen=True)
class FastPath:
    """One fast path: what it needs, whether it has it, and what it costs without."""

    name: str
    needs: str
    without: str
    missing: tuple[str, ...]  # the private names the installed library lacks

    @property
    def on(self) -> bool:
        return not self.missing


PAHO_PRIVATE = ("_sock_recv", "_sock_close", "_packet_read", "_loop_rc_handle",
                "_packet_queue")
_HISTOGRAM_FIELDS = ("_upper_bounds", "_buckets", "_sum")


def _histogram_missing() -> tuple[str, ...]:
    probe = Histogram("bmsd_probe_seconds", "a probe", registry=None)
    return tuple(name for name in _HISTOGRAM_FIELDS if not hasattr(probe, name))


def check(disabled: Sequence[str] = ()) -> dict[str, FastPath]:
    """Return every fast path, checked against the installed libraries; *disabled*
    names are reported off (a test's way to take the slow path)."""
    paths = [
        FastPath("psycopg_copy_gen", f"psycopg {psycopg.__version__}: Cursor._start_copy_gen",
                 "each batch's rows are written at its commit, not while it fills",
                 () if hasattr(psycopg.Cursor, "_start_copy_gen") else ("_start_copy_gen",)),
        FastPath("paho_socket_buffer", "paho-mqtt's socket and packet methods",
                 "one system call per packet piece and per PUBACK",
                 tuple(n for n in PAHO_PRIVATE if not hasattr(paho.Client, n))),
        FastPath("prometheus_histogram", "prometheus_client's histogram fields",
                 "one observe() per message instead of one pass per batch",
                 _histogram_missing()),
    ]
    return {p.name: (FastPath(p.name, p.needs, p.without, ("disabled",))
                     if p.name in disabled else p) for p in paths}


#: The fast paths of this process, as checked at import.
FAST_PATHS: dict[str, FastPath] = check()


def use(*, disabled: Sequence[str]) -> None:
    """Check again with *disabled* paths off (tests only: the slow paths must work)."""
    FAST_PATHS.clear()
    FAST_PATHS.update(check(disabled))


def log_missing() -> None:
    """Log each fast path whose library internals are missing (at start)."""
    for path in FAST_PATHS.values():
        if not path.on:  # a library upgrade took what it needs: slower, not wrong
            log.warning("fast_path_off", name=path.name, needs=path.needs,
                        missing=list(path.missing), meaning=path.without)


def on(name: str) -> bool:
    return FAST_PATHS[name].on


def start_copy(cursor: psycopg.Cursor[Any], statement: Any) -> Generator[Any, Any, Any]:
    """Return psycopg's generator that starts a COPY (``psycopg_copy_gen`` only)."""
    start: Callable[[Any], Generator[Any, Any, Any]] = cursor._start_copy_gen
    return start(statement)
