"""What differs across the supported vLLM releases (0.32.0, 0.34.0), run on each by
scripts/test_vllm.sh: the version check, vLLM's own session id, the async scheduler, and the
queue settings the plug-in takes over (priority mode, 0.34's cache-aware admission off)."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip(
    "vllm.v1.core.sched.scheduler", reason="vLLM is not installed: run scripts/test_vllm.sh"
)

from vllm.config import SchedulerConfig
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm_harness import make_request, make_scheduler, step, write_model

import vllm
from mars.vllm.scheduler import SUPPORTED_VLLM, MarsAsyncScheduler, MarsScheduler


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("tiny-llama"))


def finish(sched, max_steps: int = 60) -> None:
    for _ in range(max_steps):
        if not sched.has_requests():
            return
        step(sched)
    raise AssertionError("requests did not finish")


def test_this_vllm_is_a_supported_one(model, caplog):
    assert vllm.__version__ in SUPPORTED_VLLM  # the venv scripts/setup_vllm.sh made
    with caplog.at_level(logging.WARNING, logger="vllm.mars"):
        make_scheduler(model)
    assert "MarsScheduler supports" not in caplog.text


def test_every_queue_is_a_priority_queue_and_the_order_is_the_policys(model):
    fields = SchedulerConfig.__dataclass_fields__
    extra = {"cache_aware_admission_window": 8} if "cache_aware_admission_window" in fields else {}
    s = make_scheduler(model, **extra)
    assert s.policy is SchedulingPolicy.PRIORITY
    assert s.scheduler_config.policy == "priority"
    for name in ("waiting", "kv_holding_waiting", "async_kv_waiting"):  # the last: 0.34
        if hasattr(s, name):
            assert type(getattr(s, name)).__name__ == "PriorityRequestQueue", name
    assert getattr(s, "cache_aware_window", 0) == 0  # vLLM reorders FCFS queues only


def test_vllms_own_session_id_groups_the_calls(model):
    s = make_scheduler(model, policy="continuum")
    s.add_request(make_request("a0", 40, max_tokens=1, vllm_session="s1", this_func_call="bash"))
    assert s.mars.mirrors["a0"].session_id == "s1"
    finish(s)
    assert "s1" in s.mars_pins  # a session (not a one-call request): continuum pins it
    s.add_request(make_request("a1", 60, vllm_session="s1", job_id="other", is_last_step=True))
    assert s.mars.mirrors["a1"].session_id == "s1"  # vLLM's id wins over the extras'
    assert len(s.mars.sessions["s1"].turns) == 2
    finish(s)
    assert not s.mars.sessions and not s.mars_pins


def test_the_flags_class_is_the_async_one_when_vllm_schedules_asynchronously(model):
    s = make_scheduler(model, async_scheduling=True)
    assert type(s) is MarsAsyncScheduler
    assert isinstance(s, AsyncScheduler) and isinstance(s, MarsScheduler)
    assert type(make_scheduler(model, async_scheduling=False)) is MarsScheduler


@pytest.mark.parametrize(("policy", "first"), [("mars", "cont"), ("fcfs", "new")])
def test_async_scheduler_orders_like_the_synchronous_one(model, policy, first):
    s = make_scheduler(model, policy=policy, budget=128, async_scheduling=True)
    s.add_request(make_request("a0", 40, max_tokens=1, session_id="s1"))
    finish(s)
    s.add_request(make_request("new", 100, session_id="s2"))  # arrives first
    s.add_request(make_request("cont", 100, session_id="s1"))
    out = step(s)
    assert out.scheduled_new_reqs[0].req_id == first
    finish(s)
    assert not s.mars.mirrors and not s._mars_steps  # every step's timing was taken
