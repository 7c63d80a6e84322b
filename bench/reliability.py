"""Run the fault, overload, backfill and hostile-input scenarios; write docs/reliability.md.

    .venv/bin/python bench/reliability.py            # long forms, about 10 minutes
    .venv/bin/python bench/reliability.py --short    # CI's short forms

The scenarios are the tests that record a `Scenario` (tests/fix_report.py):
tests/test_faults.py, test_backlog.py, test_overload.py, test_partition.py, test_late_data.py
and the parser's 10^5 hostile payloads. They run with pytest, here on the same
throwaway servers the test suite starts, with BMSD_RELIABILITY_FULL=1 (30 s
outages, 60 s of overload) unless --short. Every row comes from a test that
asserted its own accounting, so a failed scenario is listed as failed, not
left out. Runs as root (the partition scenario makes a network namespace).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = [
    "tests/test_faults.py",
    "tests/test_backlog.py",
    "tests/test_overload.py",
    "tests/test_partition.py",
    "tests/test_late_data.py",
    "tests/test_payloads.py::test_a_hundred_thousand_hostile_payloads_end_as_readings_or_reasons",
]


def seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f} s"


def memory(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return ""
    return f"{before:.0f} → {after:.0f} MiB ({(after / before - 1) * 100:+.0f} %)"


def render(rows: list[dict[str, Any]], failed: list[str], skipped: list[str], full: bool,
           elapsed: float) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True, check=False).stdout.strip()
    lines = [
        "# Reliability report",
        "",
        f"Written by `python bench/reliability.py{'' if full else ' --short'}` on"
        f" {datetime.now(UTC):%Y-%m-%d %H:%M} UTC at commit `{commit or 'unknown'}`,"
        f" on a {os.cpu_count()}-core {platform.machine()} machine"
        f" (Python {platform.python_version()}); {elapsed / 60:.0f} minutes.",
        f"Form: {'long (30 s outages, 60 s overload)' if full else 'short, as in CI'}."
        " Each row is a test that asserted its accounting: published = stored, no"
        " duplicates by unique key, dead letters = exactly the injected bad input.",
        "",
        "| scenario | published | stored | duplicates | dead letters | noticed | recovered"
        " | RSS before → after | note |",
        "|---|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['published']:,} | {r['stored']:,} | {r['duplicates']}"
            f" | {r['dead_letters']:,} | {seconds(r['noticed_s'])} | {seconds(r['recovered_s'])}"
            f" | {memory(r['rss_before_mb'], r['rss_after_mb'])} | {r['note']} |")
    lines += ["", f"Failed: {', '.join(failed) if failed else 'none'}."]
    if skipped:
        lines.append(f"Skipped: {'; '.join(skipped)}.")
    lines += [
        "",
        "*noticed*: from the fault to bmsd saying so (`bmsd_db_up` or `bmsd_mqtt_connected`"
        " 0, or an error counted). *recovered*: from the end of the fault to ready again,"
        " unless the note says otherwise. RSS: bmsd's resident memory just after start"
        " and at the end (for the overload, its peak during the overload).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="CI's short forms")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "reliability.md")
    args = parser.parse_args()
    records = Path(tempfile.mkstemp(prefix="bmsd-reliability-", suffix=".jsonl")[1])
    env = {**os.environ, "BMSD_RELIABILITY_REPORT": str(records)}
    if not args.short:
        env["BMSD_RELIABILITY_FULL"] = "1"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                             "-rfEs", *SCENARIOS], cwd=REPO, env=env,
                            check=False, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    rows = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in result.stdout.splitlines()
              if line.startswith(("FAILED ", "ERROR "))]
    skipped = [line.split("] ", 1)[-1] for line in result.stdout.splitlines()
               if line.startswith("SKIPPED")]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(rows, failed, skipped, not args.short, elapsed))
    records.unlink()
    print(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr)
    print(f"wrote {args.output}")
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
