"""Agent sessions from trace files (DESIGN.md section 4).

A trace file is JSONL, one trajectory per line, in the format of `../shared/traces/README.md`; only
the fields that README documents are read, unknown extra fields are ignored, so user-recorded and
held-out traces work unchanged. A trajectory becomes a `SessionSpec`: one `TurnSpec` per `llm` step,
carrying the `tool` steps that follow it until the next `llm` step.

Choices the design leaves open, made here:
- Tool steps before the first `llm` step hold no session yet and are ignored.
- Blank lines are skipped; every other line must be a valid trajectory.
- `sessions=None` means every trajectory, still in a seeded random order (a sample of all of them),
  so that `sessions=None` and `sessions=len(file)` give the same workload.
- A tool step without `category` is "other"; without `cpu_heavy` it is heavy iff its category is
  test, run_python or build_install (the README's rule).
- A measured duration is used as recorded, `timed_out` ones included: the session did wait that
  long. Only the quantile table excludes them.
- The sampled draw of a tool step is seeded by (seed, traj_id, index of the step in `steps`).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeGuard

from mars.core.errors import UsageError
from mars.sim.toolstats import ToolStats

ToolSource = Literal["measured", "estimated", "sampled"]
CPU_HEAVY_CATEGORIES = frozenset({"test", "run_python", "build_install"})
STEP_KINDS = ("llm", "tool")


@dataclass(frozen=True)
class ToolSpec:
    """One tool execution between two LLM calls."""

    category: str  # tool category from the trace ("test", "view", ...), "other" when absent
    cpu_heavy: bool  # occupies a CPU core while it runs (processor sharing in the simulator)
    duration_s: float  # nominal run time on an idle core, already multiplied by time_scale
    source: ToolSource  # where duration_s came from: duration_s, duration_est_s or a draw


@dataclass(frozen=True)
class TurnSpec:
    """One LLM call and the tool steps that follow it."""

    prompt_tokens: int  # whole context sent with this call
    output_tokens: int  # tokens decoded by this call
    reuse_tokens: int  # prefix identical to the previous call's prompt+output; 0 for the first call
    tools: tuple[
        ToolSpec, ...
    ]  # run one after another; empty after format errors and the last call

    @property
    def new_prompt_tokens(self) -> int:
        """Prompt tokens no ideal per-session prefix cache could hold: they must be prefilled."""
        return self.prompt_tokens - self.reuse_tokens

    @property
    def context_tokens(self) -> int:
        """Tokens in the KV cache when this call finishes."""
        return self.prompt_tokens + self.output_tokens

    @property
    def tool_time_s(self) -> float:
        return math.fsum(tool.duration_s for tool in self.tools)


@dataclass(frozen=True)
class SessionSpec:
    """One agent session (one trajectory): its LLM calls in order."""

    session_id: str  # unique within a workload, in arrival order: "s0000", "s0001", ...
    traj_id: str  # the trajectory it replays
    turns: tuple[TurnSpec, ...]  # at least one

    @property
    def max_context(self) -> int:
        """Largest KV footprint of the session in tokens: what must fit to ever finish."""
        return max(turn.context_tokens for turn in self.turns)

    @property
    def first_prompt_tokens(self) -> int:
        return self.turns[0].prompt_tokens

    @property
    def total_prompt_tokens(self) -> int:
        return sum(turn.prompt_tokens for turn in self.turns)

    @property
    def total_output_tokens(self) -> int:
        return sum(turn.output_tokens for turn in self.turns)

    @property
    def total_reuse_tokens(self) -> int:
        return sum(turn.reuse_tokens for turn in self.turns)

    @property
    def total_tool_time_s(self) -> float:
        return math.fsum(turn.tool_time_s for turn in self.turns)


@dataclass(frozen=True)
class WorkloadConfig:
    """How to turn a trace file into a workload; every field maps to a CLI flag."""

    sessions: int | None = None  # --sessions: sample size without replacement; None: all
    seed: int = 0  # --seed: the sample, its order and every tool-duration draw
    token_scale: float = 1.0  # --token-scale: x -> max(1, round(x * s)) for prompts and outputs
    time_scale: float = 1.0  # --time-scale: multiplies every tool duration

    def __post_init__(self) -> None:
        if self.sessions is not None and (not _is_int(self.sessions) or self.sessions < 1):
            raise UsageError(f"--sessions must be a positive integer, got {self.sessions!r}")
        if not _is_int(self.seed):
            raise UsageError(f"--seed must be an integer, got {self.seed!r}")
        if not _is_number(self.token_scale) or self.token_scale <= 0:
            raise UsageError(f"--token-scale must be a number > 0, got {self.token_scale!r}")
        if not _is_number(self.time_scale) or self.time_scale < 0:
            raise UsageError(f"--time-scale must be a number >= 0, got {self.time_scale!r}")


def load_trajectories(path: str | Path) -> list[dict[str, Any]]:
    """Parse and validate a trace file; UsageError names the file and line of the first bad line."""
    path = Path(path)
    records: list[dict[str, Any]] = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path} line {lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UsageError(f"{where}: not valid JSON ({exc})") from None
                validate_trajectory(record, where)
                records.append(record)
    except FileNotFoundError:
        raise UsageError(f"trace file {path} not found") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"trace file {path} is not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise UsageError(f"trace file {path} cannot be read: {exc.strerror}") from None
    if not records:
        raise UsageError(f"trace file {path} is empty: expected one JSON trajectory per line")
    return records


def validate_trajectory(record: object, where: str) -> None:
    """Raise UsageError(f"{where}: ...") unless `record` is a usable trajectory object."""
    if not isinstance(record, dict):
        raise UsageError(
            f"{where}: expected a JSON object (one trajectory per line), got {record!r:.40}"
        )
    for field in ("traj_id", "steps"):
        if field not in record:
            raise UsageError(f"{where}: missing field {field!r}")
    traj_id, steps = record["traj_id"], record["steps"]
    if not isinstance(traj_id, str) or not traj_id:
        raise UsageError(f"{where}: 'traj_id' must be a non-empty string, got {traj_id!r}")
    if not isinstance(steps, list):
        raise UsageError(f"{where}: 'steps' must be a list of steps, got {type(steps).__name__}")
    has_llm = False
    for i, step in enumerate(steps):
        at = f"{where}: steps[{i}]"
        if not isinstance(step, dict):
            raise UsageError(f"{at} must be an object, got {step!r:.40}")
        kind = step.get("kind")
        if kind == "llm":
            has_llm = True
            for field in ("prompt_tokens", "output_tokens"):
                value = step.get(field)
                if not _is_int(value) or value < 0:
                    raise UsageError(f"{at} (llm) needs {field} as an integer >= 0, got {value!r}")
        elif kind == "tool":
            for field in ("duration_s", "duration_est_s"):
                value = step.get(field)
                if value is not None and (not _is_number(value) or value < 0):
                    raise UsageError(f"{at} (tool) has {field} {value!r}: must be >= 0 or null")
            if not isinstance(step.get("category", ""), str):
                raise UsageError(f"{at} (tool) has a non-string category {step['category']!r}")
            if not isinstance(step.get("cpu_heavy", False), bool | None):
                raise UsageError(f"{at} (tool) has cpu_heavy {step['cpu_heavy']!r}: use true/false")
        else:
            raise UsageError(f"{at} has unknown kind {kind!r}: expected one of {STEP_KINDS}")
    if not has_llm:
        raise UsageError(f"{where}: trajectory {traj_id!r} has no llm step")


def build_workload(
    path_or_records: str | Path | Sequence[dict[str, Any]],
    config: WorkloadConfig,
    tool_stats: ToolStats | None = None,
) -> list[SessionSpec]:
    """Sample `config.sessions` trajectories (seeded, without replacement) into sessions.

    The list is in arrival order (the sampled order); `tool_stats` (default: the packaged table)
    supplies durations the trace does not record.
    """
    if isinstance(path_or_records, str | Path):
        records = load_trajectories(path_or_records)
        source = f"trace file {path_or_records}"
    else:
        records = list(path_or_records)
        for i, record in enumerate(records):
            validate_trajectory(record, f"record {i}")
        source = "the given records"
        if not records:
            raise UsageError("no trajectories given: expected at least one")
    n = len(records)
    k = n if config.sessions is None else config.sessions
    if k > n:
        raise UsageError(
            f"--sessions {k} asks for more sessions than {source} has ({n} trajectories): "
            f"use --sessions {n} or fewer"
        )
    order = random.Random(config.seed).sample(range(n), k)
    stats = tool_stats if tool_stats is not None else ToolStats.default()
    return [_session(f"s{i:04d}", records[j], config, stats) for i, j in enumerate(order)]


def _session(
    session_id: str, record: dict[str, Any], config: WorkloadConfig, stats: ToolStats
) -> SessionSpec:
    traj_id: str = record["traj_id"]
    scale = config.token_scale
    turns: list[TurnSpec] = []
    tools: list[ToolSpec] = []
    prompt0 = prev_context = 0
    for index, step in enumerate(record["steps"]):
        if step["kind"] == "tool":
            if turns:  # tool steps before the first llm step hold no session: ignored
                tools.append(_tool(step, traj_id, index, config, stats))
            continue
        if turns:
            turns[-1] = _with_tools(turns[-1], tools)
            tools = []
        prompt = max(1, round(step["prompt_tokens"] * scale))
        output = max(1, round(step["output_tokens"] * scale))
        if not turns:
            reuse = 0
            prompt0 = prompt
        elif prompt >= prev_context:  # history grew by appending: all of it is a prefix
            reuse = prev_context
        else:  # history rewritten (elided): only system prompt + task survive
            reuse = min(prompt0, prompt)
        prev_context = prompt + output
        turns.append(TurnSpec(prompt, output, reuse, ()))
    turns[-1] = _with_tools(turns[-1], tools)
    return SessionSpec(session_id, traj_id, tuple(turns))


def _with_tools(turn: TurnSpec, tools: list[ToolSpec]) -> TurnSpec:
    if not tools:
        return turn
    return TurnSpec(turn.prompt_tokens, turn.output_tokens, turn.reuse_tokens, tuple(tools))


def _tool(
    step: dict[str, Any], traj_id: str, index: int, config: WorkloadConfig, stats: ToolStats
) -> ToolSpec:
    category: str = step.get("category") or "other"
    heavy = step.get("cpu_heavy")
    cpu_heavy: bool = category in CPU_HEAVY_CATEGORIES if heavy is None else heavy
    source: ToolSource
    if step.get("duration_s") is not None:
        duration, source = float(step["duration_s"]), "measured"
    elif step.get("duration_est_s") is not None:
        duration, source = float(step["duration_est_s"]), "estimated"
    else:
        # Seeded per (seed, trajectory, step), not from a shared stream: the draw must not depend
        # on which other trajectories were sampled or in which order. A str seed hashes with
        # SHA-512, so it is stable across processes (unlike hash()).
        rng = random.Random(f"{config.seed}/{traj_id}/{index}")
        duration, source = stats.sample(category, rng), "sampled"
    return ToolSpec(category, cpu_heavy, duration * config.time_scale, source)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
