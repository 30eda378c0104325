"""`mars bench`: the live benchmark's command line (the runner is `mars.bench.live`)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import TypeVar

from mars.bench.agents_cli import add_agent_args, run_agent_bench
from mars.core.errors import UsageError
from mars.sched.registry import check_policy
from mars.sim.costmodel_cli import non_negative_int, positive_float, positive_int

P = TypeVar("P", bound=argparse.ArgumentParser)

DEFAULT_SESSIONS = 6
DEFAULT_TOKEN_SCALE = 0.05
DEFAULT_TIME_SCALE = 0.1


def add_bench_parser(sub: argparse._SubParsersAction[P]) -> None:
    p = sub.add_parser(
        "bench",
        help="replay traces (or run real agents) against a live mars serve per policy",
        description=(
            "For each policy and seed, start a fresh `mars serve`, replay the trace sessions as "
            "real HTTP agents (LLM calls and tool runs), and write results.json, report.md and "
            "PNG plots like `mars sweep` (executor llamacpp). The defaults finish in a few "
            "minutes per policy on 2 cores. With --agents instead of --traces, real agent "
            "frameworks work on seeded tasks (see the real agents options)."
        ),
    )
    p.add_argument("--traces", help="trace file (JSONL, ../shared/traces format)")
    p.add_argument("--policies", type=_names, required=True, help="comma-separated policies")
    p.add_argument(
        "--sessions",
        type=positive_int,
        default=DEFAULT_SESSIONS,
        help=f"seeded sample of N sessions per run (default {DEFAULT_SESSIONS})",
    )
    load = p.add_mutually_exclusive_group()
    load.add_argument("--rate", type=positive_float, help="open loop: Poisson sessions/s")
    load.add_argument("--concurrency", type=positive_int, help="closed loop: sessions in flight")
    load.add_argument(
        "--load",
        type=positive_float,
        help="open loop at this fraction of the live fcfs capacity (measured first)",
    )
    p.add_argument(
        "--token-scale",
        type=positive_float,
        default=DEFAULT_TOKEN_SCALE,
        help=f"multiply every token count (default {DEFAULT_TOKEN_SCALE}: a 135M model on CPU)",
    )
    p.add_argument(
        "--time-scale",
        type=positive_float,
        default=DEFAULT_TIME_SCALE,
        help=f"multiply every tool duration (default {DEFAULT_TIME_SCALE})",
    )
    p.add_argument("--tool-stats", help="tool-duration quantile table replacing the built-in one")
    p.add_argument("--kv-tokens", type=positive_int, help="mars serve --kv-tokens")
    p.add_argument("--seeds", type=_seeds, default=[0], help="comma-separated seeds (default 0)")
    p.add_argument("--tool-workers", type=positive_int, help="mars serve --tool-workers")
    p.add_argument("--engine-cpus", help="mars serve --engine-cpus (e.g. 0)")
    p.add_argument("--tool-cpus", help="mars serve --tool-cpus (e.g. 1)")
    p.add_argument(
        "--unsafe-tools", action="store_true", help="mars serve --unsafe-tools (no bubblewrap)"
    )
    p.add_argument(
        "--client-tools",
        action="store_true",
        help="wait each tool's nominal time in the client instead of running it on the server",
    )
    p.add_argument(
        "--capacity-concurrencies",
        type=_ints,
        default=[1, 2, 4, 8],
        help="closed-loop points of the fcfs capacity curve for --load (default 1,2,4,8)",
    )
    p.add_argument(
        "--events",
        action="store_true",
        help="keep each run's events (mars serve --events) in OUT/events-NN-POLICY-seedS.jsonl",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="output directory")
    add_agent_args(p)


def run_bench(args: argparse.Namespace) -> int:
    from mars.bench.live import LiveBench, LivePlan
    from mars.bench.report import write_plots, write_report
    from mars.sim.experiment import load_specs

    if args.agents is not None:
        return run_agent_bench(args)
    if args.traces is None:
        raise UsageError("give --traces FILE (trace replay) or --agents miniswe (real agents)")
    if args.rate is None and args.concurrency is None and args.load is None:
        raise UsageError("trace replay needs one of --rate, --concurrency or --load")
    out = check_bench_args(args, "or --client-tools" if not args.client_tools else None)
    if args.load is not None and args.sessions < 2:
        raise UsageError("--load needs --sessions 2 or more to measure the fcfs capacity")
    plan = LivePlan(
        traces=args.traces,
        policies=tuple(args.policies),
        out=out,
        seeds=tuple(args.seeds),
        sessions=args.sessions,
        rate=args.rate,
        concurrency=args.concurrency,
        load=args.load,
        token_scale=args.token_scale,
        time_scale=args.time_scale,
        tool_stats=args.tool_stats,
        kv_tokens=args.kv_tokens,
        tool_workers=args.tool_workers,
        engine_cpus=args.engine_cpus,
        tool_cpus=args.tool_cpus,
        unsafe_tools=args.unsafe_tools,
        client_tools=args.client_tools,
        capacity_concurrencies=tuple(args.capacity_concurrencies),
        events=args.events,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    load_specs(plan.spec(plan.seeds[0]))  # a bad trace file fails before any server starts
    sweep = LiveBench(plan, lambda line: print(line, flush=True)).run()
    (out / "results.json").write_text(json.dumps(sweep.results, indent=1) + "\n")
    report = write_report(sweep, out)
    write_plots(sweep, out)
    print(report.read_text())
    print(f"wrote {out}/results.json, {report}, PNG plots and server logs in {out}")
    return 0


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated names")
    return names


def _seeds(text: str) -> list[int]:
    return [non_negative_int(part) for part in _names(text)]


def _ints(text: str) -> list[int]:
    return [positive_int(part) for part in _names(text)]


def check_bench_args(args: argparse.Namespace, other_way: str | None) -> Path:
    """Check what every `mars bench` run takes (policies, --out, CPUs, the sandbox; `other_way`:
    how else to do without bubblewrap, or None when none is needed); the --out directory."""
    for name in args.policies:
        check_policy(name)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory")
    if (args.engine_cpus is None) != (args.tool_cpus is None):
        raise UsageError("give --engine-cpus and --tool-cpus together (e.g. 0 and 1)")
    if other_way is not None and not args.unsafe_tools and shutil.which("bwrap") is None:
        raise UsageError(
            "bubblewrap (bwrap) is not installed, so the server's tools API is off: install it, "
            f"or pass --unsafe-tools (tools unsandboxed){' ' + other_way if other_way else ''}"
        )
    return out
