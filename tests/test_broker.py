"""The broker as shipped (mosquitto.conf, mosquitto/acl): who may connect and publish where."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import paho.mqtt.client as paho
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.fix_daemon import DaemonFactory, Publisher, wait_until
from tests.fix_mqtt import Broker


def connack(url: str) -> int:
    """Return the CONNACK reason code the broker gives a client logging in with *url*."""
    parts = urlsplit(url)
    codes: list[int] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{time.monotonic_ns()}",
                         protocol=paho.MQTTv5)
    if parts.username:
        client.username_pw_set(parts.username, parts.password)
    client.on_connect = lambda c, u, f, reason, p: codes.append(reason.value)
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
    client.loop_start()
    try:
        wait_until(lambda: codes, timeout_s=10, what="CONNACK")
    finally:
        client.disconnect()
        client.loop_stop()
    return codes[0]


def without_credentials(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.hostname}:{parts.port}"))


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(
        netloc=f"{parts.username}:{password}@{parts.hostname}:{parts.port}"))


def stored(db_url: str) -> list[str]:
    with psycopg.connect(db_url) as conn:
        return [str(r[0]) for r in conn.execute(
            "SELECT s.slug FROM battery_telemetry b JOIN devices d ON d.id = b.device_id"
            " JOIN sites s ON s.id = d.site_id ORDER BY b.time")]


@pytest.fixture(autouse=True)
def _local_broker_only(mqtt_broker: Broker) -> None:
    if mqtt_broker.local is None:
        pytest.skip("needs the harness's own broker, with the shipped ACL and test users")


def test_anonymous_clients_and_wrong_passwords_are_refused(mqtt_broker: Broker) -> None:
    # Mosquitto answers both with "not authorized" (135), whatever went wrong.
    assert connack(without_credentials(mqtt_broker.url)) == 135
    assert connack(with_password(mqtt_broker.url, "wrong")) == 135
    assert connack(mqtt_broker.url) == 0


def test_a_gateway_publishes_only_under_its_own_site(
    bmsd_daemon: DaemonFactory, mqtt_broker: Broker, db_url: str
) -> None:
    bmsd_daemon()
    alpha = Publisher(mqtt_broker.url_as("alpha"))
    try:
        reading = {"soc": 50.0, "voltage": 400.0}
        alpha.publish("site/beta/pack-1/battery",
                      json.dumps({**reading, "timestamp": "2026-12-03T10:00:00Z"}))
        alpha.publish("site/alpha/pack-1/battery",
                      json.dumps({**reading, "timestamp": "2026-12-03T10:00:01Z"}))
    finally:
        alpha.close()
    wait_until(lambda: stored(db_url), what="alpha's own reading")
    time.sleep(0.5)
    assert stored(db_url) == ["alpha"]


def test_bmsd_with_a_wrong_password_says_so_and_keeps_trying(
    bmsd_daemon: DaemonFactory, mqtt_broker: Broker,
) -> None:
    daemon = bmsd_daemon(broker_url=with_password(mqtt_broker.url, "not-the-password"),
                         wait_ready=False)

    def refusals() -> list[dict[str, Any]]:
        return [e for e in daemon.events() if e["event"] == "mqtt_connect_refused"]

    wait_until(lambda: len(refusals()) >= 2, timeout_s=30, what="two refused attempts")
    first, second = (datetime.fromisoformat(e["timestamp"]) for e in refusals()[:2])
    assert (second - first).total_seconds() >= 0.5  # with backoff, not in a tight loop
    assert daemon.proc is not None
    assert daemon.proc.poll() is None  # no crash loop: it waits and tries again
    status, body = daemon.http("/readyz")
    assert status == 503
    assert "the broker refused us: not authorized" in body
    refused = refusals()
    assert refused[0]["user"] == "bmsd"
    assert "password_file" in refused[0]["meaning"]
    assert "not-the-password" not in daemon.output()
    assert daemon.stop() == 0


def test_no_password_shows_in_the_logs_or_the_metrics(
    bmsd_daemon: DaemonFactory, mqtt_broker: Broker, publisher: Publisher, db_url: str,
) -> None:
    daemon = bmsd_daemon()  # logs in to the broker as bmsd, with its password
    publisher.publish("site/alpha/pack-1/battery",
                      {"timestamp": "2026-12-03T10:00:00Z", "soc": 50.0, "voltage": 400.0})
    wait_until(lambda: stored(db_url), what="a reading")
    password = urlsplit(mqtt_broker.url).password
    assert password
    assert password not in daemon.http("/metrics")[1]
    assert daemon.stop() == 0
    output = daemon.output()
    assert "bmsd_starting" in output
    assert password not in output
