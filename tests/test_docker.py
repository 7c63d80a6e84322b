"""bmsd's image and the compose stack, built and run for real (tests/fix_docker.py).

The image: built from the Dockerfile as committed (on a stand-in for its
pinned Python base), run as uid 10001 against the test servers with a
mounted config and secret files; its HEALTHCHECK turns healthy on a metrics
address that is not the default, and `docker stop` exits 0.

The stack: `docker-compose up` of docker-compose.yml as committed (stand-ins
for the pinned TimescaleDB, Mosquitto and Prometheus images; Grafana has
none): the migrate service applies the schema and makes the logins, the
demo profile loads the demo data, bmsd ingests the simulator's readings
through the authenticated broker, Grafana's login sees rows in every
dashboard panel with its default variables, and Prometheus scrapes bmsd.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import psycopg
import pytest

from tests.fix_daemon import Publisher, wait_until
from tests.fix_docker import DOCKER, REPO, Engine
from tests.fix_mqtt import Broker
from tests.test_dashboards import empty_panels
from tools.localstack import free_port

pytestmark = pytest.mark.needs(DOCKER)


def _inspect(engine: Engine, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = json.loads(engine.docker("inspect", name).stdout)
    return found[0]


def _stored(url: str, table: str = "battery_telemetry") -> int:
    with psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # our own table name
        return int(row[0]) if row else 0


@pytest.mark.parametrize("addr_from", ["mounted file", "BMSD_METRICS_ADDR"])
def test_the_image_runs_as_uid_10001_turns_healthy_and_stops_cleanly(
    docker_engine: Engine, bmsd_image: str, db_url: str, mqtt_broker: Broker,
    publisher: Publisher, tmp_path: Path, addr_from: str,
) -> None:
    broker = urlsplit(mqtt_broker.url)
    if broker.password is None:
        pytest.skip("the broker at BMSD_TEST_MQTT_URL takes no password file")
    port = free_port()
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "mqtt").write_text(broker.password + "\n")
    (secrets / "db").write_text("unused-with-trust\n")
    for path in (secrets, *secrets.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)  # the container's user reads them
    metrics = f'[metrics]\naddr = "127.0.0.1:{port}"\n' if addr_from == "mounted file" else ""
    config = tmp_path / "bmsd.toml"
    config.write_text(
        f'[database]\nurl = "{db_url}"\npassword_file = "/run/secrets/db"\n'
        f'[mqtt]\nurl = "mqtt://{broker.username}@{broker.hostname}:{broker.port}"\n'
        f'password_file = "/run/secrets/mqtt"\nclient_id = "bmsd-docker-{os.getpid()}"\n'
        + metrics)
    config.chmod(0o644)
    name = f"bmsd-test-{os.getpid()}-{port}"
    env = ["-e", f"BMSD_METRICS_ADDR=127.0.0.1:{port}"] if addr_from != "mounted file" else []
    docker_engine.docker(
        "run", "-d", "--name", name, "--network", "host",
        # The image's HEALTHCHECK command, checked more often than its 15 s.
        "--health-interval", "1s", "--health-start-period", "60s",
        "-v", f"{config}:/etc/bmsd/bmsd.toml:ro", "-v", f"{secrets}:/run/secrets:ro",
        *env, bmsd_image)
    try:
        spec = _inspect(docker_engine, name)
        assert spec["Config"]["User"] == "10001:10001"
        assert spec["Config"]["Healthcheck"]["Test"] == ["CMD", "bmsd", "probe", "readyz"]
        assert docker_engine.docker("exec", name, "id", "-u").stdout.strip() == "10001"
        wait_until(lambda: _inspect(docker_engine, name)["State"]["Health"]["Status"]
                   == "healthy", timeout_s=60, what="the HEALTHCHECK to turn healthy")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
            assert answer.status == 200
        publisher.publish("site/docker/pack-1/battery",
                          {"timestamp": "2026-12-03T10:00:00Z", "soc": 50.0, "voltage": 1.0})
        wait_until(lambda: _stored(db_url) == 1, what="the reading stored by the container")
        docker_engine.docker("stop", "-t", "30", name)
        state = _inspect(docker_engine, name)["State"]
        logs = docker_engine.docker("logs", name).stdout
        assert state["ExitCode"] == 0, logs
        assert "bmsd_stopped" in logs
    finally:
        docker_engine.docker("rm", "-f", name, check=False)


#: What the compose project needs of the repo, copied so that secrets/ and
#: the project's volumes stay out of the clone.
_PROJECT = ["docker-compose.yml", "Dockerfile", "compose", "mosquitto.conf", "mosquitto",
            "prometheus", "grafana", "config", "scripts/compose-secrets"]


def _prometheus(port: int, query: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?query={quote(query)}"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            result: list[dict[str, Any]] = json.load(answer)["data"]["result"]
            return result
    except OSError:
        return []


@pytest.mark.usefixtures("community_edition")  # the stand-in carries this machine's edition
def test_the_compose_stack_migrates_ingests_the_simulator_and_is_scraped(
    docker_engine: Engine, compose_images: dict[str, str], tmp_path: Path,
) -> None:
    project = tmp_path / "stack"
    for name in _PROJECT:
        source, target = REPO / name, project / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
    subprocess.run(["bash", str(project / "scripts/compose-secrets")], check=True,
                   capture_output=True, timeout=300, env=docker_engine.env)
    ports = {var: str(free_port()) for var in ("BMSD_POSTGRES_PORT", "BMSD_MQTT_PORT",
                                               "BMSD_METRICS_PORT", "BMSD_PROMETHEUS_PORT")}
    docker_engine.env.update(ports)
    name = f"bmsdtest{os.getpid()}"
    # Everything but grafana (no stand-in), with the demo profile's two services.
    services = ["timescaledb", "migrate", "mosquitto", "bmsd", "prometheus", "demo-data",
                "simulate"]
    try:
        docker_engine.compose(project, "-p", name, "up", "-d", *services)
        containers = {s: f"{name}_{s}_1" for s in services}
        migrate = _inspect(docker_engine, containers["migrate"])["State"]
        assert migrate["ExitCode"] == 0, docker_engine.docker("logs", containers["migrate"]).stderr
        wait_until(lambda: _inspect(docker_engine, containers["bmsd"])["State"]
                   .get("Health", {}).get("Status") == "healthy", timeout_s=120,
                   what="bmsd healthy in the stack")
        password = (project / "secrets/postgres_password").read_text().strip()
        admin = (f"postgresql://postgres:{quote(password, safe='')}@127.0.0.1:"
                 f"{ports['BMSD_POSTGRES_PORT']}/bmsd")
        wait_until(lambda: _stored(admin) > 0 and _stored(admin, "site_telemetry") > 0,
                   timeout_s=120, what="the simulator's readings stored")
        with psycopg.connect(admin) as conn:
            applied = conn.execute("SELECT count(*) FROM bmsd_migrations"
                                   " WHERE status = 'applied'").fetchone()
            sessions = conn.execute("SELECT DISTINCT usename::text FROM pg_stat_activity"
                                    " WHERE application_name LIKE 'bmsd%'").fetchall()
        assert applied is not None
        assert applied[0] == len(list((REPO / "sql").glob("*.sql")))
        assert sessions == [("bmsd_app",)]  # bmsd's own login, not the superuser
        # Grafana's view of the demo profile, as a newcomer first opens it: every
        # PostgreSQL panel, default variables and range, as the grafana login.
        secret = (project / "secrets/grafana_db_password").read_text().strip()
        grafana = (f"postgresql://grafana:{quote(secret, safe='')}"
                   f"@127.0.0.1:{ports['BMSD_POSTGRES_PORT']}/bmsd")
        failures: list[str] = []

        def every_panel_shows_rows() -> bool:
            failures[:] = empty_panels(grafana, datetime.now().astimezone())
            return not failures

        try:
            wait_until(every_panel_shows_rows, timeout_s=180, what="rows in every panel")
        except AssertionError:
            raise AssertionError("\n".join(failures)) from None
        prometheus = int(ports["BMSD_PROMETHEUS_PORT"])
        wait_until(lambda: [r["value"][1] for r in _prometheus(prometheus, 'up{job="bmsd"}')]
                   == ["1"], timeout_s=90, what="Prometheus scraping bmsd")
        wait_until(lambda: _prometheus(prometheus, "bmsd_messages_received_total > 0"),
                   timeout_s=90, what="bmsd's message counter in Prometheus")
        docker_engine.compose(project, "-p", name, "stop", "-t", "30", "bmsd")
        assert _inspect(docker_engine, containers["bmsd"])["State"]["ExitCode"] == 0
    finally:
        docker_engine.compose(project, "-p", name, "logs", "--no-color", check=False)
        docker_engine.compose(project, "-p", name, "--profile", "demo", "down", "-v",
                              "--remove-orphans", check=False)
        for var in ports:
            docker_engine.env.pop(var, None)
