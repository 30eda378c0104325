"""The fitted cost model: NNLS recovers known coefficients, presets round-trip and fail in one
line, and the simulator runs on a preset (`mars sim --cost-model`), ideal times included."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from factories import TRACES
from mars.core.errors import UsageError
from mars.sim.experiment import (
    SimSpec,
    ideal_times,
    load_specs,
    make_cost_model,
    with_engine_limits,
)
from mars.sim.fit import FitQuality, nnls, quality
from mars.sim.fitted import (
    Coefficients,
    FittedCostModel,
    Measurement,
    Preset,
    fit_coefficients,
    fit_quality,
    load_preset,
    preset_json,
    save_preset,
)
from mars.sim.run import SimConfig

ROOT = Path(__file__).resolve().parents[2]
TRUE = Coefficients(c0=0.004, c_seq=0.003, c_tok=7e-4, c_attn=8e-7, c_kv=2e-6, c_scan=1.5e-6)


def shapes() -> list[tuple[tuple[int, int], ...]]:
    """A calibration-like grid: prefill chunks, decode batches, mixed batches."""
    out: list[tuple[tuple[int, int], ...]] = []
    out += [((n, c),) for n in (16, 128, 512) for c in (0, 1000)]
    out += [((1, c),) * b for b in (1, 2, 4, 8, 16) for c in (100, 1000)]
    out += [((n, 0), *((1, 500),) * b) for n in (32, 128) for b in (4, 8)]
    return out


def measurements(coefficients: Coefficients = TRUE) -> list[Measurement]:
    out = []
    for i, batch in enumerate(shapes()):
        m = Measurement(f"shape {i}", batch, 1.0)
        out.append(replace(m, seconds=coefficients.seconds(*m.totals())))
    return out


def make_preset(**overrides: object) -> Preset:
    ms = measurements()
    base = Preset(
        coefficients=TRUE,
        restore_s_per_token=1.5e-5,
        offload_s_per_token=3.5e-4,
        kv_bytes_per_token=23040.0,
        kv_capacity_tokens=16384,
        max_model_len=8192,
        fit=fit_quality(TRUE, ms),
        metadata={"name": "test", "model_file": "m.gguf", "batch_tokens": 512, "threads": 1},
        measurements=tuple(ms),
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


# ---- fitting -----------------------------------------------------------------------------------


def test_fit_recovers_known_coefficients() -> None:
    got = fit_coefficients(measurements())
    for name in Coefficients.__dataclass_fields__:
        assert math.isclose(getattr(got, name), getattr(TRUE, name), rel_tol=1e-6), name


def test_fit_recovers_a_zero_coefficient_as_zero() -> None:
    truth = replace(TRUE, c_attn=0.0, c_seq=0.0)
    got = fit_coefficients(measurements(truth))
    assert got.c_attn == pytest.approx(0.0, abs=1e-12)
    assert got.c_seq == pytest.approx(0.0, abs=1e-9)
    assert got.c_tok == pytest.approx(truth.c_tok, rel=1e-6)


def test_fit_of_noisy_data_stays_close_and_non_negative() -> None:
    noisy = [
        replace(m, seconds=m.seconds * (1.05 if i % 2 else 0.95))
        for i, m in enumerate(measurements())
    ]
    got = fit_coefficients(noisy)
    assert min(vars(got).values()) >= 0
    assert fit_quality(got, noisy).mean_abs_pct_error < 6


def test_nnls_clamps_what_least_squares_would_make_negative() -> None:
    # Unconstrained: x = (1, -1). With x2 >= 0 the optimum is x2 = 0, x1 = 0.5.
    x = nnls([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [1.0, -1.0, 0.0])
    assert x == pytest.approx([0.5, 0.0])


def test_nnls_survives_collinear_columns() -> None:
    rows = [[1.0, 2.0, float(k)] for k in range(5)]  # column 2 = 2 x column 1
    x = nnls(rows, [3.0 + 0.5 * k for k in range(5)])
    assert sum(r * v for r, v in zip(rows[3], x, strict=True)) == pytest.approx(4.5)


def test_quality_of_a_perfect_fit() -> None:
    q = quality([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert q == FitQuality(1.0, 0.0, 0.0, 3)
    assert quality([1.1, 2.0], [1.0, 2.0]).max_abs_pct_error == pytest.approx(10.0)


# ---- the model ---------------------------------------------------------------------------------


def test_predict_matches_step_seconds_and_coefficients() -> None:
    cost = FittedCostModel(make_preset())
    batch = [(128, 0), (1, 500), (1, 900)]
    step = cost.predict(batch)
    m = Measurement("x", tuple(batch), 1.0)
    assert step.step_s == cost.step_seconds(*m.totals()) == TRUE.seconds(*m.totals())
    assert step.overhead_s == TRUE.c0
    assert cost.predict([]).step_s == 0.0
    assert cost.transfer_seconds(1000) == pytest.approx(1000 * 1.5e-5)
    assert cost.offload_seconds(1000) == pytest.approx(1000 * 3.5e-4)
    with pytest.raises(ValueError):
        cost.transfer_seconds(-1)


def test_kv_scale_scales_capacity_only() -> None:
    cost = FittedCostModel(make_preset(), kv_scale=0.5)
    assert cost.kv_capacity_tokens == 8192
    assert cost.max_model_len == 8192


def test_simulated_scheduler_takes_the_calibrated_engines_limits() -> None:
    meta = {"batch_tokens": 256, "max_sequences": 16}
    config = with_engine_limits(SimConfig(), FittedCostModel(make_preset(metadata=meta)))
    assert (config.max_num_batched_tokens, config.max_num_seqs) == (256, 16)
    assert (config.block_size, config.kv_sequences) == (1, 16)  # llama.cpp: a cell per token
    unknown = with_engine_limits(SimConfig(), FittedCostModel(make_preset(metadata={})))
    assert unknown == replace(SimConfig(), block_size=1)


# ---- preset files ------------------------------------------------------------------------------


def test_preset_json_round_trip(tmp_path: Path) -> None:
    preset = make_preset()
    path = tmp_path / "p.json"
    save_preset(preset, path)
    back = load_preset(path)
    assert back == preset
    assert preset_json(back) == json.loads(path.read_text())


def _bad(data: object) -> str:
    return json.dumps(data)


GOOD = preset_json(make_preset())
BAD = {
    "not json": "{nope",
    "empty object": _bad({}),
    "other format": _bad({**GOOD, "format": "something-else"}),
    "future version": _bad({**GOOD, "version": 99}),
    "negative coefficient": _bad({**GOOD, "coefficients": {**GOOD["coefficients"], "c0": -1}}),
    "string coefficient": _bad({**GOOD, "coefficients": {**GOOD["coefficients"], "c0": "1"}}),
    "missing coefficient": _bad({**GOOD, "coefficients": {"c0": 1.0}}),
    "zero capacity": _bad({**GOOD, "kv_capacity_tokens": 0}),
    "missing fit": _bad({k: v for k, v in GOOD.items() if k != "fit"}),
    "bad batch": _bad({**GOOD, "measurements": [{"label": "x", "batch": [[1]], "seconds": 1}]}),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_preset_is_one_line_usage_error(case: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(BAD[case])
    with pytest.raises(UsageError) as err:
        load_preset(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "mars calibrate" in message


def test_missing_preset_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="run `mars calibrate --out"):
        load_preset(tmp_path / "none.json")


# ---- the simulator on a preset -----------------------------------------------------------------

needs_traces = pytest.mark.skipif(not TRACES.is_file(), reason=f"no trace file at {TRACES}")


@needs_traces
def test_ideal_times_work_with_a_fitted_model(tmp_path: Path) -> None:
    save_preset(make_preset(), tmp_path / "p.json")
    spec = SimSpec(
        str(TRACES),
        concurrency=1,
        sessions=2,
        token_scale=0.05,
        cost_model_file=str(tmp_path / "p.json"),
    )
    cost = make_cost_model(spec)
    assert isinstance(cost, FittedCostModel)
    ideal = ideal_times(load_specs(spec), cost, SimConfig(tool_cores=2))
    assert len(ideal) == 2 and all(t > 0 for t in ideal.values())


def _mars(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mars", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@needs_traces
def test_mars_sim_runs_on_a_preset(tmp_path: Path) -> None:
    save_preset(make_preset(), tmp_path / "p.json")
    out = tmp_path / "r.json"
    common = ["--traces", str(TRACES), "--policy", "fcfs", "--sessions", "4", "--token-scale"]
    proc = _mars(
        "sim",
        *common,
        "0.05",
        "--concurrency",
        "2",
        "--cost-model",
        str(tmp_path / "p.json"),
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "| fitted | m.gguf |" in proc.stdout
    result = json.loads(out.read_text())
    assert result["completed"] == 4
    assert result["gpu"]["name"] == "fitted:test"
    assert result["workload"]["cost_model_file"] == str(tmp_path / "p.json")


@needs_traces
@pytest.mark.parametrize("extra", [["--gpu", "h100"], ["--model", "llama-3.1-8b"]])
def test_cost_model_with_gpu_or_model_is_refused(tmp_path: Path, extra: list[str]) -> None:
    save_preset(make_preset(), tmp_path / "p.json")
    proc = _mars(
        "sim", "--traces", str(TRACES), "--policy", "fcfs", "--concurrency", "1",
        "--cost-model", str(tmp_path / "p.json"), *extra,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "not both" in proc.stderr


@needs_traces
def test_bad_preset_on_the_command_line_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text("[]")
    proc = _mars(
        "sim", "--traces", str(TRACES), "--policy", "fcfs", "--concurrency", "1",
        "--cost-model", str(tmp_path / "p.json"),
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("mars: error: cost model file") and proc.stderr.count("\n") == 1


def test_executor_charges_the_scan_of_cells_outside_the_batch() -> None:
    """llama.cpp attends over every used cell: a cached session's KV slows others' steps on a
    fitted model, and never on the roofline (paged attention reads only its own blocks)."""
    from factories import make_request
    from mars.sched.plan import StepPlan
    from mars.sim.costmodel import CostModel, resolve_gpu, resolve_model
    from mars.sim.executor import SimExecutor

    plan = StepPlan(0)
    req = make_request(prompt=200, output=4)
    req.num_computed_tokens = 200
    plan.add(req, 1)  # one decode at context 200
    fitted = FittedCostModel(make_preset())
    alone = SimExecutor(fitted, lambda: 201).execute(plan).duration_s
    beside = SimExecutor(fitted, lambda: 201 + 5000).execute(plan).duration_s
    assert beside - alone == pytest.approx(TRUE.c_scan * 1 * 5000)
    assert SimExecutor(fitted).execute(plan).duration_s == alone
    roofline = CostModel(resolve_gpu("h100"), resolve_model("llama-3.1-8b"))
    assert roofline.cache_scan_seconds(1, 5000) == 0.0
