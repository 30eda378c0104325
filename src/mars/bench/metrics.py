"""Metrics, one definition everywhere (DESIGN.md section 5), and the result JSON.

- latency: session done - session arrival (admission wait included);
- ideal: the same session alone on an idle system with unlimited KV (per session, given);
- slowdown = latency / ideal; goodput = sessions with latency <= alpha * ideal;
- throughput over the run; steady throughput over the 20th..80th percentile completion times.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

GOODPUT_ALPHA = 3.0


@dataclass(frozen=True, slots=True)
class SessionResult:
    session_id: str
    arrival_s: float
    done_s: float | None  # None: rejected or unfinished
    ideal_s: float | None
    output_tokens: int
    rejected: bool = False

    @property
    def latency_s(self) -> float | None:
        return None if self.done_s is None else self.done_s - self.arrival_s

    @property
    def slowdown(self) -> float | None:
        lat = self.latency_s
        if lat is None or not self.ideal_s:
            return None
        return lat / self.ideal_s


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default), p in [0, 100]; 0.0 for no values."""
    if not values:
        return 0.0
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def steady_throughput(done_times: Sequence[float]) -> float:
    """Completions between the 20th- and 80th-percentile completion times over that span."""
    if len(done_times) < 2:
        return 0.0
    lo, hi = percentile(done_times, 20), percentile(done_times, 80)
    if hi <= lo:
        return 0.0
    n = sum(1 for t in done_times if lo <= t <= hi)
    return n / (hi - lo)


def summarize(sessions: Sequence[SessionResult], alpha: float = GOODPUT_ALPHA) -> dict[str, Any]:
    """The session-level keys of the result JSON."""
    done = [s for s in sessions if s.done_s is not None]
    lat = [s.latency_s for s in done if s.latency_s is not None]
    slow = [x for x in (s.slowdown for s in done) if x is not None]
    good = sum(1 for x in slow if x <= alpha * (1 + 1e-9))
    span = 0.0
    if done:
        span = max(s.done_s or 0.0 for s in done) - min(s.arrival_s for s in sessions)
    admitted = [s for s in sessions if not s.rejected]
    return {
        "sessions": len(sessions),
        "completed": len(done),
        "rejected": sum(1 for s in sessions if s.rejected),
        "latency_s": _dist(lat, (50, 90, 95, 99)),
        "slowdown": _dist(slow, (50, 95, 99)),
        "goodput": {
            "alpha": alpha,
            "fraction": good / len(admitted) if admitted else 0.0,
            "per_s": good / span if span > 0 else 0.0,
        },
        "throughput": {
            "sessions_per_s": len(done) / span if span > 0 else 0.0,
            "steady_sessions_per_s": steady_throughput(
                [s.done_s for s in done if s.done_s is not None]
            ),
            "output_tokens_per_s": sum(s.output_tokens for s in done) / span if span > 0 else 0.0,
        },
        "span_s": span,
    }


def _dist(values: Sequence[float], ps: Sequence[int]) -> dict[str, float]:
    out = {"mean": sum(values) / len(values) if values else 0.0}
    for p in ps:
        out[f"p{p}"] = percentile(values, p)
    return out


def per_session(sessions: Sequence[SessionResult]) -> list[dict[str, Any]]:
    return [
        {
            "session_id": s.session_id,
            "arrival_s": s.arrival_s,
            "latency_s": s.latency_s,
            "ideal_s": s.ideal_s,
            "slowdown": s.slowdown,
            "rejected": s.rejected,
        }
        for s in sessions
    ]


def result_json(
    *,
    policy: str,
    executor: str,
    workload: Mapping[str, Any],
    sessions: Sequence[SessionResult],
    kv: Mapping[str, Any],
    cpu: Mapping[str, Any],
    wall_s: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The result object written by `mars sim` (and later by the live benchmark)."""
    out: dict[str, Any] = {"policy": policy, "executor": executor, "workload": dict(workload)}
    out.update(summarize(sessions))
    out["kv"] = dict(kv)
    out["cpu"] = dict(cpu)
    out["wall_s"] = wall_s
    if extra:
        out.update(extra)
    out["per_session"] = per_session(sessions)
    return out
