"""Sparkplug B against JSON: the same battery readings, both ways, interleaved (not a test).

    .venv/bin/python bench/sparkplug.py [--messages 20000] [--repeat 3]

Each run starts `bmsd run` on a fresh database of the benchmark stack
(bench/stack.py), waits until it is ready (and, for Sparkplug, its STATE
online), then floods it with --messages battery readings of 50 packs, one
reading per message, QoS 0, written straight to a socket (the publisher is
never the limit): JSON on site/bench0/pack<n>/battery, or Sparkplug B DDATA
by alias on spBv1.0/bench/DDATA/edge-0/pack<n> after an NBIRTH and a DBIRTH
per pack (names, aliases, datatypes). The readings are the same (voltage,
current, power, SoC, 16 cell voltages and temperatures, alarm flags), alerts
on. Measured as bench/run.py does: rows per second from the first commit to
the last, by the server's commit times, and bmsd's CPU seconds per 1,000
readings. A run that stores fewer readings than sent is FAILED.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stack import Bmsd, Stack, _mqtt_packet, _mqtt_string, any_stored, commit_rate, stored

from bmsd.sparkplug.payload import BY_NAME, PayloadMessage

PACKS = 50
CELLS = 16
# Sparkplug metric -> (field, datatype)
METRICS = {"Battery/Voltage": ("voltage", "Double"), "Battery/Current": ("current", "Double"),
           "Battery/Power": ("power_w", "Double"), "Battery/SOC": ("soc", "Double"),
           "Cells/Voltages": ("cell_voltages", "DoubleArray"),
           "Cells/Temperatures": ("cell_temperatures", "DoubleArray"),
           "Alarms": ("alarm_flags", "StringArray")}
SPARKPLUG = ('[sparkplug]\nenabled = true\ngroups = ["bench"]\n\n[[sparkplug.map]]\n'
             'device = "pack*"\nstream = "battery_telemetry"\ndevice_kind = "battery_pack"\n'
             "[sparkplug.map.metrics]\n"
             + "".join(f'"{name}" = "{field}"\n' for name, (field, _) in METRICS.items()))


def reading(n: int) -> dict[str, Any]:
    return {"voltage": 400.0 + n % 7, "current": -20.0, "power_w": -8000.0, "soc": 55.0,
            "cell_voltages": [3.3 + i / 1000 for i in range(CELLS)],
            "cell_temperatures": [25.0 + i / 10 for i in range(CELLS)], "alarm_flags": []}


def _set(metric: Any, datatype: str, value: Any) -> None:
    if datatype == "Double":
        metric.double_value = value
    elif datatype == "DoubleArray":
        metric.bytes_value = struct.pack(f"<{len(value)}d", *value)
    else:
        metric.bytes_value = b"".join(s.encode() + b"\0" for s in value)


def sparkplug_payload(values: dict[str, Any], at: datetime, seq: int, pack: int,
                      birth: bool) -> bytes:
    message: Any = PayloadMessage()
    message.timestamp, message.seq = int(at.timestamp() * 1000), seq
    for i, (name, (field, datatype)) in enumerate(METRICS.items()):
        metric = message.metrics.add(alias=pack * len(METRICS) + i,
                                     timestamp=message.timestamp)
        if birth:
            metric.name, metric.datatype = name, BY_NAME[datatype]
        _set(metric, datatype, values[field])
    return bytes(message.SerializeToString())


def packets(kind: str, messages: int) -> list[bytes]:
    """Return the MQTT PUBLISH packets (QoS 0) of a run: births first for Sparkplug."""
    start = datetime.now(UTC) - timedelta(hours=1)
    out = []
    if kind == "sparkplug":
        birth: Any = PayloadMessage()
        birth.seq = 0
        birth.metrics.add(name="bdSeq", datatype=BY_NAME["Int64"], long_value=0)
        out.append(_mqtt_packet(0x30, _mqtt_string("spBv1.0/bench/NBIRTH/edge-0")
                                + birth.SerializeToString()))
    for n in range(-PACKS if kind == "sparkplug" else 0, messages):
        pack = n % PACKS
        at = start + timedelta(milliseconds=10 * (n + PACKS))
        if kind == "json":
            topic = f"site/bench0/pack{pack}/battery"
            payload = json.dumps({"timestamp": at.isoformat(), **reading(n)}).encode()
        else:
            kind_of = "DBIRTH" if n < 0 else "DDATA"
            topic = f"spBv1.0/bench/{kind_of}/edge-0/pack{pack}"
            payload = sparkplug_payload(reading(n), at, (n + PACKS + 1) % 256, pack, n < 0)
        out.append(_mqtt_packet(0x30, _mqtt_string(topic) + payload))
    return out


def flood(port: int, data: list[bytes]) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    flags = 0x80 | 0x40 | 0x02
    sock.sendall(_mqtt_packet(0x10, _mqtt_string("MQTT") + bytes([4, flags]) + struct.pack(
        ">H", 60) + b"".join(map(_mqtt_string, ("bench-flood", "bench", "bench")))))
    if sock.recv(4) != b"\x20\x02\x00\x00":
        raise RuntimeError("the broker refused the publisher")
    for i in range(0, len(data), 500):
        sock.sendall(b"".join(data[i:i + 500]))
    sock.sendall(b"\xe0\x00")
    sock.close()


def metric(daemon: Bmsd, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://{daemon.env['BMSD_METRICS_ADDR']}/metrics",
                                  timeout=5).read().decode()
    return sum(float(v) for n, _, v in (line.partition(" ") for line in text.splitlines())
               if n.partition("{")[0] == name)


def drain(stack: Stack, kind: str, messages: int) -> dict[str, float]:
    url = stack.database()
    daemon = Bmsd(stack, url, f"bench-{kind}-{stack.runs}", SPARKPLUG if kind == "sparkplug"
                  else "")
    data = packets(kind, messages)
    daemon.start()
    deadline = time.monotonic() + 30
    wanted = "bmsd_sparkplug_host_online" if kind == "sparkplug" else "bmsd_mqtt_connected"
    while True:
        daemon.check_alive()
        try:
            if metric(daemon, wanted) == 1 and metric(daemon, "bmsd_db_up") == 1:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{kind}: bmsd not ready")
        time.sleep(0.1)
    time.sleep(1)
    flood(stack.broker.port, data)
    expected = messages + (PACKS if kind == "sparkplug" else 0)
    while not any_stored(url, "battery_telemetry"):
        time.sleep(0.01)
    cpu_before = daemon.usage()[0]
    last, still = -1, time.monotonic()
    while (count := stored(url, "battery_telemetry")) < expected:
        daemon.check_alive()
        if count != last:
            last, still = count, time.monotonic()
        elif time.monotonic() - still > 10:
            raise SystemExit(f"FAILED: {kind}: {count} of {expected} readings stored")
        time.sleep(0.25)
    cpu = daemon.usage()[0] - cpu_before
    daemon.stop()
    rate = commit_rate(url, "battery_telemetry")
    stack.drop(url)
    return {"readings_per_s": rate, "cpu_s_per_1000": cpu / expected * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=["json", "sparkplug"], help="one path (profiling)")
    args = parser.parse_args()
    stack = Stack()
    runs: dict[str, list[dict[str, float]]] = {"json": [], "sparkplug": []}
    try:
        for rep in range(args.repeat):
            order = ("json", "sparkplug") if rep % 2 == 0 else ("sparkplug", "json")
            for kind in [k for k in order if args.only in (None, k)]:
                result = drain(stack, kind, args.messages)
                runs[kind].append(result)
                print(f"run {rep + 1} {kind:9} " + " ".join(
                    f"{k}={v:,.3f}" for k, v in result.items()), flush=True)
    finally:
        stack.close()
    if args.only:
        return
    med = {kind: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for kind, rs in runs.items()}
    pairs = [s["readings_per_s"] / j["readings_per_s"]
             for s, j in zip(runs["sparkplug"], runs["json"], strict=True)]
    print(f"\n| path | readings/s (median) | CPU s per 1000 readings |\n|---|---|---|\n"
          f"| JSON | {med['json']['readings_per_s']:,.0f} |"
          f" {med['json']['cpu_s_per_1000']:.3f} |\n"
          f"| Sparkplug B | {med['sparkplug']['readings_per_s']:,.0f} |"
          f" {med['sparkplug']['cpu_s_per_1000']:.3f} |\n\nSparkplug ÷ JSON:"
          f" {med['sparkplug']['readings_per_s'] / med['json']['readings_per_s']:.2f}"
          f" (pairs {', '.join(f'{p:.2f}' for p in pairs)}); target ≥ 0.8")


if __name__ == "__main__":
    main()
