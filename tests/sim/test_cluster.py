"""Clusters in the simulator (`--replicas N --router R`): one replica is the one engine of before,
the `mars` router keeps every session on one replica and admits through one window, the
per-call routers move sessions and lose prefix hits, and bad options are one-line errors."""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

import pytest

from factories import TRACES
from mars.cli import main
from mars.core.errors import UsageError
from mars.sim.cluster import cluster_policies
from mars.sim.experiment import SimSpec, load_specs, make_cost_model, run_experiment
from mars.sim.run import Arrivals, SessionRecord, SimConfig, Simulation
from sim_helpers import needs_traces

pytestmark = needs_traces

# 15 sessions per replica at 0.15 sessions/s each: light enough that affinity keeps nearly every
# reusable token cached, busy enough that calls of several sessions share each replica.
BASE = SimSpec(str(TRACES), policy="mars", gpu="h100-nvl", seed=5, token_scale=0.5, rate=0.15)


def _cluster(n: int, router: str, per: int = 15, **kw: Any) -> SimSpec:
    rate = BASE.rate
    assert rate is not None
    return replace(BASE, sessions=per * n, rate=rate * n, replicas=n, router=router, **kw)


@functools.cache
def _run(n: int, router: str) -> dict[str, Any]:
    return run_experiment(_cluster(n, router), ideal={})


def _reuse_kept(result: dict[str, Any]) -> float:
    """Share of the reusable prompt tokens that were served from cache."""
    kv = result["kv"]
    return float(kv["hit_rate"] / kv["reusable_rate"])


def test_one_replica_is_the_one_engine_of_before() -> None:
    # Numbers of this run before clusters existed (same command, same seed).
    spec = SimSpec(str(TRACES), policy="mars", gpu="h100-nvl", sessions=40, seed=3, rate=0.3)
    r = run_experiment(replace(spec, replicas=1))
    assert r["latency_s"]["mean"] == 209.8196900787894
    assert r["latency_s"]["p95"] == 433.5139918338965
    assert r["kv"]["hit_rate"] == 0.892377237328232
    assert r["gpu"]["steps"] == 46023
    assert r["kv"]["preemptions"] == 8
    assert r["cluster"]["replicas"] == 1 and r["cluster"]["moves"] == 0


def _simulate(spec: SimSpec) -> tuple[Simulation, list[SessionRecord]]:
    specs = load_specs(spec)
    rate = spec.rate
    assert rate is not None
    policy, cluster = cluster_policies(
        spec.policy, dict(spec.policy_settings), spec.replicas, spec.router
    )
    arrivals = Arrivals(tuple(i / rate for i in range(len(specs))))
    sim = Simulation(specs, policy, make_cost_model(spec), arrivals, SimConfig(), cluster=cluster)
    out = sim.run()
    for r in sim.replicas:
        r.kv.check_integrity()
    return sim, out.records


def test_affinity_keeps_each_session_on_one_replica_and_its_hits() -> None:
    one = _run(1, "mars")
    three = _run(3, "mars")
    assert three["completed"] == 45
    per = three["cluster"]["per_replica"]
    # Sessions that had a call on each replica add up to the sessions: each on exactly one.
    assert sum(p["sessions"] for p in per) == 45 and three["cluster"]["moves"] == 0
    assert min(p["sessions"] for p in per) >= 10  # placement spreads them
    assert _reuse_kept(one) > 0.95
    assert _reuse_kept(three) > _reuse_kept(one) - 0.03


def test_round_robin_moves_sessions_and_loses_hits() -> None:
    affinity = _run(3, "mars")
    rr = _run(3, "round-robin")
    assert rr["cluster"]["router"] == "round-robin"
    assert rr["cluster"]["moves"] > rr["completed"]  # most sessions' calls change replica
    assert _reuse_kept(rr) < _reuse_kept(affinity) - 0.05
    assert rr["kv"]["recomputed_prefill_tokens"] > affinity["kv"]["recomputed_prefill_tokens"]


def _most_admitted(records: list[SessionRecord]) -> int:
    """The most sessions admitted and not yet done at once."""
    edges = sorted(
        [(r.admitted_s, 1) for r in records if r.admitted_s is not None]
        + [(r.done_s, -1) for r in records if r.done_s is not None]
    )
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_global_admission_holds_one_window_across_replicas() -> None:
    # A fixed window of 4 sessions (it neither grows nor shrinks), and no session leaves it
    # by going dormant (away far longer than usual).
    fixed = (
        ("window_start", "4"),
        ("window_min", "4"),
        ("window_inc", "0"),
        ("dormant_floor_s", "1e9"),
    )
    spec = _cluster(3, "mars", per=8, policy_settings=fixed)
    sim, records = _simulate(replace(spec, rate=3.0))
    assert len(sim.admissions) == 1
    assert all(not r.policy.admission for r in sim.replicas)
    assert _most_admitted(records) == 4  # across all three replicas, never more
    assert all(w == 4 for _, w, _ in sim.window)
    # Per-replica admission: a window of 4 on each replica, each counting the sessions whose
    # latest call it served, so the cluster as a whole holds more than one window's worth.
    sim, records = _simulate(replace(spec, rate=3.0, router="least-load"))
    assert len(sim.admissions) == 3
    assert _most_admitted(records) > 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replicas", "0"], "argument --replicas: expected a positive integer, got '0'"),
        (["--replicas", "two"], "argument --replicas: expected a positive integer"),
        (["--router", "random"], "argument --router: invalid choice: 'random'"),
    ],
)
def test_bad_cluster_options_are_one_line_usage_errors(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["sim", "--traces", str(TRACES), "--policy", "mars", "--rate", "1", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bad_cluster_spec_says_what_to_fix() -> None:
    with pytest.raises(UsageError, match="--replicas must be at least 1"):
        replace(BASE, replicas=0)
    with pytest.raises(UsageError, match="valid: mars, round-robin, least-load"):
        replace(BASE, router="random")
