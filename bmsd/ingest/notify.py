"""Tell systemd how the daemon is doing: READY, STATUS, WATCHDOG, RELOADING, STOPPING,
and EXTEND_TIMEOUT_USEC while a start drains a backlog.

The protocol is a datagram of ``KEY=VALUE`` lines sent to the Unix socket
named by ``$NOTIFY_SOCKET`` (an ``@`` first means Linux's abstract
namespace). It is a few lines, so bmsd speaks it itself rather than pull in
a library (the maintained ones need libsystemd, which a wheel cannot carry).
Without ``$NOTIFY_SOCKET`` every call does nothing.

The watchdog is fed only by `Notifier.progress`, which the daemon calls from
its ingest loop after a commit or a database round trip: if ingestion is
stuck, the pings stop and systemd restarts the service. Nothing else sends
``WATCHDOG=1``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("bmsd.ingest.notify")

#: Without a watchdog, how long a start may go without a commit while it drains a
#: backlog before READY=1 (bmsd.service's WatchdogSec).
EXTEND_START_S = 90.0


class Notifier:
    """Send sd_notify messages to the service manager, if there is one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        path = environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + path[1:] if path.startswith("@") else path
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        # Ping at half the period, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval_s: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval_s = int(usec) / 2e6
        self._last_ping = 0.0
        # A start that drains a backlog before READY=1 asks for this much more time
        # at each commit: as long as the watchdog would wait once it runs.
        self.extend_start_s = (2 * self.watchdog_interval_s if self.watchdog_interval_s
                               else EXTEND_START_S)
        self._last_extend = 0.0
        self._status = ""
        self._failed = False

    def ready(self, status: str) -> None:
        self._status = status
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        """Set the one-line status `systemctl status` shows (sent only when it changed)."""
        if status != self._status:
            self._status = status
            self._send(f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=stopping: committing what is in hand")

    def progress(self) -> None:
        """Feed the watchdog: call only after the ingest loop proved it works."""
        if self.watchdog_interval_s is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_interval_s:
            self._last_ping = now
            self._send("WATCHDOG=1")

    def extend_start(self) -> None:
        """Tell systemd that start-up makes progress (a commit before READY=1).

        The start timeout (``TimeoutStartSec=``) then runs until at least
        `extend_start_s` from now: a backlog drained before the broker acknowledges
        the subscription is not killed as a failed start, and a drain that stops
        committing still is. Sent at most once a second.
        """
        now = time.monotonic()
        if now - self._last_extend >= 1.0:
            self._last_extend = now
            self._send(f"EXTEND_TIMEOUT_USEC={int(self.extend_start_s * 1e6)}")

    def _send(self, message: str) -> None:
        if self._socket is None:
            return
        try:
            self._socket.sendto(message.encode(), self._address)
        except OSError as exc:
            if not self._failed:  # say it once, not at every ping
                self._failed = True
                log.warning("sd_notify_failed", socket=self._address.replace("\0", "@"),
                            error=str(exc))
