"""The policies issue's whole protocol in one command: `mars sweep` on the shared traces for the
main setting and every sensitivity case, closed loop at 64 sessions, and one summary table of
`mars` against fcfs and against the best other policy at each point.

Main: H100 NVL + Qwen3-Coder-30B-A3B, 8 tool cores, 300 sessions, seeds 1-3, Poisson arrivals at
0.3x, 1.0x and 1.3x fcfs's closed-loop peak, every policy and ablation. Cases (the baselines and
`mars`): KV halved (capacity re-measured), H200, Llama-3.1-8B, 4 and 16 tool cores, tool time
scale 3. Sweeps run one after another, each spreading its runs over --workers local processes
(default: one per core of this machine), or over a Ray cluster with --ray ADDRESS; each writes
its own report and plots under --out; `summary.md` there collects the ratios. What is already
under --out (a case's results.json, closed_loop.json) is kept: delete it to measure again.

    .venv/bin/python scripts/sweep_matrix.py [--traces FILE] [--out out/matrix] [--sessions 300]
        [--workers N | --ray ADDRESS] [--cases main,h200,...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from mars.bench.pool import machine_cores, open_pool, run_all
from mars.sim.experiment import SimSpec, run_experiment

BASELINES = "fcfs,continuum,continuum-dynamic,autellix,infercept"
ABLATIONS = "mars-no-priority,mars-no-admission,mars-no-retention"
MAIN = ["--gpu", "h100-nvl"]
CASES: list[tuple[str, list[str], str, str]] = [
    # name, extra sweep arguments, loads, policies
    ("main", MAIN, "0.3,1.0,1.3", f"{BASELINES},mars,{ABLATIONS}"),
    ("kv-half", [*MAIN, "--kv-scale", "0.5"], "1.0", f"{BASELINES},mars"),
    ("h200", ["--gpu", "h200"], "1.0,1.3", f"{BASELINES},mars"),
    ("llama-8b", [*MAIN, "--model", "llama-3.1-8b"], "1.0,1.3", f"{BASELINES},mars"),
    ("tool-cores-4", [*MAIN, "--tool-cores", "4"], "1.0", f"{BASELINES},mars"),
    ("tool-cores-16", [*MAIN, "--tool-cores", "16"], "1.0", f"{BASELINES},mars"),
    ("time-scale-3", [*MAIN, "--time-scale", "3"], "1.0", f"{BASELINES},mars"),
]
CLOSED_LOOP = 64


def _sweep(args: argparse.Namespace, out: Path, case: tuple[str, list[str], str, str]) -> str:
    name, extra, loads, policies = case
    dest = out / name
    if (dest / "results.json").exists():
        return f"{name}: kept {dest}/results.json"
    t0 = time.perf_counter()
    cmd = [
        sys.executable, "-m", "mars", "sweep", "--traces", args.traces,
        "--sessions", str(args.sessions), "--seeds", "1,2,3", "--loads", loads,
        "--policies", policies, "--no-progress", "--out", str(dest), *extra,
        *(["--ray", args.ray] if args.ray else ["--workers", str(args.workers)]),
        # A timeline per policy (~20 MB of events each) for the main setting only.
        *([] if name == "main" else ["--no-timelines"]),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return f"{name}: {time.perf_counter() - t0:.0f} s"


def _mean(rows: list[dict[str, Any]], *path: str) -> float:
    def get(r: dict[str, Any]) -> float:
        v: Any = r
        for k in path:
            v = v[k]
        return float(v)

    return statistics.fmean(get(r) for r in rows)


def _summary_rows(name: str, results: list[dict[str, Any]]) -> list[str]:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["policy"], r["load"]), []).append(r)
    rows = []
    for load in sorted({r["load"] for r in results}):
        mars, fcfs = groups.get(("mars", load)), groups.get(("fcfs", load))
        others = [(p, g) for (p, x), g in groups.items() if x == load and not p.startswith("mars")]
        if not mars or not fcfs or not others:
            continue
        best, g = min(others, key=lambda pg: _mean(pg[1], "latency_s", "mean"))
        m = _mean(mars, "latency_s", "mean")
        rows.append(
            f"| {name} | {load:g} | {m:.1f} | {_mean(fcfs, 'latency_s', 'mean') / m:.2f}x "
            f"| {best} | {_mean(g, 'latency_s', 'mean') / m:.2f}x "
            f"| {_mean(g, 'latency_s', 'p95') / _mean(mars, 'latency_s', 'p95'):.2f}x "
            f"| {_mean(mars, 'goodput', 'fraction') / _mean(fcfs, 'goodput', 'fraction'):.2f}x "
            f"| {_mean(mars, 'goodput', 'fraction') / _mean(g, 'goodput', 'fraction'):.2f}x "
            f"| {_mean(mars, 'slowdown', 'p99'):.1f} / {_mean(fcfs, 'slowdown', 'p99'):.1f} |"
        )
        for ablation in ABLATIONS.split(","):
            a = groups.get((ablation, load))
            if a:
                am = _mean(a, "latency_s", "mean")
                rows.append(
                    f"| {name}: {ablation} | {load:g} | {am:.1f} "
                    f"| mars {am / m:.2f}x better | | | | | | |"
                )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", default="../shared/traces/traces.jsonl")
    ap.add_argument("--out", default="out/matrix")
    ap.add_argument("--sessions", type=int, default=300)
    where = ap.add_mutually_exclusive_group()
    where.add_argument(
        "--workers", type=int, default=machine_cores(), help="local processes per sweep"
    )
    where.add_argument("--ray", metavar="ADDRESS|local", help="`mars sweep --ray ADDRESS`")
    ap.add_argument("--cases", help="comma-separated case names (default all)")
    args = ap.parse_args()
    names = [name for name, *_ in CASES]
    chosen = args.cases.split(",") if args.cases else names
    if unknown := set(chosen) - set(names):
        ap.error(f"unknown case {sorted(unknown)}; valid: {', '.join(names)}")
    cases = [c for c in CASES if c[0] in chosen]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # One sweep at a time, each over every core: two single-process sweeps side by side left a
    # core idle while the longest (main) finished alone.
    for done, case in enumerate(cases, 1):
        print(f"[{done}/{len(cases)}] {_sweep(args, out, case)}", flush=True)

    lines = [
        "# mars against the baselines: the whole protocol",
        "",
        f"{args.sessions} sessions of `{args.traces}`, seeds 1-3, means over seeds; loads are "
        "fractions of fcfs's closed-loop peak in each setting. Ratios > 1 favour mars.",
        "",
        "| setting | load | mars mean s | vs fcfs | best other | mean vs it | p95 vs it "
        "| goodput vs fcfs | goodput vs it | p99 slowdown mars / fcfs |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for name, *_ in cases:
        results = json.loads((out / name / "results.json").read_text())
        lines += _summary_rows(name, results)

    lines += ["", f"## Closed loop, {CLOSED_LOOP} sessions in flight (main setting)", ""]
    lines += ["| policy | steady sessions/s (mean of 3 seeds) | vs best |", "|---|---:|---:|"]
    cached = out / "closed_loop.json"
    steady: dict[str, float] = json.loads(cached.read_text()) if cached.exists() else {}
    todo = [p for p in [*BASELINES.split(","), "mars"] if p not in steady]
    calls = [
        partial(run_experiment, SimSpec(
            args.traces, policy=policy, gpu="h100-nvl", concurrency=CLOSED_LOOP,
            sessions=args.sessions, seed=seed,
        ))
        for policy in todo
        for seed in (1, 2, 3)
    ]  # fmt: skip
    with open_pool(None if args.ray else args.workers, args.ray) as pool:
        runs = run_all(calls, pool)
    for i, policy in enumerate(todo):
        steady[policy] = _mean(runs[3 * i : 3 * i + 3], "throughput", "steady_sessions_per_s")
        print(f"closed loop {CLOSED_LOOP}: {policy} {steady[policy]:.4f} sessions/s", flush=True)
    cached.write_text(json.dumps(steady, indent=2) + "\n")
    top = max(steady.values())
    lines += [f"| {p} | {v:.4f} | {v / top:.0%} |" for p, v in steady.items()]
    lines += ["", f"Wall time: {time.perf_counter() - t0:.0f} s."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
