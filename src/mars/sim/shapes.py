"""GPU and model shapes for the simulator's cost model, with the presets and shape-file loading.

A shape is what the analytic cost model needs to know about a GPU or a model: capacities, rates and
layer dimensions. No weights, no tokenizer, no disk access except `load_model_shape`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

GB = 10**9
TB = 10**12


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator, as the roofline sees it."""

    name: str  # preset key, e.g. "h100"
    memory_bytes: int  # capacity the KV pool is carved from (marketed decimal GB, see GPUS)
    mem_bw_bytes_per_s: float  # peak HBM bandwidth
    peak_flops: float  # dense (no sparsity) bf16 tensor-core FLOP/s
    host_link_bytes_per_s: float  # effective host<->GPU copy bandwidth for KV offload/restore
    # Fraction of peak_flops a whole forward pass reaches. Vidur's H100 profile of Llama-2-7B has
    # large GEMMs at ~0.75 of peak; norms, RoPE, activation and residual kernels add ~17% on top
    # (same profile) and FlashAttention runs below GEMM efficiency: 0.6 for the whole pass.
    mfu: float = 0.6
    # Fraction of peak HBM bandwidth a weight-streaming (decode) step reaches: the same profile's
    # one-token projections stream their weights at ~2.6 TB/s of 3.35 (0.78).
    bw_efficiency: float = 0.8
    # Fixed cost per engine step that neither FLOPs nor bytes explain: scheduling, input
    # preparation, sampling, launch gaps between CUDA-graph replays (vLLM V1: around 1 ms).
    overhead_s: float = 1e-3


# Memory is the marketed decimal capacity (80 GB, not the 80 GiB = 85.9e9 bytes on the board): the
# ~6 GB difference stands in for the CUDA context, activations and CUDA graphs that vLLM also keeps
# outside its KV pool. PCIe Gen5 x16 is 64 GB/s per direction on paper, ~55 GB/s in pinned copies.
GPUS: dict[str, GPUSpec] = {
    # NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: 80 GB HBM3, 3.35 TB/s,
    # 1,979 TFLOPS bf16 with sparsity = 989 TFLOPS dense.
    "h100": GPUSpec("h100", 80 * GB, 3.35 * TB, 989e12, 55 * GB),
    # Same datasheet, H100 NVL column: 94 GB HBM3, 3.9 TB/s, 1,671 TFLOPS bf16 sparse = 835 dense.
    "h100-nvl": GPUSpec("h100-nvl", 94 * GB, 3.9 * TB, 835e12, 55 * GB),
    # NVIDIA H200 datasheet, SXM column: 141 GB HBM3e, 4.8 TB/s, same compute die as H100 SXM
    # (989 TFLOPS dense bf16), same PCIe Gen5 host link.
    "h200": GPUSpec("h200", 141 * GB, 4.8 * TB, 989e12, 55 * GB),
}


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer, dense or mixture-of-experts, by its dimensions.

    Every layer has GQA attention and a gated (SwiGLU) MLP; in a MoE model (num_experts > 0) every
    layer's MLP is a router plus num_experts experts, num_active_experts of them per token, and no
    shared expert. Norms, biases and attention sinks are left out (< 0.1% of parameters).
    """

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (unused when num_experts > 0)
    vocab_size: int
    num_experts: int  # routed experts per layer; 0 = dense model
    num_active_experts: int  # experts each token is routed to (top-k)
    moe_intermediate_size: int  # one expert's MLP width; 0 = same as intermediate_size
    max_model_len: int
    weight_bytes_per_param: float = 2.0  # bf16; applies to every non-expert weight
    kv_bytes_per_elem: int = 2  # bf16 KV cache
    # Bytes per expert parameter; 0 = weight_bytes_per_param. gpt-oss stores experts in MXFP4.
    expert_bytes_per_param: float = 0.0
    tie_word_embeddings: bool = False  # lm_head shares the embedding table

    def __post_init__(self) -> None:
        problem = _shape_problem(self)
        if problem is not None:
            raise ValueError(f"model shape {self.name!r}: {problem}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def attn_params_per_layer(self) -> int:
        q_width = self.num_heads * self.head_dim
        kv_width = self.num_kv_heads * self.head_dim
        return (
            self.hidden_size * q_width
            + 2 * self.hidden_size * kv_width
            + q_width * self.hidden_size
        )

    @property
    def expert_params(self) -> int:
        """Parameters of ONE expert in ONE layer (gate, up and down projections)."""
        if not self.is_moe:
            return 0
        width = self.moe_intermediate_size or self.intermediate_size
        return 3 * self.hidden_size * width

    @property
    def mlp_params_per_layer(self) -> int:
        """Non-expert MLP parameters of one layer: the dense MLP, or the MoE router."""
        if self.is_moe:
            return self.hidden_size * self.num_experts
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def dense_params(self) -> int:
        """Every parameter that is not a routed expert, embedding table and lm_head included."""
        per_layer = self.attn_params_per_layer + self.mlp_params_per_layer
        return self.num_layers * per_layer + self.embedding_params + self.lm_head_params

    @property
    def total_params(self) -> int:
        return self.dense_params + self.num_layers * self.num_experts * self.expert_params

    @property
    def active_params(self) -> int:
        """Parameters one token touches, counted like model cards do (embedding table included)."""
        return self.dense_params + self.num_layers * self.num_active_experts * self.expert_params

    @property
    def expert_bytes(self) -> float:
        """Bytes of one expert in one layer."""
        per_param = self.expert_bytes_per_param or self.weight_bytes_per_param
        return self.expert_params * per_param

    @property
    def weight_bytes(self) -> float:
        """Bytes of all weights resident on the GPU."""
        dense = self.dense_params * self.weight_bytes_per_param
        return dense + self.num_layers * self.num_experts * self.expert_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every layer (full attention in every layer)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_bytes_per_elem


_AT_LEAST_1 = (
    "num_layers",
    "hidden_size",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "max_model_len",
    "kv_bytes_per_elem",
)
_REQUIRED = _AT_LEAST_1[:-1]
_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,)}


def _shape_problem(shape: ModelShape) -> str | None:
    """What is wrong with a shape's values, or None."""
    if not shape.name:
        return "field 'name' must be a non-empty string"
    for key in _AT_LEAST_1:
        if getattr(shape, key) < 1:
            return f"field {key!r} must be >= 1, got {getattr(shape, key)!r}"
    for key in ("num_experts", "num_active_experts", "moe_intermediate_size"):
        if getattr(shape, key) < 0:
            return f"field {key!r} must be >= 0, got {getattr(shape, key)!r}"
    if not (math.isfinite(shape.weight_bytes_per_param) and shape.weight_bytes_per_param > 0):
        return f"field 'weight_bytes_per_param' must be > 0, got {shape.weight_bytes_per_param!r}"
    if not (math.isfinite(shape.expert_bytes_per_param) and shape.expert_bytes_per_param >= 0):
        return f"field 'expert_bytes_per_param' must be >= 0, got {shape.expert_bytes_per_param!r}"
    if shape.num_experts > 0 and not 1 <= shape.num_active_experts <= shape.num_experts:
        return "field 'num_active_experts' must be between 1 and num_experts"
    return None


MODELS: dict[str, ModelShape] = {
    # huggingface.co/Qwen/Qwen3-Coder-30B-A3B-Instruct config.json and model card: 48 layers,
    # hidden 2048, 32 Q / 4 KV heads of 128, 128 experts (8 active) of width 768, vocab 151936,
    # untied embeddings, 262,144 native context; card: 30.5B total, 3.3B active.
    "qwen3-coder-30b-a3b": ModelShape(
        name="qwen3-coder-30b-a3b",
        num_layers=48,
        hidden_size=2048,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        intermediate_size=6144,
        vocab_size=151936,
        num_experts=128,
        num_active_experts=8,
        moe_intermediate_size=768,
        max_model_len=262144,
    ),
    # huggingface.co/meta-llama/Llama-3.1-8B config.json: 32 layers, hidden 4096, 32 Q / 8 KV heads
    # (head_dim 128), intermediate 14336, vocab 128256, untied, max_position_embeddings 131072.
    "llama-3.1-8b": ModelShape(
        name="llama-3.1-8b",
        num_layers=32,
        hidden_size=4096,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=128256,
        num_experts=0,
        num_active_experts=0,
        moe_intermediate_size=0,
        max_model_len=131072,
    ),
    # huggingface.co/openai/gpt-oss-120b config.json: 36 layers, hidden 2880, 64 Q / 8 KV heads of
    # 64, 128 local experts, 4 per token, intermediate 2880, vocab 201088, untied, 131072 positions;
    # quantization_config mxfp4 on the experts only (attention, router, embeddings stay bf16).
    # MXFP4 = 4-bit values + one 8-bit scale per 32 = 4.25 bits = 0.53125 bytes per parameter.
    # Model card: 116.8B total, 5.1B active (without the embedding table). Half its layers use a
    # 128-token sliding window; this shape treats all as full attention (KV over-estimated ~2x).
    "gpt-oss-120b": ModelShape(
        name="gpt-oss-120b",
        num_layers=36,
        hidden_size=2880,
        num_heads=64,
        num_kv_heads=8,
        head_dim=64,
        intermediate_size=2880,
        vocab_size=201088,
        num_experts=128,
        num_active_experts=4,
        moe_intermediate_size=2880,
        max_model_len=131072,
        expert_bytes_per_param=0.53125,
    ),
}


def _shape_error(path: Path, problem: str) -> ValueError:
    optional = [f.name for f in fields(ModelShape) if f.name not in _REQUIRED]
    return ValueError(
        f"model shape file {path}: {problem}; required integer fields: {', '.join(_REQUIRED)}"
        f" (optional: {', '.join(optional)})"
    )


def load_model_shape(path: str | Path) -> ModelShape:
    """Read a ModelShape from a JSON object; `name` defaults to the file's stem, the MoE fields
    to 0 (dense), the byte sizes to bf16."""
    path = Path(path)
    try:
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _shape_error(path, f"cannot read it ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise _shape_error(path, f"not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(raw, dict):
        raise _shape_error(path, "expected a JSON object")
    missing = [key for key in _REQUIRED if key not in raw]
    if missing:
        raise _shape_error(path, f"missing field {missing[0]!r}")
    values: dict[str, Any] = {"name": path.stem, "num_experts": 0, "num_active_experts": 0}
    values["moe_intermediate_size"] = 0
    declared = {f.name: str(f.type) for f in fields(ModelShape)}
    for key, value in raw.items():
        if key not in declared:
            raise _shape_error(path, f"unknown field {key!r}")
        kind = declared[key]
        wrong_bool = isinstance(value, bool) and kind != "bool"
        if wrong_bool or not isinstance(value, _TYPES.get(kind, (str,))):
            raise _shape_error(path, f"field {key!r} must be of type {kind}, got {value!r}")
        values[key] = float(raw[key]) if kind == "float" else value
    try:
        return ModelShape(**values)
    except ValueError as exc:
        problem = str(exc).removeprefix(f"model shape {values['name']!r}: ")
        raise _shape_error(path, problem) from None


def resolve_model(name_or_path: str) -> ModelShape:
    """A preset by name, or a shape file (an existing path ending in .json)."""
    if name_or_path in MODELS:
        return MODELS[name_or_path]
    path = Path(name_or_path)
    if name_or_path.endswith(".json") or path.is_file():
        return load_model_shape(path)
    raise ValueError(
        f"unknown model {name_or_path!r}; choose one of {', '.join(sorted(MODELS))}"
        " or pass the path of a .json shape file"
    )


def resolve_gpu(name: str) -> GPUSpec:
    if name in GPUS:
        return GPUS[name]
    raise ValueError(f"unknown gpu {name!r}; choose one of {', '.join(sorted(GPUS))}")
