"""`mars calibrate` on the real embedded engine: a small grid on one thread, fitted within a
stated error bound; the command's table and preset; the tool-load processes and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by ./scripts/setup.sh")

from mars.engine.calibrate import QUICK_GRID, CalibrationSettings, calibrate
from mars.engine.cpuload import cpu_load
from mars.engine.model import Model, default_model_path
from mars.sim.fitted import FittedCostModel, Preset, load_preset

ROOT = Path(__file__).resolve().parents[2]
# The six-term model explains a quiet machine's steps to a few percent; the bound leaves room for
# a machine busy with other work (the shapes it misses by far are measured again).
MEAN_ERROR_BOUND_PCT = 25.0


@pytest.fixture(scope="module")
def preset() -> Iterator[Preset]:
    model = Model(default_model_path())
    settings = CalibrationSettings(threads=1, kv_tokens=2048, repeats=2, grid=QUICK_GRID)
    try:
        yield calibrate(model, settings, {"name": "quick"})[0]
    finally:
        model.close()


def test_small_calibration_fits_within_the_bound(preset: Preset) -> None:
    assert preset.fit.points == len(QUICK_GRID.shapes())
    assert preset.fit.mean_abs_pct_error < MEAN_ERROR_BOUND_PCT, preset.fit
    assert preset.coefficients.c_tok > 0  # every new token costs something
    assert preset.kv_capacity_tokens == 2048 and preset.max_model_len == 2048
    assert 1000 < preset.kv_bytes_per_token < 100_000  # SmolLM2-135M: 22.5 KiB per token
    assert preset.restore_s_per_token > 0 and preset.offload_s_per_token > 0
    assert preset.metadata["threads"] == 1 and preset.metadata["model_file"].endswith(".gguf")


def test_measured_steps_grow_with_the_work(preset: Preset) -> None:
    by_label = {m.label: m.seconds for m in preset.measurements}
    # Side by side in one run: a 64-token chunk takes longer than a 16-token one, 4 decodes
    # longer than 1.
    assert by_label["prefill 64 @ 0"] > by_label["prefill 16 @ 0"]
    assert by_label["decode 4 x 1 @ 200"] > by_label["decode 1 x 1 @ 200"]


def test_fitted_model_predicts_the_measurements(preset: Preset) -> None:
    cost = FittedCostModel(preset)
    for m in preset.measurements:
        assert cost.predict(list(m.batch)).step_s == pytest.approx(
            preset.coefficients.seconds(*m.totals())
        )


def test_cpu_load_starts_and_stops_its_processes() -> None:
    with cpu_load(2, sorted(os.sched_getaffinity(0))[:1]) as pids:
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, 0)  # alive
            assert os.sched_getaffinity(pid) == set(sorted(os.sched_getaffinity(0))[:1])
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _mars(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mars", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_calibrate_command_prints_the_table_and_writes_the_preset(tmp_path: Path) -> None:
    out = tmp_path / "preset.json"
    proc = _mars(
        "calibrate", "--quick", "--threads", "1", "--kv-tokens", "2048", "--repeats", "1",
        "--tool-load", "1", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "measured ms" in proc.stdout and "predicted ms" in proc.stdout
    assert "fit: R²" in proc.stdout and f"wrote {out}" in proc.stdout
    assert "prefill 64 @ 0" in proc.stdout
    preset = load_preset(out)
    assert preset.metadata["tool_load"] == 1
    assert preset.metadata["command"].startswith("mars calibrate --quick")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--engine-cpus", "0-4096"], "no CPU"),
        (["--out", "/nonexistent/dir/p.json"], "existing directory"),
        (["--model", "/nonexistent.gguf"], "not found"),
        (["--kv-tokens", "8", "--quick"], "raise --kv-tokens"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path: Path, args: list[str], needle: str) -> None:
    proc = _mars("calibrate", "--out", str(tmp_path / "p.json"), *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr


def test_tool_load_needs_a_cpu_outside_the_engine(tmp_path: Path) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    spec = f"{cpus[0]}-{cpus[-1]}" if cpus == list(range(cpus[0], cpus[-1] + 1)) else str(cpus[0])
    if len(cpus) > 1 and spec == str(cpus[0]):
        pytest.skip("the allowed CPUs are not one range")
    proc = _mars(
        "calibrate", "--engine-cpus", spec, "--tool-load", "1", "--out", str(tmp_path / "p.json")
    )
    assert proc.returncode == 2 and "leaves no CPU for --tool-load" in proc.stderr, proc.stderr
