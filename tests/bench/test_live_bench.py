"""`mars bench` end to end, for real: a fresh `mars serve` subprocess, the replay agents, and
results.json / report.md with the keys `mars sweep` writes; bad input is one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from factories import TRACES
from mars.bench.liveserver import unsafe_tools
from test_cli import RESULT_KEYS

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not TRACES.is_file(), reason=f"no trace file at {TRACES}")


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mars", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bench_writes_results_and_report(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", exc_type=ImportError)
    out = tmp_path / "out"
    proc = bench(
        "--traces", str(TRACES), "--policies", "fcfs", "--sessions", "2", "--concurrency", "2",
        "--token-scale", "0.005", "--time-scale", "0.01", "--client-tools", "--kv-tokens", "4096",
        "--events", "--out", str(out), *unsafe_tools(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (result,) = json.loads((out / "results.json").read_text())
    for key, sub in RESULT_KEYS.items():
        assert key in result, key
        if sub is not None:
            assert sub <= set(result[key]), (key, result[key])
    assert result["executor"] == "llamacpp" and result["policy"] == "fcfs"
    assert result["completed"] == 2 and result["failed"] == 0
    assert result["kv"]["hit_rate"] > 0  # prompts grew by appending: the server reused them
    assert all(s["ideal_s"] > 0 and s["slowdown"] > 0 for s in result["per_session"])
    assert result["workload"]["concurrency"] == 2 and result["concurrency"] == 2
    report = (out / "report.md").read_text()
    assert report.startswith("# mars bench") and "| fcfs | 2 |" in report
    assert (out / "latency.png").is_file() and list(out.glob("serve-*.log"))
    assert "idle server: prefill" in proc.stdout
    (stream,) = out.glob("events-01-fcfs-seed0.jsonl")  # --events: the run's event stream
    events = [json.loads(line) for line in stream.read_text().splitlines()]
    done = {e["session_id"] for e in events if e["event"] == "session_done"}
    assert {s["session_id"] for s in result["per_session"]} <= done


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--traces", "nope.jsonl", "--policies", "fcfs", "--rate", "1"], "not found"),
        (["--policies", "nosuch", "--rate", "1"], "nosuch"),
        (["--policies", "fcfs", "--load", "0.8", "--sessions", "1"], "--load needs"),
        (["--policies", "fcfs", "--rate", "1", "--engine-cpus", "0"], "together"),
        (["--policies", "fcfs", "--rate", "0"], "--rate"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    if "--traces" not in args:
        args = ["--traces", str(TRACES), *args]
    proc = bench(*args, "--client-tools", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mars: error:") and message in lines[0], lines
    assert not (tmp_path / "out" / "results.json").exists()
