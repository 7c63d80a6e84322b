"""Publish a simulation run to a broker, paced or as fast as it takes it, and say
what was sent (`Summary`): the valid readings per stream bmsd must store."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

from bmsd.errors import BrokerError
from bmsd.simulate.plan import Options, plan
from bmsd.simulate.sparkplug import edge_nodes


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

    client = _connect(url, client_id)
    summary = Summary()
    started = time.monotonic()
    last_report = started
    pending = []
    try:
        messages = plan(options)
        if options.sparkplug:
            messages = edge_nodes(messages, options.sparkplug)
        for message in messages:
            now = time.monotonic()
            if options.duration_s is not None and now - started >= options.duration_s:
                break
            if options.messages is not None and summary.messages >= options.messages:
                break
            if stop is not None and stop.is_set():
                break
            if not _paced(options, message.at, started + summary.messages / (options.rate or 1),
                          stop):
                break
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
                _report(progress, summary, now - started)
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


def _connect(url: str, client_id: str) -> Any:
    """Connect a publisher to the broker at *url*; its network thread runs."""
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
    return client


def _paced(options: Options, at: datetime, due: float, stop: threading.Event | None) -> bool:
    """Wait until a message is due: at the run's *rate* (*due*, monotonic), or in real
    time at *at*; False if *stop* was set meanwhile."""
    if options.rate:
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
    elif options.realtime:
        delay = (at - datetime.now(UTC)).total_seconds()
        if delay > 0 and stop is not None and stop.wait(min(delay, 60)):
            return False
        if delay > 0 and stop is None:
            time.sleep(min(delay, 60))
    return True


def _report(progress: TextIO, summary: Summary, seconds: float) -> None:
    rate = summary.messages / max(seconds, 1e-9)
    progress.write(f"\rpublished {summary.messages} messages,"
                   f" {sum(summary.valid_readings.values())} valid readings,"
                   f" {rate:,.0f} msg/s, {summary.errors} errors   ")
    progress.flush()


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
