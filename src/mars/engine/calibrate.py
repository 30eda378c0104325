"""`mars calibrate`'s measurement plan and fit: a grid of step shapes, timed and fitted.

A `Grid` lists step shapes: prefill chunks at several contexts, decode batches of several sizes,
prefill chunks batched with decodes. `calibrate()` runs every shape that fits the engine on a
real `LlamaCppExecutor` (through `StepBench`), fits a `Preset` (mars.sim.fitted) to the medians,
and measures once more any shape the fit misses by far: a burst of other work on the machine
only ever slows a step down, so the lower of the two medians is kept.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mars.core.errors import UsageError
from mars.engine.llamacpp import ExecutorConfig, LlamaCppExecutor
from mars.engine.model import Model
from mars.engine.stepbench import Batch, StepBench, per_token
from mars.sim.fitted import Coefficients, Measurement, Preset, fit_coefficients, fit_quality

# A shape is measured again when the fit misses it by more than this many times the median miss
# (and by more than OUTLIER_FLOOR): far off the plane that fits every other shape.
OUTLIER_FACTOR = 4.0
OUTLIER_FLOOR = 0.15
# Repeats of one shape this far apart (slowest / fastest) mean other work shared the CPUs.
NOISY_SPREAD = 1.5


@dataclass(frozen=True)
class Grid:
    """The step shapes `mars calibrate` measures; shapes that do not fit the engine are skipped."""

    prefill_chunks: tuple[int, ...] = (32, 128, 512)  # one sequence, tokens per step
    prefill_contexts: tuple[int, ...] = (0, 1000)  # tokens cached before the chunk
    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 16)  # sequences decoding one token
    decode_contexts: tuple[int, ...] = (100, 1000, 2000)
    mixed_chunks: tuple[int, ...] = (32, 128)  # a prefill chunk (from an empty cache) ...
    mixed_batches: tuple[int, ...] = (4, 8)  # ... batched with this many decodes ...
    mixed_context: int = 500  # ... at this context

    def shapes(self) -> list[tuple[str, Batch]]:
        out: list[tuple[str, Batch]] = []
        for c in self.prefill_contexts:
            for n in self.prefill_chunks:
                out.append((f"prefill {n} @ {c}", ((n, c),)))
        for c in self.decode_contexts:
            for b in self.decode_batches:
                out.append((f"decode {b} x 1 @ {c}", ((1, c),) * b))
        for n in self.mixed_chunks:
            for b in self.mixed_batches:
                label = f"mixed {n} @ 0 + {b} x 1 @ {self.mixed_context}"
                out.append((label, ((n, 0), *((1, self.mixed_context),) * b)))
        return out


# A few seconds on one thread: what the test suite runs.
QUICK_GRID = Grid(
    prefill_chunks=(16, 64),
    prefill_contexts=(0, 200),
    decode_batches=(1, 4),
    decode_contexts=(50, 200),
    mixed_chunks=(32,),
    mixed_batches=(2,),
    mixed_context=200,
)


@dataclass(frozen=True)
class CalibrationSettings:
    """What `mars calibrate` was asked to do; also written into the preset's metadata."""

    threads: int
    kv_tokens: int = 16384  # the engine's KV cells, as `mars serve --kv-tokens`
    batch_tokens: int = 512  # most tokens per step, as `mars serve --batch-tokens`
    max_sequences: int = 32  # sequence slots, as `mars serve --max-sessions`
    repeats: int = 3  # timed runs per shape (after one untimed run); the median is kept
    seed: int = 0  # token ids of the synthetic prompts
    grid: Grid = field(default_factory=Grid)

    def __post_init__(self) -> None:
        if min(self.threads, self.kv_tokens, self.batch_tokens, self.repeats) < 1:
            raise ValueError(f"bad calibration settings {self}: counts must be positive")


def fits(batch: Batch, settings: CalibrationSettings, max_len: int) -> str | None:
    """Why the engine cannot run `batch` as one step, or None if it can."""
    new = sum(n for n, _ in batch)
    cells = sum(n + c for n, c in batch)
    if new > settings.batch_tokens:
        return f"{new} tokens > --batch-tokens {settings.batch_tokens}"
    if len(batch) > settings.max_sequences:
        return f"{len(batch)} sequences > {settings.max_sequences} slots"
    if cells + 1 > settings.kv_tokens:  # +1: a restored copy holds one cell more, briefly
        return f"{cells} KV cells > --kv-tokens {settings.kv_tokens}"
    if max(n + c for n, c in batch) > max_len:
        return f"a sequence is longer than the model's {max_len} tokens"
    return None


def calibrate(
    model: Model,
    settings: CalibrationSettings,
    metadata: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Preset, list[str]]:
    """Measure every shape of `settings.grid` that fits, fit, and return the preset and notes
    for the reader (shapes skipped or measured again, and why). `progress` is called once per
    unit of `units()`, and once per shape measured again."""
    load_before = os.getloadavg()[0]
    max_len = min(model.n_ctx_train, settings.kv_tokens)
    tick = progress or (lambda _label: None)
    shapes: list[tuple[str, Batch]] = []
    notes: list[str] = []
    for label, batch in settings.grid.shapes():
        why = fits(batch, settings, max_len)
        if why is None:
            shapes.append((label, batch))
        else:
            notes.append(f"skipped {label}: {why}")
            tick(label)
    if len(shapes) < 2:
        raise UsageError(
            f"only {len(shapes)} shape(s) of the grid fit this engine ({'; '.join(notes)}); "
            "raise --kv-tokens or --batch-tokens"
        )
    contexts = sorted({c for _, b in shapes for _, c in b})
    config = ExecutorConfig(
        settings.kv_tokens,
        settings.max_sequences,
        settings.batch_tokens,
        settings.threads,
    )
    ex = LlamaCppExecutor(model, config)
    try:
        bench = StepBench(ex, settings.seed)
        bench.prepare(contexts)
        tick("prefilled the contexts")
        measured = []
        for label, batch in shapes:
            measured.append(bench.measure(label, batch, settings.repeats))
            tick(label)
        coefficients = fit_coefficients(measured)
        for i in _outliers(coefficients, measured):
            again = bench.measure(measured[i].label, measured[i].batch, settings.repeats)
            tick(again.label)
            notes.append(
                f"measured again {again.label}: {measured[i].seconds * 1e3:.1f} ms, then "
                f"{again.seconds * 1e3:.1f} ms (kept the lower)"
            )
            measured[i] = min(measured[i], again, key=lambda m: m.seconds)
        restores = [(c + 1, bench.measure_restore(c, settings.repeats)) for c in contexts if c]
        tick("KV copy rates")
        kv_bytes = bench.kv_bytes_per_token() if any(contexts) else 0.0
    finally:
        ex.close()
    coefficients = fit_coefficients(measured)
    info = {**machine_info(), **(metadata or {})}
    info.update(threads=settings.threads, repeats=settings.repeats, model_file=model.path.name)
    info.update(batch_tokens=settings.batch_tokens, max_sequences=settings.max_sequences)
    info.update(load_average=[round(load_before, 2), round(os.getloadavg()[0], 2)])
    notes += _noise_warning(measured, info)
    preset = Preset(
        coefficients=coefficients,
        restore_s_per_token=per_token(restores),
        offload_s_per_token=per_token(bench.offloads),
        kv_bytes_per_token=kv_bytes,
        kv_capacity_tokens=settings.kv_tokens,
        max_model_len=max_len,
        fit=fit_quality(coefficients, measured),
        metadata=info,
        measurements=tuple(measured),
    )
    return preset, notes


def _outliers(coefficients: Coefficients, measured: list[Measurement]) -> list[int]:
    """Indices of the shapes the fit misses far more than the others (module docstring)."""
    errors = [abs(coefficients.seconds(*m.totals()) / m.seconds - 1) for m in measured]
    bound = max(OUTLIER_FACTOR * statistics.median(errors), OUTLIER_FLOOR)
    return [i for i, e in enumerate(errors) if e > bound]


def _noise_warning(measured: list[Measurement], info: dict[str, Any]) -> list[str]:
    noisy = [m for m in measured if m.samples and max(m.samples) > NOISY_SPREAD * min(m.samples)]
    if len(noisy) * 4 < len(measured):
        return []
    before, after = info["load_average"]
    return [
        f"warning: {len(noisy)} of {len(measured)} shapes varied by more than {NOISY_SPREAD}x "
        f"between repeats: other work competed for the CPUs (load average {before} before, "
        f"{after} after, {info['cpus_allowed']} CPUs, {info['threads']} engine threads); "
        "re-run on a quiet machine, or with --threads below the number of free CPUs"
    ]


def units(settings: CalibrationSettings) -> int:
    """Progress units of `calibrate`: the shapes, the context prefill and the copy rates."""
    return len(settings.grid.shapes()) + 2


def machine_info() -> dict[str, Any]:
    return {
        "machine": platform.node(),
        "cpu": _cpu_name(),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
