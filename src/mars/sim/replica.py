"""One simulated engine (a GPU): its KV manager, scheduler, executor and step clock.

The simulation holds one of these per replica and asks each idle one to start its next step
whenever nothing else is due at the current instant. A step is either one `schedule()` /
`execute()` pair or a fast-forwarded stretch of pure decode steps that ends before the next
event of the whole simulation (any replica's, so no event can land inside a stretch).
"""

from __future__ import annotations

from mars.core.clock import SimClock
from mars.core.events import EventBus
from mars.core.request import Request
from mars.core.session import Session
from mars.kv.manager import KVConfig, KVManager
from mars.sched.plan import StepPlan, StepResult
from mars.sched.policy import Policy
from mars.sched.scheduler import Scheduler, SchedulerConfig
from mars.sim.costmodel import StepCostModel
from mars.sim.executor import SimExecutor


class Replica:
    """An engine and the step in flight on it."""

    def __init__(
        self,
        index: int,
        kv_config: KVConfig,
        sched_config: SchedulerConfig,
        policy: Policy,
        cost: StepCostModel,
        clock: SimClock,
        bus: EventBus,
        sessions: dict[str, Session],
        tool_workers: int,
        fast_forward: bool,
    ) -> None:
        self.index = index
        self.tool_workers = tool_workers
        self.policy = policy
        self.clock = clock
        self.kv = KVManager(kv_config, clock, bus)
        # The sessions whose latest call was routed here (all of them with one replica).
        self.sessions = sessions
        self.scheduler = Scheduler(
            sched_config, policy, self.kv, clock, bus, sessions, cost, tool_workers
        )
        # An engine whose attention scans every used cell (llama.cpp) slows with the cached
        # sessions' KV too; its steps then depend on the cache, not only on the batch, so the
        # decode stretches are stepped one by one.
        self._scans_cache = cost.cache_scan_seconds(1, 1) > 0
        self.executor = SimExecutor(cost, self._cells_in_use if self._scans_cache else None)
        self._fast_forward = fast_forward and not self._scans_cache
        self.busy = False
        self.steps = 0
        self.served: set[str] = set()  # sessions that had a call here
        self._plan: StepPlan | None = None
        self._ff_steps = 0

    def _cells_in_use(self) -> int:
        return self.kv.used_blocks * self.kv.block_size

    def start_step(self, next_event_s: float) -> float | None:
        """Start the next step if there is work; when it ends (None: nothing to do).
        `next_event_s`: when the simulation's next event is due (a stretch stops before it)."""
        sched, now = self.scheduler, self.clock.now()
        if not sched.has_work:
            return None
        if self._fast_forward:
            horizon = sched.decode_horizon()
            if horizon >= 2:
                until = min(next_event_s, sched.stable_until)
                batch = len(sched.running)
                ctx = sum(r.num_computed_tokens for r in sched.running)
                durations = self.executor.decode_stretch(batch, ctx, horizon, until, now)
                if len(durations) >= 2:
                    self.executor.commit_stretch(durations)
                    end = now
                    for dt in durations:
                        end += dt
                    self._ff_steps = len(durations)
                    self.busy = True
                    return end
        plan = sched.schedule()
        if plan.is_empty:
            return None
        result = self.executor.execute(plan)
        self._plan, self.busy = plan, True
        return now + result.duration_s

    def end_step(self) -> list[Request]:
        """Apply the step that just ended; the calls that finished in it."""
        self.busy = False
        if self._ff_steps:
            finished = self.scheduler.advance_decode(self._ff_steps)
            self.steps += self._ff_steps
            self._ff_steps = 0
            return finished
        plan, self._plan = self._plan, None
        assert plan is not None
        self.steps += 1
        return self.scheduler.update(plan, StepResult(plan.step_id, 0.0))

    def outstanding(self) -> int:
        """Calls waiting or running here (what a least-load router counts)."""
        return len(self.scheduler.waiting) + len(self.scheduler.running)
