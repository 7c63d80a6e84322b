"""paho's client with a read buffer under its packet reader: half its CPU per message.

paho reads every packet with a system call per piece: one byte for the
packet type, one per byte of the remaining length, then the rest. A
do-nothing subscriber spends half its time there (bench/RESULTS.md, step 5:
39.7 k -> 89.4 k single-reading messages/s with this client). `BufferedClient` takes up
to 64 KiB from the socket at once and hands paho's reader its pieces from
that; after each read event it goes on reading the packets already in the
buffer, because the socket will not wake paho again for bytes already taken,
but takes no more from the socket until the next read event (paho writes
our PUBACKs between read events).
The buffer is dropped whenever paho closes the socket, so nothing of one
connection reaches the next.

This overrides private methods of paho-mqtt 2 (``_sock_recv``, ``_sock_close``,
``loop_read`` around ``_packet_read``). Where they are missing (another paho),
`BufferedClient` is paho's own client.
"""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

READ_SIZE = 64 * 1024
_PRIVATE = ("_sock_recv", "_sock_close", "_packet_read", "_loop_rc_handle")


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


BufferedClient: type[paho.Client] = (
    _BufferedClient if all(hasattr(paho.Client, name) for name in _PRIVATE) else paho.Client)
