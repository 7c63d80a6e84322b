"""Messages on their way from the MQTT thread to the ingest loop: bounded in count and bytes.

The broker limits how many unacknowledged messages it sends (MQTT 5 Receive
Maximum, Mosquitto's max_inflight_messages for 3.1.1), not how large they
are: a window of 1000 gateway batches of 90 kB is 90 MB waiting here. So
`Inbox.put`, called by paho's network thread, also waits while the waiting
payloads reach ``max_bytes``; the broker then keeps the rest in its queue.

It waits at most ``max_wait_s`` for one message, then takes it anyway: the
network thread must get back to its loop often enough to keep the
connection's keepalive (the database may be down for minutes, and the loop
takes nothing meanwhile). A message is always taken into an empty inbox,
however large. The count bound (``[ingest] max_waiting_messages``) waits as
long as it takes: the ingest loop never waits on the network thread, so it
always comes to take (bmsd/ingest/mqtt.py says who waits on whom).

`close`, at shutdown, ends every wait: what `put` held then is dropped,
unacknowledged, and the broker sends it again to the next session.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque

from bmsd.ingest.mqtt import Message

MAX_WAITING_BYTES = 16 * 1024 * 1024


class Inbox:
    """A FIFO of received messages; `put` waits for room, `get` for a message."""

    def __init__(self, max_messages: int, max_bytes: int = MAX_WAITING_BYTES,
                 max_wait_s: float = 10.0) -> None:
        self._messages: deque[Message] = deque()
        self._bytes = 0
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._max_wait_s = max_wait_s
        self._changed = threading.Condition()
        self._closed = False

    def put(self, message: Message) -> None:
        """Add *message*, once there is room for it (see the module's docstring)."""
        size = len(message.payload)
        give_up: float | None = None
        with self._changed:
            while True:
                if self._closed:
                    return
                if not self._messages:
                    break
                if len(self._messages) >= self._max_messages:
                    self._changed.wait()
                    continue
                if self._bytes + size <= self._max_bytes:
                    break
                now = time.monotonic()
                give_up = now + self._max_wait_s if give_up is None else give_up
                if now >= give_up:
                    break
                self._changed.wait(give_up - now)
            self._messages.append(message)
            self._bytes += size
            self._changed.notify_all()

    def get(self, timeout: float) -> Message:
        """Return the oldest message; raise `queue.Empty` if none came within *timeout*."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self._messages:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise queue.Empty
                self._changed.wait(remaining)
            return self._take()

    def get_nowait(self) -> Message:
        """Return the oldest message; raise `queue.Empty` if there is none."""
        with self._changed:
            if not self._messages:
                raise queue.Empty
            return self._take()

    def close(self) -> None:
        """End every `put` waiting for room, and refuse what comes after (shutdown)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def qsize(self) -> int:
        return len(self._messages)

    @property
    def bytes(self) -> int:
        """Payload bytes waiting."""
        return self._bytes

    def _take(self) -> Message:
        message = self._messages.popleft()
        self._bytes -= len(message.payload)
        self._changed.notify_all()
        return message
