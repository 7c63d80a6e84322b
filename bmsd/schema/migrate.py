"""Apply the ordered schema scripts of ``sql/`` to a database.

Each script runs in its own transaction and is recorded, with its sha256, in
``bmsd_migrations``. Concurrent runs are serialised by an advisory lock. A
script whose first lines say ``-- requires: timescaledb-community`` needs
TimescaleDB's community edition; on the Apache-only edition it is either a
reason to stop or, when asked, recorded as skipped and applied by a later
run on a community-edition server.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from bmsd.config import DatabaseConfig
from bmsd.database import ADVISORY_NAMESPACE, connect
from bmsd.errors import ConfigError, EditionError, MigrationError
from bmsd.resources import package_file

COMMUNITY_MARKER = "-- requires: timescaledb-community"
#: Tries of a script that deadlocks, or races for a catalog row, with a TimescaleDB job.
DEADLOCK_ATTEMPTS = 5
SCRIPT_NAME = re.compile(r"^\d{3}_[a-z0-9_]+\.sql$")
# An arbitrary constant shared by every bmsd migrate: only one runs at a time.

_SELECT_RECORDS = "SELECT name, checksum, status FROM bmsd_migrations"
_RECORD_APPLIED = """
    INSERT INTO bmsd_migrations (name, checksum, status, applied_by, note)
    VALUES (%(name)s, %(checksum)s, 'applied', 'bmsd migrate', NULL)
    ON CONFLICT (name) DO UPDATE
       SET checksum = excluded.checksum, status = 'applied', applied_at = now(),
           applied_by = excluded.applied_by, note = NULL
"""
_RECORD_SKIPPED = """
    INSERT INTO bmsd_migrations (name, checksum, status, applied_by, note)
    VALUES (%(name)s, %(checksum)s, 'skipped', 'bmsd migrate', %(note)s)
    ON CONFLICT (name) DO NOTHING
"""
_ADOPT = "UPDATE bmsd_migrations SET checksum = %(checksum)s WHERE name = %(name)s"
_EDITION = """
    SELECT (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb') AS installed,
           (SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb')
               AS available,
           -- Readable by superusers and pg_read_all_settings only; NULL for the
           -- schema's owner, whose CREATE EXTENSION then says what is missing.
           CASE WHEN pg_has_role('pg_read_all_settings', 'USAGE')
                THEN current_setting('shared_preload_libraries') END AS preload
"""


def _connect(database: str | DatabaseConfig) -> psycopg.Connection[Any]:
    """Connect with bmsd's timeouts, but no statement timeout: a script may take long."""
    config = DatabaseConfig(url=database) if isinstance(database, str) else database
    return connect(config, "bmsd-migrate", statement_timeout_ms=0)


def load_demo_data(database: str | DatabaseConfig, sql_dir: Path | None = None) -> list[str]:
    """Apply the demo data scripts of ``sql/demo/`` (idempotent); return their names."""
    folder = (sql_dir or default_sql_dir()) / "demo"
    names = []
    with _connect(database) as conn:
        for path in sorted(folder.glob("*.sql")):
            try:
                with conn.transaction():
                    conn.execute(sql.SQL(path.read_text()))  # our own file's text
            except psycopg.Error as exc:
                raise MigrationError(f"sql/demo/{path.name} failed: {exc}") from exc
            names.append(path.name)
    return names


def default_sql_dir() -> Path:
    """Return the schema scripts shipped inside the ``bmsd`` package."""
    return package_file("sql")


def all_scripts(sql_dir: Path | None = None) -> list[str]:
    """Return the names of the schema scripts this bmsd ships, in order."""
    return [s.name for s in load_scripts(sql_dir or default_sql_dir())]


def missing_scripts(conn: psycopg.Connection[Any], sql_dir: Path | None = None) -> list[str]:
    """Return the scripts of this bmsd that the database has not applied (nor skipped)."""
    records = _records(conn)
    return [s.name for s in load_scripts(sql_dir or default_sql_dir())
            if s.name not in records]


@dataclass(frozen=True)
class Script:
    """One schema script on disk."""

    name: str
    text: str
    checksum: str
    needs_community: bool

    @classmethod
    def load(cls, path: Path) -> Script:
        data = path.read_bytes()
        text = data.decode("utf-8")
        head = text.lstrip().splitlines()[:5]
        return cls(
            name=path.name,
            text=text,
            checksum=hashlib.sha256(data).hexdigest(),
            needs_community=any(line.strip() == COMMUNITY_MARKER for line in head),
        )


def load_scripts(sql_dir: Path) -> list[Script]:
    """Return the scripts of *sql_dir* in the order they apply."""
    if not sql_dir.is_dir():
        raise MigrationError(f"{sql_dir}: no such folder of schema scripts (pass --sql-dir)")
    paths = sorted(p for p in sql_dir.iterdir() if p.suffix == ".sql")
    for path in paths:
        if not SCRIPT_NAME.match(path.name):
            raise MigrationError(
                f"{path}: schema scripts are named NNN_words.sql (e.g. 030_hypertables.sql);"
                " rename it or move it out of the folder"
            )
    return [Script.load(p) for p in paths]


@dataclass(frozen=True)
class Edition:
    """The TimescaleDB a server has."""

    version: str | None  # installed in this database, or available to install
    community: bool

    def describe(self) -> str:
        kind = "community edition" if self.community else "Apache-only edition"
        return f"TimescaleDB {self.version or '(not installed)'} ({kind})"


@dataclass
class Report:
    """What a migration run did."""

    edition: Edition
    applied: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    already: int = 0

    def lines(self) -> list[str]:
        out = [f"found {self.edition.describe()}"]
        out += [f"applied {name}" for name in self.applied]
        out += [f"adopted {name} (set up by container init; checksum recorded)"
                for name in self.adopted]
        out += [f"skipped {name} (needs TimescaleDB community edition)" for name in self.skipped]
        if not self.applied:
            out.append(f"nothing to apply: {self.already} script(s) already applied")
        return out


@dataclass(frozen=True)
class _Server:
    """What the server has of TimescaleDB (_EDITION)."""

    installed: str | None  # in this database
    available: str | None  # to install
    preload: str | None  # shared_preload_libraries, None when not readable


def detect_edition(conn: psycopg.Connection[tuple[object, ...]]) -> Edition:
    """Return the TimescaleDB version and edition of the connected database.

    Create the extension first if the server has it but this database not yet
    (script 000 would do the same): its license setting exists only then.
    """
    with conn.cursor(row_factory=class_row(_Server)) as cur:
        found = cur.execute(_EDITION).fetchall()[0]  # one row: a SELECT without FROM
    installed, available, preload = found.installed, found.available, found.preload
    if available is None:
        raise MigrationError(
            "TimescaleDB is not installed on this PostgreSQL server: install the"
            " timescaledb package for its PostgreSQL version (scripts/install.sh does)"
        )
    if preload is not None and "timescaledb" not in preload:
        raise MigrationError(
            "TimescaleDB is installed but not loaded: add shared_preload_libraries ="
            " 'timescaledb' to postgresql.conf and restart PostgreSQL"
        )
    if installed is None:
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        except psycopg.Error as exc:
            raise MigrationError(f"cannot create the timescaledb extension: {exc}") from exc
    version, license_ = conn.execute(
        "SELECT extversion, current_setting('timescaledb.license', true)"
        " FROM pg_extension WHERE extname = 'timescaledb'").fetchall()[0]
    return Edition(version=str(version), community=license_ == "timescale")


def migrate(
    database: str | DatabaseConfig,
    *,
    sql_dir: Path | None = None,
    skip_community: bool = False,
    on_progress: Callable[[str], None] | None = None,
) -> Report:
    """Apply every pending script of *sql_dir* to *database* (a URL or its configuration)."""
    scripts = load_scripts(sql_dir or default_sql_dir())
    with _connect(database) as conn:
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_NAMESPACE,))
            edition = detect_edition(conn)
            records = _records(conn)
        except psycopg.Error as exc:  # a login that may not read what migrating needs
            raise MigrationError(f"cannot read the schema's state: {exc}".strip() + ";"
                                 " migrate as the login that owns the database ([migrate]"
                                 " user)") from exc
        report = Report(edition=edition)
        _check_unchanged(scripts, records)
        _check_edition(scripts, records, edition, skip_community)
        for script in scripts:
            _apply_one(conn, script, records.get(script.name), report, on_progress)
        return report


def _records(conn: psycopg.Connection[Any]) -> dict[str, tuple[str | None, str]]:
    exists = conn.execute("SELECT to_regclass('bmsd_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return {}
    return {
        str(name): (None if checksum is None else str(checksum), str(status))
        for name, checksum, status in conn.execute(_SELECT_RECORDS)
    }


def _check_unchanged(
    scripts: list[Script], records: dict[str, tuple[str | None, str]]
) -> None:
    for script in scripts:
        checksum, status = records.get(script.name, (None, ""))
        if status == "applied" and checksum is not None and checksum != script.checksum:
            raise MigrationError(
                f"sql/{script.name} was changed after it was applied to this database"
                f" (recorded sha256 {checksum[:12]}…, file now {script.checksum[:12]}…)."
                " Applied scripts are never edited: restore the file and put the change"
                " in a new script with a higher number"
            )


def _check_edition(
    scripts: list[Script],
    records: dict[str, tuple[str | None, str]],
    edition: Edition,
    skip_community: bool,
) -> None:
    if edition.community or skip_community:
        return
    # Scripts skipped by an earlier run stay skipped until a community server.
    pending = [s.name for s in scripts if s.needs_community and s.name not in records]
    if pending:
        raise EditionError(
            f"this server has {edition.describe()}, which lacks continuous aggregates,"
            " compression and retention policies; these scripts need them: "
            + ", ".join(pending)
            + ". Install TimescaleDB's community edition, or run again with"
            " --skip-community-features to apply everything else (the skipped scripts"
            " are applied by a later run on a community-edition server)"
        )


def _apply_one(
    conn: psycopg.Connection[tuple[object, ...]],
    script: Script,
    record: tuple[str | None, str] | None,
    report: Report,
    on_progress: Callable[[str], None] | None,
) -> None:
    params = {"name": script.name, "checksum": script.checksum}
    if record is not None and record[1] == "applied":
        if record[0] is None:
            conn.execute(_ADOPT, params)
            report.adopted.append(script.name)
        report.already += 1
        return
    if script.needs_community and not report.edition.community:
        if record is None:
            conn.execute(_RECORD_SKIPPED, {**params, "note": report.edition.describe()})
        report.skipped.append(script.name)
        return
    if on_progress:
        on_progress(f"applying {script.name}")
    for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
        try:
            with conn.transaction():
                conn.execute(sql.SQL(script.text))  # our own file's text, not user input
                conn.execute(_RECORD_APPLIED, params)
            break
        except psycopg.Error as exc:
            # A TimescaleDB job (a refresh, the backlog, the scheduler updating a
            # job's row) ran into the script's locks or changed a catalog row the
            # script changes ("tuple concurrently updated"); PostgreSQL rolled
            # the script back whole: try it again. Anything else is the script's.
            clash = _clash(exc)
            if clash is None:
                diag = exc.diag
                where = f" (at: {diag.context.strip()})" if diag.context else ""
                raise MigrationError(f"sql/{script.name} failed: {exc}".strip() + where) from exc
            if attempt == DEADLOCK_ATTEMPTS:
                raise MigrationError(f"sql/{script.name} failed {attempt} times: {exc};"
                                     " run `bmsd migrate` again") from exc
            if on_progress:
                on_progress(f"{script.name} {clash} (a TimescaleDB job?);"
                            f" trying again in {attempt} s")
            time.sleep(attempt)
    report.applied.append(script.name)


def _clash(exc: psycopg.Error) -> str | None:
    """Say how *exc* is a clash with another session that trying again cures, or None."""
    if isinstance(exc, psycopg.errors.DeadlockDetected):
        return "deadlocked with another session"
    if isinstance(exc, psycopg.errors.InternalError_) and "tuple concurrently" in str(exc):
        # updated or deleted: SQLSTATE XX000
        return "changed a catalog row another session changed meanwhile"
    return None


_ROLE_EXISTS = "SELECT 1 FROM pg_roles WHERE rolname = %s"


def ensure_login(database: str | DatabaseConfig, name: str, member_of: str,
                 password: str) -> str:
    """Create or update the login role *name*, member of *member_of*; say which.

    Passwords are set as literals, never logged; ``bmsd_ingest`` and
    ``bmsd_reader`` come from the schema (sql/010_roles.sql), so run this
    after `migrate`.
    """
    with _connect(database) as conn, conn.transaction():
        exists = conn.execute(_ROLE_EXISTS, (name,)).fetchone() is not None
        verb = "ALTER" if exists else "CREATE"
        conn.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(name), sql.Literal(password)))
        conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(member_of),
                                                      sql.Identifier(name)))
    return f"{'updated' if exists else 'created'} login role {name} (member of {member_of})"


def require_current_schema(conn: psycopg.Connection[Any]) -> None:
    """Raise ConfigError unless every script of this bmsd is applied to *conn*'s database."""
    missing = missing_scripts(conn)
    if missing and missing == all_scripts():
        raise ConfigError("the database has no bmsd schema: run `bmsd migrate` first")
    if missing:
        raise ConfigError(
            f"the database schema is older than this bmsd: {len(missing)} script(s) not"
            f" applied ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''});"
            " run `bmsd migrate` first (with this version), then start bmsd again")
