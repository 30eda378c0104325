"""Tool execution on N simulated CPU cores, optionally behind a pool of W workers.

`cpu_heavy` tools (tests, builds, running Python) are processor-sharing jobs: with n of them on N
cores each advances at min(1, N/n) seconds of work per second, so oversubscription stretches all
of them. Light tools (views, edits, searches) take their duration and use no core.

With W workers (`WorkerQueue`, as `mars serve --tool-workers W` runs them), every tool, light or
heavy, holds a worker while it runs and waits first-in first-out for one when all are busy: the
live tools runtime's queue, whose wait is the CPU signal's EMA.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(slots=True)
class _Job:
    key: object
    remaining_s: float  # seconds of work left at full speed on one core


class ProcessorSharing:
    def __init__(self, cores: int) -> None:
        if cores < 1:
            raise ValueError("tool cores must be at least 1")
        self.cores = cores
        self._jobs: list[_Job] = []
        self._t = 0.0
        self.busy_core_s = 0.0  # integral of cores in use, for utilisation

    @property
    def num_jobs(self) -> int:
        return len(self._jobs)

    def _rate(self) -> float:
        n = len(self._jobs)
        return 1.0 if n <= self.cores else self.cores / n

    def advance(self, now: float) -> None:
        dt = now - self._t
        if dt > 0 and self._jobs:
            done = dt * self._rate()
            for job in self._jobs:
                job.remaining_s -= done
            self.busy_core_s += dt * min(len(self._jobs), self.cores)
        self._t = max(self._t, now)

    def add(self, key: object, work_s: float, now: float) -> None:
        self.advance(now)
        self._jobs.append(_Job(key, work_s))

    def next_finish(self) -> float | None:
        """Time the next job completes if nothing else arrives."""
        if not self._jobs:
            return None
        least = min(job.remaining_s for job in self._jobs)
        return self._t + max(0.0, least) / self._rate()

    def pop_due(self, now: float, eps: float = 1e-9) -> list[object]:
        """The jobs due at `now`, the time `next_finish()` gave: the least remaining work and any
        within `eps` of it. Taking the least (not "remaining <= 0") keeps rounding at large clock
        values from leaving a job a hair short of done and re-arming the same instant forever."""
        self.advance(now)
        if not self._jobs:
            return []
        cut = max(0.0, min(job.remaining_s for job in self._jobs)) + eps
        done = [job.key for job in self._jobs if job.remaining_s <= cut]
        self._jobs = [job for job in self._jobs if job.remaining_s > cut]
        return done


class WorkerQueue:
    """First-in first-out tool workers; `workers=None`: a worker for every tool (no queue)."""

    def __init__(self, workers: int | None) -> None:
        if workers is not None and workers < 1:
            raise ValueError("tool workers must be at least 1")
        self.workers = workers
        self.busy = 0
        self._queue: deque[object] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def acquire(self, key: object) -> bool:
        """True if `key` holds a worker now; else it waits in line (see `release`)."""
        if self.workers is None or self.busy < self.workers:
            self.busy += 1
            return True
        self._queue.append(key)
        return False

    def release(self) -> object | None:
        """A run ended: the next in line, which now holds the freed worker, or None."""
        if self._queue:
            return self._queue.popleft()
        self.busy -= 1
        return None
