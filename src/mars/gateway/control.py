"""The gateway's control plane: the session table, the admission queue, and the policy's view of
the upstreams' KV.

The seam is the embedded engine's: the policy is bound to a `PolicyContext` and asked `admit`,
`order_admission` and `on_tick`, exactly as `LiveEngine` asks it, through the same
`AdmissionQueue`. What differs is where the GPU signal comes from: instead of the engine's
`KVManager`, the context holds a `PooledKV`, a read-only view computed on each read from the
signals scraped off the replicas that are up (`upstreams.py`). It has the members the
control-plane side of a policy reads (`usage`, `num_blocks`, `num_free_blocks`, `block_size`,
in tokens: `block_size` is 1; `host_used_tokens`, 0: host copies are the upstream's) and a
no-op `unpin`; the policy's engine-side decisions (ordering requests, victims, retention) are
never called here, so the rest of `KVManager` is not needed.

Sessions are only ever the gateway's: their turns are estimated (characters / 4 for a prompt,
then the upstream's `usage` when it reports one), which is what the footprint signal needs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import cast

from mars.control.admission import AdmissionLimits, AdmissionQueue, Overloaded
from mars.core.clock import Clock
from mars.core.events import EventBus, RequestEmit, SessionArrived, SessionDone, ToolEnd
from mars.core.request import Request
from mars.core.session import Session, SessionStatus, ToolCall, Turn
from mars.gateway.upstreams import Pool
from mars.kv.manager import KVManager
from mars.sched.policy import Policy, PolicyContext

log = logging.getLogger("mars.gateway")

UNKNOWN_CAPACITY = 1 << 40  # tokens: with no capacity known, admission is by count alone
# The per-step token budget a policy's priority quanta are cut from: an engine-side number the
# gateway's decisions (admission only) never read; vLLM's default.
STEP_TOKENS = 8192


class PooledKV:
    """The upstreams' KV as one cache, for the policy's admission decisions.

    usage: capacity-weighted mean over the replicas that are up (plain mean where capacities are
    unknown; 0 with no signal at all). num_blocks: their capacities summed. num_free_blocks: the
    free tokens of the roomiest replica, where a new session would go.
    """

    block_size = 1
    host_used_tokens = 0  # the upstreams' host copies are theirs: none to restore from here
    segment_tokens = 0  # prefixes shared across sessions are the upstreams' (prefix caching)

    def __init__(self, upstreams: Pool) -> None:
        self._upstreams = upstreams

    @property
    def usage(self) -> float:
        signals = [r.signal for r in self._upstreams.healthy() if r.signal.kv_usage is not None]
        if not signals:
            return 0.0
        sized = [s for s in signals if s.kv_tokens]
        if len(sized) == len(signals):
            total = sum(s.kv_tokens or 0 for s in sized)
            return sum((s.kv_usage or 0.0) * (s.kv_tokens or 0) for s in sized) / total
        return sum(s.kv_usage or 0.0 for s in signals) / len(signals)

    @property
    def num_blocks(self) -> int:
        sizes = [r.signal.kv_tokens for r in self._upstreams.healthy()]
        if not sizes or None in sizes:
            return UNKNOWN_CAPACITY
        return sum(s or 0 for s in sizes)

    @property
    def num_free_blocks(self) -> int:
        free = [r.signal.free_tokens for r in self._upstreams.healthy()]
        if not free or None in free:
            return UNKNOWN_CAPACITY
        return max(f or 0 for f in free)

    def unpin(self, session_id: str, offload: bool = False) -> None:
        """Pins are the upstream engine's business; nothing is pinned here."""

    def shared_prefix_tokens(self, session_id: str) -> int:
        """What of a session's KV the upstream shares with others is not known here: none."""
        return 0


class Control:
    """Sessions and their admission; every method runs on the server's event loop."""

    def __init__(
        self,
        policy: Policy,
        upstreams: Pool,
        limits: AdmissionLimits,
        clock: Clock,
        bus: EventBus,
    ) -> None:
        self.policy, self.upstreams, self.limits = policy, upstreams, limits
        self.clock, self.bus = clock, bus
        self.sessions: dict[str, Session] = {}
        self.kv = PooledKV(upstreams)
        # The policy reads only PooledKV's members (see the module docstring).
        policy.bind(PolicyContext(clock, bus, cast(KVManager, self.kv), self.sessions, STEP_TOKENS))
        self.queue = AdmissionQueue(policy, clock, bus, self._admitted)
        self._admission: dict[str, asyncio.Future[None]] = {}
        self._ids = itertools.count()

    async def run(self) -> None:
        """The control tick: the policy's `on_tick`, then admission and queue deadlines. A
        policy that raises is logged (once per distinct error) and the tick goes on: a bug in
        a policy must not stop admission or drop the clients waiting in the queue."""
        tick = self.policy.tick_s or 0.5
        last_error = ""
        while True:
            await asyncio.sleep(tick)
            try:
                if self.policy.tick_s is not None:
                    self.policy.on_tick()
                self.queue.poll()
            except Exception as e:  # any policy bug: log it, keep ticking
                if repr(e) != last_error:
                    last_error = repr(e)
                    log.exception("policy %s failed in its control tick", self.policy.name)
            self._expire()

    def arrive(self, session_id: str, prompt_tokens: int) -> asyncio.Future[None] | None:
        """A call of the session arrived: None if its session is admitted, else the future of
        its admission (its exception: `Overloaded`, 503 past the deadline). A new session joins
        the queue; if the queue is full, `Overloaded` (429) is raised now."""
        if session_id not in self.sessions:
            if len(self.queue) >= self.limits.max_queued:
                retry = self.limits.retry_after_s
                raise Overloaded(
                    429,
                    f"{self.limits.max_queued} sessions already wait for admission; "
                    f"retry in {retry} s",
                    retry,
                )
            now = self.clock.now()
            session = Session(session_id, now, first_prompt_tokens=prompt_tokens)
            self.sessions[session_id] = session
            self._admission[session_id] = asyncio.get_running_loop().create_future()
            self.bus.publish(SessionArrived(now, session_id))
            self.queue.add(session)  # calls _admitted at once if the policy admits
        return self._admission.get(session_id)

    def _admitted(self, session: Session) -> None:
        session.status = SessionStatus.LLM
        waiting = self._admission.pop(session.session_id, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    def _expire(self) -> None:
        deadline = self.clock.now() - self.limits.queue_timeout_s
        for session in self.queue.queued:
            if session.arrival_time <= deadline:
                retry = self.limits.retry_after_s
                self._drop(
                    session.session_id,
                    Overloaded(
                        503,
                        f"the session waited {self.limits.queue_timeout_s:g} s without being "
                        f"admitted (the upstreams are at capacity); retry in {retry} s",
                        retry,
                    ),
                )

    def _drop(self, session_id: str, error: Exception) -> None:
        """Turn a queued session away: its waiting requests get `error`."""
        self.queue.remove(session_id)
        session = self.sessions.pop(session_id, None)
        waiting = self._admission.pop(session_id, None)
        if waiting is not None and not waiting.done():
            waiting.set_exception(error)
            waiting.exception()  # retrieved: no "never retrieved" warning without a waiter
        if session is not None:
            session.status = SessionStatus.REJECTED
            now = self.clock.now()
            self.bus.publish(SessionDone(now, session_id, now - session.arrival_time, True))

    def begin_turn(
        self, session: Session, prompt_tokens: int, max_tokens: int, tool: str | None
    ) -> Request:
        """A call of an admitted session goes upstream; it closes the session's tool phase."""
        now = self.clock.now()
        last = session.turns[-1] if session.turns else None
        if last is not None and last.request.finish_time is not None and not last.tools:
            start = last.request.finish_time
            last.tools.append(ToolCall(tool or "unknown", False, start, now))
            self.bus.publish(ToolEnd(now, session.session_id, tool or "unknown", now - start, 0.0))
        rid = f"gw-{next(self._ids)}"
        req = Request(rid, session.session_id, max(1, prompt_tokens), max(1, max_tokens), 0, now)
        req.turn_index = len(session.turns)
        session.turns.append(Turn(req))
        session.status = SessionStatus.LLM
        self.bus.publish(RequestEmit(now, session.session_id, rid, req.num_prompt_tokens, 0))
        return req

    def end_turn(self, session: Session, req: Request, usage: dict[str, object] | None) -> None:
        """The call's answer is complete; `usage` (the upstream's token counts) corrects the
        estimate."""
        prompt, completion = (
            (usage or {}).get("prompt_tokens"),
            (usage or {}).get("completion_tokens"),
        )
        if isinstance(prompt, int) and prompt > 0:
            req.num_prompt_tokens = prompt
        if isinstance(completion, int) and completion >= 0:
            req.num_output_tokens = completion
        req.finish_time = self.clock.now()
        if session.status is SessionStatus.LLM:
            session.status = SessionStatus.TOOL

    def end(self, session_id: str) -> None:
        """End a session (last step, DELETE, idle): its place frees for a queued one."""
        if session_id in self.queue:
            self._drop(session_id, Overloaded(503, "the session was ended while it waited", 1))
            return
        session = self.sessions.pop(session_id, None)
        self.upstreams.forget(session_id)
        if session is None:
            return
        now = self.clock.now()
        session.status, session.done_time = SessionStatus.DONE, now
        self.bus.publish(SessionDone(now, session_id, now - session.arrival_time))
        self.queue.poll()

    def leave(self, session_id: str) -> None:
        """A client gave up waiting: a queued session nobody waits for is dropped."""
        waiting = self._admission.get(session_id)
        if waiting is not None and not waiting.done():
            self._drop(session_id, Overloaded(503, "the client left", 1))

    @property
    def active(self) -> int:
        return sum(1 for s in self.sessions.values() if s.admitted_time is not None)
