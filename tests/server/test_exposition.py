"""`/metrics` without a model: the exposition of `ServerMetrics` fed hand-built events and a
`stats()` mapping, parsed back by prometheus_client, and the gateway's pass-through of its
upstreams' pages."""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from mars.control.admission import AdmissionLimits
from mars.core.clock import WallClock
from mars.core.events import (
    EventBus,
    GpuEnd,
    GpuFirstToken,
    GpuPreempt,
    GpuSubmit,
    KvOffload,
    KvRestore,
    RequestEmit,
    SessionAdmitted,
    SessionDone,
    ToolEnd,
)
from mars.gateway.control import Control
from mars.gateway.metrics import GatewayMetrics
from mars.gateway.upstreams import Signal, Upstreams
from mars.sched.registry import make_policy
from mars.server.metrics import MAX_CATEGORIES, OVERFLOW, ServerMetrics
from mars.server.metrics_requests import LATENCY_BUCKETS, TOKEN_BUCKETS, TTFT_BUCKETS

MODEL = "smol"
STATS: dict[str, Any] = {
    "kv_tokens": 8192, "kv_usage": 0.25, "kv_free_tokens": 6144, "running": 2, "waiting": 1,
    "sessions": 3, "admission_queued": 1, "admission_window": None, "prefix_hit_tokens": 40,
    "prompt_tokens": 100, "recomputed_tokens": 5, "preemptions": 1, "generated_tokens": 12,
    "host_kv_bytes": 0, "copy_s": 0.5, "steps": 9, "step_s": 1.5, "sched_s": 0.01,
}  # fmt: skip


def fed() -> ServerMetrics:
    m = ServerMetrics(lambda: STATS, MODEL, "mars", max_model_len=8192)
    m(SessionAdmitted(0.0, "s", 0.25))
    m(RequestEmit(0.0, "s", "r1", 100, 0))
    m(GpuSubmit(0.5, "s", "r1", 40))
    m(GpuPreempt(0.6, "s", "r1", 50))
    m(GpuSubmit(0.9, "s", "r1", 0))  # resubmitted: its queue time stays the first's
    m(GpuFirstToken(1.0, "s", "r1"))
    m(GpuEnd(2.0, "s", "r1", 11))  # ten gaps of 0.1 s
    m(RequestEmit(2.0, "s", "r2", 10, 0))
    m(GpuEnd(2.5, "s", "r2", 0, aborted=True))
    m(ToolEnd(3.0, "s", "bash", 0.5, 0.125))
    m(KvOffload(3.0, "s", 64))
    m(KvRestore(3.5, "s", 64))
    m(SessionDone(4.0, "s", 4.0))
    return m


def samples(text: str) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(text: str, name: str, **labels: str) -> float:
    (s,) = [s for s in samples(text)[name] if labels.items() <= s.labels.items()]
    return s.value


def test_exposition_follows_prometheus_conventions_and_vllm_names() -> None:
    text = fed().exposition().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:prefix_cache_queries",
        "vllm:prefix_cache_hits", "vllm:num_preemptions", "vllm:request_success",
        "vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
        "vllm:inter_token_latency_seconds", "vllm:request_queue_time_seconds",
        "mars:session_latency_seconds", "mars:admission_wait_seconds", "mars:events",
        "mars:tool_queue_wait_seconds", "mars:tool_run_seconds", "mars:kv_host_copies",
        "mars:kv_retention_decisions", "mars:admission_queued_sessions",
    ):  # fmt: skip
        assert name in families, name
    for fam in families.values():
        assert fam.documentation, f"{fam.name} has no HELP"
        assert fam.name.startswith(("vllm:", "mars:")), fam.name
        for s in fam.samples:
            if fam.type == "counter" and not s.name.endswith("_created"):
                assert s.name.endswith("_total"), s.name
            if fam.name != "vllm:cache_config_info":
                assert s.labels["model_name"] == MODEL, s
            if fam.name.startswith("vllm:"):
                assert s.labels["engine"] == "0", s
        if fam.type == "histogram":
            bounds = [s.labels["le"] for s in fam.samples if s.name.endswith("_bucket")]
            assert bounds and bounds[-1] == "+Inf", fam.name
    # vLLM's buckets, so its dashboards' quantiles mean the same.
    for name, buckets in (
        ("vllm:time_to_first_token_seconds", TTFT_BUCKETS),
        ("vllm:inter_token_latency_seconds", TOKEN_BUCKETS),
        ("vllm:e2e_request_latency_seconds", LATENCY_BUCKETS),
    ):
        les = [float(s.labels["le"]) for s in families[name].samples if s.name.endswith("_bucket")]
        assert les == [*buckets, float("inf")]
    assert len(TTFT_BUCKETS) == 22 and len(TOKEN_BUCKETS) == 19 and len(LATENCY_BUCKETS) == 21


def test_values_come_from_the_events_and_the_stats() -> None:
    text = fed().exposition().decode()
    assert value(text, "vllm:time_to_first_token_seconds_sum") == 1.0
    assert value(text, "vllm:request_queue_time_seconds_sum") == 0.5  # the first submit
    assert value(text, "vllm:e2e_request_latency_seconds_count") == 1  # not the aborted one
    assert value(text, "vllm:inter_token_latency_seconds_count") == 10
    assert abs(value(text, "vllm:inter_token_latency_seconds_sum") - 1.0) < 1e-9
    assert value(text, "vllm:inter_token_latency_seconds_bucket", le="0.075") == 0
    assert value(text, "vllm:inter_token_latency_seconds_bucket", le="0.1") == 10
    assert value(text, "vllm:request_success_total", finished_reason="stop") == 1
    assert value(text, "vllm:request_success_total", finished_reason="abort") == 1
    assert value(text, "vllm:prompt_tokens_total") == 100
    assert value(text, "vllm:prefix_cache_hits_total") == 40
    assert value(text, "vllm:kv_cache_usage_perc") == 0.25
    assert value(text, "vllm:cache_config_info", num_gpu_blocks="8192", block_size="1") == 1
    assert value(text, "mars:admission_wait_seconds_sum") == 0.25
    assert value(text, "mars:session_latency_seconds_count") == 1
    assert value(text, "mars:tool_queue_wait_seconds_sum", category="bash") == 0.125
    assert value(text, "mars:kv_host_copy_tokens_total", direction="restore") == 64
    assert value(text, "mars:kv_retention_decisions_total", decision="offload") == 1
    assert value(text, "mars:kv_retention_decisions_total", decision="evict") == 0
    assert value(text, "mars:events_total", event="gpu_submit") == 2
    assert "mars:admission_window_sessions" not in text  # None: the policy has no window


def test_apps_have_their_own_registries_and_tool_categories_are_bounded() -> None:
    one, two = fed(), ServerMetrics(lambda: {}, "other-model", "fcfs", 4096)
    for i in range(MAX_CATEGORIES + 5):
        two(ToolEnd(0.0, "s", f"tool{i}", 0.1, 0.0))
    text = two.exposition().decode()
    assert 'model_name="smol"' not in text and "vllm:num_requests_running" not in text
    categories = {s.labels["category"] for s in samples(text)["mars:tool_run_seconds_count"]}
    assert len(categories) == MAX_CATEGORIES + 1 and OVERFLOW in categories
    assert value(text, "mars:tool_run_seconds_count", category=OVERFLOW) == 5
    assert value(one.exposition().decode(), "mars:tool_run_seconds_count", category="bash") == 1


def test_the_gateway_passes_on_its_upstreams_pages_with_an_upstream_label() -> None:
    upstreams = Upstreams(["http://a:1", "http://b:2"], "openai", httpx.AsyncClient())
    control = Control(
        make_policy("mars", {}), upstreams, AdmissionLimits(), WallClock(), EventBus()
    )
    page = fed().exposition().decode()
    for r in upstreams.replicas:
        r.metrics_text = page
        upstreams.succeeded(r, Signal(0.25, 8192, 1, 2))
    gateway = GatewayMetrics(lambda: (control, upstreams))
    gateway(SessionAdmitted(0.0, "g", 0.5))
    text = gateway.exposition().decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}  # valid: it parses
    running = fams["vllm:num_requests_running"].samples
    assert {s.labels["upstream"] for s in running} == {"http://a:1", "http://b:2"}
    assert value(text, "mars:gateway_upstream_up", upstream="http://b:2") == 1
    assert value(text, "mars:gateway_admission_wait_seconds_sum") == 0.5
    assert value(text, "mars:gateway_events_total", event="session_admitted") == 1
    upstreams.failed(upstreams.replicas[1], "refused", fatal=True)
    text = gateway.exposition().decode()
    running = samples(text)["vllm:num_requests_running"]
    assert [s.labels["upstream"] for s in running] == ["http://a:1"]  # a down one is left out
    upstreams.replicas[0].metrics_text = "<html>not metrics</html>\n"
    text = gateway.exposition().decode()  # an upstream page that does not parse is left out
    assert "vllm:num_requests_running" not in text and "mars:gateway_upstream_up" in text
