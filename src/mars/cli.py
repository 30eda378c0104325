"""The `mars` command line: `mars serve`, `sim`, `capacity`, `sweep`, `bench`, `costmodel`,
`calibrate`, `timeline`, `policies`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from mars.bench.live_cli import add_bench_parser, run_bench
from mars.core.errors import UsageError
from mars.engine.calibrate_cli import add_calibrate_parser, run_calibrate
from mars.sched.registry import check_policy, make_policy, policy_names
from mars.sched.settings_args import add_policy_settings, policy_settings
from mars.server.cli import add_serve_parser, run_serve
from mars.sim.arrivals import ARRIVAL_KINDS, BURST_SIZE
from mars.sim.cluster import ROUTER_HELP, ROUTERS
from mars.sim.costmodel import GPUS, MODELS
from mars.sim.costmodel_cli import (
    add_costmodel_parser,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_costmodel,
)
from mars.timeline.cli import add_timeline_parser, run_timeline


class _ShowDefaults(argparse.HelpFormatter):
    """Help that states every option's default (unless its text already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or default in (None, False, argparse.SUPPRESS, [])
            or "default" in text
        ):
            return text
        return f"{text} (default: %(default)s)".lstrip()


class Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line (no usage dump), exit status 2, and shows
    each option's default in `--help`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _ShowDefaults)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"mars: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mars", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_serve_parser(sub)
    _add_sim(sub)
    _add_capacity(sub)
    _add_sweep(sub)
    add_bench_parser(sub)
    add_costmodel_parser(sub)
    add_calibrate_parser(sub)
    add_timeline_parser(sub)
    _add_traces(sub)
    sub.add_parser("policies", help="list the scheduling policies")
    return parser


def _add_workload_args(p: argparse.ArgumentParser, single_run: bool = True) -> None:
    """Options shared by every simulated experiment."""
    p.add_argument("--traces", required=True, help="trace file (JSONL, ../shared/traces format)")
    p.add_argument("--gpu", help=f"one of {', '.join(sorted(GPUS))} (default h100)")
    p.add_argument(
        "--model",
        help=f"one of {', '.join(sorted(MODELS))}, or a model shape JSON file "
        "(default qwen3-coder-30b-a3b)",
    )
    p.add_argument(
        "--cost-model",
        metavar="FILE.json",
        help="a `mars calibrate` preset: step times fitted to a real engine, instead of the "
        "--gpu/--model roofline",
    )
    p.add_argument("--tool-cores", type=positive_int, default=8, help="CPU cores for tools")
    p.add_argument(
        "--tool-workers",
        type=positive_int,
        help="tool runs hold one of N workers, first in first out, as `mars serve "
        "--tool-workers N` (default: no queue)",
    )
    p.add_argument(
        "--tool-overhead",
        type=non_negative_float,
        default=0.0,
        metavar="S",
        help="seconds each tool run costs on its worker beyond its duration (the sandbox's start)",
    )
    p.add_argument(
        "--sessions", type=positive_int, help="seeded sample of N sessions (default all)"
    )
    if single_run:
        p.add_argument("--seed", type=non_negative_int, default=0, help="workload and arrival seed")
    p.add_argument("--tool-stats", help="tool-duration quantile table replacing the built-in one")
    p.add_argument(
        "--token-scale", type=positive_float, default=1.0, help="multiply every token count"
    )
    p.add_argument(
        "--time-scale", type=positive_float, default=1.0, help="multiply every tool duration"
    )
    p.add_argument("--kv-scale", type=positive_float, default=1.0, help="multiply KV capacity")
    p.add_argument(
        "--shared-prefix-tokens",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="the first N prompt tokens of the sessions of one trajectory group (traj_id less "
        "its instance: one framework's system prompt and tools; the traces have no text) are "
        "the same: the KV manager shares their KV across sessions as the live engine does "
        "(default 0: nothing shared)",
    )
    if single_run:
        p.add_argument("--json", dest="json_out", metavar="OUT", help="write the result JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--replicas",
        type=positive_int,
        default=1,
        metavar="N",
        help="a cluster of N engine replicas (GPUs), each with its own KV, scheduler and step "
        "clock on the same cost model; --tool-cores and --tool-workers are per replica, pooled "
        "across the cluster (default 1: one engine)",
    )
    p.add_argument("--router", choices=ROUTERS, default="mars", help=ROUTER_HELP)
    add_policy_settings(p)


def _add_sim(sub: argparse._SubParsersAction[Parser]) -> None:
    p = sub.add_parser(
        "sim",
        help="simulate agent sessions from a trace file under one policy",
        description="Simulate agent sessions from a trace file on a simulated GPU and CPU pool.",
    )
    _add_workload_args(p)
    p.add_argument("--policy", required=True, help="scheduling policy (see `mars policies`)")
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=positive_float, help="open loop: sessions arriving per second")
    load.add_argument("--concurrency", type=positive_int, help="closed loop: sessions in flight")
    p.add_argument(
        "--arrival",
        choices=ARRIVAL_KINDS,
        default="poisson",
        help=f"open-loop arrivals; bursts: {BURST_SIZE} sessions at one instant, bursts Poisson",
    )
    p.add_argument(
        "--events",
        metavar="FILE",
        help="write the run's events as `mars serve --events` does (JSON lines; `time` and `ts` "
        "are simulated seconds); draw them with `mars timeline FILE`",
    )


def _add_capacity(sub: argparse._SubParsersAction[Parser]) -> None:
    p = sub.add_parser(
        "capacity",
        help="closed-loop throughput curve of a policy over several concurrencies",
        description=(
            "Run a policy in closed loop at each concurrency and print the steady-throughput "
            "curve; its peak is the capacity (DESIGN.md section 5)."
        ),
    )
    _add_workload_args(p)
    p.add_argument("--policy", default="fcfs", help="scheduling policy (see `mars policies`)")
    p.add_argument(
        "--concurrencies",
        type=_int_list,
        default=[8, 16, 32, 64, 128],
        help="comma-separated concurrencies (default 8,16,32,64,128)",
    )


def _add_sweep(sub: argparse._SubParsersAction[Parser]) -> None:
    p = sub.add_parser(
        "sweep",
        help="policies x loads x seeds, with report.md and PNG plots",
        description=(
            "Run every policy at every load (fractions of fcfs capacity, measured first in "
            "closed loop) or rate, for every seed; write results.json, report.md and plots."
        ),
    )
    _add_workload_args(p, single_run=False)
    p.add_argument(
        "--policies",
        type=_name_list,
        required=True,
        help="comma-separated policies (see `mars policies`)",
    )
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--rates", type=_float_list, help="comma-separated sessions/s")
    load.add_argument(
        "--loads",
        type=_float_list,
        help="comma-separated fractions of fcfs capacity, e.g. 0.8,1.0,1.3",
    )
    p.add_argument("--seeds", type=_seed_list, default=[0], help="comma-separated seeds")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--no-timelines",
        action="store_true",
        help="skip the timeline of one run per policy (highest load, first seed): its events "
        "in OUT/events-POLICY.jsonl and `mars timeline` PNG in OUT/timeline-POLICY.png",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="run N simulations at once in local processes (the same results, in the same "
        "order); with --ray local, the CPUs of the Ray head it starts (default 1: one after "
        "another in this process)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        metavar="ADDRESS|local",
        help="run the simulations as Ray tasks (pip install 'ray==2.60.0'): `local` starts a "
        "Ray head on this machine's cores and stops it after; an ADDRESS (alone: `auto`, "
        "RAY_ADDRESS or a `ray start` here) joins that cluster, whose nodes need mars and the "
        "trace file and --out at the same paths",
    )


def _add_traces(sub: argparse._SubParsersAction[Parser]) -> None:
    from mars.sim.families import FAMILIES

    p = sub.add_parser("traces", help="trace files: `mars traces synth` writes workload families")
    verbs = p.add_subparsers(dest="verb", required=True, parser_class=Parser)
    synth = verbs.add_parser(
        "synth",
        help="write a workload family in the trace format (distributions: mars.sim.families)",
        description="Write SESSIONS trajectories of a workload family to a JSONL trace file.",
    )
    synth.add_argument("--family", required=True, choices=FAMILIES)
    synth.add_argument("--sessions", type=positive_int, required=True)
    synth.add_argument("--seed", type=non_negative_int, default=0)
    synth.add_argument(
        "--traces", help="the SWE-bench trace file the swe-* and cpu-heavy families resample"
    )
    synth.add_argument("--out", required=True, help="output trace file (JSONL)")


def run_synth(args: argparse.Namespace) -> int:
    from mars.sim.families import synthesize, write_family

    records = synthesize(args.family, args.sessions, args.seed, args.traces)
    path = write_family(records, args.out)
    print(f"wrote {len(records)} {args.family} sessions to {path}")
    return 0


def _name_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated names")
    return names


def _float_list(text: str) -> list[float]:
    return [positive_float(part) for part in _name_list(text)]


def _seed_list(text: str) -> list[int]:
    return [non_negative_int(part) for part in _name_list(text)]


def run_sweep_cmd(args: argparse.Namespace) -> int:
    from mars.bench.pool import open_pool
    from mars.bench.report import write_plots, write_report
    from mars.bench.sweep import SweepPlan, run_sweep
    from mars.sim.experiment import load_specs

    for name in args.policies:
        check_policy(name)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory")
    args.seed, args.json_out, args.policy = args.seeds[0], None, args.policies[0]
    base = _spec(args, rate=1.0)
    for name in args.policies:  # every --set must name a parameter of every swept policy
        make_policy(name, dict(base.policy_settings), simulated=True)
    plan = SweepPlan(
        base,
        tuple(args.policies),
        tuple(args.seeds),
        tuple(args.rates or ()),
        tuple(args.loads or ()),
        events_dir=None if args.no_timelines else out,
    )
    load_specs(base)  # a bad trace file fails before any run
    out.mkdir(parents=True, exist_ok=True)
    extra = 5 if args.loads else 0
    bar = _progress(plan.runs + extra, enabled=not args.no_progress, unit="run")

    def on_capacity(point: Any) -> None:
        if bar:
            bar.update(1)
        print(
            f"fcfs closed loop, concurrency {point.concurrency}: steady "
            f"{point.steady:.4f} sessions/s",
            flush=True,
        )

    def on_run(result: dict[str, Any]) -> None:
        if bar:
            bar.update(1)

    try:
        with open_pool(args.workers, args.ray) as pool:
            sweep = run_sweep(plan, on_capacity, on_run, pool)
    finally:
        if bar:
            bar.close()
    if sweep.capacity_per_s is not None:
        print(f"fcfs capacity: {sweep.capacity_per_s:.4f} sessions/s")
    (out / "results.json").write_text(json.dumps(sweep.results, indent=1) + "\n")
    report = write_report(sweep, out)
    write_plots(sweep, out)
    print(report.read_text())
    print(f"wrote {out}/results.json, {report}, and PNG plots in {out}")
    return 0


def _int_list(text: str) -> list[int]:
    return [positive_int(part) for part in _name_list(text)]


def _spec(args: argparse.Namespace, **load: Any) -> Any:
    from mars.sim.experiment import SimSpec, make_cost_model

    check_policy(args.policy)
    gpu, model = args.gpu or "h100", args.model or "qwen3-coder-30b-a3b"
    if args.cost_model is not None:
        if args.gpu or args.model:
            raise UsageError(
                "--cost-model replaces the --gpu/--model roofline (the preset was fitted to one "
                "engine); give either --cost-model FILE or --gpu/--model, not both"
            )
        gpu, model = "fitted", _preset_model(args.cost_model)
    spec = SimSpec(
        traces=args.traces,
        policy=args.policy,
        gpu=gpu,
        model=model,
        cost_model_file=args.cost_model,
        tool_cores=args.tool_cores,
        tool_workers=args.tool_workers,
        tool_overhead_s=args.tool_overhead,
        sessions=args.sessions,
        seed=args.seed,
        tool_stats=args.tool_stats,
        token_scale=args.token_scale,
        time_scale=args.time_scale,
        kv_scale=args.kv_scale,
        shared_prefix_tokens=args.shared_prefix_tokens,
        policy_settings=policy_settings(args),
        replicas=args.replicas,
        router=args.router,
        **load,
    )
    make_cost_model(spec)  # fail fast on a bad GPU/model or setting before reading traces
    make_policy(spec.policy, dict(spec.policy_settings), simulated=True)
    if args.json_out:
        _check_writable(args.json_out)
    return spec


def _preset_model(path: str) -> str:
    from mars.sim.fitted import load_preset

    return str(load_preset(path).metadata.get("model_file", "calibrated"))


def run_capacity(args: argparse.Namespace) -> int:
    from mars.bench.capacity import capacity_curve, format_curve, peak

    spec = _spec(args, concurrency=args.concurrencies[0])
    bar = _progress(len(args.concurrencies), enabled=not args.no_progress, unit="run")
    points = capacity_curve(spec, args.concurrencies, (lambda _p: bar.update(1)) if bar else None)
    if bar:
        bar.close()
    best = peak(points)
    print(
        f"policy {spec.policy} | {spec.gpu} | {spec.model} | closed loop | seed {spec.seed} | "
        f"{points[0].result['sessions']} sessions per run"
    )
    print(format_curve(points))
    print(f"capacity: {best.steady:.4f} sessions/s at concurrency {best.concurrency}")
    if args.json_out:
        out = [{"concurrency": p.concurrency, **p.result} for p in points]
        Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"result JSON written to {args.json_out}")
    return 0


def run_sim(args: argparse.Namespace) -> int:
    from mars.core.events import EventBus
    from mars.sim.eventlog import EventLog
    from mars.sim.experiment import load_specs, run_experiment

    spec = _spec(args, rate=args.rate, arrival=args.arrival, concurrency=args.concurrency)
    specs = load_specs(spec)
    if args.events:
        _check_writable(args.events, "--events")
    bar = _progress(len(specs), enabled=not args.no_progress, unit="session")
    progress = (lambda _r: bar.update(1)) if bar else None
    bus = EventBus()
    log = EventLog(Path(args.events)).attach(bus) if args.events else None
    try:
        result = run_experiment(spec, specs, progress=progress, bus=bus)
    finally:
        if log is not None:
            log.close()
    if bar:
        bar.close()
    print(format_summary(result))
    if log is not None:
        print(f"{log.count} events written to {args.events} (draw them: mars timeline FILE)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"result JSON written to {args.json_out}")
    return 0


def _check_writable(path: str, option: str = "--json") -> None:
    target = Path(path)
    parent = target.resolve().parent
    if target.is_dir():
        example = f"{path}/out.json" if option == "--json" else f"{path}/events.jsonl"
        raise UsageError(f"{option} {path} is a directory; give a file name such as {example}")
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"{option} {path}: not writable")


def _progress(total: int, enabled: bool, unit: str) -> Any:
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc="simulating", file=sys.stderr)


def format_summary(r: dict[str, Any]) -> str:
    lat, slow, good, thr, kv = r["latency_s"], r["slowdown"], r["goodput"], r["throughput"], r["kv"]
    w = r["workload"]
    load = (
        f"rate {w['rate']}/s ({w['arrival']})" if w["rate"] else f"concurrency {w['concurrency']}"
    )
    lines = [
        f"policy {r['policy']} | {w['gpu']} | {w['model']} | {load} | seed {w['seed']}",
        f"sessions {r['sessions']}  completed {r['completed']}  rejected {r['rejected']}  "
        f"(simulated {r['sim_time_s']:.0f} s in {r['wall_s']:.1f} s wall)",
        f"latency s     mean {lat['mean']:9.1f}  p50 {lat['p50']:9.1f}  p90 {lat['p90']:9.1f}  "
        f"p95 {lat['p95']:9.1f}  p99 {lat['p99']:9.1f}",
        f"slowdown      mean {slow['mean']:9.2f}  p50 {slow['p50']:9.2f}  p95 {slow['p95']:9.2f}  "
        f"p99 {slow['p99']:9.2f}",
        f"goodput       {good['fraction']:.1%} within {good['alpha']:g}x ideal, "
        f"{good['per_s']:.4f} sessions/s",
        f"throughput    {thr['sessions_per_s']:.4f} sessions/s (steady "
        f"{thr['steady_sessions_per_s']:.4f}), {thr['output_tokens_per_s']:.0f} output tokens/s",
        f"kv            hit rate {kv['hit_rate']:.1%} (appending histories allow "
        f"{kv['reusable_rate']:.1%}), recomputed {kv['recomputed_prefill_tokens']} tokens, "
        f"{kv['preemptions']} preemptions, {kv['evictions']} evictions",
        f"cpu           tool-core utilisation {r['cpu']['utilization']:.1%}",
    ]
    cluster = r.get("cluster")
    if cluster and cluster["replicas"] > 1:
        busy = [p["busy_fraction"] for p in cluster["per_replica"]]
        lines.append(
            f"cluster       {cluster['replicas']} replicas, router {cluster['router']}, "
            f"{cluster['moves']} calls moved replica, busy {min(busy):.0%}-{max(busy):.0%}"
        )
    split = r.get("time_split")
    if split:
        lines.append(
            f"time split    per session: admission {split['admission_wait_s']:.1f} s, call wait "
            f"{split['call_wait_s']:.1f} s, prefill {split['prefill_s']:.1f} s, decode "
            f"{split['decode_s']:.1f} s ({split['decode_s_per_token'] * 1000:.1f} ms/token), "
            f"tools and agent {split['tools_and_agent_s']:.1f} s"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "sim":
            return run_sim(args)
        if args.command == "serve":
            given = sys.argv[1:] if argv is None else argv
            return run_serve(args, given[given.index("serve") + 1 :])
        if args.command == "sweep":
            return run_sweep_cmd(args)
        if args.command == "bench":
            return run_bench(args)
        if args.command == "capacity":
            return run_capacity(args)
        if args.command == "costmodel":
            return run_costmodel(args)
        if args.command == "calibrate":
            return run_calibrate(args)
        if args.command == "timeline":
            return run_timeline(args)
        if args.command == "traces":
            return run_synth(args)
        for name in policy_names():
            note = "  (simulator only: a clairvoyant bound, not a scheduler)"
            print(name + (note if name == "oracle" else ""))
        return 0
    except UsageError as e:
        print(f"mars: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mars: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
