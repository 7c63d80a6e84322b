"""`bmsd migrate`: order, bookkeeping, refusal of edited scripts, editions, init scripts."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bmsd.errors import MigrationError
from bmsd.schema.migrate import Report, default_sql_dir, load_scripts, migrate
from tests.fix_daemon import wait_until
from tests.fix_db import PgServer
from tools.localstack import LocalPostgres

SCRIPTS = load_scripts(default_sql_dir())
COMMUNITY_SCRIPTS = [s.name for s in SCRIPTS if s.needs_community]


def bmsd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bmsd", *args], capture_output=True,
                          text=True, check=False, timeout=120)


def recorded(url: str) -> dict[str, tuple[str | None, str, str]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT name, checksum, status, applied_by FROM bmsd_migrations")
        return {r[0]: (r[1], r[2], r[3]) for r in rows}


@pytest.mark.community
def test_first_run_applies_every_script_in_order_and_second_run_applies_nothing(
    empty_db_url: str,
) -> None:
    first = bmsd("migrate", "--database-url", empty_db_url)
    assert first.returncode == 0, first.stderr
    applied = [line.removeprefix("applying ") for line in first.stdout.splitlines()
               if line.startswith("applying ")]
    assert applied == [s.name for s in SCRIPTS]
    assert "community edition" in first.stdout
    assert {n: (c, st) for n, (c, st, _) in recorded(empty_db_url).items()} == {
        s.name: (s.checksum, "applied") for s in SCRIPTS}

    second = bmsd("migrate", "--database-url", empty_db_url)
    assert second.returncode == 0, second.stderr
    assert "applying" not in second.stdout
    assert f"nothing to apply: {len(SCRIPTS)} script(s) already applied" in second.stdout


def test_database_url_comes_from_the_environment(empty_db_url: str) -> None:
    env_run = subprocess.run(
        [sys.executable, "-m", "bmsd", "migrate", "--skip-community-features"],
        capture_output=True, text=True, check=False, timeout=120,
        env={"BMSD_DATABASE_URL": empty_db_url, "PATH": "/usr/bin:/bin"},
    )
    assert env_run.returncode == 0, env_run.stderr
    assert "000_timescaledb.sql" in recorded(empty_db_url)


@pytest.fixture
def sql_copy() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="bmsd-sql-"))
    for script in default_sql_dir().glob("*.sql"):
        shutil.copy(script, folder)
    yield folder
    shutil.rmtree(folder)


def test_a_changed_script_is_refused_with_its_name(empty_db_url: str, sql_copy: Path) -> None:
    migrate(empty_db_url, sql_dir=sql_copy, skip_community=True)
    target = sql_copy / "020_dimensions.sql"
    target.write_text(target.read_text() + "\n-- an innocent-looking edit\n")

    run = bmsd("migrate", "--database-url", empty_db_url, "--sql-dir", str(sql_copy),
               "--skip-community-features")
    assert run.returncode == 1
    assert "sql/020_dimensions.sql was changed after it was applied" in run.stderr
    assert "new script with a higher number" in run.stderr


def test_a_new_script_is_applied_by_a_later_run(empty_db_url: str, sql_copy: Path) -> None:
    migrate(empty_db_url, sql_dir=sql_copy, skip_community=True)
    (sql_copy / "900_extra.sql").write_text(
        "CREATE TABLE later_table (id int);\n"
        "INSERT INTO bmsd_migrations (name) VALUES ('900_extra.sql') ON CONFLICT DO NOTHING;\n")
    report = migrate(empty_db_url, sql_dir=sql_copy, skip_community=True)
    assert report.applied == ["900_extra.sql"]


def test_a_failing_script_names_itself_and_leaves_nothing_half_done(
    empty_db_url: str, sql_copy: Path
) -> None:
    (sql_copy / "900_broken.sql").write_text(
        "CREATE TABLE half_done (id int);\nSELECT no_such_function();\n")
    with pytest.raises(MigrationError, match=r"sql/900_broken.sql failed: .*no_such_function"):
        migrate(empty_db_url, sql_dir=sql_copy, skip_community=True)
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT to_regclass('half_done')").fetchone() == (None,)
    assert "900_broken.sql" not in recorded(empty_db_url)


def test_a_script_that_deadlocks_with_another_session_is_tried_again(
    empty_db_url: str, sql_copy: Path
) -> None:
    # Another session, as a background job might, holds one table and then
    # wants the other once the script waits for the first: a deadlock that
    # PostgreSQL resolves by cancelling the script, which waited first.
    def release(other: psycopg.Connection[Any]) -> None:
        other.execute("LOCK TABLE first_lock")
        other.commit()

    report, progress = migrate_against(
        empty_db_url, sql_copy,
        tables="CREATE TABLE first_lock (id int); CREATE TABLE second_lock (id int)",
        script=("900_locks.sql", "LOCK TABLE first_lock;\nLOCK TABLE second_lock;\n"
                                 "CREATE TABLE after_locks (id int);\n"),
        hold="LOCK TABLE second_lock", release=release,
        waiting="relation = 'second_lock'::regclass AND NOT granted")
    assert report.applied == ["900_locks.sql"]
    assert "900_locks.sql deadlocked with another session" in " ".join(progress)
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT to_regclass('after_locks')").fetchone() != (None,)


def test_concurrent_runs_apply_each_script_once(empty_db_url: str) -> None:
    reports = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            reports.append(migrate(empty_db_url, skip_community=True))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    applied = sorted(name for r in reports for name in r.applied)
    runnable = [s.name for s in SCRIPTS if not s.needs_community or reports[0].edition.community]
    assert applied == sorted(runnable)


def test_roles_are_shared_by_two_databases_on_one_server(
    pg_server: PgServer, empty_db_url: str
) -> None:
    migrate(empty_db_url, skip_community=True)
    second = pg_server.create_database("bmsd_second_db")
    try:
        report = migrate(second, skip_community=True)
        assert "010_roles.sql" in report.applied
    finally:
        pg_server.drop_database("bmsd_second_db")


@pytest.mark.community
def test_init_scripts_run_by_psql_are_recognised_by_migrate(empty_db_url: str) -> None:
    # What the official image does with /docker-entrypoint-initdb.d: every
    # file, in name order, psql with ON_ERROR_STOP and no single transaction.
    for script in sorted(default_sql_dir().glob("*.sql")):
        run = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", empty_db_url,
                              "-f", str(script)], capture_output=True, text=True, check=False)
        assert run.returncode == 0, f"{script.name}: {run.stderr}"
    assert {n: (c, by) for n, (c, _, by) in recorded(empty_db_url).items()} == {
        s.name: (None, "init") for s in SCRIPTS}

    report = migrate(empty_db_url)
    assert report.applied == []
    assert report.adopted == [s.name for s in SCRIPTS]
    assert {n: c for n, (c, _, _) in recorded(empty_db_url).items()} == {
        s.name: s.checksum for s in SCRIPTS}
    assert migrate(empty_db_url).adopted == []


# --- Apache-only edition ------------------------------------------------------

@pytest.fixture(scope="module")
def apache_server(pg_server: PgServer) -> Iterator[PgServer]:
    """Return a server whose TimescaleDB runs as the Apache-only edition."""
    if pg_server.local is None:
        pytest.skip("needs local PostgreSQL binaries to start an Apache-licensed server")
    state = Path(tempfile.mkdtemp(prefix="bmsd-test-apache-"))
    local = LocalPostgres(state, durable=False,
                          extra_settings="timescaledb.license = apache\n").start()
    yield PgServer(admin_url=local.url(), local=local)
    local.stop()
    shutil.rmtree(state, ignore_errors=True)


def test_apache_edition_stops_with_an_explanation(apache_server: PgServer) -> None:
    url = apache_server.create_database("apache_stop")
    run = bmsd("migrate", "--database-url", url)
    assert run.returncode == 3
    assert "Apache-only edition" in run.stderr
    assert "--skip-community-features" in run.stderr
    for name in COMMUNITY_SCRIPTS:
        assert name in run.stderr
    # Nothing was applied before the refusal.
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT to_regclass('sites')").fetchone() == (None,)


def test_apache_edition_skips_when_told_and_a_community_server_applies_them_later(
    apache_server: PgServer, pg_server: PgServer, pg_template: object,
) -> None:
    url = apache_server.create_database("apache_skip")
    run = bmsd("migrate", "--database-url", url, "--skip-community-features")
    assert run.returncode == 0, run.stderr
    for name in COMMUNITY_SCRIPTS:
        assert f"skipped {name}" in run.stdout
    assert {n for n, (_, st, _) in recorded(url).items() if st == "skipped"} == set(
        COMMUNITY_SCRIPTS)
    # A later run without the flag on the same server does not fail over them.
    again = bmsd("migrate", "--database-url", url)
    assert again.returncode == 0, again.stderr
    assert "nothing to apply" in again.stdout

    # The same database moved to a community-edition server: dump and restore
    # would do; here the files move with the cluster, so copy the database.
    if not getattr(pg_template, "community", False):
        pytest.skip("the second half needs a community-edition server")
    moved = pg_server.create_database("apache_moved")
    try:
        _copy_rows(url, moved)
        report = migrate(moved)
        assert report.applied == COMMUNITY_SCRIPTS
    finally:
        pg_server.drop_database("apache_moved")


def _copy_rows(source: str, target: str) -> None:
    """Rebuild *source*'s migrated state on *target* by replaying its applied scripts."""
    applied = [n for n, (_, st, _) in recorded(source).items() if st == "applied"]
    skipped = [n for n, (_, st, _) in recorded(source).items() if st == "skipped"]
    folder = Path(tempfile.mkdtemp(prefix="bmsd-sql-"))
    try:
        for name in applied:
            shutil.copy(default_sql_dir() / name, folder)
        migrate(target, sql_dir=folder)
    finally:
        shutil.rmtree(folder)
    with psycopg.connect(target) as conn:
        for name in skipped:
            conn.execute("INSERT INTO bmsd_migrations (name, status, applied_by)"
                         " VALUES (%s, 'skipped', 'bmsd migrate')", (name,))


def test_migrate_without_timescaledb_loaded_says_what_to_do(pg_server: PgServer) -> None:
    if pg_server.local is None:
        pytest.skip("needs local PostgreSQL binaries to start a server without the preload")
    state = Path(tempfile.mkdtemp(prefix="bmsd-test-nopreload-"))
    local = LocalPostgres(state, durable=False,
                          extra_settings="shared_preload_libraries = ''\n").start()
    try:
        with pytest.raises(MigrationError, match="add shared_preload_libraries = 'timescaledb'"):
            migrate(local.url(), skip_community=True)
    finally:
        local.stop()
        shutil.rmtree(state, ignore_errors=True)


def test_demo_data_loads_on_request_only_and_twice_without_harm(empty_db_url: str) -> None:
    first = bmsd("migrate", "--database-url", empty_db_url, "--skip-community-features")
    assert first.returncode == 0, first.stderr
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT count(*) FROM sites").fetchone() == (0,)
    for _ in range(2):
        run = bmsd("migrate", "--database-url", empty_db_url, "--skip-community-features",
                   "--demo-data")
        assert run.returncode == 0, run.stderr
        assert "loaded demo data sql/demo/demo_data.sql" in run.stdout
    with psycopg.connect(empty_db_url) as conn:
        machines = {r[0] for r in conn.execute(
            "SELECT d.name FROM devices d JOIN sites s ON s.id = d.site_id"
            " WHERE s.slug IN ('demo', 'europe')")}
        assert machines == {"Compressor-1", "HVAC-Main", "Conveyor-A", "Hydraulic-Pump-1",
                            "Injection-Molding-1", "Compressor-EU-1", "HVAC-EU-North"}
        assert conn.execute("SELECT count(*) FROM energy_tariffs").fetchone() == (28,)
        assert conn.execute("SELECT count(*) FROM carbon_factors").fetchone() == (2,)
        assert "demo_data.sql" not in {r[0] for r in conn.execute(
            "SELECT name FROM bmsd_migrations")}


def test_a_script_that_races_another_session_for_a_catalog_row_is_tried_again(
    empty_db_url: str, sql_copy: Path
) -> None:
    # Two sessions changing one catalog row (here: a table's privileges; for
    # sql/190, a TimescaleDB job's row): the one that waited fails with
    # "tuple concurrently updated" once the other commits.
    report, progress = migrate_against(
        empty_db_url, sql_copy, tables="CREATE TABLE granted (id int)",
        script=("900_grant.sql", "GRANT INSERT ON granted TO bmsd_ingest;\n"),
        hold="GRANT SELECT ON granted TO bmsd_reader", release=lambda other: other.commit(),
        waiting="locktype = 'transactionid' AND NOT granted")
    assert report.applied == ["900_grant.sql"]
    assert "900_grant.sql changed a catalog row another session changed meanwhile" in " ".join(
        progress)
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT has_table_privilege('bmsd_ingest', 'granted', 'INSERT'),"
                            " has_table_privilege('bmsd_reader', 'granted', 'SELECT')"
                            ).fetchone() == (True, True)


def migrate_against(url: str, sql_copy: Path, tables: str, script: tuple[str, str],
                    hold: str, release: Callable[[psycopg.Connection[Any]], None],
                    waiting: str) -> tuple[Report, list[str]]:
    """Migrate the schema, create *tables*, then migrate *script* (name, text) while
    another session, as a background job might, runs *hold* in an open transaction;
    once the script waits (a `pg_locks` row matching *waiting*), call *release* on
    that session. Return the report and the progress lines."""
    migrate(url, sql_dir=sql_copy, skip_community=True)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(tables)
    (sql_copy / script[0]).write_text(script[1])
    other = psycopg.connect(url)
    other.execute(hold)

    def job() -> None:
        with psycopg.connect(url, autocommit=True) as watch:
            wait_until(lambda: watch.execute(f"SELECT 1 FROM pg_locks WHERE {waiting}"
                                             ).fetchone(), timeout_s=30,
                       what="the script waiting")
        release(other)

    thread = threading.Thread(target=job)
    thread.start()
    progress: list[str] = []
    try:
        report = migrate(url, sql_dir=sql_copy, skip_community=True, on_progress=progress.append)
    finally:
        thread.join()
        other.close()
    return report, progress


def test_ctrl_c_while_waiting_for_the_database_is_one_line_not_a_traceback() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bmsd", "migrate", "--wait-for-database", "--database-url",
         "postgresql://127.0.0.1:1/bmsd"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    time.sleep(2.0)  # importing, then retrying the refused connection
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "bmsd migrate: interrupted"
