"""`mars calibrate`: measure the embedded llama.cpp engine, fit the simulator's cost model to it,
print measured against predicted step times, and write the preset `mars sim --cost-model` reads."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from mars.core.errors import UsageError
from mars.sim.costmodel_cli import non_negative_int, positive_int
from mars.sim.fitted import Preset

_Parser = TypeVar("_Parser", bound=argparse.ArgumentParser)


def add_calibrate_parser(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="fit the simulator's cost model to the embedded llama.cpp engine on this machine",
        description=(
            "Run the embedded llama.cpp engine over a grid of step shapes (prefill chunks, "
            "decode batches, mixed batches), fit step time = c0 + c_seq*seqs + c_tok*tokens + "
            "c_attn*attention pairs + c_kv*KV tokens + c_scan*tokens*KV tokens, and write a "
            "preset for `mars sim/sweep/capacity --cost-model FILE`. Run it on a quiet machine."
        ),
    )
    p.add_argument("--out", required=True, metavar="FILE.json", help="preset file to write")
    p.add_argument("--model", help="GGUF model file (default: SmolLM2-135M-Instruct, bundled)")
    p.add_argument(
        "--threads", type=positive_int, help="llama.cpp threads (default: one per engine CPU)"
    )
    p.add_argument(
        "--kv-tokens", type=positive_int, default=16384, help="KV cache size, as `mars serve`"
    )
    p.add_argument(
        "--batch-tokens", type=positive_int, default=512, help="most tokens per step (default 512)"
    )
    p.add_argument(
        "--max-sessions", type=positive_int, default=32, help="sequence slots, as `mars serve`"
    )
    p.add_argument(
        "--engine-cpus", metavar="LIST", help="pin the engine to these CPUs, e.g. 0 or 0-3"
    )
    p.add_argument(
        "--tool-load",
        type=non_negative_int,
        default=0,
        metavar="K",
        help="run K busy-loop processes meanwhile (on the CPUs not in --engine-cpus, if given)",
    )
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per shape")
    p.add_argument("--quick", action="store_true", help="a small grid (seconds, for tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from mars.engine.calibrate import QUICK_GRID, CalibrationSettings, Grid, calibrate, units
    from mars.engine.cpuload import cpu_load
    from mars.sim.fitted import save_preset

    out = Path(args.out)
    if out.is_dir() or not out.resolve().parent.is_dir():
        raise UsageError(f"--out {out}: give a file in an existing directory, e.g. preset.json")
    allowed = sorted(os.sched_getaffinity(0))
    engine_cpus, tool_cpus = allowed, list[int]()
    if args.engine_cpus:
        from mars.tools.cpus import parse_cpu_list

        engine_cpus = parse_cpu_list(args.engine_cpus)
        tool_cpus = [c for c in allowed if c not in engine_cpus]
        if args.tool_load and not tool_cpus:
            raise UsageError(
                f"--engine-cpus {args.engine_cpus} leaves no CPU for --tool-load; give the "
                f"engine fewer of CPUs {allowed}, or drop --engine-cpus to share them"
            )
    settings = CalibrationSettings(
        threads=args.threads or len(engine_cpus),
        kv_tokens=args.kv_tokens,
        batch_tokens=args.batch_tokens,
        max_sequences=args.max_sessions,
        repeats=args.repeats,
        grid=QUICK_GRID if args.quick else Grid(),
    )
    metadata = {
        "name": out.stem,
        "command": shlex.join(["mars", *sys.argv[1:]]) if sys.argv[1:2] == ["calibrate"] else "",
        "engine_cpus": engine_cpus,
        "tool_load": args.tool_load,
        "tool_cpus": tool_cpus or (allowed if args.tool_load else []),
    }
    bar = _progress(units(settings), args.no_progress)
    t0 = time.perf_counter()
    with cpu_load(args.tool_load, tool_cpus or None):
        if args.engine_cpus:
            # Before the model loads: llama.cpp's threads inherit this thread's affinity.
            os.sched_setaffinity(0, engine_cpus)
        model = _load_model(args.model)
        try:
            preset, notes = calibrate(
                model, settings, metadata, (lambda _label: bar.update(1)) if bar else None
            )
        finally:
            model.close()
            if bar:
                bar.close()
    wall = {"calibration_s": round(time.perf_counter() - t0, 1)}
    preset = replace(preset, metadata={**preset.metadata, **wall})
    print(format_report(preset, notes))
    save_preset(preset, out)
    print(f"wrote {out}: use it with `mars sim --cost-model {out}` (also sweep, capacity)")
    return 0


def _load_model(path: str | None) -> Any:
    from mars.engine.model import Model, default_model_path

    try:
        return Model(path if path else default_model_path())
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None


def _progress(total: int, disabled: bool) -> Any:
    if disabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="shape", desc="calibrating", file=sys.stderr)


def format_report(preset: Preset, notes: list[str]) -> str:
    """The settings, the table of measured against predicted step times, the fit and the
    coefficients: everything a reader needs to judge the preset."""
    meta, c, fit = preset.metadata, preset.coefficients, preset.fit
    lines = [
        f"$ {meta['command']}" if meta.get("command") else "",
        f"machine {meta.get('machine')} | {meta.get('cpu')} | model {meta.get('model_file')}",
        f"threads {meta.get('threads')} | engine CPUs {meta.get('engine_cpus')} | tool load "
        f"{meta.get('tool_load')} on CPUs {meta.get('tool_cpus')} | kv {preset.kv_capacity_tokens}"
        f" tokens | batch {meta.get('batch_tokens')} tokens | {meta.get('repeats')} repeats "
        f"| {meta.get('date')} | took {meta.get('calibration_s')} s | load average before, "
        f"after {meta.get('load_average')}",
        "",
        f"{'shape':<34} {'measured ms':>12} {'min-max ms':>17} {'predicted ms':>13} {'error':>8}",
    ]
    for m in preset.measurements:
        pred = c.seconds(*m.totals())
        low, high = (min(m.samples), max(m.samples)) if m.samples else (m.seconds, m.seconds)
        spread = f"{low * 1e3:.1f}-{high * 1e3:.1f}"
        lines.append(
            f"{m.label:<34} {m.seconds * 1e3:12.1f} {spread:>17} {pred * 1e3:13.1f} "
            f"{(pred - m.seconds) / m.seconds:+8.1%}"
        )
    lines += notes
    lines += [
        "",
        f"fit: R² {fit.r2:.4f}, mean |error| {fit.mean_abs_pct_error:.1f}%, max |error| "
        f"{fit.max_abs_pct_error:.1f}% over {fit.points} shapes",
        f"step_s = {c.c0 * 1e3:.3f} ms + {c.c_seq * 1e3:.3f} ms/seq + {c.c_tok * 1e3:.3f} "
        f"ms/token + {c.c_attn * 1e9:.2f} ns/attn pair + {c.c_kv * 1e6:.3f} us/KV token + "
        f"{c.c_scan * 1e9:.2f} ns/(token x KV token)",
        f"KV copies: restore {preset.restore_s_per_token * 1e6:.2f} us/token, offload "
        f"{preset.offload_s_per_token * 1e6:.2f} us/token, "
        f"{preset.kv_bytes_per_token / 1024:.1f} KiB/token; max model len {preset.max_model_len}",
    ]
    return "\n".join(lines)
