"""The `Policy` seam: every scheduling decision is a call on one object.

A policy owns: the order of waiting and running requests, the prefill chunk size, the preemption
victim, what happens to a session's KV when its turn ends, and the control plane's admission
verdict. It learns online from the event bus and from `Session` objects, which only hold the past.
`BasePolicy` gives vLLM's defaults; policies override what they change.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mars.core.clock import Clock
from mars.core.events import EventBus
from mars.core.request import Request
from mars.core.session import Session
from mars.kv.manager import KVManager, Retention


class Admission(enum.IntEnum):
    ADMIT = 0
    DEFER = 1  # stay in the control plane's queue and ask again later


class StepTimer(Protocol):
    """The engine's step-time model, for policies that weigh recompute against memory."""

    def step_seconds(
        self, num_seqs: int, new_tokens: int, attn_pairs: int, kv_read_tokens: int
    ) -> float: ...

    def transfer_seconds(self, num_tokens: int) -> float: ...


@dataclass(frozen=True, slots=True)
class PolicyContext:
    """What a policy may observe. Handed over once by the engine before the first step."""

    clock: Clock
    bus: EventBus
    kv: KVManager
    sessions: dict[str, Session]  # admitted and queued sessions, by id (past only)
    max_num_batched_tokens: int
    timer: StepTimer | None = None  # step-time model if the engine has one
    tool_workers: int | None = None  # CPU workers running the sessions' tools, if known


class Policy(Protocol):
    name: str
    # True when nothing the policy decides can change during a stretch of pure decode steps
    # with an empty waiting queue, so the simulator may advance that stretch in one event.
    fast_forward_ok: bool
    # Seconds between `on_tick` calls (control ticks, TTL expiries, aging); None = never.
    tick_s: float | None

    def bind(self, ctx: PolicyContext) -> None: ...

    def order_waiting(self, waiting: Sequence[Request]) -> Sequence[Request]: ...

    def order_running(self, running: Sequence[Request]) -> Sequence[Request]: ...

    def chunk_tokens(self, req: Request, budget: int) -> int: ...

    def pick_victim(self, running: Sequence[Request], needed_by: Request) -> Request | None: ...

    def stop_after_failure(self) -> bool: ...

    def shrink_chunk(self, req: Request, num_tokens: int) -> int | None: ...

    def retention(self, session: Session, req: Request) -> Retention: ...

    def order_admission(self, queued: Sequence[Session]) -> Sequence[Session]: ...

    def admit(self, session: Session) -> Admission: ...

    def on_tick(self) -> None: ...

    def prefetch(self) -> Sequence[str]: ...

    def stable_until(self, waiting: Sequence[Request]) -> float: ...


class BasePolicy:
    """vLLM V1 behaviour, decision by decision; subclasses override the ones they change."""

    name = "base"
    fast_forward_ok = True
    tick_s: float | None = None

    def __init__(self) -> None:
        self.ctx: PolicyContext | None = None

    def bind(self, ctx: PolicyContext) -> None:
        self.ctx = ctx

    def order_waiting(self, waiting: Sequence[Request]) -> Sequence[Request]:
        return waiting

    def order_running(self, running: Sequence[Request]) -> Sequence[Request]:
        return running

    def chunk_tokens(self, req: Request, budget: int) -> int:
        return budget

    def pick_victim(self, running: Sequence[Request], needed_by: Request) -> Request | None:
        # vLLM FCFS: `self.running.pop()`, the most recently scheduled request.
        return running[-1] if running else None

    def stop_after_failure(self) -> bool:
        # vLLM stops filling the batch at the first waiting request that does not fit.
        return True

    def shrink_chunk(self, req: Request, num_tokens: int) -> int | None:
        # vLLM preempts at once when a chunk does not fit; it never shrinks it.
        return None

    def retention(self, session: Session, req: Request) -> Retention:
        return Retention.DROP

    def order_admission(self, queued: Sequence[Session]) -> Sequence[Session]:
        # The control plane's load balancer order: arrival order by default.
        return queued

    def admit(self, session: Session) -> Admission:
        # vLLM has no admission control: every session is admitted on arrival.
        return Admission.ADMIT

    def on_tick(self) -> None:
        return None

    def prefetch(self) -> Sequence[str]:
        """Sessions whose host-memory KV the engine should bring back to the GPU now, ahead of
        their next call, while this step leaves it slack (the co-scheduler's warm restores).
        The KV manager only fills empty blocks: a prefetch never evicts anyone."""
        return ()

    def stable_until(self, waiting: Sequence[Request]) -> float:
        """Until when the policy's decisions cannot change by the clock alone (aging,
        promotions): a fast-forwarded stretch of decode steps stops there."""
        return math.inf
