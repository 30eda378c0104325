"""Shared builders for the simulator tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from factories import TRACES
from mars.core.events import (
    Event,
    EventBus,
)
from mars.sched.policies.fcfs import FCFSPolicy
from mars.sched.policy import Policy
from mars.sim.costmodel import CostModel, resolve_gpu, resolve_model
from mars.sim.run import Arrivals, SimConfig, SimOutcome, Simulation
from mars.sim.workload import SessionSpec, ToolSpec, TurnSpec

needs_traces = pytest.mark.skipif(not TRACES.is_file(), reason=f"no trace file at {TRACES}")
COST = CostModel(resolve_gpu("h100"), resolve_model("qwen3-coder-30b-a3b"))


def run_sim(
    specs: Sequence[SessionSpec],
    arrivals: Arrivals | None = None,
    config: SimConfig | None = None,
    policy: Policy | None = None,
    bus: EventBus | None = None,
) -> SimOutcome:
    return Simulation(
        specs,
        policy or FCFSPolicy(),
        COST,
        arrivals or Arrivals(concurrency=len(specs)),
        config or SimConfig(),
        bus=bus,
    ).run()


def recorded(specs: Sequence[SessionSpec], **kw: Any) -> tuple[SimOutcome, list[Event]]:
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe_all(events.append)
    return run_sim(specs, bus=bus, **kw), events


def spec_with_tools(sid: str = "s0000") -> SessionSpec:
    """Four calls; heavy, light and mixed tool phases; appended and rewritten history."""
    heavy = ToolSpec("test", True, 2.5, "measured")
    light = ToolSpec("view", False, 0.25, "measured")
    return SessionSpec(
        sid,
        f"traj/{sid}",
        (
            TurnSpec(3000, 40, 0, (heavy,)),
            TurnSpec(3300, 25, 3040, (light, heavy, light)),
            TurnSpec(3100, 60, 3000, (light,)),  # rewritten: only the first prompt is shared
            TurnSpec(9000, 12, 3160, ()),
        ),
    )
