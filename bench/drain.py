"""Measure how fast `bmsd run` drains a backlog queued at the broker (a benchmark, not a test).

The load is published while bmsd is stopped, so the broker queues it for
bmsd's persistent session and the publisher cannot be the bottleneck; then
bmsd is started and timed until every reading is committed. The run fails
if the stored row count differs from what was published.

    .venv/bin/python bench/drain.py --messages 50000 --per-message 1 --protocol 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as paho
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from bmsd.localstack import LocalMosquitto, LocalPostgres, free_port
from bmsd.migrate import migrate

REPO = Path(__file__).resolve().parent.parent


def publish(port: int, first: int, count: int, per_message: int, devices: int) -> None:
    """Publish *count* messages of *per_message* readings, QoS 1, and wait for every PUBACK."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{first}",
                         protocol=paho.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    start = datetime.now(UTC) - timedelta(hours=2)
    infos = []
    for n in range(first, first + count):
        device = n % devices
        readings = [{"timestamp": (start + timedelta(milliseconds=n * per_message + k)).isoformat(),
                     "power_kw": float(k), "energy_kwh": 0.01, "voltage": 400.0}
                    for k in range(per_message)]
        payload = json.dumps(readings[0] if per_message == 1 else {"readings": readings})
        infos.append(client.publish(f"factory/bench/m{device}/energy", payload, qos=1))
    for info in infos:
        info.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()


def run_once(pg: LocalPostgres, broker: LocalMosquitto, args: argparse.Namespace,
             run: int) -> dict[str, float]:
    dbname = f"bench_{run}"
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {dbname}")
    url = pg.url(dbname)
    migrate(url, skip_community=True)
    state = Path(tempfile.mkdtemp(prefix="bmsd-bench-"))
    config = state / "bmsd.toml"
    config.write_text(f'log_format = "json"\nlog_level = "warning"\n[mqtt]\n'
                      f'client_id = "bench-{run}"\nprotocol = "{args.protocol}"\n')
    env = {**os.environ, "BMSD_DATABASE_URL": url, "BMSD_MQTT_URL": broker.url,
           "BMSD_METRICS_ADDR": f"127.0.0.1:{free_port()}"}
    argv = [sys.executable, "-m", "bmsd", "run", "--config", str(config)]

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, env=env, stdout=(state / "bmsd.log").open("ab"),
                                stderr=subprocess.STDOUT)

    def stored() -> int:
        with psycopg.connect(url) as conn:
            return int(conn.execute("SELECT count(*) FROM energy_readings").fetchone()[0])

    daemon = start()  # create the session and its subscriptions
    time.sleep(2.5)
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(30)
    per_proc = args.messages // args.publishers
    procs = [multiprocessing.Process(target=publish, args=(broker.port, i * per_proc, per_proc,
                                                           args.per_message, args.devices))
             for i in range(args.publishers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    expected = per_proc * args.publishers * args.per_message
    started = time.perf_counter()
    daemon = start()
    while stored() < expected:
        if daemon.poll() is not None:
            raise SystemExit(f"bmsd exited: {(state / 'bmsd.log').read_text()[-2000:]}")
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(30)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    final = stored()
    shutil.rmtree(state, ignore_errors=True)
    if final != expected:
        raise SystemExit(f"FAILED: stored {final} readings, published {expected}")
    cpu = (usage.ru_utime + usage.ru_stime) - (usage_before.ru_utime + usage_before.ru_stime)
    return {"seconds": elapsed, "messages_per_s": per_proc * args.publishers / elapsed,
            "rows_per_s": expected / elapsed, "cpu_s": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--per-message", type=int, default=1)
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bmsd-bench-stack-"))
    folder.chmod(0o755)  # the servers run as their own users when we are root
    pg = LocalPostgres(folder / "pg").start()
    broker = LocalMosquitto(folder / "mqtt", REPO / "mosquitto.conf").start()
    try:
        results = [run_once(pg, broker, args, run) for run in range(args.runs)]
    finally:
        broker.stop()
        pg.stop()
        shutil.rmtree(folder, ignore_errors=True)
    for key in ("messages_per_s", "rows_per_s", "seconds"):
        values = [r[key] for r in results]
        print(f"{key:16} median {statistics.median(values):10.1f}   runs "
              + " ".join(f"{v:.1f}" for v in values))


if __name__ == "__main__":
    main()
