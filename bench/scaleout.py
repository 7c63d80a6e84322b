"""Scale-out: 1, 2 and 3 bmsd instances on one shared subscription drain the same backlog.

    .venv/bin/python bench/scaleout.py               # prints the table
    .venv/bin/python bench/scaleout.py --results F   # and appends it to F (bench/RESULTS.md)

Same method as bench/run.py: a throwaway TimescaleDB and Mosquitto, a backlog of
single-reading QoS 1 messages published while the consumers are stopped (their
persistent sessions hold it), then the consumers started together and timed from
the first commit to the last reading stored. Each instance is `bmsd run` with
`[mqtt] shared_group = "bench"` and its own client id. Runs are interleaved
(1, 2, 3, 1, 2, 3, ...) and medians reported; the stored count must equal the
published count or the run is FAILED. CPU seconds per instance come from /proc.

Then the sizing on paper for a fleet of 10,000 sites at one reading per 5 s,
from what was measured here: one instance's rate, bmsd's CPU per reading, and
binary COPY's rows/s into the same hypertable (the database's share).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drains import bmsd_drain, copy_limit
from stack import Stack

FLEET_READINGS_PER_S = 10_000 / 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--results", type=Path, help="append the table here as Markdown")
    args = parser.parse_args()

    stack = Stack()
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: [], 3: []}
    copies: list[float] = []
    try:
        for rep in range(args.repeat):
            for n in runs:
                result = bmsd_drain(stack, args.messages, 1, instances=n,
                                    extra_mqtt='shared_group = "bench"\n')
                runs[n].append(result)
                print(f"run {rep + 1} instances={n} " + " ".join(
                    f"{k}={v:,.2f}" for k, v in result.items()), flush=True)
            copies.append(copy_limit(stack, 200_000)["rows_per_s"])
            print(f"run {rep + 1} copy rows_per_s={copies[-1]:,.0f}", flush=True)
    finally:
        stack.close()

    def med(n: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[n])

    one = med(1, "messages_per_s")
    lines = ["| instances | msg/s (median) | speedup | CPU s per instance | CPU s per 1000"
             " readings | peak RSS per instance |", "|--:|--:|--:|--:|--:|--:|"]
    for n in runs:
        lines.append(f"| {n} | {med(n, 'messages_per_s'):,.0f} |"
                     f" {med(n, 'messages_per_s') / one:.2f}x |"
                     f" {med(n, 'cpu_s_per_instance'):.1f} | {med(n, 'cpu_s_per_1000'):.3f} |"
                     f" {max(r['peak_rss_mb'] for r in runs[n]):.0f} MB |")
    copy = statistics.median(copies)
    cpu_per_reading = med(1, "cpu_s_per_1000") / 1000
    cores = FLEET_READINGS_PER_S * cpu_per_reading
    instances = math.ceil(FLEET_READINGS_PER_S / (0.5 * one))  # at most half of one's rate
    paper = [
        "",
        f"Sizing on paper, 10,000 sites at one reading per 5 s = {FLEET_READINGS_PER_S:,.0f}"
        " readings/s, one reading per message (the costliest case), from the medians above:",
        f"- bmsd: {cpu_per_reading * 1e6:.0f} µs of CPU per reading, so {cores:.2f} cores"
        f" busy; one instance drains {one:,.0f} msg/s here, so {instances} instance(s) run"
        f" it at ≤ 50 % of their rate (headroom to drain a backlog), and a second one on"
        f" another host for redundancy.",
        f"- database: binary COPY took {copy:,.0f} rows/s into the same hypertable here, so"
        f" the fleet uses {FLEET_READINGS_PER_S / copy:.1%} of one such primary's ingest;"
        " gateway batches (many readings per message) cut bmsd's share further.",
    ]
    text = "\n".join(lines + paper)
    print()
    print(text)
    if args.results:
        with args.results.open("a") as out:
            out.write(f"\n## Scale-out (issue 16)\n\nMeasured {datetime.now(UTC):%Y-%m-%d}"
                      f" with `.venv/bin/python bench/scaleout.py --messages {args.messages}"
                      f" --repeat {args.repeat}` ({args.repeat} interleaved repetitions,"
                      f" medians; broker, database and the instances share the machine's"
                      f" cores).\n\n{text}\n")


if __name__ == "__main__":
    main()
