"""MQTT over TLS: a CA made by the test, the broker's certificate checked, host name included."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bmsd.dev.localstack import LocalMosquitto, free_port
from tests.fix_daemon import DaemonFactory, Publisher, wait_until
from tests.fix_mqtt import REPO_CONF, TEST_ACL, USERS

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def tls_broker() -> Iterator[tuple[LocalMosquitto, int, Path]]:
    """A broker with a TLS listener whose certificate a test CA issued for 'localhost'."""
    folder = Path(tempfile.mkdtemp(prefix="bmsd-test-tls-"))
    folder.chmod(0o755)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=bmsd test CA", "-keyout", "ca.key", "-out", "ca.crt", cwd=folder)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", "server.key", "-out", "server.csr", cwd=folder)
    (folder / "san.cnf").write_text("subjectAltName = DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "server.crt",
            cwd=folder)
    for name in ("server.key", "server.crt", "ca.crt"):
        (folder / name).chmod(0o644)  # the broker runs as its own user
    port = free_port()
    broker = LocalMosquitto(
        folder / "state", REPO_CONF, users=dict(USERS), extra_acl=TEST_ACL,
        extra_config=(f"listener {port} 127.0.0.1\ncafile {folder}/ca.crt\n"
                      f"certfile {folder}/server.crt\nkeyfile {folder}/server.key\n"
                      "tls_version tlsv1.2\n")).start()
    try:
        yield broker, port, folder / "ca.crt"
    finally:
        broker.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_bmsd_ingests_over_tls_and_checks_the_broker_s_name(
    bmsd_daemon: DaemonFactory, db_url: str, tls_broker: tuple[LocalMosquitto, int, Path],
) -> None:
    broker, port, ca = tls_broker
    password = USERS["bmsd"]
    config = f'[mqtt]\nca_file = "{ca}"\n'
    # The certificate names localhost, not 127.0.0.1: refused, said, and retried.
    wrong = bmsd_daemon(config, broker_url=f"mqtts://bmsd:{password}@127.0.0.1:{port}",
                        wait_ready=False)
    wait_until(lambda: "mqtt_connect_failed" in wrong.output(), what="the TLS failure said")
    assert wrong.proc is not None
    assert wrong.proc.poll() is None
    wait_until(lambda: "cannot connect (network or TLS)" in wrong.http("/readyz")[1],
               timeout_s=5, what="readiness to say why")
    assert wrong.stop() == 0

    bmsd_daemon(config, broker_url=f"mqtts://bmsd:{password}@localhost:{port}")
    publisher = Publisher(broker.url_as("tester"))
    try:
        publisher.publish("site/tls/pack-1/battery",
                          {"timestamp": "2026-12-03T10:00:00Z", "soc": 42.0, "voltage": 1.0})
    finally:
        publisher.close()

    def stored() -> list[tuple[float]]:
        with psycopg.connect(db_url) as conn:
            return conn.execute("SELECT soc FROM battery_telemetry").fetchall()

    wait_until(lambda: stored() == [(42.0,)], what="the reading received over TLS")
