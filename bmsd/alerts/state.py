"""What the alert engine knows and decides: devices, alerts, the committed state, a
batch's readings as evaluated, and the plan a batch makes (bmsd/alerts/evaluate.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: The alert of a device gone silent, or declared dead by its gateway.
OFFLINE = "DEVICE_OFFLINE"


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What rules and messages need to know about a device."""

    id: int
    site_id: int
    site: str
    slug: str
    kind: str
    nominal_grid_frequency_hz: int


@dataclass(slots=True)
class Alert:
    """An unresolved alert, or one changing state."""

    device: DeviceInfo
    code: str
    severity: str
    category: str
    title: str
    message: str
    value: float | None
    threshold: float | None
    triggered_at: datetime
    id: int | None = None
    status: str = "active"
    resolved_at: datetime | None = None
    #: The time of the reading that raised it (``triggered_at`` is the reading
    #: that started its condition, ``for_s`` earlier or more).
    raised_at: datetime | None = None
    #: Stored more than ``[alerts] late_after_s`` after that reading was taken.
    raised_late: bool = False

    @classmethod
    def offline(cls, device: DeviceInfo, message: str, value: float | None,
                threshold: float | None, at: datetime) -> Alert:
        """Return *device*'s DEVICE_OFFLINE alert, raised *at*."""
        return cls(device, OFFLINE, "warning", "connectivity", "device offline", message,
                   value, threshold, at, raised_at=at)

    @property
    def raised(self) -> datetime:
        return self.raised_at or self.triggered_at

    def document(self) -> dict[str, Any]:
        """Return the JSON document published on MQTT."""
        return {
            "id": self.id, "site": self.device.site, "device": self.device.slug,
            "code": self.code, "severity": self.severity, "category": self.category,
            "status": self.status, "title": self.title, "message": self.message,
            "value": self.value, "threshold": self.threshold,
            "triggered_at": self.triggered_at.isoformat(),
            "resolved_at": self.resolved_at.isoformat() if self.resolved_at else None,
            "raised_at": self.raised.isoformat(), "raised_late": self.raised_late,
        }


Pending = dict[str, tuple[datetime, float]]  # rule code -> (since, first value)


@dataclass
class Plan:
    """The alert changes of one batch, decided but not yet committed."""

    triggered: list[Alert] = field(default_factory=list)
    resolved: list[Alert] = field(default_factory=list)
    raised_and_cleared: list[Alert] = field(default_factory=list)  # within this batch
    #: Stored alerts that readings arriving late changed (their raise or their
    #: resolution), and those the readings no longer imply (bmsd/alerts/history.py).
    revised: list[Alert] = field(default_factory=list)
    withdrawn: list[Alert] = field(default_factory=list)
    #: (device, stream) -> its oldest reading of this batch not newer than its
    #: mark: the history to evaluate again from.
    late: dict[tuple[int, str], datetime] = field(default_factory=dict)
    replays: dict[str, int] = field(default_factory=dict)  # histories evaluated again
    unevaluated: dict[str, int] = field(default_factory=dict)  # readings beyond the window
    marks: dict[tuple[int, str], datetime] = field(default_factory=dict)
    pending: dict[tuple[int, str], Pending] = field(default_factory=dict)
    seen: dict[int, datetime] = field(default_factory=dict)
    intervals: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def empty(self) -> bool:
        return not (self.marks or self.triggered or self.resolved or self.revised
                    or self.withdrawn)


@dataclass
class State:
    """The committed alert state: what plans are decided against."""

    devices: dict[int, DeviceInfo] = field(default_factory=dict)
    safety_limits: dict[int, dict[str, float]] = field(default_factory=dict)
    open: dict[tuple[int, str], Alert] = field(default_factory=dict)
    marks: dict[tuple[int, str], datetime] = field(default_factory=dict)
    pending: dict[tuple[int, str], Pending] = field(default_factory=dict)
    last_seen: dict[int, datetime] = field(default_factory=dict)
    interval: dict[int, float] = field(default_factory=dict)
    streams_of: dict[int, set[str]] = field(default_factory=dict)
    #: Each device's latest alert change (raise or resolution time, but
    #: DEVICE_OFFLINE's): a late reading before it may change its history.
    changed: dict[int, datetime] = field(default_factory=dict)
    #: Devices whose gateway tells when they are offline (Sparkplug): none is
    #: declared offline by silence.
    managed: set[int] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class StreamRows:
    """A batch's rows of one stream, as tuples, and where in them their time, their
    device id and each field that evaluating them reads sit (no field: only their
    times matter). No two readings have one device and time.

    Tuples, not a dict per reading: a batch's readings are checked column by
    column, and most of them only that way (see `evaluate`).
    """

    rows: Sequence[Sequence[Any]]
    time: int
    device: int
    fields: Mapping[str, int] = field(default_factory=dict)
