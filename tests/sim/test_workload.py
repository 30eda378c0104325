"""Trace files -> sessions: the reuse rule, scaling, tool durations, sampling, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from mars.core.errors import UsageError
from mars.sim.toolstats import CategoryStats, ToolStats
from mars.sim.workload import SessionSpec, WorkloadConfig, build_workload, load_trajectories

TRACES = Path(__file__).resolve().parents[2] / ".." / "shared" / "traces" / "traces.jsonl"
# Uniform on [0, 100] s for every category: sampled draws are easy to tell apart and bound.
UNIFORM = ToolStats((0.0, 1.0), {"all": CategoryStats(count=100, quantiles=(0.0, 100.0))})


def llm(prompt: object, output: object, **extra: Any) -> dict[str, Any]:
    return {"kind": "llm", "prompt_tokens": prompt, "output_tokens": output, **extra}


def tool(**fields: Any) -> dict[str, Any]:
    return {"kind": "tool", "category": "view", "cpu_heavy": False, **fields}


def traj(traj_id: str, *steps: dict[str, Any]) -> dict[str, Any]:
    return {"traj_id": traj_id, "steps": list(steps)}


def write(tmp_path: Path, *lines: object, name: str = "traces.jsonl") -> Path:
    path = tmp_path / name
    text = (line if isinstance(line, str) else json.dumps(line) for line in lines)
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def one(tmp_path: Path, *steps: dict[str, Any], **config: Any) -> SessionSpec:
    path = write(tmp_path, traj("a/b/t0", *steps))
    (session,) = build_workload(path, WorkloadConfig(**config), UNIFORM)
    return session


def test_reuse_when_history_is_appended(tmp_path: Path) -> None:
    s = one(tmp_path, llm(100, 10), tool(duration_s=1.0), llm(110, 5), tool(duration_s=1.0),
            llm(200, 7))  # fmt: skip
    assert [t.reuse_tokens for t in s.turns] == [0, 110, 115]
    assert [t.new_prompt_tokens for t in s.turns] == [100, 0, 85]
    assert s.max_context == 207 and s.total_output_tokens == 22


def test_reuse_when_history_is_rewritten(tmp_path: Path) -> None:
    # 105 < 100+10: elided history, only the first prompt (system + task) is a prefix;
    # 80 < 105+5 and < prompt_0: the reusable part cannot exceed the prompt itself.
    s = one(tmp_path, llm(100, 10), llm(105, 5), llm(80, 5), llm(85, 1))
    assert [t.reuse_tokens for t in s.turns] == [0, 100, 80, 85]


def test_token_scale_rounds_with_floor_of_one_before_the_reuse_rule(tmp_path: Path) -> None:
    s = one(tmp_path, llm(0, 1), llm(30, 4), token_scale=0.1)
    assert [(t.prompt_tokens, t.output_tokens) for t in s.turns] == [(1, 1), (3, 1)]
    # Unscaled, 110 < 100+11 is a rewrite (reuse 100 -> 10 once scaled); scaled first, 11 >= 10+1
    # appends and reuses 11. The design scales every count first.
    s = one(tmp_path, llm(100, 11), llm(110, 3), token_scale=0.1)
    assert [t.reuse_tokens for t in s.turns] == [0, 11]


def test_tool_duration_prefers_measured_then_estimated_then_sampled(tmp_path: Path) -> None:
    s = one(tmp_path, llm(10, 1), tool(duration_s=2.0, duration_est_s=5.0),
            tool(duration_s=None, duration_est_s=5.0), tool(), llm(20, 1))  # fmt: skip
    measured, estimated, sampled = s.turns[0].tools
    assert (measured.source, measured.duration_s) == ("measured", 2.0)
    assert (estimated.source, estimated.duration_s) == ("estimated", 5.0)
    assert sampled.source == "sampled" and 0.0 <= sampled.duration_s <= 100.0
    assert s.turns[1].tools == ()


def _sampled(tmp_path: Path, seed: int, sessions: int | None = None) -> dict[str, list[float]]:
    records = [
        traj(f"t{i}", llm(10, 1), tool(), tool(category="test"), llm(11, 1)) for i in range(6)
    ]
    path = write(tmp_path, *records)
    sessions_ = build_workload(path, WorkloadConfig(sessions=sessions, seed=seed), UNIFORM)
    return {s.traj_id: [x.duration_s for x in s.turns[0].tools] for s in sessions_}


def test_sampled_durations_are_deterministic_per_seed_and_differ_across_seeds(
    tmp_path: Path,
) -> None:
    a, b, c = _sampled(tmp_path, 1), _sampled(tmp_path, 1), _sampled(tmp_path, 2)
    assert a == b
    assert all(a[t] != c[t] for t in a)
    assert len({d for ds in a.values() for d in ds}) == 12  # every step gets its own draw


def test_sampled_duration_does_not_depend_on_which_others_are_sampled(tmp_path: Path) -> None:
    everything, some = _sampled(tmp_path, 3), _sampled(tmp_path, 3, sessions=2)
    assert all(everything[t] == some[t] for t in some)


def test_time_scale_multiplies_every_kind_of_duration(tmp_path: Path) -> None:
    steps = (llm(10, 1), tool(duration_s=2.0), tool(duration_est_s=3.0), tool(), llm(11, 1))
    base = one(tmp_path, *steps)
    double = one(tmp_path, *steps, time_scale=2.0)
    assert [2 * t.duration_s for t in base.turns[0].tools] == [
        t.duration_s for t in double.turns[0].tools
    ]
    assert one(tmp_path, *steps, time_scale=0.0).total_tool_time_s == 0.0


def test_sampling_is_without_replacement_and_seeded(tmp_path: Path) -> None:
    path = write(tmp_path, *(traj(f"t{i}", llm(10, 1)) for i in range(10)))
    full = build_workload(path, WorkloadConfig(sessions=10, seed=5))
    assert sorted(s.traj_id for s in full) == sorted(f"t{i}" for i in range(10))
    assert [s.session_id for s in full] == [f"s{i:04d}" for i in range(10)]
    assert full == build_workload(path, WorkloadConfig(seed=5))  # None: all, same seeded order
    four = build_workload(path, WorkloadConfig(sessions=4, seed=5))
    assert four == build_workload(path, WorkloadConfig(sessions=4, seed=5))
    assert len({s.traj_id for s in four}) == 4
    orders = {
        tuple(s.traj_id for s in build_workload(path, WorkloadConfig(seed=k))) for k in (1, 2)
    }
    assert len(orders) == 2


def test_too_many_sessions_says_how_many_the_file_has(tmp_path: Path) -> None:
    path = write(tmp_path, *(traj(f"t{i}", llm(10, 1)) for i in range(3)))
    with pytest.raises(UsageError, match="3 trajectories"):
        build_workload(path, WorkloadConfig(sessions=4))


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ({"steps": [llm(1, 1)]}, "missing field 'traj_id'"),
        ({"traj_id": "x"}, "missing field 'steps'"),
        (traj("x", llm(1, 1), {"kind": "think"}), "unknown kind 'think'"),
        (traj("x", {"kind": "llm", "output_tokens": 1}), "prompt_tokens"),
        (traj("x", llm(1, -1)), "output_tokens"),
        (traj("x", llm(1.5, 1)), "prompt_tokens"),
        (traj("x", llm("7", 1)), "prompt_tokens"),
        (traj("x", llm(True, 1)), "prompt_tokens"),
        (traj("x", tool(duration_s=1.0)), "no llm step"),
        (traj("x", llm(1, 1), tool(duration_s=-0.5)), "duration_s"),
        (traj("x", llm(1, 1), tool(duration_est_s=-1)), "duration_est_s"),
    ],
)
def test_bad_line_is_named_by_file_and_line(tmp_path: Path, line: object, says: str) -> None:
    path = write(tmp_path, traj("ok", llm(1, 1)), "", line, traj("ok2", llm(1, 1)))
    with pytest.raises(UsageError) as err:
        load_trajectories(path)
    assert f"{path} line 3: " in str(err.value) and says in str(err.value)


def test_missing_and_empty_files_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        load_trajectories(tmp_path / "nope.jsonl")
    with pytest.raises(UsageError, match="empty"):
        load_trajectories(write(tmp_path, "", "  "))
    with pytest.raises(UsageError, match=r"record 1: .*no llm step"):
        build_workload([traj("a", llm(1, 1)), traj("b")], WorkloadConfig())


def test_other_trace_files_with_extra_fields_work_unchanged(tmp_path: Path) -> None:
    steps = [
        {"kind": "tool", "duration_s": 9.0},  # before the first call: ignored
        {"kind": "llm", "prompt_tokens": 50, "output_tokens": 5, "latency_ms": 3, "x": [1]},
        {"kind": "tool", "category": "test", "duration_s": 1.0, "host": "n1"},  # no cpu_heavy
        {"kind": "tool", "duration_est_s": 0.5},  # no category either
        {"kind": "llm", "prompt_tokens": 60, "output_tokens": 5},
    ]
    record = {"traj_id": "fleet-7:run#2", "steps": steps, "tenant": "acme", "api_calls": None}
    (s,) = build_workload(write(tmp_path, record, name="mine.jsonl"), WorkloadConfig())
    assert s.traj_id == "fleet-7:run#2" and len(s.turns) == 2
    test_tool, other_tool = s.turns[0].tools
    assert (test_tool.category, test_tool.cpu_heavy) == ("test", True)
    assert (other_tool.category, other_tool.cpu_heavy, other_tool.source) == (
        "other",
        False,
        "estimated",
    )
    assert s.total_tool_time_s == 1.5


def test_tool_stats_fall_back_to_the_pool_for_rare_and_unknown_categories() -> None:
    stats = ToolStats.default()
    assert stats.resolve("other") == "all"  # 6 samples < min_count
    assert stats.resolve("no-such-category") == "all"
    assert stats.resolve("test") == "test"
    draw = stats.sample("no-such-category", random.Random(4))
    assert draw == stats.sample("all", random.Random(4))


def test_sampled_mean_matches_the_table() -> None:
    stats = ToolStats.default()
    table = stats.to_json()["categories"]
    for category in ("all", "test", "run_python", "view", "build_install"):
        rng = random.Random(11)
        draws = [stats.sample(category, rng) for _ in range(40_000)]
        assert sum(draws) / len(draws) == pytest.approx(stats.mean(category), rel=0.05)
        # The tail points of the grid keep the interpolated mean near the measured mean.
        assert stats.mean(category) == pytest.approx(table[category]["mean"], rel=0.15)
        assert min(draws) >= table[category]["quantiles"][0]


def test_tool_stats_file_round_trips_and_rejects_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(ToolStats.default().to_json()), encoding="utf-8")
    loaded = ToolStats.from_file(path)
    assert loaded.sample("test", random.Random(1)) == ToolStats.default().sample(
        "test", random.Random(1)
    )
    good = ToolStats.default().to_json()
    bad_tables: list[object] = [
        "{", [], {**good, "categories": {"test": good["categories"]["test"]}},
        {**good, "probabilities": good["probabilities"][::-1]},
        {**good, "categories": {"all": {"count": 5, "quantiles": [1.0, 0.5]}}},
    ]  # fmt: skip
    for table in bad_tables:
        path.write_text(table if isinstance(table, str) else json.dumps(table), encoding="utf-8")
        with pytest.raises(UsageError, match=str(path)):
            ToolStats.from_file(path)
    with pytest.raises(UsageError, match="not found"):
        ToolStats.from_file(tmp_path / "missing.json")


def test_tool_stats_override_changes_sampled_durations(tmp_path: Path) -> None:
    path = write(tmp_path, traj("t", llm(10, 1), tool(), llm(11, 1)))
    slow = ToolStats((0.0, 1.0), {"all": CategoryStats(100, (1000.0, 1000.0))})
    (s,) = build_workload(path, WorkloadConfig(), slow)
    assert s.turns[0].tools[0].duration_s == 1000.0


@pytest.mark.skipif(not TRACES.is_file(), reason="shared traces not present")
def test_the_shared_traces_load() -> None:
    sessions = build_workload(TRACES, WorkloadConfig())
    assert len(sessions) == 832 == len({s.session_id for s in sessions})
    assert len({s.traj_id for s in sessions}) == 832
    sources = {tool.source for s in sessions for turn in s.turns for tool in turn.tools}
    assert sources == {"measured", "estimated", "sampled"}
    for s in sessions:
        assert s.turns[0].reuse_tokens == 0
        assert all(0 <= t.reuse_tokens <= t.prompt_tokens for t in s.turns)
    prompt = sum(s.total_prompt_tokens for s in sessions)
    assert 0.5 < sum(s.total_reuse_tokens for s in sessions) / prompt < 1.0
