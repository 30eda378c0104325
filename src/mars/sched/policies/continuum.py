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
`continuum-dynamic` learns the TTL per call instead (see its class).
"""

from __future__ import annotations

from collections.abc import Sequence

from mars.core.events import GpuSubmit, ToolEnd
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
        self.add(event.category, event.duration_s)

    def add(self, category: str, seconds: float) -> None:
        for key in (category, ""):  # "" pools every category
            self._sum[key] = self._sum.get(key, 0.0) + seconds
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


class ContinuumDynamicPolicy(ContinuumPolicy):
    """`continuum-dynamic`: Continuum with a learned TTL per tool call.

    tau* = argmax over tau of P(tool <= tau) * (eta * T_queue + reload(L)) - tau, where the CDF is
    the tool category's observed durations (the last `window` of them), T_queue the mean time a
    call has recently waited before its first step, and reload(L) the step-time model's prefill
    time of the session's L cached tokens. With fewer than `min_samples` observations of the
    category it behaves as `continuum` (fixed TTL); tau* = 0 means drop.
    """

    name = "continuum-dynamic"
    eta = 1.0
    min_samples = 5
    window = 200

    def __init__(self) -> None:
        super().__init__()
        self._samples: dict[str, list[float]] = {}
        self._queue_s = 0.0
        self._queued_n = 0

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        ctx.bus.subscribe(ToolEnd, self._sample)
        ctx.bus.subscribe(GpuSubmit, self._waited)

    def _sample(self, event: ToolEnd) -> None:
        xs = self._samples.setdefault(event.category, [])
        xs.append(event.duration_s)
        del xs[: -self.window]

    def _waited(self, event: GpuSubmit) -> None:
        session = self._sessions().get(event.session_id)
        req = session.current if session is not None else None
        if req is not None and req.request_id == event.request_id:
            self._queue_s += event.time - req.arrival_time
            self._queued_n += 1

    def ttl(self, category: str, tokens: int) -> float | None:
        """tau* for a call of `category` holding `tokens`; None while the CDF is cold."""
        xs = sorted(self._samples.get(category, ()))
        assert self.ctx is not None
        if len(xs) < self.min_samples or self.ctx.timer is None:
            return None
        t_queue = self._queue_s / self._queued_n if self._queued_n else 0.0
        gain = self.eta * t_queue + self.ctx.timer.step_seconds(
            1, tokens, tokens * (tokens + 1) // 2, tokens
        )
        best_tau, best = 0.0, 0.0
        for i, tau in enumerate(xs):
            score = (i + 1) / len(xs) * gain - tau
            if score > best:
                best_tau, best = tau, score
        return best_tau

    def retention(self, session: Session, req: Request) -> Retention:
        if req.next_tool is None:
            return Retention.DROP
        tau = self.ttl(req.next_tool, req.num_computed_tokens)
        if tau is None:
            return super().retention(session, req)
        if tau <= 0:
            return Retention.DROP
        assert self.ctx is not None
        self._expiry[session.session_id] = self.ctx.clock.now() + tau
        return Retention.PIN
