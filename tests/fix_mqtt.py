"""A real Mosquitto for tests, configured from the repo's mosquitto.conf.

The broker is the one at ``BMSD_TEST_MQTT_URL`` when set; else a throwaway
local ``mosquitto`` process on a free port; else an ``eclipse-mosquitto``
container where a Docker engine answers. ``broker_factory`` starts brokers
of a test's own (local only), for tests that stop or restart one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bmsd.localstack import LocalMosquitto, mosquitto_config

REPO_CONF = Path(__file__).resolve().parent.parent / "mosquitto.conf"


@dataclass
class Broker:
    """The MQTT broker a test talks to."""

    url: str
    local: LocalMosquitto | None = None


@pytest.fixture(scope="session")
def mqtt_broker() -> Iterator[Broker]:
    """Return the session's MQTT broker, starting one if none is given."""
    if url := os.environ.get("BMSD_TEST_MQTT_URL"):
        yield Broker(url=url)
        return
    if shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists():
        state = Path(tempfile.mkdtemp(prefix="bmsd-test-mqtt-"))
        local = LocalMosquitto(state, REPO_CONF).start()
        try:
            yield Broker(url=local.url, local=local)
        finally:
            local.stop()
            shutil.rmtree(state, ignore_errors=True)
        return
    from testcontainers.core.container import DockerContainer

    conf_dir = Path(tempfile.mkdtemp(prefix="bmsd-test-mqtt-conf-"))
    (conf_dir / "mosquitto.conf").write_text(
        mosquitto_config(REPO_CONF.read_text(), 1883, Path("/mosquitto/data"))
        .replace("listener 1883 127.0.0.1", "listener 1883 0.0.0.0"))
    container = (DockerContainer("eclipse-mosquitto:2")
                 .with_volume_mapping(str(conf_dir), "/mosquitto/config")
                 .with_exposed_ports(1883))
    with container:
        host = container.get_container_host_ip()
        yield Broker(url=f"mqtt://{host}:{container.get_exposed_port(1883)}")


@pytest.fixture
def broker_factory() -> Iterator[Callable[[], LocalMosquitto]]:
    """Return a function that starts a broker of the test's own."""
    started: list[tuple[LocalMosquitto, Path]] = []

    def start() -> LocalMosquitto:
        state = Path(tempfile.mkdtemp(prefix="bmsd-test-mqtt-"))
        broker = LocalMosquitto(state, REPO_CONF).start()
        started.append((broker, state))
        return broker

    yield start
    for broker, state in started:
        broker.stop()
        shutil.rmtree(state, ignore_errors=True)
