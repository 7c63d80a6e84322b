"""Signals, recorded by their handlers and acted on by a thread of their own.

A handler that logged, or took a lock, could deadlock against the very code
it interrupted (structlog's and logging's locks are not re-entrant). Plain
attribute writes cannot. `watch` acts on them outside the handlers.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from types import FrameType


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
