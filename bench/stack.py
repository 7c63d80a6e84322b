"""The benchmarks' stack: a throwaway TimescaleDB and Mosquitto (fsync on), load
published to them (a backlog, or live pre-framed packets), and `bmsd run` on
them with its CPU and memory read from /proc (`Bmsd`)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from bmsd.schema.migrate import migrate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's tools/
from tools.localstack import LocalMosquitto, LocalPostgres, free_port

REPO = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


# --- load -------------------------------------------------------------------------

def _reading(n: int, k: int, start: datetime, battery: bool = False) -> dict[str, Any]:
    stamp = (start + timedelta(milliseconds=n * 100 + k)).isoformat()
    if battery:  # what the alert rules watch: 9 rules and the flags apply
        return {"timestamp": stamp, "voltage": 400.0, "current": -20.0, "power_w": -8000.0,
                "soc": 55.0, "cell_voltages": [3.3 + i / 1000 for i in range(16)],
                "cell_temperatures": [25.0 + i / 10 for i in range(16)], "alarm_flags": []}
    return {"timestamp": stamp, "power_kw": float(k), "energy_kwh": 0.01, "voltage": 400.0}


def _publisher(port: int, client_id: str) -> paho.Client:
    """Return a connected QoS 1 publisher with a wide in-flight window."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv311)
    client.username_pw_set("bench", "bench")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def publish_backlog(port: int, first: int, count: int, per_message: int, devices: int,
                    battery: bool = False) -> None:
    """Publish *count* QoS 1 messages and wait for every PUBACK (a process of its own)."""
    client = _publisher(port, f"bench-pub-{first}")
    start = datetime.now(UTC) - timedelta(hours=30)
    infos = []
    for n in range(first, first + count):
        readings = [_reading(n, k, start, battery) for k in range(per_message)]
        payload = json.dumps(readings[0] if per_message == 1 else {"readings": readings})
        # at most 100 packs a site: bmsd registers as many new devices a minute
        topic = (f"site/bench{n % devices // 100}/pack{n % devices}/battery" if battery
                 else f"factory/bench/m{n % devices}/energy")
        infos.append(client.publish(topic, payload, qos=1))
    for info in infos:
        info.wait_for_publish(300)
    client.disconnect()
    client.loop_stop()


def _mqtt_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def _mqtt_packet(kind: int, body: bytes) -> bytes:
    """Return an MQTT packet: its first byte, the remaining length, the body."""
    head, n = bytearray([kind]), len(body)
    while True:
        n, digit = divmod(n, 128)
        head.append(digit | (128 if n else 0))
        if not n:
            return bytes(head) + body


def publish_live(port: int, rate: float, seconds: float, count: Any = None,
                 devices: int = 40) -> None:
    """Publish at *rate* messages/s for *seconds*, QoS 1, each stamped when sent.

    The packets are written straight to a socket (MQTT 3.1.1), not through paho:
    at half of bmsd's rate a paho publisher took most of a core of this 2-core
    box, and the readings then queued behind the load generator, not bmsd.
    Here a message costs a few microseconds: a timestamp and a few bytes.
    *count* (a multiprocessing.Value) is set to the messages sent, all acknowledged.
    """
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    flags = 0x80 | 0x40 | 0x02  # user name, password, clean session
    sock.sendall(_mqtt_packet(0x10, _mqtt_string("MQTT") + bytes([4, flags]) + struct.pack(
        ">H", 60) + b"".join(map(_mqtt_string, ("bench-live", "bench", "bench")))))
    if sock.recv(4) != b"\x20\x02\x00\x00":
        raise RuntimeError("the broker refused the live publisher")
    topics = [_mqtt_string(f"factory/live/d{i}/energy") for i in range(devices)]
    sock.setblocking(False)
    acked = sent = 0  # acked: bytes of PUBACKs, 4 each
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        due = int(elapsed * rate)
        now = datetime.now(UTC)
        packets = []
        for n in range(sent, due):
            # one microsecond apart: readings sent together keep distinct keys
            stamp = (now + timedelta(microseconds=n - sent)).isoformat()
            payload = b'{"timestamp": "%s", "power_kw": 1.0}' % stamp.encode()
            packets.append(_mqtt_packet(0x32, topics[n % devices]
                                        + struct.pack(">H", n % 65535 + 1) + payload))
        if packets:
            sock.setblocking(True)
            sock.sendall(b"".join(packets))
            sock.setblocking(False)
            sent = due
        try:
            while data := sock.recv(65536):
                acked += len(data)
        except BlockingIOError:
            pass
        time.sleep(0.002)
    sock.setblocking(True)
    sock.settimeout(60)
    while acked < 4 * sent:
        acked += len(sock.recv(65536))
    sock.sendall(b"\xe0\x00")  # DISCONNECT
    sock.close()
    if count is not None:
        count.value = sent


def forget_session(port: int, client_id: str) -> None:
    """Delete a finished consumer's session: otherwise the broker goes on queueing
    every later backlog for it too, and each run is slower than the one before."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv311, clean_session=True)
    client.username_pw_set("bench", "bench")
    client.connect("127.0.0.1", port)
    client.loop_start()
    time.sleep(0.2)
    client.disconnect()
    client.loop_stop()


def backlog(port: int, messages: int, per_message: int, publishers: int = 2,
            battery: bool = False, devices: int = 50) -> int:
    per = messages // publishers
    procs = [multiprocessing.Process(target=publish_backlog,
                                     args=(port, i * per, per, per_message, devices, battery))
             for i in range(publishers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return per * publishers


# --- the stack ----------------------------------------------------------------------

class Stack:
    """A throwaway TimescaleDB and Mosquitto for one benchmark run."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="bmsd-bench-"))
        self.folder.chmod(0o755)  # the servers run as their own users when we are root
        self.pg = LocalPostgres(self.folder / "pg",
                                extra_settings="track_commit_timestamp = on\n").start()
        self.broker = LocalMosquitto(self.folder / "mqtt", REPO / "mosquitto.conf",
                                     users={"bmsd": "bench", "bench": "bench"},
                                     extra_acl="user bench\ntopic readwrite #\n").start()
        self.runs = 0

    def database(self) -> str:
        self.runs += 1
        name = f"bench_{self.runs}"
        with psycopg.connect(self.pg.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        url = self.pg.url(name)
        migrate(url, skip_community=True)
        return url

    def drop(self, url: str) -> None:
        """Drop a finished run's database: its policy jobs (aggregate refreshes every
        minute) would otherwise load the server during every later run."""
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.pg.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def close(self) -> None:
        self.broker.stop()
        self.pg.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def stored(url: str, table: str = "energy_readings") -> int:
    with psycopg.connect(url) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # type: ignore[index]


def any_stored(url: str, table: str) -> bool:
    """Whether a first row is committed (cheap: polled often, unlike a count)."""
    with psycopg.connect(url) as conn:
        return conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None


def commit_rate(url: str, table: str) -> float:
    """Rows per second committed after the first commit, by the server's commit times.

    The rows of the first transaction start the clock and are not counted;
    the time is the server's, so how often the harness polls does not matter.
    """
    with psycopg.connect(url) as conn:
        row = conn.execute(f"""
            WITH c AS (SELECT pg_xact_commit_timestamp(xmin) AS at FROM {table}),
                 f AS (SELECT min(at) AS first FROM c)
            SELECT extract(epoch FROM max(at) - min(at))::float8,
                   count(*) FILTER (WHERE at > (SELECT first FROM f))
              FROM c""").fetchone()
    assert row is not None
    span, later = row
    return float(later) / span


# --- bmsd -----------------------------------------------------------------------------

class Bmsd:
    """`bmsd run` on the benchmark stack."""

    def __init__(self, stack: Stack, url: str, client_id: str, extra_config: str = "",
                 extra_mqtt: str = "") -> None:
        self.client_id = client_id
        self.port = stack.broker.port
        self.state = Path(tempfile.mkdtemp(prefix="bmsd-bench-run-"))
        config = self.state / "bmsd.toml"
        config.write_text(f'log_format = "json"\nlog_level = "warning"\n{extra_config}'
                          f'[mqtt]\nclient_id = "{client_id}"\n{extra_mqtt}')
        self.env = {**os.environ, "BMSD_DATABASE_URL": url, "BMSD_MQTT_URL": stack.broker.url,
                    "BMSD_METRICS_ADDR": f"127.0.0.1:{free_port()}"}
        self.argv = [sys.executable, "-m", "bmsd", "run", "--config", str(config)]
        self.proc: subprocess.Popen[bytes] | None = None

    def alert_seconds(self) -> tuple[float, float, float]:
        """Return the seconds bmsd spent on alerts, the batches, and the device histories
        evaluated again (readings out of order), from its /metrics."""
        addr = self.env["BMSD_METRICS_ADDR"]
        text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
        sums: dict[str, float] = {}
        for name, _, value in (line.partition(" ") for line in text.splitlines()):
            if name.startswith(("bmsd_alert_evaluation_seconds_",
                                "bmsd_alert_history_replays_total")):
                key = name.partition("{")[0]
                sums[key] = sums.get(key, 0.0) + float(value)
        return (sums.get("bmsd_alert_evaluation_seconds_sum", 0.0),
                sums.get("bmsd_alert_evaluation_seconds_count", 0.0),
                sums.get("bmsd_alert_history_replays_total", 0.0))

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env,
                                     stdout=(self.state / "bmsd.log").open("ab"),
                                     stderr=subprocess.STDOUT)

    def usage(self) -> tuple[float, float]:
        """Return (CPU seconds, peak RSS in MB) of the running process."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICKS
        return cpu, self.memory("VmHWM")

    def memory(self, key: str = "VmRSS") -> float:
        """Return a memory figure of /proc's status in MB: VmRSS (now), VmHWM (peak)."""
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith(key + ":"))
        return int(line.split()[1]) / 1024

    def stop(self, forget: bool = False) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        shutil.rmtree(self.state, ignore_errors=True)
        if forget:
            forget_session(self.port, self.client_id)

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise SystemExit(f"bmsd exited: {(self.state / 'bmsd.log').read_text()[-2000:]}")


