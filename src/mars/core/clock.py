"""Clocks: every component reads time through an injected `Clock`, never `time.time()` directly.

The simulator and tests advance a `SimClock` by hand; live engines use `WallClock`.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since an arbitrary origin fixed for the clock's lifetime."""
        ...


class WallClock:
    """Monotonic wall time, zero at construction."""

    def __init__(self) -> None:
        self._origin = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._origin


class SimClock:
    """A clock that only moves when told to: the simulator's and the tests' clock."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance_to(self, t: float) -> None:
        if t < self._now:
            raise ValueError(f"clock cannot go back from {self._now} to {t}")
        self._now = t

    def advance(self, dt: float) -> None:
        self.advance_to(self._now + dt)
