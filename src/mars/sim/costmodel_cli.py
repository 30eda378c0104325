"""`mars costmodel`: print the analytic cost model's step time for one prefill or decode batch."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, TypeVar

from mars.core.errors import UsageError
from mars.sim.costmodel import GPUS, MODELS, CostModel, StepTime, resolve_gpu, resolve_model

# Any ArgumentParser subclass: _SubParsersAction is invariant in the parser class it makes.
_Parser = TypeVar("_Parser", bound=argparse.ArgumentParser)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def add_costmodel_parser(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    parser = subparsers.add_parser(
        "costmodel",
        help="predict one engine step's time with the simulator's GPU cost model",
        description=(
            "Predict one engine step's time with the analytic roofline cost model: either a "
            "prefill of N tokens (after C cached tokens, default 0) or a decode step of B "
            "sequences at context C."
        ),
    )
    parser.add_argument("--gpu", required=True, help=f"one of {', '.join(sorted(GPUS))}")
    parser.add_argument(
        "--model",
        required=True,
        help=f"one of {', '.join(sorted(MODELS))}, or the path of a .json model shape file",
    )
    kind = parser.add_mutually_exclusive_group(required=True)
    kind.add_argument("--prefill", type=positive_int, metavar="N", help="prefill N new tokens")
    kind.add_argument("--decode", type=positive_int, metavar="B", help="decode B sequences")
    parser.add_argument(
        "--context",
        type=non_negative_int,
        metavar="C",
        help="tokens already in the KV cache per sequence (required with --decode; default 0)",
    )
    parser.add_argument(
        "--kv-scale",
        type=positive_float,
        default=1.0,
        metavar="X",
        help="multiply the KV cache capacity by X (default 1.0)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object and nothing else"
    )
    parser.set_defaults(func=run_costmodel)


def _positive(args: argparse.Namespace, name: str, minimum: int) -> int:
    value = getattr(args, name, None)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"--{name} must be an integer >= {minimum}, got {value!r}")
    return value


def run_costmodel(args: argparse.Namespace) -> int:
    try:
        gpu = resolve_gpu(args.gpu)
        model = resolve_model(args.model)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    kv_scale = getattr(args, "kv_scale", 1.0)
    if not (isinstance(kv_scale, int | float) and math.isfinite(kv_scale) and kv_scale > 0):
        raise UsageError(f"--kv-scale must be a positive number, got {kv_scale!r}")
    try:
        cost = CostModel(gpu, model, kv_scale=float(kv_scale))
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    if getattr(args, "prefill", None) is not None:
        new = _positive(args, "prefill", 1)
        context = 0 if args.context is None else _positive(args, "context", 0)
        batch, desc = [(new, context)], f"prefill {new} tokens after {context} cached"
        info: dict[str, Any] = {"kind": "prefill", "num_seqs": 1, "new_tokens": new}
    elif getattr(args, "decode", None) is not None:
        seqs = _positive(args, "decode", 1)
        if getattr(args, "context", None) is None:
            raise UsageError("--decode B needs --context C (tokens already cached per sequence)")
        context = _positive(args, "context", 0)
        batch, desc = [(1, context)] * seqs, f"decode {seqs} sequences at context {context}"
        info = {"kind": "decode", "num_seqs": seqs, "new_tokens": seqs}
    else:
        raise UsageError("give either --prefill N or --decode B --context C")
    info["context"] = context

    step = cost.predict(batch)
    kv_tokens = sum(new + ctx for new, ctx in batch)
    if args.json:
        out: dict[str, Any] = {"gpu": gpu.name, "model": model.name, "batch": info}
        out.update({key: getattr(step, key) for key in StepTime.__dataclass_fields__})
        out["kv_capacity_tokens"] = cost.kv_capacity_tokens
        out["kv_tokens_after_step"] = kv_tokens
        print(json.dumps(out))
        return 0
    print(_describe(cost, step, desc, info["new_tokens"]))
    # The model prices any batch; say so when a real engine could not hold this one.
    if kv_tokens > cost.kv_capacity_tokens:
        print(f"note: the batch holds {kv_tokens:,} tokens of KV, more than fit on this GPU")
    if batch[0][0] + batch[0][1] > model.max_model_len:
        print(f"note: a sequence is longer than the model's {model.max_model_len:,} tokens")
    return 0


def _describe(cost: CostModel, step: StepTime, desc: str, new_tokens: int) -> str:
    gpu, model = cost.gpu, cost.model
    bound = "compute-bound" if step.compute_bound else "memory-bound"
    flops_rate = gpu.peak_flops * gpu.mfu / 1e12
    bw_rate = gpu.mem_bw_bytes_per_s * gpu.bw_efficiency / 1e12
    kv_gb = cost.kv_capacity_tokens * model.kv_bytes_per_token / 1e9
    lines = [
        f"gpu       {gpu.name}   model {model.name}   {desc}",
        f"step      {step.step_s * 1e3:9.3f} ms  "
        f"({bound}; {new_tokens / step.step_s:,.0f} tokens/s)",
        f"compute   {step.compute_s * 1e3:9.3f} ms  "
        f"{step.flops / 1e12:.3f} TFLOP at {flops_rate:.0f} TFLOP/s (mfu {gpu.mfu})",
        f"memory    {step.memory_s * 1e3:9.3f} ms  "
        f"{step.weight_bytes / 1e9:.2f} GB weights + {step.kv_bytes / 1e9:.2f} GB KV "
        f"at {bw_rate:.2f} TB/s (efficiency {gpu.bw_efficiency})",
        f"overhead  {step.overhead_s * 1e3:9.3f} ms",
        f"kv cache  {cost.kv_capacity_tokens:,} tokens ({kv_gb:.1f} GB, "
        f"{model.kv_bytes_per_token / 1024:g} KiB per token)",
    ]
    return "\n".join(lines)
