"""Signals, recorded by their handlers and acted on by a thread of their own.

A handler that logged, or took a lock, could deadlock against the very code
it interrupted (structlog's and logging's locks are not re-entrant). Plain
attribute writes cannot. `watch` acts on them outside the handlers.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

import structlog

log = structlog.get_logger("bmsd.ingest.daemon")


class Signals:
    """What the signal handlers asked for; the handlers do nothing else.

    A handler that logged, or took a lock, could deadlock against the very
    code it interrupted (structlog's and logging's locks are not
    re-entrant). Plain attribute writes cannot.
    """

    def __init__(self) -> None:
        self.stops = 0
        self.reloads = 0

    def install(self) -> None:
        """Route SIGTERM/SIGINT to `stops` and SIGHUP to `reloads`."""
        def stop(signum: int, frame: FrameType | None) -> None:
            self.stops += 1

        def reload(signum: int, frame: FrameType | None) -> None:
            self.reloads += 1

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)


def watch(signals: Signals, stop: Callable[[], None], force: Callable[[], None]) -> None:
    """Call *stop* at the first stop signal, *force* at the second; never returns."""
    seen = 0
    while True:
        time.sleep(0.05)
        stops = signals.stops
        if stops == seen:
            continue
        seen = stops
        (stop if stops == 1 else force)()


def start_watching(signals: Signals, begin_shutdown: Callable[[], None],
                   in_hand: Callable[[], int]) -> None:
    """Watch *signals* from a thread of their own: the first stop signal begins the
    shutdown (the drain), a second exits at once (*in_hand* messages are redelivered)."""
    def force() -> None:
        log.warning("bmsd_forced_exit", unacknowledged=in_hand(),
                    meaning="unacknowledged messages will be redelivered by the broker")
        os._exit(1)

    def stop() -> None:
        log.info("bmsd_stopping", meaning="committing what is in hand; a second"
                                          " signal exits at once")
        begin_shutdown()

    threading.Thread(target=watch, args=(signals, stop, force), name="bmsd-signals",
                     daemon=True).start()
