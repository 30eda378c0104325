"""Workload families for `mars traces synth`: trace files (the `../shared/traces` format) that
each stress one of mars's mechanisms, drawn from stated distributions, deterministic per seed.

- `swe-longctx`: SWE-bench sessions with long-context ones mixed in (head-of-line blocking of
  short continuations behind long prefills). Sessions are resampled from a base trace file; a
  fraction LONG_FRACTION of them is replaced by a long-context session: a first prompt drawn
  uniformly from LONG_PROMPT tokens (the 50-150K-token RepoBench / InfiniteBench-style prompts the
  MARS paper, arXiv 2604.26963, mixes in), then LONG_TURNS follow-up calls, each adding a tool
  observation of 200-2,000 tokens and answering 100-500 tokens, with `view`/`search` tools of
  0.2-2 s.
- `cpu-heavy`: resampled SWE-bench sessions whose CPU-heavy steps (`test`, `run_python`,
  `build_install`) become test and build runs of seconds to minutes: log-normal with median
  HEAVY_MEDIAN_S and log-sd HEAVY_SIGMA, clipped to HEAVY_RANGE_S (pytest suites and package
  builds of SWE-bench repositories run in this range; the shared traces' own measured runs are
  mostly under 10 s). Every other step keeps its recorded fields.
- `short-tool`: BFCL-like function-calling sessions (the Berkeley Function Calling Leaderboard's
  multi-turn category): a first prompt of 1-3K tokens (function documentation and the query),
  3-8 calls, each adding 100-400 tokens of tool result and answering 20-150 tokens, with tools of
  0.1-1 s that hold no core.

Bursts are not a trace: `--arrival bursts` (mars.sim.arrivals) launches any trace file's
sessions in groups at one instant.

Draws are uniform unless stated; every session draws from its own stream, seeded by (family,
seed, index), so that a file's first N sessions do not depend on N.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mars.core.errors import UsageError
from mars.sim.workload import CPU_HEAVY_CATEGORIES, load_trajectories

LONG_FRACTION = 0.2
LONG_PROMPT = (50_000, 150_000)
LONG_TURNS = (2, 4)  # follow-up calls after the long first prompt
HEAVY_MEDIAN_S, HEAVY_SIGMA, HEAVY_RANGE_S = 20.0, 1.0, (2.0, 300.0)

Record = dict[str, Any]


def _llm(prompt: int, output: int) -> Record:
    return {"kind": "llm", "prompt_tokens": prompt, "output_tokens": output}


def _tool(category: str, duration_s: float, heavy: bool = False) -> Record:
    return {
        "kind": "tool",
        "tool_name": "bash",
        "category": category,
        "cpu_heavy": heavy,
        "duration_s": round(duration_s, 3),
    }


def _synthetic(family: str, seed: int, i: int, steps: list[Record], source: str) -> Record:
    return {
        "traj_id": f"synth-{family}/seed{seed}/{i:05d}",
        "framework": "synthetic",
        "model": "none",
        "benchmark": source,
        "instance_id": f"{family}-{i:05d}",
        "steps": steps,
    }


def _conversation(
    rng: random.Random,
    first: tuple[int, int],
    turns: tuple[int, int],
    observation: tuple[int, int],
    output: tuple[int, int],
    tool: Callable[[random.Random], Record],
) -> list[Record]:
    """A session whose every call resends the whole context: the previous prompt, its answer
    and the tool's observation."""
    prompt, calls = rng.randint(*first), 1 + rng.randint(*turns)
    steps: list[Record] = []
    for call in range(calls):
        answer = rng.randint(*output)
        steps.append(_llm(prompt, answer))
        if call < calls - 1:
            steps.append(tool(rng))
            prompt += answer + rng.randint(*observation)
    return steps


def long_context(rng: random.Random) -> list[Record]:
    return _conversation(
        rng, LONG_PROMPT, LONG_TURNS, (200, 2_000), (100, 500),
        lambda r: _tool(r.choice(("view", "search")), r.uniform(0.2, 2.0)),
    )  # fmt: skip


def short_tool(rng: random.Random) -> list[Record]:
    return _conversation(
        rng, (1_000, 3_000), (2, 7), (100, 400), (20, 150),
        lambda r: _tool("other", r.uniform(0.1, 1.0)),
    )  # fmt: skip


def heavier_tools(steps: Sequence[Record], rng: random.Random) -> list[Record]:
    out = []
    for step in steps:
        if step.get("kind") == "tool" and step.get("category") in CPU_HEAVY_CATEGORIES:
            draw = rng.lognormvariate(math.log(HEAVY_MEDIAN_S), HEAVY_SIGMA)
            low, high = HEAVY_RANGE_S
            step = {**step, "cpu_heavy": True, "duration_s": round(min(max(draw, low), high), 3)}
            step.pop("duration_est_s", None)
        out.append(dict(step))
    return out


FAMILIES = ("swe-longctx", "cpu-heavy", "short-tool")


def synthesize(family: str, sessions: int, seed: int, base: str | Path | None) -> list[Record]:
    """`sessions` trajectories of `family`; the SWE-bench ones are resampled from `base`."""
    if family not in FAMILIES:
        raise UsageError(
            f"unknown --family {family!r}; valid: {', '.join(FAMILIES)} "
            "(bursts are an arrival mode: `mars sim --arrival bursts`)"
        )
    if sessions < 1:
        raise UsageError(f"--sessions must be at least 1, got {sessions}")
    pool: list[Record] = []
    if family != "short-tool":
        if base is None:
            raise UsageError(f"--family {family} resamples SWE-bench sessions: give --traces FILE")
        pool = load_trajectories(base)
    out = []
    for i in range(sessions):
        rng = random.Random(f"synth/{family}/{seed}/{i}")
        if family == "short-tool":
            out.append(_synthetic(family, seed, i, short_tool(rng), "BFCL-like (synthetic)"))
        elif family == "swe-longctx" and rng.random() < LONG_FRACTION:
            out.append(_synthetic(family, seed, i, long_context(rng), "long-context (synthetic)"))
        else:
            picked = rng.choice(pool)
            steps = picked["steps"]
            if family == "cpu-heavy":
                steps = heavier_tools(steps, rng)
            # A resampled session is its own trajectory: drawn twice, it must not share KV.
            out.append({**picked, "traj_id": f"{picked['traj_id']}#{family}/{seed}/{i}",
                        "steps": steps})  # fmt: skip
    return out


def write_family(records: Sequence[Record], out: str | Path) -> Path:
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"--out {path} is a directory; give a file name (JSONL)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
    return path
