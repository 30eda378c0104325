"""`mars bench --agents openhands`: the OpenHands SDK's real agent on seeded tasks, end to end.

Runs only in the OpenHands CI stage (`.ci/openhands`, MARS_OPENHANDS=1), which sets up the SDK's
Python 3.12 venv first: its first prefill (~6,100 tokens of system prompt and tools) takes ~2
minutes on 2 cores, too long for the default test run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    os.environ.get("MARS_OPENHANDS") != "1",
    reason="the OpenHands stage (.ci/openhands, MARS_OPENHANDS=1) runs it",
)


def test_openhands_agents_run_tasks_in_sessions_that_share_their_prompt(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable, "-m", "mars", "bench", "--agents", "openhands", "--tasks", "builtin",
            "--agents-per-run", "1", "--task-count", "2", "--step-limit", "2", "--policies",
            "mars", "--seeds", "3", "--kv-tokens", "16384", "--task-time-limit", "600",
            "--events", "--out", str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1100,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (result,) = json.loads((out / "results.json").read_text())
    assert result["workload"]["framework"] == "openhands"
    assert result["completed"] == 2 and result["failed"] == 0, result["errors"]
    tasks = result["tasks"]
    for t in tasks:
        assert t["end_s"] > t["start_s"] >= 0
        # The SDK's own states; MaxIterationsReached is its step limit.
        assert t["exit_status"] in ("finished", "MaxIterationsReached", "stuck"), t
        assert 1 <= t["llm_calls"] <= 3 and t["steps"] >= 1  # every reply is a tool call
        assert len(t["commands"]) == t["steps"] and t["tool_runs"] <= t["steps"]
        assert (out / "agents-01-mars-seed3" / f"{t['task_id']}.log").is_file()
    assert tasks[1]["start_s"] >= tasks[0]["end_s"]  # one agent: one task after the other
    # Each conversation is one mars session (the SDK's x-litellm-session-id), and the second
    # conversation's ~6,100-token system prompt and tools come from the first one's cache.
    (stream,) = out.glob("events-01-mars-seed3.jsonl")
    events = [json.loads(line) for line in stream.read_text().splitlines()]
    emits = Counter(e["session_id"] for e in events if e["event"] == "request_emit")
    assert {t["session_id"] for t in tasks} == set(emits), emits
    for t in tasks:
        assert emits[t["session_id"]] == t["llm_calls"]
    assert result["kv"]["hit_rate"] > 0.4, result["kv"]
    assert "| mars | 2 |" in (out / "report.md").read_text()
