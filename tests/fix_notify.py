"""A stand-in for systemd's notification socket: what the daemon tells its service manager."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


class NotifySocket:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="bmsd-notify-"))
        self.path = self._folder / "notify"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._closed = False
        threading.Thread(target=self._read, daemon=True).start()

    def env(self, watchdog_usec: int | None = None) -> dict[str, str]:
        env = {"NOTIFY_SOCKET": str(self.path)}
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(65536)
            except (TimeoutError, OSError):
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append((time.monotonic(), fields))

    def sent(self) -> list[str]:
        """Return the state changes sent (READY, RELOADING, STOPPING ...), in order."""
        return [k for _, m in self.messages for k in m
                if k not in ("STATUS", "WATCHDOG", "MONOTONIC_USEC")]

    def times(self, key: str, since: float = 0.0) -> list[float]:
        return [t for t, m in self.messages if key in m and t >= since]

    def statuses(self) -> list[str]:
        return [m["STATUS"] for _, m in self.messages if "STATUS" in m]

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        self.path.unlink(missing_ok=True)
        self._folder.rmdir()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()
