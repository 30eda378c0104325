"""`mars bench --agents miniswe|openhands`: real agent frameworks on seeded tasks, policies x
seeds.

For every (seed, policy) a fresh `mars serve` starts (so no run inherits another's cache or
queues) and N agents work through the seed's tasks in closed loop (`mars.agents.fleet`), one
session per task. mini-swe-agent (`mars.agents.taskrun`) runs in this process, its commands
through the tools API as real processes in each task's workspace (seeded from `--seed-root`);
OpenHands (`mars.agents.openhands_run`) runs each task in a subprocess of its own Python 3.12 venv,
its tools as local processes in a copy of the task's repo. A task's time is its agent's wall
time, start to end. KV counters are the server's `/v1/kv_cache_stats`, before and after,
subtracted.

Builtin tasks are generated per seed (`mars.agents.tasks`) and written to `OUT/tasks-seedS/`, a
tasks directory that `--tasks` takes back. `mars.bench` imports no HTTP client or agent framework
at import time (tests/test_imports.py): they are imported when a run starts.
"""

from __future__ import annotations

import shutil
import statistics
import threading
import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mars.agents.tasks import Task, generate_tasks, load_tasks, write_tasks
from mars.bench.live import COUNTERS, KV_POLL_S, ServerOptions
from mars.bench.liveserver import get_json, mars_server
from mars.bench.metrics import SessionResult, percentile, result_json
from mars.core.errors import UsageError

if TYPE_CHECKING:
    from mars.agents.fleet import AgentSettings, TaskOutcome, TaskRunner

FRAMEWORKS = ("miniswe", "openhands")
OPENHANDS_MIN_KV = 8192  # one session's prompt (~6,100 tokens) and a few turns
BUILTIN = "builtin"
Progress = Literal["bar", "lines", "off"]


@dataclass(frozen=True)
class AgentBenchPlan(ServerOptions):
    """Everything `mars bench --agents` takes."""

    tasks: str  # a tasks directory, or "builtin" (generated per seed)
    policies: tuple[str, ...]
    out: Path
    framework: str = "miniswe"
    seeds: tuple[int, ...] = (1,)
    agents: int = 4  # agents in flight at once
    task_count: int | None = None  # builtin: tasks per seed (default 1.5x agents); DIR: first M
    step_limit: int = 6
    time_limit_s: int = 300
    max_tokens: int | None = None  # per reply; None: 48 for miniswe, 128 for openhands
    temperature: float = 1.0
    command_timeout_s: int = 30
    events: bool = False
    progress: Progress = "lines"

    def __post_init__(self) -> None:
        if self.framework not in FRAMEWORKS:
            raise UsageError(f"--agents {self.framework}: choose one of {', '.join(FRAMEWORKS)}")
        kv = self.kv_tokens
        if self.framework == "openhands" and kv is not None and kv < OPENHANDS_MIN_KV:
            raise UsageError(
                f"--agents openhands with --kv-tokens {kv}: OpenHands' system prompt and tools "
                f"are ~6,100 tokens a session; give --kv-tokens {OPENHANDS_MIN_KV} or more"
            )

    def task_set(self, seed: int) -> list[Task]:
        if self.tasks == BUILTIN:
            count = self.task_count or max(2, (3 * self.agents + 1) // 2)
            root = self.out / f"tasks-seed{seed}"
            shutil.rmtree(root, ignore_errors=True)
            return write_tasks(generate_tasks(count, seed), root)
        tasks = load_tasks(Path(self.tasks))
        return tasks[: self.task_count] if self.task_count else tasks

    def settings(self, seed: int) -> AgentSettings:
        from mars.agents.fleet import AgentSettings

        return AgentSettings(
            step_limit=self.step_limit,
            time_limit_s=self.time_limit_s,
            max_tokens=self.max_tokens or (128 if self.framework == "openhands" else 48),
            temperature=self.temperature,
            command_timeout_s=self.command_timeout_s,
            seed=seed,
        )

    def seeded_serve_args(self, policy: str, seed_roots: Sequence[Path]) -> list[str]:
        args = self.serve_args(policy)
        if self.framework == "openhands":  # its tools run in local workspaces, not the API's
            return args
        for root in sorted(set(seed_roots)):
            args += ["--seed-root", str(root)]
        return args


@dataclass
class AgentBench:
    plan: AgentBenchPlan
    say: Callable[[str], None] = print
    _runs: int = field(default=0, init=False)

    def run(self) -> list[dict[str, Any]]:
        self.plan.out.mkdir(parents=True, exist_ok=True)
        results = []
        for seed in self.plan.seeds:
            tasks = self.plan.task_set(seed)
            for policy in self.plan.policies:
                result = self.run_one(policy, seed, tasks)
                results.append(result)
                self.say(summary_line(result))
        return results

    def runner(self, model: str, name: str) -> TaskRunner:
        if self.plan.framework == "openhands":
            from mars.agents.openhands_run import OpenHandsRunner

            return OpenHandsRunner(model, self.plan.out / f"agents-{name}")
        from mars.agents.taskrun import run_task

        return run_task

    def run_one(self, policy: str, seed: int, tasks: Sequence[Task]) -> dict[str, Any]:
        from mars.agents.fleet import AgentFleet

        self._runs += 1
        name = f"{self._runs:02d}-{policy}-seed{seed}"
        log = self.plan.out / f"serve-{name}.log"
        roots = [t.repo.parent.parent for t in tasks if t.repo is not None]
        args = self.plan.seeded_serve_args(policy, roots)
        if self.plan.events:
            args += ["--events", str(self.plan.out / f"events-{name}.jsonl")]
        settings = self.plan.settings(seed)
        with mars_server(args, log) as base:
            if self.plan.framework == "miniswe":
                _check_tools(base, log)
            model = get_json(f"{base}/v1/models")["data"][0]["id"]
            run_task = self.runner(model, name)
            before = get_json(f"{base}/v1/kv_cache_stats")
            poller = _Poller(base)
            poller.start()
            on_done, close = self._progress(f"{policy} seed {seed}", len(tasks))
            try:
                fleet = AgentFleet(base, self.plan.agents, run_task, settings)
                outcomes, wall = fleet.run(tasks, on_done)
            finally:
                poller.stop()
                close()
            after = get_json(f"{base}/v1/kv_cache_stats")
        return self._result(policy, seed, outcomes, wall, before, after, poller, model, log)

    def _progress(
        self, desc: str, total: int
    ) -> tuple[Callable[[TaskOutcome], None] | None, Callable[[], None]]:
        if self.plan.progress == "bar":
            from tqdm import tqdm

            bar = tqdm(total=total, unit="task", desc=desc)
            return (lambda _o: bar.update(1)), bar.close
        if self.plan.progress == "off":
            return None, lambda: None
        done = [0]

        def line(o: TaskOutcome) -> None:
            done[0] += 1
            self.say(
                f"  {desc}: {done[0]}/{total} {o.task_id} {o.task_s:.1f} s, {o.steps} steps, "
                f"{o.tool_runs} tool runs, {o.exit_status}{', solved' if o.solved else ''}"
            )

        return line, lambda: None

    def _result(
        self,
        policy: str,
        seed: int,
        outcomes: Sequence[TaskOutcome],
        wall: float,
        before: dict[str, Any],
        after: dict[str, Any],
        poller: _Poller,
        model: str,
        log: Path,
    ) -> dict[str, Any]:
        plan = self.plan
        sessions = [
            SessionResult(o.task_id, o.start_s, o.end_s, None, 0, rejected=False) for o in outcomes
        ]
        delta = {k: _num(after, k) - _num(before, k) for k in COUNTERS if k in after}
        kv = {
            "recomputed_prefill_tokens": delta.get("recomputed_tokens", 0),
            "hit_rate": delta.get("prefix_hit_tokens", 0) / max(1, delta.get("prompt_tokens", 0)),
            "prompt_tokens": delta.get("prompt_tokens", 0),
            "generated_tokens": delta.get("generated_tokens", 0),
            "evictions": delta.get("evictions"),
            "evicted_tokens": delta.get("evicted_tokens", 0),
            "offloads": delta.get("offloads", 0),
            "restores": delta.get("restores", 0),
            "preemptions": delta.get("preemptions", 0),
            "capacity_tokens": after.get("kv_tokens"),
            "mean_usage": statistics.fmean(u for _, u in poller.usage) if poller.usage else 0.0,
        }
        engine = {k: delta[k] for k in ("steps", "step_s", "sched_s", "copy_s") if k in delta}
        times = [o.task_s for o in outcomes]
        workload = {
            "benchmark": "agents",
            "framework": plan.framework,
            "tasks": plan.tasks,
            "task_count": len(outcomes),
            "agents": plan.agents,
            "seed": seed,
            "gpu": "cpu",
            "model": model,
            "kv_tokens": after.get("kv_tokens"),
            "tool_workers": plan.tool_workers,
            "engine_cpus": plan.engine_cpus,
            "tool_cpus": plan.tool_cpus,
            "tools": "api",
            "agent_settings": asdict(self.plan.settings(seed)),
        }
        n = max(1, len(outcomes))
        cpu = {
            "tool_runs": sum(o.tool_runs for o in outcomes),
            "mean_tool_queue_wait_s": sum(o.tool_queue_wait_s for o in outcomes)
            / max(1, sum(o.tool_runs for o in outcomes)),
            "tool_run_s": sum(o.tool_run_s for o in outcomes),
        }
        return result_json(
            policy=policy,
            executor="llamacpp",
            workload=workload,
            sessions=sessions,
            kv=kv,
            cpu=cpu,
            wall_s=wall,
            extra={
                "concurrency": plan.agents,
                "task_time_s": {
                    "mean": statistics.fmean(times) if times else 0.0,
                    **{f"p{p}": percentile(times, p) for p in (50, 90, 95)},
                    "max": max(times, default=0.0),
                },
                "time_split_s": {  # mean seconds per task
                    "llm": sum(o.llm_s for o in outcomes) / n,
                    "tools": sum(o.tool_s for o in outcomes) / n,
                    "agent": sum(o.task_s - o.llm_s - o.tool_s for o in outcomes) / n,
                },
                "steps": sum(o.steps for o in outcomes),
                "llm_calls": sum(o.llm_calls for o in outcomes),
                "submitted": sum(o.submitted for o in outcomes),
                "solved": sum(o.solved for o in outcomes),
                "exit_status": dict(sorted(_count(o.exit_status for o in outcomes).items())),
                "failed": sum(o.error is not None for o in outcomes),
                "errors": [f"{o.task_id}: {o.error}" for o in outcomes if o.error][:5],
                "ideal": "none: an agent's trajectory has no ideal time (slowdown, goodput unset)",
                "server_log": str(log),
                "kv_usage_over_time": poller.usage,
                "admission_window_over_time": poller.windows,
                "engine": engine,
                "tasks": [o.row() for o in outcomes],
            },
        )


def summary_line(r: dict[str, Any]) -> str:
    t, kv = r["task_time_s"], r["kv"]
    return (
        f"{r['policy']:>10} seed {r['workload']['seed']}: {r['completed']} tasks, task time "
        f"mean {t['mean']:.1f} s, p90 {t['p90']:.1f} s, p95 {t['p95']:.1f} s; {r['llm_calls']} "
        f"LLM calls, {r['cpu']['tool_runs']} tool runs, {r['submitted']} submitted, "
        f"{r['solved']} solved; KV hit {kv['hit_rate']:.1%}, {kv['recomputed_prefill_tokens']:.0f}"
        f" tokens recomputed, wall {r['wall_s']:.0f} s"
    )


class _Poller:
    """KV usage and the admission window every KV_POLL_S, on a thread (the agents are threads
    too, and synchronous)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.usage: list[list[float]] = []
        self.windows: list[list[float]] = []  # [t, admission window, sessions admitted]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kv-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        import time

        t0 = time.monotonic()
        while not self._stop.is_set():
            try:
                stats = get_json(f"{self.base}/v1/kv_cache_stats", timeout_s=5.0)
                now = round(time.monotonic() - t0, 3)
                self.usage.append([now, round(float(stats["kv_usage"]), 4)])
                window = stats.get("admission_window")
                if isinstance(window, int):
                    admitted = int(stats["sessions"]) - int(stats["admission_queued"])
                    self.windows.append([now, window, admitted])
            except (urllib.error.URLError, OSError, KeyError, TypeError, ValueError):
                pass
            self._stop.wait(KV_POLL_S)


def _check_tools(base: str, log: Path) -> None:
    import asyncio

    from mars.agents.probe import tools_api_status

    status = asyncio.run(tools_api_status(base))
    if status != 200:
        raise UsageError(
            f"the server's tools API answered {status} to a trivial run (see {log}): the agents "
            "need it; install bubblewrap, or pass --unsafe-tools"
        )


def _num(stats: dict[str, Any], key: str) -> float:
    value = stats.get(key)
    return value if isinstance(value, int | float) else 0


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out
