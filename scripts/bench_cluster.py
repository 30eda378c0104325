"""Clusters in the simulator: latency and throughput at 1, 4, 16 and 64 replicas, load scaled.

Each cluster of N replicas gets N times one replica's sessions and arrival rate: a seeded sample
of `--sessions-per-replica` x N trace sessions (fewer per replica where the trace file runs out:
832 sessions in ../shared/traces, so 13 per replica at 64) arriving as Poisson at `--load` x one
replica's capacity x N. One replica's capacity is `mars sweep`'s yardstick: the peak steady
throughput of `fcfs` in closed loop over 8..128 sessions, on a `--capacity-sessions` sample.
Every router runs the same sample and arrival times per N and shares its ideal times. Prints and
writes (`--out`, and the JSON beside it) a markdown table: mean and p95 latency, steady
throughput, goodput, the share of reusable prompt tokens served from cache, calls that moved
replica, and the spread of replicas' busy fractions; then, per N, the `mars` router's mean and
p95 latency against the better of the per-call routers.

    nice .venv/bin/python scripts/bench_cluster.py [--replicas 1,4,16,64] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from mars.bench.capacity import CONCURRENCIES, capacity_curve, peak
from mars.sim.cluster import ROUTERS
from mars.sim.experiment import (
    SimSpec,
    load_specs,
    make_cost_model,
    run_experiment,
    workload_ideals,
)
from mars.sim.workload import load_trajectories


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _row(n: int, per: int, rate: float, r: dict[str, Any]) -> dict[str, Any]:
    kv, cl = r["kv"], r["cluster"]
    busy = [p["busy_fraction"] for p in cl["per_replica"]]
    return {
        "replicas": n,
        "sessions_per_replica": per,
        "rate_per_s": rate,
        "mean_s": r["latency_s"]["mean"],
        "p95_s": r["latency_s"]["p95"],
        "steady_per_s": r["throughput"]["steady_sessions_per_s"],
        "goodput": r["goodput"]["fraction"],
        "reuse_kept": kv["hit_rate"] / kv["reusable_rate"] if kv["reusable_rate"] else 0.0,
        "moves": cl["moves"],
        "busy_min": min(busy),
        "busy_max": max(busy),
        "admission_wait_s": r["time_split"]["admission_wait_s"],
        "wall_s": r["wall_s"],
    }


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| replicas | sessions/replica | rate/s | router | mean s | p95 s | steady sessions/s "
        "| goodput | reusable kept | calls moved | busy min-max | admission wait s | wall s |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in rows:
        lines.append(
            f"| {x['replicas']} | {x['sessions_per_replica']} | {x['rate_per_s']:.3f} "
            f"| {x['router']} | {x['mean_s']:.1f} | {x['p95_s']:.1f} | {x['steady_per_s']:.3f} "
            f"| {x['goodput']:.0%} | {x['reuse_kept']:.1%} | {x['moves']} "
            f"| {x['busy_min']:.0%}-{x['busy_max']:.0%} | {x['admission_wait_s']:.1f} "
            f"| {x['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def _verdicts(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for n in sorted({x["replicas"] for x in rows}):
        mine = [x for x in rows if x["replicas"] == n]
        mars = next((x for x in mine if x["router"] == "mars"), None)
        others = [x for x in mine if x["router"] != "mars"]
        if mars is None or not others or n == 1:
            continue
        best = min(others, key=lambda x: x["mean_s"])
        out.append(
            f"{n} replicas: mars router mean {mars['mean_s']:.1f} s / p95 {mars['p95_s']:.1f} s "
            f"vs {best['router']} {best['mean_s']:.1f} / {best['p95_s']:.1f} "
            f"({mars['mean_s'] / best['mean_s']:.2f}x mean, "
            f"{mars['p95_s'] / best['p95_s']:.2f}x p95)"
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--traces", default="../shared/traces/traces.jsonl")
    ap.add_argument("--gpu", default="h100-nvl")
    ap.add_argument("--policy", default="mars")
    ap.add_argument("--replicas", type=_ints, default=[1, 4, 16, 64])
    ap.add_argument("--routers", default=",".join(ROUTERS))
    ap.add_argument("--sessions-per-replica", type=int, default=50)
    ap.add_argument("--capacity-sessions", type=int, default=200)
    ap.add_argument("--load", type=float, default=0.9, help="fraction of one replica's capacity")
    ap.add_argument("--rate", type=float, help="sessions/s per replica instead of --load")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_cluster.md")
    args = ap.parse_args()
    t0 = time.perf_counter()
    base = SimSpec(args.traces, policy=args.policy, gpu=args.gpu, seed=args.seed, rate=1.0)
    available = len(load_trajectories(args.traces))
    if args.rate is not None:
        rate, how = args.rate, f"{args.rate} sessions/s per replica (given)"
    else:
        yard = replace(base, policy="fcfs", sessions=min(args.capacity_sessions, available))
        cap = peak(capacity_curve(yard, CONCURRENCIES)).steady
        rate = args.load * cap
        how = (
            f"{args.load} x one replica's fcfs capacity ({cap:.4f} sessions/s, closed loop "
            f"{','.join(map(str, CONCURRENCIES))} on {yard.sessions} sessions) = {rate:.4f} "
            "sessions/s per replica"
        )
    print(f"load: {how}", flush=True)
    cost = make_cost_model(base)
    rows = []
    for n in args.replicas:
        per = min(args.sessions_per_replica, available // n)
        first = replace(base, sessions=per * n, rate=rate * n, replicas=n)
        specs = load_specs(first)
        ideal = workload_ideals(first, specs, cost)
        # One replica is one engine whatever the router: it runs once.
        for router in args.routers.split(",") if n > 1 else ["one engine"]:
            spec = first if n == 1 else replace(first, router=router)
            r = run_experiment(spec, specs, ideal=ideal)
            rows.append(_row(n, per, rate * n, r) | {"router": router})
            x = rows[-1]
            print(
                f"{n:>3} replicas x {per} sessions, {router:<11}: mean {x['mean_s']:.1f} s, "
                f"p95 {x['p95_s']:.1f} s, steady {x['steady_per_s']:.3f}/s, reusable kept "
                f"{x['reuse_kept']:.1%} ({x['wall_s']:.0f} s wall)",
                flush=True,
            )
    table = _table(rows)
    verdicts = _verdicts(rows)
    wall = time.perf_counter() - t0
    text = "\n".join(
        [
            f"Policy {args.policy}, {args.gpu}, seed {args.seed}; load: {how}.",
            "",
            table,
            "",
            *(f"- {v}" for v in verdicts),
            "",
            f"Run time {wall:.0f} s.",
        ]
    )
    print(text)
    out = Path(args.out)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(
        json.dumps({"load": how, "rows": rows, "wall_s": wall}, indent=1) + "\n"
    )
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
