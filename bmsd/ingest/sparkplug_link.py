"""bmsd's Sparkplug B connection: a clean session of its own, its STATE, and commands.

Sparkplug asks every client for clean sessions, which bmsd's readings
connection (bmsd/ingest/mqtt.py, a persistent session) cannot be; so
Sparkplug has a connection of its own, client id ``<[mqtt] client_id>-sparkplug``,
same broker, credentials and TLS. It subscribes (QoS 0) to
``spBv1.0/<group>/#`` for each of ``[sparkplug] groups`` (all groups: ``+``) and
to its own STATE topic, and hands messages to the same inbox as the readings
(QoS 0: nothing to acknowledge).

As primary host (``primary_host = true``) it publishes its STATE,
``spBv1.0/STATE/<host_id>``, retained, QoS 1, JSON ``{"online": ..., "timestamp":
ms}``: the will of each CONNECT says offline (with that CONNECT's time);
online is published only while bmsd can store (the database answers,
`online`), offline when it cannot, and before it stops. Edge nodes buffer
while it says offline and send what they held as historical data later. If
a stale will of ours turns up while we are online, online is published again.

One bmsd at a time is the Sparkplug host of a host_id: the one that holds a
database lock named after the STATE topic (bmsd/ingest/lock.py). Any number
may have ``[sparkplug]`` on (several members of a shared group, one
configuration); the others stand by (`claim`, every few seconds) and take
over when the host's database session ends: at once if it stops or its
process dies, within ``[database]``'s dead-peer bound if its host is cut off.
Sparkplug has no shared subscriptions: a host must see an edge node's births
to read its data, so one bmsd reads it all.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as paho
import psycopg
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bmsd.config import DatabaseConfig, MqttConfig, SparkplugConfig
from bmsd.errors import SessionTakenOver
from bmsd.ingest.lock import InstanceLock
from bmsd.ingest.mqtt import Message, address, jitter_backoff, new_client
from bmsd.metrics import Metrics
from bmsd.sparkplug.host import NAMESPACE

log = structlog.get_logger("bmsd.ingest.sparkplug")
#: Bounds an operation on a connection (bmsd/database.py, Deadline.watch).
Watch = Callable[[psycopg.Connection[Any]], contextlib.AbstractContextManager[None]]


class SparkplugLink:
    """The Sparkplug connection: subscriptions, STATE, rebirth requests."""

    def __init__(self, mqtt: MqttConfig, config: SparkplugConfig,
                 deliver: Callable[[Message], None], metrics: Metrics,
                 database: DatabaseConfig) -> None:
        self._mqtt = mqtt
        self._config = config
        self._deliver = deliver
        self._metrics = metrics
        self.state_topic = f"{NAMESPACE}/STATE/{config.host_id}"
        self._filters = [f"{NAMESPACE}/{g}/#" for g in config.groups or ("+",)]
        self._lock = threading.Lock()
        self._want_online = False  # bmsd can store
        self._said: bool | None = None  # what our STATE last said on this connection
        self._connected_ms = 0
        self._generation = 0
        self._intake = True
        self._host, self._port = address(mqtt)
        self._v5 = mqtt.protocol == "5"
        self._client, _, _ = new_client(mqtt, f"{mqtt.client_id}-sparkplug", self, clean=True)
        self._claim = InstanceLock(database, self.state_topic)
        self._hosting: str | None = None  # "": we are the host; else who is

    def claim(self, watch: Watch = lambda conn: contextlib.nullcontext()) -> None:
        """Be the Sparkplug host, if no other bmsd is (then connect: `start`); else stand
        by until a later call finds the lock free. A database out of reach changes
        nothing now (STATE follows it: `online`).

        Raise SessionTakenOver if, our lock's session lost, another bmsd took it.
        *watch* bounds the lock's statements (the database's deadline).
        """
        conn = self._claim.connection
        try:
            with watch(conn) if conn is not None else contextlib.nullcontext():
                holder = self._claim.try_take()
        except psycopg.OperationalError:
            return
        if holder is None and self._hosting != "":
            self._hosting = ""
            self._metrics.sparkplug_standby.set(0)
            log.info("sparkplug_host", host_id=self._config.host_id, topic=self.state_topic)
            self.online(True)  # (the database just answered)
            self.start()
        elif holder is not None and self._hosting == "":
            raise SessionTakenOver(
                f"the Sparkplug host lock of {self.state_topic!r} was lost with its database"
                f" session and taken by {holder.describe()}: two hosts would each see part"
                " of the edge nodes' births; this bmsd stops (restarted, it stands by)")
        elif holder is not None and self._hosting != holder.describe():
            self._hosting = holder.describe()
            self._metrics.sparkplug_standby.set(1)
            log.warning("sparkplug_standby", host_id=self._config.host_id,
                        host=self._hosting, meaning="another bmsd is the Sparkplug host of"
                        " this host_id; this one takes over when that one stops")

    def start(self) -> None:
        properties = None
        if self._v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 0
        self._client.connect_async(self._host, self._port, keepalive=self._mqtt.keepalive_s,
                                   clean_start=True,
                                   properties=properties)
        self._client.loop_start()

    def online(self, can_store: bool) -> None:
        """Say whether bmsd can store (primary host: its STATE follows)."""
        with self._lock:
            self._want_online = can_store
            self._say()

    def send(self, topic: str, payload: bytes) -> None:
        """Publish a command (a rebirth request: NCMD, QoS 0)."""
        self._client.publish(topic, payload, qos=0)

    def stop_intake(self) -> None:
        self._intake = False

    def close(self) -> None:
        """Publish STATE offline, then disconnect."""
        self._intake = False
        with self._lock:
            self._want_online = False
            info = self._say()
        if info is not None:
            info.wait_for_publish(timeout=2)
        self._client.disconnect()
        self._client.loop_stop()
        self._claim.release()
        self._metrics.sparkplug_online.set(0)

    # --- STATE ---------------------------------------------------------------------

    def _say(self) -> paho.MQTTMessageInfo | None:
        """Publish STATE if it should change (under the lock)."""
        if not self._config.primary_host or self._said is None:
            return None  # not connected yet: said in _on_connect
        online = self._want_online
        if online == self._said:
            return None
        self._said = online
        stamp = self._connected_ms if online else int(time.time() * 1000)
        self._metrics.sparkplug_online.set(1 if online else 0)
        log.info("sparkplug_state", online=online, topic=self.state_topic)
        return self._client.publish(self.state_topic, _state(online, stamp), qos=1, retain=True)

    def _on_pre_connect(self, client: paho.Client, userdata: object) -> None:
        # The will of this CONNECT: offline, at the CONNECT's time.
        self._connected_ms = int(time.time() * 1000)
        if self._config.primary_host:
            client.will_set(self.state_topic, _state(False, self._connected_ms), qos=1,
                            retain=True)

    def _on_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags,
                    reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            log.warning("sparkplug_connect_refused", reason=str(reason))
            return
        self._generation += 1
        topics: list[tuple[str, int]] = [(f, 0) for f in self._filters]
        topics.append((self.state_topic, 1))
        client.subscribe(topics)
        log.info("sparkplug_connected", broker=f"{self._host}:{self._port}",
                 filters=self._filters, primary_host=self._config.primary_host)

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int,
                      reasons: list[ReasonCode], properties: Properties | None) -> None:
        # Subscribed: what edge nodes send once they see us online reaches us.
        with self._lock:
            self._said = False  # the will stands for offline
            self._say()

    def _on_disconnect(self, client: paho.Client, userdata: object,
                       flags: paho.DisconnectFlags, reason: ReasonCode,
                       properties: Properties | None) -> None:
        with self._lock:
            self._said = None
        self._metrics.sparkplug_online.set(0)
        if self._intake:
            log.warning("sparkplug_disconnected", reason=str(reason),
                        meaning="reconnecting with backoff; edge nodes see our will (offline)"
                                " and buffer")
        jitter_backoff(client, self._mqtt.reconnect_max_backoff_s)

    def _on_message(self, client: paho.Client, userdata: object,
                    message: paho.MQTTMessage) -> None:
        topic = message.topic
        if topic == self.state_topic:
            self._own_state(bytes(message.payload))
            return
        if self._intake:
            self._deliver(Message(self._generation, message.mid, 0, topic,
                                  bytes(message.payload), datetime.now(UTC)))

    def _own_state(self, payload: bytes) -> None:
        """A STATE of ours: if a stale will says offline while we are online, say online."""
        try:
            online = bool(json.loads(payload).get("online"))
        except (ValueError, AttributeError):
            return
        with self._lock:
            if not online and self._said and self._want_online:
                self._said = False
                self._say()


def _state(online: bool, stamp_ms: int) -> bytes:
    return json.dumps({"online": online, "timestamp": stamp_ms}).encode()
