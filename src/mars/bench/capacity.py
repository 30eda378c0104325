"""Capacity of a policy: steady throughput in closed loop over a range of concurrencies.

The design defines capacity as the peak steady throughput `fcfs` reaches in closed loop over 8,
16, 32, 64 and 128 concurrent sessions. The whole curve is returned: past its peak a policy that
thrashes loses throughput, so a single concurrency can sit far below the peak.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from mars.sim.experiment import (
    SimSpec,
    load_specs,
    make_cost_model,
    run_experiment,
    workload_ideals,
)

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
) -> list[CurvePoint]:
    """Closed-loop runs of `base` (its rate/concurrency replaced) at each concurrency.

    The workload and the ideal times are computed once and shared by every point.
    """
    first = replace(base, rate=None, concurrency=concurrencies[0])
    specs = load_specs(first)
    ideal = workload_ideals(first, specs, make_cost_model(first))
    points = []
    for c in concurrencies:
        spec = replace(first, concurrency=c)
        point = CurvePoint(c, run_experiment(spec, specs, ideal=ideal))
        points.append(point)
        if on_point is not None:
            on_point(point)
    return points


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
