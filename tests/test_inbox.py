"""The inbox between the MQTT thread and the ingest loop holds a bounded number of bytes."""

from __future__ import annotations

import queue
import threading
import time
from datetime import UTC, datetime

import pytest

from bmsd.ingest.inbox import Inbox
from bmsd.ingest.mqtt import Message


def message(mid: int, size: int) -> Message:
    return Message(1, mid, 1, "t", b"x" * size, datetime.now(UTC))


def put_in_thread(inbox: Inbox, m: Message) -> threading.Thread:
    thread = threading.Thread(target=inbox.put, args=(m,), daemon=True)
    thread.start()
    return thread


def test_a_message_waits_while_the_waiting_bytes_are_at_the_bound() -> None:
    inbox = Inbox(max_messages=100, max_bytes=1000, max_wait_s=30)
    inbox.put(message(1, 600))
    inbox.put(message(2, 400))  # exactly at the bound: taken
    third = put_in_thread(inbox, message(3, 10))
    third.join(0.3)
    assert third.is_alive(), "a message past the byte bound waits"
    assert inbox.qsize() == 2
    assert inbox.get(1).mid == 1  # 600 bytes leave
    third.join(5)
    assert not third.is_alive()
    assert [inbox.get_nowait().mid for _ in range(2)] == [2, 3]
    assert inbox.bytes == 0


def test_an_empty_inbox_takes_a_message_of_any_size() -> None:
    inbox = Inbox(max_messages=10, max_bytes=100)
    inbox.put(message(1, 10_000))
    assert inbox.bytes == 10_000


def test_the_byte_bound_waits_at_most_max_wait_so_the_connection_stays_alive() -> None:
    inbox = Inbox(max_messages=10, max_bytes=100, max_wait_s=0.3)
    inbox.put(message(1, 100))
    started = time.monotonic()
    inbox.put(message(2, 100))  # nobody takes: admitted after max_wait_s
    assert 0.25 <= time.monotonic() - started < 5
    assert inbox.qsize() == 2


def test_the_count_bound_still_holds() -> None:
    inbox = Inbox(max_messages=2, max_bytes=10**9, max_wait_s=0.1)
    inbox.put(message(1, 1))
    inbox.put(message(2, 1))
    third = put_in_thread(inbox, message(3, 1))
    third.join(0.5)
    assert third.is_alive(), "the count bound waits for room, however long"
    inbox.get(1)
    third.join(5)
    assert not third.is_alive()


def test_get_times_out_on_an_empty_inbox() -> None:
    with pytest.raises(queue.Empty):
        Inbox(max_messages=1).get(0.05)
    with pytest.raises(queue.Empty):
        Inbox(max_messages=1).get_nowait()
