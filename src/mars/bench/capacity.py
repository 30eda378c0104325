"""Capacity of a policy: steady throughput in closed loop over a range of concurrencies.

The design defines capacity as the peak steady throughput `fcfs` reaches in closed loop over 8,
16, 32, 64 and 128 concurrent sessions. The whole curve is returned: past its peak a policy that
thrashes loses throughput, so a single concurrency can sit far below the peak.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from mars.bench.pool import run_all
from mars.sim.experiment import (
    SimSpec,
    load_specs,
    make_cost_model,
    run_experiment,
    workload_ideals,
)
from mars.sim.workload import SessionSpec

CONCURRENCIES = (8, 16, 32, 64, 128)


@dataclass(frozen=True, slots=True)
class CurvePoint:
    concurrency: int
    result: dict[str, Any]

    @property
    def steady(self) -> float:
        return float(self.result["throughput"]["steady_sessions_per_s"])


def capacity_curve(
    base: SimSpec,
    concurrencies: Sequence[int] = CONCURRENCIES,
    on_point: Callable[[CurvePoint], None] | None = None,
    pool: Executor | None = None,
    specs: list[SessionSpec] | None = None,
    ideal: dict[str, float] | None = None,
) -> list[CurvePoint]:
    """Closed-loop runs of `base` (its rate/concurrency replaced) at each concurrency, on `pool`
    (None: one after another in this process); `on_point` as each one finishes.

    The workload and the ideal times (given, or computed here once) are shared by every point.
    """
    first = replace(base, rate=None, concurrency=concurrencies[0])
    if specs is None:
        specs = load_specs(first)
    if ideal is None:
        ideal = workload_ideals(first, specs, make_cost_model(first))
    calls = [
        partial(_closed_loop, replace(first, concurrency=c), specs, ideal) for c in concurrencies
    ]

    def done(i: int, result: dict[str, Any]) -> None:
        if on_point is not None:
            on_point(CurvePoint(concurrencies[i], result))

    results = run_all(calls, pool, done)
    return [CurvePoint(c, r) for c, r in zip(concurrencies, results, strict=True)]


def _closed_loop(
    spec: SimSpec, specs: list[SessionSpec], ideal: dict[str, float]
) -> dict[str, Any]:
    return run_experiment(spec, specs, ideal=ideal)


def peak(points: Sequence[CurvePoint]) -> CurvePoint:
    return max(points, key=lambda p: p.steady)


def format_curve(points: Sequence[CurvePoint]) -> str:
    best = peak(points).concurrency
    rows = [
        "| concurrency | steady sessions/s | mean latency s | p95 latency s | mean slowdown "
        "| goodput | KV hit rate | preemptions |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        r = p.result
        mark = " (peak)" if p.concurrency == best else ""
        rows.append(
            f"| {p.concurrency}{mark} | {p.steady:.4f} | {r['latency_s']['mean']:.1f} "
            f"| {r['latency_s']['p95']:.1f} | {r['slowdown']['mean']:.2f} "
            f"| {r['goodput']['fraction']:.0%} | {r['kv']['hit_rate']:.1%} "
            f"| {r['kv']['preemptions']} |"
        )
    return "\n".join(rows)
