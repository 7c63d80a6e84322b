"""Run bmsd on a local default stack: throwaway TimescaleDB and Mosquitto.

The servers keep their data under a state folder, so running the demo again
reuses it. Ctrl-C (or the duration running out) stops everything.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import psycopg

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
        print()
        print(f"  database : {database_url}")
        print(f"  psql     : psql '{database_url}'")
        print(f"  broker   : {broker.url}")
        print(f"  config   : {config_path}")
        print("\nthe local stack is up; Ctrl-C stops it", flush=True)
        stop.wait(duration_s)
        return 0
    finally:
        broker.stop()
        pg.stop()
        print("stopped the local stack", flush=True)
