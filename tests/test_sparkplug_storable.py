"""What an edge node may send but PostgreSQL cannot hold as sent (NUL in text, NaN or
infinity in JSON) is stored as it can be, on the real stack: the batch commits, and
the readings after it too. Such a value once stopped every commit that followed.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import psycopg

from bmsd.sparkplug.payload import BY_NAME, PayloadMessage
from tests.fix_daemon import DaemonFactory, Publisher, wait_until
from tests.fix_mqtt import Broker


def test_text_with_nul_and_arrays_with_nan_are_stored_and_ingest_goes_on(
    bmsd_daemon: DaemonFactory, mqtt_broker: Broker, db_url: str,
) -> None:
    group = f"odd-{os.getpid()}"
    daemon = bmsd_daemon(f'[sparkplug]\nenabled = true\ngroups = ["{group}"]\n'
                         f'host_id = "odd-{os.getpid()}"\n')
    wait_until(lambda: daemon.metric("bmsd_sparkplug_host_online") == 1, what="online")
    publisher = Publisher(mqtt_broker.url_as("tester"))
    birth: Any = PayloadMessage()
    birth.seq = 0
    birth.metrics.add(name="bdSeq", datatype=BY_NAME["Int64"], long_value=0)
    birth.metrics.add(name="Serial", alias=1, datatype=BY_NAME["String"], string_value="a\0b")
    birth.metrics.add(name="Cells", alias=2, datatype=BY_NAME["DoubleArray"],
                      bytes_value=struct.pack("<3d", 1.0, float("nan"), float("inf")))
    birth.metrics.add(name="Tag\0", alias=3, datatype=BY_NAME["Double"], double_value=1.5)
    messages = [(f"spBv1.0/{group}/NBIRTH/edge", bytes(birth.SerializeToString()))]
    for seq in range(1, 4):
        data: Any = PayloadMessage()
        data.seq = seq
        data.metrics.add(alias=1, string_value=f"x\0{seq}")
        data.metrics.add(alias=3, double_value=float(seq))
        messages.append((f"spBv1.0/{group}/NDATA/edge", bytes(data.SerializeToString())))
    publisher.publish_many(messages, qos=0)

    def stored() -> list[tuple[Any, ...]]:
        with psycopg.connect(db_url) as conn:
            return conn.execute(
                "SELECT name, value, value_text, value_json::text FROM sparkplug_metrics"
                " ORDER BY time, name, value_text").fetchall()
    wait_until(lambda: len(stored()) == 3 + 2 * 3, what="every metric stored")
    rows = stored()
    assert ("Serial", None, "a\\u0000b", None) in rows
    assert ("Cells", None, None, '[1.0, "nan", "inf"]') in rows
    assert ("Tag\\u0000", 3.0, None, None) in rows
    assert daemon.metric("bmsd_messages_rejected_total") == 0
