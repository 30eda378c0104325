"""The real-agents benchmark's `report.md` and PNG plots (`mars bench --agents`)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mars.bench.report import mean_sd, plot_over_time, save_figure

QUANTILES = (("mean", "mean"), ("p90", "p90"), ("p95", "p95"))


def _by_policy(results: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        out[r["policy"]].append(r)
    return out


def _mean(g: Sequence[dict[str, Any]], *keys: str) -> float:
    def get(r: dict[str, Any]) -> float:
        v: Any = r
        for k in keys:
            v = v[k]
        return float(v)

    return statistics.fmean(get(r) for r in g)


def _ratio(base: Sequence[dict[str, Any]], g: Sequence[dict[str, Any]], key: str) -> str:
    a, b = _mean(base, "task_time_s", key), _mean(g, "task_time_s", key)
    return f"{a / b:.2f}x" if b > 0 else "-"


_FRAMEWORKS = {  # the agent, and where its commands run
    "miniswe": (
        "mini-swe-agent's `DefaultAgent`, bundled `mini` config, tool calls",
        "through the tools API",
    ),
    "openhands": (
        "the OpenHands SDK's hello-world `Agent`: terminal and file-editor tools, every reply a "
        "tool call",
        "in a local copy of the task's repo",
    ),
}


def setup_sentence(results: Sequence[dict[str, Any]]) -> str:
    w = results[0]["workload"] if results else {}
    s = w.get("agent_settings", {})
    seeds = sorted({r["workload"]["seed"] for r in results})
    agent, tools = _FRAMEWORKS.get(w.get("framework", ""), ("?", "?"))
    return (
        f"Live `mars serve` (llama.cpp, {w.get('model')}, {w.get('kv_tokens')} KV tokens); "
        f"{w.get('framework')} agents ({agent}), {w.get('agents')} in flight, "
        f"{w.get('task_count')} tasks per run "
        f"(`{w.get('tasks')}`), step limit {s.get('step_limit')}, time limit "
        f"{s.get('time_limit_s')} s, {s.get('max_tokens')} tokens per reply, temperature "
        f"{s.get('temperature')}; every command a real process {tools}; seeds "
        f"{seeds}. Task time: an agent's wall time from its start to its end. Values are means "
        "over seeds (± standard deviation)."
    )


def write_agent_report(results: Sequence[dict[str, Any]], out: Path) -> Path:
    groups = _by_policy(results)
    policies = list(groups)
    lines = ["# mars bench: real agents", "", setup_sentence(results), "", "## Task time", ""]
    base = groups.get("fcfs")
    lines += [
        "| policy | tasks | mean task s | p90 s | p95 s | mean vs fcfs | p95 vs fcfs "
        "| LLM calls/task | tool runs/task | submitted | solved | KV hit rate "
        "| prefill recomputed | preemptions |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in policies:
        g = groups[p]
        tasks = sum(r["completed"] for r in g)
        lines.append(
            f"| {p} | {tasks} | {mean_sd([r['task_time_s']['mean'] for r in g])} "
            f"| {mean_sd([r['task_time_s']['p90'] for r in g])} "
            f"| {mean_sd([r['task_time_s']['p95'] for r in g])} "
            f"| {_ratio(base, g, 'mean') if base else '-'} "
            f"| {_ratio(base, g, 'p95') if base else '-'} "
            f"| {sum(r['llm_calls'] for r in g) / max(1, tasks):.1f} "
            f"| {sum(r['cpu']['tool_runs'] for r in g) / max(1, tasks):.1f} "
            f"| {sum(r['submitted'] for r in g)} | {sum(r['solved'] for r in g)} "
            f"| {_mean(g, 'kv', 'hit_rate'):.1%} "
            f"| {sum(r['kv']['recomputed_prefill_tokens'] for r in g):.0f} "
            f"| {sum(r['kv']['preemptions'] for r in g):.0f} |"
        )
    seeds = sorted({r["workload"]["seed"] for r in results})
    lines += [
        "",
        "## Mean task time per seed (s)",
        "",
        "| policy | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---:|" * len(seeds),
    ]
    for p in policies:
        by_seed = {r["workload"]["seed"]: r["task_time_s"]["mean"] for r in groups[p]}
        cells = [f"{by_seed[s]:.1f}" if s in by_seed else "-" for s in seeds]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Where a task's time goes (mean seconds per task)",
        "",
        "Model calls (the admission queue, the engine's queue, prefill and decode), tool runs as "
        "the agent saw them (HTTP, the tool queue, the process), and the agent's own work.",
        "",
        "| policy | model calls | tools | agent | engine step s (run) |",
        "|---|---:|---:|---:|---:|",
    ]
    for p in policies:
        g = groups[p]
        lines.append(
            f"| {p} | {_mean(g, 'time_split_s', 'llm'):.1f} "
            f"| {_mean(g, 'time_split_s', 'tools'):.2f} | {_mean(g, 'time_split_s', 'agent'):.2f} "
            f"| {statistics.fmean(r['engine'].get('step_s', 0.0) for r in g):.0f} |"
        )
    statuses = sorted({k for r in results for k in r["exit_status"]})
    lines += [
        "",
        "## How the agents ended (tasks, all seeds)",
        "",
        "| policy | " + " | ".join(statuses) + " |",
        "|---|" + "---:|" * len(statuses),
    ]
    for p in policies:
        cells = [str(sum(r["exit_status"].get(k, 0) for r in groups[p])) for k in statuses]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Plots: `task_time.png` (mean, p90, p95 per policy), `task_time_cdf.png` (every task), "
        "`kv_usage.png`, and `admission_window.png` where a policy keeps an admission window.",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_agent_plots(results: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _by_policy(results)
    policies = list(groups)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(QUANTILES))
    for i, (key, label) in enumerate(QUANTILES):
        means = [_mean(groups[p], "task_time_s", key) for p in policies]
        spread = [
            statistics.stdev([r["task_time_s"][key] for r in groups[p]])
            if len(groups[p]) > 1
            else 0.0
            for p in policies
        ]
        xs = [j + (i - (len(QUANTILES) - 1) / 2) * width for j in range(len(policies))]
        ax.bar(xs, means, width, yerr=spread, capsize=3, label=label)
    ax.set_xticks(range(len(policies)), policies)
    ax.set_ylabel("task time, seconds")
    ax.set_title("end-to-end task time (means over seeds, ± sd)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    paths.append(save_figure(fig, out / "task_time.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for p in policies:
        times = sorted(t["task_s"] for r in groups[p] for t in r["tasks"])
        if times:
            ys = [0.0] + [(k + 1) / len(times) for k in range(len(times))]
            ax.step([times[0], *times], ys, where="post", label=p)
    ax.set_xlabel("task time, seconds (every task of every seed)")
    ax.set_ylabel("fraction of tasks done")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(save_figure(fig, out / "task_time_cdf.png"))

    first = min((r["workload"]["seed"] for r in results), default=None)
    firsts = {p: next(r for r in groups[p] if r["workload"]["seed"] == first) for p in policies}
    return paths + plot_over_time(firsts, out, f"seconds (seed {first})")
