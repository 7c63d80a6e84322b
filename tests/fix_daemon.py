"""Run `bmsd run` as a real process against the test servers, and publish to it."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import dump_toml
from tools.localstack import free_port

_ids = itertools.count()


@dataclass
class DaemonProcess:
    """A running `bmsd run` and how to reach it."""

    config_path: Path
    client_id: str
    env: dict[str, str]
    log_path: Path
    metrics_port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> DaemonProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bmsd", "run", "--config", str(self.config_path)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        if wait_ready:
            self.wait_ready()
        return self

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}{path}", timeout=2
            ) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def http_or_none(self, path: str, body: bool = False) -> Any:
        """Return the status (or, with *body*, the body) of GET *path*; None while the
        process does not listen yet."""
        try:
            status, text = self.http(path)
        except OSError:
            return None
        return text if body else status

    def metric_or_zero(self, name: str, **labels: str) -> float:
        """Return `metric`, or 0 while the process does not listen yet."""
        try:
            return self.metric(name, **labels)
        except OSError:
            return 0.0

    def wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"bmsd exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if self.http("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"bmsd not ready after {timeout_s} s:\n{self.output()}")

    def metric(self, name: str, **labels: str) -> float:
        """Return the sum of a metric's samples that carry *labels*."""
        total = 0.0
        for family in text_string_to_metric_families(self.http("/metrics")[1]):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    total += sample.value
        return total

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def rss_mb(self) -> float:
        """Return the process's resident memory now, in MiB."""
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.output().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


DaemonFactory = Callable[..., DaemonProcess]


@pytest.fixture
def bmsd_daemon(db_url: str, mqtt_broker: Any) -> Iterator[DaemonFactory]:
    """Return a function that starts `bmsd run` on this test's database and broker."""
    folder = Path(tempfile.mkdtemp(prefix="bmsd-test-daemon-"))
    started: list[DaemonProcess] = []

    def start(config: str = "", *, broker_url: str | None = None, database_url: str | None = None,
              client_id: str | None = None, wait_ready: bool = True,
              env: dict[str, str] | None = None) -> DaemonProcess:
        n = next(_ids)
        client_id = client_id or f"bmsd-test-{os.getpid()}-{n}"
        path = folder / f"bmsd-{n}.toml"
        settings = tomllib.loads(config)
        settings["log_format"] = "json"
        settings.setdefault("mqtt", {})["client_id"] = client_id
        path.write_text(dump_toml(settings))
        port = free_port()
        env = {**os.environ, "BMSD_DATABASE_URL": database_url or db_url,
               "BMSD_MQTT_URL": broker_url or mqtt_broker.url,
               "BMSD_METRICS_ADDR": f"127.0.0.1:{port}", **(env or {})}
        daemon = DaemonProcess(path, client_id, env, folder / f"bmsd-{n}.log", port)
        started.append(daemon)
        return daemon.start(wait_ready=wait_ready)

    yield start
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()
    shutil.rmtree(folder, ignore_errors=True)


class Publisher:
    """A QoS 1 publisher that waits until the broker has every message."""

    def __init__(self, url: str, client_id: str | None = None) -> None:
        parts = urlsplit(url)
        self.client = paho.Client(CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"pub-{os.getpid()}-{next(_ids)}",
                                  protocol=paho.MQTTv5)
        if parts.username:
            self.client.username_pw_set(unquote(parts.username),
                                        unquote(parts.password or ""))
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes | str | dict[str, Any] | list[Any],
                qos: int = 1, retain: bool = False) -> None:
        self.publish_many([(topic, payload)], qos=qos, retain=retain)

    def publish_many(self, messages: Iterable[tuple[str, Any]], qos: int = 1,
                     retain: bool = False) -> int:
        infos = []
        for topic, payload in messages:
            if isinstance(payload, dict | list):
                payload = json.dumps(payload)
            infos.append(self.client.publish(topic, payload, qos=qos, retain=retain))
        for info in infos:
            info.wait_for_publish(timeout=60)
            assert info.is_published(), "the broker did not acknowledge a publish"
        return len(infos)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(mqtt_broker: Any) -> Iterator[Publisher]:
    pub = Publisher(mqtt_broker.publisher_url)
    yield pub
    pub.close()


def wait_until(condition: Callable[[], Any], timeout_s: float = 30, what: str = "") -> Any:
    """Poll *condition* until it returns something truthy; fail after *timeout_s*."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or condition}")
        time.sleep(0.05)
