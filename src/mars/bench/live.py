"""`mars bench`: policies x seeds on the live server, written like `mars sweep` (executor
"llamacpp").

Every (policy, seed) run gets a fresh `mars serve` subprocess (so no run inherits another's cache
or queues) and replays the same workload sample with `mars.agents.replay`. Before the first run
the busy loop of CPU-heavy tool steps is calibrated on an idle core, and the first server is
probed once, idle, for the rates behind the ideal times (`mars.agents.probe`). `load` is a
fraction of the live fcfs capacity, measured first in closed loop at a few concurrencies (the
whole curve is kept, as in `mars sweep`). KV counters are the server's `/v1/kv_cache_stats`,
taken before and after the replay and subtracted (the probe's calls are not counted). Each
policy's run on the first seed keeps its server's events (`mars serve --events`) for the
report's timeline; `events` keeps every run's.

`mars.bench` imports no HTTP client (tests/test_imports.py): the agents are imported when a run
starts.
"""

from __future__ import annotations

import asyncio
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mars.bench.capacity import CurvePoint, peak
from mars.bench.liveserver import get_json, mars_server
from mars.bench.metrics import result_json
from mars.bench.sweep import SweepResult, unstable
from mars.core.errors import UsageError
from mars.sim.experiment import SimSpec, load_specs
from mars.sim.workload import SessionSpec

if TYPE_CHECKING:
    from mars.agents.cpuwork import CpuCalibration
    from mars.agents.probe import EngineRates
    from mars.agents.replay import ReplayConfig, ReplayOutcome

CAPACITY_CONCURRENCIES = (1, 2, 4, 8)
KV_POLL_S = 0.5  # how often KV usage is sampled during a run
COUNTERS = (
    "prefix_hit_tokens",
    "prompt_tokens",
    "recomputed_tokens",
    "preemptions",
    "evicted_tokens",
    "evictions",
    "offloads",
    "restores",
    "generated_tokens",
    "steps",
    "step_s",
    "sched_s",
    "copy_s",
    "restore_fallbacks",
)


@dataclass(frozen=True, kw_only=True)
class ServerOptions:
    """The `mars serve` options a benchmark starts each fresh server with."""

    kv_tokens: int | None = None
    tool_workers: int | None = None
    engine_cpus: str | None = None
    tool_cpus: str | None = None
    unsafe_tools: bool = False

    def serve_args(self, policy: str) -> list[str]:
        args = ["--policy", policy]
        for flag, value in (
            ("--kv-tokens", self.kv_tokens),
            ("--tool-workers", self.tool_workers),
            ("--engine-cpus", self.engine_cpus),
            ("--tool-cpus", self.tool_cpus),
        ):
            if value is not None:
                args += [flag, str(value)]
        return args + (["--unsafe-tools"] if self.unsafe_tools else [])


@dataclass(frozen=True)
class LivePlan(ServerOptions):
    """Everything `mars bench` takes."""

    traces: str
    policies: tuple[str, ...]
    out: Path
    seeds: tuple[int, ...] = (0,)
    sessions: int = 6
    rate: float | None = None  # open loop, sessions/s; or
    concurrency: int | None = None  # closed loop; or
    load: float | None = None  # a fraction of the live fcfs capacity (open loop)
    token_scale: float = 0.05
    time_scale: float = 0.1
    tool_stats: str | None = None
    client_tools: bool = False  # wait tool time on the client instead of the tools API
    capacity_concurrencies: tuple[int, ...] = CAPACITY_CONCURRENCIES
    events: bool = False  # keep every run's event stream beside its server log
    progress: bool = False

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.rate, self.concurrency, self.load)) != 1:
            raise UsageError("give exactly one of --rate, --concurrency or --load")

    def spec(self, seed: int) -> SimSpec:
        """The simulator's spec of this workload: the same sample, scales and tool table."""
        return SimSpec(
            traces=self.traces,
            rate=1.0,
            sessions=self.sessions,
            seed=seed,
            tool_stats=self.tool_stats,
            token_scale=self.token_scale,
            time_scale=self.time_scale,
        )

    @property
    def tool_cores(self) -> int:
        if self.tool_cpus:
            return len(_cpu_list(self.tool_cpus))
        return self.tool_workers or os.cpu_count() or 1


@dataclass
class LiveBench:
    plan: LivePlan
    say: Callable[[str], None] = print
    cpu: CpuCalibration | None = None
    rates: EngineRates | None = None
    _runs: int = field(default=0, init=False)
    # policy -> the events of its first seed's run (drawn as the report's timeline)
    _events: dict[str, Path] = field(default_factory=dict, init=False)

    def run(self) -> SweepResult:
        from mars.agents.cpuwork import calibrate

        plan = self.plan
        plan.out.mkdir(parents=True, exist_ok=True)
        if not plan.client_tools:
            first = _cpu_list(plan.tool_cpus)[0] if plan.tool_cpus else None
            self.cpu = calibrate(first)
            self.say(
                f"busy loop: {self.cpu.iterations_per_s / 1e6:.1f} M iterations/s on an idle "
                f"core, {self.cpu.startup_s * 1e3:.0f} ms interpreter start"
            )
        curve, cap, rate = None, None, plan.rate
        if plan.load is not None:
            curve = self.capacity()
            cap = peak(curve).steady
            if cap <= 0:
                raise UsageError(
                    "the live fcfs capacity came out as 0 sessions/s (too few sessions finished "
                    "to measure it): use --rate or --concurrency, or more --sessions"
                )
            rate = plan.load * cap
            self.say(f"fcfs capacity {cap:.4f} sessions/s; load {plan.load:g} = {rate:.4f}/s")
        results = []
        for seed in plan.seeds:
            specs = load_specs(plan.spec(seed))
            for policy in plan.policies:
                keep = seed == plan.seeds[0]
                r = self.run_one(
                    policy, seed, specs, rate=rate, concurrency=plan.concurrency, timeline=keep
                )
                r["load"] = plan.load
                results.append(r)
                self.say(_line(r))
        return SweepResult(curve, cap, results, dict(self._events))

    def capacity(self) -> list[CurvePoint]:
        """fcfs in closed loop at each concurrency, on the first seed's workload."""
        specs = load_specs(self.plan.spec(self.plan.seeds[0]))
        points = []
        for c in self.plan.capacity_concurrencies:
            point = CurvePoint(c, self.run_one("fcfs", self.plan.seeds[0], specs, concurrency=c))
            self.say(
                f"fcfs closed loop, concurrency {c}: steady {point.steady:.4f} sessions/s, "
                f"mean latency {point.result['latency_s']['mean']:.1f} s"
            )
            points.append(point)
        return points

    def run_one(
        self,
        policy: str,
        seed: int,
        specs: Sequence[SessionSpec],
        *,
        rate: float | None = None,
        concurrency: int | None = None,
        timeline: bool = False,
    ) -> dict[str, Any]:
        """One run on a fresh server; with `timeline` (or --events) its events are kept."""
        from mars.agents.probe import ideal_time, probe_rates, tools_api_status
        from mars.agents.replay import ReplayConfig

        self._runs += 1
        name = f"{self._runs:02d}-{policy}-seed{seed}"
        log = self.plan.out / f"serve-{name}.log"
        args = self.plan.serve_args(policy)
        if self.plan.events or timeline:
            events = self.plan.out / f"events-{name}.jsonl"
            args += ["--events", str(events)]
            if timeline:
                self._events[policy] = events
        with mars_server(args, log) as base:
            if self.rates is None:
                self.rates = asyncio.run(probe_rates(base))
                self.say(
                    f"idle server: prefill {self.rates.prefill_tokens_per_s:.0f} tokens/s, "
                    f"decode {self.rates.decode_tokens_per_s:.1f} tokens/s, "
                    f"{self.rates.call_overhead_s * 1e3:.0f} ms per call"
                )
            if not self.plan.client_tools:
                status = asyncio.run(tools_api_status(base))
                if status != 200:
                    raise UsageError(
                        f"the server's tools API answered {status} to a trivial run (see {log}): "
                        "start it with tools on (bubblewrap, or --unsafe-tools), or pass "
                        "--client-tools"
                    )
            model = get_json(f"{base}/v1/models")["data"][0]
            config = ReplayConfig(
                base,
                rate=rate,
                concurrency=concurrency,
                seed=seed,
                tools="client" if self.plan.client_tools else "api",
                cpu=self.cpu,
                max_context=int(model["max_model_len"]),
            )
            before = get_json(f"{base}/v1/kv_cache_stats")
            outcome, usage, windows = asyncio.run(
                self._replay(specs, config, f"{policy} seed {seed}")
            )
            after = get_json(f"{base}/v1/kv_cache_stats")
        rates = self.rates
        ideal = {s.session_id: ideal_time(s, rates) for s in specs}
        return self._result(
            policy,
            seed,
            specs,
            outcome,
            ideal,
            before,
            after,
            usage,
            config,
            model["id"],
            log,
            windows,
        )

    async def _replay(
        self, specs: Sequence[SessionSpec], config: ReplayConfig, desc: str
    ) -> tuple[ReplayOutcome, list[list[float]], list[list[float]]]:
        from mars.agents.client import ReplayError, ServerClient
        from mars.agents.replay import replay

        bar = None
        if self.plan.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(specs), unit="session", desc=desc)
        usage: list[list[float]] = []
        windows: list[list[float]] = []  # [t, admission window, sessions admitted]
        poller = ServerClient(config.base_url)
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def poll() -> None:
            while True:
                try:
                    stats = await poller.get_json("/v1/kv_cache_stats")
                    now = round(loop.time() - t0, 3)
                    usage.append([now, round(float(stats["kv_usage"]), 4)])
                    window = stats.get("admission_window")
                    if isinstance(window, int):
                        admitted = int(stats["sessions"]) - int(stats["admission_queued"])
                        windows.append([now, window, admitted])
                except (ReplayError, KeyError, TypeError, ValueError):
                    pass
                await asyncio.sleep(KV_POLL_S)

        task = asyncio.create_task(poll())
        try:
            outcome = await replay(specs, config, (lambda _r: bar.update(1)) if bar else None)
        finally:
            task.cancel()
            await poller.aclose()
            if bar is not None:
                bar.close()
        return outcome, usage, windows

    def _result(
        self,
        policy: str,
        seed: int,
        specs: Sequence[SessionSpec],
        outcome: ReplayOutcome,
        ideal: dict[str, float],
        before: dict[str, Any],
        after: dict[str, Any],
        usage: list[list[float]],
        config: ReplayConfig,
        model: str,
        log: Path,
        windows: list[list[float]],
    ) -> dict[str, Any]:
        recs = outcome.records
        sessions = [r.result(None if r.rejected else ideal[r.session_id]) for r in recs]
        delta = {k: _num(after, k) - _num(before, k) for k in COUNTERS if k in after}
        kv = {
            "recomputed_prefill_tokens": delta.get("recomputed_tokens", 0),
            "hit_rate": delta["prefix_hit_tokens"] / max(1, delta["prompt_tokens"]),
            # What the trace's appending histories allow (prompt ids re-sent as the trace says).
            "reusable_rate": sum(s.total_reuse_tokens for s in specs)
            / max(1, sum(s.total_prompt_tokens for s in specs)),
            "evictions": delta.get("evictions"),  # a count, where the server reports one
            "evicted_tokens": delta.get("evicted_tokens", 0),
            "offloads": delta.get("offloads", 0),
            "restores": delta.get("restores", 0),
            "preemptions": delta.get("preemptions", 0),
            "capacity_tokens": after.get("kv_tokens"),
            "mean_usage": statistics.fmean(u for _, u in usage) if usage else 0.0,
        }
        # Where the engine's time went: compute steps, scheduling, KV copies to/from host.
        names = ("steps", "step_s", "sched_s", "copy_s", "restore_fallbacks")
        engine = {k: delta[k] for k in names if k in delta}
        tools = [t for r in recs for t in r.tools]
        heavy = [t for t in tools if t.cpu_heavy and t.nominal_s > 0]
        light = [t for t in tools if not t.cpu_heavy]
        cores = self.plan.tool_cores
        cpu = {
            "mean_tool_queue_wait_s": statistics.fmean(t.queue_wait_s for t in tools)
            if tools
            else 0.0,
            # Heavy tool run time over the tool cores' time: each heavy run holds one core.
            "utilization": sum(t.run_s for t in heavy) / (cores * max(outcome.wall_s, 1e-9)),
            "cores": cores,
            "tool_runs": len(tools),
            "heavy_stretch_mean": statistics.fmean(t.run_s / t.nominal_s for t in heavy)
            if heavy
            else None,
            # A light step sleeps its nominal time: the rest of its run is the sandbox's start
            # and exit (`--tool-overhead` of the simulator).
            "tool_overhead_s": statistics.fmean(t.run_s - t.nominal_s for t in light)
            if light
            else None,
        }
        workload = {
            **asdict(self.plan.spec(seed)),
            "rate": config.rate,
            "concurrency": config.concurrency,
            "arrival": "poisson" if config.rate is not None else None,
            "sessions_in_workload": len(specs),
            "gpu": "cpu",
            "model": model,
            "kv_scale": None,
            "kv_tokens": after.get("kv_tokens"),
            "tool_cores": cores,
            "tool_workers": self.plan.tool_workers,
            "tools": config.tools,
            "engine_cpus": self.plan.engine_cpus,
            "tool_cpus": self.plan.tool_cpus,
        }
        failed = [r for r in recs if r.error is not None and not r.rejected]
        result = result_json(
            policy=policy,
            executor="llamacpp",
            workload=workload,
            sessions=sessions,
            kv=kv,
            cpu=cpu,
            wall_s=outcome.wall_s,
            extra={
                "rate": config.rate,
                "concurrency": config.concurrency,
                "failed": len(failed),
                "errors": [f"{r.session_id}: {r.error}" for r in failed[:5]],
                "ideal": "probe: " + _fields(self.rates),
                "cpu_calibration": _fields(self.cpu),
                "server_hit_tokens_by_turn": sum(t.cached_tokens for r in recs for t in r.turns),
                "trace_reuse_tokens": sum(t.trace_reuse_tokens for r in recs for t in r.turns),
                "retries": sum(t.retries for r in recs for t in r.turns),
                "server_log": str(log),
                "kv_usage_over_time": usage,
                "admission_window_over_time": windows,
                "engine": engine,
            },
        )
        result["unstable"] = unstable(result) if config.rate is not None else False
        return result


def _num(stats: dict[str, Any], key: str) -> float:
    value = stats.get(key)
    return value if isinstance(value, int | float) else 0


def _fields(obj: Any) -> str:
    if obj is None:
        return "none"
    items = asdict(obj).items()
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)


def _cpu_list(text: str) -> list[int]:
    """ "0,2-3" -> [0, 2, 3] (the `taskset -c` syntax)."""
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            cpus += list(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise UsageError(f"bad CPU list {text!r}: use e.g. 0,2-3") from None
    if not cpus:
        raise UsageError(f"bad CPU list {text!r}: use e.g. 0,2-3")
    return cpus


def _line(r: dict[str, Any]) -> str:
    lat, kv = r["latency_s"], r["kv"]
    return (
        f"{r['policy']:>10} seed {r['workload']['seed']}: {r['completed']}/{r['sessions']} done "
        f"({r['failed']} failed, {r['rejected']} rejected), mean latency {lat['mean']:.1f} s, "
        f"p95 {lat['p95']:.1f} s, slowdown {r['slowdown']['mean']:.2f}, goodput "
        f"{r['goodput']['fraction']:.0%}, KV hit {kv['hit_rate']:.1%}, wall {r['wall_s']:.0f} s"
    )
