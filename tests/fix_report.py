"""What the fault and overload tests counted, for the reliability report.

Each scenario calls the ``reliability`` fixture with a `Scenario`. With
``BMSD_RELIABILITY_REPORT`` naming a file, every call appends one JSON line
to it; ``bench/reliability.py`` sets it, runs the scenarios and writes
``docs/reliability.md`` from the lines. ``BMSD_RELIABILITY_FULL=1`` (also set
by the report) runs the long forms the issue asks for: 30 s outages, 60 s of
overload. CI runs the short forms.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

FULL = os.environ.get("BMSD_RELIABILITY_FULL") == "1"


def full_or_short(full: float, short: float) -> float:
    """Return the long form's value when the report runs, else CI's short one."""
    return full if FULL else short


@dataclass(frozen=True)
class Scenario:
    """One scenario's accounting: every published reading stored once, or why not."""

    name: str
    published: int
    stored: int
    duplicates: int
    dead_letters: int
    noticed_s: float | None = None
    recovered_s: float | None = None
    rss_before_mb: float | None = None
    rss_after_mb: float | None = None
    note: str = ""


Record = Callable[[Scenario], None]


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Iterator[Record]:
    """Return a function that records a scenario's numbers for the report."""
    recorded: list[Scenario] = []
    yield recorded.append
    target = os.environ.get("BMSD_RELIABILITY_REPORT")
    if target and recorded:
        with Path(target).open("a") as out:
            for scenario in recorded:
                out.write(json.dumps({"test": request.node.nodeid, **asdict(scenario)}) + "\n")
