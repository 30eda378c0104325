"""`mars sweep`: policies x loads x seeds on the simulator, with fcfs capacity as the yardstick.

Capacity is the peak steady throughput `fcfs` reaches in closed loop over 8..128 concurrent
sessions (the whole curve is kept: past its peak fcfs thrashes). `--loads` are fractions of that
peak, turned into Poisson arrival rates; `--rates` are taken as given. Every (policy, rate, seed)
runs the same workload sample and arrival times for that seed, and shares its ideal times.
With `events_dir`, one run per policy (the highest rate, the first seed: the runs the over-time
plots show) writes its event stream there, `events-POLICY.jsonl`, for `mars timeline`.
On a pool (`mars.bench.pool`: `--workers N`, `--ray`) the runs spread over its workers and the
results are the same numbers in the same order as in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from mars.bench.capacity import CONCURRENCIES, CurvePoint, capacity_curve, peak
from mars.bench.pool import run_all
from mars.core.events import EventBus
from mars.sim.eventlog import EventLog
from mars.sim.experiment import (
    SimSpec,
    load_specs,
    make_cost_model,
    run_experiment,
    workload_ideals,
)
from mars.sim.workload import SessionSpec

UNSTABLE_RATIO = 1.3


@dataclass(frozen=True)
class SweepPlan:
    base: SimSpec  # traces, gpu, model, sessions, kv_scale, ... (its policy/load are replaced)
    policies: tuple[str, ...]
    seeds: tuple[int, ...]
    rates: tuple[float, ...] = ()  # sessions/s, or
    loads: tuple[float, ...] = ()  # fractions of fcfs capacity
    events_dir: Path | None = None  # where one run per policy writes its events

    @property
    def runs(self) -> int:
        return len(self.policies) * len(self.seeds) * max(len(self.rates), len(self.loads))


@dataclass
class SweepResult:
    capacity: list[CurvePoint] | None
    capacity_per_s: float | None
    results: list[dict[str, Any]]
    events: dict[str, Path] = field(default_factory=dict)  # policy -> one run's events file


def unstable(result: dict[str, Any]) -> bool:
    """Open loop is unstable when sessions arriving in the last third wait much longer than
    those of the first third (the queue grows without bound)."""
    rows = sorted(
        (r for r in result["per_session"] if r["latency_s"] is not None),
        key=lambda r: r["arrival_s"],
    )
    third = len(rows) // 3
    if third == 0:
        return False
    first = sum(r["latency_s"] for r in rows[:third]) / third
    last = sum(r["latency_s"] for r in rows[-third:]) / third
    return bool(last > UNSTABLE_RATIO * first)


def run_sweep(
    plan: SweepPlan,
    on_capacity: Callable[[CurvePoint], None] | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    pool: Executor | None = None,
) -> SweepResult:
    """Every run of `plan` on `pool` (None: one after another in this process): each seed's
    ideal times, then the capacity curve, then every (seed, rate, policy). The callbacks fire as
    each run finishes; the results come in the plan's order, the same numbers on any pool."""
    workloads = {seed: replace(plan.base, seed=seed) for seed in plan.seeds}
    specs = {seed: load_specs(w) for seed, w in workloads.items()}
    ideal = dict(
        zip(
            plan.seeds,
            run_all([partial(_ideals, w, specs[seed]) for seed, w in workloads.items()], pool),
            strict=True,
        )
    )
    curve: list[CurvePoint] | None = None
    cap: float | None = None
    rates: Sequence[float] = plan.rates
    labels: Sequence[float | None] = [None] * len(rates)
    if plan.loads:
        s0 = plan.seeds[0]
        fcfs = replace(plan.base, policy="fcfs", seed=s0)
        curve = capacity_curve(fcfs, CONCURRENCIES, on_capacity, pool, specs[s0], ideal[s0])
        cap = peak(curve).steady
        rates = [f * cap for f in plan.loads]
        labels = list(plan.loads)
    calls = []
    events: dict[str, Path] = {}
    for seed in plan.seeds:
        first = replace(plan.base, seed=seed, rate=rates[0], concurrency=None)
        for rate, load in zip(rates, labels, strict=True):
            for policy in plan.policies:
                path = None
                shown = seed == plan.seeds[0] and rate == rates[-1]
                if shown and plan.events_dir is not None:  # the run the over-time plots show
                    path = events[policy] = plan.events_dir / f"events-{policy}.jsonl"
                spec = replace(first, policy=policy, rate=rate)
                calls.append(partial(_run, spec, specs[seed], ideal[seed], load, path))
    results = run_all(calls, pool, None if on_run is None else lambda _i, r: on_run(r))
    return SweepResult(curve, cap, results, events)


def _ideals(spec: SimSpec, specs: list[SessionSpec]) -> dict[str, float]:
    return workload_ideals(spec, specs, make_cost_model(spec))


def _run(
    spec: SimSpec,
    specs: list[SessionSpec],
    ideal: dict[str, float],
    load: float | None,
    events: Path | None,
) -> dict[str, Any]:
    """One open-loop run of a sweep, writing its events to `events` if given."""
    if events is None:
        result = run_experiment(spec, specs, ideal=ideal)
    else:
        bus = EventBus()
        with EventLog(events).attach(bus):
            result = run_experiment(spec, specs, ideal=ideal, bus=bus)
    result["load"] = load
    result["rate"] = spec.rate
    result["unstable"] = unstable(result)
    return result
