"""The engine's gauges and cumulative counters for `/metrics`, read from `LiveEngine.stats()` at
scrape time: what the engine already counts exactly costs nothing between scrapes.

vLLM's families carry `model_name` and `engine` (vLLM's label set); mars's carry `model_name`.
`vllm:cache_config_info` says the KV capacity the way vLLM does (blocks of one token), so a
router reading vLLM's names (the gateway) learns it from a `mars serve` too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

Kind = Literal["gauge", "counter"]
# stats() key -> (family, kind, HELP); vLLM's HELP text where the name is vLLM's.
VLLM: dict[str, tuple[str, Kind, str]] = {
    "running": (
        "vllm:num_requests_running", "gauge", "Number of requests in model execution batches."
    ),
    "waiting": (
        "vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed."
    ),
    "kv_usage": (
        "vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage."
    ),
    "prompt_tokens": ("vllm:prompt_tokens", "counter", "Number of prefill tokens processed."),
    "generated_tokens": (
        "vllm:generation_tokens", "counter", "Number of generation tokens processed."
    ),
    "preemptions": (
        "vllm:num_preemptions", "counter", "Cumulative number of preemption from the engine."
    ),
    "prefix_hit_tokens": (
        "vllm:prefix_cache_hits", "counter",
        "Prefix cache hits, in terms of number of cached tokens.",
    ),
}  # fmt: skip
MARS: dict[str, tuple[str, Kind, str]] = {
    "sessions": (
        "mars:sessions_active", "gauge",
        "Sessions the engine holds: queued for admission, in a call, or away in a tool phase.",
    ),
    "admission_queued": (
        "mars:admission_queued_sessions", "gauge",
        "New sessions waiting in the admission queue.",
    ),
    "admission_window": (
        "mars:admission_window_sessions", "gauge",
        "Sessions the admission policy lets in at once (policies with a window only).",
    ),
    "kv_tokens": ("mars:kv_capacity_tokens", "gauge", "KV cache capacity, in tokens."),
    "kv_free_tokens": ("mars:kv_free_tokens", "gauge", "Free KV cache, in tokens."),
    "host_kv_bytes": ("mars:kv_host_bytes", "gauge", "KV held in host memory, in bytes."),
    "recomputed_tokens": (
        "mars:recomputed_prefill_tokens", "counter",
        "Prompt tokens computed again because their KV was lost (evicted or preempted).",
    ),
    "restore_fallbacks": (
        "mars:kv_restore_fallbacks", "counter",
        "Host restores that recomputed a piece (no contiguous free KV cells).",
    ),
    "copy_s": (
        "mars:kv_host_copy_seconds", "counter",
        "Time spent copying KV between the GPU and host memory, in seconds.",
    ),
    "steps": ("mars:engine_steps", "counter", "Engine steps run."),
    "failed_steps": ("mars:engine_failed_steps", "counter", "Engine steps that failed."),
    "step_s": (
        "mars:engine_step_seconds", "counter",
        "Time inside the model's forward pass and sampling, in seconds.",
    ),
    "sched_s": (
        "mars:scheduler_seconds", "counter",
        "Time in the scheduler (schedule and update), in seconds.",
    ),
}  # fmt: skip


class EngineCollector(Collector):
    """Scrape-time families from `stats()` (a `LiveEngine.stats`-shaped mapping); keys it
    lacks, or whose value is None, are left out."""

    def __init__(
        self, stats: Callable[[], Mapping[str, object]], model_name: str, policy: str
    ) -> None:
        self._stats, self._model, self._policy = stats, model_name, policy

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        vllm_labels = {"model_name": self._model, "engine": "0"}
        yield from _families(VLLM, stats, vllm_labels)
        queries = _number(stats.get("prompt_tokens"))
        if queries is not None:
            yield _family(
                "vllm:prefix_cache_queries", "counter",
                "Prefix cache queries, in terms of number of queried tokens.",
                vllm_labels, queries,
            )  # fmt: skip
        capacity = _number(stats.get("kv_tokens"))
        if capacity is not None:
            info = {"engine": "0", "block_size": "1", "num_gpu_blocks": str(int(capacity))}
            yield _family(
                "vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig",
                info, 1,
            )  # fmt: skip
        mars_labels = {"model_name": self._model}
        yield _family(
            "mars:server_info", "gauge", "The server's scheduling policy (always 1).",
            {**mars_labels, "policy": self._policy}, 1,
        )  # fmt: skip
        yield from _families(MARS, stats, mars_labels)


def _families(
    table: Mapping[str, tuple[str, Kind, str]],
    stats: Mapping[str, object],
    labels: Mapping[str, str],
) -> Iterable[Metric]:
    for key, (name, kind, doc) in table.items():
        value = _number(stats.get(key))
        if value is not None:
            yield _family(name, kind, doc, labels, value)


def _family(name: str, kind: Kind, doc: str, labels: Mapping[str, str], value: float) -> Metric:
    cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
    fam = cls(name, doc, labels=list(labels))
    fam.add_metric(list(labels.values()), value)
    return fam


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
