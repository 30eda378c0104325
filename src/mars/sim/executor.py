"""The simulator's executor: a step takes what the cost model predicts; no tokens are produced."""

from __future__ import annotations

from collections.abc import Callable

from mars.sched.plan import StepPlan, StepResult
from mars.sim.costmodel import StepCostModel


class SimExecutor:
    def __init__(self, cost: StepCostModel, cells_in_use: Callable[[], int] | None = None) -> None:
        """`cells_in_use()`: KV tokens the cache holds now (running and cached sessions), for
        engines whose attention scans them all (`cost.cache_scan_seconds`)."""
        self.cost = cost
        self.cells_in_use = cells_in_use
        self.busy_s = 0.0

    def execute(self, plan: StepPlan) -> StepResult:
        n = len(plan.requests)
        new = sum(plan.num_new_tokens)
        ctx = sum(plan.context_lens)
        pairs = sum(k * c for k, c in zip(plan.num_new_tokens, plan.context_lens, strict=True))
        dt = self.cost.step_seconds(n, new, attn_pairs(new, pairs, plan.num_new_tokens), ctx + new)
        if self.cells_in_use is not None:
            dt += self.cost.cache_scan_seconds(new, max(0, self.cells_in_use() - ctx - new))
        for _, tokens in plan.restores:
            dt += self.cost.transfer_seconds(tokens)
        # Prefetches copy on their own stream while the step computes (as cudaMemcpyAsync does).
        ahead = sum(self.cost.transfer_seconds(tokens) for _, tokens in plan.prefetches)
        dt = max(dt, ahead)
        self.busy_s += dt
        return StepResult(plan.step_id, dt)

    def decode_stretch(
        self, batch: int, context_sum: int, max_steps: int, until: float, now: float
    ) -> list[float]:
        """Durations of up to `max_steps` pure-decode steps of `batch` requests, stopping before
        a step would end after `until`. The same arithmetic, in the same order, as `execute` and
        the clock would do step by step."""
        durations: list[float] = []
        t = now
        for j in range(max_steps):
            ctx = context_sum + j * batch
            dt = self.cost.step_seconds(batch, batch, attn_pairs(batch, ctx, None), ctx + batch)
            if t + dt > until:
                break
            t += dt
            durations.append(dt)
        return durations

    def commit_stretch(self, durations: list[float]) -> None:
        """Account a fast-forwarded stretch as the steps it stands for."""
        for dt in durations:
            self.busy_s += dt


def attn_pairs(new_tokens: int, new_x_context: int, chunks: list[int] | None) -> int:
    """Attention query-key pairs of a batch: each new token attends to the context and to the new
    tokens before it (causal), i.e. sum of new*context + new*(new+1)/2 per request."""
    if chunks is None:  # all decode: new = 1 per request
        return new_x_context + new_tokens
    return new_x_context + sum(k * (k + 1) // 2 for k in chunks)
