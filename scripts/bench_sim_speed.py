"""How fast the simulator runs: wall time of `mars sim`-sized experiments, and how it grows.

(a) the goal: 500 sessions under fcfs, closed loop with 64 sessions in flight, on the default
    h100 / qwen3-coder-30b-a3b, against a 20 s wall-time goal;
(b) growth: the same settings at 100, 200, 400 and 800 sessions; wall per session should stay
    flat (the ratio column near 1) if the simulator is linear in the number of sessions.

Each run is timed in three parts: loading the trace file into sessions, the simulation itself
(`run_experiment` with the ideal times passed in), and the ideal times (every session alone on an
idle system, `workload_ideals`), which `mars sim` would otherwise compute inside the same call.
Timings are the best of --repeats runs. Results go to --out as JSON.

    .venv/bin/python scripts/bench_sim_speed.py [TRACES] [--out out/bench_sim_speed.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mars.sim.experiment import (
    SimSpec,
    load_specs,
    make_cost_model,
    run_experiment,
    workload_ideals,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACES = "../shared/traces/traces.jsonl"
GOAL_SESSIONS = 500
GOAL_S = 20.0
GROWTH_SESSIONS = (100, 200, 400, 800)


def measure(
    traces: str, sessions: int, concurrency: int, seed: int, repeats: int
) -> dict[str, Any]:
    """Best-of-`repeats` timings of one closed-loop fcfs experiment, and what it simulated."""
    spec = SimSpec(
        traces=traces, policy="fcfs", concurrency=concurrency, sessions=sessions, seed=seed
    )
    best: dict[str, float] = {}
    result: dict[str, Any] = {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        specs = load_specs(spec)
        t1 = time.perf_counter()
        ideal = workload_ideals(spec, specs, make_cost_model(spec))
        t2 = time.perf_counter()
        result = run_experiment(spec, specs, ideal=ideal)
        t3 = time.perf_counter()
        times = {"load_s": t1 - t0, "ideal_s": t2 - t1, "sim_s": t3 - t2, "total_s": t3 - t0}
        best = {k: min(v, best.get(k, v)) for k, v in times.items()}
    return {
        "sessions": sessions,
        **best,
        "simulated_s": result["sim_time_s"],
        "engine_steps": result["gpu"]["steps"],
        "completed": result["completed"],
        "rejected": result["rejected"],
        "ms_per_session": 1e3 * (best["sim_s"] + best["ideal_s"]) / sessions,
        "sim_ms_per_session": 1e3 * best["sim_s"] / sessions,
        "workload": asdict(spec),
    }


def growth_table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["ms_per_session"]
    head = (
        f"{'sessions':>8} {'sim s':>8} {'ideal s':>8} {'wall s':>8} {'simulated s':>12} "
        f"{'steps':>9} {'ms/session':>11} {'ratio':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        wall = r["sim_s"] + r["ideal_s"]
        lines.append(
            f"{r['sessions']:>8} {r['sim_s']:>8.2f} {r['ideal_s']:>8.2f} {wall:>8.2f} "
            f"{r['simulated_s']:>12.0f} {r['engine_steps']:>9} {r['ms_per_session']:>11.2f} "
            f"{r['ms_per_session'] / base:>6.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "traces", nargs="?", default=DEFAULT_TRACES, help="trace file, relative to the repo root"
    )
    parser.add_argument("--out", default="out/bench_sim_speed.json", help="result JSON")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="keep the best of N runs")
    args = parser.parse_args(argv)
    traces = Path(args.traces)
    traces = (traces if traces.is_absolute() else ROOT / traces).resolve()
    if not traces.is_file():
        parser.error(f"trace file {traces} not found")
    out = Path(args.out)
    out = out if out.is_absolute() else ROOT / out

    print(
        f"mars simulator speed | fcfs | h100 | qwen3-coder-30b-a3b | closed loop "
        f"{args.concurrency} | seed {args.seed} | {traces.name} | "
        f"python {platform.python_version()}"
    )
    goal = measure(str(traces), GOAL_SESSIONS, args.concurrency, args.seed, args.repeats)
    wall = goal["sim_s"] + goal["ideal_s"]
    print(
        f"\n(a) {GOAL_SESSIONS} sessions: {wall:.2f} s wall = {goal['sim_s']:.2f} s simulation "
        f"+ {goal['ideal_s']:.2f} s ideal times (+ {goal['load_s']:.2f} s loading traces); "
        f"{goal['simulated_s']:.0f} s simulated in {goal['engine_steps']} engine steps, "
        f"{goal['completed']} completed, {goal['rejected']} rejected"
    )
    print(
        f"    ratio to the {GOAL_S:g} s goal: {wall / GOAL_S:.3f} "
        f"(simulation alone {goal['sim_s'] / GOAL_S:.3f}; with loading "
        f"{goal['total_s'] / GOAL_S:.3f})"
    )

    rows = [
        measure(str(traces), n, args.concurrency, args.seed, args.repeats) for n in GROWTH_SESSIONS
    ]
    print("\n(b) growth (wall s = simulation + ideal times; ratio = ms/session over the first row)")
    print(growth_table(rows))

    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "bench_sim_speed",
        "traces": str(traces),
        "concurrency": args.concurrency,
        "seed": args.seed,
        "repeats": args.repeats,
        "python": platform.python_version(),
        "goal": {
            "sessions": GOAL_SESSIONS,
            "goal_s": GOAL_S,
            "wall_s": wall,
            "ratio_to_goal": wall / GOAL_S,
            **goal,
        },
        "growth": rows,
    }
    out.write_text(json.dumps(report, indent=1) + "\n")
    last = rows[-1]
    print(
        f"\nsummary: {GOAL_SESSIONS} sessions in {wall:.2f} s ({wall / GOAL_S:.2f}x the "
        f"{GOAL_S:g} s goal); {last['sessions']} sessions at "
        f"{last['ms_per_session'] / rows[0]['ms_per_session']:.2f}x the per-session wall time of "
        f"{rows[0]['sessions']}; JSON in {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
