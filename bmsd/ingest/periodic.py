"""The daemon's periodic jobs: each an interval and an action, run from the loop.

The loop calls `run_due` once per turn; a job runs when its time has come
(and its guard, if any, allows), then waits its interval again. A job's
interval may change with the daemon's state (a callable), read when it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class Periodic:
    """Run *action* every *every_s* seconds (a number, or a function giving one)."""

    name: str
    every_s: float | Callable[[], float]
    action: Callable[[], object]
    # While it says False the job waits, and runs at the first turn it says True.
    guard: Callable[[], bool] | None = None
    due_at: float = 0.0  # monotonic time; 0: at the first turn

    def interval(self) -> float:
        return self.every_s() if callable(self.every_s) else self.every_s


def run_due(jobs: Sequence[Periodic], now: float) -> None:
    """Run each job of *jobs* whose time has come, in order."""
    for job in jobs:
        if now >= job.due_at and (job.guard is None or job.guard()):
            job.due_at = now + job.interval()
            job.action()
