"""Alert notifications' own MQTT connection (see `MqttPublisher`)."""

from __future__ import annotations

import threading

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bmsd.config import MqttConfig
from bmsd.ingest.mqtt import address, jitter_backoff, log_in
from bmsd.metrics import Metrics

log = structlog.get_logger("bmsd")


class MqttPublisher:
    """Publish alert notifications with QoS 1 over a connection of their own.

    Not over the session that receives the readings: there the broker's
    PUBACKs wait behind the readings it is sending, which during a backlog
    are megabytes of gateway batches, so notifications would be acknowledged
    slowly and pile up in paho's memory. On this connection they are
    acknowledged in a round trip. `pending` counts those
    not acknowledged yet (paho keeps them, and sends them again after a
    reconnect); the daemon takes no new readings while it is above
    ``[alerts] max_pending_notifications``, so memory stays bounded and
    none is dropped.

    The client id is ``<[mqtt] client_id>-alerts``, with a clean session:
    what matters survives in paho's memory and, across a restart, in the
    retained documents that the daemon announces again at start.
    """

    def __init__(self, config: MqttConfig, metrics: Metrics) -> None:
        self._host, self._port = address(config)
        self._keepalive = config.keepalive_s
        self._v5 = config.protocol == "5"
        self.client_id = f"{config.client_id}-alerts"
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=paho.MQTTv5 if self._v5 else paho.MQTTv311,
                             clean_session=None if self._v5 else True)
        log_in(client, config)
        client.max_inflight_messages_set(1000)
        jitter_backoff(client, config.reconnect_max_backoff_s)
        client.on_publish = self._on_publish
        client.on_connect = self._on_connect
        self._client = client
        self._pending = 0
        self._acked = threading.Condition()
        metrics.notifications_pending.set_function(lambda: self._pending)

    @property
    def pending(self) -> int:
        """Notifications published and not acknowledged by the broker yet."""
        return self._pending

    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting until `close`."""
        self._client.connect_async(self._host, self._port, keepalive=self._keepalive)
        self._client.loop_start()

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        """Publish with QoS 1; paho keeps it until the broker acknowledges it."""
        with self._acked:
            self._pending += 1
        self._client.publish(topic, payload, qos=1, retain=retain)

    def wait_sent(self, timeout_s: float) -> bool:
        """Wait until every notification is acknowledged; False if *timeout_s* passed first."""
        with self._acked:
            return self._acked.wait_for(lambda: self._pending == 0, timeout_s)

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags,
                    reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            log.warning("mqtt_alerts_connect_refused", client_id=self.client_id,
                        reason=str(reason), pending=self._pending,
                        meaning="alert notifications wait in memory; retrying with backoff")

    def _on_publish(self, client: paho.Client, userdata: object, mid: int,
                    reason: ReasonCode, properties: Properties | None) -> None:
        with self._acked:
            self._pending -= 1
            if self._pending == 0:
                self._acked.notify_all()
