"""What bench/run.py measures: the machine's limits (a do-nothing subscriber,
binary COPY) and bmsd draining, under load, and through a database outage."""

from __future__ import annotations

import multiprocessing
import os
import resource
import statistics
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as paho
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from bmsd.config import IngestConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's tools/

from stack import (
    Bmsd,
    Stack,
    any_stored,
    backlog,
    commit_rate,
    forget_session,
    publish_live,
    stored,
)

REPO = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


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
    alert_s, alert_batches, replays = map(sum, zip(
        *(daemon.alert_seconds() for daemon in daemons), strict=True))
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
            "alert_ms_per_batch": alert_s / alert_batches * 1000 if alert_batches else 0.0,
            "history_replays": replays}


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


