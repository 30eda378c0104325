"""Signals the control plane reads off the event stream (DESIGN.md section 2)."""

from __future__ import annotations

from collections import deque

from mars.core.events import ToolEnqueued, ToolStart


class ToolQueueWait:
    """Exponential moving average of how long tool runs waited for a CPU worker.

    Fed `tool_enqueued` and `tool_start` (a session's tool runs start in the order they were
    queued). An executor whose CPU pool has no queue (the simulator shares its cores instead)
    publishes no `tool_enqueued`, and the average stays 0: there, contention shows as longer
    tools, which the in-flight count sees.
    """

    def __init__(self, alpha: float = 0.2) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError("the EMA weight must be in (0, 1]")
        self.alpha = alpha
        self.value = 0.0
        self.samples = 0
        self._queued: dict[str, deque[float]] = {}

    def enqueued(self, event: ToolEnqueued) -> None:
        self._queued.setdefault(event.session_id, deque()).append(event.time)

    def started(self, event: ToolStart) -> None:
        times = self._queued.get(event.session_id)
        if not times:
            return
        wait = event.time - times.popleft()
        if not times:
            del self._queued[event.session_id]
        self.samples += 1
        self.value = wait if self.samples == 1 else self.value + self.alpha * (wait - self.value)

    def oldest_wait(self, now: float) -> float:
        """How long the longest-waiting queued tool run has waited so far (0 if none): a
        stalled pool shows here before any run starts to update the average."""
        return max((now - times[0] for times in self._queued.values()), default=0.0)


class RecentTail:
    """A high quantile of recent samples per category (times away, here), kept over the last
    `window` samples of each: a session away longer than nearly every one that came back has
    likely left. A quantile, not the maximum: one person who came back after an hour must not
    keep every finished session counted for an hour."""

    def __init__(self, quantile: float = 0.95, window: int = 256) -> None:
        if not 0.0 < quantile <= 1.0 or window < 1:
            raise ValueError("the quantile must be in (0, 1] and the window at least 1")
        self.quantile, self.window = quantile, window
        self._samples: dict[str, deque[float]] = {}
        self._cached: dict[str, float] = {}

    def add(self, category: str, value: float) -> None:
        for key in (category, ""):  # "" pools every category
            self._samples.setdefault(key, deque(maxlen=self.window)).append(value)
            self._cached.pop(key, None)

    def value(self, category: str) -> float | None:
        """The quantile of the category's recent samples (of all categories if it has none)."""
        key = category if category in self._samples else ""
        if key not in self._samples:
            return None
        if key not in self._cached:
            ordered = sorted(self._samples[key])
            self._cached[key] = ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]
        return self._cached[key]
