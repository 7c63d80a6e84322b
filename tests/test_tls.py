"""TLS to the broker and to the database: a CA made by the test, the peer's name checked."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bmsd.schema.migrate import migrate
from tests.fix_daemon import DaemonFactory, Publisher, wait_until
from tests.fix_mqtt import REPO_CONF, TEST_ACL, USERS
from tests.helpers import make_certificates
from tools.localstack import LocalMosquitto, LocalPostgres, free_port, system_user

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture
def tls_broker() -> Iterator[tuple[LocalMosquitto, int, Path]]:
    """A broker with a TLS listener whose certificate a test CA issued for 'localhost'."""
    folder = Path(tempfile.mkdtemp(prefix="bmsd-test-tls-"))
    folder.chmod(0o755)
    make_certificates(folder)
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


@pytest.fixture
def tls_postgres() -> Iterator[tuple[LocalPostgres, Path]]:
    """A PostgreSQL that offers TLS with a certificate a test CA issued for 'localhost'."""
    folder = Path(tempfile.mkdtemp(prefix="bmsd-test-pgtls-"))
    folder.chmod(0o755)
    make_certificates(folder)
    certs = folder / "certs"
    certs.mkdir()
    for name in ("server.crt", "server.key"):
        shutil.copy(folder / name, certs / name)
    pg = LocalPostgres(folder / "pg", durable=False, extra_settings=(
        f"ssl = on\nssl_cert_file = '{certs}/server.crt'\n"
        f"ssl_key_file = '{certs}/server.key'\n"))
    user = system_user("postgres")
    if user is not None:  # the server reads its key as its own user, and only then
        os.chown(certs, user.pw_uid, user.pw_gid)
        for name in ("server.crt", "server.key"):
            os.chown(certs / name, user.pw_uid, user.pw_gid)
    (certs / "server.key").chmod(0o600)
    pg.start()
    try:
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE bmsd")
        migrate(pg.url("bmsd"), skip_community=True)
        yield pg, folder / "ca.crt"
    finally:
        pg.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_bmsd_talks_to_postgresql_over_tls_with_verify_full(
    bmsd_daemon: DaemonFactory, tls_postgres: tuple[LocalPostgres, Path], publisher: Publisher,
) -> None:
    pg, ca = tls_postgres
    query = f"sslmode=verify-full&sslrootcert={ca}"
    # The certificate names localhost, not 127.0.0.1: bmsd refuses the server.
    wrong = bmsd_daemon(database_url=f"postgresql://postgres@127.0.0.1:{pg.port}/bmsd?{query}",
                        wait_ready=False)
    wait_until(lambda: "db_unavailable" in wrong.output(), what="the refusal said")
    assert "does not match host name" in wrong.output()
    assert wrong.stop() == 0

    daemon = bmsd_daemon(database_url=f"postgresql://postgres@localhost:{pg.port}/bmsd?{query}")
    publisher.publish("site/tls/pack-1/battery",
                      {"timestamp": "2026-12-03T10:00:00Z", "soc": 43.0, "voltage": 1.0})
    with psycopg.connect(pg.url("bmsd")) as conn:
        wait_until(lambda: conn.execute("SELECT soc FROM battery_telemetry").fetchall()
                   == [(43.0,)], what="the reading stored over TLS")
        encrypted = conn.execute(
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)"
            " WHERE a.application_name IN ('bmsd', 'bmsd-instance-lock')").fetchone()
    assert encrypted == (True,)
    assert daemon.http("/readyz")[0] == 200
