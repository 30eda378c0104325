"""What the serving side knows of an agent session: only its past.

A `Session` grows one `Turn` per LLM call as calls arrive, and one `ToolCall` per tool run as
tools finish. It never holds a future turn or a tool's duration before the tool has ended, so a
policy that reads it cannot see the future (tests walk every object a policy is handed).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mars.core.request import Request


class SessionStatus(enum.IntEnum):
    """Ordered by lifecycle."""

    QUEUED = 0  # arrived, waiting for admission by the control plane
    LLM = 1  # admitted; an LLM call is waiting or running in the engine
    TOOL = 2  # admitted; between calls, a tool is running (or the agent is thinking)
    DONE = 3
    REJECTED = 4  # can never fit (context beyond the model or the KV capacity)


@dataclass(eq=False, slots=True)
class ToolCall:
    """A tool run observed between two calls. `end_time` is None until it has ended."""

    category: str
    cpu_heavy: bool
    start_time: float
    end_time: float | None = None
    queue_wait_s: float = 0.0

    @property
    def duration_s(self) -> float | None:
        return None if self.end_time is None else self.end_time - self.start_time


@dataclass(eq=False, slots=True)
class Turn:
    request: Request
    tools: list[ToolCall] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class Session:
    session_id: str
    arrival_time: float
    status: SessionStatus = SessionStatus.QUEUED
    admitted_time: float | None = None
    done_time: float | None = None
    turns: list[Turn] = field(default_factory=list)
    # Estimated tokens of the next prefill before the first call arrives (the control plane's
    # guess from the first request, or a client hint); 0 when unknown.
    first_prompt_tokens: int = 0

    @property
    def current(self) -> Request | None:
        return self.turns[-1].request if self.turns else None

    @property
    def context_tokens(self) -> int:
        """Latest known context: the last call's prompt plus what it has generated so far."""
        req = self.current
        return self.first_prompt_tokens if req is None else req.num_tokens
