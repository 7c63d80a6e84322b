"""A real TimescaleDB for tests: one server, a migrated template, a fresh database per test.

The server is, in order: the one at ``BMSD_TEST_DATABASE_URL`` (a superuser
URL to its ``postgres`` database, or any database of a user who may create
databases and roles); else a throwaway local cluster started from this
machine's PostgreSQL binaries (scripts/install.sh installs them); else a
``timescale/timescaledb`` container, where a Docker engine answers.

Each test that asks for ``db_url`` gets a database copied from a template
that was migrated once per session, which takes a fraction of a second.
TimescaleDB's background scheduler keeps a connection open to every
database with the extension, and CREATE DATABASE ... TEMPLATE refuses a
template with connections; so the template is closed to connections
(ALLOW_CONNECTIONS false) and its scheduler terminated before copying.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from bmsd.schema.migrate import Edition, ensure_login, migrate
from tools.localstack import LocalPostgres

TEMPLATE = f"bmsd_test_template_{os.getpid()}"
COMMUNITY_SKIP_REASON = (
    "needs TimescaleDB's community edition (continuous aggregates, compression, policies);"
    " this server has the Apache-only edition"
)


@dataclass
class PgServer:
    """The PostgreSQL server of this test session."""

    admin_url: str
    local: LocalPostgres | None = None

    def url(self, dbname: str) -> str:
        parts = urlsplit(self.admin_url)
        return urlunsplit(parts._replace(path=f"/{dbname}"))

    def connect(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.admin_url, autocommit=True)

    def create_database(self, name: str, template: str = "template0") -> str:
        with self.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


def _docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        import docker  # testcontainers depends on it

        docker.from_env().ping()
    except Exception:  # noqa: BLE001 - any failure means: no usable engine
        return False
    return True


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """Return the session's PostgreSQL server, starting one if none is given."""
    if url := os.environ.get("BMSD_TEST_DATABASE_URL"):
        yield PgServer(admin_url=url)
        return
    try:
        from tools.localstack import postgres_bindir

        postgres_bindir()
    except Exception:  # noqa: BLE001 - fall through to containers
        if not _docker_available():
            pytest.fail("no PostgreSQL: set BMSD_TEST_DATABASE_URL, run scripts/install.sh,"
                        " or start a Docker engine")
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("timescale/timescaledb:latest-pg15", username="postgres",
                               password="postgres", dbname="postgres") as container:
            yield PgServer(admin_url=container.get_connection_url(driver=None))
        return
    # Not pytest's tmp_path: its folders are private to root, and the server
    # runs as the postgres user when we are root.
    state = Path(tempfile.mkdtemp(prefix="bmsd-test-pg-"))
    local = LocalPostgres(state, durable=False).start()
    try:
        yield PgServer(admin_url=local.url(), local=local)
    finally:
        local.stop()
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_template(pg_server: PgServer) -> Iterator[Edition]:
    """Migrate the template database once; return the server's TimescaleDB edition."""
    url = pg_server.create_database(TEMPLATE)
    report = migrate(url, skip_community=True)
    with pg_server.connect() as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false IS_TEMPLATE true")
                     .format(sql.Identifier(TEMPLATE)))
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                     " WHERE datname = %s AND pid <> pg_backend_pid()", (TEMPLATE,))
    yield report.edition
    with pg_server.connect() as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false")
                     .format(sql.Identifier(TEMPLATE)))
    pg_server.drop_database(TEMPLATE)


_counter = itertools.count()


@pytest.fixture
def db_url(pg_server: PgServer, pg_template: Edition) -> Iterator[str]:
    """Return the URL of a fresh database with the whole schema applied."""
    name = f"bmsd_test_{os.getpid()}_{next(_counter)}"
    url = _create_from_template(pg_server, name)
    yield url
    pg_server.drop_database(name)


def _create_from_template(pg_server: PgServer, name: str) -> str:
    # The scheduler may have reconnected between two tests; it cannot while
    # ALLOW_CONNECTIONS is false, but one already in flight can slip in.
    for _ in range(20):
        try:
            return pg_server.create_database(name, template=TEMPLATE)
        except psycopg.errors.ObjectInUse:
            with pg_server.connect() as conn:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                             " WHERE datname = %s", (TEMPLATE,))
    return pg_server.create_database(name, template=TEMPLATE)


@pytest.fixture
def empty_db_url(pg_server: PgServer) -> Iterator[str]:
    """Return the URL of a fresh database with nothing in it."""
    name = f"bmsd_empty_{os.getpid()}_{next(_counter)}"
    url = pg_server.create_database(name)
    yield url
    pg_server.drop_database(name)


@pytest.fixture
def db(db_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """Return an autocommit connection to a fresh migrated database."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def ingest_login(db_url: str, pg_server: PgServer) -> Iterator[str]:
    """The URL of a fresh login role whose only grant is bmsd_ingest (as bmsd runs)."""
    name = f"bmsd_app_{os.getpid()}"
    ensure_login(db_url, name, "bmsd_ingest", "ingest-test-password")
    parts = urlsplit(db_url)
    yield urlunsplit(parts._replace(netloc=f"{name}@{parts.hostname}:{parts.port}"))
    with psycopg.connect(db_url, autocommit=True) as conn:
        # Least privilege: the login owns nothing but its sessions' staging tables.
        owned = [r[0] for r in conn.execute(
            "SELECT c.relnamespace::regnamespace::text || '.' || c.relname FROM pg_shdepend d"
            " JOIN pg_class c ON d.classid = 'pg_class'::regclass AND c.oid = d.objid"
            " WHERE d.refobjid = (SELECT oid FROM pg_roles WHERE rolname = %s)"
            " AND d.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND d.deptype = 'o'", (name,))]
        # A bmsd still running (fixtures end in reverse order) holds its temp tables:
        # end its sessions, waiting (up to 10 s) until they are gone with them.
        conn.execute("SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
                     " WHERE usename = %s", (name,))
    assert all(o.startswith("pg_temp_") for o in owned), f"the login owns {owned}"
    with pg_server.connect() as conn:
        conn.execute(f'DROP ROLE IF EXISTS "{name}"')


@pytest.fixture
def community_edition(pg_template: Edition) -> Edition:
    """Skip the test unless the server has TimescaleDB's community edition."""
    if not pg_template.community:
        pytest.skip(COMMUNITY_SKIP_REASON)
    return pg_template


@pytest.fixture(autouse=True)
def _community_gate(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("community") is not None:
        request.getfixturevalue("community_edition")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    community = [r for r in skipped if COMMUNITY_SKIP_REASON in str(r.longrepr)]
    if community:
        terminalreporter.write_sep(
            "=", f"{len(community)} test(s) skipped: {COMMUNITY_SKIP_REASON}", yellow=True)
