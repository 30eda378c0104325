"""One-line builders for tests: schedulers, requests, sessions, workloads."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mars.core.clock import SimClock
from mars.core.events import EventBus
from mars.core.request import Request
from mars.core.session import Session, Turn
from mars.kv.manager import KVConfig, KVManager
from mars.sched.plan import StepPlan, StepResult
from mars.sched.policies.fcfs import FCFSPolicy
from mars.sched.policy import Policy
from mars.sched.scheduler import Scheduler, SchedulerConfig
from mars.sim.workload import SessionSpec, ToolSpec, TurnSpec

TRACES = Path(__file__).resolve().parents[1] / ".." / "shared" / "traces" / "traces.jsonl"


def make_kv(num_blocks: int = 64, block_size: int = 4, host_tokens: int = 0) -> KVManager:
    return KVManager(KVConfig(num_blocks, block_size, host_tokens), SimClock())


def make_scheduler(
    *,
    num_blocks: int = 64,
    block_size: int = 4,
    budget: int = 32,
    max_num_seqs: int = 256,
    policy: Policy | None = None,
    host_tokens: int = 0,
) -> Scheduler:
    clock = SimClock()
    bus = EventBus()
    kv = KVManager(KVConfig(num_blocks, block_size, host_tokens), clock, bus)
    return Scheduler(
        SchedulerConfig(budget, max_num_seqs), policy or FCFSPolicy(), kv, clock, bus, {}
    )


_counter = iter(range(1 << 30))


def make_request(
    prompt: int = 10, output: int = 3, reuse: int = 0, session: str | None = None, turn: int = 0
) -> Request:
    sid = session or f"s{next(_counter)}"
    return Request(f"{sid}-{turn}", sid, prompt, output, reuse, 0.0, turn)


def add_session(sched: Scheduler, req: Request) -> Session:
    """Register the request's session (as the engine does at admission) and queue the request."""
    session = sched.sessions.get(req.session_id)
    if session is None:
        session = sched.sessions[req.session_id] = Session(req.session_id, 0.0)
    session.turns.append(Turn(req))
    sched.add_request(req)
    return session


def run_until_idle(sched: Scheduler, max_steps: int = 10_000) -> list[Request]:
    """Step a scheduler with a zero-time executor until nothing is left; finished requests."""
    from mars.sched.plan import StepResult

    done: list[Request] = []
    for _ in range(max_steps):
        if not sched.has_work:
            return done
        plan = sched.schedule()
        done += sched.update(plan, StepResult(plan.step_id, 0.0))
        sched.kv.check_integrity()
    raise AssertionError("scheduler did not drain")


def make_spec(
    turns: Sequence[tuple[int, int, int, float]], sid: str = "s0000", heavy: bool = False
) -> SessionSpec:
    """Turns as (prompt, output, reuse, tool seconds after it; < 0 for none)."""
    out = []
    for prompt, output, reuse, tool_s in turns:
        tools = (
            ()
            if tool_s < 0
            else (ToolSpec("test" if heavy else "view", heavy, tool_s, "measured"),)
        )
        out.append(TurnSpec(prompt, output, reuse, tools))
    return SessionSpec(sid, f"traj/{sid}", tuple(out))


def write_traces(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def clock_of(sched: Scheduler) -> SimClock:
    assert isinstance(sched.clock, SimClock)
    return sched.clock


def step(sched: Scheduler, dt: float = 1.0) -> tuple[StepPlan, list[Request]]:
    """One engine step of `dt` seconds: schedule, advance the clock, update, check the KV."""
    plan = sched.schedule()
    clock_of(sched).advance(dt)
    finished = sched.update(plan, StepResult(plan.step_id, dt))
    sched.kv.check_integrity()
    return plan, finished


def batch(plan: StepPlan) -> list[tuple[str, int]]:
    return [(r.request_id, n) for r, n in zip(plan.requests, plan.num_new_tokens, strict=True)]
