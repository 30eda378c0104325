"""Sweep reports: `report.md` (tables, means and spread over seeds) and PNG plots."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mars.bench.capacity import format_curve
from mars.bench.sweep import SweepResult
from mars.timeline.report import draw_timelines, timeline_section

GOODPUT_TARGET = 0.9  # goodput capacity: the highest rate with >= 90% of sessions within 3x ideal


def _x(r: dict[str, Any]) -> float:
    """The swept value: a load, else a rate, else (closed loop, `mars bench`) a concurrency."""
    for key in ("load", "rate", "concurrency"):
        if r.get(key) is not None:
            return float(r[key])
    raise ValueError("a result without load, rate or concurrency")


def _xname(results: Sequence[dict[str, Any]]) -> str:
    if not results or results[0].get("load") is not None:
        return "load (x fcfs capacity)"
    return "rate /s" if results[0].get("rate") is not None else "concurrency"


def _rate(r: dict[str, Any]) -> str:
    return "-" if r.get("rate") is None else f"{r['rate']:.4f}"


def _setup(results: Sequence[dict[str, Any]]) -> str:
    """One sentence on what ran."""
    w = results[0]["workload"] if results else {}
    seeds = sorted({r["workload"]["seed"] for r in results})
    if results and results[0]["executor"] == "llamacpp":
        arrivals = "open-loop Poisson arrivals" if w.get("rate") else "closed loop"
        return (
            f"Live `mars serve` (llama.cpp, {w.get('model')}, {w.get('kv_tokens')} KV tokens), "
            f"traces `{w.get('traces')}`, {w.get('sessions_in_workload')} sessions per run, "
            f"token scale {w.get('token_scale')}, time scale {w.get('time_scale')}, tools "
            f"{'through the tools API' if w.get('tools') == 'api' else 'waited in the client'} "
            f"on {w.get('tool_cores')} cores, seeds {seeds}; {arrivals}. Ideal times: idle-server "
            "probe + nominal tool times. Values are means over seeds (± standard deviation)."
        )
    return (
        f"Traces `{w.get('traces')}`, {w.get('sessions_in_workload')} sessions per run, "
        f"{w.get('gpu')} / {w.get('model')}, KV scale {w.get('kv_scale')}, "
        f"{w.get('tool_cores')} tool cores, seeds {seeds}; open-loop Poisson arrivals. "
        "Values are means over seeds (± standard deviation)."
    )


def _groups(results: Sequence[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    out: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        out[(r["policy"], _x(r))].append(r)
    return out


def mean_sd(values: Sequence[float]) -> str:
    """`mean ± standard deviation`, one decimal (the mean alone for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}"


def _get(path: str) -> Callable[[dict[str, Any]], float]:
    keys = path.split(".")

    def get(r: dict[str, Any]) -> float:
        v: Any = r
        for k in keys:
            v = v[k]
        return float(v)

    return get


def write_report(sweep: SweepResult, out: Path) -> Path:
    results = sweep.results
    groups = _groups(results)
    policies = list(dict.fromkeys(r["policy"] for r in results))
    xs = sorted({_x(r) for r in results})
    xname = _xname(results)
    rate_head = "" if xname == "rate /s" else " rate /s |"  # the x column may be the rate
    live = bool(results) and results[0]["executor"] == "llamacpp"
    lines = ["# mars bench" if live else "# mars sweep", ""]
    lines.append(_setup(results))
    if sweep.capacity is not None and sweep.capacity_per_s is not None:
        lines += [
            "",
            "## fcfs capacity (closed loop)",
            "",
            format_curve(sweep.capacity),
            "",
            f"Capacity: **{sweep.capacity_per_s:.4f} sessions/s**.",
        ]
    lines += [
        "",
        "## Results",
        "",
        f"| policy | {xname} |{rate_head} mean latency s | p95 latency s | mean slowdown "
        "| goodput | steady sessions/s | KV hit rate | preemptions | unstable |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if rate_head else ""),
    ]
    for x in xs:
        for p in policies:
            g = groups.get((p, x), [])
            if not g:
                continue
            rate = f" {_rate(g[0])} |" if rate_head else ""
            lines.append(
                f"| {p} | {x:g} |{rate}"
                f" {mean_sd([_get('latency_s.mean')(r) for r in g])} "
                f"| {mean_sd([_get('latency_s.p95')(r) for r in g])} "
                f"| {mean_sd([_get('slowdown.mean')(r) for r in g])} "
                f"| {statistics.fmean(_get('goodput.fraction')(r) for r in g):.0%} "
                f"| {statistics.fmean(_get('throughput.steady_sessions_per_s')(r) for r in g):.4f} "
                f"| {statistics.fmean(_get('kv.hit_rate')(r) for r in g):.1%} "
                f"| {statistics.fmean(_get('kv.preemptions')(r) for r in g):.0f} "
                f"| {sum(bool(r['unstable']) for r in g)}/{len(g)} |"
            )
    if "fcfs" in policies:
        lines += [
            "",
            "## Against fcfs (ratio of means; > 1 is better than fcfs)",
            "",
            f"| policy | {xname} | mean latency | p95 latency | goodput |",
            "|---|---:|---:|---:|---:|",
        ]
        for x in xs:
            base = groups.get(("fcfs", x))
            if not base:
                continue
            for p in policies:
                others = groups.get((p, x))
                if p == "fcfs" or not others:
                    continue
                g = others
                lines.append(
                    f"| {p} | {x:g} | {_ratio(base, g, 'latency_s.mean')} "
                    f"| {_ratio(base, g, 'latency_s.p95')} "
                    f"| {_ratio(g, base, 'goodput.fraction')} |"
                )
    lines += _against_best(groups, policies, xs, xname)
    lines += [
        "",
        "## By session length (highest load; tertiles of ideal time)",
        "",
        "| policy | short: mean latency s | medium | long |",
        "|---|---:|---:|---:|",
    ]
    top = xs[-1] if xs else None
    for p in policies:
        g = groups.get((p, top), []) if top is not None else []
        rows = [s for r in g for s in r["per_session"] if s["latency_s"] is not None]
        if not rows:
            continue
        rows.sort(key=lambda s: s["ideal_s"] or 0.0)
        k = max(1, len(rows) // 3)
        parts = [rows[:k], rows[k : 2 * k], rows[2 * k :]]
        cells = [
            f"{statistics.fmean(s['latency_s'] for s in part):.1f}" if part else "-"
            for part in parts
        ]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += _time_split(groups, policies, xs, xname)
    closed = bool(results) and results[0].get("load") is None and results[0].get("rate") is None
    lines += (
        []
        if closed
        else [
            "",
            "## Goodput capacity",
            "",
            f"Highest swept rate at which at least {GOODPUT_TARGET:.0%} of sessions finish "
            "within 3x their ideal time (mean over seeds).",
            "",
            "| policy | goodput capacity, sessions/s |",
            "|---|---:|",
        ]
    )
    for p in [] if closed else policies:
        ok = [
            groups[(p, x)][0]["rate"]
            for x in xs
            if (p, x) in groups
            and groups[(p, x)][0].get("rate") is not None
            and statistics.fmean(_get("goodput.fraction")(r) for r in groups[(p, x)])
            >= GOODPUT_TARGET
        ]
        lines.append(f"| {p} | {max(ok):.4f} |" if ok else f"| {p} | below the lowest rate |")
    lines += [
        "",
        "Plots: `latency.png`, `goodput.png`, `throughput.png`, `kv_usage.png`, and "
        "`admission_window.png` where a policy keeps an admission window.",
    ]
    which = "The first seed's run" if live else "The run at the highest load, first seed"
    lines += timeline_section(sweep.events, out, which)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _time_split(
    groups: dict[tuple[str, float], list[dict[str, Any]]],
    policies: Sequence[str],
    xs: Sequence[float],
    xname: str,
) -> list[str]:
    """Where a session's time goes (simulator results carry `time_split`), means over seeds."""
    keys = ("admission_wait_s", "call_wait_s", "prefill_s", "decode_s", "tools_and_agent_s")
    rows = []
    for x in xs:
        for p in policies:
            g = [r for r in groups.get((p, x), []) if r.get("time_split")]
            if not g:
                continue
            cells = [f"{statistics.fmean(r['time_split'][k] for r in g):.1f}" for k in keys]
            per_token = statistics.fmean(r["time_split"]["decode_s_per_token"] for r in g)
            rows.append(f"| {p} | {x:g} | " + " | ".join(cells) + f" | {per_token * 1e3:.1f} |")
    if not rows:
        return []
    return [
        "",
        "## Where the time goes (mean seconds per session)",
        "",
        "Admission queue; the calls' wait for the engine, their prefill (first schedule to first "
        "token) and decode (first token to end); the rest is tools, their queue and the agent.",
        "",
        f"| policy | {xname} | admission | call wait | prefill | decode | tools and agent "
        "| decode ms/token |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]


def _against_best(
    groups: dict[tuple[str, float], list[dict[str, Any]]],
    policies: Sequence[str],
    xs: Sequence[float],
    xname: str,
) -> list[str]:
    """`mars` against the best other policy at each point (by mean latency; ablations are not
    others), with fcfs's p99 slowdown beside mars's: the floors of the issue at a glance."""
    # Ablations are not others, and the clairvoyant bound is no baseline.
    others = [p for p in policies if not p.startswith("mars") and p != "oracle"]
    if "mars" not in policies or not others:
        return []
    lines = [
        "",
        "## mars against the best other policy (ratio of means; > 1 is better than it)",
        "",
        f"| {xname} | best other | mean latency | p95 latency | goodput "
        "| mars p99 slowdown | fcfs p99 slowdown |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    mean = _get("latency_s.mean")
    for x in xs:
        mine = groups.get(("mars", x))
        rivals = [(p, groups[(p, x)]) for p in others if (p, x) in groups]
        if not mine or not rivals:
            continue
        best, g = min(rivals, key=lambda pg: statistics.fmean(mean(r) for r in pg[1]))
        p99 = _get("slowdown.p99")
        fcfs = groups.get(("fcfs", x))
        fcfs_p99 = f"{statistics.fmean(p99(r) for r in fcfs):.2f}" if fcfs else "-"
        lines.append(
            f"| {x:g} | {best} | {_ratio(g, mine, 'latency_s.mean')} "
            f"| {_ratio(g, mine, 'latency_s.p95')} | {_ratio(mine, g, 'goodput.fraction')} "
            f"| {statistics.fmean(p99(r) for r in mine):.2f} | {fcfs_p99} |"
        )
    return lines


def _ratio(num: list[dict[str, Any]], den: list[dict[str, Any]], key: str) -> str:
    a = statistics.fmean(_get(key)(r) for r in num)
    b = statistics.fmean(_get(key)(r) for r in den)
    return f"{a / b:.2f}x" if b > 0 else ("-" if a == 0 else "inf")


def write_plots(sweep: SweepResult, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sweep.results
    groups = _groups(results)
    policies = list(dict.fromkeys(r["policy"] for r in results))
    xs = sorted({_x(r) for r in results})
    xname = _xname(results)
    paths = []

    def series(p: str, key: str) -> list[float]:
        return [
            statistics.fmean(_get(key)(r) for r in groups[(p, x)]) if (p, x) in groups else math.nan
            for x in xs
        ]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for p in policies:
        axes[0].plot(xs, series(p, "latency_s.mean"), marker="o", label=p)
        axes[1].plot(xs, series(p, "latency_s.p95"), marker="o", label=p)
    for ax, title in zip(axes, ("mean session latency", "p95 session latency"), strict=True):
        ax.set_xlabel(xname)
        ax.set_ylabel("seconds")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    paths.append(save_figure(fig, out / "latency.png"))

    for key, name, ylabel in (
        ("goodput.fraction", "goodput.png", "sessions within 3x ideal"),
        ("throughput.steady_sessions_per_s", "throughput.png", "steady sessions/s"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for p in policies:
            ax.plot(xs, series(p, key), marker="o", label=p)
        ax.set_xlabel(xname)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(save_figure(fig, out / name))

    top = xs[-1] if xs else None
    runs = {p: g[0] for p in policies if (g := groups.get((p, top), []) if top is not None else [])}
    paths += plot_over_time(runs, out, "seconds, simulated or live (highest load, first seed)")
    return paths + draw_timelines(sweep.events, out)


def plot_over_time(runs: dict[str, dict[str, Any]], out: Path, xlabel: str) -> list[Path]:
    """kv_usage.png, and admission_window.png where a policy keeps a window: one run per
    policy (its `kv_usage_over_time`, `admission_window_over_time`)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for p, r in runs.items():
        if r.get("kv_usage_over_time"):
            t, u = zip(*r["kv_usage_over_time"], strict=True)
            ax.plot(t, u, label=p, linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("KV blocks held (fraction)")
    ax.grid(alpha=0.3)
    ax.legend()
    paths = [save_figure(fig, out / "kv_usage.png")]
    windows = {p: w for p, r in runs.items() if (w := r.get("admission_window_over_time"))}
    if windows:  # policies with an admission window (AIMD): the window and what it admitted
        fig, ax = plt.subplots(figsize=(8, 4))
        for p, points in windows.items():
            t, w, a = zip(*points, strict=True)
            (line,) = ax.step(t, w, where="post", label=f"{p}: window", linewidth=0.9)
            ax.step(t, a, where="post", label=f"{p}: admitted", linewidth=0.7, linestyle="--",
                    color=line.get_color())  # fmt: skip
        ax.set_xlabel(xlabel)
        ax.set_ylabel("sessions")
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(save_figure(fig, out / "admission_window.png"))
    return paths


def save_figure(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
