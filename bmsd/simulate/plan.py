"""What a simulation run publishes, message by message: `plan` (values and faults
fixed by the seed, timestamps by a virtual clock per device)."""

from __future__ import annotations

import heapq
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bmsd.simulate.devices import (
    BATTERY_INTERVAL_S,
    MACHINES,
    SENSOR_INTERVAL_S,
    SITE_INTERVAL_S,
    Device,
)


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
    sparkplug: float = 0.0  # share of battery sites that are Sparkplug B edge nodes


@dataclass
class Stream:
    """One (device, stream) pair that publishes on one topic."""

    topic: str
    stream: str
    interval_s: float
    device: Device
    clock: datetime = datetime(1970, 1, 1, tzinfo=UTC)


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
    start, scale = _clock(options, streams)
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
        readings = _next_readings(s, options, rng, scale)
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
            yield _late(s)


def _clock(options: Options, streams: list[Stream]) -> tuple[datetime, float]:
    """Return the run's first instant and how much its devices' intervals are squeezed.

    Every stream's clock advances at the same virtual pace, so a run of N
    messages covers T = N * per_message / sum(1 / interval) seconds. Squeeze
    the intervals if T would reach back further than 2 days (bmsd accepts 3).
    """
    expected = options.messages or int((options.rate or 100) * (options.duration_s or 60))
    span = expected * options.per_message / sum(1 / s.interval_s for s in streams)
    scale = 1.0 if options.realtime else min(1.0, 2 * 86400 / max(span, 1e-9))
    if options.start is not None:
        return options.start, scale
    if options.realtime:  # the history first (unpaced), then the present at its pace
        return datetime.now(UTC) - timedelta(seconds=options.backfill_s), scale
    return datetime.now(UTC) - timedelta(seconds=span * scale + 5), scale


def _next_readings(s: Stream, options: Options, rng: random.Random,
                   scale: float) -> list[dict[str, Any]]:
    """Advance *s*'s clock through its next message's readings; return them."""
    readings = []
    for _ in range(options.per_message):
        s.clock += timedelta(seconds=s.interval_s * scale)
        when = s.clock.replace(microsecond=s.clock.microsecond // 1000 * 1000)
        s.clock = when
        reading = s.device.reading(s.stream, when, s.interval_s,
                                   alert=rng.random() < options.alerts)
        reading["timestamp"] = when.isoformat().replace("+00:00", "Z")
        readings.append(reading)
    return readings


def _late(s: Stream) -> Outgoing:
    """A reading one hour back, half a millisecond off the grid of normal readings, so
    it never collides with one of them."""
    when = s.clock - timedelta(hours=1, microseconds=500)
    late = s.device.reading(s.stream, when, s.interval_s, alert=False)
    late["timestamp"] = when.isoformat().replace("+00:00", "Z")
    return Outgoing(s.topic, json.dumps(late).encode(), s.stream, 1, "late", s.clock)


