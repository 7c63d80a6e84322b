"""The buffered paho client delivers every message whole, whatever packets share a read."""

from __future__ import annotations

import random
import threading
import time
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bmsd.ingest.buffered_client import READ_SIZE, _BufferedClient, ack_many, client_class
from tests.fix_daemon import wait_until
from tests.fix_mqtt import Broker


def connected(url: str, cls: type[paho.Client], client_id: str) -> paho.Client:
    parts = urlsplit(url)
    client = cls(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
    client.username_pw_set(parts.username, parts.password)
    client.max_inflight_messages_set(1000)
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
    client.loop_start()
    return client


def test_this_paho_gets_the_buffered_reader() -> None:
    assert client_class() is _BufferedClient  # the private methods it overrides exist


def test_messages_of_every_size_arrive_whole_and_in_order(mqtt_broker: Broker) -> None:
    # Many tiny messages share one read; large ones span several reads; some
    # end exactly at, or one byte past, a read's end.
    rng = random.Random(14)
    sizes = [0, 1, 2, READ_SIZE - 5, READ_SIZE, READ_SIZE + 1, 3 * READ_SIZE + 7]
    sizes += [rng.choice([rng.randint(0, 40), rng.randint(100, 3000), rng.randint(20_000,
                                                                                  200_000)])
              for _ in range(1500)]
    payloads = [rng.randbytes(n) for n in sizes]
    topic = f"test/buffered/{time.monotonic_ns()}"
    received: list[bytes] = []
    done = threading.Event()

    def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        received.append(message.payload)
        if len(received) == len(payloads):
            done.set()

    subscriber = connected(mqtt_broker.publisher_url, client_class(),
                           f"buffered-{time.monotonic_ns()}")
    subscriber.on_message = on_message
    subscribed = threading.Event()
    subscriber.on_subscribe = lambda *args: subscribed.set()
    subscriber.subscribe(topic, qos=1)
    publisher = connected(mqtt_broker.publisher_url, paho.Client, f"plain-{time.monotonic_ns()}")
    try:
        assert subscribed.wait(10)
        for payload in payloads:
            publisher.publish(topic, payload, qos=1)
        wait_until(done.is_set, timeout_s=120, what="every message received")
    finally:
        for client in (subscriber, publisher):
            client.disconnect()
            client.loop_stop()
    assert [len(p) for p in received] == [len(p) for p in payloads]
    assert received == payloads


def test_acks_sent_together_acknowledge_exactly_those_messages(mqtt_broker: Broker) -> None:
    # A session acknowledges the first 300 of 500 messages with one ack_many;
    # connected again, the broker sends the other 200 and only those.
    topic = f"test/acks/{time.monotonic_ns()}"
    client_id = f"acks-{time.monotonic_ns()}"
    received: list[tuple[int, bytes]] = []

    def session() -> paho.Client:
        parts = urlsplit(mqtt_broker.publisher_url)
        client = client_class()(CallbackAPIVersion.VERSION2, client_id=client_id,
                                protocol=paho.MQTTv311, clean_session=False,
                                manual_ack=True)
        client.username_pw_set(parts.username, parts.password)
        client.max_inflight_messages_set(1000)
        client.on_message = lambda c, u, m: received.append((m.mid, m.payload))
        client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
        client.loop_start()
        return client

    subscriber = session()
    subscribed = threading.Event()
    subscriber.on_subscribe = lambda *args: subscribed.set()
    subscriber.subscribe(topic, qos=1)
    assert subscribed.wait(10)
    publisher = connected(mqtt_broker.publisher_url, paho.Client, f"plain-{time.monotonic_ns()}")
    try:
        for n in range(500):
            publisher.publish(topic, str(n).encode(), qos=1).wait_for_publish(10)
        wait_until(lambda: len(received) == 500, timeout_s=30, what="500 messages")
        ack_many(subscriber, [mid for mid, _ in received[:300]])
        time.sleep(1)  # the network thread sends them
        subscriber.disconnect()
        subscriber.loop_stop()
        received.clear()
        subscriber = session()
        wait_until(lambda: len(received) == 200, timeout_s=30, what="the 200 not acknowledged")
        time.sleep(1)
        assert [p for _, p in received] == [str(n).encode() for n in range(300, 500)]
    finally:
        for client in (subscriber, publisher):
            client.disconnect()
            client.loop_stop()
