"""`mars sweep`: every (policy, rate, seed) runs once; the report and plots are written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from factories import TRACES
from mars.bench.sweep import unstable

ROOT = Path(__file__).resolve().parents[2]


def sweep(*args: str) -> subprocess.CompletedProcess[str]:
    """`mars sweep` on the shared traces, as a user runs it."""
    cmd = [sys.executable, "-m", "mars", "sweep", "--traces", str(TRACES), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _result(latencies: list[float]) -> dict[str, object]:
    return {
        "per_session": [{"arrival_s": float(i), "latency_s": x} for i, x in enumerate(latencies)]
    }


def test_unstable_when_late_arrivals_wait_much_longer() -> None:
    assert not unstable(_result([10, 10, 10, 11, 11, 11, 12, 12, 12]))
    assert unstable(_result([10, 10, 10, 12, 12, 12, 14, 14, 14]))  # 14 > 1.3 * 10
    assert not unstable(_result([10, 10]))  # too few to tell


@pytest.mark.skipif(not TRACES.exists(), reason="needs ../shared/traces")
def test_sweep_writes_results_report_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    proc = sweep(
        "--policies",
        "fcfs,continuum",
        "--rates",
        "0.01,0.05",
        "--seeds",
        "1,2",
        "--sessions",
        "6",
        "--out",
        str(out),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 2 * 2 * 2
    assert {(r["policy"], r["rate"], r["workload"]["seed"]) for r in results} == {
        (p, r, s) for p in ("fcfs", "continuum") for r in (0.01, 0.05) for s in (1, 2)
    }
    report = (out / "report.md").read_text()
    assert "| continuum | 0.05 |" in report and "Against fcfs" in report
    assert "## Where the time goes" in report
    assert all(r["time_split"]["decode_s"] > 0 for r in results)
    for name in ("latency.png", "goodput.png", "throughput.png", "kv_usage.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_sweep_rejects_an_unknown_policy(tmp_path: Path) -> None:
    proc = sweep("--policies", "fcfs,nope", "--rates", "0.1", "--out", str(tmp_path))
    assert proc.returncode == 2 and "unknown policy 'nope'" in proc.stderr
    assert proc.stderr.count("\n") == 1
