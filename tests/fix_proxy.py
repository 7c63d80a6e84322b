"""A TCP proxy between bmsd and a server, to make network faults on one connection.

Modelled on psycopg's ``tests/fix_proxy.py``: the test points bmsd at the
proxy instead of the server, then:

- `Proxy.cut` resets every connection (RST), as a restarted router would;
- `Proxy.blackhole` forwards nothing and answers nothing, in both
  directions, while the sockets stay open: only a timeout can notice;
- `Proxy.slow` delays every chunk it forwards;
- `Proxy.refuse` refuses new connections; `Proxy.heal` undoes all of it;
- `Proxy.cut_after_commit` lets the next COMMIT reach the server and cuts
  the connection before its answer gets back: the client cannot know
  whether its transaction committed.

The server itself is never touched, so other tests sharing it go on.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest


class Proxy:
    """Forward <listen_host>:<port> to a target, with faults on request."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = listen_host
        self._listener = socket.create_server((listen_host, 0))
        self.port: int = self._listener.getsockname()[1]
        self.mode = "forward"  # forward | blackhole
        self.delay_s = 0.0
        self.refusing = False
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._commit_trap = False
        self._silenced: set[int] = set()  # pairs whose server side is no longer relayed
        self._copying: set[int] = set()  # pairs that sent a COPY
        self.commits_cut = 0
        self._mutex = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def url(self, url: str) -> str:
        """Return *url* with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        address = f"{self.host}:{self.port}"
        netloc = f"{userinfo}@{address}" if userinfo else address
        return urlunsplit(parts._replace(netloc=netloc))

    # --- faults -----------------------------------------------------------------

    def cut(self) -> None:
        """Reset every open connection (new ones are still forwarded)."""
        with self._mutex:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                _reset(sock)

    def blackhole(self) -> None:
        """Stop forwarding, in both directions, on open and new connections alike."""
        self.mode = "blackhole"

    def slow(self, delay_s: float) -> None:
        """Delay every forwarded chunk by *delay_s*."""
        self.delay_s = delay_s

    def refuse(self) -> None:
        """Reset new connections as they come (a server that is down)."""
        self.refusing = True

    def cut_after_commit(self) -> None:
        """Arm a one-shot fault: the next COMMIT of a transaction that wrote rows by
        COPY reaches the server, but its answer never arrives."""
        self._commit_trap = True

    def heal(self) -> None:
        """Forward again, at full speed, and accept new connections."""
        self.mode, self.delay_s, self.refusing = "forward", 0.0, False

    @property
    def connections(self) -> int:
        with self._mutex:
            return len(self._pairs)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()

    # --- forwarding ---------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refusing:
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            pair = (client, server)  # one object: both pumps name the connection by it
            with self._mutex:
                self._pairs.append(pair)
            for src, dst in (pair, (server, client)):
                threading.Thread(target=self._pump, args=(src, dst, pair),
                                 name="proxy-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket,
              pair: tuple[socket.socket, socket.socket]) -> None:
        try:
            while not self._closed:
                if self.mode == "blackhole":
                    time.sleep(0.05)  # read nothing: the peer's bytes stay unanswered
                    continue
                readable, _, _ = select.select([src], [], [], 0.1)
                if not readable or self.mode == "blackhole":
                    continue
                if id(pair) in self._silenced:
                    time.sleep(0.05)
                    continue
                data = src.recv(65536)
                if not data:
                    break
                if self.delay_s:
                    time.sleep(self.delay_s)
                if src is pair[0] and b"COPY " in data:
                    self._copying.add(id(pair))  # a transaction that writes rows
                committing = src is pair[0] and b"COMMIT" in data
                trapped = self._commit_trap and committing and id(pair) in self._copying
                if committing:
                    self._copying.discard(id(pair))
                if trapped:
                    self._commit_trap = False
                    self._silenced.add(id(pair))  # the server's answer stays here
                dst.sendall(data)
                if trapped:
                    time.sleep(0.5)  # the server commits...
                    self.commits_cut += 1
                    for sock in pair:  # ...and the client hears nothing back
                        _reset(sock)
                    break
        except (OSError, ValueError):
            pass
        with self._mutex:
            if pair in self._pairs:
                self._pairs.remove(pair)
        for sock in pair:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _reset(sock: socket.socket) -> None:
    """Close *sock* with a TCP reset rather than an orderly FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()


ProxyFactory = Callable[..., Proxy]


@pytest.fixture
def tcp_proxy() -> Iterator[ProxyFactory]:
    """Return a function that starts a proxy in front of the server of a URL."""
    proxies: list[Proxy] = []

    def start(url: str, listen_host: str = "127.0.0.1") -> Proxy:
        parts = urlsplit(url)
        proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5432, listen_host)
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.close()
