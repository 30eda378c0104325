"""The `mars` console script, run for real in a subprocess: output, result JSON, bad input.

Every bad input must end with exit status 2 and exactly one stderr line, `mars: error: ...`, that
names what to fix; never a traceback.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from factories import TRACES, write_traces

ROOT = Path(__file__).resolve().parents[1]
TRACE_ARG = os.path.relpath(TRACES, ROOT)  # "../shared/traces/traces.jsonl", as a user types it
TRACE_COUNT = (
    sum(1 for line in TRACES.read_text().splitlines() if line.strip()) if TRACES.is_file() else 0
)
pytestmark = pytest.mark.skipif(not TRACES.is_file(), reason=f"no trace file at {TRACES}")

# DESIGN.md section 5: the keys every result JSON has (extra keys are allowed).
RESULT_KEYS: dict[str, set[str] | None] = {
    "policy": None,
    "executor": None,
    "workload": None,
    "sessions": None,
    "completed": None,
    "rejected": None,
    "latency_s": {"mean", "p50", "p90", "p95", "p99"},
    "slowdown": {"mean", "p50", "p95"},
    "goodput": {"alpha", "fraction", "per_s"},
    "throughput": {"sessions_per_s", "steady_sessions_per_s", "output_tokens_per_s"},
    "kv": {"recomputed_prefill_tokens", "hit_rate", "evictions", "offloads", "restores"},
    "cpu": {"mean_tool_queue_wait_s", "utilization"},
    "wall_s": None,
}


def mars(*args: str, stderr: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mars", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=120,
    )


def sim(*args: str, stderr: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return mars("sim", "--policy", "fcfs", *args, stderr=stderr)


def check_result_json(result: dict[str, Any]) -> None:
    missing = set(RESULT_KEYS) - set(result)
    assert not missing, f"result JSON lacks {sorted(missing)}"
    for key, sub in RESULT_KEYS.items():
        if sub is not None:
            assert sub <= set(result[key]), f"{key} lacks {sorted(sub - set(result[key]))}"
    assert result["executor"] == "sim"
    assert isinstance(result["workload"], dict)
    assert result["completed"] + result["rejected"] <= result["sessions"]


# ---- happy paths -----------------------------------------------------------------------------


def test_sim_closed_loop_prints_summary_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = sim("--traces", TRACE_ARG, "--concurrency", "8", "--sessions", "10", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("policy fcfs")
    for prefix in ("latency s", "slowdown", "goodput", "kv"):
        assert any(line.startswith(prefix) for line in lines), f"no {prefix!r} line:\n{proc.stdout}"
    result = json.loads(out.read_text())
    check_result_json(result)
    assert result["policy"] == "fcfs"
    assert result["sessions"] == 10
    assert result["completed"] + result["rejected"] == 10
    assert result["workload"]["concurrency"] == 8


def test_sim_open_loop_fixed_rate(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = sim(
        "--traces",
        TRACE_ARG,
        "--rate",
        "0.05",
        "--arrival",
        "fixed",
        "--sessions",
        "6",
        "--token-scale",
        "0.2",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("policy fcfs")
    assert "rate 0.05/s (fixed)" in proc.stdout.splitlines()[0]
    result = json.loads(out.read_text())
    check_result_json(result)
    assert result["workload"]["rate"] == 0.05
    assert result["workload"]["arrival"] == "fixed"


def test_no_progress_bar_escape_codes_without_a_terminal() -> None:
    proc = sim("--traces", TRACE_ARG, "--concurrency", "4", "--sessions", "5")
    assert proc.returncode == 0, proc.stderr
    for stream in (proc.stdout, proc.stderr):
        assert "\r" not in stream and "\x1b" not in stream, repr(stream[-300:])
    assert proc.stderr == ""


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_progress_bar_only_on_a_terminal_and_not_with_no_progress() -> None:
    """The control for the test above: the bar exists, on a terminal, unless --no-progress."""
    import fcntl
    import termios

    args = ("--traces", TRACE_ARG, "--concurrency", "4", "--sessions", "5")
    seen = {}
    for extra in ((), ("--no-progress",)):
        master, slave = os.openpty()
        # A fresh pty is 0 columns wide, and in that tqdm draws nothing.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        try:
            proc = sim(*args, *extra, stderr=slave)
            os.close(slave)
            chunks = []
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the writer side is closed and drained
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(master)
        assert proc.returncode == 0
        seen[extra] = b"".join(chunks).decode(errors="replace")
    assert "\r" in seen[()] and "simulating" in seen[()]
    assert seen[("--no-progress",)] == ""


def test_policies_lists_fcfs() -> None:
    proc = mars("policies")
    assert proc.returncode == 0, proc.stderr
    assert "fcfs" in proc.stdout.split()


def test_costmodel_json_is_one_object_on_stdout() -> None:
    proc = mars(
        "costmodel",
        "--gpu",
        "h100",
        "--model",
        "qwen3-coder-30b-a3b",
        "--decode",
        "8",
        "--context",
        "4096",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert len(proc.stdout.strip().splitlines()) == 1
    out = json.loads(proc.stdout)
    assert isinstance(out, dict)
    assert out["step_s"] > 0


# ---- bad input -------------------------------------------------------------------------------


def _bad_files(tmp: Path) -> dict[str, str]:
    ok = {"traj_id": "a", "steps": [{"kind": "llm", "prompt_tokens": 5, "output_tokens": 2}]}
    bad_json = tmp / "bad_json.jsonl"
    bad_json.write_text(json.dumps(ok) + "\n" + json.dumps(ok) + "\n{oops\n")
    no_steps = tmp / "no_steps.jsonl"
    no_steps.write_text(json.dumps(ok) + "\n" + json.dumps({"traj_id": "b"}) + "\n")
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    shape = tmp / "shape.json"  # hidden_size and the rest are missing
    shape.write_text(json.dumps({"name": "tiny", "num_layers": 4}))
    directory = tmp / "a_directory"
    directory.mkdir()
    files = {"bad_json": bad_json, "no_steps": no_steps, "empty": empty, "shape": shape}
    return {"dir": str(directory)} | {k: str(v) for k, v in files.items()}


T = ["--traces", TRACE_ARG]
CLOSED = [*T, "--policy", "fcfs", "--concurrency", "4", "--sessions", "2"]
QWEN = ["--model", "qwen3-coder-30b-a3b"]


def _traces(name: str) -> list[str]:
    return ["sim", "--traces", "{" + name + "}", "--policy", "fcfs", "--concurrency", "4"]


# Rejected by mars itself: id -> (argv after `mars`, substrings the error line must name).
# "{name}" in argv is a file made by `_bad_files`.
MARS_CASES: dict[str, tuple[list[str], list[str]]] = {
    "missing-trace": (
        ["sim", "--traces", "no/such.jsonl", "--policy", "fcfs", "--concurrency", "4"],
        ["no/such.jsonl"],
    ),
    "dir-trace": (_traces("dir"), ["a_directory"]),
    "bad-json": (_traces("bad_json"), ["bad_json.jsonl", "line 3"]),
    "no-steps": (_traces("no_steps"), ["no_steps.jsonl", "line 2", "steps"]),
    "empty-trace": (_traces("empty"), ["empty"]),
    "unknown-policy": (["sim", *T, "--policy", "nope", "--concurrency", "4"], ["nope", "fcfs"]),
    "unknown-gpu": (["sim", *CLOSED, "--gpu", "a100"], ["a100", "h100", "h200"]),
    "unknown-model": (
        ["sim", *CLOSED, "--model", "gpt-5"],
        ["gpt-5", "qwen3-coder-30b-a3b", "llama-3.1-8b"],
    ),
    "shape-missing-field": (["sim", *CLOSED, "--model", "{shape}"], ["hidden_size"]),
    "too-many-sessions": (
        ["sim", *T, "--policy", "fcfs", "--concurrency", "4", "--sessions", str(TRACE_COUNT + 1)],
        [f"--sessions {TRACE_COUNT + 1}", str(TRACE_COUNT)],
    ),
    "json-no-dir": (["sim", *CLOSED, "--json", "no/such/dir/out.json"], ["no/such/dir"]),
    "costmodel-decode-no-context": (
        ["costmodel", "--gpu", "h100", *QWEN, "--decode", "4"],
        ["--context"],
    ),
    "costmodel-unknown-gpu": (
        ["costmodel", "--gpu", "a100", *QWEN, "--prefill", "10"],
        ["a100", "h100"],
    ),
}


def _argparse_cases() -> dict[str, tuple[list[str], list[str]]]:
    """Rejected by argparse (option types, exclusive groups)."""
    sim_args = ["sim", *T, "--policy", "fcfs"]
    cases = {}
    for flag in ("rate", "concurrency", "sessions", "tool-cores", "token-scale"):
        load = [] if flag in ("rate", "concurrency") else ["--concurrency", "4"]
        for value in ("0", "-1", "-0.5", "abc"):
            cases[f"{flag}={value}"] = ([*sim_args, *load, f"--{flag}", value], [f"--{flag}"])
    cases["rate-and-concurrency"] = (
        [*sim_args, "--rate", "1", "--concurrency", "4"],
        ["--rate", "--concurrency"],
    )
    cases["neither-rate-nor-concurrency"] = (sim_args, ["--rate", "--concurrency"])
    cases["costmodel-zero-prefill"] = (
        ["costmodel", "--gpu", "h100", *QWEN, "--prefill", "0"],
        ["--prefill"],
    )
    cases["costmodel-negative-prefill"] = (
        ["costmodel", "--gpu", "h100", *QWEN, "--prefill", "-3"],
        ["--prefill"],
    )
    return cases


ARGPARSE_CASES = _argparse_cases()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return _bad_files(tmp_path_factory.mktemp("bad"))


def _error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.stdout == "", proc.stdout
    return lines[0]


@pytest.mark.parametrize("case", list(MARS_CASES))
def test_bad_input_is_one_mars_error_line(case: str, bad_files: dict[str, str]) -> None:
    argv, wanted = MARS_CASES[case]
    line = _error_line(mars(*(arg.format(**bad_files) for arg in argv)))
    assert line.startswith("mars: error: "), line
    for word in wanted:
        assert word in line, f"{word!r} not in {line!r}"


@pytest.mark.parametrize("case", list(ARGPARSE_CASES))
def test_bad_option_value_is_one_error_line(case: str) -> None:
    argv, wanted = ARGPARSE_CASES[case]
    line = _error_line(mars(*argv))
    assert line.startswith("mars") and " error: " in line, line
    for word in wanted:
        assert word in line, f"{word!r} not in {line!r}"


def test_bad_option_value_says_mars_error() -> None:
    for case in (
        "rate=0",
        "sessions=abc",
        "neither-rate-nor-concurrency",
        "costmodel-zero-prefill",
    ):
        line = _error_line(mars(*ARGPARSE_CASES[case][0]))
        assert line.startswith("mars: error: "), line


def test_directory_as_trace_file_is_called_a_directory(bad_files: dict[str, str]) -> None:
    line = _error_line(sim("--traces", bad_files["dir"], "--concurrency", "4"))
    assert "not found" not in line and "directory" in line, line


def test_json_into_a_directory_is_a_usage_error(tmp_path: Path) -> None:
    proc = sim(
        "--traces", TRACE_ARG, "--concurrency", "2", "--sessions", "2", "--json", str(tmp_path)
    )
    line = _error_line(proc)
    assert line.startswith("mars: error: ") and str(tmp_path) in line, line


# ---- a trace file it has never seen -------------------------------------------------------


def _unseen_trajectories() -> list[dict[str, Any]]:
    """Six trajectories in the README's format with everything optional varied or left out."""
    records = []
    for i in range(6):
        steps: list[dict[str, Any]] = []
        prompt = 700 + 150 * i
        for k in range(3 + i % 3):
            llm: dict[str, Any] = {
                "kind": "llm",
                "prompt_tokens": prompt,
                "output_tokens": 30 + 7 * k,
                "vendor_latency_ms": 12.5,
                "usage": {"cache": [1, 2]},
            }
            steps.append(llm)
            if k == 1 and i % 2 == 0:
                llm["format_error"] = True  # no tool ran; the agent was prompted again
                prompt += 80
                continue
            tool: dict[str, Any] = {
                "kind": "tool",
                "tool_name": "bash",
                "sandbox": {"id": f"box-{i}"},
                "category": ("test", "view", "edit", "made_up_category")[(i + k) % 4],
            }
            if k % 3 == 0:
                tool["duration_s"] = 0.4  # measured
            elif k % 3 == 1:
                tool["duration_est_s"] = 1.5  # estimated
            # else neither: drawn from the quantile table
            if i == 3:
                tool.pop("category")  # "other"
                tool["cpu_heavy"] = None
            steps.append(tool)
            prompt += 250 if i != 4 else -100  # i == 4 rewrites its history (no prefix reuse)
            prompt = max(prompt, 300)
        steps.append({"kind": "tool", "category": "submit", "duration_s": 0.01})  # trailing tool
        records.append(
            {
                "traj_id": f"myorg/agent-x/task-{17 + i}",
                "team": "blue",
                "score": None,
                "steps": steps,
            }
        )
    return records


@pytest.mark.parametrize(
    "load", [["--concurrency", "3"], ["--rate", "0.5"], ["--rate", "0.2", "--arrival", "fixed"]]
)
def test_unseen_trace_file_works_unchanged(tmp_path: Path, load: list[str]) -> None:
    traces = write_traces(tmp_path / "my traces.jsonl", _unseen_trajectories())
    out = tmp_path / "result.json"
    proc = sim("--traces", str(traces), *load, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("policy fcfs")
    result = json.loads(out.read_text())
    check_result_json(result)
    assert (result["sessions"], result["completed"], result["rejected"]) == (6, 6, 0)
    assert result["latency_s"]["p50"] > 0
    # Same seed, same file: the same simulation.
    again = tmp_path / "again.json"
    assert sim("--traces", str(traces), *load, "--json", str(again)).returncode == 0
    a, b = json.loads(out.read_text()), json.loads(again.read_text())
    for key in ("latency_s", "slowdown", "kv", "sim_time_s"):
        assert a.get(key) == b.get(key), key


def _with_oversized(tmp_path: Path) -> Path:
    records = _unseen_trajectories()
    records.append(
        {
            "traj_id": "myorg/too-long",
            "steps": [
                {"kind": "tool", "category": "view", "duration_s": 0.1},  # before any llm step
                {"kind": "llm", "prompt_tokens": 2_000_000, "output_tokens": 10},
            ],
        }
    )
    path = write_traces(tmp_path / "traces.jsonl", records)
    path.write_text(path.read_text() + "\n\n")  # trailing blank lines
    return path


def test_session_that_never_fits_is_rejected_not_hung(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = sim("--traces", str(_with_oversized(tmp_path)), "--concurrency", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert (result["sessions"], result["completed"], result["rejected"]) == (7, 6, 1)
    assert "rejected 1" in proc.stdout


def test_reusable_rate_bounds_hit_rate_with_a_rejected_session(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = sim("--traces", str(_with_oversized(tmp_path)), "--concurrency", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    kv = json.loads(out.read_text())["kv"]
    assert kv["hit_rate"] <= kv["reusable_rate"] + 1e-9, kv


def test_very_sparse_arrivals_finish() -> None:
    """Arrivals 1e9 s apart: tool jobs then run at clock values where one ulp is ~1e-7 s, which
    once made processor sharing re-arm the same instant forever."""
    proc = sim(
        "--traces",
        TRACE_ARG,
        "--rate",
        "1e-9",
        "--arrival",
        "fixed",
        "--sessions",
        "2",
    )
    assert proc.returncode == 0, proc.stderr
    assert "completed 2" in proc.stdout
