"""The control plane's admission queue: sessions wait here until their policy admits them.

Admission is decoupled from execution (DESIGN.md section 2): a session's first call is held
outside the engine until `Policy.admit` says ADMIT; the engine only ever sees admitted sessions.
The queue asks again, in the policy's order, whenever something that could change the verdict
happens (an arrival, a session ending, a control tick).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mars.core.clock import Clock
from mars.core.events import EventBus, SessionAdmitted
from mars.core.session import Session, SessionStatus
from mars.sched.policy import Admission, Policy


@dataclass(frozen=True)
class AdmissionLimits:
    """Bounds of the live control plane's queue of sessions waiting for admission."""

    max_queued: int = 256  # sessions waiting at once; a new session beyond it gets 429
    queue_timeout_s: float = 300.0  # a session that waited longer is turned away with 503
    retry_after_s: int = 5  # what the answer's Retry-After header says

    def __post_init__(self) -> None:
        if self.max_queued < 0 or self.queue_timeout_s <= 0 or self.retry_after_s < 1:
            raise ValueError(
                "admission limits: max_queued >= 0, queue_timeout_s > 0, retry_after_s >= 1"
            )


class Overloaded(Exception):
    """The control plane turned a request away: retry after `retry_after_s` seconds."""

    def __init__(self, status: int, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after_s = status, message, retry_after_s


class AdmissionQueue:
    def __init__(
        self, policy: Policy, clock: Clock, bus: EventBus, on_admit: Callable[[Session], None]
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._bus = bus
        self._on_admit = on_admit
        self._queued: list[Session] = []

    def __len__(self) -> int:
        return len(self._queued)

    def __contains__(self, session_id: object) -> bool:
        return any(s.session_id == session_id for s in self._queued)

    @property
    def queued(self) -> list[Session]:
        return list(self._queued)

    def remove(self, session_id: str) -> Session | None:
        """Take a session out of the queue (its client left, or it waited too long)."""
        for i, session in enumerate(self._queued):
            if session.session_id == session_id:
                return self._queued.pop(i)
        return None

    def add(self, session: Session) -> None:
        session.status = SessionStatus.QUEUED
        self._queued.append(session)
        self.poll()

    def poll(self) -> int:
        """Admit every queued session the policy now accepts; how many were admitted."""
        still: list[Session] = []
        admitted = 0
        for session in self._policy.order_admission(self._queued):
            if self._policy.admit(session) is Admission.ADMIT:
                now = self._clock.now()
                session.admitted_time = now
                self._bus.publish(
                    SessionAdmitted(now, session.session_id, now - session.arrival_time)
                )
                self._on_admit(session)
                admitted += 1
            else:
                still.append(session)
        self._queued = still
        return admitted
