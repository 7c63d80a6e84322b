"""A Sparkplug B edge node built on pysparkplug (not bmsd's code), for tests/test_sparkplug.py.

Runs in .venv-edge (pysparkplug needs paho-mqtt 1). It births an edge node with
its own metric and DEVICES battery devices, then publishes READINGS rounds of
DDATA per device, every INTERVAL seconds; each device's metrics: Battery/SOC
(Float), Battery/Voltage (Double, in mV), Cabinet/Door (Boolean), Serial
(String). With --aliases the data names metrics by alias only. With --host-id
it is a store-and-forward edge node: while that host's STATE says offline (or
was never seen), or while its own connection is down, it buffers its
readings, and sends them, marked historical, once the STATE says online. A
rebirth request (NCMD Node Control/Rebirth) is answered with NBIRTH and DBIRTHs.
At the end it prints one JSON line: what it produced and published.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import threading
import time
from typing import Any

from pysparkplug import (
    Client,
    DataType,
    DBirth,
    DData,
    Device,
    EdgeNode,
    Message,
    MessageType,
    Metric,
    MQTTError,
    NBirth,
    QoS,
    Topic,
    get_current_timestamp,
)

SOC, VOLTAGE, DOOR, SERIAL = "Battery/SOC", "Battery/Voltage", "Cabinet/Door", "Serial"
ALIASES = {SOC: 1, VOLTAGE: 2, DOOR: 3, SERIAL: 4}
TYPES = {SOC: DataType.FLOAT, VOLTAGE: DataType.DOUBLE, DOOR: DataType.BOOLEAN,
         SERIAL: DataType.STRING}


def metrics(ts: int, n: int, device: int, *, named: bool = True, alias: bool = True,
            historical: bool = False) -> tuple[Metric, ...]:
    values = {SOC: float(50 + (n % 40)), VOLTAGE: 52000.0 + n, DOOR: n % 7 == 0,
              SERIAL: f"SN-{device}"}
    return tuple(Metric(timestamp=ts, name=name if named else None, datatype=TYPES[name],
                        value=value, alias=ALIASES[name] if alias else None,
                        is_historical=historical)
                 for name, value in values.items())


class Edge:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lock = threading.Lock()
        self.client = Client(client_id=f"edge-{args.edge}", username=args.user,
                             password=args.password)
        self.node = EdgeNode(args.group, args.edge, [Metric(
            timestamp=get_current_timestamp(), name="Uptime", datatype=DataType.INT64,
            value=0)], client=self.client, cmd_callback=self.command)
        for d in range(args.devices):
            self.node.register(Device(f"bms-{d}", metrics(get_current_timestamp(), 0, d)))
        self.online: bool | None = None if args.host_id else True
        self.buffer: list[tuple[int, int, int]] = []  # (device, n, ts)
        self.counts = {"produced": 0, "published": 0, "historical": 0, "rebirths": 0}

    def command(self, node: EdgeNode, message: Message) -> None:
        asked = any(m.name == "Node Control/Rebirth" and m.value
                    for m in message.payload.metrics)
        if asked:
            with self.lock:
                self.counts["rebirths"] += 1
                self.rebirth()

    def rebirth(self) -> None:
        """NBIRTH (seq 0, same bdSeq) and every DBIRTH again, as the specification asks."""
        node = self.node
        node._EdgeNode__seq_cycler = itertools.cycle(range(256))  # type: ignore[attr-defined]
        self.client.publish(Message(
            Topic(message_type=MessageType.NBIRTH, group_id=node.group_id,
                  edge_node_id=node.edge_node_id),
            NBirth(timestamp=get_current_timestamp(), seq=node._seq,
                   metrics=(*node.metrics.values(), node._bd_seq_metric)),
            qos=QoS.AT_MOST_ONCE, retain=False), include_dtypes=True)
        for device in node.devices.values():
            self.client.publish(Message(
                Topic(message_type=MessageType.DBIRTH, group_id=node.group_id,
                      edge_node_id=node.edge_node_id, device_id=device.device_id),
                DBirth(timestamp=get_current_timestamp(), seq=node._seq,
                       metrics=tuple(device.metrics.values())),
                qos=QoS.AT_MOST_ONCE, retain=False), include_dtypes=True)

    def state(self, client: Any, message: Message) -> None:
        with self.lock:
            self.online = bool(message.payload.online)
            if self.online:
                self.flush()

    def flush(self) -> None:
        while self.buffer:
            device, n, ts = self.buffer[0]
            try:
                self.publish(device, n, ts, historical=True)
            except MQTTError:  # down again: the rest waits for the next online
                self.online = False
                return
            self.buffer.pop(0)
            self.counts["historical"] += 1

    def publish(self, device: int, n: int, ts: int, historical: bool = False) -> None:
        node, aliases = self.node, self.args.aliases
        self.client.publish(Message(
            Topic(message_type=MessageType.DDATA, group_id=node.group_id,
                  edge_node_id=node.edge_node_id, device_id=f"bms-{device}"),
            DData(get_current_timestamp(), seq=node._seq,
                  metrics=metrics(ts, n, device, named=not aliases, alias=aliases,
                                  historical=historical)),
            qos=QoS.AT_MOST_ONCE, retain=False), include_dtypes=not aliases)
        self.counts["published"] += 1

    def run(self) -> None:
        args = self.args
        if args.host_id:
            self.client.subscribe(Topic(message_type=MessageType.STATE,
                                        sparkplug_host_id=args.host_id),
                                  QoS.AT_LEAST_ONCE, self.state)
        self.node.connect("127.0.0.1", port=args.port, blocking=False)
        time.sleep(args.settle)
        log = open(args.produced, "w") if args.produced else None  # noqa: SIM115
        ts = 0
        for n in range(args.readings):
            ts = max(get_current_timestamp(), ts + 1)  # the reading's time: now, one per ms
            for device in range(args.devices):
                with self.lock:
                    self.counts["produced"] += 1
                    if log is not None:
                        log.write(f"{device} {ts}\n")
                    if self.online:
                        try:
                            self.publish(device, n, ts)
                        except MQTTError:  # the connection is down: keep it for later
                            self.online = False
                            self.buffer.append((device, n, ts))
                    else:
                        self.buffer.append((device, n, ts))
            time.sleep(args.interval)
        deadline = time.monotonic() + args.linger
        while time.monotonic() < deadline:  # the host may come back and take the buffer
            with self.lock:
                if not self.buffer:
                    break
            time.sleep(0.1)
        if log is not None:
            log.close()
        # QoS 0 messages leave from paho's queue on its own thread: let it empty.
        deadline = time.monotonic() + 15
        while self.client._client._out_packet and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        print(json.dumps({**self.counts, "buffered": len(self.buffer)}), flush=True)
        if args.death:
            # Gone without a DISCONNECT: the broker sends the will, this session's
            # NDEATH. (pysparkplug's own disconnect() sends an NDEATH with the next
            # session's bdSeq, which a host must ignore.)
            os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--group", default="plant")
    parser.add_argument("--edge", default="edge-1")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--readings", type=int, default=10)
    parser.add_argument("--interval", type=float, default=0.0)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--linger", type=float, default=0.0)
    parser.add_argument("--aliases", action="store_true")
    parser.add_argument("--host-id")
    parser.add_argument("--produced", help="write each reading produced here: device ms")
    parser.add_argument("--death", action="store_true",
                        help="end by dropping the connection: the will (NDEATH)")
    Edge(parser.parse_args()).run()


if __name__ == "__main__":
    main()
