"""paho's client with a read buffer under its packet reader, and PUBACKs sent together.

paho reads every packet with a system call per piece: one byte for the
packet type, one per byte of the remaining length, then the rest: for small
messages, system calls would cost more than everything else the subscriber
does. The buffered client (`client_class`) takes up to 64 KiB from the
socket at once and hands paho's reader its pieces from that; after each read
event it goes on reading the packets already in the buffer, because the
socket will not wake paho again for bytes already taken, but takes no more
from the socket until the next read event (paho writes our PUBACKs between
read events).
The buffer is dropped whenever paho closes the socket, so nothing of one
connection reaches the next.

`ack_many` queues the PUBACKs of a committed batch as one write: paho's
`ack` queues each as a packet of its own, with a wake-up of its network
thread and a system call to send each, and every one of those threads'
turns waits for the interpreter lock while the ingest loop parses.

This overrides private methods of paho-mqtt 2 (``_sock_recv``, ``_sock_close``,
``loop_read`` around ``_packet_read``) and queues with ``_packet_queue``:
the fast path ``paho_socket_buffer`` of bmsd/internals.py. Where they are
missing (another paho), `client_class` is paho's own client (and `ack_many`
acknowledges one message at a time).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

from bmsd import internals

READ_SIZE = 64 * 1024
_PUBACK = struct.Struct("!BBH")  # packet type, remaining length 2, packet id


def ack_many(client: paho.Client, mids: Sequence[int]) -> None:
    """Acknowledge the QoS 1 messages *mids*, in this order (see the module's docstring)."""
    if isinstance(client, _BufferedClient):
        client.ack_many(mids)
    else:
        for mid in mids:
            client.ack(mid, 1)


class _BufferedClient(paho.Client):
    """paho's client, reading the socket READ_SIZE bytes at a time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_buffer = b""
        self._read_pos = 0
        self._draining = False

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._read_pos >= len(self._read_buffer):
            if self._draining:  # the rest waits for the socket's next read event
                raise BlockingIOError
            data = super()._sock_recv(READ_SIZE)  # BlockingIOError: nothing now
            if not data:
                return data  # the connection was closed
            self._read_buffer, self._read_pos = data, 0
        start = self._read_pos
        self._read_pos = min(start + bufsize, len(self._read_buffer))
        return self._read_buffer[start:self._read_pos]

    def _sock_close(self) -> None:
        self._read_buffer, self._read_pos = b"", 0
        super()._sock_close()

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        # Packets already taken from the socket, and only those: reading on
        # from the socket here would keep paho from its writes (our PUBACKs).
        self._draining = True
        try:
            while (rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._sock is not None
                   and self._read_pos < len(self._read_buffer)):
                rc = self._packet_read()
                if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                    return MQTTErrorCode.MQTT_ERR_SUCCESS
                if rc > 0:
                    return self._loop_rc_handle(rc)
        finally:
            self._draining = False
        return rc

    def ack_many(self, mids: Sequence[int]) -> None:
        """Queue the PUBACKs of *mids*, in order, as one packet: one write sends them."""
        if mids:
            puback = _PUBACK.pack
            self._packet_queue(paho.PUBACK, b"".join([puback(paho.PUBACK, 2, m) for m in mids]),
                               0, 1)


def client_class() -> type[paho.Client]:
    """Return the buffered client where paho has what it overrides, else paho's own."""
    return _BufferedClient if internals.on("paho_socket_buffer") else paho.Client
