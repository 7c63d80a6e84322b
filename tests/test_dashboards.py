"""The Grafana provisioning: structure, and every panel and variable query run for real.

Grafana itself cannot be installed here, so the test does what its
PostgreSQL data source would: expand the macros and template variables
(tools.dashboards.expand) and run each query, as a login role that has only
``bmsd_reader``, on 30 days of a simulated fleet. Prometheus panels are run
against a real Prometheus in tests/test_prometheus.py.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import yaml

from bmsd.schema.migrate import ensure_login
from tests.fix_daemon import wait_until
from tools.dashboards import DASHBOARDS, POSTGRES, PROMETHEUS, expand, render
from tools.fleet import Fleet, load_fleet

REPO = Path(__file__).resolve().parent.parent
GRAFANA = REPO / "grafana"
FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
END = datetime.now().astimezone().replace(second=0, microsecond=0)
RANGES = {"6h": timedelta(hours=6), "7d": timedelta(days=7), "30d": timedelta(days=30)}


def dashboards() -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in FILES]


def postgres_queries() -> list[tuple[str, str, str]]:
    """Return (dashboard uid, panel title, SQL) of every PostgreSQL panel."""
    return [(d["uid"], p["title"], t["rawSql"]) for d in dashboards() for p in d["panels"]
            for t in p["targets"] if t["datasource"]["uid"] == POSTGRES["uid"]]


# --- structure ------------------------------------------------------------------------


def test_the_committed_dashboards_are_what_the_generator_writes() -> None:
    assert [p.name for p in FILES] == sorted(f"{d.uid}.json" for d in DASHBOARDS)
    for dashboard in DASHBOARDS:
        path = GRAFANA / "dashboards" / f"{dashboard.uid}.json"
        assert path.read_text() == render(dashboard), (
            f"{path} is stale: python -m tools.dashboards grafana/dashboards")


def test_uids_are_unique_and_every_datasource_resolves() -> None:
    provisioned = yaml.safe_load((GRAFANA / "provisioning/datasources/bmsd.yml").read_text())
    sources = {d["uid"]: d["type"] for d in provisioned["datasources"]}
    assert sources == {POSTGRES["uid"]: POSTGRES["type"], PROMETHEUS["uid"]: PROMETHEUS["type"]}
    uids = [d["uid"] for d in dashboards()]
    assert len(uids) == len(set(uids)) == 6
    for dashboard in dashboards():
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids))
        for panel in dashboard["panels"]:
            assert panel["targets"], f"{dashboard['uid']}: {panel['title']} has no query"
            for ref in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
                assert sources.get(ref["uid"]) == ref["type"], (dashboard["uid"], panel["title"])
            for target in panel["targets"]:
                assert (target.get("rawSql") or target.get("expr") or "").strip()
        for variable in dashboard["templating"]["list"]:
            assert sources.get(variable["datasource"]["uid"]) == variable["datasource"]["type"]
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/bmsd.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_time_series_choose_their_level_by_range() -> None:
    for uid, title, sql in postgres_queries():
        if re.search(r"\bFROM (site|battery)_telemetry\b", sql):
            assert "_1h" in sql, f"{uid}: {title} reads raw rows only"
            assert "_1d" in sql, f"{uid}: {title} reads raw rows only"


# --- every query, on data ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet_db(pg_server: Any, pg_template: Any) -> Iterator[tuple[str, str]]:
    """A database with 31 days of a 4-site fleet: (a reader login's URL, the admin URL)."""
    if not pg_template.community:
        pytest.skip("the dashboards read the continuous aggregates and KPI functions:"
                    " needs TimescaleDB's community edition")
    from tests.fix_db import _create_from_template

    name = "bmsd_dashboards"
    url = _create_from_template(pg_server, name)
    with psycopg.connect(url) as conn:
        load_fleet(conn, Fleet(sites=4, days=31, end=END))
    # As compose/migrate.sh makes Grafana's login.
    ensure_login(url, "grafana_test", "bmsd_reader", "reader-test-password")
    parts = urlsplit(url)
    yield urlunsplit(parts._replace(netloc=f"grafana_test@{parts.hostname}:{parts.port}")), url
    pg_server.drop_database(name)
    with pg_server.connect() as conn:
        conn.execute("DROP ROLE IF EXISTS grafana_test")


def variables_of(dashboard: dict[str, Any], conn: psycopg.Connection[Any],
                 end: datetime = END) -> dict[str, str]:
    """Return each variable's default, as Grafana picks it: the first row, its
    ``__value`` column if it has one (else its first), interpolated unquoted."""
    values: dict[str, str] = {}
    for variable in dashboard["templating"]["list"]:
        sql = expand(variable["query"], end - timedelta(hours=6), end, values)
        with conn.cursor() as cur:
            rows = cur.execute(sql).fetchall()
            names = [c.name for c in cur.description or []]
        assert rows, f"{dashboard['uid']}: variable {variable['name']} has no value"
        column = names.index("__value") if "__value" in names else 0
        values[variable["name"]] = str(rows[0][column])
    return values


def empty_panels(reader_url: str, end: datetime, window: timedelta | None = None) -> list[str]:
    """Run every PostgreSQL panel of every dashboard as Grafana would, with the default
    variables, over *window* (default: the dashboard's own default range) ending at *end*;
    return the panels that failed or showed no row."""
    failures = []
    with psycopg.connect(reader_url, autocommit=True) as conn:
        for dashboard in dashboards():
            values = variables_of(dashboard, conn, end)
            span = window or _range(dashboard["time"]["from"])
            for panel in dashboard["panels"]:
                for target in panel["targets"]:
                    if target["datasource"]["uid"] != POSTGRES["uid"]:
                        continue
                    sql = expand(target["rawSql"], end - span, end, values)
                    try:
                        rows = conn.execute(sql).fetchall()
                    except psycopg.Error as exc:
                        failures.append(f"{dashboard['uid']} / {panel['title']}: {exc}")
                        continue
                    if not rows:
                        failures.append(f"{dashboard['uid']} / {panel['title']}: no rows"
                                        f" (variables {values})")
    return failures


def _range(grafana_from: str) -> timedelta:
    """Return a dashboard's default range ("now-24h") as a timedelta."""
    amount, unit = int(grafana_from[4:-1]), grafana_from[-1]
    name = {"h": "hours", "d": "days", "m": "minutes"}[unit]
    return timedelta(**{name: amount})


@pytest.mark.community
@pytest.mark.parametrize("window", list(RANGES))
def test_every_panel_query_runs_as_the_reader_and_returns_rows(
    fleet_db: tuple[str, str], window: str
) -> None:
    assert empty_panels(fleet_db[0], END, RANGES[window]) == []


@pytest.mark.community
def test_a_year_long_panel_reads_no_raw_rows(fleet_db: tuple[str, str]) -> None:
    reader, admin = fleet_db
    sql = next(s for uid, title, s in postgres_queries()
               if uid == "bmsd-battery" and title == "State of charge")
    with psycopg.connect(admin) as conn:
        raw_chunks = {str(r[0]) for r in conn.execute(
            "SELECT chunk_name FROM timescaledb_information.chunks"
            " WHERE hypertable_name = 'battery_telemetry'")}
    assert raw_chunks
    with psycopg.connect(reader, autocommit=True) as conn:
        values = variables_of(json.loads((GRAFANA / "dashboards/bmsd-battery.json")
                                         .read_text()), conn)

        def scanned(days: int) -> set[str]:
            query = expand(sql, END - timedelta(days=days), END, values)
            plan = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + query).fetchone()
            assert plan is not None
            return {n["Relation Name"] for n in _nodes(plan[0][0]["Plan"])
                    if "Relation Name" in n and n.get("Actual Loops", 0) > 0}

        assert scanned(1) & raw_chunks  # a day: raw rows
        assert not scanned(365) & raw_chunks  # a year: none


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)


# --- what a newcomer sees first ----------------------------------------------------------


@pytest.mark.community
def test_every_panel_shows_rows_on_the_demo_data_as_first_opened(
    db_url: str, bmsd_daemon: Any, mqtt_broker: Any, pg_server: Any,
) -> None:
    """scripts/demo's data: the demo plants and sites (sql/demo), fed by the simulator
    through bmsd. Every dashboard, opened with its default variables and range, shows
    rows in every PostgreSQL panel."""
    from bmsd.schema.migrate import load_demo_data
    from bmsd.simulate.plan import Options
    from bmsd.simulate.publish import run
    from tools.demo import SPARKPLUG_DEMO

    load_demo_data(db_url)
    daemon = bmsd_daemon(SPARKPLUG_DEMO)  # as scripts/demo runs it
    summary = run(mqtt_broker.url_as("simulator"),
                  Options(sites=4, devices_per_site=8, messages=6000, malformed=0.01,
                          alerts=0.02, seed=7, sparkplug=0.5), client_id="bmsd-test-demo",
                  progress=None)
    assert summary.errors == 0
    wait_until(lambda: daemon.metric("bmsd_messages_received_total") >= summary.messages,
               timeout_s=120, what="every simulated message received")
    wait_until(lambda: daemon.metric("bmsd_inflight_messages") == 0, what="all committed")
    name = f"grafana_demo_{os.getpid()}"
    ensure_login(db_url, name, "bmsd_reader", "reader-test-password")
    parts = urlsplit(db_url)
    try:
        reader = urlunsplit(parts._replace(netloc=f"{name}@{parts.hostname}:{parts.port}"))
        end = datetime.now().astimezone().replace(microsecond=0)
        failures = empty_panels(reader, end)
        assert failures == [], "\n".join(failures)
    finally:
        with pg_server.connect() as conn:
            conn.execute(f'DROP OWNED BY "{name}"')
            conn.execute(f'DROP ROLE IF EXISTS "{name}"')
