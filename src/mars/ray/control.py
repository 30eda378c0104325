"""The global control plane of a Ray app: one named actor that admits sessions for every replica.

It runs the gateway's `Control` (`mars.gateway.control`): the same policy objects as
`mars serve`, asked `admit`, `order_admission` and `on_tick` through the same `AdmissionQueue`,
so there is one AIMD window across all replicas and one admission order. The policy's view of
the GPU is a `PooledKV` over a `Pool` whose replicas are the engine deployment's: each replica
reports its signal (its `mars serve`'s `/metrics`, `mars.gateway.upstreams.parse_metrics`) every
`REPORT_S`, and one that has not reported for `STALE_S`, or that Ray says died, is down.

Placement is here too, so that it is one for every router (each handle, each front replica, has
its own `MarsRequestRouter`): `place` keeps a session on its replica and puts a new one, or one
whose replica is gone, on the replica under the least pressure (`mars.control.placement`).

Every method is a coroutine on the actor's one event loop: no locks. Answers are plain values
(a dict for admission), never exceptions, so that what a front tells its client does not
depend on how Ray wraps an error.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from mars.control.admission import AdmissionLimits, Overloaded
from mars.core.clock import WallClock
from mars.core.events import EventBus
from mars.core.request import Request
from mars.gateway.control import Control
from mars.gateway.metrics import GatewayMetrics
from mars.gateway.upstreams import Pool, Replica, parse_metrics
from mars.sched.registry import make_policy
from mars.server.responses import Activity

NAME = "mars-control"  # the actor's name, in NAMESPACE
NAMESPACE = "mars"
REPORT_S = 0.5  # how often a replica reports its signal
STALE_S = 5.0  # a replica silent this long is down


@dataclass(frozen=True)
class ControlConfig:
    policy: str = "mars"
    settings: tuple[tuple[str, str], ...] = ()
    max_queued: int = 1024
    queue_timeout_s: float = 600.0
    idle_timeout_s: float = 900.0  # sessions that send nothing this long end (agents never do)


class MarsControl:
    """The actor's class (`ray.remote` is applied where it is started: `mars.ray.app`)."""

    def __init__(self, config: ControlConfig) -> None:
        self.config = config
        self.pool = Pool([])
        self.bus = EventBus()
        self.metrics = GatewayMetrics(lambda: (self.control, self.pool))
        self.bus.subscribe_all(self.metrics)
        limits = AdmissionLimits(config.max_queued, config.queue_timeout_s)
        policy = make_policy(config.policy, dict(config.settings))
        self.control = Control(policy, self.pool, limits, WallClock(), self.bus)
        self.activity = Activity()
        self._turns: dict[str, Request] = {}
        self._waiting: dict[str, asyncio.Future[None]] = {}  # queued sessions' admissions
        self._seen: dict[str, float] = {}  # replica id -> when it last reported
        self._pids: dict[str, int] = {}  # replica id -> its actor's process (operators, tests)
        self._tasks: list[asyncio.Task[None]] = []
        self.peak_active = 0  # the most sessions admitted at once (the window held)

    def _start(self) -> None:
        """The control tick and the reapers, on the actor's loop (there is none in __init__)."""
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self.control.run()), loop.create_task(self._reap())]

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for replica in self.pool.replicas:
                if replica.up and now - self._seen.get(replica.url, 0.0) > STALE_S:
                    self._down(replica, f"no report for {STALE_S:g} s")
            for sid in self.activity.idle(self.config.idle_timeout_s):
                self.control.end(sid)

    # ---- replicas -------------------------------------------------------------------------
    def _replica(self, replica_id: str) -> Replica:
        for replica in self.pool.replicas:
            if replica.url == replica_id:
                return replica
        replica = Replica(replica_id)
        self.pool.replicas.append(replica)
        return replica

    def _down(self, replica: Replica, why: str) -> None:
        replica.up, replica.error = False, why

    async def report(self, replica_id: str, metrics_text: str, pid: int) -> None:
        """A replica's `/metrics` page: its signal, and the proof that it is alive."""
        self._start()
        self._pids[replica_id] = pid
        replica = self._replica(replica_id)
        replica.signal, replica.metrics_text = parse_metrics(metrics_text), metrics_text
        replica.up, replica.error, replica.failures = True, None, 0
        self._seen[replica_id] = time.monotonic()

    async def lost(self, replica_id: str, why: str) -> None:
        """Ray says the replica died: its sessions move on their next call."""
        replica = self._replica(replica_id)
        replica.failures_total += 1
        self._down(replica, why)

    async def place(self, session_id: str | None, candidates: list[str]) -> str | None:
        """Which of `candidates` (the router's live replicas) takes the call: the session's
        own replica, else the one under the least pressure. A candidate that has not reported
        yet counts as up with an unknown signal; None only without candidates."""
        self._start()
        for rid in candidates:
            replica = self._replica(rid)
            if not replica.up and rid not in self._seen:
                replica.up, replica.error = True, None
        among = set(candidates)
        if session_id is None:
            usable = [r for r in self.pool.healthy() if r.url in among]
            best = min(usable, key=Replica.pressure) if usable else None
        else:
            best = self.pool.route(session_id, among)
        if best is None:
            return None
        best.requests += 1
        return best.url

    # ---- sessions -------------------------------------------------------------------------
    async def arrive(self, session_id: str, prompt_tokens: int) -> dict[str, Any]:
        """A call arrived: {"admitted": True}, {"queued": True}, or {"error": status, ...}."""
        self._start()
        self.activity.last[session_id] = time.monotonic()
        try:
            waiting = self.control.arrive(session_id, prompt_tokens)
        except Overloaded as e:
            return _refused(e)
        if waiting is not None:
            self._waiting[session_id] = waiting
        return self._admission(session_id)

    async def wait(self, session_id: str, timeout_s: float) -> dict[str, Any]:
        """Wait up to `timeout_s` for the session's admission; the answer as `arrive`'s."""
        waiting = self._waiting.get(session_id)
        if waiting is not None and not waiting.done():
            await asyncio.wait({asyncio.shield(waiting)}, timeout=timeout_s)
        return self._admission(session_id)

    def _admission(self, session_id: str) -> dict[str, Any]:
        waiting = self._waiting.get(session_id)
        if waiting is None:
            if session_id not in self.control.sessions:
                return {"error": 503, "message": "the session ended while it waited", "retry": 1}
            self.peak_active = max(self.peak_active, self.control.active)
            return {"admitted": True}
        if not waiting.done():
            return {"queued": True}
        del self._waiting[session_id]
        error = waiting.exception()
        if isinstance(error, Overloaded):
            return _refused(error)
        if error is not None:
            return {"error": 500, "message": f"admission failed: {error!r}", "retry": 1}
        self.peak_active = max(self.peak_active, self.control.active)
        return {"admitted": True}

    async def leave(self, session_id: str) -> None:
        """The client gave up waiting: a queued session nobody waits for is dropped."""
        self.control.leave(session_id)
        waiting = self._waiting.get(session_id)
        if waiting is not None and waiting.done():
            del self._waiting[session_id]

    async def begin(
        self, session_id: str, prompt_tokens: int, max_tokens: int, tool: str | None
    ) -> str | None:
        """The admitted session's call goes to its replica: its turn id (None if the session
        is no longer admitted: it ended, or idled out, while the call waited)."""
        session = self.control.sessions.get(session_id)
        if session is None:
            return None
        turn = self.control.begin_turn(session, prompt_tokens, max_tokens, tool)
        self.activity.begin(session_id)
        self._turns[turn.request_id] = turn
        return turn.request_id

    async def finish(
        self, turn_id: str, usage: dict[str, Any] | None, ok: bool, last_step: bool
    ) -> None:
        """The call's answer is complete (`ok`) or failed; a last step ends the session, as
        does a first call that failed (the session holds nothing upstream)."""
        turn = self._turns.pop(turn_id, None)
        if turn is None:
            return
        sid = turn.session_id
        self.activity.end(sid)
        session = self.control.sessions.get(sid)
        if session is None:
            return
        self.control.end_turn(session, turn, usage)
        if (ok and last_step) or (not ok and len(session.turns) == 1):
            await self.end(sid)

    async def end(self, session_id: str) -> str | None:
        """End a session (DELETE, last step): its replica's id, where it holds KV, if any."""
        placed = self.pool.placed(session_id)
        self.control.end(session_id)
        self.activity.forget(session_id)
        return None if placed is None else placed.url

    # ---- views ----------------------------------------------------------------------------
    async def state(self) -> dict[str, Any]:
        policy = self.control.policy
        window = getattr(policy, "window", None)
        return {
            "replicas": [
                {
                    "id": r.url,
                    "pid": self._pids.get(r.url),
                    "up": r.up,
                    "error": r.error,
                    "sessions": r.sessions,
                    "requests": r.requests,
                    "kv_usage": r.signal.kv_usage,
                    "waiting": r.signal.waiting,
                }
                for r in self.pool.replicas
            ],
            "sessions": {
                sid: r.url for sid in self.control.sessions if (r := self.pool.placed(sid))
            },
            "policy": policy.name,
            "window": None if window is None else int(window),
            "active": self.control.active,
            "queued": len(self.control.queue),
            "peak_active": self.peak_active,
            "moved": self.pool.moved,
        }

    async def exposition(self) -> bytes:
        return self.metrics.exposition()


def _refused(e: Overloaded) -> dict[str, Any]:
    return {"error": e.status, "message": e.message, "retry": e.retry_after_s}
