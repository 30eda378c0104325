"""`mars bench --agents`: the real-agents benchmark's options and command (the runner is
`mars.bench.agents`)."""

from __future__ import annotations

import argparse
import json
import sys

from mars.core.errors import UsageError
from mars.sim.costmodel_cli import non_negative_float, positive_int


def add_agent_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "real agents (--agents, instead of --traces)",
        "Real agent frameworks on small seeded coding tasks: per policy and seed a fresh mars "
        "serve, N agents at once working through the tasks (closed loop), every command a real "
        "process through the tools API; reports end-to-end task time (mean, p90, p95).",
    )
    g.add_argument(
        "--agents",
        metavar="FRAMEWORK",
        help="miniswe (mini-swe-agent 2.4.6, the `agents` extra) or openhands (OpenHands SDK "
        "1.58.2 in its own Python 3.12 venv: ./scripts/setup_openhands.sh, $MARS_OPENHANDS_VENV)",
    )
    g.add_argument(
        "--tasks",
        help="a tasks directory (DIR/<id>/task.json and DIR/<id>/repo/) or 'builtin' (seeded "
        "tasks generated per seed, written to OUT/tasks-seedS/)",
    )
    g.add_argument(
        "--agents-per-run", type=positive_int, default=4, help="agents in flight (default 4)"
    )
    g.add_argument(
        "--task-count",
        type=positive_int,
        help="builtin: tasks per seed (default 1.5x --agents-per-run); a directory: its first N",
    )
    g.add_argument("--step-limit", type=positive_int, default=6, help="model calls per task (6)")
    g.add_argument(
        "--task-time-limit",
        type=positive_int,
        default=300,
        help="seconds per task; no model call starts after it (default 300)",
    )
    g.add_argument(
        "--max-tokens",
        type=positive_int,
        help="tokens per reply (default 48 for miniswe, 128 for openhands: its tool calls' JSON)",
    )
    g.add_argument(
        "--temperature",
        type=non_negative_float,
        default=1.0,
        help="sampling temperature; each task samples with its own seed (default 1.0)",
    )


def run_agent_bench(args: argparse.Namespace) -> int:
    from mars.bench.agents import AgentBench, AgentBenchPlan
    from mars.bench.agents_report import write_agent_plots, write_agent_report
    from mars.bench.live_cli import check_bench_args

    for flag, value in (
        ("--traces", args.traces),
        ("--rate", args.rate),
        ("--concurrency", args.concurrency),
        ("--load", args.load),
    ):
        if value is not None:
            raise UsageError(f"{flag} is for trace replay; with --agents give --agents-per-run")
    if args.client_tools:
        raise UsageError("--client-tools is for trace replay: agents run their commands")
    if args.tasks is None:
        raise UsageError("--agents needs --tasks DIR or --tasks builtin")
    out = check_bench_args(args, "")
    plan = AgentBenchPlan(
        tasks=args.tasks,
        policies=tuple(args.policies),
        out=out.resolve(),
        framework=args.agents,
        seeds=tuple(args.seeds),
        agents=args.agents_per_run,
        task_count=args.task_count,
        step_limit=args.step_limit,
        time_limit_s=args.task_time_limit,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        kv_tokens=args.kv_tokens,
        tool_workers=args.tool_workers,
        engine_cpus=args.engine_cpus,
        tool_cpus=args.tool_cpus,
        unsafe_tools=args.unsafe_tools,
        events=args.events,
        progress="off" if args.no_progress else ("bar" if sys.stderr.isatty() else "lines"),
    )
    plan.task_set(plan.seeds[0])  # bad tasks fail before any server starts
    if plan.framework == "openhands":
        from mars.agents.openhands_run import openhands_python

        openhands_python()  # a missing venv fails before any server starts
    else:
        try:
            import mars.agents.taskrun  # noqa: F401
        except ImportError as e:
            raise UsageError(str(e).splitlines()[0]) from None
    results = AgentBench(plan, lambda line: print(line, flush=True)).run()
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report = write_agent_report(results, out)
    write_agent_plots(results, out)
    print(report.read_text())
    print(f"wrote {out}/results.json, {report}, PNG plots and server logs in {out}")
    return 0
