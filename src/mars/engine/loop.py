"""The engine step shared by every live executor: schedule -> execute -> update.

`EngineCore.step()` is the whole loop body; the caller owns the clock and what happens between
steps (new requests, aborts). The live llama.cpp engine runs it in a thread on a `WallClock`; the
parity test runs it on a manual clock with a cost-model executor and checks that it decides
exactly as the simulator's event loop does with the same scheduler and policy objects.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from mars.core.request import Request
from mars.sched.plan import StepPlan, StepResult
from mars.sched.scheduler import Scheduler


class Executor(Protocol):
    def execute(self, plan: StepPlan) -> StepResult: ...


# Given the plan and what the executor sampled, the requests whose output must stop now (EOS or
# a stop string): the caller's text handling decides, the scheduler applies it.
StopCheck = Callable[[StepPlan, StepResult], frozenset[str]]


@dataclass(frozen=True, slots=True)
class StepOutcome:
    plan: StepPlan
    result: StepResult
    finished: list[Request]
    execute_s: float  # wall time inside the executor
    schedule_s: float  # wall time in schedule() and update(): the scheduling overhead


class EngineCore:
    def __init__(self, scheduler: Scheduler, executor: Executor) -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.steps = 0
        self.execute_s = 0.0
        self.schedule_s = 0.0

    def step(self, stops: StopCheck | None = None) -> StepOutcome | None:
        """One engine step; None when nothing could be scheduled."""
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        t1 = time.perf_counter()
        if plan.is_empty:
            self.schedule_s += t1 - t0
            return None
        result = self.executor.execute(plan)
        t2 = time.perf_counter()
        if stops is not None:
            result.stopped = stops(plan, result)
        t3 = time.perf_counter()
        finished = self.scheduler.update(plan, result)
        t4 = time.perf_counter()
        self.steps += 1
        self.execute_s += t2 - t1
        self.schedule_s += (t1 - t0) + (t4 - t3)
        return StepOutcome(plan, result, finished, t2 - t1, (t1 - t0) + (t4 - t3))
