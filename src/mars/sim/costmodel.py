"""The simulator's GPU cost model: how long one engine step takes (DESIGN.md section 6).

An analytic roofline, per step of a continuous-batching engine:

    step_s = max(flops / (peak_flops * mfu), bytes / (mem_bw * bw_efficiency)) + overhead_s

    flops = 2 * P_tok * new_tokens              every new token through every layer's matmuls
          + 2 * vocab * hidden * num_seqs       lm_head once per sequence: like vLLM, logits only
                                                for the position each sequence samples from
          + 4 * layers * heads * head_dim * attn_pairs     QK^T and PV, 2 FLOPs per multiply-add

    bytes = dense weights read once            attention, router or dense MLP, lm_head (bf16);
                                               the embedding table is gathered by row, not streamed
          + E[distinct experts] * layers * expert bytes
          + kv_bytes_per_token * (kv_read_tokens + new_tokens)       KV read, then KV written

P_tok is the active parameter count without embedding table and lm_head. With T new tokens each
routed to k of E experts, a layer touches E * (1 - (1 - k/E)^T) distinct experts in expectation
(uniform routing): one token reads k experts, a large batch reads all E. Activations, norms and
elementwise kernels are not counted as bytes or FLOPs; mfu absorbs them (see shapes.GPUSpec).

Batch aggregates (what predict() derives from its per-request pairs):
    num_seqs       = number of requests
    new_tokens     = sum new
    attn_pairs     = sum new * context + new * (new + 1) // 2    (query, key) pairs under a causal
                     mask: new token i (1-based) sees context + i keys; exact in integers
    kv_read_tokens = sum context + new
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mars.sim.shapes import (
    GPUS,
    MODELS,
    GPUSpec,
    ModelShape,
    load_model_shape,
    resolve_gpu,
    resolve_model,
)

__all__ = [
    "GPUS",
    "GPU_MEMORY_UTILIZATION",
    "MODELS",
    "CostModel",
    "GPUSpec",
    "ModelShape",
    "StepCostModel",
    "StepTime",
    "batch_totals",
    "check_totals",
    "load_model_shape",
    "resolve_gpu",
    "resolve_model",
]

# Share of GPU memory for weights + KV, as vLLM's default gpu_memory_utilization.
GPU_MEMORY_UTILIZATION = 0.9


@dataclass(frozen=True)
class StepTime:
    """One engine step's predicted duration and what it is made of."""

    step_s: float  # max(compute_s, memory_s) + overhead_s: the step's wall time
    compute_s: float  # flops / (peak_flops * mfu): the step if it were compute-bound
    memory_s: float  # bytes_moved / (mem_bw * bw_efficiency): the step if it were memory-bound
    overhead_s: float  # fixed per-step cost (scheduling, sampling, launch gaps); 0 for no step
    flops: float  # matmul + attention FLOPs of the step
    bytes_moved: float  # weight_bytes + kv_bytes: HBM traffic the roofline charges
    weight_bytes: float  # dense weights + expected distinct experts' weights read
    kv_bytes: float  # KV cache read (context + new tokens) plus written (new tokens)

    @property
    def compute_bound(self) -> bool:
        return self.compute_s >= self.memory_s


class StepCostModel(Protocol):
    """What the simulator needs from a cost model; the analytic and a fitted one both provide it."""

    @property
    def kv_capacity_tokens(self) -> int: ...

    @property
    def max_model_len(self) -> int: ...

    def predict(self, batch: Sequence[tuple[int, int]]) -> StepTime: ...

    def predict_totals(
        self, num_seqs: int, new_tokens: int, attn_pairs: int, kv_read_tokens: int
    ) -> StepTime: ...

    def step_seconds(
        self, num_seqs: int, new_tokens: int, attn_pairs: int, kv_read_tokens: int
    ) -> float: ...

    def transfer_seconds(self, num_tokens: int) -> float: ...

    def cache_scan_seconds(self, new_tokens: int, other_cells: int) -> float:
        """Step time spent on KV cells outside the batch (cached sessions' cells) that the
        engine's attention still scans: llama.cpp's unified cache does, paged attention
        (vLLM, the roofline) does not (0)."""
        ...


def batch_totals(batch: Sequence[tuple[int, int]]) -> tuple[int, int, int, int]:
    """(num_seqs, new_tokens, attn_pairs, kv_read_tokens) of per-request (new, context) pairs."""
    new_tokens = attn_pairs = kv_read_tokens = 0
    for new, context in batch:
        if new < 1 or context < 0:
            raise ValueError(
                f"bad batch entry (new_tokens={new}, context_len={context}): "
                "new_tokens must be >= 1 and context_len >= 0"
            )
        new_tokens += new
        attn_pairs += new * context + new * (new + 1) // 2
        kv_read_tokens += context + new
    return len(batch), new_tokens, attn_pairs, kv_read_tokens


def check_totals(num_seqs: int, new_tokens: int, attn_pairs: int, kv_read_tokens: int) -> None:
    """Raise ValueError unless these are a batch's totals (see `batch_totals`)."""
    if min(num_seqs, new_tokens, attn_pairs, kv_read_tokens) < 0 or num_seqs > new_tokens:
        raise ValueError(
            f"bad batch totals (num_seqs={num_seqs}, new_tokens={new_tokens}, "
            f"attn_pairs={attn_pairs}, kv_read_tokens={kv_read_tokens}): all must be >= 0 "
            "and num_seqs <= new_tokens"
        )


class CostModel:
    """Analytic roofline step-time model of one model on one GPU (see the module docstring)."""

    def __init__(self, gpu: GPUSpec, model: ModelShape, kv_scale: float = 1.0) -> None:
        if not (math.isfinite(kv_scale) and kv_scale > 0):
            raise ValueError(f"kv_scale must be a positive number, got {kv_scale!r}")
        self.gpu = gpu
        self.model = model
        self.kv_scale = kv_scale
        budget = GPU_MEMORY_UTILIZATION * gpu.memory_bytes
        free = budget - model.weight_bytes
        capacity = int(free / model.kv_bytes_per_token * kv_scale) if free > 0 else 0
        if capacity < 1:
            raise ValueError(
                f"model {model.name} does not fit on gpu {gpu.name}: its weights take "
                f"{model.weight_bytes / 1e9:.1f} GB of the {budget / 1e9:.1f} GB usable "
                f"({GPU_MEMORY_UTILIZATION:.0%} of {gpu.memory_bytes / 1e9:.0f} GB), leaving no KV "
                "cache; choose a GPU with more memory or a smaller model"
            )
        self.kv_capacity_tokens: int = capacity
        self.max_model_len: int = model.max_model_len

        layers = model.num_layers
        per_layer = model.attn_params_per_layer + model.mlp_params_per_layer
        active_per_layer = per_layer + model.num_active_experts * model.expert_params
        lm_head = model.vocab_size * model.hidden_size  # the tied embedding matrix if tied
        # Every constant below is a float so both code paths do the same float operations.
        self._flops_per_token = float(2 * layers * active_per_layer)
        self._flops_per_seq = float(2 * lm_head)
        self._flops_per_pair = float(4 * layers * model.num_heads * model.head_dim)
        self._dense_bytes = float((layers * per_layer + lm_head) * model.weight_bytes_per_param)
        self._expert_bytes = float(layers * model.expert_bytes)  # one expert, every layer
        self._num_experts = float(model.num_experts)
        # Chance that a token does not route to a given expert; 1.0 for a dense model (no term).
        self._miss = 1.0 - model.num_active_experts / model.num_experts if model.is_moe else 1.0
        self._kv_bytes_per_token = float(model.kv_bytes_per_token)
        self._sec_per_flop = 1.0 / (gpu.peak_flops * gpu.mfu)
        self._sec_per_byte = 1.0 / (gpu.mem_bw_bytes_per_s * gpu.bw_efficiency)
        self._overhead_s = gpu.overhead_s
        self._sec_per_host_token = model.kv_bytes_per_token / gpu.host_link_bytes_per_s

    def expected_experts(self, num_tokens: int) -> float:
        """Expected distinct experts one layer reads when num_tokens tokens route uniformly."""
        return self._num_experts * (1.0 - self._miss**num_tokens)

    def predict(self, batch: Sequence[tuple[int, int]]) -> StepTime:
        """Step time of a batch of (new_tokens, context_len) requests; an empty batch costs 0.

        context_len counts the tokens already in the KV cache before this step: a prefill of N
        from scratch is (N, 0), a decode at context C is (1, C), a chunk after a prefix hit (N, C).
        """
        return self.predict_totals(*batch_totals(batch))

    def predict_totals(
        self, num_seqs: int, new_tokens: int, attn_pairs: int, kv_read_tokens: int
    ) -> StepTime:
        """predict() from the batch aggregates (module docstring); identical float results."""
        check_totals(num_seqs, new_tokens, attn_pairs, kv_read_tokens)
        if new_tokens == 0:
            return StepTime(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        flops = (
            self._flops_per_token * new_tokens
            + self._flops_per_seq * num_seqs
            + self._flops_per_pair * attn_pairs
        )
        weight_bytes = self._dense_bytes + self._expert_bytes * self.expected_experts(new_tokens)
        kv_bytes = self._kv_bytes_per_token * (kv_read_tokens + new_tokens)
        compute_s = flops * self._sec_per_flop
        memory_s = (weight_bytes + kv_bytes) * self._sec_per_byte
        return StepTime(
            step_s=max(compute_s, memory_s) + self._overhead_s,
            compute_s=compute_s,
            memory_s=memory_s,
            overhead_s=self._overhead_s,
            flops=flops,
            bytes_moved=weight_bytes + kv_bytes,
            weight_bytes=weight_bytes,
            kv_bytes=kv_bytes,
        )

    def step_seconds(
        self, num_seqs: int, new_tokens: int, attn_pairs: int, kv_read_tokens: int
    ) -> float:
        """predict_totals(...).step_s without validation or allocation: the simulator's hot path."""
        if new_tokens <= 0:
            return 0.0
        flops = (
            self._flops_per_token * new_tokens
            + self._flops_per_seq * num_seqs
            + self._flops_per_pair * attn_pairs
        )
        weight_bytes = self._dense_bytes + self._expert_bytes * (
            self._num_experts * (1.0 - self._miss**new_tokens)
        )
        kv_bytes = self._kv_bytes_per_token * (kv_read_tokens + new_tokens)
        compute_s = flops * self._sec_per_flop
        memory_s = (weight_bytes + kv_bytes) * self._sec_per_byte
        return max(compute_s, memory_s) + self._overhead_s

    def transfer_seconds(self, num_tokens: int) -> float:
        """Seconds to copy num_tokens tokens of KV between host memory and the GPU (one way)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return num_tokens * self._sec_per_host_token

    def cache_scan_seconds(self, new_tokens: int, other_cells: int) -> float:
        return 0.0  # paged attention reads only the batch's own blocks
