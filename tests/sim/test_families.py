"""`mars traces synth`: each workload family loads with the trace loader, is the same for a seed,
and has the property its docstring states."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from mars.cli import main
from mars.core.errors import UsageError
from mars.sim.arrivals import BURST_SIZE, arrival_times
from mars.sim.experiment import SimSpec, load_specs, run_experiment
from mars.sim.families import (
    HEAVY_RANGE_S,
    LONG_FRACTION,
    LONG_PROMPT,
    synthesize,
)
from mars.sim.workload import CPU_HEAVY_CATEGORIES

TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "traces.jsonl"


def _synth(tmp_path: Path, family: str, sessions: int, seed: int = 1) -> Path:
    out = tmp_path / f"{family}-{seed}.jsonl"
    args = ["traces", "synth", "--family", family, "--sessions", str(sessions)]
    args += ["--seed", str(seed), "--traces", str(TRACES), "--out", str(out)]
    assert main(args) == 0
    return out


@pytest.mark.parametrize("family", ["swe-longctx", "cpu-heavy", "short-tool"])
def test_a_family_loads_runs_and_is_the_same_for_a_seed(tmp_path: Path, family: str) -> None:
    path = _synth(tmp_path, family, 30)
    specs = load_specs(SimSpec(str(path), rate=1.0))
    assert len(specs) == 30 and len({s.session_id for s in specs}) == 30
    assert path.read_bytes() == _synth(tmp_path / "again", family, 30).read_bytes()
    assert path.read_bytes() != _synth(tmp_path, family, 30, seed=2).read_bytes()
    # The first sessions do not depend on how many are drawn.
    shorter = _synth(tmp_path / "short", family, 10).read_text().splitlines()
    assert shorter == path.read_text().splitlines()[:10]
    r = run_experiment(SimSpec(str(path), policy="mars", gpu="h100-nvl", rate=0.05, sessions=10))
    assert r["completed"] == 10


def test_long_context_sessions_come_at_the_stated_fraction() -> None:
    records = synthesize("swe-longctx", 400, 3, TRACES)
    firsts = [next(s for s in r["steps"] if s["kind"] == "llm")["prompt_tokens"] for r in records]
    long = [p for p in firsts if p >= LONG_PROMPT[0]]
    assert all(p <= LONG_PROMPT[1] for p in long)
    assert abs(len(long) / len(records) - LONG_FRACTION) < 0.06
    # The rest are the shared traces' sessions: none of them opens with 50K tokens.
    assert max(p for p in firsts if p < LONG_PROMPT[0]) < 40_000


def test_cpu_heavy_tools_run_seconds_to_minutes() -> None:
    records = synthesize("cpu-heavy", 60, 1, TRACES)
    heavy = [
        s["duration_s"]
        for r in records
        for s in r["steps"]
        if s["kind"] == "tool" and s.get("category") in CPU_HEAVY_CATEGORIES
    ]
    assert len(heavy) > 100
    assert all(HEAVY_RANGE_S[0] <= d <= HEAVY_RANGE_S[1] for d in heavy)
    assert 10 < sorted(heavy)[len(heavy) // 2] < 40  # median near 20 s
    assert any(d > 60 for d in heavy)


def test_short_tool_sessions_are_short_and_grow_turn_by_turn() -> None:
    for record in synthesize("short-tool", 50, 1, None):
        llm = [s for s in record["steps"] if s["kind"] == "llm"]
        tools = [s for s in record["steps"] if s["kind"] == "tool"]
        assert 3 <= len(llm) <= 8 and len(tools) == len(llm) - 1
        assert 1_000 <= llm[0]["prompt_tokens"] <= 3_000
        assert all(
            b["prompt_tokens"] > a["prompt_tokens"] + a["output_tokens"]
            for a, b in itertools.pairwise(llm)
        )
        assert all(0.1 <= t["duration_s"] <= 1.0 and not t["cpu_heavy"] for t in tools)


def test_bursts_launch_sessions_together_at_the_mean_rate() -> None:
    times = arrival_times(800, rate=0.5, kind="bursts", seed=4)
    assert len(set(times)) == 800 // BURST_SIZE
    assert all(times[i] == times[i - i % BURST_SIZE] for i in range(800))
    assert 0.4 < 800 / times[-1] < 0.6
    assert arrival_times(50, rate=0.5, seed=4) == arrival_times(
        50, rate=0.5, kind="poisson", seed=4
    )


def test_bad_synth_input_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UsageError, match="give --traces FILE"):
        synthesize("cpu-heavy", 5, 0, None)
    with pytest.raises(UsageError, match="bursts are an arrival mode"):
        synthesize("bursts", 5, 0, TRACES)
    out = tmp_path / "dir"
    out.mkdir()
    args = ["traces", "synth", "--family", "short-tool", "--sessions", "3", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a directory" in err
    json.dumps(synthesize("short-tool", 1, 0, None))  # plain JSON
