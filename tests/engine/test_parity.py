"""The live loop (`EngineCore` on a manual clock, cost-model executor) and the simulator's event
loop drive the same scheduler, KV manager and policy to identical decisions."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import astuple, replace

from factories import make_spec
from mars.core.clock import SimClock
from mars.core.events import (
    Event,
    EventBus,
    GpuEnd,
    GpuFirstToken,
    GpuPreempt,
    GpuSubmit,
    KvEvict,
    RequestEmit,
)
from mars.core.request import Request
from mars.core.session import Session, Turn
from mars.engine.loop import EngineCore
from mars.kv.manager import KVConfig, KVManager
from mars.sched.plan import StepPlan, StepResult
from mars.sched.policies.fcfs import FCFSPolicy
from mars.sched.scheduler import Scheduler, SchedulerConfig
from mars.sim.costmodel import CostModel, resolve_gpu, resolve_model
from mars.sim.executor import SimExecutor
from mars.sim.run import Arrivals, SimConfig, Simulation
from mars.sim.workload import SessionSpec

DECISIONS = (RequestEmit, GpuSubmit, GpuFirstToken, GpuEnd, GpuPreempt, KvEvict)
COST = CostModel(resolve_gpu("h100"), resolve_model("llama-3.1-8b"))
CONFIG = SimConfig(tool_cores=64, block_size=16, max_num_batched_tokens=512, kv_tokens=2048)


class ClockedExecutor:
    """Takes the cost model's time for each step on a manual clock, as a real engine would take
    wall time. Produces no tokens (the scheduler counts them)."""

    def __init__(self, clock: SimClock) -> None:
        self.clock = clock
        self.inner = SimExecutor(COST)

    def execute(self, plan: StepPlan) -> StepResult:
        result = self.inner.execute(plan)
        self.clock.advance(result.duration_s)
        return result


def workload() -> list[SessionSpec]:
    specs = []
    for i in range(6):
        turns = []
        prev = 0
        for k in range(3):
            prompt = prev + 150 + 40 * i + 31 * k
            out = 20 + 7 * i + 3 * k
            turns.append((prompt, out, prev, -1.0 if k == 2 else 0.05 + 0.013 * i + 0.1 * k))
            prev = prompt + out
        specs.append(make_spec(turns, sid=f"s{i}"))
    return specs


ARRIVALS = tuple(0.02 * i for i in range(6))


def decisions(events: Sequence[Event]) -> list[tuple[object, ...]]:
    """Scheduling and KV decisions in time order. The live loop learns of a request that arrived
    mid-step only when the step ends, so it publishes it later than the simulator does, but with
    the same time stamp: a stable sort by time is the order both decided in."""
    kept = [(type(e).__name__, *astuple(e)) for e in events if isinstance(e, DECISIONS)]
    return sorted(kept, key=lambda d: float(d[1]))  # type: ignore[arg-type]


def sim_events(fast_forward: bool) -> list[tuple[object, ...]]:
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe_all(seen.append)
    config = replace(CONFIG, fast_forward=fast_forward)
    Simulation(workload(), FCFSPolicy(), COST, Arrivals(ARRIVALS), config, bus).run()
    return decisions(seen)


def live_events() -> list[tuple[object, ...]]:
    """The same agents on the live loop: requests arrive between steps, as over HTTP."""
    clock = SimClock()
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe_all(seen.append)
    kv = KVManager(KVConfig(CONFIG.kv_tokens // CONFIG.block_size, CONFIG.block_size), clock, bus)
    sessions: dict[str, Session] = {}
    sched = Scheduler(
        SchedulerConfig(CONFIG.max_num_batched_tokens, CONFIG.max_num_seqs),
        FCFSPolicy(),
        kv,
        clock,
        bus,
        sessions,
    )
    core = EngineCore(sched, ClockedExecutor(clock))
    specs = {s.session_id: s for s in workload()}
    # (time, priority, seq, session, turn): tool ends (1) before arrivals (3) at equal times, as
    # the simulator's heap orders them.
    due: list[tuple[float, int, int, str, int]] = []
    for seq, (t, spec) in enumerate(zip(ARRIVALS, specs.values(), strict=True)):
        heapq.heappush(due, (t, 3, seq, spec.session_id, 0))
    seq = 100

    def deliver() -> None:
        while due and due[0][0] <= clock.now():
            t, _, _, sid, k = heapq.heappop(due)
            turn = specs[sid].turns[k]
            session = sessions.setdefault(sid, Session(sid, t))
            # Stamped when it arrived (mid-step, as over HTTP), queued for the next step.
            req = Request(
                f"{sid}-{k}", sid, turn.prompt_tokens, turn.output_tokens, turn.reuse_tokens, t, k
            )
            session.turns.append(Turn(req))
            sched.add_request(req)

    while due or sched.has_work:
        deliver()
        if not sched.has_work:
            clock.advance_to(due[0][0])
            continue
        outcome = core.step()
        assert outcome is not None
        for req in outcome.finished:
            spec = specs[req.session_id]
            k = req.turn_index
            if k + 1 < len(spec.turns):
                seq += 1
                tool = spec.turns[k].tools[0].duration_s
                heapq.heappush(due, (clock.now() + tool, 1, seq, req.session_id, k + 1))
            else:
                kv.end_session(req.session_id)
                del sessions[req.session_id]
        kv.check_integrity()
    return decisions(seen)


def test_live_loop_decides_exactly_as_the_simulator() -> None:
    live = live_events()
    assert any(d[0] == "GpuPreempt" for d in live), "the workload should exercise preemption"
    assert any(d[0] == "KvEvict" for d in live), "the workload should exercise eviction"
    assert live == sim_events(fast_forward=False)


def test_live_loop_matches_the_fast_forwarded_simulator() -> None:
    """A fast-forwarded stretch allocates its blocks when it ends, so evictions carry that time
    and come grouped; every other decision is identical, and so is what each session lost."""

    def split(ds: list[tuple[object, ...]]) -> tuple[list[tuple[object, ...]], dict[object, int]]:
        lost: dict[object, int] = {}
        for d in ds:
            if d[0] == "KvEvict":
                lost[d[2]] = lost.get(d[2], 0) + int(d[3])  # type: ignore[call-overload]
        return [d for d in ds if d[0] != "KvEvict"], lost

    assert split(live_events()) == split(sim_events(fast_forward=True))
