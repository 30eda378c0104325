"""`mars sweep --workers N` and `--ray local`: the same results, in the same order, as one
process; a run's error in a worker is the error of the run in this process."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from factories import TRACES
from mars.bench.pool import open_pool
from mars.bench.sweep import SweepPlan, run_sweep
from mars.core.errors import UsageError
from mars.sim.experiment import SimSpec

ROOT = Path(__file__).resolve().parents[2]
HAS_RAY = importlib.util.find_spec("ray") is not None
needs_traces = pytest.mark.skipif(not TRACES.exists(), reason="needs ../shared/traces")
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="needs ray (pip install 'ray==2.60.0')")
# Capacity's five closed-loop points, then 2 policies x 2 loads x 2 seeds, on 12 sessions.
SMALL = ("--sessions", "12", "--policies", "fcfs,mars", "--loads", "0.5,1.0", "--seeds", "1,2")


def sweep(out: Path, *args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """`mars sweep` on the shared traces, as a user runs it (after `prelude`, if any)."""
    argv = ["sweep", "--traces", str(TRACES), "--out", str(out), "--no-progress", *args]
    code = f"{prelude}\nfrom mars.cli import main\nraise SystemExit(main({argv!r}))"
    cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _numbers(out: Path) -> list[dict[str, Any]]:
    """results.json less each run's wall-clock time, the one field that may differ."""
    results = json.loads((out / "results.json").read_text())
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in results]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one") / "sweep"
    proc = sweep(out, *SMALL, "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    return out


def _assert_same_sweep(out: Path, one: Path) -> None:
    results = _numbers(out)
    assert len(results) == 8 and results == _numbers(one)
    assert [(r["workload"]["seed"], r["load"], r["policy"]) for r in results] == [
        (s, x, p) for s in (1, 2) for x in (0.5, 1.0) for p in ("fcfs", "mars")
    ]
    assert (out / "report.md").read_text() == (one / "report.md").read_text()
    for policy in ("fcfs", "mars"):  # the timelines' events, byte for byte
        events = (out / f"events-{policy}.jsonl").read_bytes()
        assert events and events == (one / f"events-{policy}.jsonl").read_bytes()


@needs_traces
def test_two_workers_give_the_results_of_one_process(tmp_path: Path, one_process: Path) -> None:
    proc = sweep(tmp_path / "sweep", *SMALL, "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    _assert_same_sweep(tmp_path / "sweep", one_process)
    # The capacity curve is printed as each point finishes; all five are there.
    assert proc.stdout.count("fcfs closed loop, concurrency") == 5


@needs_traces
@needs_ray
def test_ray_local_gives_the_results_of_one_process(tmp_path: Path, one_process: Path) -> None:
    proc = sweep(tmp_path / "sweep", *SMALL, "--ray", "local", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    _assert_same_sweep(tmp_path / "sweep", one_process)


def _failing_plan() -> SweepPlan:
    # Accepted when built; each run refuses its arrival process, in whatever process runs it.
    base = SimSpec(str(TRACES), rate=0.1, sessions=4, arrival="uniform")
    return SweepPlan(base, ("fcfs", "mars"), (1,), rates=(0.1, 0.2))


@needs_traces
@pytest.mark.parametrize(
    ("workers", "ray"),
    [(2, None), pytest.param(1, "local", marks=needs_ray, id="ray-local")],
)
def test_an_error_in_a_worker_is_the_error_in_process(workers: int, ray: str | None) -> None:
    with pytest.raises(UsageError) as here:
        run_sweep(_failing_plan())
    with pytest.raises(UsageError) as there, open_pool(workers, ray) as pool:
        assert pool is not None
        run_sweep(_failing_plan(), pool=pool)
    assert str(here.value) == "unknown --arrival 'uniform'; valid: poisson, fixed, bursts"
    assert str(there.value) == str(here.value)


@needs_traces
def test_ray_missing_is_a_one_line_error_naming_the_pin(tmp_path: Path) -> None:
    blocked = "import sys; sys.modules['ray'] = None  # as if not installed"
    proc = sweep(tmp_path / "s", "--policies", "fcfs", "--rates", "0.1", "--ray", "local",
                 prelude=blocked)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == "mars: error: --ray needs Ray: pip install 'ray==2.60.0'\n"


@needs_traces
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--ray", "127.0.0.1:1", "--workers", "2"), "drop --workers"),
        pytest.param(("--ray", "nonsense"), "give HOST:PORT", marks=needs_ray),
        pytest.param(("--ray", "127.0.0.1:1"), "nothing answers there", marks=needs_ray),
    ],
)
def test_bad_ray_options_are_one_line_errors(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    proc = sweep(tmp_path / "s", "--policies", "fcfs", "--rates", "0.1", *args)
    assert proc.returncode == 2 and message in proc.stderr
    assert proc.stderr.startswith("mars: error: ") and proc.stderr.count("\n") == 1
