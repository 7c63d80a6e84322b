"""Small helpers shared by tests."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg

from bmsd.alerts.rules import DEFAULT_RULES_PATH


def battery_low_held_for(folder: Path, seconds: int) -> str:
    """Return an ``[alerts]`` config with the shipped rules, BATTERY_LOW needing to hold
    for *seconds* (its rules file written in *folder*)."""
    rules = folder / "alerts.toml"
    rules.write_text(DEFAULT_RULES_PATH.read_text().replace(
        'code = "BATTERY_LOW"', f'code = "BATTERY_LOW"\nfor_s = {seconds}'))
    return f'[alerts]\nrules_file = "{rules}"\n'


def add_device(db: psycopg.Connection[Any], site: str = "alpha", device: str = "pack-1",
               kind: str = "battery_pack") -> int:
    db.execute("INSERT INTO organizations (slug, name) VALUES ('org', 'Org')"
               " ON CONFLICT DO NOTHING")
    db.execute("INSERT INTO sites (organization_id, slug, name)"
               " SELECT id, %s, %s FROM organizations WHERE slug = 'org'"
               " ON CONFLICT DO NOTHING", (site, site.title()))
    row = db.execute("INSERT INTO devices (site_id, slug, kind)"
                     " SELECT id, %s, %s FROM sites WHERE slug = %s RETURNING id",
                     (device, kind, site)).fetchone()
    assert row is not None
    return int(str(row[0]))


def pause_refresh_policies(db: psycopg.Connection[Any]) -> None:
    """Stop the server's refresh jobs on this database, and wait out any under way.

    A test that refreshes the aggregates itself and compares what is
    materialised must not race a policy job materialising at the same time.
    """
    db.execute("SELECT alter_job(job_id, scheduled => false)"
               " FROM timescaledb_information.jobs"
               " WHERE proc_name = 'policy_refresh_continuous_aggregate'")
    for _ in range(300):
        running = db.execute(
            "SELECT count(*) FROM timescaledb_information.job_stats s"
            " JOIN timescaledb_information.jobs j USING (job_id)"
            " WHERE j.proc_name = 'policy_refresh_continuous_aggregate'"
            " AND s.job_status = 'Running'").fetchone()
        if not running or not running[0]:
            return
        time.sleep(0.1)


def dump_toml(data: dict[str, Any]) -> str:
    """Write *data* as TOML: scalars, tables of scalars, arrays of such tables (deeper
    tables inline)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):  # an inline table
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        return json.dumps(str(v))  # a JSON string is a valid TOML basic string

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict | list)
             or (isinstance(v, list) and not any(isinstance(x, dict) for x in v))]
    for key, table in data.items():
        if isinstance(table, dict):
            lines += ["", f"[{key}]", *(f"{k} = {value(v)}" for k, v in table.items())]
        elif isinstance(table, list) and any(isinstance(x, dict) for x in table):
            for item in table:
                lines += ["", f"[[{key}]]", *(f"{k} = {value(v)}" for k, v in item.items())]
    return "\n".join(lines) + "\n"


def make_certificates(folder: Path, host: str = "localhost") -> None:
    """Make a test CA (ca.crt) and a server certificate it issued for *host*
    (server.crt, server.key) in *folder*, with the openssl command."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True,
                       timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=bmsd test CA", "-keyout", "ca.key", "-out", "ca.crt")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={host}",
            "-keyout", "server.key", "-out", "server.csr")
    (folder / "san.cnf").write_text(f"subjectAltName = DNS:{host}\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "server.crt")
