"""LLM requests, counted in tokens as vLLM V1 does: prefill and decode are derived, never stored."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field


class RequestStatus(enum.IntEnum):
    """Ordered: everything after PREEMPTED is finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_LENGTH = 3  # produced its max_tokens
    FINISHED_STOPPED = 4  # the executor reported EOS or a stop string
    FINISHED_ABORTED = 5  # cancelled by the client or the server

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED


@dataclass(eq=False, slots=True)
class Request:
    """One LLM call of a session.

    Token accounting follows vLLM V1: `num_tokens` = prompt + generated output; the scheduler
    moves `num_computed_tokens` towards `num_tokens`; whenever a step brings them level the
    executor samples one more token. A prefix hit, a chunked prefill and a resumption after a
    preemption are all just a different starting `num_computed_tokens`.
    """

    request_id: str
    session_id: str
    num_prompt_tokens: int
    max_tokens: int  # output length to generate (the trace's output length in simulation)
    # Leading prompt tokens identical to the session's previous sequence (prompt + output of its
    # previous call): the only part the KV manager may serve from that session's cache.
    reuse_tokens: int
    arrival_time: float
    turn_index: int = 0
    # Content ids of the prompt's leading tokens (the token ids, or the simulator's stand-ins),
    # equal across sessions where their KV is equal: the KV manager may serve a call that its
    # own session cannot from blocks another session holds for the same leading tokens. Empty:
    # nothing is shared.
    prefix: Sequence[int] = ()
    # Calls share KV across sessions only with calls of the same salt (the tenant, and the
    # request's `cache_salt` as vLLM's): another tenant could otherwise learn from its
    # `cached_tokens` what a prompt begins with.
    prefix_salt: str = ""
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_output_tokens: int = 0
    # Prompt tokens served from cache (GPU prefix hit or host restore) at the first schedule.
    num_cached_tokens: int = -1
    # Tokens whose KV had been computed once and was computed again (after preemption/eviction).
    num_recomputed_tokens: int = 0
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    output_token_ids: list[int] = field(default_factory=list)
    # The tool this call asked for (its category), known once its output is complete: set by the
    # agent side (the simulator's replay, or the server from tool_calls / markers), else None.
    next_tool: str | None = None

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 1:
            raise ValueError(f"request {self.request_id}: a prompt needs at least one token")
        if self.max_tokens < 1:
            raise ValueError(f"request {self.request_id}: max_tokens must be at least 1")
        if not 0 <= self.reuse_tokens <= self.num_prompt_tokens:
            raise ValueError(
                f"request {self.request_id}: reuse_tokens {self.reuse_tokens} outside "
                f"[0, {self.num_prompt_tokens}]"
            )

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def num_remaining_tokens(self) -> int:
        """Tokens still to compute before the next sample."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status > RequestStatus.PREEMPTED
