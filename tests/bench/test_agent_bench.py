"""`mars bench --agents miniswe` end to end: real mini-swe-agent agents on seeded builtin tasks
against a fresh `mars serve`, their commands real processes through the tools API; and the task
generator (seeded, each task fixable by its one-line fix) and the command's input checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mars.agents.tasks import generate_tasks, load_tasks, write_tasks
from mars.bench.liveserver import unsafe_tools
from mars.core.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
# Each family's bug and its fix (tests/bench only: the agents are not told).
FIXES = {
    "(len(values) + 1)": "len(values)",
    "max(x, hi)": "min(x, hi)",
    "n % 2 == 1": "n % 2 == 0",
    "range(1, n)": "range(1, n + 1)",
    '"".join': '" ".join',
    "+ 23": "+ 32",
}


def bench(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mars", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else os.environ | env,
    )


def check(task_repo: Path, command: str) -> int:
    return subprocess.run(command, shell=True, cwd=task_repo, capture_output=True).returncode


def test_builtin_tasks_are_seeded_and_each_fails_until_its_one_line_fix(tmp_path: Path) -> None:
    assert generate_tasks(6, 3) == generate_tasks(6, 3)
    assert generate_tasks(6, 3) != generate_tasks(6, 4)
    tasks = write_tasks(generate_tasks(6, 3), tmp_path)
    loaded = load_tasks(tmp_path)
    assert [(t.task_id, t.statement, t.check, t.repo) for t in loaded] == [
        (t.task_id, t.statement, t.check, t.repo) for t in tasks
    ]
    families = set()
    for task in tasks:
        assert task.repo is not None and check(task.repo, task.check) != 0, task.task_id
        (module,) = [p for p in task.repo.glob("*.py") if not p.name.startswith("test_")]
        code = module.read_text()
        (bug,) = [b for b in FIXES if b in code]
        families.add(bug)
        module.write_text(code.replace(bug, FIXES[bug]))
        assert check(task.repo, task.check) == 0, (task.task_id, module.read_text())
    assert len(families) == 6  # six tasks: every family once


def test_a_bad_tasks_directory_says_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a directory"):
        load_tasks(tmp_path / "nope")
    with pytest.raises(UsageError, match=r"no \*/task\.json"):
        load_tasks(tmp_path)
    (tmp_path / "t1").mkdir()
    (tmp_path / "t1" / "task.json").write_text('{"id": "t1"}')
    with pytest.raises(UsageError, match="id, statement and check"):
        load_tasks(tmp_path)
    (tmp_path / "t1" / "task.json").write_text('{"id": "t1", "statement": "s", "check": "true"}')
    with pytest.raises(UsageError, match="no repo/ folder"):
        load_tasks(tmp_path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--agents", "openhands", "--tasks", "builtin", "--kv-tokens", "4096"], "8192 or more"),
        (["--agents", "miniswe"], "--tasks"),
        (["--agents", "miniswe", "--tasks", "builtin", "--rate", "1"], "--rate is for trace"),
        (["--agents", "miniswe", "--tasks", "nope-dir"], "not a directory"),
        (["--agents", "nosuch", "--tasks", "builtin"], "miniswe"),
        ([], "--traces FILE"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    proc = bench(*args, "--policies", "fcfs", "--unsafe-tools", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mars: error:") and message in lines[0], lines
    assert not (tmp_path / "out" / "results.json").exists()


# LiteLLM's TypedDicts, built by pydantic when the first call is made: not ours to fix.
@pytest.mark.filterwarnings("ignore:.*`ReadOnly` qualifier:UserWarning")
def test_openhands_without_its_venv_says_how_to_make_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-venv")
    proc = bench(
        "--agents", "openhands", "--tasks", "builtin", "--policies", "fcfs",
        "--out", str(tmp_path / "out"), env={"MARS_OPENHANDS_VENV": missing},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{missing}" in proc.stderr and "scripts/setup_openhands.sh" in proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def test_real_agents_run_tasks_with_real_tool_runs(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", exc_type=ImportError)
    # Through mars's adapter, which silences mini-swe-agent's banner before importing it.
    pytest.importorskip(
        "mars.agents.miniswe", reason="mini-swe-agent is not installed (agents extra)"
    )
    out = tmp_path / "out"
    proc = bench(
        "--agents", "miniswe", "--tasks", "builtin", "--agents-per-run", "2", "--task-count", "2",
        "--step-limit", "2", "--max-tokens", "24", "--policies", "fcfs", "--seeds", "5",
        "--events", "--out", str(out), *unsafe_tools(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (result,) = json.loads((out / "results.json").read_text())
    assert result["policy"] == "fcfs" and result["workload"]["framework"] == "miniswe"
    assert result["completed"] == 2 and result["failed"] == 0, result["errors"]
    tasks = result["tasks"]
    assert [t["task_id"] for t in tasks] == [t.task_id for t in load_tasks(out / "tasks-seed5")]
    for t in tasks:
        assert t["task_s"] > 0 and t["end_s"] > t["start_s"] >= 0
        assert t["llm_calls"] == 2  # the step limit; format errors are calls too
        assert t["exit_status"] in ("LimitsExceeded", "Submitted", "RepeatedFormatError")
        assert len(t["commands"]) >= t["tool_runs"]  # what the model ran, kept
    assert sum(t["tool_runs"] for t in tasks) >= 1 and result["cpu"]["tool_runs"] >= 1
    assert result["task_time_s"]["p95"] >= result["task_time_s"]["mean"] > 0
    # The server saw each task as one session: its calls, and its commands started as processes
    # (the agent's runs and the check after them; a turn without a command still ends a tool
    # phase, so tool_end may count more).
    (stream,) = out.glob("events-01-fcfs-seed5.jsonl")
    events = [json.loads(line) for line in stream.read_text().splitlines()]
    emits = Counter(e["session_id"] for e in events if e["event"] == "request_emit")
    runs = Counter(e["session_id"] for e in events if e["event"] == "tool_start")
    for t in tasks:
        assert emits[t["session_id"]] == t["llm_calls"]
        assert runs[t["session_id"]] == t["tool_runs"] + 1  # + the check
    report = (out / "report.md").read_text()
    assert report.startswith("# mars bench: real agents") and "| fcfs | 2 |" in report
    assert (out / "task_time.png").is_file() and (out / "task_time_cdf.png").is_file()
    assert "fcfs seed 5: 2 tasks, task time mean" in proc.stdout
