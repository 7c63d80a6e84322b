"""Prometheus: the scrape config and alert rules pass promtool, and a real server scrapes bmsd."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fix_daemon import DaemonFactory, wait_until
from tools.dashboards import DASHBOARDS, PROMETHEUS
from tools.localstack import free_port, wait_for_port

FOLDER = Path(__file__).resolve().parent.parent / "prometheus"

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None,
                                reason="needs promtool (Debian: prometheus)")


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, input=stdin,
                          check=False, timeout=120, cwd=FOLDER)


@pytest.mark.parametrize("args", [("check", "config", "prometheus.yml"),
                                  ("check", "rules", "alerts.yml"),
                                  ("test", "rules", "alerts_test.yml")])
def test_promtool_passes(args: tuple[str, ...]) -> None:
    run = promtool(*args)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout + run.stderr


def test_every_alert_has_a_unit_test() -> None:
    rules = (FOLDER / "alerts.yml").read_text()
    tests = (FOLDER / "alerts_test.yml").read_text()
    names = [line.split(":", 1)[1].strip() for line in rules.splitlines()
             if line.strip().startswith("- alert:")]
    assert len(names) >= 8
    untested = [n for n in names if f"alertname: {n}" not in tests]
    assert untested == []


def test_a_live_scrape_of_bmsd_passes_promtool_check_metrics(
    bmsd_daemon: DaemonFactory,
) -> None:
    daemon = bmsd_daemon()
    status, body = daemon.http("/metrics")
    assert status == 200
    run = promtool("check", "metrics", stdin=body)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "bmsd_build_info{version=" in body
    assert "bmsd_last_commit_timestamp_seconds" in body
    assert 'bmsd_alerts_unresolved{severity="critical"}' in body


@pytest.fixture
def prometheus_server() -> Iterator[tuple[Path, int]]:
    if shutil.which("prometheus") is None:
        pytest.skip("needs prometheus (Debian: prometheus)")
    folder = Path(tempfile.mkdtemp(prefix="bmsd-test-prometheus-"))
    yield folder, free_port()
    shutil.rmtree(folder, ignore_errors=True)


def _api(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())["data"]


def test_a_real_prometheus_scrapes_bmsd_and_loads_the_rules(
    bmsd_daemon: DaemonFactory, prometheus_server: tuple[Path, int],
) -> None:
    daemon = bmsd_daemon()
    folder, port = prometheus_server
    # The shipped file, pointed at this bmsd and scraping every second.
    config = (FOLDER / "prometheus.yml").read_text()
    config = config.replace('["bmsd:29108"]', f'["127.0.0.1:{daemon.metrics_port}"]')
    config = config.replace("scrape_interval: 15s", "scrape_interval: 1s")
    config = config.replace("- alerts.yml", f"- {FOLDER / 'alerts.yml'}")
    (folder / "prometheus.yml").write_text(config)
    with (folder / "prometheus.log").open("wb") as log:
        server = subprocess.Popen(
            ["prometheus", f"--config.file={folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, 30, server, folder / "prometheus.log")

        def bmsd_target_up() -> bool:
            try:
                targets = _api(port, "targets")["activeTargets"]
            except OSError:
                return False
            return any(t["labels"]["job"] == "bmsd" and t["health"] == "up" for t in targets)

        wait_until(bmsd_target_up, timeout_s=30, what="the bmsd target to be up")
        result = wait_until(lambda: _api(port, "query", query="bmsd_build_info")["result"],
                            what="bmsd_build_info in Prometheus")
        assert result[0]["metric"]["version"]
        groups = _api(port, "rules")["groups"]
        alerts = {r["name"] for g in groups for r in g["rules"]}
        assert {"BmsdDown", "BmsdIngestStalled", "FleetCriticalAlertsUnresolved"} <= alerts
        time.sleep(2)
        firing = [a["labels"]["alertname"] for a in _api(port, "alerts")["alerts"]]
        assert "BmsdDown" not in firing

        # Every Prometheus panel of the dashboards is a query this server accepts.
        for dashboard in DASHBOARDS:
            for panel in dashboard.panels:
                if panel.datasource is PROMETHEUS:
                    _api(port, "query", query=panel.query)  # HTTP 400 if it does not parse
        assert _api(port, "query", query="bmsd_inflight_messages")["result"]
    finally:
        server.terminate()
        server.wait(30)


def test_every_alert_links_a_runbook_section_that_exists() -> None:
    rules = yaml.safe_load((FOLDER / "alerts.yml").read_text())
    readme = (FOLDER.parent / "docs" / "runbook.md").read_text()
    # GitHub's anchors: headings lower-cased, spaces to hyphens, most punctuation dropped.
    anchors = {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
               for line in readme.splitlines() if line.startswith("#")}
    missing = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            url = rule["annotations"].get("runbook_url", "")
            if not url.startswith("docs/runbook.md#") or url.split("#", 1)[1] not in anchors:
                missing.append(f"{rule['alert']}: {url or 'no runbook_url'}")
    assert missing == []
