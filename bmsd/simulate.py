"""`bmsd simulate`: a field-gateway simulator publishing realistic telemetry over MQTT.

Even-numbered sites are battery sites (a site controller and battery packs),
odd-numbered ones factories like the EnMS demo plant (compressor every 1 s,
HVAC and conveyor every 10 s, pump and injection moulding every 30 s, and an
ambient sensor). Values follow simple physical models: SoC cycles between
charge and discharge, cells drift apart, solar follows the sun, the grid
balances load, solar and battery, machines change state.

Timestamps come from a virtual clock per device, so no two readings of a
device share an instant and a run is exactly accountable: the summary says
how many valid readings were sent per stream (duplicates counted once,
malformed ones not at all), which is what bmsd must have stored. The same
seed gives the same values and faults; ``--start`` fixes the timestamps too.
"""

from __future__ import annotations

import heapq
import json
import math
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

from bmsd.errors import BrokerError

MACHINES = (  # kind, slug prefix, seconds between readings, production stream?
    ("compressor", "compressor", 1.0, False),
    ("hvac", "hvac", 10.0, False),
    ("motor", "conveyor", 10.0, True),
    ("pump", "hydraulic-pump", 30.0, False),
    ("injection_molding", "injection-molding", 30.0, True),
)
BATTERY_INTERVAL_S = 5.0
SITE_INTERVAL_S = 10.0
SENSOR_INTERVAL_S = 60.0
STATES = ("running", "running", "running", "idle", "stopped", "maintenance", "fault")


@dataclass(frozen=True)
class Options:
    """What to simulate and how to publish it."""

    sites: int = 2
    devices_per_site: int = 6  # a factory: the five demo-plant machines and a sensor
    messages: int | None = None  # stop after this many messages
    duration_s: float | None = None  # or after this long
    rate: float | None = None  # messages/s in all; None with realtime: device intervals
    realtime: bool = False  # publish at the devices' own intervals, stamped with now
    per_message: int = 1  # readings per message (a gateway batch when > 1)
    qos: int = 1
    seed: int = 1
    start: datetime | None = None  # virtual clock start (default: so the run ends now)
    malformed: float = 0.0  # share of messages replaced by bad payloads
    duplicates: float = 0.0  # share of messages sent twice
    out_of_order: float = 0.0  # share of messages sent after the next one of their device
    late: float = 0.0  # share of messages followed by a reading one hour old
    alerts: float = 0.0  # share of readings pushed past an alert threshold
    backfill_s: float = 0.0  # with realtime: first this much history, as fast as it goes


@dataclass
class Stream:
    """One (device, stream) pair that publishes on one topic."""

    topic: str
    stream: str
    interval_s: float
    device: Device
    clock: datetime = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class Device:
    """A simulated device with its physical state."""

    site: str
    slug: str
    kind: str
    rng: random.Random
    phase: float = 0.0
    soc: float = 60.0
    charging: bool = True
    drift: list[float] = field(default_factory=list)
    state: str = "running"
    hot_cell: bool = False  # one cell at 56 °C: an alarm flag, and an alert that stays open

    def reading(self, stream: str, when: datetime, interval_s: float,
                alert: bool) -> dict[str, Any]:
        """Return the next reading of *stream* at *when*."""
        r = self.rng
        hours = when.hour + when.minute / 60
        sun = max(0.0, math.sin((hours - 6) / 12 * math.pi))
        if stream == "battery_telemetry":
            step = interval_s / 3600 * 20  # about 20 % SoC an hour
            self.soc += step if self.charging else -step
            if self.soc >= 90 or self.soc <= 15:
                self.charging = not self.charging
            if not self.drift:
                self.drift = [r.gauss(0, 0.005) for _ in range(16)]
            self.drift = [d + r.gauss(0, 0.0005) for d in self.drift]
            current = (-40.0 if self.charging else 60.0) + r.gauss(0, 3)
            base = 3.2 + self.soc / 100 * 0.9
            cells = [round(min(max(base + d, 2.6), 4.15), 4) for d in self.drift]
            temps = [round(25 + abs(current) / 10 + r.gauss(0, 0.5) + i * 0.05, 2)
                     for i in range(16)]
            if self.hot_cell:  # warm enough for the pack's high_temp_warning flag
                temps[7] = round(56.5 + r.gauss(0, 0.3), 2)
            soc = self.soc
            if alert:
                choice = r.choice(("soc", "cell", "temp"))
                if choice == "soc":
                    soc = r.uniform(1, 8)
                elif choice == "cell":
                    cells[r.randrange(16)] = round(r.uniform(4.25, 4.4), 3)
                else:
                    temps[r.randrange(16)] = round(r.uniform(62, 70), 2)
            voltage = round(sum(cells) * 12, 2)
            return {
                "voltage": voltage, "current": round(current, 2),
                "power_w": round(voltage * current, 1),
                "temperature": round(sum(temps) / len(temps), 2), "soc": round(soc, 2),
                "soh": 96.5, "internal_resistance": 0.045, "cell_voltages": cells,
                "cell_temperatures": temps, "balancing": [d > 0.01 for d in self.drift],
                "alarm_flags": ["high_temp_warning"] if max(temps) > 55 else [],
                "over_voltage": max(cells) > 4.25, "under_voltage": False,
                "over_current": False, "over_temperature": max(temps) > 60,
                "data_quality": 0.99, "firmware_version": "2.4.1",
                "communication_latency_ms": round(r.uniform(20, 120), 1),
            }
        if stream == "site_telemetry":
            solar = round(max(0.0, 40 * sun + r.gauss(0, 1)), 3)
            load = round(25 + 10 * math.sin(hours / 24 * 2 * math.pi) + r.gauss(0, 2), 3)
            battery = round(r.uniform(-15, 15), 3)  # > 0 discharging
            grid = round(load - solar - battery, 3)  # > 0 import
            hz = interval_s / 3600
            soc = round(self.soc, 2)
            self.soc = min(95.0, max(10.0, self.soc - battery * hz))
            return {
                "batteryVoltage": round(r.uniform(495, 510), 2),
                "batteryCurrent": round(battery * 2, 2), "batteryChargeLevel":
                    r.uniform(5, 9) if alert else soc,
                "batteryTemperature": round(r.uniform(52, 58) if alert else 24 + r.gauss(0, 1), 2),
                "batteryStateOfHealth": 97.0, "batteryPowerKw": battery,
                "solarPowerKw": solar, "solarEnergyKwh": round(solar * hz, 5),
                "solarEfficiency": 18.5, "inverter1PowerKw": round(solar / 2, 3),
                "inverter1Efficiency": 96.5, "inverter1Temperature": 41.0,
                "inverter2PowerKw": round(solar / 2, 3), "inverter2Efficiency": 96.1,
                "inverter2Temperature": 42.0, "gridVoltage": round(r.gauss(230, 2), 2),
                "gridFrequency": round(49.2 if alert else 50 + r.gauss(0, 0.02), 3),
                "gridPowerKw": grid, "gridEnergyKwh": round(grid * hz, 5),
                "loadPowerKw": load, "loadEnergyKwh": round(max(load, 0) * hz, 5),
            }
        if stream == "energy_readings":
            if r.random() < 0.01:
                self.state = r.choice(STATES)
            base = {"compressor": 45, "hvac": 30, "motor": 8, "pump": 15,
                    "injection_molding": 60}.get(self.kind, 10)
            running = self.state == "running"
            power = round(max(0.0, (base if running else base * 0.1) + r.gauss(0, base * 0.05)), 3)
            return {"power_kw": power, "energy_kwh": round(power * interval_s / 3600, 6),
                    "voltage": round(r.gauss(400, 3), 2),
                    "current": round(power * 1000 / 400 / 1.732, 2),
                    "power_factor": round(min(1.0, r.uniform(0.85, 0.97)), 3),
                    "frequency": round(50 + r.gauss(0, 0.02), 3)}
        if stream == "production_data":
            running = self.state == "running"
            units = r.randint(3, 8) if running else 0
            return {"units_produced": units, "units_rejected": int(units > 0 and r.random() < 0.1),
                    "machine_state": self.state,
                    "cycle_time_s": round(r.uniform(25, 32), 2) if running else None}
        return {"temperature": round(21 + 3 * sun + r.gauss(0, 0.3), 2),
                "humidity": round(r.uniform(35, 55), 1),
                "pressure_hpa": round(r.gauss(1013, 2), 1),
                "co2_ppm": round(r.uniform(1100, 1400) if alert else r.uniform(450, 800), 0)}


@dataclass
class Outgoing:
    """One message to publish."""

    topic: str
    payload: bytes
    stream: str
    valid: int  # valid readings it carries (0 for malformed, duplicates)
    kind: str  # normal, malformed, duplicate, late
    at: datetime  # the time of its newest reading: when a real device would send it


def build_streams(options: Options, rng: random.Random) -> list[Stream]:
    """Return every (device, stream) the options describe."""
    streams: list[Stream] = []
    for s in range(options.sites):
        if s % 2 == 0:
            site = f"site-{s:02d}"
            ctrl = Device(site, "controller", "site_controller", random.Random(rng.random()))
            streams.append(Stream(f"site/{site}/controller/telemetry", "site_telemetry",
                                  SITE_INTERVAL_S, ctrl))
            for d in range(max(options.devices_per_site - 1, 1)):
                # With --alerts, pack-03 has a cell running hot (a failed fan, say): its
                # high_temp_warning flag is set and its CELL_TEMPERATURE_SPREAD alert
                # stays open, so the demo's dashboards have one to show.
                pack = Device(site, f"pack-{d + 1:02d}", "battery_pack",
                              random.Random(rng.random()), soc=rng.uniform(20, 85),
                              hot_cell=options.alerts > 0 and d == 2)
                streams.append(Stream(f"site/{site}/{pack.slug}/battery", "battery_telemetry",
                                      BATTERY_INTERVAL_S, pack))
        else:
            site = f"plant-{s:02d}"
            for d in range(max(options.devices_per_site - 1, 1)):
                kind, prefix, interval, produces = MACHINES[d % len(MACHINES)]
                machine = Device(site, f"{prefix}-{d // len(MACHINES) + 1}", kind,
                                 random.Random(rng.random()))
                streams.append(Stream(f"factory/{site}/{machine.slug}/energy",
                                      "energy_readings", interval, machine))
                if produces:
                    streams.append(Stream(f"factory/{site}/{machine.slug}/production",
                                          "production_data", 30.0, machine))
            sensor = Device(site, "ambient-1", "sensor", random.Random(rng.random()))
            streams.append(Stream(f"factory/{site}/ambient-1/environment",
                                  "environmental_data", SENSOR_INTERVAL_S, sensor))
    return streams


def _malformed(rng: random.Random, stream: str) -> bytes:
    choice = rng.randrange(4)
    if choice == 0:
        return b"{this is not json"
    if choice == 1:
        return b'\xff\xfe\x00 binary noise'
    if choice == 2:
        field = {"battery_telemetry": "soc", "site_telemetry": "batteryChargeLevel",
                 "energy_readings": "power_factor", "production_data": "units_produced",
                 "environmental_data": "humidity"}[stream]
        return json.dumps({field: -999}).encode()
    return json.dumps("a string, not a reading").encode()


def plan(options: Options) -> Iterator[Outgoing]:
    """Yield the messages of a simulation run (values and faults fixed by the seed)."""
    rng = random.Random(options.seed)
    streams = build_streams(options, rng)
    # Every stream's clock advances at the same virtual pace, so a run of N
    # messages covers T = N * per_message / sum(1 / interval) seconds. Squeeze
    # the intervals if T would reach back further than 2 days (bmsd accepts 3).
    expected = options.messages or int((options.rate or 100) * (options.duration_s or 60))
    span = expected * options.per_message / sum(1 / s.interval_s for s in streams)
    scale = 1.0 if options.realtime else min(1.0, 2 * 86400 / max(span, 1e-9))
    if options.start is not None:
        start = options.start
    elif options.realtime:  # the history first (unpaced), then the present at its pace
        start = datetime.now(UTC) - timedelta(seconds=options.backfill_s)
    else:
        start = datetime.now(UTC) - timedelta(seconds=span * scale + 5)
    for s in streams:
        s.clock = start
    # Publish the stream whose next message is due first: a realistic mix.
    def due(stream: Stream) -> datetime:
        return stream.clock + timedelta(seconds=stream.interval_s * scale * options.per_message)

    heap = [(due(s), i) for i, s in enumerate(streams)]
    heapq.heapify(heap)
    held: dict[int, Outgoing] = {}
    while heap:
        _, i = heapq.heappop(heap)
        s = streams[i]
        readings = []
        for _ in range(options.per_message):
            s.clock += timedelta(seconds=s.interval_s * scale)
            when = s.clock.replace(microsecond=s.clock.microsecond // 1000 * 1000)
            s.clock = when
            reading = s.device.reading(s.stream, when, s.interval_s,
                                       alert=rng.random() < options.alerts)
            reading["timestamp"] = when.isoformat().replace("+00:00", "Z")
            readings.append(reading)
        heapq.heappush(heap, (due(s), i))
        if rng.random() < options.malformed:
            yield Outgoing(s.topic, _malformed(rng, s.stream), s.stream, 0, "malformed", s.clock)
            continue
        body = readings[0] if options.per_message == 1 else {"readings": readings}
        message = Outgoing(s.topic, json.dumps(body).encode(), s.stream, len(readings),
                           "normal", s.clock)
        if i in held:
            yield message
            yield held.pop(i)
        elif rng.random() < options.out_of_order:
            held[i] = message
            continue
        else:
            yield message
        if rng.random() < options.duplicates:
            yield Outgoing(s.topic, message.payload, s.stream, 0, "duplicate", s.clock)
        if rng.random() < options.late:
            # One hour back, half a millisecond off the grid of normal readings,
            # so it never collides with one of them.
            when = s.clock - timedelta(hours=1, microseconds=500)
            late = s.device.reading(s.stream, when, s.interval_s, alert=False)
            late["timestamp"] = when.isoformat().replace("+00:00", "Z")
            yield Outgoing(s.topic, json.dumps(late).encode(), s.stream, 1, "late", s.clock)


@dataclass
class Summary:
    """What a run published."""

    messages: int = 0
    valid_readings: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"messages": self.messages, "valid_readings": dict(self.valid_readings),
                "valid_readings_total": sum(self.valid_readings.values()),
                "messages_by_kind": dict(self.kinds), "errors": self.errors,
                "seconds": round(self.seconds, 3)}


def run(url: str, options: Options, client_id: str = "bmsd-simulator",
        progress: TextIO | None = sys.stderr, stop: threading.Event | None = None) -> Summary:
    """Publish a simulation run to the broker at *url*; return what was sent.

    *stop*, when set, ends the run early (the demo's Ctrl-C).
    """
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    parts = urlsplit(url)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv311)
    if parts.username:
        client.username_pw_set(unquote(parts.username),
                               unquote(parts.password) if parts.password else None)
    if parts.scheme == "mqtts":
        client.tls_set()
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    host, port = parts.hostname or "127.0.0.1", parts.port or 1883
    try:
        client.connect(host, port)
    except OSError as exc:  # refused, unreachable, a name that does not resolve
        raise BrokerError(f"cannot connect to the broker at {host}:{port} ({exc}); is it"
                          " running? (scripts/demo starts the local one)") from None
    client.loop_start()
    summary = Summary()
    started = time.monotonic()
    last_report = started
    pending = []
    try:
        for message in plan(options):
            now = time.monotonic()
            if options.duration_s is not None and now - started >= options.duration_s:
                break
            if options.messages is not None and summary.messages >= options.messages:
                break
            if stop is not None and stop.is_set():
                break
            if options.rate:
                wait = started + summary.messages / options.rate - now
                if wait > 0:
                    time.sleep(wait)
            elif options.realtime:
                delay = (message.at - datetime.now(UTC)).total_seconds()
                if delay > 0 and stop is not None and stop.wait(min(delay, 60)):
                    break
                if delay > 0 and stop is None:
                    time.sleep(min(delay, 60))
            info = client.publish(message.topic, message.payload, qos=options.qos)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                summary.errors += 1
                continue
            pending.append(info)
            if len(pending) > 5000:
                pending = [p for p in pending if not p.is_published()]
            summary.messages += 1
            summary.kinds[message.kind] += 1
            summary.valid_readings[message.stream] += message.valid
            if progress is not None and now - last_report >= 1:
                last_report = now
                rate = summary.messages / max(now - started, 1e-9)
                progress.write(f"\rpublished {summary.messages} messages,"
                               f" {sum(summary.valid_readings.values())} valid readings,"
                               f" {rate:,.0f} msg/s, {summary.errors} errors   ")
                progress.flush()
        for info in pending:
            info.wait_for_publish(timeout=60)
            if not info.is_published():
                summary.errors += 1
    finally:
        summary.seconds = time.monotonic() - started
        client.disconnect()
        client.loop_stop()
    if progress is not None:
        progress.write("\n")
    return summary


def format_summary(summary: Summary) -> str:
    """Return the final summary as a person reads it."""
    lines = [f"published {summary.messages} messages in {summary.seconds:.1f} s"
             f" ({summary.messages / max(summary.seconds, 1e-9):,.0f}/s),"
             f" {summary.errors} errors"]
    for kind, n in sorted(summary.kinds.items()):
        lines.append(f"  {kind:10} messages: {n}")
    lines.append("valid readings sent (what bmsd must store):")
    for stream, n in sorted(summary.valid_readings.items()):
        lines.append(f"  {stream:20} {n}")
    lines.append(f"  {'total':20} {sum(summary.valid_readings.values())}")
    return "\n".join(lines)
