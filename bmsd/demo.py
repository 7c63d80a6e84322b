"""Run bmsd on a local default stack: throwaway TimescaleDB and Mosquitto.

The servers keep their data under a state folder, so running the demo again
reuses it. Ctrl-C (or the duration running out) stops everything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psycopg

from bmsd.config import load_config
from bmsd.errors import LocalStackError
from bmsd.localstack import LocalMosquitto, LocalPostgres, free_port
from bmsd.migrate import migrate

DEMO_DATABASE = "bmsd"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _port(state_dir: Path, name: str) -> int:
    """Return the port this state folder used before, or a new free one."""
    path = state_dir / f"{name}.port"
    if path.exists():
        return int(path.read_text())
    state_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    path.write_text(str(port))
    return port


def run_demo(state_dir: Path, duration_s: float | None, config_path: Path) -> int:
    """Start the local stack, apply the schema, and keep it up until stopped."""
    state_dir = state_dir.resolve()
    pg = LocalPostgres(state_dir / "postgres", port=_port(state_dir, "postgres"))
    broker = LocalMosquitto(state_dir / "mosquitto", REPO_ROOT / "mosquitto.conf",
                            port=_port(state_dir, "mosquitto"))
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"starting TimescaleDB in {pg.state_dir} ...", flush=True)
    pg.start()
    try:
        print(f"starting Mosquitto in {broker.state_dir} ...", flush=True)
        broker.start()
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                (DEMO_DATABASE,)).fetchone():
                conn.execute(f"CREATE DATABASE {DEMO_DATABASE}")
        database_url = pg.url(DEMO_DATABASE)
        report = migrate(database_url, skip_community=True)
        for line in report.lines():
            print(line)
        metrics_addr = load_config(config_path if config_path.exists() else None).metrics.addr
        daemon = _start_daemon(state_dir, config_path, database_url, broker.url)
        try:
            _wait_ready(daemon, metrics_addr, state_dir / "bmsd.log")
            print()
            print(f"  bmsd     : running (pid {daemon.pid}), log in {state_dir / 'bmsd.log'}")
            print(f"  metrics  : http://{metrics_addr}/metrics  (/readyz, /healthz)")
            print(f"  database : {database_url}")
            print(f"  psql     : psql '{database_url}'")
            print(f"  broker   : {broker.url}  (publish to e.g. site/<site>/<device>/battery)")
            print(f"  config   : {config_path}")
            print("\nbmsd is running on the local stack; Ctrl-C stops everything", flush=True)
            stop.wait(duration_s)
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(30)
            print(f"bmsd stopped (exit code {code})", flush=True)
        return code
    finally:
        broker.stop()
        pg.stop()
        print("stopped the local stack", flush=True)


def _start_daemon(state_dir: Path, config_path: Path, database_url: str,
                  broker_url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "BMSD_DATABASE_URL": database_url, "BMSD_MQTT_URL": broker_url}
    argv = [sys.executable, "-m", "bmsd", "run"]
    if config_path.exists():
        argv += ["--config", str(config_path)]
    log = (state_dir / "bmsd.log").open("ab")
    try:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    finally:
        log.close()


def _wait_ready(daemon: subprocess.Popen[bytes], metrics_addr: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise LocalStackError(f"bmsd exited with {daemon.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"http://{metrics_addr}/readyz", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise LocalStackError(f"bmsd did not get ready in 30 s; see {log}")
