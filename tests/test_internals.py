"""The fast paths that lean on library internals (bmsd/internals.py): present with
the libraries we pin, and when one is gone, bmsd says so and still stores
everything exactly once by the slower public path."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bmsd import internals
from tests.fix_daemon import DaemonFactory, Publisher, wait_until

NAMES = {"psycopg_copy_gen", "paho_socket_buffer", "prometheus_histogram"}


def test_the_pinned_libraries_have_every_fast_path() -> None:
    # A library upgrade that removes one fails here, before anyone's throughput halves.
    paths = internals.check()
    assert set(paths) == NAMES
    assert {name: p.missing for name, p in paths.items()} == dict.fromkeys(NAMES, ())


def test_a_disabled_fast_path_is_reported_off() -> None:
    paths = internals.check(disabled=["paho_socket_buffer"])
    assert not paths["paho_socket_buffer"].on
    assert paths["psycopg_copy_gen"].on


def _count(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT (device_id, time))"
                           " FROM energy_readings").fetchone()
        assert row is not None
        assert row[0] == row[1]  # nothing doubled
        return int(row[0])


@pytest.mark.parametrize("off", [sorted(NAMES), []], ids=["all off", "all on"])
def test_the_daemon_runs_without_its_fast_paths_and_says_so(
    bmsd_daemon: DaemonFactory, db_url: str, publisher: Publisher, tmp_path: Path,
    off: list[str],
) -> None:
    # What a library upgrade that took the internals away does, done before bmsd
    # starts: Python runs sitecustomize.py at start-up.
    (tmp_path / "sitecustomize.py").write_text(
        f"import bmsd.internals\nbmsd.internals.use(disabled={off!r})\n")
    daemon = bmsd_daemon(env={"PYTHONPATH": str(tmp_path)})
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    # 400 messages of 25 readings from 4 machines: batches with early COPYs,
    # PUBACKs sent in bulk, latencies observed per batch.
    batches = [(f"factory/plant/m{m}/energy",
                [{"timestamp": (start + timedelta(seconds=25 * b + n)).isoformat(),
                  "power_kw": float(n)} for n in range(25)])
               for b in range(100) for m in range(4)]
    publisher.publish_many(batches)
    wait_until(lambda: _count(db_url) == 100 * 4 * 25, timeout_s=60,
               what="every reading stored")
    events = daemon.events()
    reported = {e["name"] for e in events if e.get("event") == "fast_path_off"}
    assert reported == set(off)
    shown = {s.labels["name"]: s.value for f in text_string_to_metric_families(
        daemon.http("/metrics")[1]) for s in f.samples if s.name == "bmsd_fast_path"}
    assert shown == {name: (0.0 if name in off else 1.0) for name in NAMES}
    assert daemon.metric("bmsd_rows_written_total") == 100 * 4 * 25
    assert daemon.stop() == 0
    assert json.dumps(events).count("fast_path_off") == len(off)  # once each
