"""`continuum`: KV time-to-live pinning across tool calls, after Continuum (Li et al., 2025,
"Continuum: Efficient and Robust Multi-Turn LLM Agent Scheduling with KV Cache Time-to-Live",
arXiv 2511.02230).

Rules implemented (fixed-TTL variant, as the design's `continuum`):
- when a call ends in a tool call whose expected duration (the running mean of that tool
  category's observed durations; optimistic before any observation) is at most the TTL, the
  session's KV stays pinned on the GPU; otherwise it is dropped (vLLM behaviour);
- a pin expires TTL seconds after the call ended (checked every tick); an expired pin becomes
  ordinary evictable prefix cache;
- waiting requests are served in the order their *sessions* arrived (program-level FCFS), so a
  returning session's next call goes ahead of younger sessions' calls.
Everything else (chunked prefill, recompute preemption of the newest) is vLLM's.
"""

from __future__ import annotations

from collections.abc import Sequence

from mars.core.events import ToolEnd
from mars.core.request import Request
from mars.core.session import Session
from mars.kv.manager import Retention
from mars.sched.policy import BasePolicy, PolicyContext


class ToolDurations:
    """Running mean of observed tool durations per category, learned from `tool_end` events."""

    def __init__(self) -> None:
        self._sum: dict[str, float] = {}
        self._n: dict[str, int] = {}

    def observe(self, event: ToolEnd) -> None:
        for key in (event.category, ""):  # "" pools every category
            self._sum[key] = self._sum.get(key, 0.0) + event.duration_s
            self._n[key] = self._n.get(key, 0) + 1

    def mean(self, category: str) -> float | None:
        n = self._n.get(category)
        return None if not n else self._sum[category] / n

    def mean_any(self) -> float | None:
        """Mean over every tool observed so far, whatever its category."""
        return self.mean("")


class ContinuumPolicy(BasePolicy):
    name = "continuum"
    tick_s = 0.1
    ttl_s = 2.0

    def __init__(self) -> None:
        super().__init__()
        self.durations = ToolDurations()
        self._expiry: dict[str, float] = {}  # pinned session -> when its pin lapses

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        ctx.bus.subscribe(ToolEnd, self.durations.observe)

    def _sessions(self) -> dict[str, Session]:
        assert self.ctx is not None, "bind() first"
        return self.ctx.sessions

    def order_waiting(self, waiting: Sequence[Request]) -> Sequence[Request]:
        sessions = self._sessions()

        def key(r: Request) -> float:
            s = sessions.get(r.session_id)
            return s.arrival_time if s is not None else r.arrival_time

        return sorted(waiting, key=key)

    def retention(self, session: Session, req: Request) -> Retention:
        if req.next_tool is None:
            return Retention.DROP
        expected = self.durations.mean(req.next_tool)
        if expected is not None and expected > self.ttl_s:
            return Retention.DROP
        assert self.ctx is not None
        self._expiry[session.session_id] = self.ctx.clock.now() + self.ttl_s
        return Retention.PIN

    def on_tick(self) -> None:
        assert self.ctx is not None
        now = self.ctx.clock.now()
        for sid, t in list(self._expiry.items()):
            if t <= now:
                del self._expiry[sid]
                self.ctx.kv.unpin(sid)  # a no-op if the session already came back
