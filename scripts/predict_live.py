"""The calibrated simulator against a live `mars bench` run, side by side.

For every policy and seed in the bench's `results.json`, the simulator runs the same sessions
(sample, token and time scales, Poisson arrivals at the same rate and seed), the same KV cells,
tool cores and tool workers (first in first out, each run paying the sandbox start the bench
measured on its light steps), with the step times of a `mars calibrate` preset. Prints the live
and simulated mean and p95 session latency per run and per policy, and the error of the means;
`--json FILE` keeps them.

    .venv/bin/python scripts/predict_live.py --live out/live --cost-model out/preset.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from mars.core.errors import UsageError
from mars.sim.experiment import SimSpec, run_experiment
from mars.sim.fitted import FittedCostModel


def predict(live: dict[str, Any], preset: str, capacity: int, queue: bool) -> dict[str, Any]:
    """The simulator's result for the workload of one live result."""
    w = live["workload"]
    rate = live.get("rate") or w.get("rate")
    if rate is None:
        raise UsageError("only open-loop live runs (--rate or --load) can be predicted")
    cores = int(w.get("tool_cores") or 1)
    # Tools waited on the client (`mars bench --client-tools`) have no workers and no start.
    queue = queue and w.get("tools") != "client"
    overhead = live["cpu"].get("tool_overhead_s") if queue else None
    kv_tokens = live["kv"].get("capacity_tokens") or w.get("kv_tokens")
    if not kv_tokens:
        raise UsageError(f"{live['policy']} seed {w['seed']}: the live result has no KV size")
    spec = SimSpec(
        traces=w["traces"],
        policy=live["policy"],
        gpu="fitted",
        cost_model_file=preset,
        rate=float(rate),
        sessions=w["sessions"],
        seed=w["seed"],
        tool_stats=w.get("tool_stats"),
        token_scale=w["token_scale"],
        time_scale=w["time_scale"],
        kv_scale=int(kv_tokens) / capacity,
        tool_cores=cores,
        # `mars serve` runs one tool per tool CPU unless told otherwise.
        tool_workers=(w.get("tool_workers") or cores) if queue else None,
        tool_overhead_s=max(0.0, overhead or 0.0),
    )
    return run_experiment(spec)


def _err(sim: float, live: float) -> str:
    return f"{(sim - live) / live:+.0%}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--live", required=True, help="a `mars bench --out` folder (results.json)")
    ap.add_argument("--cost-model", required=True, help="the `mars calibrate` preset")
    ap.add_argument(
        "--no-tool-queue",
        action="store_true",
        help="simulate tools without the workers' queue and start cost (the old model)",
    )
    ap.add_argument("--json", help="write live and predicted figures here")
    args = ap.parse_args()
    path = Path(args.live) / "results.json"
    if not path.is_file():
        sys.exit(f"predict_live: {path} not found: pass the --out folder of a `mars bench` run")
    capacity = FittedCostModel.from_file(args.cost_model).kv_capacity_tokens
    rows: list[dict[str, Any]] = []
    for live in json.loads(path.read_text()):
        sim = predict(live, args.cost_model, capacity, not args.no_tool_queue)
        row = {
            "policy": live["policy"],
            "seed": live["workload"]["seed"],
            "live_mean_s": live["latency_s"]["mean"],
            "sim_mean_s": sim["latency_s"]["mean"],
            "live_p95_s": live["latency_s"]["p95"],
            "sim_p95_s": sim["latency_s"]["p95"],
            "live_tool_wait_s": live["cpu"]["mean_tool_queue_wait_s"],
            "sim_tool_wait_s": sim["cpu"]["mean_tool_queue_wait_s"],
            "live_hit_rate": live["kv"]["hit_rate"],
            "sim_hit_rate": sim["kv"]["hit_rate"],
        }
        rows.append(row)
        print(
            f"{row['policy']:10s} seed {row['seed']}: mean live {row['live_mean_s']:6.1f} s, "
            f"sim {row['sim_mean_s']:6.1f} s ({_err(row['sim_mean_s'], row['live_mean_s'])}); "
            f"p95 {row['live_p95_s']:6.1f} / {row['sim_p95_s']:6.1f} s; tool wait "
            f"{row['live_tool_wait_s']:.2f} / {row['sim_tool_wait_s']:.2f} s; hit rate "
            f"{row['live_hit_rate']:.0%} / {row['sim_hit_rate']:.0%}",
            flush=True,
        )
    print("\n| policy | live mean s | simulated mean s | error | live p95 s | simulated p95 s |")
    print("|---|---:|---:|---:|---:|---:|")
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == policy]
        lm, sm = (statistics.fmean(r[k] for r in mine) for k in ("live_mean_s", "sim_mean_s"))
        lp, sp = (statistics.fmean(r[k] for r in mine) for k in ("live_p95_s", "sim_p95_s"))
        print(f"| {policy} | {lm:.1f} | {sm:.1f} | {_err(sm, lm)} | {lp:.1f} | {sp:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        sys.exit(f"predict_live: {e}")
