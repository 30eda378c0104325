"""`FittedCostModel`: step times fitted to measurements of a real engine (DESIGN.md section 6).

The second `StepCostModel`, beside the analytic GPU roofline: a linear model over the batch
aggregates the roofline uses (see mars.sim.costmodel),

    step_s = c0 + c_seq * num_seqs + c_tok * new_tokens + c_attn * attn_pairs
           + c_kv * kv_read_tokens + c_scan * new_tokens * kv_read_tokens

with non-negative coefficients that `mars calibrate` fits to the embedded llama.cpp engine on this
machine. The last term is llama.cpp's, not the roofline's: its CPU attention (no flash attention)
scores every new token of a step against every used cell of the one unified KV cache, masked, so
a decode of B sequences at context C costs B * (B * C) score pairs, not B * C. The calibration
runs each batch alone in the cache, where those cells are the batch's kv_read_tokens; a live
engine also holds the cells of sessions waiting on tools, which no batch aggregate sees: the
simulator adds them (`cache_scan_seconds` over the KV manager's used blocks outside the batch).

A preset file (JSON) holds the coefficients, the measured KV copy rates, the engine's KV capacity
and context limit, the fit's quality, the measurements and where they came from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mars.core.errors import UsageError
from mars.sim.costmodel import StepTime, batch_totals, check_totals
from mars.sim.fit import FitQuality, nnls, quality

PRESET_FORMAT = "mars-fitted-cost-model"
PRESET_VERSION = 1


@dataclass(frozen=True)
class Coefficients:
    """The linear step-time model's coefficients, all >= 0."""

    c0: float  # seconds per step (launch, batch set-up, graph build)
    c_seq: float  # seconds per sequence in the batch (logits, sampling)
    c_tok: float  # seconds per new token (the weight matmuls)
    c_attn: float  # seconds per (query, key) attention pair
    c_kv: float  # seconds per KV token read (context + new, summed over sequences)
    c_scan: float  # seconds per (new token, KV token of the batch) pair: the unified-cache scan

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"coefficient {name} must be a number >= 0, got {value!r}")

    def seconds(self, num_seqs: int, new_tokens: int, attn_pairs: int, kv_read: int) -> float:
        return (
            self.c0
            + self.c_seq * num_seqs
            + self.c_tok * new_tokens
            + self.c_attn * attn_pairs
            + self.c_kv * kv_read
            + self.c_scan * new_tokens * kv_read
        )


@dataclass(frozen=True)
class Measurement:
    """One calibration shape: a batch of (new_tokens, context_len) and its median step time."""

    label: str  # what the table prints, e.g. "decode 8 x 1 @ 1000"
    batch: tuple[tuple[int, int], ...]  # per sequence: tokens computed, tokens already cached
    seconds: float  # median of the repeats, wall time of one executor step
    samples: tuple[float, ...] = ()  # every repeat, seconds

    def totals(self) -> tuple[int, int, int, int]:
        return batch_totals(self.batch)


@dataclass(frozen=True)
class Preset:
    """Everything a preset file holds; `FittedCostModel` is built from it."""

    coefficients: Coefficients
    restore_s_per_token: float  # host -> engine KV copy (llama_state_seq_set_data), per token
    offload_s_per_token: float  # engine -> host KV copy (llama_state_seq_get_data), per token
    kv_bytes_per_token: float  # size of one token's saved KV state
    kv_capacity_tokens: int  # the engine's KV cells (--kv-tokens of the calibration)
    max_model_len: int  # longest sequence: the model's trained context, capped by the cache
    fit: FitQuality
    metadata: Mapping[str, Any] = field(default_factory=dict)  # machine, threads, model, date
    measurements: tuple[Measurement, ...] = ()


def fit_coefficients(measurements: Sequence[Measurement]) -> Coefficients:
    """NNLS fit minimising relative error: a 5 ms decode step weighs as much as a 2 s prefill."""
    rows = [_features(*m.totals()) for m in measurements]
    targets = [m.seconds for m in measurements]
    if min(targets, default=0.0) <= 0:
        raise ValueError("every measurement needs a positive step time")
    x = nnls(rows, targets, [1.0 / (t * t) for t in targets])
    return Coefficients(*x)


def _features(num_seqs: int, new_tokens: int, attn_pairs: int, kv_read: int) -> list[float]:
    """The regressors, in the order of `Coefficients`' fields."""
    return [1.0, num_seqs, new_tokens, attn_pairs, kv_read, new_tokens * kv_read]


def fit_quality(coefficients: Coefficients, measurements: Sequence[Measurement]) -> FitQuality:
    predicted = [coefficients.seconds(*m.totals()) for m in measurements]
    return quality(predicted, [m.seconds for m in measurements])


class FittedCostModel:
    """A `StepCostModel` from a preset (see the module docstring)."""

    def __init__(self, preset: Preset, kv_scale: float = 1.0) -> None:
        if not (math.isfinite(kv_scale) and kv_scale > 0):
            raise ValueError(f"kv_scale must be a positive number, got {kv_scale!r}")
        self.preset = preset
        self.coefficients = preset.coefficients
        self.kv_capacity_tokens: int = max(1, int(preset.kv_capacity_tokens * kv_scale))
        self.max_model_len: int = preset.max_model_len
        self.kv_bytes_per_token = preset.kv_bytes_per_token
        self.name = str(preset.metadata.get("name", "fitted"))

    @classmethod
    def from_file(cls, path: str | Path, kv_scale: float = 1.0) -> FittedCostModel:
        return cls(load_preset(path), kv_scale)

    def predict(self, batch: Sequence[tuple[int, int]]) -> StepTime:
        """Step time of (new_tokens, context_len) requests; an empty batch costs 0."""
        return self.predict_totals(*batch_totals(batch))

    def predict_totals(
        self, num_seqs: int, new_tokens: int, attn_pairs: int, kv_read_tokens: int
    ) -> StepTime:
        """The fit does not split time into FLOPs and bytes: all but c0 is reported as compute."""
        check_totals(num_seqs, new_tokens, attn_pairs, kv_read_tokens)
        if new_tokens == 0:
            return StepTime(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        step = self.step_seconds(num_seqs, new_tokens, attn_pairs, kv_read_tokens)
        c0 = self.coefficients.c0
        return StepTime(step, step - c0, 0.0, c0, 0.0, 0.0, 0.0, 0.0)

    def step_seconds(
        self, num_seqs: int, new_tokens: int, attn_pairs: int, kv_read_tokens: int
    ) -> float:
        if new_tokens <= 0:
            return 0.0
        return self.coefficients.seconds(num_seqs, new_tokens, attn_pairs, kv_read_tokens)

    def cache_scan_seconds(self, new_tokens: int, other_cells: int) -> float:
        """llama.cpp scores every new token against every used cell of its unified cache, the
        batch's and the cached sessions' alike: the scan term over the cells outside the batch."""
        return self.coefficients.c_scan * new_tokens * other_cells

    def transfer_seconds(self, num_tokens: int) -> float:
        """One host -> engine KV copy (a restore: what the simulator charges a step)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return num_tokens * self.preset.restore_s_per_token

    def offload_seconds(self, num_tokens: int) -> float:
        """One engine -> host KV copy (an offload), measured separately from restores."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return num_tokens * self.preset.offload_s_per_token


# ---- preset files ------------------------------------------------------------------------------
def preset_json(preset: Preset) -> dict[str, Any]:
    return {
        "format": PRESET_FORMAT,
        "version": PRESET_VERSION,
        "coefficients": asdict(preset.coefficients),
        "restore_s_per_token": preset.restore_s_per_token,
        "offload_s_per_token": preset.offload_s_per_token,
        "kv_bytes_per_token": preset.kv_bytes_per_token,
        "kv_capacity_tokens": preset.kv_capacity_tokens,
        "max_model_len": preset.max_model_len,
        "fit": asdict(preset.fit),
        "metadata": dict(preset.metadata),
        "measurements": [
            {
                "label": m.label,
                "batch": [list(pair) for pair in m.batch],
                "seconds": m.seconds,
                "samples": list(m.samples),
                "predicted": preset.coefficients.seconds(*m.totals()),
            }
            for m in preset.measurements
        ],
    }


def save_preset(preset: Preset, path: str | Path) -> None:
    Path(path).write_text(json.dumps(preset_json(preset), indent=1) + "\n")


def load_preset(path: str | Path) -> Preset:
    """Read a preset file; any problem is a one-line UsageError naming the file and the fix."""
    where = f"cost model file {path}"
    redo = f"; re-create it with `mars calibrate --out {path}`"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{where} not found; run `mars calibrate --out {path}` first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{where} is not readable JSON ({e}){redo}") from None
    try:
        return _parse(data)
    except (KeyError, TypeError, ValueError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise UsageError(f"{where}: {what}{redo}") from None


def _parse(data: Any) -> Preset:
    if not isinstance(data, dict) or data.get("format") != PRESET_FORMAT:
        raise ValueError(f'not a {PRESET_FORMAT} preset (no "format": "{PRESET_FORMAT}")')
    if data.get("version") != PRESET_VERSION:
        raise ValueError(f"version {data.get('version')!r}, this mars reads {PRESET_VERSION}")
    coefficients = Coefficients(**{k: _number(data["coefficients"], k) for k in _COEFFICIENTS})
    fit = data["fit"]
    measurements = tuple(
        Measurement(
            str(m["label"]),
            tuple((int(n), int(c)) for n, c in m["batch"]),
            _number(m, "seconds"),
            tuple(float(s) for s in m.get("samples", ())),
        )
        for m in data.get("measurements", ())
    )
    return Preset(
        coefficients=coefficients,
        restore_s_per_token=_number(data, "restore_s_per_token"),
        offload_s_per_token=_number(data, "offload_s_per_token"),
        kv_bytes_per_token=_number(data, "kv_bytes_per_token"),
        kv_capacity_tokens=_count(data, "kv_capacity_tokens"),
        max_model_len=_count(data, "max_model_len"),
        fit=FitQuality(
            float(fit["r2"]),
            float(fit["mean_abs_pct_error"]),
            float(fit["max_abs_pct_error"]),
            int(fit["points"]),
        ),
        metadata=dict(data.get("metadata", {})),
        measurements=measurements,
    )


_COEFFICIENTS = tuple(Coefficients.__dataclass_fields__)


def _number(obj: Mapping[str, Any], key: str) -> float:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
    return float(value)


def _count(obj: Mapping[str, Any], key: str) -> int:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return value
