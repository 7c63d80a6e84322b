"""Soak: bmsd at a steady load for an hour, its memory and lag recorded (not in CI).

    .venv/bin/python bench/soak.py                       # 1 h at 2,000 msg/s
    .venv/bin/python bench/soak.py --rate 4000 --seconds 600 --csv /tmp/soak.csv

Runs on a throwaway TimescaleDB and Mosquitto (bench/run.py's stack). Two
publisher processes send single-reading messages at --rate in total (pick
about half of what `bench/run.py` measures for bmsd on the machine); every
--every seconds it records bmsd's RSS, CPU seconds, readings stored and how
far storage is behind publishing. At the end it waits for the backlog,
checks that every published reading is stored once, and prints a summary:
RSS at the start, at the end and at its peak, and the lag's median and peak.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from stack import Bmsd, Stack, _publisher, stored


def publish(port: int, name: str, rate: float, seconds: float, sent: Any) -> None:
    """Publish at *rate* messages/s for *seconds*, counting what the broker acknowledged."""
    client = _publisher(port, f"soak-{name}")
    start = datetime.now(UTC) - timedelta(hours=2)
    began = time.monotonic()
    n = 0
    pending = []
    while (elapsed := time.monotonic() - began) < seconds:
        due = n / rate
        if due > elapsed:
            time.sleep(due - elapsed)
        # Unique per device and publisher, so the count of rows is the count of readings.
        stamp = (start + timedelta(milliseconds=n)).isoformat()
        payload = json.dumps({"timestamp": stamp, "power_kw": 1.0, "energy_kwh": 0.01})
        pending.append(client.publish(f"factory/soak/{name}-{n % 20}/energy", payload, qos=1))
        n += 1
        if len(pending) >= 500:
            for info in pending:
                info.wait_for_publish(60)
            with sent.get_lock():
                sent.value += len(pending)
            pending = []
    for info in pending:
        info.wait_for_publish(60)
    with sent.get_lock():
        sent.value += len(pending)
    client.disconnect()
    client.loop_stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=2000, help="messages/s in total")
    parser.add_argument("--seconds", type=float, default=3600)
    parser.add_argument("--every", type=float, default=10, help="seconds between samples")
    parser.add_argument("--csv", type=Path, help="write the samples here")
    args = parser.parse_args()

    stack = Stack()
    samples: list[dict[str, float]] = []
    try:
        url = stack.database()
        daemon = Bmsd(stack, url, "soak-bmsd")
        daemon.start()
        time.sleep(3)
        sent = multiprocessing.Value("q", 0)
        procs = [multiprocessing.Process(target=publish, args=(
            stack.broker.port, f"p{i}", args.rate / 2, args.seconds, sent)) for i in range(2)]
        began = time.monotonic()
        for p in procs:
            p.start()
        while any(p.is_alive() for p in procs):
            time.sleep(args.every)
            daemon.check_alive()
            cpu, _peak = daemon.usage()
            assert daemon.proc is not None
            status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
            rss = int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1])
            count = stored(url)
            sample = {"elapsed_s": round(time.monotonic() - began, 1), "rss_mb": rss / 1024,
                      "cpu_s": cpu, "published": sent.value, "stored": count,
                      "behind": max(0, sent.value - count)}
            samples.append(sample)
            print(" ".join(f"{k}={v:,.1f}" for k, v in sample.items()), flush=True)
        for p in procs:
            p.join()
        deadline = time.monotonic() + 300
        while stored(url) < sent.value and time.monotonic() < deadline:
            time.sleep(1)
        final = stored(url)
        daemon.stop(forget=True)
    finally:
        stack.close()
    if args.csv and samples:
        with args.csv.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(samples[0]))
            writer.writeheader()
            writer.writerows(samples)
    rss = [s["rss_mb"] for s in samples]
    behind = [s["behind"] for s in samples]
    print(f"published {sent.value:,}, stored {final:,}"
          f" ({'OK' if final == sent.value else 'MISMATCH'})")
    if samples:
        print(f"RSS start {rss[0]:.1f} MiB, end {rss[-1]:.1f}, peak {max(rss):.1f};"
              f" behind median {statistics.median(behind):,.0f} messages, peak {max(behind):,.0f}")
    sys.exit(0 if final == sent.value else 1)


if __name__ == "__main__":
    main()
