"""What the vLLM plug-in tells mars's policies, without importing vLLM.

vLLM's requests are mirrored by mars `Request`s carrying the fields policies read (token counts,
status, arrival, first schedule, turn index, the tool the call asked for), grouped into `Session`s
by vLLM's `Request.session_id`, else the session id in the request's extras (`vllm_xargs`). Tool
phases are inferred: the time between a session's call finishing and its next call arriving is
published as a `ToolEnd`, so policies learn tool durations as they do in mars's own engine. The
KV pool is seen through `PoolView`; the step time through `OnlineStepTimer`, learned from the
engine's own steps.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from mars.core.clock import Clock
from mars.core.errors import UsageError
from mars.core.events import EventBus, GpuEnd, GpuSubmit, RequestEmit, ToolEnd
from mars.core.request import Request, RequestStatus
from mars.core.session import Session, SessionStatus, ToolCall, Turn
from mars.kv.manager import KVConfig, KVManager, Retention
from mars.sched.policy import Policy, PolicyContext
from mars.sched.registry import make_policy
from mars.sched.timer import OnlineStepTimer

_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True, slots=True)
class Markers:
    """Session metadata of one call, from `SamplingParams.extra_args` (DESIGN.md section 8)."""

    session_id: str | None = None
    is_last_step: bool = False
    this_func_call: str | None = None  # the tool this call's output asks for
    last_func_call: str | None = None  # the tool whose result this call's prompt carries

    @classmethod
    def from_extra_args(
        cls, extra: Mapping[str, object] | None, session_id: str | None = None
    ) -> Markers:
        """`session_id` is vLLM's own (`Request.session_id`, vLLM >= 0.28): it wins over the
        extras' `session_id` and `job_id`."""
        extra = extra or {}
        sid = session_id or extra.get("session_id") or extra.get("job_id")
        last = extra.get("is_last_step")
        return cls(
            session_id=_name(sid),
            is_last_step=last is True or str(last).strip().lower() in _TRUE,
            this_func_call=_name(extra.get("this_func_call")),
            last_func_call=_name(extra.get("last_func_call")),
        )


def policy_from_env(environ: Mapping[str, str]) -> Policy:
    """The policy named by `MARS_POLICY` (default `mars`), with `MARS_POLICY_SETTINGS` (a JSON
    object of parameter overrides, as `--set key=value`)."""
    name = environ.get("MARS_POLICY") or "mars"
    raw = environ.get("MARS_POLICY_SETTINGS") or "{}"
    try:
        settings = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UsageError(f"MARS_POLICY_SETTINGS is not JSON ({e}): {raw!r}") from None
    if not isinstance(settings, dict):
        raise UsageError(
            f'MARS_POLICY_SETTINGS must be a JSON object like {{"aging_s": 10}}: {raw!r}'
        )
    return make_policy(name, settings)


def _name(value: object) -> str | None:
    return str(value) if isinstance(value, str | int) and value != "" else None


class PoolView:
    """The parts of mars's `KVManager` that policies read, over vLLM's block pool.

    vLLM has no host tier here, so offloading is never offered (no host capacity). `unpin` is
    handed to the plug-in, which holds the pinned blocks.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        free_blocks: Callable[[], int],
        usage: Callable[[], float],
        unpin: Callable[[str], None],
    ) -> None:
        self.config = KVConfig(num_blocks, block_size)
        self.block_size = block_size
        self.host_used_tokens = 0
        # vLLM's prefix caching shares blocks across sessions on its own; the policy is not
        # told which, so it counts none as shared.
        self.segment_tokens = 0
        self._free_blocks, self._usage, self._unpin = free_blocks, usage, unpin

    @property
    def num_blocks(self) -> int:
        return self.config.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self._free_blocks()

    @property
    def usage(self) -> float:
        return self._usage()

    def unpin(self, session_id: str, offload: bool = False) -> None:
        self._unpin(session_id)  # no host tier here: a lapsed pin is vLLM prefix cache

    def shared_prefix_tokens(self, session_id: str) -> int:
        return 0


class SessionBook:
    """The policy's view of vLLM's requests: mirrors, sessions, and the decisions asked of it."""

    def __init__(
        self,
        policy: Policy,
        clock: Clock,
        kv: PoolView,
        max_num_batched_tokens: int,
        bus: EventBus | None = None,
        max_sessions: int = 10_000,
    ) -> None:
        self.policy, self.clock, self.kv = policy, clock, kv
        self.bus = bus or EventBus()
        self.timer = OnlineStepTimer(host_copies=False)  # no host tier in vLLM
        self.sessions: dict[str, Session] = {}
        self.mirrors: dict[str, Request] = {}
        self.markers: dict[str, Markers] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()  # sessions between calls, oldest first
        self.max_sessions = max_sessions
        self._next_tick = 0.0
        # The plug-in hands policies a view, not a KVManager: they read only what PoolView has.
        ctx = PolicyContext(
            clock, self.bus, cast(KVManager, kv), self.sessions, max_num_batched_tokens, self.timer
        )
        policy.bind(ctx)

    # ---- requests in --------------------------------------------------------------------------
    def add(
        self, request_id: str, markers: Markers, num_prompt_tokens: int, max_tokens: int
    ) -> Request:
        now = self.clock.now()
        sid = markers.session_id or request_id  # no session id: a one-call session
        session = self.sessions.get(sid)
        if session is None:
            session = Session(sid, now, SessionStatus.LLM, admitted_time=now)
            self.sessions[sid] = session
            self._trim()
        else:
            self._idle.pop(sid, None)
            self._tool_ended(session, markers, now)
        req = Request(
            request_id,
            sid,
            max(1, num_prompt_tokens),
            max(1, max_tokens),
            reuse_tokens=0,
            arrival_time=now,
            turn_index=len(session.turns),
            next_tool=markers.this_func_call,
        )
        session.turns.append(Turn(req))
        session.status = SessionStatus.LLM
        self.mirrors[request_id] = req
        self.markers[request_id] = markers
        if self.bus.wants(RequestEmit):
            self.bus.publish(RequestEmit(now, sid, request_id, req.num_prompt_tokens, 0))
        return req

    def _tool_ended(self, session: Session, markers: Markers, now: float) -> None:
        """The session's previous call ended in a tool phase that is over now."""
        prev = session.current
        if prev is None or prev.finish_time is None:
            return
        category = markers.last_func_call or prev.next_tool
        if category is None:
            return
        call = ToolCall(category, cpu_heavy=False, start_time=prev.finish_time, end_time=now)
        session.turns[-1].tools.append(call)
        self.bus.publish(ToolEnd(now, session.session_id, category, now - prev.finish_time, 0.0))

    def _trim(self) -> None:
        """Forget the longest-idle sessions past `max_sessions` (agents that never said
        `is_last_step`)."""
        while len(self.sessions) > self.max_sessions and self._idle:
            sid, _ = self._idle.popitem(last=False)
            self.sessions.pop(sid, None)

    # ---- state sync ---------------------------------------------------------------------------
    def sync(
        self,
        request_id: str,
        *,
        num_computed_tokens: int,
        num_output_tokens: int,
        running: bool,
    ) -> Request | None:
        req = self.mirrors.get(request_id)
        if req is None:
            return None
        req.num_computed_tokens = num_computed_tokens
        req.num_output_tokens = num_output_tokens
        req.status = RequestStatus.RUNNING if running else RequestStatus.WAITING
        return req

    def started(self, request_id: str) -> Request | None:
        """The request's first schedule (None if it is not new, or not mirrored)."""
        req = self.mirrors.get(request_id)
        if req is None or req.first_scheduled_time is not None:
            return None
        req.first_scheduled_time = now = self.clock.now()
        if self.bus.wants(GpuSubmit):
            cached = max(0, req.num_cached_tokens)
            self.bus.publish(GpuSubmit(now, req.session_id, request_id, cached))
        return req

    def tick(self) -> None:
        tick_s = self.policy.tick_s
        now = self.clock.now()
        if tick_s is not None and now >= self._next_tick:
            self._next_tick = now + tick_s
            self.policy.on_tick()

    # ---- decisions ----------------------------------------------------------------------------
    def order(self, requests: Sequence[Request], running: bool) -> list[Request]:
        policy = self.policy
        return list(policy.order_running(requests) if running else policy.order_waiting(requests))

    def victims(self, running: Sequence[Request], limit: int = 8) -> list[Request]:
        """Who the policy would preempt first, second, ...: successive `pick_victim` calls on the
        shrinking running set (at most `limit`; the rest in reverse running order, vLLM's)."""
        left = list(running)
        out: list[Request] = []
        while left and len(out) < limit:
            victim = self.policy.pick_victim(left, left[-1])
            if victim is None or victim not in left:
                break
            left.remove(victim)
            out.append(victim)
        return out + left[::-1]

    def chunk(self, req: Request, num_new_tokens: int, free_blocks: int | None) -> int:
        """The prefill chunk: the policy's cap, then halved by `shrink_chunk` while it needs
        more than `free_blocks` new blocks (None: the request cannot be shrunk, it is not
        running). Never below one token."""
        n = min(num_new_tokens, max(1, self.policy.chunk_tokens(req, num_new_tokens)))
        if free_blocks is None:
            return n
        bs = self.kv.block_size
        have = -(-req.num_computed_tokens // bs)
        while -(-(req.num_computed_tokens + n) // bs) - have > free_blocks:
            smaller = self.policy.shrink_chunk(req, n)
            if smaller is None or not 0 < smaller < n:
                break
            n = smaller
        return n

    def finished(self, request_id: str, aborted: bool) -> Retention:
        """The call ended: what to do with its KV. Ends the session on `is_last_step`."""
        req = self.mirrors.pop(request_id, None)
        markers = self.markers.pop(request_id, Markers())
        if req is None:
            return Retention.DROP
        now = self.clock.now()
        req.finish_time = now
        req.status = RequestStatus.FINISHED_ABORTED if aborted else RequestStatus.FINISHED_STOPPED
        if self.bus.wants(GpuEnd):
            self.bus.publish(
                GpuEnd(now, req.session_id, request_id, req.num_output_tokens, aborted)
            )
        session = self.sessions.get(req.session_id)
        if session is None:
            return Retention.DROP
        if aborted or markers.is_last_step or markers.session_id is None:
            session.status, session.done_time = SessionStatus.DONE, now
            del self.sessions[session.session_id]
            return Retention.DROP
        session.status = SessionStatus.TOOL
        self._idle[session.session_id] = None
        return self.policy.retention(session, req)
