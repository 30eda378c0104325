"""The gateway's pieces without a network: metrics parsing, routing, the policy's KV view, the
session extras."""

from __future__ import annotations

import httpx
import pytest

from mars.gateway.control import UNKNOWN_CAPACITY, PooledKV
from mars.gateway.proxy import Extras
from mars.gateway.upstreams import Signal, Upstreams, parse_metrics

VLLM = """\
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="qwen"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="qwen"} 0.75
vllm:num_requests_waiting{engine="0",model_name="qwen"} 3.0
vllm:num_requests_waiting{engine="1",model_name="qwen"} 1.0
vllm:num_requests_running{engine="0",model_name="qwen"} 7.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",num_gpu_blocks="1000"} 1.0
"""
MARS = """\
vllm:kv_cache_usage_perc{engine="0",model_name="smol"} 0.5
vllm:num_requests_waiting{engine="0",model_name="smol"} 2.0
mars:admission_queued_sessions{model_name="smol"} 1.0
vllm:cache_config_info{block_size="1",engine="0",num_gpu_blocks="8192"} 1.0
"""


def test_metrics_of_vllm_old_vllm_mars_and_others() -> None:
    assert parse_metrics(VLLM) == Signal(0.5, 16000, 4, 7)
    old = 'vllm:gpu_cache_usage_perc{model_name="m"} 0.9\n'
    assert parse_metrics(old) == Signal(0.9, None, None, None)
    # A mars serve publishes vLLM's names; its admission queue counts as waiting.
    assert parse_metrics(MARS) == Signal(0.5, 8192, 3, None)
    assert parse_metrics("mars_kv_usage 0.5\nmars_waiting 2\n") == Signal()  # the old names
    assert parse_metrics("python_gc_objects_collected_total 5\nbad line\n") == Signal()
    assert parse_metrics("vllm:kv_cache_usage_perc NaN\n") == Signal()


def pool(n: int) -> Upstreams:
    urls = [f"http://10.0.0.{i}:8000" for i in range(n)]
    ups = Upstreams(urls, "openai", httpx.AsyncClient())
    for r in ups.replicas:
        ups.succeeded(r, Signal(0.0, 1000, 0, 0))
    return ups


def test_routing_is_sticky_spreads_and_moves_off_a_dead_replica() -> None:
    ups = pool(2)
    a, b = ups.route("a"), ups.route("b")
    assert a is not None and b is not None and a is not b  # equal pressure: fewest sessions
    assert ups.route("a") is a  # sticky
    ups.succeeded(b, Signal(0.5, 1000, 0, 0))
    assert ups.route("c") is a  # lower KV usage wins over session count
    ups.failed(a, "cannot connect: refused", fatal=True)
    assert ups.route("a") is b and ups.moved == 1
    ups.failed(b, "timeout")
    ups.failed(b, "timeout")
    assert b.up  # not yet: a timeout is down only after repeated failures
    ups.failed(b, "timeout")
    assert ups.route("d") is None
    assert "http://10.0.0.1:8000: down (timeout)" in ups.describe()
    ups.succeeded(a)
    assert ups.route("a") is a  # back: the session moves again
    ups.forget("a")
    assert a.sessions == 1  # "c" is still placed there


def test_pooled_kv_view_for_the_policy() -> None:
    ups = pool(2)
    view = PooledKV(ups)
    ups.succeeded(ups.replicas[0], Signal(0.5, 1000, 0, 0))
    ups.succeeded(ups.replicas[1], Signal(0.1, 3000, 0, 0))
    assert view.usage == pytest.approx(0.2)  # capacity-weighted
    assert view.num_blocks == 4000 and view.block_size == 1
    assert view.num_free_blocks == 2700  # the roomiest replica
    ups.failed(ups.replicas[1], "cannot connect", fatal=True)
    assert view.usage == 0.5 and view.num_blocks == 1000
    ups.succeeded(ups.replicas[0], Signal())  # no signal: admission by count only
    assert view.usage == 0.0 and view.num_free_blocks == UNKNOWN_CAPACITY


def test_extras_go_in_vllm_xargs_and_everything_else_passes() -> None:
    body = {"prompt": "x", "temperature": 0.5, "vllm_xargs": {"top_k_custom": 3}, "foo": [1]}
    out = Extras("s1", True, None, "grep").apply(body)
    assert out["vllm_xargs"] == {
        "top_k_custom": 3,
        "session_id": "s1",
        "is_last_step": True,
        "last_func_call": "grep",
    }
    assert {k: v for k, v in out.items() if k != "vllm_xargs"} == {
        "prompt": "x",
        "temperature": 0.5,
        "foo": [1],
    }
    assert body["vllm_xargs"] == {"top_k_custom": 3}  # the client's body is not changed


def test_the_control_tick_survives_a_policy_that_raises(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from mars.control.admission import AdmissionLimits
    from mars.core.clock import WallClock
    from mars.core.events import EventBus
    from mars.gateway.control import Control
    from mars.sched.policy import BasePolicy

    class Failing(BasePolicy):
        name = "failing"
        tick_s = 0.01
        ticks = 0

        def on_tick(self) -> None:
            self.ticks += 1
            raise RuntimeError("boom")

    policy = Failing()

    async def main() -> None:
        control = Control(policy, pool(1), AdmissionLimits(), WallClock(), EventBus())
        task = asyncio.create_task(control.run())
        await asyncio.sleep(0.2)
        assert not task.done()  # still ticking
        # Admission goes on: a new session is admitted (no window here) at once.
        assert control.arrive("s1", 10) is None
        task.cancel()

    asyncio.run(main())
    assert policy.ticks >= 3
    logged = [r for r in caplog.records if "control tick" in r.getMessage()]
    assert len(logged) == 1 and "boom" in (logged[0].exc_text or "")


def test_the_mars_policy_ticks_on_the_pooled_view(caplog: pytest.LogCaptureFixture) -> None:
    # Every member the policy reads must be on the view: a missing one raises inside the
    # tick, which the gateway logs and survives, so admission would quietly stop adapting.
    import asyncio

    from mars.control.admission import AdmissionLimits
    from mars.core.clock import WallClock
    from mars.core.events import EventBus
    from mars.gateway.control import Control
    from mars.sched.policies.mars import MarsPolicy

    policy = MarsPolicy()

    async def main() -> None:
        control = Control(policy, pool(1), AdmissionLimits(), WallClock(), EventBus())
        task = asyncio.create_task(control.run())
        assert control.arrive("s1", 10) is None  # admitted: one session counts
        await asyncio.sleep(1.2)  # a few control ticks
        assert not task.done()
        task.cancel()

    asyncio.run(main())
    assert not [r for r in caplog.records if "control tick" in r.getMessage()]
    assert policy.footprint() > 0
