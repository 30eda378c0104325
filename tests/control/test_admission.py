"""The admission queue holds sessions outside the engine until the policy admits them."""

from __future__ import annotations

import itertools

from factories import make_spec
from mars.core.session import Session
from mars.sched.policies.fcfs import FCFSPolicy
from mars.sched.policy import Admission
from mars.sim.costmodel import CostModel, resolve_gpu, resolve_model
from mars.sim.run import Arrivals, SimConfig, Simulation


class OneAtATime(FCFSPolicy):
    """Admits a session only while no other admitted session is in flight."""

    name = "one-at-a-time"

    def admit(self, session: Session) -> Admission:
        assert self.ctx is not None
        busy = any(
            s.admitted_time is not None and s.done_time is None
            for s in self.ctx.sessions.values()
            if s is not session
        )
        return Admission.DEFER if busy else Admission.ADMIT


def test_deferred_sessions_wait_outside_the_engine_and_run_one_by_one() -> None:
    cost = CostModel(resolve_gpu("h100"), resolve_model("llama-3.1-8b"))
    specs = [make_spec([(500, 20, 0, 0.5), (700, 10, 520, -1.0)], sid=f"s{i}") for i in range(3)]
    out = Simulation(specs, OneAtATime(), cost, Arrivals(times=(0.0, 0.0, 0.0)), SimConfig()).run()
    recs = sorted(out.records, key=lambda r: r.admitted_s or 0.0)
    assert [r.arrival_s for r in recs] == [0.0, 0.0, 0.0]
    for before, after in itertools.pairwise(recs):
        assert after.admitted_s == before.done_s  # admitted the moment the previous one ended
    assert all(r.done_s is not None for r in recs)
