"""One simulated experiment: a trace workload under one policy, with its ideal times and metrics.

Ideal time per session (DESIGN.md section 5) is literally a run of that session alone on an idle
system with unlimited KV, the same token budget and the same sampled tool durations, under the
vLLM default policy (so every policy is measured against the same yardstick).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from mars.bench.metrics import SessionResult, result_json
from mars.core.errors import UsageError
from mars.core.events import EventBus
from mars.sched.policies.fcfs import FCFSPolicy
from mars.sched.registry import parameters
from mars.sim.arrivals import ARRIVAL_KINDS, arrival_times
from mars.sim.cluster import check_cluster, cluster_policies
from mars.sim.costmodel import CostModel, StepCostModel, resolve_gpu, resolve_model
from mars.sim.fitted import FittedCostModel
from mars.sim.run import Arrivals, SessionRecord, SimConfig, SimOutcome, Simulation
from mars.sim.toolstats import ToolStats
from mars.sim.workload import SessionSpec, WorkloadConfig, build_workload


@dataclass(frozen=True)
class SimSpec:
    """Everything `mars sim` takes; frozen and printed into the result JSON."""

    traces: str
    policy: str = "fcfs"
    gpu: str = "h100"
    model: str = "qwen3-coder-30b-a3b"
    tool_cores: int = 8
    tool_workers: int | None = None  # FIFO workers every tool holds (None: no queue)
    tool_overhead_s: float = 0.0  # each tool run's fixed cost on its worker
    rate: float | None = None  # sessions/s, open loop
    arrival: str = "poisson"
    concurrency: int | None = None  # closed loop
    sessions: int | None = None
    seed: int = 0
    tool_stats: str | None = None
    token_scale: float = 1.0
    time_scale: float = 1.0
    kv_scale: float = 1.0
    host_kv_gb: float = 256.0  # host memory for offloaded KV (per GPU)
    shared_prefix_tokens: int = 0  # leading prompt tokens all sessions share (one framework)
    policy_settings: tuple[tuple[str, str], ...] = ()  # --set key=value overrides
    fast_forward: bool = True
    # A `mars calibrate` preset: its fitted model replaces the gpu x model roofline.
    cost_model_file: str | None = None
    # A cluster: this many replicas of the engine behind a router (`mars.sim.cluster`).
    replicas: int = 1
    router: str = "mars"

    def __post_init__(self) -> None:
        check_cluster(self.replicas, self.router)
        if (self.rate is None) == (self.concurrency is None):
            raise UsageError("give exactly one of --rate R (open loop) or --concurrency C")
        for name in ("rate", "concurrency", "tool_cores", "token_scale", "time_scale", "kv_scale"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.tool_workers is not None and self.tool_workers < 1:
            raise UsageError(f"--tool-workers must be at least 1, got {self.tool_workers}")
        if not self.tool_overhead_s >= 0:
            raise UsageError(f"--tool-overhead must be >= 0 seconds, got {self.tool_overhead_s}")


def load_specs(spec: SimSpec) -> list[SessionSpec]:
    path = Path(spec.traces)
    if path.is_dir():
        raise UsageError(f"--traces {spec.traces} is a directory; pass the JSONL trace file")
    if not path.is_file():
        raise UsageError(f"trace file {spec.traces!r} not found; pass --traces FILE (JSONL)")
    stats = ToolStats.from_file(spec.tool_stats) if spec.tool_stats else ToolStats.default()
    config = WorkloadConfig(spec.sessions, spec.seed, spec.token_scale, spec.time_scale)
    return build_workload(path, config, stats)


def make_cost_model(spec: SimSpec) -> CostModel | FittedCostModel:
    """The fitted model of `spec.cost_model_file` if given, else the gpu x model roofline."""
    if spec.cost_model_file is not None:
        return FittedCostModel.from_file(spec.cost_model_file, spec.kv_scale)
    try:
        return CostModel(resolve_gpu(spec.gpu), resolve_model(spec.model), spec.kv_scale)
    except ValueError as e:
        raise UsageError(str(e)) from None


def kv_bytes_per_token(cost: CostModel | FittedCostModel) -> float:
    if isinstance(cost, FittedCostModel):
        return cost.kv_bytes_per_token
    return float(cost.model.kv_bytes_per_token)


def with_engine_limits(config: SimConfig, cost: StepCostModel) -> SimConfig:
    """`config` with the step token budget, sequence slots and KV granularity of the engine a
    fitted model was measured on (as `mars serve` ran it: llama.cpp allocates one cell per
    token, and only that many sessions hold cells at once), so the simulated scheduler batches
    and evicts as the live one does; unchanged for the roofline, which keeps vLLM's defaults."""
    if not isinstance(cost, FittedCostModel):
        return config
    meta = cost.preset.metadata
    return replace(
        config,
        block_size=1,
        max_num_batched_tokens=_positive(meta.get("batch_tokens"), config.max_num_batched_tokens),
        max_num_seqs=_positive(meta.get("max_sequences"), config.max_num_seqs),
        kv_sequences=_positive(meta.get("max_sequences"), 0) or None,
    )


def _positive(value: object, default: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return default


def engine_name(cost: CostModel | FittedCostModel) -> str:
    """What runs the steps: the GPU of the roofline, or the fitted preset's name."""
    return f"fitted:{cost.name}" if isinstance(cost, FittedCostModel) else cost.gpu.name


def ideal_times(
    specs: Sequence[SessionSpec], cost: StepCostModel, config: SimConfig
) -> dict[str, float]:
    """Each session alone, idle system, unlimited KV, vLLM default policy."""
    out: dict[str, float] = {}
    for s in specs:
        blocks = -(-s.max_context // config.block_size) + 1
        alone = replace(config, kv_tokens=blocks * config.block_size, host_kv_tokens=0)
        unlimited = _UnlimitedContext(cost)
        outcome = Simulation([s], FCFSPolicy(), unlimited, Arrivals(concurrency=1), alone).run()
        rec = outcome.records[0]
        assert rec.latency_s is not None
        out[s.session_id] = rec.latency_s
    return out


class _UnlimitedContext:
    """The cost model with no context limit (for ideal runs of sessions the model would reject)."""

    def __init__(self, cost: StepCostModel) -> None:
        self._cost = cost
        self.kv_capacity_tokens = 1 << 62
        self.max_model_len = 1 << 62
        self.predict = cost.predict
        self.predict_totals = cost.predict_totals
        self.step_seconds = cost.step_seconds
        self.transfer_seconds = cost.transfer_seconds
        self.cache_scan_seconds = cost.cache_scan_seconds


def run_experiment(
    spec: SimSpec,
    specs: Sequence[SessionSpec] | None = None,
    progress: Callable[[SessionRecord], None] | None = None,
    ideal: dict[str, float] | None = None,
    bus: EventBus | None = None,
) -> dict[str, Any]:
    """Run `spec` and return the result JSON (DESIGN.md section 5); the run publishes its
    events on `bus` (`mars sim --events`), the ideal runs on none."""
    t0 = time.perf_counter()
    if specs is None:
        specs = load_specs(spec)
    cost = make_cost_model(spec)
    policy, cluster = cluster_policies(
        spec.policy, dict(spec.policy_settings), spec.replicas, spec.router
    )
    config = SimConfig(
        tool_cores=spec.tool_cores,
        tool_workers=spec.tool_workers,
        tool_overhead_s=spec.tool_overhead_s,
        fast_forward=spec.fast_forward,
        shared_prefix_tokens=spec.shared_prefix_tokens,
        host_kv_tokens=int(spec.host_kv_gb * 1e9 / max(1.0, kv_bytes_per_token(cost))),
    )
    config = with_engine_limits(config, cost)
    if spec.rate is not None:
        if spec.arrival not in ARRIVAL_KINDS:
            raise UsageError(
                f"unknown --arrival {spec.arrival!r}; valid: {', '.join(ARRIVAL_KINDS)}"
            )
        arrivals = Arrivals(
            tuple(arrival_times(len(specs), rate=spec.rate, kind=spec.arrival, seed=spec.seed))
        )
    else:
        assert spec.concurrency is not None
        arrivals = Arrivals(concurrency=spec.concurrency)
    outcome = Simulation(specs, policy, cost, arrivals, config, bus, progress, cluster).run()
    if ideal is None:
        ideal = workload_ideals(spec, specs, cost)
    wall_s = time.perf_counter() - t0
    result = _result(spec, specs, outcome, ideal, cost, config.block_size, wall_s)
    result["policy_config"] = parameters(policy)
    return result


def workload_ideals(
    spec: SimSpec, specs: Sequence[SessionSpec], cost: StepCostModel
) -> dict[str, float]:
    """Ideal times of the sessions of `specs` that the system can hold at all."""
    limit = min(cost.max_model_len, cost.kv_capacity_tokens)
    # Alone, a session never waits for a tool worker, but each run still pays its overhead.
    alone = SimConfig(tool_cores=spec.tool_cores, tool_overhead_s=spec.tool_overhead_s)
    config = with_engine_limits(alone, cost)
    return ideal_times([s for s in specs if s.max_context <= limit], cost, config)


def _reusable_rate(specs: Sequence[SessionSpec], out: SimOutcome) -> float:
    """Share of the served sessions' prompt tokens that appending histories make reusable."""
    served = {r.session_id for r in out.records if not r.rejected}
    mine = [s for s in specs if s.session_id in served]
    return sum(s.total_reuse_tokens for s in mine) / max(
        1, sum(s.total_prompt_tokens for s in mine)
    )


def _result(
    spec: SimSpec,
    specs: Sequence[SessionSpec],
    out: SimOutcome,
    ideal: dict[str, float],
    cost: CostModel | FittedCostModel,
    block_size: int,
    wall_s: float,
) -> dict[str, Any]:
    sessions = [
        SessionResult(
            r.session_id,
            r.arrival_s,
            r.done_s,
            ideal.get(r.session_id),
            r.output_tokens,
            r.rejected,
        )
        for r in out.records
    ]
    span = out.end_time or 1.0
    kv = {
        "recomputed_prefill_tokens": out.recomputed_tokens,
        "hit_rate": out.hit_tokens / out.prompt_tokens if out.prompt_tokens else 0.0,
        "reusable_rate": _reusable_rate(specs, out),
        "shared_rate": out.shared_tokens / out.prompt_tokens if out.prompt_tokens else 0.0,
        "evictions": out.evictions,
        "offloads": out.offloads,
        "restores": out.restores,
        "preemptions": out.preemptions,
        "capacity_tokens": out.kv_blocks * block_size,
        "mean_usage": (
            sum(u for _, u in out.kv_usage) / len(out.kv_usage) if out.kv_usage else 0.0
        ),
    }
    cpu = {
        "mean_tool_queue_wait_s": out.tool_queue_wait_s / max(1, out.tool_runs),
        "utilization": out.tool_busy_core_s / (out.tool_cores * span),
        "cores": out.tool_cores,
    }
    workload = asdict(spec)
    workload["sessions_in_workload"] = len(specs)
    return result_json(
        policy=spec.policy,
        executor="sim",
        workload=workload,
        sessions=sessions,
        kv=kv,
        cpu=cpu,
        wall_s=wall_s,
        extra={
            "gpu": {
                "name": engine_name(cost),
                "busy_fraction": out.gpu_busy_s / (span * len(out.replicas)),
                "steps": out.steps,
            },
            "cluster": {
                "replicas": len(out.replicas),
                "router": spec.router,
                "moves": out.moves,
                "per_replica": out.replicas,
            },
            "sim_time_s": out.end_time,
            "time_split": time_split(out.records),
            "kv_usage_over_time": [[round(t, 3), round(u, 4)] for t, u in out.kv_usage[::8]],
            "admission_window_over_time": [
                [round(t, 3), w, a]
                for t, w, a in out.admission_window[:: max(1, len(out.admission_window) // 2000)]
            ],
        },
    )


def time_split(records: Sequence[SessionRecord]) -> dict[str, float]:
    """Where the completed sessions' time went, mean seconds per session: admission queue, the
    calls' wait for the engine, their prefill and their decode; the rest is tools, their queue
    and the agent's own time. And the decode's mean seconds per output token."""
    done = [r for r in records if r.done_s is not None and r.admitted_s is not None]
    n = max(1, len(done))
    split = {
        "admission_wait_s": sum((r.admitted_s or 0.0) - r.arrival_s for r in done) / n,
        "call_wait_s": sum(r.call_wait_s for r in done) / n,
        "prefill_s": sum(r.prefill_s for r in done) / n,
        "decode_s": sum(r.decode_s for r in done) / n,
    }
    split["tools_and_agent_s"] = sum(r.latency_s or 0.0 for r in done) / n - sum(split.values())
    tokens = sum(r.output_tokens for r in done)
    split["decode_s_per_token"] = sum(r.decode_s for r in done) / tokens if tokens else 0.0
    return split


def _thin(points: list[tuple[float, int, int]], most: int) -> list[tuple[float, int, int]]:
    """At most about `most` of `points`, evenly spaced."""
    return points[:: max(1, len(points) // most)]
