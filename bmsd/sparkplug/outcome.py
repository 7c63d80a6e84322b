"""What a Sparkplug B message means (`Outcome`, of bmsd/sparkplug/host.py), for the
ingestor to store (bmsd/ingest/sparkplug.py)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bmsd.config import SparkplugMap
from bmsd.streams import BY_NAME


@dataclass(frozen=True, slots=True, eq=False)  # one per key (Host.target): by identity
class Target:
    """A Sparkplug edge node or device as bmsd stores it."""

    group: str
    edge_node: str
    device: str  # "" for the edge node itself
    site: str
    name: str  # the device's slug at the site
    kind: str
    stream: str | None
    fields: dict[str, tuple[str, float]]  # metric name -> (field, scale)
    site_kind: str  # what its site is registered as (bmsd/streams.py)

    @classmethod
    def of(cls, maps: Iterable[SparkplugMap], group: str, edge: str, device: str) -> Target:
        """Return where the first of *maps* that matches stores *device* of *edge*."""
        mine = [m for m in maps if fnmatch.fnmatchcase(group, m.group)
                and fnmatch.fnmatchcase(edge, m.edge_node)]  # this edge node's maps
        chosen = next((m for m in mine if fnmatch.fnmatchcase(device, m.device)), None)
        if chosen is None:
            chosen = SparkplugMap()
        names = {"group": group, "edge_node": edge, "device": device}
        name = chosen.name.format(**names) or edge
        fields = {metric: ((to, 1.0) if isinstance(to, str) else (to.field, to.scale))
                  for metric, to in chosen.metrics.items()}
        # The site's kind is its stream's; for the edge node itself (or a device of no
        # stream), its devices': the first map of its edge node that names a stream.
        stream = chosen.stream or next((m.stream for m in mine if m.stream), None)
        return cls(group, edge, device, chosen.site.format(**names), name,
                   chosen.device_kind, chosen.stream, fields,
                   BY_NAME[stream].site_kind if stream else "factory")


@dataclass(slots=True)
class Reading:
    """The mapped metrics of one target at one time: a reading of its stream."""

    target: Target
    time: datetime
    fields: dict[str, Any]
    historical: bool


@dataclass(slots=True)
class Unmapped:
    """A metric no map names a field for: stored as it is (sparkplug_metrics)."""

    target: Target
    time: datetime
    name: str
    datatype: str
    unit: str | None
    value: Any
    historical: bool


@dataclass(slots=True)
class Change:
    """A birth or a death of an edge node or a device."""

    target: Target
    online: bool
    at: datetime  # bmsd's receive time
    bdseq: int | None


@dataclass(slots=True)
class Outcome:
    """What one message means."""

    readings: list[Reading] = field(default_factory=list)
    unmapped: list[Unmapped] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    rebirths: list[str] = field(default_factory=list)  # NCMD topics
    problems: list[tuple[str, str]] = field(default_factory=list)  # (category, reason)
    kind: str = ""  # the message type (NBIRTH, DDATA, ...), "" if not Sparkplug
    unknown_aliases: int = 0
    historical: int = 0
