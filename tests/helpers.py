"""Small helpers shared by tests."""

from __future__ import annotations

import time
from typing import Any

import psycopg


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


def refresh(db: psycopg.Connection[Any], *views: str) -> None:
    """Refresh continuous aggregates fully, in order, waiting out a policy job.

    The server's own refresh policies may be refreshing the same aggregate at
    that moment, which makes a manual refresh fail with LockNotAvailable.
    """
    for view in views:
        for attempt in range(50):
            try:
                db.execute(f"CALL refresh_continuous_aggregate('{view}', NULL, NULL)")
                break
            except psycopg.errors.LockNotAvailable:
                if attempt == 49:
                    raise
                time.sleep(0.2)


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
