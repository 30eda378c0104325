"""Open-loop session arrival times (DESIGN.md section 4: Poisson or fixed rate at λ sessions/s).

- "poisson": exponential gaps with mean 1/rate. The first session arrives after the first drawn
  gap, not at 0: every gap, the first included, is exponential, and n arrivals span about n/rate.
- "fixed": session i arrives at exactly i/rate; the first at 0.
- "bursts": sessions come BURST_SIZE at a time, all of a burst at one instant (a fleet's batch
  of tasks launched together, the workload family `bursts`); the bursts are a Poisson stream at
  rate/BURST_SIZE, so the mean rate is still `rate`.

Closed-loop runs (C concurrent sessions) have no arrival times: the run loop starts the next session
when one finishes.

The Poisson stream is seeded by f"arrivals/{seed}" rather than by `seed` itself, so that it is not
the very stream `build_workload` samples trajectories from with the same seed: otherwise the first
gaps and the first sampled trajectories would come from the same random bits.
"""

from __future__ import annotations

import math
import random

from mars.core.errors import UsageError

ARRIVAL_KINDS = ("poisson", "fixed", "bursts")
BURST_SIZE = 8  # sessions launched together in "bursts"


def arrival_times(n: int, *, rate: float, kind: str = "poisson", seed: int = 0) -> list[float]:
    """Arrival times in seconds of `n` sessions at `rate` sessions/s, non-decreasing."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UsageError(f"number of sessions must be an integer >= 0, got {n!r}")
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate < math.inf:
        raise UsageError(f"--rate must be a number of sessions per second > 0, got {rate!r}")
    if kind == "fixed":
        return [i / rate for i in range(n)]
    if kind in ("poisson", "bursts"):
        size = BURST_SIZE if kind == "bursts" else 1
        rng = random.Random(f"arrivals/{seed}")
        times: list[float] = []
        t = 0.0
        for i in range(n):
            if i % size == 0:
                t += rng.expovariate(rate / size)
            times.append(t)
        return times
    raise UsageError(f"unknown arrival kind {kind!r}: choose one of {', '.join(ARRIVAL_KINDS)}")
