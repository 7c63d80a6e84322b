"""No password reaches a log, /metrics, the health endpoints or check-config,
in any form it was given: the URL's user info, libpq's ``password=`` query
parameter, a password file or a systemd credential.

The test database takes any password (trust authentication), so both URL
forms can be given at once and the daemon still runs; the broker's real
password comes from a password file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.fix_daemon import DaemonFactory, Publisher, wait_until
from tests.fix_mqtt import Broker

SECRETS = {
    "userinfo": "pw-userinfo-7f3a",
    "query": "pw-query-91c2",
    "credential": "pw-credential-5e11",
}


def test_no_secret_in_logs_metrics_health_or_check_config(
    bmsd_daemon: DaemonFactory, db_url: str, mqtt_broker: Broker, publisher: Publisher,
    tmp_path: Path,
) -> None:
    db = urlsplit(db_url)
    database_url = db._replace(
        netloc=f"{db.username}:{SECRETS['userinfo']}@{db.hostname}:{db.port}",
        query=f"password={SECRETS['query']}&application_name=bmsd").geturl()
    broker = urlsplit(mqtt_broker.url)
    if broker.password is None:
        pytest.skip("the broker at BMSD_TEST_MQTT_URL takes no password")
    broker_url = broker._replace(netloc=f"{broker.username}@{broker.hostname}:{broker.port}"
                                 ).geturl()
    secrets = {**SECRETS, "file": broker.password}
    (tmp_path / "mqtt-password").write_text(broker.password + "\n")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "bmsd-migrate-password").write_text(SECRETS["credential"])
    config = (f'[mqtt]\npassword_file = "{tmp_path / "mqtt-password"}"\n'
              '[migrate]\nuser = "bmsd_owner"\n')
    daemon = bmsd_daemon(config, database_url=database_url, broker_url=broker_url,
                         env={"CREDENTIALS_DIRECTORY": str(credentials)})
    publisher.publish("site/s1/pack-1/battery", {"timestamp": "2026-12-03T10:00:00Z",
                                                 "soc": 50.0, "voltage": 1.0})
    publisher.publish("site/s1/pack-1/battery", b"{not json")
    wait_until(lambda: daemon.metric("bmsd_messages_rejected_total") >= 1, what="the reject")
    seen = {path: daemon.http(path)[1] for path in ("/metrics", "/readyz", "/healthz")}
    assert daemon.stop() == 0
    seen["log"] = daemon.output()
    assert "bmsd_starting" in seen["log"]
    assert "***" in seen["log"]

    shown = subprocess.run(
        [sys.executable, "-m", "bmsd", "check-config", "--config", str(daemon.config_path)],
        capture_output=True, text=True, timeout=60, check=False,
        env={**daemon.env, "CREDENTIALS_DIRECTORY": str(credentials)})
    assert shown.returncode == 0, shown.stderr
    seen["check-config"] = shown.stdout + shown.stderr
    assert "postgresql://" in seen["check-config"]
    for where, text in seen.items():
        for form, secret in secrets.items():
            assert secret not in text, f"the {form} password is in {where}"
