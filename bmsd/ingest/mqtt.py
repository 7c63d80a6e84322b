"""The broker side: a persistent QoS 1 session whose messages we acknowledge
ourselves (`MqttSource`), and a connection of its own for alert
notifications (`MqttPublisher`).

paho-mqtt runs its own network thread (``loop_start``), which makes `ack`
safe to call from the ingest thread: paho queues the PUBACK and wakes its
thread. Messages are acknowledged only after their rows are committed, in
the order they arrived. Each connection has a generation number; an ack for
a message of an earlier connection is not sent (its packet id may now name
another message), and the broker redelivers it instead.

paho reconnects by itself with capped exponential backoff; we re-draw its
bounds at every disconnect, so many daemons do not retry in step (jitter).

Who may wait on whom
--------------------
Two threads meet here: the daemon's main thread (the ingest loop,
bmsd/ingest/daemon.py) and paho's network thread (``loop_start``). Only one
edge may wait, network thread -> main thread; main never waits on the network
thread, except to join it after `Inbox.close` has ended the one wait it has.
So no cycle can form, whatever the broker does:

==========================  ===============================================
moment                      who waits, on what, for how long
==========================  ===============================================
connect                     nobody: ``connect_async``; paho's thread connects
                            and subscribes in `_on_connect`
resumed session, SUBACK     the broker sends its queue (up to its window: all
                            of it with Mosquitto's ``max_inflight_messages 0``)
                            before the SUBACK. The main loop ingests from the
                            first message on and never waits for `subscribed`;
                            it sends READY=1 when it sees it set
inbox full                  the network thread, in `Inbox.put`: until the loop
                            takes a message (count), at most ``max_wait_s``
                            (bytes), or until `Inbox.close`. TCP then pushes
                            back on the broker; nothing is dropped
acknowledgement             nobody: `ack` queues PUBACKs and wakes the thread
                            (no paho lock the callbacks hold is taken)
broker restart              paho's thread alone: reconnect with backoff,
                            resubscribe in `_on_connect`; the loop goes on and
                            drops acks of the old connection (`generation`)
SIGHUP reload               nobody here: the rules are reread in the main loop
alert notifications         the loop pauses intake while too many wait for the
                            broker (`MqttPublisher.pending`); they are sent by
                            another connection's thread, which waits on nothing
SIGTERM drain               the loop drains the inbox (intake stopped: later
                            messages are not delivered, so not acknowledged),
                            then `Inbox.close`, then `close` joins the thread,
                            which no longer can be waiting; the drain itself is
                            bounded by ``shutdown_timeout_s``
==========================  ===============================================
"""

from __future__ import annotations

import contextlib
import random
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from bmsd.config import MqttConfig
from bmsd.errors import BrokerError, ConfigError, SessionTakenOver
from bmsd.ingest.buffered_client import ack_many, client_class
from bmsd.metrics import Metrics

log = structlog.get_logger("bmsd.ingest.mqtt")

DROPPED_TOPIC = "$SYS/broker/publish/messages/dropped"
_SESSION_TAKEN_OVER = 142
# A refused client id is a configuration error: retrying cannot help. Refused
# credentials are retried with backoff: the broker's password file may be
# fixed, or reloaded, while bmsd waits (a crash loop would help nobody).
_REFUSED_FOR_GOOD = {133: "client identifier not valid", 2: "client identifier rejected"}
_REFUSED_CREDENTIALS = {134: "bad user name or password", 4: "bad user name or password",
                        135: "not authorized", 5: "not authorized"}


@dataclass(slots=True)  # not frozen: one per message, and frozen costs 3x to build
class Message:
    """One message received and not yet acknowledged."""

    generation: int
    mid: int
    qos: int
    topic: str
    payload: bytes
    received_at: datetime
    dup: bool = False  # the broker sent it before (MQTT DUP flag)


def address(config: MqttConfig) -> tuple[str, int]:
    url = urlsplit(config.url)
    return url.hostname or "127.0.0.1", url.port or (8883 if url.scheme == "mqtts" else 1883)


def jitter_backoff(client: paho.Client, cap: float) -> None:
    """Draw *client*'s reconnect backoff bounds afresh, so many daemons do not retry in step."""
    client.reconnect_delay_set(min_delay=max(1, round(random.uniform(0.5, 2))),  # noqa: S311
                               max_delay=max(1, round(cap * random.uniform(0.75, 1))))  # noqa: S311


def log_in(client: paho.Client, config: MqttConfig) -> tuple[str | None, bool]:
    """Set *client*'s credentials and TLS from *config*; return the user and whether TLS."""
    url = urlsplit(config.url)
    user = unquote(url.username) if url.username else None
    if user:
        password = unquote(url.password) if url.password else None
        if password is None and config.password is not None:
            password = config.password.get_secret_value()
        client.username_pw_set(user, password)
    tls = url.scheme == "mqtts"
    if tls:
        try:
            client.tls_set(
                ca_certs=str(config.ca_file) if config.ca_file else None,
                certfile=str(config.cert_file) if config.cert_file else None,
                keyfile=str(config.key_file) if config.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"[mqtt] TLS files (ca_file, cert_file, key_file) cannot be used: {exc};"
                " check the paths and that bmsd's user can read them") from exc
    return user, tls


_EVENTS = ("connect", "connect_fail", "disconnect", "subscribe", "message", "pre_connect")


def new_client(config: MqttConfig, client_id: str, owner: object, clean: bool,
               manual_ack: bool = False) -> tuple[paho.Client, str | None, bool]:
    """Return a buffered paho client for *config*'s broker (its credentials, TLS and
    protocol; a clean session or not), whose callbacks are *owner*'s ``_on_<event>``
    methods; and the user it logs in as, and whether it uses TLS."""
    v5 = config.protocol == "5"
    client = client_class()(
        CallbackAPIVersion.VERSION2, client_id=client_id,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        clean_session=None if v5 else clean, manual_ack=manual_ack,
    )
    user, tls = log_in(client, config)
    jitter_backoff(client, config.reconnect_max_backoff_s)
    for event in _EVENTS:
        handler = getattr(owner, f"_on_{event}", None)
        if handler is not None:
            setattr(client, f"on_{event}", handler)
    return client, user, tls


class MqttSource:
    """Receive the routes' topics over a persistent session; ack on request."""

    def __init__(self, config: MqttConfig, filters: Iterable[str],
                 deliver: Callable[[Message], None], metrics: Metrics) -> None:
        self._config = config
        group = config.shared_group
        # A shared subscription: the broker gives each message to one member of
        # the group. Messages keep their own topic; only the filter changes.
        self._filters = [f"$share/{group}/{f}" if group else f for f in filters]
        self._deliver = deliver
        self._metrics = metrics
        self._generation = 0
        self._intake = True
        self._ever_connected = False
        self.subscribed = threading.Event()
        self.fatal: BrokerError | None = None
        self.refused: str | None = None  # why the broker refused the last attempt
        self.subscribed_at = datetime.now(UTC)
        self._host, self._port = address(config)
        self._v5 = config.protocol == "5"
        self._client, self._user, self._tls = new_client(config, config.client_id, self,
                                                         clean=False, manual_ack=True)

    # --- life cycle ---------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting until `close`."""
        if not self._v5:
            log.info("mqtt_window", receive_maximum=self._config.receive_maximum,
                     meaning="with MQTT 3.1.1 the broker's max_inflight_messages sets how many"
                             " unacknowledged messages it sends; it must equal [mqtt]"
                             " receive_maximum, else batches wait for the flush timer")
        properties = None
        if self._v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self._config.session_expiry_s
            properties.ReceiveMaximum = self._config.receive_maximum
        clean_start = False if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY
        self._client.connect_async(self._host, self._port, keepalive=self._config.keepalive_s,
                                   clean_start=clean_start, properties=properties)
        self._client.loop_start()

    def stop_intake(self) -> None:
        """Deliver no more messages; those that still arrive are redelivered later."""
        self._intake = False

    def close(self) -> None:
        """Disconnect (keeping the session at the broker) and stop the network thread."""
        self._intake = False
        properties = None
        if self._v5:
            properties = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self._config.session_expiry_s
        self._client.disconnect(properties=properties)
        self._client.loop_stop()
        self._metrics.mqtt_connected.set(0)


    # --- acknowledgement -----------------------------------------------------

    def ack(self, messages: Iterable[Message]) -> int:
        """Acknowledge *messages* in order; return how many were sent.

        Those received on an earlier connection are not: the broker sends them again.
        """
        generation = self._generation
        current = [m for m in messages if m.qos > 0 and m.generation == generation]
        if all(m.qos == 1 for m in current):
            ack_many(self._client, [m.mid for m in current])
        else:  # QoS 2 (not granted by our subscriptions): paho's own, one by one
            for message in current:
                self._client.ack(message.mid, message.qos)
        return len(current)

    # --- paho callbacks (network thread) ----------------------------------------

    def _on_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags,
                    reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            code = reason.value
            if code in _REFUSED_FOR_GOOD:
                self._set_fatal(BrokerError(
                    f"broker {self._host}:{self._port} refused us: {_REFUSED_FOR_GOOD[code]};"
                    " check the client id in [mqtt] client_id"))
            elif code in _REFUSED_CREDENTIALS:
                self.refused = _REFUSED_CREDENTIALS[code]
                log.error("mqtt_connect_refused", broker=f"{self._host}:{self._port}",
                          user=self._user, reason=self.refused,
                          meaning="check the user in BMSD_MQTT_URL / [mqtt] url and its password"
                                  " ([mqtt] password_file or the bmsd-mqtt-password credential)"
                                  " against the broker's password file and ACL; retrying with"
                                  " backoff")
            else:
                self.refused = str(reason)
                log.warning("mqtt_connect_refused", reason=str(reason))
            return
        self.refused = None
        self._generation += 1
        self._metrics.mqtt_connected.set(1)
        if flags.session_present:
            log.info("mqtt_connected", broker=f"{self._host}:{self._port}", session="resumed",
                     client_id=self._config.client_id)
        else:
            if self._ever_connected:
                self._metrics.sessions_lost.inc()
            log.warning(
                "mqtt_session_new", broker=f"{self._host}:{self._port}",
                client_id=self._config.client_id,
                meaning="the broker had no session for this client id: anything published"
                        " while bmsd was away was not queued for it (expected on the first"
                        " start with a client id; otherwise the broker lost its state)")
        self._ever_connected = True
        self.subscribed.clear()
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB) \
            if self._v5 else None
        topics: list[tuple[str, object]] = [(f, options if options else 1) for f in self._filters]
        topics.append((DROPPED_TOPIC, SubscribeOptions(qos=0) if self._v5 else 0))
        client.subscribe(topics)  # type: ignore[arg-type]

    def _on_connect_fail(self, client: paho.Client, userdata: object) -> None:
        # paho does not say why; these are the causes an operator can act on.
        self.refused = "cannot connect (network or TLS)"
        log.warning("mqtt_connect_failed", broker=f"{self._host}:{self._port}",
                    tls=self._tls,
                    meaning="the broker is unreachable, or (mqtts) its certificate is not"
                            " trusted or not issued for this host name: check the URL's host"
                            " and [mqtt] ca_file; retrying with backoff")

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int,
                      reasons: list[ReasonCode], properties: Properties | None) -> None:
        refused = [f for f, r in zip(self._filters, reasons, strict=False)
                   if r.is_failure or r.value < 1]
        if refused:
            self._set_fatal(BrokerError(
                f"broker refused QoS 1 subscriptions to {', '.join(refused)}; bmsd needs them"
                " (check the broker's ACL for this user)"))
            return
        self.subscribed_at = datetime.now(UTC)
        self.subscribed.set()
        log.info("mqtt_subscribed", filters=self._filters)

    def _on_disconnect(self, client: paho.Client, userdata: object,
                       flags: paho.DisconnectFlags, reason: ReasonCode,
                       properties: Properties | None) -> None:
        self.subscribed.clear()
        self._metrics.mqtt_connected.set(0)
        if reason.value == _SESSION_TAKEN_OVER:
            self._set_fatal(SessionTakenOver(
                f"another client connected to {self._host}:{self._port} with our client id"
                f" {self._config.client_id!r} and took over the session: are two bmsd"
                " instances running with the same [mqtt] client_id?"))
            return
        if self._intake:
            log.warning("mqtt_disconnected", reason=str(reason),
                        meaning="reconnecting with backoff; unacknowledged messages will be"
                                " redelivered")
        jitter_backoff(client, self._config.reconnect_max_backoff_s)

    def _on_message(self, client: paho.Client, userdata: object,
                    message: paho.MQTTMessage) -> None:
        topic = message.topic  # decoded at each access
        if topic == DROPPED_TOPIC:
            with contextlib.suppress(ValueError):
                self._metrics.broker_dropped.set(float(message.payload))
            return
        if not self._intake:
            return
        self._deliver(Message(self._generation, message.mid, message.qos, topic,
                              bytes(message.payload), datetime.now(UTC), bool(message.dup)))

    # --- helpers ---------------------------------------------------------------

    def _set_fatal(self, error: BrokerError) -> None:
        if self.fatal is None:
            self.fatal = error
            log.error("mqtt_fatal", error=str(error))
