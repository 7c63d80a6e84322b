"""Run bmsd on a local default stack: throwaway TimescaleDB and Mosquitto.

The servers keep their data under a state folder, so running the demo again
reuses it. Ctrl-C (or the duration running out) stops everything.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from bmsd.config_load import load_config
from bmsd.errors import LocalStackError
from bmsd.schema.migrate import load_demo_data, migrate
from bmsd.simulate.plan import Options
from bmsd.simulate.publish import run
from bmsd.simulate.sparkplug import DEMO_MAP
from tools.localstack import LocalMosquitto, LocalPostgres, free_port

DEMO_DATABASE = "bmsd"
# The defaults, and the map of the simulator's Sparkplug B edge nodes (half the
# battery sites; compose/bmsd.toml has the same).
SPARKPLUG_DEMO = (
    '[sparkplug]\nenabled = true\ngroups = ["demo"]\n\n[[sparkplug.map]]\n'
    + "".join(f'{k} = "{DEMO_MAP[k]}"\n' for k in ("group", "device", "stream", "device_kind"))
    + "[sparkplug.map.metrics]\n"
    + "".join(f'"{name}" = "{field}"\n' for name, field in DEMO_MAP["metrics"].items()))
# The demo runs from a clone (scripts/demo): the broker's mosquitto.conf and
# ACL are the repository's, not package data.
REPO_ROOT = Path(__file__).resolve().parents[1]


def _port(state_dir: Path, name: str) -> int:
    """Return the port this state folder used before, or a new free one."""
    path = state_dir / f"{name}.port"
    if path.exists():
        return int(path.read_text())
    state_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    path.write_text(str(port))
    return port


def _password(state_dir: Path, user: str) -> str:
    """Return the demo broker's password for *user*, made once and kept in the state folder."""
    path = state_dir / f"{user}.password"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(18))
        path.chmod(0o600)
    return path.read_text().strip()


def run_demo(state_dir: Path, duration_s: float | None, config_path: Path | None) -> int:
    """Start the local stack, apply the schema, and keep it up until stopped."""
    state_dir = state_dir.resolve()
    if not (REPO_ROOT / "mosquitto.conf").exists():
        raise LocalStackError("the demo runs from a clone of the repository (scripts/demo):"
                              " it starts Mosquitto with the clone's mosquitto.conf")
    pg = LocalPostgres(state_dir / "postgres", port=_port(state_dir, "postgres"))
    broker = LocalMosquitto(state_dir / "mosquitto", REPO_ROOT / "mosquitto.conf",
                            port=_port(state_dir, "mosquitto"),
                            users={"bmsd": _password(state_dir, "bmsd"),
                                   "simulator": _password(state_dir, "simulator")})
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
        loaded = load_demo_data(database_url)
        print(f"loaded demo data: {', '.join(loaded)}")
        if config_path is None:  # the defaults, and the simulator's Sparkplug edge nodes
            config_path = state_dir / "bmsd.toml"
            config_path.write_text(SPARKPLUG_DEMO)
        metrics_addr = load_config(config_path).metrics.addr
        daemon = _start_daemon(state_dir, config_path, database_url, broker.url)
        try:
            _wait_ready(daemon, metrics_addr, state_dir / "bmsd.log")
            print()
            print(f"  bmsd     : running (pid {daemon.pid}), log in {state_dir / 'bmsd.log'}")
            print(f"  metrics  : http://{metrics_addr}/metrics  (/readyz, /healthz)")
            print(f"  database : {database_url}")
            print(f"  psql     : psql '{database_url}'")
            print(f"  broker   : {broker.url_as('simulator')}  (publish to e.g."
                  " site/<site>/<device>/battery; bmsd logs in as user bmsd)")
            print(f"  config   : {config_path}")
            print("\nbmsd is running on the local stack, fed by `bmsd simulate --realtime`"
                  " (4 sites); Ctrl-C stops everything\n", flush=True)
            simulator = _start_simulator(broker.url_as("simulator"), stop)
            _live_view(metrics_addr, database_url, stop, duration_s)
            stop.set()
            simulator.join(10)
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(30)
            print(f"bmsd stopped (exit code {code})", flush=True)
        return code
    finally:
        broker.stop()
        pg.stop()
        print("stopped the local stack", flush=True)


def _start_simulator(broker_url: str, stop: threading.Event) -> threading.Thread:
    # Two hours of history first, so every dashboard has something to show at once.
    options = Options(sites=4, devices_per_site=8, realtime=True, duration_s=7 * 86400,
                      malformed=0.01, alerts=0.02, seed=int(time.time()), backfill_s=7200,
                      sparkplug=0.5)

    def publish() -> None:
        run(broker_url, options, client_id="bmsd-demo-simulator", progress=None, stop=stop)

    thread = threading.Thread(target=publish, name="simulator", daemon=True)
    thread.start()
    return thread


def _live_view(metrics_addr: str, database_url: str, stop: threading.Event,
               duration_s: float | None) -> None:
    """Print what bmsd stored, its rate, rejects and unresolved alerts every 2 s."""
    started = time.monotonic()
    last_total, last_at = 0.0, started
    tty = sys.stdout.isatty()
    while not stop.wait(2.0):
        rows = _metric_by_label(metrics_addr, "bmsd_rows_written_total", "table")
        rejects = sum(_metric_by_label(metrics_addr, "bmsd_messages_rejected_total",
                                       "reason").values())
        with psycopg.connect(database_url) as conn:
            row = conn.execute("SELECT count(*) FROM alerts WHERE status <> 'resolved'"
                               ).fetchone()
        alerts = row[0] if row else 0
        now = time.monotonic()
        total = sum(rows.values())
        rate = (total - last_total) / (now - last_at)
        last_total, last_at = total, now
        streams = " | ".join(f"{t.split('_')[0]} {int(n)}" for t, n in sorted(rows.items()))
        line = (f"stored: {streams or 'nothing yet'} | {rate:,.1f} rows/s | rejects"
                f" {int(rejects)} | unresolved alerts {alerts}")
        print(f"\r{line}   " if tty else line, end="" if tty else "\n", flush=True)
        if duration_s is not None and now - started >= duration_s:
            break
    if tty:
        print()


def _metric_by_label(addr: str, name: str, label: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=2) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                key = sample.labels.get(label, "")
                out[key] = out.get(key, 0.0) + sample.value
    return out


def _start_daemon(state_dir: Path, config_path: Path | None, database_url: str,
                  broker_url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "BMSD_DATABASE_URL": database_url, "BMSD_MQTT_URL": broker_url}
    argv = [sys.executable, "-m", "bmsd", "run"]
    if config_path is not None:
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


def main(argv: list[str] | None = None) -> int:
    """``python -m tools.demo`` (scripts/demo): the local stack, bmsd and the simulator."""
    import argparse

    from bmsd.cli import exit_code
    from bmsd.config_load import find_config

    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None,
                        help="bmsd's configuration (default: the built-in defaults)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where the local servers keep their data (default: .state, or"
                             " /var/lib/bmsd/demo when run as root)")
    parser.add_argument("--duration-s", type=float, default=None,
                        help="stop after this many seconds (default: run until Ctrl-C)")
    args = parser.parse_args(argv)
    state_dir = args.state_dir
    if state_dir is None:
        # As root the servers run as their own users, who cannot enter a clone
        # under /root: keep the state where they can.
        state_dir = Path("/var/lib/bmsd/demo") if os.geteuid() == 0 else Path(".state")
    return exit_code("demo", lambda: run_demo(state_dir=state_dir, duration_s=args.duration_s,
                                                config_path=find_config(args.config)))


if __name__ == "__main__":
    sys.exit(main())
