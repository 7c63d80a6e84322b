"""Time alert evaluation on quiet battery batches, in-process (a benchmark, not a test).

    .venv/bin/python bench/evaluate.py --readings 1000 --packs 50

Builds batches of single 16-cell battery readings (what `bench/run.py`'s
battery drains publish: nothing breached, no flag) from *packs* packs in
turn, as the ingestor holds them, and times what the alert engine does
with each batch apart from the database: hand the batch's readings over
(`AlertEngine.readings`, `AlertEngine.plan`'s first step) and `evaluate`
them under the shipped rules. Prints microseconds per reading, medians over every batch of every
repetition. With as many packs as readings, each pack has one reading in
a batch: the shape of a large fleet, where costs per device and batch
count as much as costs per reading.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry

from bmsd.alerts import evaluate
from bmsd.alerts.engine import AlertEngine
from bmsd.alerts.evaluate import DeviceInfo, State
from bmsd.alerts.rules import load_rules
from bmsd.batch import Batch, Origin, Row
from bmsd.metrics import Metrics
from bmsd.models import BatteryTelemetry

STREAM = "battery_telemetry"
START = datetime(2026, 1, 1, tzinfo=UTC)


def reading(n: int, packs: int) -> Row:
    """Return the *n*-th reading, of pack ``n % packs``, as the ingestor builds its row."""
    fields = {"voltage": 400.0, "current": -20.0, "power_w": -8000.0, "soc": 55.0,
              "cell_voltages": [3.3 + i / 1000 for i in range(16)],
              "cell_temperatures": [25.0 + i / 10 for i in range(16)], "alarm_flags": []}
    values = (START + timedelta(milliseconds=n * 100), 1 + n % packs,
              *[fields.get(c) for c in BatteryTelemetry.columns], None)
    return Row(values, Origin("t", "battery", b"", None, START))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=1000, help="readings per batch")
    parser.add_argument("--packs", type=int, default=50)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    engine = AlertEngine(load_rules(), Metrics(CollectorRegistry()), topic_prefix=None)
    rules = evaluate.by_stream(engine.rules)
    state = State()
    for pack in range(1, args.packs + 1):
        state.devices[pack] = DeviceInfo(pack, 1, "bench", f"pack{pack}", "battery_pack", 50)
        state.marks[(pack, STREAM)] = START - timedelta(seconds=1)  # devices seen before
    batches = []
    for b in range(args.batches):
        batch = Batch()
        for n in range(b * args.readings, (b + 1) * args.readings):
            row = reading(n, args.packs)
            batch.add_message(STREAM, [row], lambda rows: None)
        batches.append(batch)
    handover, evaluation = [], []
    for _ in range(args.repeat):
        for batch in batches:
            started = time.perf_counter()
            readings, _ = engine.readings(batch)
            handed = time.perf_counter()
            plan = evaluate.evaluate(state, rules, readings, batch.seen)
            done = time.perf_counter()
            if plan.triggered or len(plan.marks) != min(args.packs, args.readings):
                raise SystemExit(f"unexpected plan: {plan}")
            handover.append((handed - started) / args.readings * 1e6)
            evaluation.append((done - handed) / args.readings * 1e6)
    print(f"{args.readings} readings of {args.packs} packs per batch:"
          f" hand-over {statistics.median(handover):.2f} µs,"
          f" evaluate {statistics.median(evaluation):.2f} µs per reading")


if __name__ == "__main__":
    main()
