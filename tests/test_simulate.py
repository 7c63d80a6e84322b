"""The simulator: deterministic data, exact accounting, and bmsd storing exactly that."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from bmsd.ingest.payloads import ReadingBounds, parse_message
from bmsd.simulate.plan import Options, plan
from tests.fix_daemon import DaemonFactory, wait_until

START = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)


def test_the_same_seed_gives_the_same_messages() -> None:
    options = Options(messages=300, seed=7, start=START, malformed=0.1, duplicates=0.1,
                      out_of_order=0.1, late=0.1, alerts=0.1)
    first = [(m.topic, m.payload) for m in itertools.islice(plan(options), 300)]
    again = [(m.topic, m.payload) for m in itertools.islice(plan(options), 300)]
    other = [(m.topic, m.payload) for m in itertools.islice(plan(
        Options(messages=300, seed=8, start=START)), 300)]
    assert first == again
    assert first != other


def test_the_demo_plant_publishes_every_stream_and_all_valid_readings_pass_validation() -> None:
    messages = list(itertools.islice(plan(Options(messages=2000, start=START, alerts=0.1)), 2000))
    assert {m.stream for m in messages} == {"site_telemetry", "battery_telemetry",
                                            "energy_readings", "production_data",
                                            "environmental_data"}
    assert {m.topic.split("/")[2] for m in messages if m.stream == "energy_readings"} == {
        "compressor-1", "hvac-1", "conveyor-1", "hydraulic-pump-1", "injection-molding-1"}
    latest = max(m.at for m in messages)
    for m in messages:
        parsed = parse_message(m.stream, m.payload, latest, ReadingBounds())
        assert parsed.rejects == [], (m.topic, parsed.rejects)
        assert len(parsed.readings) == m.valid


def test_readings_of_a_device_never_share_an_instant() -> None:
    options = Options(messages=3000, start=START, per_message=3, duplicates=0.2, late=0.2,
                      out_of_order=0.2)
    seen: set[tuple[str, str]] = set()
    for m in plan(options):
        if m.kind == "duplicate":
            continue
        body = json.loads(m.payload)
        for reading in body.get("readings", [body]):
            key = (m.topic, reading["timestamp"])
            assert key not in seen
            seen.add(key)
        if len(seen) > 8000:
            break


def test_bmsd_stores_exactly_the_valid_readings_the_simulator_sent(
    bmsd_daemon: DaemonFactory, mqtt_broker: Any, db_url: str, tmp_path: Path
) -> None:
    bmsd_daemon()
    summary_path = tmp_path / "summary.json"
    run = subprocess.run(
        [sys.executable, "-m", "bmsd", "simulate", "--mqtt-url", mqtt_broker.url_as("simulator"),
         "--messages", "1500", "--per-message", "2", "--malformed", "0.05", "--duplicates",
         "0.05", "--out-of-order", "0.05", "--late", "0.05", "--alerts", "0.05",
         "--summary-json", str(summary_path)],
        capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert "valid readings sent (what bmsd must store):" in run.stdout
    summary = json.loads(summary_path.read_text())
    assert summary["messages"] == 1500
    assert summary["messages_by_kind"]["malformed"] > 0

    def stored() -> dict[str, int]:
        with psycopg.connect(db_url) as conn:
            return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # type: ignore[index]
                    for t in summary["valid_readings"]}

    wait_until(lambda: stored() == summary["valid_readings"], timeout_s=60,
               what=f"{summary['valid_readings']} stored")
    with psycopg.connect(db_url) as conn:
        wait_until(lambda: conn.execute("SELECT count(*) FROM ingest_rejects").fetchone()
                   == (summary["messages_by_kind"]["malformed"],))


def test_the_simulator_with_the_broker_down_is_one_line_and_exit_1() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bmsd", "simulate", "--mqtt-url", "mqtt://127.0.0.1:1",
         "--messages", "10"], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert run.stderr.startswith("bmsd simulate: cannot connect to the broker at 127.0.0.1:1")
    assert len(run.stderr.strip().splitlines()) == 1
