"""Compare the analytic cost model's roofline with Vidur's measured per-layer times on a GPU.

Vidur (github.com/microsoft/vidur) publishes profiles of one transformer layer's operators at token
counts 1..4096, e.g. data/profiling/compute/h100/meta-llama/Llama-2-7b-hf/mlp.csv (times in ms,
fp16, measured with CUDA events). This script reads such a file (it downloads nothing) and, for
each token count N, compares:

  linear  the layer's four projections (QKV, O, gate+up, down): measured vs
          max(2*N*params / (peak*mfu), weight bytes / (bw*efficiency)), the cost model's roofline;
  layer   the same plus every other profiled kernel (norms, RoPE, activation, residual add), i.e.
          the whole layer except the attention kernel, against the same roofline: the cost model
          counts no FLOPs or bytes for those kernels, its mfu is meant to absorb them.

    git clone https://github.com/microsoft/vidur /tmp/vidur
    PYTHONPATH=src python scripts/check_costmodel_vidur.py \
        /tmp/vidur/data/profiling/compute/h100/meta-llama/Llama-2-7b-hf/mlp.csv --gpu h100
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from mars.sim.costmodel import GPUS, GPUSpec

LINEAR_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
OTHER_OPS = ("input_layernorm", "attn_rope", "post_attention_layernorm", "mlp_act", "add")
DEFAULT_TOKENS = "1,16,64,128,256,512,1024,2048,4096"


def projection_params(row: dict[str, str]) -> dict[str, int]:
    """Per-GPU parameter count of each profiled projection (column-/row-parallel split by TP)."""
    heads, kv_heads = int(row["n_head"]), int(row["n_kv_head"])
    hidden, inter = int(row["n_embd"]), int(row["n_expanded_embd"])
    tp = int(row["num_tensor_parallel_workers"])
    head_dim = hidden // heads
    gated = row["use_gated_mlp"].strip().lower() == "true"
    return {
        "attn_pre_proj": hidden * (heads + 2 * kv_heads) * head_dim // tp,
        "attn_post_proj": heads * head_dim * hidden // tp,
        "mlp_up_proj": hidden * (2 if gated else 1) * inter // tp,
        "mlp_down_proj": inter * hidden // tp,
    }


def roofline_s(gpu: GPUSpec, params: int, tokens: int, bytes_per_param: float) -> float:
    compute = 2.0 * params * tokens / (gpu.peak_flops * gpu.mfu)
    memory = params * bytes_per_param / (gpu.mem_bw_bytes_per_s * gpu.bw_efficiency)
    return max(compute, memory)


def load(path: Path, tp: int) -> tuple[dict[str, int], dict[int, dict[str, float]]]:
    """Projection sizes and, per token count, each operator's median time in seconds."""
    samples: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    params: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if int(row["num_tensor_parallel_workers"]) != tp:
                continue
            params = params or projection_params(row)
            for op in LINEAR_OPS + OTHER_OPS:
                value = row.get(f"time_stats.{op}.median", "")
                if value:
                    samples[int(row["num_tokens"])][op].append(float(value) * 1e-3)
    medians = {n: {op: statistics.median(v) for op, v in ops.items()} for n, ops in samples.items()}
    return params, medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path, help="a Vidur mlp.csv profile")
    parser.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel rows to use")
    parser.add_argument("--tokens", default=DEFAULT_TOKENS, help="comma-separated token counts")
    parser.add_argument("--per-op", action="store_true", help="also print each projection")
    parser.add_argument("--bytes-per-param", type=float, default=2.0, help="fp16 profiles: 2")
    args = parser.parse_args(argv)
    gpu = GPUS[args.gpu]
    try:
        params, measured = load(args.csv, args.tp)
    except (OSError, KeyError, ValueError) as exc:
        print(f"check_costmodel_vidur: cannot read {args.csv} as a Vidur mlp.csv: {exc}")
        return 2
    if not measured:
        print(f"check_costmodel_vidur: no rows with num_tensor_parallel_workers={args.tp}")
        return 2
    wanted = [int(t) for t in args.tokens.split(",")]
    missing = [n for n in wanted if n not in measured]
    if missing:
        print(f"not profiled, skipped: {missing} (profiled {min(measured)}..{max(measured)})")
    print(
        f"{args.csv.name}: {sum(params.values()) / 1e6:.1f} M projection params per layer, "
        f"tp={args.tp}; gpu {gpu.name}: peak {gpu.peak_flops / 1e12:.0f} TFLOP/s x mfu "
        f"{gpu.mfu}, {gpu.mem_bw_bytes_per_s / 1e12:.2f} TB/s x efficiency {gpu.bw_efficiency}"
    )
    print(
        f"{'tokens':>7} {'bound':>7} {'pred ms':>9} {'linear ms':>10} {'ratio':>6} "
        f"{'layer ms':>9} {'ratio':>6} {'meas TFLOP/s':>13} {'meas TB/s':>10}"
    )
    for n in (n for n in wanted if n in measured):
        ops = measured[n]
        pred = {op: roofline_s(gpu, p, n, args.bytes_per_param) for op, p in params.items()}
        total_pred = sum(pred.values())
        linear = sum(ops[op] for op in LINEAR_OPS)
        layer = linear + sum(ops.get(op, 0.0) for op in OTHER_OPS)
        # Every projection has the same arithmetic intensity (2N FLOPs per weight), so they all
        # sit on the same side of the ridge and the sum of their rooflines is the layer's roofline.
        total = sum(params.values())
        compute = roofline_s(gpu, total, n, 0.0)
        memory = roofline_s(gpu, total, 0, args.bytes_per_param)
        bound = "compute" if compute >= memory else "memory"
        print(
            f"{n:>7} {bound:>7} {total_pred * 1e3:>9.4f} {linear * 1e3:>10.4f} "
            f"{total_pred / linear:>6.2f} {layer * 1e3:>9.4f} {total_pred / layer:>6.2f} "
            f"{2.0 * total * n / linear / 1e12:>13.0f} "
            f"{total * args.bytes_per_param / linear / 1e12:>10.2f}"
        )
        if args.per_op:
            for op in LINEAR_OPS:
                print(
                    f"{'':>7} {op:>16} pred {pred[op] * 1e3:.4f} ms, measured "
                    f"{ops[op] * 1e3:.4f} ms, ratio {pred[op] / ops[op]:.2f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
