"""What the scheduler hands the executor each step, and what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field

from mars.core.request import Request


@dataclass(slots=True)
class StepPlan:
    """One engine step: a batch of prefill chunks and decode tokens of many requests."""

    step_id: int
    # Requests computing tokens this step, in batch order.
    requests: list[Request] = field(default_factory=list)
    # Tokens each request computes this step (a prefill chunk, or 1 for a decode), by index.
    num_new_tokens: list[int] = field(default_factory=list)
    # Tokens already in each request's KV before this step, by index (attention context).
    context_lens: list[int] = field(default_factory=list)
    # Requests preempted while building this plan (their KV was freed; they wait again).
    preempted: list[Request] = field(default_factory=list)
    # Host-to-GPU copies to do before computing: (request, tokens restored from host memory).
    restores: list[tuple[Request, int]] = field(default_factory=list)
    # Host-to-GPU copies ahead of a session's next call, overlapping this step's compute:
    # (session id, tokens) already placed in GPU blocks as that session's prefix cache.
    prefetches: list[tuple[str, int]] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.requests

    def add(self, req: Request, num_new_tokens: int) -> None:
        self.requests.append(req)
        self.num_new_tokens.append(num_new_tokens)
        self.context_lens.append(req.num_computed_tokens)

    def remove(self, req: Request) -> int:
        """Take a request back out (it was preempted later in the same step); its token count."""
        i = self.requests.index(req)
        del self.requests[i], self.context_lens[i]
        return self.num_new_tokens.pop(i)


@dataclass(slots=True)
class StepResult:
    """What the executor did with a `StepPlan`."""

    step_id: int
    # Seconds the step took: measured by a live engine, predicted by the simulator's cost model.
    duration_s: float
    # Sampled token per plan index; None where the request is still mid-prefill, or where the
    # executor does not produce real tokens (the simulator).
    token_ids: list[int | None] | None = None
    # Requests whose sample ended the output early (EOS or a stop string).
    stopped: frozenset[str] = frozenset()
