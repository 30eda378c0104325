"""Build vLLM's real scheduler on a tiny model config, CPU only, no weights, no network.

Imported by the tests only after `pytest.importorskip` found vLLM (scripts/setup_vllm.sh's venv).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
)
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

BLOCK = 16
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_hidden_layers": 1,
    "vocab_size": 256,
    "max_position_embeddings": 4096,
    "torch_dtype": "float32",
}


def make_scheduler(
    model_dir: Path,
    policy: str = "mars",
    settings: str = "",
    num_blocks: int = 64,
    budget: int = 256,
    max_num_seqs: int = 16,
    events: Path | None = None,
    full_isl: bool = True,
    long_prefill: int = 0,
    **config: Any,
) -> Any:
    """A MarsScheduler over `num_blocks` KV blocks of 16 tokens; `model_dir` needs only a
    config.json (`write_model`). `config`: more `SchedulerConfig` fields (`async_scheduling`)."""
    from mars.vllm.scheduler import MarsScheduler

    env = {"MARS_POLICY": policy, "MARS_POLICY_SETTINGS": settings}
    if events is not None:
        env["MARS_VLLM_EVENTS"] = str(events)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return _build(
            MarsScheduler,
            model_dir,
            num_blocks,
            budget,
            max_num_seqs,
            full_isl,
            long_prefill,
            config,
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_model(d: Path) -> Path:
    (d / "config.json").write_text(json.dumps(TINY_LLAMA))
    return d


def _build(
    cls: Any,
    model_dir: Path,
    num_blocks: int,
    budget: int,
    max_num_seqs: int,
    full_isl: bool,
    long_prefill: int,
    config_fields: dict[str, Any],
) -> Any:
    model = ModelConfig(
        model=str(model_dir), skip_tokenizer_init=True, max_model_len=4096, dtype="float32"
    )
    sched = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=4096,
        enable_chunked_prefill=True,
        is_encoder_decoder=False,
        # True (vLLM's default) admits a request only if its whole prompt fits: KV then never
        # runs out mid-prefill, and neither chunk shrinking nor preemption can be seen.
        scheduler_reserve_full_isl=full_isl,
        long_prefill_token_threshold=long_prefill,  # vLLM's own per-request chunk cap
        **config_fields,
    )
    cache = CacheConfig(block_size=BLOCK, enable_prefix_caching=True)
    config = VllmConfig(
        scheduler_config=sched,
        model_config=model,
        cache_config=cache,
        device_config=DeviceConfig(device="cpu"),
    )
    if "async_scheduling" in config_fields:  # what a GPU deployment decides (CPU: off)
        config.scheduler_config.async_scheduling = config_fields["async_scheduling"]
    config.cache_config.num_gpu_blocks = num_blocks
    kv = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                ["layer"],
                FullAttentionSpec(
                    block_size=BLOCK, num_kv_heads=1, head_size=1, dtype=torch.float32
                ),
            )
        ],
    )
    return cls(
        vllm_config=config,
        kv_cache_config=kv,
        structured_output_manager=StructuredOutputManager(config),
        block_size=BLOCK,
        log_stats=False,
    )


init_none_hash(sha256)
_hasher = get_request_block_hasher(BLOCK, sha256)


def make_request(
    rid: str,
    num_tokens: int,
    max_tokens: int = 4,
    prefix: list[int] | None = None,
    vllm_session: str | None = None,
    **xargs: Any,
) -> Request:
    """A request of `num_tokens` prompt tokens (starting with `prefix`), extras from `xargs`;
    `vllm_session` is vLLM's own `Request.session_id` (what its API server reads from the
    `session_id` body field or the `X-Session-ID` header)."""
    tokens = list(prefix or [])
    tokens += [(hash(rid) + i) % 200 + 1 for i in range(num_tokens - len(tokens))]
    params = SamplingParams(max_tokens=max_tokens, extra_args=xargs or None)
    return Request(rid, tokens, params, None, block_hasher=_hasher, session_id=vllm_session)


def step(sched: Any, token: int = 7) -> SchedulerOutput:
    """One engine step: schedule, then every request that reached its end samples `token`."""
    out = sched.schedule()
    ids = list(out.num_scheduled_tokens)
    sampled = []
    for rid in ids:
        req = sched.requests[rid]
        sampled.append([token] if req.num_computed_tokens >= req.num_tokens else [])
    sched.update_from_output(out, model_output(ids, sampled))
    return out


def model_output(ids: list[str], sampled: list[list[int]]) -> ModelRunnerOutput:
    """A step's model output: `sampled[i]`, the tokens request `ids[i]` sampled."""
    fields: dict[str, Any] = {"req_ids": ids, "sampled_token_ids": sampled}
    if "req_id_to_index" in ModelRunnerOutput.__dataclass_fields__:  # gone in vLLM 0.34
        fields["req_id_to_index"] = {r: i for i, r in enumerate(ids)}
    return ModelRunnerOutput(**fields)
