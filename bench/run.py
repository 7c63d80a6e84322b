"""Benchmark bmsd against the limits of its machine, measured in the same run (not a test).

    .venv/bin/python bench/run.py                 # the table; --results bench/RESULTS.md to save it

Everything runs on this machine against a throwaway local TimescaleDB and
Mosquitto (started like the test fixtures, fsync on). Repetitions are
interleaved and medians reported, because the machine is noisy.

- Load source: the backlog is published while the consumer is stopped, so the
  broker queues it for the consumer's persistent session; the consumer is
  then started and timed until the last reading is committed. The publisher
  is therefore never the bottleneck.
- Limit (a): a do-nothing paho-mqtt subscriber, same library, MQTT 3.1.1,
  QoS 1, manual acks sent at once, draining the same backlog.
- Limit (b): binary COPY of the same rows straight into the same hypertable,
  as many rows a transaction as bmsd's batches hold (``max_batch_rows``).
- bmsd: `bmsd run` with the shipped defaults, 1 and 100 readings per message;
  CPU seconds and peak RSS read from /proc. A run whose stored row count
  differs from what was published is reported as FAILED.
- Rates of COPY and bmsd alike: rows committed after the first commit, over
  the span from the first commit to the last, by the server's commit times
  (track_commit_timestamp), so the harness's polling neither loads the
  database nor sets the clock.
- bmsd scaled out: ``--instances`` (default 2) `bmsd run` members of one
  shared group (``[mqtt] shared_group``, README "Scaling out") draining the
  same backlogs; one process per core is how a box is used by bmsd, while the
  do-nothing subscriber is one process either way.
- Latency: publish-to-commit at half of bmsd's measured single-reading rate,
  from the reading's timestamp (set at publish) to its transaction's commit
  time (track_commit_timestamp), p50/p95/p99 over every row; medians of
  ``--repeat`` runs. The publisher writes pre-framed MQTT packets to a
  socket (`publish_live`): a paho publisher took 0.9 of a core for 12,000
  msg/s, and readings then queued behind the load generator, not behind bmsd.
  ``--only latency --latency-rate N`` runs this alone.
- Memory through a database outage: at the same rate, PostgreSQL is stopped
  for ``--outage-s`` (60) and started again; bmsd's peak RSS before, during
  and after (until every published reading is stored), once (`bmsd_outage`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from bmsd.config import IngestConfig
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


# --- limit (a): a do-nothing subscriber -----------------------------------------------

def subscriber_limit(stack: Stack, messages: int) -> dict[str, float]:
    client_id = f"bench-null-{stack.runs}-{time.monotonic_ns()}"
    received = 0
    done = threading.Event()

    def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        nonlocal received
        client.ack(message.mid, message.qos)
        received += 1
        if received >= messages:
            done.set()

    def connect() -> paho.Client:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=paho.MQTTv311, clean_session=False, manual_ack=True)
        client.username_pw_set("bench", "bench")
        client.on_message = on_message
        client.connect("127.0.0.1", stack.broker.port)
        client.subscribe("factory/+/+/energy", qos=1)
        return client

    first = connect()
    first.loop_start()
    time.sleep(0.5)
    first.disconnect()
    first.loop_stop()
    sent = backlog(stack.broker.port, messages, 1)
    started = time.perf_counter()
    client = connect()
    client.loop_start()
    if not done.wait(300):
        raise SystemExit(f"FAILED: the null subscriber got {received} of {sent}")
    elapsed = time.perf_counter() - started
    client.disconnect()
    client.loop_stop()
    forget_session(stack.broker.port, client_id)
    return {"messages_per_s": sent / elapsed}


# --- limit (b): binary COPY ---------------------------------------------------------------

def copy_limit(stack: Stack, rows: int) -> dict[str, float]:
    url = stack.database()
    start = datetime.now(UTC) - timedelta(hours=30)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO organizations (slug, name) VALUES ('o', 'o')")
        conn.execute("INSERT INTO sites (organization_id, slug, name) VALUES (1, 's', 's')")
        for d in range(50):
            conn.execute("INSERT INTO devices (site_id, slug, kind) VALUES (1, %s, 'meter')",
                         (f"m{d}",))
        data = [(start + timedelta(milliseconds=n * 100), n % 50 + 1, 0.0, 0.01, 400.0)
                for n in range(rows)]
        started = time.perf_counter()
        per = IngestConfig().max_batch_rows
        for i in range(0, rows, per):
            with conn.transaction(), conn.cursor() as cur, cur.copy(
                "COPY energy_readings (time, device_id, power_kw, energy_kwh, voltage)"
                " FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["timestamptz", "int4", "float8", "float8", "float8"])
                for row in data[i:i + per]:
                    copy.write_row(row)
        elapsed = time.perf_counter() - started
    if stored(url) != rows:
        raise SystemExit("FAILED: COPY stored a different number of rows")
    rate = commit_rate(url, "energy_readings")
    stack.drop(url)
    return {"rows_per_s": rate, "wall_rows_per_s": rows / elapsed}


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

    def alert_seconds(self) -> tuple[float, float]:
        """Return the seconds bmsd spent on alerts, and the batches, from its /metrics."""
        addr = self.env["BMSD_METRICS_ADDR"]
        text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
        sums = {name: float(value) for name, _, value in
                (line.partition(" ") for line in text.splitlines())
                if name.startswith("bmsd_alert_evaluation_seconds_")}
        return (sums.get("bmsd_alert_evaluation_seconds_sum", 0.0),
                sums.get("bmsd_alert_evaluation_seconds_count", 0.0))

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


def bmsd_drain(stack: Stack, messages: int, per_message: int, extra_config: str = "",
               battery: bool = False, instances: int = 1,
               extra_mqtt: str = "", devices: int = 50) -> dict[str, float]:
    """Time *instances* `bmsd run` (members of one shared group when *extra_mqtt* sets
    one) draining a backlog of *messages* from *devices*, from the first commit to the
    last row."""
    table = "battery_telemetry" if battery else "energy_readings"
    url = stack.database()
    ids = [f"bench-bmsd-{stack.runs}" + (f"-{i}" if instances > 1 else "")
           for i in range(instances)]
    for client_id in ids:  # create the session and its subscriptions, then stop
        daemon = Bmsd(stack, url, client_id, extra_config, extra_mqtt)
        daemon.start()
        time.sleep(2.5)
        daemon.stop()
    sent = backlog(stack.broker.port, messages, per_message, battery=battery, devices=devices)
    expected = sent * per_message
    daemons = [Bmsd(stack, url, client_id, extra_config, extra_mqtt) for client_id in ids]
    cpu_before = [0.0] * instances
    for daemon in daemons:
        daemon.start()
    # CPU is counted from the first commit, not from process start-up; a cheap
    # probe finds it. Then a count every 0.25 s finds the end (a count every few
    # milliseconds would load the database being measured); the rate comes from
    # the server's commit times (`commit_rate`).
    while not any_stored(url, table):
        for daemon in daemons:
            daemon.check_alive()
        time.sleep(0.01)
    cpu_before = [daemon.usage()[0] for daemon in daemons]
    while stored(url, table) < expected:
        for daemon in daemons:
            daemon.check_alive()
        time.sleep(0.25)
    cpu = [daemon.usage()[0] - before for daemon, before in zip(daemons, cpu_before,
                                                                strict=True)]
    rss = max(daemon.usage()[1] for daemon in daemons)
    # The alert engine's own time (evaluate and write, in the batch's
    # transaction), steadier than the difference of two noisy rates.
    alert_s, alert_batches = map(sum, zip(*(daemon.alert_seconds() for daemon in daemons),
                                          strict=True))
    for daemon in daemons:
        daemon.stop(forget=True)
    final = stored(url, table)
    if final != expected:
        raise SystemExit(f"FAILED: bmsd stored {final} readings of {expected} published")
    rate = commit_rate(url, table)
    stack.drop(url)
    return {"messages_per_s": rate / per_message, "rows_per_s": rate,
            "cpu_s_per_1000": sum(cpu) / expected * 1000,
            "cpu_s_per_instance": sum(cpu) / instances, "peak_rss_mb": rss,
            "alert_ms_per_batch": alert_s / alert_batches * 1000 if alert_batches else 0.0}


def bmsd_latency(stack: Stack, rate: float, seconds: float,
                 extra_config: str = "") -> dict[str, float]:
    url = stack.database()
    daemon = Bmsd(stack, url, f"bench-latency-{stack.runs}", extra_config)
    daemon.start()
    time.sleep(3)
    sent = multiprocessing.Value("q", -1)
    publisher = multiprocessing.Process(target=publish_live,
                                        args=(stack.broker.port, rate, seconds, sent))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    publisher.start()
    publisher.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    publisher_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    time.sleep(2)
    daemon.check_alive()
    daemon.stop(forget=True)
    with psycopg.connect(url) as conn:
        row = conn.execute("""
            SELECT count(*), percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (
                       ORDER BY extract(epoch FROM pg_xact_commit_timestamp(xmin) - time))
              FROM energy_readings""").fetchone()
    stack.drop(url)
    assert row is not None
    count, (p50, p95, p99) = row
    if count != sent.value:
        raise SystemExit(f"FAILED: bmsd stored {count} readings of {sent.value} published")
    return {"rows": count, "rate": count / seconds, "p50": p50, "p95": p95, "p99": p99,
            "publisher_cores": publisher_cpu / seconds}


def bmsd_outage(stack: Stack, rate: float, outage_s: float = 60,
                extra_config: str = "") -> dict[str, float]:
    """bmsd's memory while the database is down for *outage_s* under a steady load.

    The publisher runs 10 s before the outage, through it and 20 s after;
    PostgreSQL is stopped and started again. Reported: bmsd's peak RSS before,
    during and after the outage (until every published reading is stored),
    and the seconds from the restart until then.
    """
    url = stack.database()
    daemon = Bmsd(stack, url, f"bench-outage-{stack.runs}", extra_config)
    daemon.start()
    time.sleep(3)
    sent = multiprocessing.Value("q", -1)
    publisher = multiprocessing.Process(target=publish_live, args=(
        stack.broker.port, rate, 10 + outage_s + 20, sent))
    peaks = {"before": 0.0, "during": 0.0, "after": 0.0}

    def sample(phase: str, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            daemon.check_alive()
            peaks[phase] = max(peaks[phase], daemon.memory())
            time.sleep(0.5)

    publisher.start()
    sample("before", 10)
    stack.pg.stop()
    sample("during", outage_s)
    stack.pg.start()
    back = time.monotonic()
    publisher.join()
    deadline = time.monotonic() + 600
    sample("after", 2)
    while (count := stored(url)) != sent.value and time.monotonic() < deadline:
        sample("after", 2)
    caught_up = time.monotonic() - back
    daemon.check_alive()
    daemon.stop(forget=True)
    stack.drop(url)
    if count != sent.value:
        raise SystemExit(f"FAILED: bmsd stored {count} readings of {sent.value} published")
    return {"rows": count, "rate": rate, "rss_before_mb": peaks["before"],
            "rss_during_mb": peaks["during"], "rss_after_mb": peaks["after"],
            "caught_up_s": caught_up}


# --- the table ----------------------------------------------------------------------------

def median(results: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=30_000,
                        help="single-reading messages per drain")
    parser.add_argument("--batched-messages", type=int, default=5000,
                        help="messages of 100 readings per drain")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--latency-s", type=float, default=20)
    parser.add_argument("--latency-rate", type=float,
                        help="messages/s of the latency and outage runs (default: half the"
                             " single rate); with --only latency or outage, those runs alone")
    parser.add_argument("--outage-s", type=float, default=60,
                        help="how long the database is down in the outage run")
    parser.add_argument("--instances", type=int, default=2,
                        help="members of one shared group, for the scaled-out rows")
    parser.add_argument("--packs", type=int, default=50,
                        help="battery packs sending the battery drains' readings (the"
                             " alerts' cost is per device and batch as well as per reading)")
    parser.add_argument("--results", type=Path, help="write the table as Markdown here")
    parser.add_argument("--only", help="comma-separated steps to run (a quick A/B; no table):"
                                       " null, copy, single, batched, battery, battery-off,"
                                       " single-n, batched-n, latency, outage")
    args = parser.parse_args()

    stack = Stack()
    runs: dict[str, list[dict[str, float]]] = {
        "null": [], "copy": [], "single": [], "batched": [], "battery": [], "battery-off": [],
        "single-n": [], "batched-n": []}
    group = 'shared_group = "bench"\n'
    steps: list[tuple[str, Callable[[], dict[str, float]]]] = [
        ("null", lambda: subscriber_limit(stack, args.messages)),
        ("copy", lambda: copy_limit(stack, args.batched_messages * 100)),
        ("single", lambda: bmsd_drain(stack, args.messages, 1)),
        ("batched", lambda: bmsd_drain(stack, args.batched_messages, 100)),
        ("battery", lambda: bmsd_drain(stack, args.messages, 1, battery=True,
                                       devices=args.packs)),
        ("battery-off", lambda: bmsd_drain(stack, args.messages, 1,
                                           "[alerts]\nenabled = false\n", battery=True,
                                           devices=args.packs)),
        ("single-n", lambda: bmsd_drain(stack, args.messages, 1, instances=args.instances,
                                        extra_mqtt=group)),
        ("batched-n", lambda: bmsd_drain(stack, args.batched_messages, 100,
                                         instances=args.instances, extra_mqtt=group)),
    ]
    if args.only:
        chosen = args.only.split(",")
        steps = [(name, step) for name, step in steps if name in chosen]
    try:
        for rep in range(args.repeat if steps else 0):
            for name, step in steps:
                result = step()
                runs[name].append(result)
                print(f"run {rep + 1} {name:8} " + " ".join(f"{k}={v:,.2f}"
                                                           for k, v in result.items()),
                      flush=True)
        chosen = args.only.split(",") if args.only else ["latency", "outage"]
        rate = args.latency_rate or median(runs["single"], "messages_per_s") / 2
        latencies = []
        for rep in range(max(args.repeat, 1) if "latency" in chosen else 0):
            latencies.append(bmsd_latency(stack, rate, args.latency_s))
            print(f"run {rep + 1} latency  " + " ".join(
                f"{k}={v:,.3f}" for k, v in latencies[-1].items()), flush=True)
        if "outage" in chosen:
            outage = bmsd_outage(stack, rate, args.outage_s)
            print("outage  " + " ".join(f"{k}={v:,.1f}" for k, v in outage.items()), flush=True)
    finally:
        stack.close()
    if args.only:
        return
    latency = {key: median(latencies, key) for key in latencies[0]}

    null = median(runs["null"], "messages_per_s")
    copy = median(runs["copy"], "rows_per_s")
    single = runs["single"]
    batched = runs["batched"]
    battery_on = median(runs["battery"], "messages_per_s")
    battery_off = median(runs["battery-off"], "messages_per_s")
    rows = [
        ("Limit (a): do-nothing paho subscriber, QoS 1", f"{null:,.0f} msg/s", "", ""),
        ("Limit (b): binary COPY into the hypertable", f"{copy:,.0f} rows/s", "", ""),
        ("bmsd, 1 reading per message", f"{median(single, 'messages_per_s'):,.0f} msg/s",
         f"{median(single, 'messages_per_s') / null:.2f} x subscriber",
         "≥ 0.80 x do-nothing subscriber"),
        ("bmsd, 100 readings per message", f"{median(batched, 'rows_per_s'):,.0f} rows/s",
         f"{median(batched, 'rows_per_s') / copy:.2f} x COPY", "≥ 0.60 x COPY"),
        (f"bmsd x {args.instances} instances (shared group), 1 reading per message",
         f"{median(runs['single-n'], 'messages_per_s'):,.0f} msg/s",
         f"{median(runs['single-n'], 'messages_per_s') / null:.2f} x subscriber",
         "≥ 0.80 x do-nothing subscriber"),
        (f"bmsd x {args.instances} instances (shared group), 100 readings per message",
         f"{median(runs['batched-n'], 'rows_per_s'):,.0f} rows/s",
         f"{median(runs['batched-n'], 'rows_per_s') / copy:.2f} x COPY", "≥ 0.60 x COPY"),
        ("CPU s per 1000 readings (1 / 100 per msg)",
         f"{median(single, 'cpu_s_per_1000'):.3f} / {median(batched, 'cpu_s_per_1000'):.3f}",
         "", "report; halve"),
        ("peak RSS (1 / 100 per msg)", f"{max(r['peak_rss_mb'] for r in single):.0f} /"
         f" {max(r['peak_rss_mb'] for r in batched):.0f} MB", "", "< 150 MB"),
        (f"peak RSS with the database down {args.outage_s:.0f} s at {outage['rate']:,.0f} msg/s:"
         " before / during / after",
         f"{outage['rss_before_mb']:.0f} / {outage['rss_during_mb']:.0f} /"
         f" {outage['rss_after_mb']:.0f} MB",
         f"caught up {outage['caught_up_s']:.0f} s after the restart", "< 150 MB, flat"),
        (f"battery readings (16 cells, {args.packs} packs), alerts on / off",
         f"{battery_on:,.0f} / {battery_off:,.0f} msg/s",
         f"alerts cost {1 - battery_on / battery_off:.1%};"
         f" {median(runs['battery'], 'alert_ms_per_batch'):.1f} ms of alerts per batch",
         "cost ≤ 5 %"),
        (f"publish→commit at {latency['rate']:,.0f} msg/s (half load) p50/p95/p99",
         f"{latency['p50'] * 1000:.0f} / {latency['p95'] * 1000:.0f} /"
         f" {latency['p99'] * 1000:.0f} ms",
         f"publisher used {latency['publisher_cores']:.2f} of a core",
         "p50 ≤ 50, p99 ≤ 250 ms"),
    ]
    table = ["| measure | median | ratio | target |", "|---|---|---|---|"]
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    machine = (f"{platform.node()}: {os.cpu_count()} cores,"
               f" {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB,"
               f" {platform.platform()}, Python {platform.python_version()}")
    text = "\n".join(table)
    print()
    print(text)
    if args.results:
        command = "bench/run.py " + " ".join(sys.argv[1:])
        head = (f"# Benchmark results\n\nMeasured {datetime.now(UTC):%Y-%m-%d} on {machine}"
                f" with `.venv/bin/python {command.strip()}` ({args.repeat} interleaved"
                f" repetitions, medians; {args.messages} single-reading messages and"
                f" {args.batched_messages} messages of 100 readings per drain).\n\n{text}\n")
        # the table is the file's first section; the sections below it are kept
        old = args.results.read_text() if args.results.exists() else ""
        rest = old[old.find("\n## ") + 1:] if "\n## " in old else ""
        args.results.write_text(head + ("\n" + rest if rest else ""))


if __name__ == "__main__":
    main()
