"""`infercept`: min-waste handling of interceptions, after InferCept (Abhyankar et al., ICML 2024,
"InferCept: Efficient Intercept Support for Augmented Large Language Model Inference").

When a call ends in a tool call (an interception), InferCept keeps, discards or swaps the
request's context, whichever wastes the least GPU memory x time:
- preserve: the context's memory is held idle for the whole interception:
  `waste = C * T_int`;
- discard: on return the context is recomputed, during which the memory of everything running is
  held while no useful token comes out of it: `waste = T_fwd(C) * (C + C_running)`;
- swap: the context is copied out and back over the host link, stalling the batch both ways:
  `waste = 2 * T_swap(C) * C_running` (swapping needs host room, else it is not an option).
`T_int` is the running mean of that tool category's observed durations (before any observation,
the mean over all tools so far; with none at all, preserve is not chosen); `T_fwd` and
`T_swap` come from the engine's step-time model. Scheduling otherwise is vLLM's FCFS.
"""

from __future__ import annotations

from mars.core.events import ToolEnd
from mars.core.request import Request
from mars.core.session import Session
from mars.kv.manager import Retention
from mars.sched.policies.continuum import ToolDurations
from mars.sched.policy import BasePolicy, PolicyContext


class InferCeptPolicy(BasePolicy):
    name = "infercept"

    def __init__(self) -> None:
        super().__init__()
        self.durations = ToolDurations()

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        ctx.bus.subscribe(ToolEnd, self.durations.observe)

    def expected_interception(self, req: Request) -> float | None:
        mean = self.durations.mean(req.next_tool) if req.next_tool else None
        return mean if mean is not None else self.durations.mean_any()

    def retention(self, session: Session, req: Request) -> Retention:
        assert self.ctx is not None
        if req.next_tool is None:
            return Retention.DROP  # the session ends or re-prompts at once: nothing to keep
        ctx_tokens = req.num_computed_tokens
        kv = self.ctx.kv
        running = (kv.num_blocks - kv.num_free_blocks) * kv.block_size - ctx_tokens
        timer = self.ctx.timer
        if timer is None:
            return Retention.DROP
        t_fwd = timer.step_seconds(1, ctx_tokens, ctx_tokens * (ctx_tokens + 1) // 2, ctx_tokens)
        wastes = {Retention.DROP: t_fwd * (ctx_tokens + max(0, running))}
        t_int = self.expected_interception(req)
        if t_int is not None:
            wastes[Retention.PIN] = ctx_tokens * t_int
        host_room = kv.config.host_capacity_tokens - kv.host_used_tokens
        if host_room >= ctx_tokens:
            wastes[Retention.OFFLOAD] = 2 * timer.transfer_seconds(ctx_tokens) * max(0, running)
        return min(wastes, key=lambda r: (wastes[r], r))
