"""A real Mosquitto for tests, configured from the repo's mosquitto.conf and ACL.

The broker is the one at ``BMSD_TEST_MQTT_URL`` when set (used as it is:
every client connects with that URL's credentials); else a throwaway local
``mosquitto`` process on a free port, with the users below; else an
``eclipse-mosquitto`` container where a Docker engine answers.
``broker_factory`` starts brokers of a test's own (local only), for tests
that stop or restart one.

Anonymous clients are refused, as in production. bmsd logs in as ``bmsd``;
tests publish and watch as ``tester``, whom only the tests' ACL lines let
read and write everything; ``alpha`` and ``beta`` are field gateways of
sites of those names.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tools.localstack import LocalMosquitto, mosquitto_config

REPO_CONF = Path(__file__).resolve().parent.parent / "mosquitto.conf"
USERS = {"bmsd": "bmsd-test-password", "simulator": "simulator-test-password",
         "tester": "tester-test-password", "alpha": "alpha-test-password",
         "beta": "beta-test-password"}
TEST_ACL = "user tester\ntopic readwrite #\n"


@dataclass
class Broker:
    """The MQTT broker a test talks to; `url` logs in as bmsd."""

    url: str
    local: LocalMosquitto | None = None

    def url_as(self, user: str) -> str:
        return self.local.url_as(user) if self.local is not None else self.url

    @property
    def publisher_url(self) -> str:
        """Return the URL tests publish and subscribe with."""
        return self.url_as("tester")


def local_broker(state: Path) -> LocalMosquitto:
    """Return a local broker with the test users (not started)."""
    return LocalMosquitto(state, REPO_CONF, users=dict(USERS), extra_acl=TEST_ACL)


@pytest.fixture(scope="session")
def mqtt_broker() -> Iterator[Broker]:
    """Return the session's MQTT broker, starting one if none is given."""
    if url := os.environ.get("BMSD_TEST_MQTT_URL"):
        yield Broker(url=url)
        return
    if shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists():
        state = Path(tempfile.mkdtemp(prefix="bmsd-test-mqtt-"))
        local = local_broker(state).start()
        try:
            yield Broker(url=local.url, local=local)
        finally:
            local.stop()
            shutil.rmtree(state, ignore_errors=True)
        return
    from testcontainers.core.container import DockerContainer

    conf_dir = Path(tempfile.mkdtemp(prefix="bmsd-test-mqtt-conf-"))
    # No mosquitto_passwd here to make a password file: an anonymous broker.
    conf = mosquitto_config(REPO_CONF.read_text(), 1883, Path("/mosquitto/data"),
                            "0.0.0.0")  # noqa: S104 - in the container, behind its port map
    conf = "\n".join(line for line in conf.splitlines()
                     if not line.startswith(("password_file", "acl_file", "allow_anonymous")))
    (conf_dir / "mosquitto.conf").write_text(conf + "\nallow_anonymous true\n")
    container = (DockerContainer("eclipse-mosquitto:2")
                 .with_volume_mapping(str(conf_dir), "/mosquitto/config")
                 .with_exposed_ports(1883))
    with container:
        host = container.get_container_host_ip()
        yield Broker(url=f"mqtt://{host}:{container.get_exposed_port(1883)}")


@pytest.fixture
def broker_factory() -> Iterator[Callable[..., LocalMosquitto]]:
    """Return a function that starts a broker of the test's own; *extra_config* lines
    (``max_inflight_messages 0``, say) are added after the repo's mosquitto.conf."""
    started: list[tuple[LocalMosquitto, Path]] = []

    def start(extra_config: str = "") -> LocalMosquitto:
        state = Path(tempfile.mkdtemp(prefix="bmsd-test-mqtt-"))
        broker = local_broker(state)
        broker.extra_config = extra_config
        broker.start()
        started.append((broker, state))
        return broker

    yield start
    for broker, state in started:
        broker.stop()
        shutil.rmtree(state, ignore_errors=True)
