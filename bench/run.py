"""Benchmark bmsd against the limits of its machine, measured in the same run (not a test).

    .venv/bin/python bench/run.py                 # the table; --results bench/RESULTS.md to save it

Everything runs on this machine against a throwaway local TimescaleDB and
Mosquitto (started like the test fixtures, fsync on). Repetitions are
interleaved and medians reported, because the machine is noisy.

- Load source: the backlog is published while the consumer is stopped, so the
  broker queues it for the consumer's persistent session; the consumer is
  then started and timed until the last reading is committed. The publisher
  is therefore never the bottleneck.
- Limit (a): a do-nothing paho-mqtt subscriber, same library, MQTT 3.1.1,
  QoS 1, manual acks sent at once, draining the same backlog.
- Limit (b): binary COPY of the same rows straight into the same hypertable,
  as many rows a transaction as bmsd's batches hold (``max_batch_rows``).
- bmsd: `bmsd run` with the shipped defaults, 1 and 100 readings per message;
  CPU seconds and peak RSS read from /proc. A run whose stored row count
  differs from what was published is reported as FAILED.
- Rates of COPY and bmsd alike: rows committed after the first commit, over
  the span from the first commit to the last, by the server's commit times
  (track_commit_timestamp), so the harness's polling neither loads the
  database nor sets the clock.
- bmsd scaled out: ``--instances`` (default 2) `bmsd run` members of one
  shared group (``[mqtt] shared_group``, README "Scaling out") draining the
  same backlogs; one process per core is how a box is used by bmsd, while the
  do-nothing subscriber is one process either way.
- Latency: publish-to-commit at half of bmsd's measured single-reading rate,
  from the reading's timestamp (set at publish) to its transaction's commit
  time (track_commit_timestamp), p50/p95/p99 over every row; medians of
  ``--repeat`` runs. The publisher writes pre-framed MQTT packets to a
  socket (`publish_live`): a paho publisher took 0.9 of a core for 12,000
  msg/s, and readings then queued behind the load generator, not behind bmsd.
  ``--only latency --latency-rate N`` runs this alone.
- Memory through a database outage: at the same rate, PostgreSQL is stopped
  for ``--outage-s`` (60) and started again; bmsd's peak RSS before, during
  and after (until every published reading is stored), once (`bmsd_outage`).
"""


from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's tools/

from drains import bmsd_drain, bmsd_latency, bmsd_outage, copy_limit, median, subscriber_limit
from stack import Stack


def main() -> None:
    args = _arguments()
    stack = Stack()
    try:
        runs, latencies, outage = _measure(args, stack)
    finally:
        stack.close()
    if args.only:
        return
    text = _table(args, runs, latencies, outage)
    print()
    print(text)
    if args.results:
        _save(args, text)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=30_000,
                        help="single-reading messages per drain")
    parser.add_argument("--batched-messages", type=int, default=5000,
                        help="messages of 100 readings per drain")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--latency-s", type=float, default=20)
    parser.add_argument("--latency-rate", type=float,
                        help="messages/s of the latency and outage runs (default: half the"
                             " single rate); with --only latency or outage, those runs alone")
    parser.add_argument("--outage-s", type=float, default=60,
                        help="how long the database is down in the outage run")
    parser.add_argument("--instances", type=int, default=2,
                        help="members of one shared group, for the scaled-out rows")
    parser.add_argument("--packs", type=int, default=50,
                        help="battery packs sending the battery drains' readings (the"
                             " alerts' cost is per device and batch as well as per reading)")
    parser.add_argument("--results", type=Path, help="write the table as Markdown here")
    parser.add_argument("--only", help="comma-separated steps to run (a quick A/B; no table):"
                                       " null, copy, single, batched, battery, battery-off,"
                                       " single-n, batched-n, battery-n, latency, outage")
    return parser.parse_args()


def _steps(args: argparse.Namespace,
           stack: Stack) -> list[tuple[str, Callable[[], dict[str, float]]]]:
    """The drains, in the order each repetition runs them (--only: those named)."""
    group = 'shared_group = "bench"\n'
    steps: list[tuple[str, Callable[[], dict[str, float]]]] = [
        ("null", lambda: subscriber_limit(stack, args.messages)),
        ("copy", lambda: copy_limit(stack, args.batched_messages * 100)),
        ("single", lambda: bmsd_drain(stack, args.messages, 1)),
        ("batched", lambda: bmsd_drain(stack, args.batched_messages, 100)),
        ("battery", lambda: bmsd_drain(stack, args.messages, 1, battery=True,
                                       devices=args.packs)),
        ("battery-off", lambda: bmsd_drain(stack, args.messages, 1,
                                           "[alerts]\nenabled = false\n", battery=True,
                                           devices=args.packs)),
        ("single-n", lambda: bmsd_drain(stack, args.messages, 1, instances=args.instances,
                                        extra_mqtt=group)),
        ("batched-n", lambda: bmsd_drain(stack, args.batched_messages, 100,
                                         instances=args.instances, extra_mqtt=group)),
        # Alerts on, each pack's readings split over the members: out of order,
        # so histories are evaluated again (bmsd/alerts/history.py).
        ("battery-n", lambda: bmsd_drain(stack, args.messages, 1, battery=True,
                                         devices=args.packs, instances=args.instances,
                                         extra_mqtt=group)),
    ]
    if args.only:
        chosen = args.only.split(",")
        steps = [(name, step) for name, step in steps if name in chosen]
    return steps


Runs = dict[str, list[dict[str, float]]]


def _measure(args: argparse.Namespace,
             stack: Stack) -> tuple[Runs, list[dict[str, float]], dict[str, float]]:
    """Run the drains --repeat times, interleaved, then the latency and outage runs."""
    runs: Runs = {name: [] for name in ("null", "copy", "single", "batched", "battery",
                                        "battery-off", "single-n", "batched-n", "battery-n")}
    steps = _steps(args, stack)
    outage: dict[str, float] = {}
    for rep in range(args.repeat if steps else 0):
        for name, step in steps:
            result = step()
            runs[name].append(result)
            print(f"run {rep + 1} {name:8} " + " ".join(f"{k}={v:,.2f}"
                                                       for k, v in result.items()),
                  flush=True)
    chosen = args.only.split(",") if args.only else ["latency", "outage"]
    rate = args.latency_rate or median(runs["single"], "messages_per_s") / 2
    latencies: list[dict[str, float]] = []
    for rep in range(max(args.repeat, 1) if "latency" in chosen else 0):
        latencies.append(bmsd_latency(stack, rate, args.latency_s))
        print(f"run {rep + 1} latency  " + " ".join(
            f"{k}={v:,.3f}" for k, v in latencies[-1].items()), flush=True)
    if "outage" in chosen:
        outage = bmsd_outage(stack, rate, args.outage_s)
        print("outage  " + " ".join(f"{k}={v:,.1f}" for k, v in outage.items()), flush=True)
    return runs, latencies, outage


def _table(args: argparse.Namespace, runs: Runs, latencies: list[dict[str, float]],
           outage: dict[str, float]) -> str:
    """The results as a Markdown table: each measure's median, its ratio, its target."""
    latency = {key: median(latencies, key) for key in latencies[0]}

    null = median(runs["null"], "messages_per_s")
    copy = median(runs["copy"], "rows_per_s")
    single = runs["single"]
    batched = runs["batched"]
    battery_on = median(runs["battery"], "messages_per_s")
    battery_off = median(runs["battery-off"], "messages_per_s")
    rows = [
        ("Limit (a): do-nothing paho subscriber, QoS 1", f"{null:,.0f} msg/s", "", ""),
        ("Limit (b): binary COPY into the hypertable", f"{copy:,.0f} rows/s", "", ""),
        ("bmsd, 1 reading per message", f"{median(single, 'messages_per_s'):,.0f} msg/s",
         f"{median(single, 'messages_per_s') / null:.2f} x subscriber",
         "≥ 0.80 x do-nothing subscriber"),
        ("bmsd, 100 readings per message", f"{median(batched, 'rows_per_s'):,.0f} rows/s",
         f"{median(batched, 'rows_per_s') / copy:.2f} x COPY", "≥ 0.60 x COPY"),
        (f"bmsd x {args.instances} instances (shared group), 1 reading per message",
         f"{median(runs['single-n'], 'messages_per_s'):,.0f} msg/s",
         f"{median(runs['single-n'], 'messages_per_s') / null:.2f} x subscriber",
         "≥ 0.80 x do-nothing subscriber"),
        (f"bmsd x {args.instances} instances (shared group), 100 readings per message",
         f"{median(runs['batched-n'], 'rows_per_s'):,.0f} rows/s",
         f"{median(runs['batched-n'], 'rows_per_s') / copy:.2f} x COPY", "≥ 0.60 x COPY"),
        ("CPU s per 1000 readings (1 / 100 per msg)",
         f"{median(single, 'cpu_s_per_1000'):.3f} / {median(batched, 'cpu_s_per_1000'):.3f}",
         "", "report; halve"),
        ("peak RSS (1 / 100 per msg)", f"{max(r['peak_rss_mb'] for r in single):.0f} /"
         f" {max(r['peak_rss_mb'] for r in batched):.0f} MB", "", "< 150 MB"),
        (f"peak RSS with the database down {args.outage_s:.0f} s at {outage['rate']:,.0f} msg/s:"
         " before / during / after",
         f"{outage['rss_before_mb']:.0f} / {outage['rss_during_mb']:.0f} /"
         f" {outage['rss_after_mb']:.0f} MB",
         f"caught up {outage['caught_up_s']:.0f} s after the restart", "< 150 MB, flat"),
        (f"battery readings (16 cells, {args.packs} packs), alerts on / off",
         f"{battery_on:,.0f} / {battery_off:,.0f} msg/s",
         f"alerts cost {1 - battery_on / battery_off:.1%};"
         f" {median(runs['battery'], 'alert_ms_per_batch'):.1f} ms of alerts per batch",
         "cost ≤ 5 %"),
        (f"battery readings x {args.instances} instances (shared group), alerts on",
         f"{median(runs['battery-n'], 'messages_per_s'):,.0f} msg/s",
         f"{median(runs['battery-n'], 'messages_per_s') / battery_on:.2f} x one instance;"
         f" {median(runs['battery-n'], 'alert_ms_per_batch'):.1f} ms of alerts per batch",
         "≥ 1.6 x one instance"),
        (f"publish→commit at {latency['rate']:,.0f} msg/s (half load) p50/p95/p99",
         f"{latency['p50'] * 1000:.0f} / {latency['p95'] * 1000:.0f} /"
         f" {latency['p99'] * 1000:.0f} ms",
         f"publisher used {latency['publisher_cores']:.2f} of a core",
         "p50 ≤ 50, p99 ≤ 250 ms"),
    ]
    table = ["| measure | median | ratio | target |", "|---|---|---|---|"]
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(table)


def _save(args: argparse.Namespace, text: str) -> None:
    """Write the table as the first section of --results, keeping the sections below."""
    machine = (f"{platform.node()}: {os.cpu_count()} cores,"
               f" {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB,"
               f" {platform.platform()}, Python {platform.python_version()}")
    command = "bench/run.py " + " ".join(sys.argv[1:])
    head = (f"# Benchmark results\n\nMeasured {datetime.now(UTC):%Y-%m-%d} on {machine}"
            f" with `.venv/bin/python {command.strip()}` ({args.repeat} interleaved"
            f" repetitions, medians; {args.messages} single-reading messages and"
            f" {args.batched_messages} messages of 100 readings per drain).\n\n{text}\n")
    old = args.results.read_text() if args.results.exists() else ""
    rest = old[old.find("\n## ") + 1:] if "\n## " in old else ""
    args.results.write_text(head + ("\n" + rest if rest else ""))


if __name__ == "__main__":
    main()
